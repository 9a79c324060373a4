"""Conversion of other codebases' DIA models: pytorchcv 0.0.74 (random weights) and the official
DIANet CIFAR models (their module structure re-created here from the published code), outputs
compared in eval mode within 1e-5 (relative to the logits' magnitude)."""
import pytest
import torch
from torch import nn

from dia_fused.compat import convert, load_official_state_dict
from dia_fused.modules import DIALSTM
from test_reference import OfficialLSTMCell

pytorchcv = pytest.importorskip("pytorchcv", reason="pip install --no-deps pytorchcv==0.0.74")


def randomise_norms(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
    return model


def assert_same_outputs(source, converted, x):
    source.eval()
    converted.eval()
    with torch.no_grad():
        expected, got = source(x), converted(x)
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= 1e-5 * scale
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in source.parameters())


@pytest.mark.parametrize("module, name, size", [
    ("diaresnet_cifar", "diaresnet20_cifar10", 32),
    ("diaresnet_cifar", "diaresnet164bn_cifar100", 32),
    ("diapreresnet_cifar", "diapreresnet20_cifar10", 32),
    ("diapreresnet_cifar", "diapreresnet164bn_cifar100", 32),
    ("diaresnet", "diaresnet50", 224),
    ("diaresnet", "diaresnet18", 224),
])
def test_pytorchcv_models_convert_with_the_same_outputs(module, name, size):
    factory = getattr(__import__(f"pytorchcv.models.{module}", fromlist=[name]), name)
    torch.manual_seed(0)
    source = randomise_norms(factory().eval())
    converted = convert(source, backend="reference")
    assert_same_outputs(source, converted, torch.randn(2, 3, size, size))


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
        self.pre = pre  # registration order as in the official files (it decides checkpoint key order)
        if pre:
            self.bn1 = nn.BatchNorm2d(inplanes)
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
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
    """The official dia_resnet (pre=False, class ResNet) / dia_preresnet (pre=True, class PreResNet)."""

    def __init__(self, depth, num_classes, pre):
        super().__init__()
        n = (depth - 2) // 9
        self.pre = pre
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        if not pre:
            self.bn1 = nn.BatchNorm2d(16)
        for i, planes in enumerate((16, 32, 64)):
            setattr(self, f"layer{i + 1}", Attention(self._make_layer(planes, n, 1 if i == 0 else 2),
                                                             planes * 4, relu=not pre))
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
        return nn.ModuleList(out)

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
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}  # DataParallel
    loaded = load_official_state_dict(name, checkpoint)
    assert_same_outputs(source, loaded, torch.randn(2, 3, 32, 32))


def test_conversion_errors_name_the_problem():
    with pytest.raises(TypeError, match="model: expected an official DIANet or pytorchcv DIA model"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1)))
    source = official(11, 10, False)
    with pytest.raises(ValueError, match="state_dict: .* layers in the checkpoint"):
        load_official_state_dict("dia_resnet20", source.state_dict())
