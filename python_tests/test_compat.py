"""Conversion of other codebases' DIA models: pytorchcv 0.0.74 (random weights) and the official
DIANet CIFAR models (dia_resnet, dia_preresnet, dia_wrn, dia_resnext: their module structure and
registration order re-created here from gbup-group/DIANet models/cifar), outputs
compared in eval mode within 1e-5 (relative to the logits' magnitude)."""

import argparse
import copy
import importlib.util
import re

import pytest
import torch
from torch import nn

import dia_fused
import official_dianet
from dia_fused.compat import convert, load_official_state_dict
from dia_fused.modules import DIALSTM
from dia_fused.testing import randomise_norms
from test_reference import OfficialLSTMCell

# only the pytorchcv conversions need it; the official-model tests run without
needs_pytorchcv = pytest.mark.skipif(
    importlib.util.find_spec("pytorchcv") is None,
    reason="pytorchcv is not installed: pip install --no-deps pytorchcv==0.0.74",
)


def assert_same_outputs(source, converted, x):
    source.eval()
    converted.eval()
    with torch.no_grad():
        expected, got = source(x), converted(x)
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= 1e-5 * scale
    assert sum(p.numel() for p in converted.parameters()) == sum(
        p.numel() for p in source.parameters()
    )


@pytest.mark.parametrize(
    "module, name, size",
    [
        ("diaresnet_cifar", "diaresnet20_cifar10", 32),
        pytest.param("diaresnet_cifar", "diaresnet164bn_cifar100", 32, marks=pytest.mark.slow),
        ("diapreresnet_cifar", "diapreresnet20_cifar10", 32),
        pytest.param(
            "diapreresnet_cifar", "diapreresnet164bn_cifar100", 32, marks=pytest.mark.slow
        ),
        pytest.param("diaresnet", "diaresnet50", 224, marks=pytest.mark.slow),  # ImageNet-sized
        pytest.param("diaresnet", "diaresnet18", 224, marks=pytest.mark.slow),
    ],
)
@needs_pytorchcv
def test_pytorchcv_models_convert_with_the_same_outputs(module, name, size):
    factory = getattr(__import__(f"pytorchcv.models.{module}", fromlist=[name]), name)
    torch.manual_seed(0)
    source = randomise_norms(factory().eval())
    converted = convert(source, backend="reference")
    assert_same_outputs(source, converted, torch.randn(2, 3, size, size))


@pytest.mark.slow  # a ResNet-50 at 224x224
@needs_pytorchcv
def test_pytorchcv_imagenet_ratio_is_kept():
    from pytorchcv.models.diaresnet import diaresnet50

    converted = convert(diaresnet50())
    assert converted.stages[0].unit.reduction == 4  # pytorchcv uses r=4, the paper r=20
    assert abs(sum(p.numel() for p in converted.parameters()) / 1e6 - 39.52) < 0.01


# --- the official DIANet CIFAR structure (gbup-group/DIANet models/cifar), re-created -------------


class Attention(nn.Module):
    def __init__(self, module_list, channels, relu):
        super().__init__()
        self.ModuleList = module_list
        self.lstm = OfficialLSTMCell(channels, 1)
        self.GlobalAvg = nn.AdaptiveAvgPool2d((1, 1))
        self.relu = relu

    def forward(self, x):
        ht = ct = None
        for layer in self.ModuleList:
            x, org = layer(x)
            seq = self.GlobalAvg(x).flatten(1)
            if ht is None:
                ht = ct = torch.zeros(1, seq.shape[0], seq.shape[1])
            ht, ct = self.lstm(seq, (ht, ct))
            x = x * ht[-1][:, :, None, None] + org
            if self.relu:
                x = torch.relu(x)
        return x


class OfficialBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None, pre=False):
        super().__init__()
        self.pre = (
            pre  # registration order as in the official files (it decides checkpoint key order)
        )
        if pre:
            self.bn1 = nn.BatchNorm2d(inplanes)
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.downsample = downsample  # registered before bn_additional, as in the official file
            self.bn_additional = nn.BatchNorm2d(planes * 4)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.downsample = downsample

    def forward(self, x):
        if self.pre:
            out = self.conv1(torch.relu(self.bn1(x)))
            out = self.conv2(torch.relu(self.bn2(out)))
            out = self.bn_additional(self.conv3(torch.relu(self.bn3(out))))
        else:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = torch.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        return out, (x if self.downsample is None else self.downsample(x))


class OfficialNet(nn.Module):
    """The official dia_resnet (pre=False, class ResNet) / dia_preresnet (pre=True, class
    PreResNet)."""

    def __init__(self, depth, num_classes, pre):
        super().__init__()
        n = (depth - 2) // 9
        self.pre = pre
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        if not pre:
            self.bn1 = nn.BatchNorm2d(16)
        for i, planes in enumerate((16, 32, 64)):
            setattr(
                self,
                f"layer{i + 1}",
                Attention(
                    self._make_layer(planes, n, 1 if i == 0 else 2), planes * 4, relu=not pre
                ),
            )
        if pre:
            self.bn = nn.BatchNorm2d(256)
        self.fc = nn.Linear(256, num_classes)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            layers = [nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False)]
            if not self.pre:
                layers.append(nn.BatchNorm2d(planes * 4))
            downsample = nn.Sequential(*layers)
        out = [OfficialBottleneck(self.inplanes, planes, stride, downsample, self.pre)]
        self.inplanes = planes * 4
        out += [OfficialBottleneck(self.inplanes, planes, pre=self.pre) for _ in range(1, blocks)]
        return (
            nn.Sequential(*out) if self.pre else nn.ModuleList(out)
        )  # the official PreResNet: Sequential

    def forward(self, x):
        x = self.conv1(x)
        if not self.pre:
            x = torch.relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.pre:
            x = torch.relu(self.bn(x))
        return self.fc(x.mean((2, 3)))


def official(depth, num_classes, pre):
    model = OfficialNet(depth, num_classes, pre)
    model.__class__ = type("PreResNet" if pre else "ResNet", (OfficialNet,), {})
    return randomise_norms(model)


class OfficialWideBlock(nn.Module):
    """models/cifar/dia_wrn.py BasicBlock: pre-activation, an extra BN closing the branch; a width
    change projects the pre-activated input."""

    def __init__(self, cin, cout, stride, drop_rate):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn_additional = nn.BatchNorm2d(cout)  # registered after the shortcut, runs before it

    def forward(self, x):
        pre = torch.relu(self.bn1(x))
        out = torch.relu(self.bn2(self.conv1(pre)))
        out = nn.functional.dropout(out, p=self.droprate, training=self.training)
        out = self.bn_additional(self.conv2(out))
        return out, (x if self.equalInOut else self.convShortcut(pre))


class WideResNet(nn.Module):
    """models/cifar/dia_wrn.py WideResNet (no ReLU after the residual sum). The official file sizes
    the units 64/128/256, i.e. widen factor 4 only; here they follow the widths."""

    def __init__(self, depth, num_classes, widen_factor, drop_rate=0.0):
        super().__init__()
        widths, n = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor], (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for i in range(3):
            blocks = nn.ModuleList(
                OfficialWideBlock(
                    widths[i] if j == 0 else widths[i + 1],
                    widths[i + 1],
                    (1 if i == 0 else 2) if j == 0 else 1,
                    drop_rate,
                )
                for j in range(n)
            )
            setattr(self, f"block{i + 1}", Attention(blocks, widths[i + 1], relu=False))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.relu(self.bn1(x)).mean((2, 3)))


class OfficialResNeXtBlock(nn.Module):
    """models/cifar/dia_resnext.py ResNeXtBottleneck: 1x1 reduce, grouped strided 3x3, 1x1 expand;
    a projection shortcut (conv + BN) when the channels change."""

    def __init__(self, cin, cout, stride, cardinality, widen_factor):
        super().__init__()
        width = cardinality * cout // widen_factor
        self.conv_reduce = nn.Conv2d(cin, width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(width)
        self.conv_conv = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_expand = nn.Conv2d(width, cout, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if cin != cout:
            self.shortcut.add_module("shortcut_conv", nn.Conv2d(cin, cout, 1, stride, bias=False))
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn_reduce(self.conv_reduce(x)))
        out = torch.relu(self.bn(self.conv_conv(out)))
        return self.bn_expand(self.conv_expand(out)), self.shortcut(x)


class CifarResNeXt(nn.Module):
    """models/cifar/dia_resnext.py CifarResNeXt (widen factor 4: stages of 128/256/512 channels)."""

    def __init__(self, cardinality, depth, num_classes, widen_factor=4):
        super().__init__()
        self.cardinality, self.depth, self.widen_factor, self.num_classes = (
            cardinality,
            depth,
            widen_factor,
            num_classes,
        )
        stages = [32, 32 * widen_factor, 64 * widen_factor, 128 * widen_factor]
        self.conv_1_3x3 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(32)
        for i in range(3):
            blocks = nn.ModuleList(
                OfficialResNeXtBlock(
                    stages[i] if j == 0 else stages[i + 1],
                    stages[i + 1],
                    (1 if i == 0 else 2) if j == 0 else 1,
                    cardinality,
                    widen_factor,
                )
                for j in range((depth - 2) // 9)
            )
            setattr(self, f"stage_{i + 1}", Attention(blocks, stages[i + 1], relu=True))
        self.classifier = nn.Linear(stages[3], num_classes)

    def forward(self, x):
        x = torch.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(x.mean((2, 3)))


OFFICIAL_WIDE_MODELS = {  # name for load_official_state_dict -> the official model
    "dia_wrn16_2": lambda: WideResNet(16, 100, 2, drop_rate=0.3),
    "dia_wrn10_4": lambda: WideResNet(10, 100, 4),
    "dia_resnext11_2x32": lambda: CifarResNeXt(2, 11, 100),  # 2 groups of 32 channels
    "dia_resnext20_4x32": lambda: CifarResNeXt(4, 20, 10),
}


@pytest.mark.parametrize("name", list(OFFICIAL_WIDE_MODELS))
def test_official_wrn_and_resnext_convert_and_load_with_the_same_outputs(name):
    torch.manual_seed(0)
    source = randomise_norms(OFFICIAL_WIDE_MODELS[name]()).eval()
    x = torch.randn(2, 3, 32, 32)
    converted = convert(source, backend="reference")
    assert [type(s.unit) for s in converted.stages] == [DIALSTM] * 3
    assert_same_outputs(source, converted, x)
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    options = {"dropout": source.block1.ModuleList[0].droprate} if "wrn" in name else {}
    assert_same_outputs(source, load_official_state_dict(name, checkpoint, **options), x)


@pytest.mark.parametrize("pre", [False, True], ids=["dia_resnet", "dia_preresnet"])
@pytest.mark.parametrize("depth", [11, 29])
def test_official_models_convert_with_the_same_outputs(pre, depth):
    torch.manual_seed(0)
    source = official(depth, 100, pre).eval()
    converted = convert(source, backend="reference")
    assert isinstance(converted.stages[2].unit, DIALSTM)
    assert_same_outputs(source, converted, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("pre, name", [(False, "dia_resnet29"), (True, "dia_preresnet29")])
def test_official_checkpoint_loads_by_name(pre, name):
    torch.manual_seed(1)
    source = official(29, 100, pre).eval()
    checkpoint = {
        "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}
    }  # DataParallel
    loaded = load_official_state_dict(name, checkpoint)
    assert_same_outputs(source, loaded, torch.randn(2, 3, 32, 32))


def test_conversion_errors_name_the_problem():
    with pytest.raises(
        TypeError, match="model: expected an official DIANet or pytorchcv DIA model"
    ):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1)))
    source = official(11, 10, False)
    with pytest.raises(ValueError, match="state_dict: .* layers in the checkpoint"):
        load_official_state_dict("dia_resnet20", source.state_dict())


# --- the official files' calling conventions (official_dianet.py), wrapped models, checkpoints ---


@pytest.fixture
def cuda_calls_harmless(monkeypatch):
    """The official Attention stages call `.cuda()` on their zero state: a no-op on the CPU."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


@pytest.mark.parametrize(
    "cardinality, depth", [(2, 11), pytest.param(8, 29, marks=pytest.mark.slow)]
)
def test_convert_official_resnext_that_calls_forward_directly(
    cuda_calls_harmless, cardinality, depth
):
    """The official ResNeXt runs its submodules as `module.forward(x)`: no hooks fire, yet every
    layer is matched (before: "7 conv/norm/linear layers run in the source, 63 in ...")."""
    torch.manual_seed(0)
    source = official_dianet.CifarResNeXt(cardinality, depth, 10, 4)
    source = randomise_norms(source).eval()
    assert_same_outputs(source, convert(source, backend="reference"), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: official_dianet.ResNet(11, 10, "Bottleneck"),
        lambda: official_dianet.WideResNet(10, 10, 4, dropRate=0.3),
        lambda: __import__(
            "pytorchcv.models.diaresnet_cifar", fromlist=["x"]
        ).diaresnet20_cifar10(),
    ],
    ids=["official_resnet11", "official_wrn10_4", "pytorchcv_diaresnet20_cifar10"],
)
def test_convert_dataparallel_wrapped_and_accelerated_models(cuda_calls_harmless, make):
    torch.manual_seed(0)
    source = randomise_norms(make()).eval()
    x = torch.randn(2, 3, 32, 32)
    assert_same_outputs(source, convert(nn.DataParallel(source), backend="reference"), x)
    accelerated = dia_fused.accelerate(nn.DataParallel(copy.deepcopy(source)), backend="reference")
    assert_same_outputs(source, convert(accelerated, backend="reference"), x)


def official_checkpoint(pre=False):
    torch.manual_seed(1)
    source = official(11, 10, pre).eval()
    return source, {f"module.{k}": v for k, v in source.state_dict().items()}


def test_checkpoint_without_num_batches_tracked_loads():
    """Checkpoints of PyTorch < 0.4.1 have no num_batches_tracked (before: a shape mismatch)."""
    source, checkpoint = official_checkpoint()
    old = {k: v for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(checkpoint)
    loaded = load_official_state_dict("dia_resnet11", old)
    assert_same_outputs(source, loaded, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "key", ["layer2.lstm.w_hh.0.seq.2.bias", "layer1.lstm.w_ih.0.seq.0.weight"]
)
def test_checkpoint_with_a_missing_lstm_key_names_it(key):
    """Before: a bare KeyError ('w_ih.0.seq.0.weight') or torch's RuntimeError without the stage."""
    _, checkpoint = official_checkpoint()
    del checkpoint[f"module.{key}"]
    with pytest.raises(ValueError, match=rf"missing keys \['{re.escape(key)}'\]"):
        load_official_state_dict("dia_resnet11", checkpoint)


def test_checkpoint_with_a_missing_or_extra_layer_key_names_it():
    _, checkpoint = official_checkpoint()
    del checkpoint["module.layer1.ModuleList.0.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \['layer1.ModuleList.0.bn2.running_var'\]"):
        load_official_state_dict("dia_resnet11", checkpoint)
    _, checkpoint = official_checkpoint()
    checkpoint["module.layer1.ModuleList.0.conv1.bias"] = torch.zeros(16)
    with pytest.raises(ValueError, match=r"unexpected keys \['layer1.ModuleList.0.conv1.bias'\]"):
        load_official_state_dict("dia_resnet11", checkpoint)


def test_wrn_checkpoint_needs_its_dropout_rate(cuda_calls_harmless):
    source = official_dianet.WideResNet(10, 10, 4, dropRate=0.3)
    with pytest.raises(ValueError, match="dropout: .* does not record .* training outputs differ"):
        load_official_state_dict("dia_wrn10_4", source.state_dict())
    randomised = randomise_norms(source).eval()
    loaded = load_official_state_dict("dia_wrn10_4", randomised.state_dict(), dropout=0.3)
    assert_same_outputs(randomised, loaded, torch.randn(2, 3, 32, 32))


# --- official checkpoints matched by name (issue 22) ----------------------------------------------


def _hinted(error):
    """The (name, options) a mismatch error suggests."""
    match = re.search(r"load_official_state_dict\('([^']+)', \.\.\.((?:, \w+=[^,)]+)*)\)", error)
    assert match, error
    options = dict(re.findall(r", (\w+)=([^,)]+)", match.group(2)))
    return match.group(1), options


@pytest.mark.parametrize(
    "model", ["resnet11", "preresnet11", "wrn10_4", "resnext11_2x64", "resnet20_bottleneck"]
)
def test_official_checkpoint_with_sorted_keys_loads_and_a_wrong_name_gets_the_right_one(
    cuda_calls_harmless, model
):
    """Keys sorted as strings (bn1 before conv1, as some converters write them) load by name; a
    wrong model name is refused naming the first differing keys and the name to use (before: a
    shape error on the first sorted layer, or only layer counts). Depth 20 with bottlenecks also
    fits basic blocks, which the name alone means: the hint adds block='bottleneck'."""
    torch.manual_seed(0)
    make = official_dianet.OFFICIAL_MODELS.get(
        model, lambda pool: official_dianet.ResNet(20, 10, "Bottleneck", pool=pool)
    )
    source = randomise_norms(make(8)).eval()
    state = source.state_dict()
    checkpoint = {"state_dict": {f"module.{k}": state[k] for k in sorted(state)}}
    with pytest.raises(ValueError, match=r"by name: missing keys \[.*unexpected keys \[") as err:
        load_official_state_dict("dia_resnet20", checkpoint)
    name, options = _hinted(str(err.value))
    if "dropout" in options:
        options["dropout"] = source.block1.ModuleList[0].droprate
    options = {k: v if k == "dropout" else eval(v) for k, v in options.items()}
    loaded = load_official_state_dict(name, checkpoint, backend="reference", **options)
    assert_same_outputs(source, loaded, torch.randn(2, 3, 32, 32))


def _blocks_in_string_order(state):
    """The same keys with each stage's blocks in string order of their index (0, 1, 10, 2, ...),
    every other key, and each block's own keys, in their order."""
    stages = {}
    for key in state:
        match = re.match(r"(\w+)\.ModuleList\.(\d+)\.", key)
        if match:
            stages.setdefault(match.group(1), {}).setdefault(match.group(2), []).append(key)
    keys, done = [], set()
    for key in state:
        match = re.match(r"(\w+)\.ModuleList\.", key)
        if not match:
            keys.append(key)
        elif match.group(1) not in done:
            done.add(match.group(1))
            blocks = stages[match.group(1)]
            keys += [k for index in sorted(blocks) for k in blocks[index]]
    return {k: state[k] for k in keys}


def test_blocks_of_a_stage_in_another_order_load_into_the_right_blocks(cuda_calls_harmless):
    """Before: loaded by position into the wrong blocks (logits off by 0.43 on 1.65), no error."""
    torch.manual_seed(0)
    # 11 blocks per stage; 8x8 images (final pool window 2) keep it quick
    source = official_dianet.ResNet(101, 10, "Bottleneck", pool=2)
    source = randomise_norms(source).eval()
    shuffled = _blocks_in_string_order(source.state_dict())
    order = [k.split(".")[2] for k in shuffled if k.startswith("layer1.ModuleList.")]
    assert list(dict.fromkeys(order))[:4] == ["0", "1", "10", "2"]
    loaded = load_official_state_dict("dia_resnet101_cifar", shuffled, backend="reference")
    assert_same_outputs(source, loaded, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"ImageNet network.*dia_resnet101_cifar"):
        load_official_state_dict("dia_resnet101", shuffled)


def test_official_checkpoint_path_is_loaded_or_refused_clearly(tmp_path):
    """Before: AttributeError: 'str' object has no attribute 'items'."""
    source, checkpoint = official_checkpoint()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": checkpoint}, path)
    for given in (str(path), path):
        loaded = load_official_state_dict("dia_resnet11", given, backend="reference")
        assert_same_outputs(source, loaded, torch.randn(2, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="state_dict: no file at .*missing.pth.tar"):
        load_official_state_dict("dia_resnet11", str(tmp_path / "missing.pth.tar"))
    torch.save({"state_dict": checkpoint, "args": argparse.Namespace(depth=11)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True\) refuses.*weights_only=False"):
        load_official_state_dict("dia_resnet11", str(path))
    with pytest.raises(TypeError, match="state_dict: expected a state dict, .* got int"):
        load_official_state_dict("dia_resnet11", 3)


def test_official_basic_block_resnet_is_refused(cuda_calls_harmless):
    """The official BasicBlock DIA ResNet computes another network; it is named, not loaded."""
    source = official_dianet.ResNet(20, 10, "BasicBlock")
    with pytest.raises(ValueError, match="official DIA ResNet with BasicBlock"):
        load_official_state_dict("dia_resnet20", source.state_dict())
