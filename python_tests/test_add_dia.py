"""dia_fused.add_dia on torchvision and timm ResNets (tiny inputs, CPU): keys and Parameter objects
kept, a plain state_dict loads with strict=False missing only the DIA keys, the stage math equal to
the zoo's DIAStage over the same blocks, reference vs Triton (interpreter) outputs and gradients,
detection backbones, timm features_only / forward_intermediates / grad checkpointing, torch.fx,
the EAN mask, remove_dia, and the errors."""

import copy
import pickle

import pytest
import torch
from torch import nn

import dia_fused
from dia_fused import add_dia, remove_dia
from dia_fused.models import create_model
from dia_fused.modules import DIALSTM, DIAStage
from dia_fused.testing import assert_within_tolerance, randomise_norms


def _import(name):
    """The package, or a skip naming why it does not import (beside a CPU build of torch,
    torchvision's CUDA wheels fail with `operator torchvision::nms does not exist`)."""
    try:
        return __import__(name)
    except Exception as error:  # noqa: BLE001 (RuntimeError from torchvision's C++ ops too)
        pytest.skip(
            f"{name} does not import here ({type(error).__name__}: {str(error)[:80]}); "
            f"pip install '.[vision]' beside a torch build it matches"
        )


@pytest.fixture(scope="module")
def tv():
    _import("torchvision")
    import torchvision.models

    return torchvision.models


@pytest.fixture(scope="module")
def timm():
    return _import("timm")


def _make(tv, timm, name):
    source, arch = name.split(":")
    if source == "torchvision":
        return getattr(tv, arch)(num_classes=10)
    return timm.create_model(arch, num_classes=10)


MODELS = [
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:resnext50_32x4d",
    "timm:resnet18",
    "timm:resnet50d",
    "timm:seresnet50",
]


class _SplitBlock(nn.Module):
    """The test's own (branch, identity) of a torchvision / timm block, for the zoo's DIAStage."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        b = self.block
        shortcut = x if b.downsample is None else b.downsample(x)
        if hasattr(b, "act1"):  # timm
            if hasattr(b, "conv3"):
                y = b.act1(b.bn1(b.conv1(x)))
                y = b.bn3(b.conv3(b.aa(b.act2(b.drop_block(b.bn2(b.conv2(y)))))))
            else:
                y = b.bn2(b.conv2(b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))))
            return (y if b.se is None else b.se(y)), shortcut
        y = b.relu(b.bn1(b.conv1(x)))
        y = b.bn2(b.conv2(y))
        if hasattr(b, "conv3"):
            y = b.bn3(b.conv3(b.relu(y)))
        return y, shortcut


def _stage_reference(stage, x):
    """The stage through dia_fused's zoo DIAStage with the same blocks and unit."""
    blocks = [_SplitBlock(copy.deepcopy(b)) for b in stage]
    unit = next(b._modules["dia"] for b in stage if "dia" in b._modules)
    return DIAStage(blocks, unit, relu=True)(x)


@pytest.mark.parametrize("name", MODELS)
def test_add_dia_keeps_keys_and_parameters_and_loads_plain_weights(tv, timm, name):
    torch.manual_seed(0)
    model = randomise_norms(_make(tv, timm, name)).eval()
    plain_class = type(model)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain_out = model(x)
    assert add_dia(model, reduction=16, backend="reference") is model
    assert type(model) is plain_class
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in params.items())
    new_keys = [k for k in model.state_dict() if k not in state]
    assert [k for k in model.state_dict() if k in state] == list(state)
    assert new_keys and all(".dia." in k for k in new_keys)
    assert {k.split(".dia.")[0] for k in new_keys} == {f"layer{i}.0" for i in (1, 2, 3, 4)}
    # a plain (pretrained) state_dict: only the DIA keys are missing
    pretrained = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(pretrained, strict=False)
    assert sorted(result.missing_keys) == sorted(new_keys) and result.unexpected_keys == []
    assert torch.equal(model.layer1[0].bn1.running_mean, pretrained["layer1.0.bn1.running_mean"])
    model.load_state_dict(state, strict=False)
    # each stage is the zoo's DIAStage over the same blocks (the paper's math)
    with torch.no_grad():
        feats = torch.randn(2, model.layer1[0].conv1.in_channels, 8, 8)
        for stage in (model.layer1, model.layer2):
            expected = _stage_reference(stage, feats)
            feats = stage(feats)
            torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".dia." in n)
    assert remove_dia(model) is model
    assert list(model.state_dict()) == list(state)
    assert type(model.layer1) is nn.Sequential and type(model.layer1[0]).__name__ in (
        "BasicBlock",
        "Bottleneck",
    )
    assert "_dia_fused_original" not in vars(type(model.layer1[0]))
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain_out)


def test_parameter_counts_of_resnet50_with_dia(tv):
    """The unit's count, 2 (C C/r + C/r + (C/r) 4C + 4C) per stage, added to the plain count."""
    plain = sum(p.numel() for p in tv.resnet50().parameters())
    for r in (16, 20):
        model = add_dia(tv.resnet50(), reduction=r)
        expected = sum(
            2 * (c * (c // r) + c // r + (c // r) * 4 * c + 4 * c) for c in (256, 512, 1024, 2048)
        )
        assert sum(p.numel() for p in model.parameters()) == plain + expected


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "triton_stages",
    [
        ("layer1",),
        pytest.param(("layer1", "layer2", "layer3", "layer4"), marks=pytest.mark.slow),
    ],
    ids=["first-stage", "all-stages"],
)
def test_reference_and_triton_backends_agree_on_resnet18(tv, triton_stages):
    """Outputs and every gradient. The default run keeps the stages after the first on the
    reference backend: the interpreter takes seconds per step there (4 s for one 512-channel
    backward)."""
    torch.manual_seed(0)
    plain = randomise_norms(tv.resnet18(num_classes=4)).eval()
    x = torch.randn(1, 3, 8, 8)
    models = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        models[backend] = add_dia(copy.deepcopy(plain), reduction=16, backend=backend)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if name not in triton_stages:
            next(
                m for m in getattr(models["triton"], name).modules() if isinstance(m, DIALSTM)
            ).backend = "reference"
    torch.manual_seed(1)
    ref64 = add_dia(copy.deepcopy(plain), reduction=16, backend="reference").double()
    got, got_grads = _outputs_and_grads(models["triton"], x)
    same, same_grads = _outputs_and_grads(models["reference"], x)
    ref, ref_grads = _outputs_and_grads(ref64, x.double())
    assert_within_tolerance("output", got, same, ref, torch.float32)
    for name, grad in got_grads.items():
        assert_within_tolerance(
            f"grad {name}", grad, same_grads[name], ref_grads[name], torch.float32
        )


def test_detection_backbone_with_fpn_trains(tv):
    """A DIA ResNet through torchvision's BackboneWithFPN path: forward and backward."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    backbone = add_dia(tv.resnet18(), reduction=16)
    fpn = _resnet_fpn_extractor(backbone, trainable_layers=5)
    features = fpn(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in features.values()] == [256] * 5
    sum(f.square().mean() for f in features.values()).backward()
    assert backbone.layer4[0].dia.w_ih[0].seq[2].weight.grad.abs().sum() > 0


def test_faster_rcnn_with_a_dia_resnet50_backbone_one_cheap_training_step(tv):
    """The default run's check: a DIA ResNet-50 through BackboneWithFPN into Faster R-CNN with
    small heads and few proposals (the slow test below uses torchvision's own settings)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    torch.manual_seed(0)
    backbone = add_dia(tv.resnet50(), reduction=16)
    layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    fpn = BackboneWithFPN(backbone, layers, [256, 512, 1024, 2048], out_channels=32)
    model = FasterRCNN(
        fpn,
        min_size=64,
        max_size=64,
        box_head=TwoMLPHead(32 * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, 3),
        rpn_pre_nms_top_n_train=50,
        rpn_post_nms_top_n_train=20,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=16,
    ).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = sum(model(images, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    unit = backbone.layer3[0].dia.w_ih[0].seq[2].weight
    assert unit.grad is not None and unit.grad.abs().sum() > 0
    before = unit.detach().clone()
    optimizer.step()
    assert not torch.equal(unit, before)


@pytest.mark.slow
def test_faster_rcnn_with_a_dia_resnet50_backbone_trains_one_step(tv):
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    built = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64
    )
    add_dia(built, reduction=20)  # resnet_fpn_backbone's model: the stages inside found
    backbone = add_dia(tv.resnet50(), reduction=16)
    own = FasterRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=3, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    for model in (built, own):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        losses = model(images, targets)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        loss.backward()
        dia = [p for n, p in model.named_parameters() if ".dia." in n and p.requires_grad]
        assert dia and any(p.grad is not None and p.grad.abs().sum() > 0 for p in dia)
        optimizer.step()


def test_timm_features_only_and_forward_intermediates(timm):
    x = torch.randn(2, 3, 32, 32)
    features = timm.create_model("resnet18", features_only=True)
    expected = [f.shape for f in features(x)]
    add_dia(features, reduction=16)
    assert (
        [f.shape for f in features(x)]
        == expected
        == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]
    )
    model = add_dia(timm.create_model("resnet18", num_classes=10), reduction=16).eval()
    final, intermediates = model.forward_intermediates(x)
    assert [f.shape for f in intermediates] == expected
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(final), model(x))


def test_timm_grad_checkpointing_gives_the_unchecked_gradients(timm):
    torch.manual_seed(0)
    model = add_dia(timm.create_model("resnet18", num_classes=4), reduction=16).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    torch.manual_seed(2)
    out, grads = _outputs_and_grads(model, x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(2)
    out_ckpt, grads_ckpt = _outputs_and_grads(model, x)
    torch.testing.assert_close(out_ckpt, out)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    # reentrant checkpointing recomputes each block from a detached input, without the state of
    # the block before: refused in the backward, never a state-less block
    from timm.layers import set_reentrant_ckpt

    set_reentrant_ckpt(True)
    try:
        with pytest.raises(RuntimeError, match=r"layer4.1: this block of a DIA stage ran without"):
            model(x).sum().backward()
    finally:
        set_reentrant_ckpt(False)


def test_symbolic_trace_of_a_zoo_model():
    model = create_model("dia_resnet20").eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="return_attention: expected a bool, got int"):
        model(x, return_attention=1)


def test_fx_and_create_feature_extractor_of_zoo_and_add_dia_models(tv):
    from torchvision.models.feature_extraction import create_feature_extractor

    x = torch.randn(2, 3, 32, 32)
    zoo = create_model("dia_resnet20").eval()
    extractor = create_feature_extractor(zoo, {"stages.1": "mid", "head": "logits"})
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], zoo(x), rtol=0, atol=0)
        torch.testing.assert_close(out["mid"], zoo.stages[1](zoo.stages[0](zoo.stem(x))))
    model = add_dia(randomise_norms(tv.resnet18(num_classes=10)), reduction=16).eval()
    traced = torch.fx.symbolic_trace(model)
    extractor = create_feature_extractor(model, {"layer2": "mid", "fc": "logits"})
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        torch.testing.assert_close(out["mid"], model.layer2(model.layer1(stem)))


def test_ean_mask_and_a_stage_without_dia(tv):
    torch.manual_seed(0)
    model = randomise_norms(tv.resnet18(num_classes=10)).eval()
    plain = copy.deepcopy(model)
    add_dia(model, reduction=20, blocks=[[False, True], [1, 0], [0, 0], [True, True]])
    assert "dia" in model.layer1[1]._modules and "dia" in model.layer2[0]._modules
    assert not any(".dia." in k for k in model.layer3.state_dict())
    assert model.layer1[1].dia.reduction == 20
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        first = model.layer1[0](x)
        torch.testing.assert_close(first, plain.layer1[0](x))  # not in the mask: the plain block
        torch.testing.assert_close(model.layer1(x), _stage_reference(model.layer1[1:], first))
    assert type(model.layer3) is nn.Sequential  # no block in the mask: the stage is unchanged


def test_blocks_run_one_by_one_carry_the_state(tv):
    """timm's checkpoint_seq and user code may call a stage's blocks in turn: same result."""
    model = add_dia(randomise_norms(tv.resnet18()), reduction=16).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        expected = model.layer1(x)
        y = x
        for block in model.layer1:
            y = block(y)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="layer1.1: this block of a DIA stage ran without"):
            model.layer1[1](x)


def test_hooks_on_blocks_and_activation_still_fire(tv):
    model = add_dia(randomise_norms(tv.resnet18()), reduction=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    seen = []
    model.layer4[1].register_forward_hook(lambda m, i, o: seen.append(("block", o.shape)))
    model.layer4[1].relu.register_forward_hook(lambda m, i, o: seen.append(("relu", o.shape)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # unfused ending: same values
    assert seen.count(("block", (2, 512, 1, 1))) == 1
    assert seen.count(("relu", (2, 512, 1, 1))) == 2  # inside the branch and after the add


def test_deepcopy_and_pickle_keep_dia(tv):
    model = add_dia(randomise_norms(tv.resnet18()), reduction=16).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
            assert dia_fused.adapters.dia_stages(clone) == ["layer1", "layer2", "layer3", "layer4"]


def test_errors_name_what_is_supported_and_change_nothing(tv):
    with pytest.raises(TypeError, match="model: expected torchvision ResNets .* or timm ResNets"):
        add_dia(nn.Sequential(nn.Conv2d(3, 3, 1)))
    model = tv.resnet18()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"blocks: the mask of layer4 must be 2 bools"):
        add_dia(model, blocks=[[1, 1], [1, 1], [1, 1], [1, 1, 1]])
    with pytest.raises(
        ValueError, match=r"reduction: expected a ratio <= channels \(64\), got 100"
    ):
        add_dia(model, reduction=100)
    with pytest.raises(ValueError, match="reduction: expected an int >= 1, got 0"):
        add_dia(model, reduction=0)
    assert list(model.state_dict()) == keys and type(model.layer1) is nn.Sequential
    add_dia(model)
    with pytest.raises(ValueError, match=r"already has DIA in \['layer1'"):
        add_dia(model)
    with pytest.raises(TypeError, match=r"before torch.compile .* or pass m._orig_mod"):
        add_dia(torch.compile(tv.resnet18()))


@pytest.mark.slow
def test_compile_export_and_onnx_of_an_add_dia_model(tv, tmp_path):
    model = add_dia(randomise_norms(tv.resnet18(num_classes=10)), reduction=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model)(x), expected, rtol=1e-4, atol=1e-4)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-4)
    onnx = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
    path = tmp_path / "dia_resnet18.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = onnx.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)
