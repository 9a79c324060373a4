"""Model zoo: parameter counts against the paper's tables, the model interface, ablation switches,
and forward/backward of DIA-ResNet-164 on CPU with every available backend."""
import pytest
import torch

from dia_fused import DIALSTM, DIASE, DIAStage, available_backends
from dia_fused.models import create_model, list_models, parse_name
from dia_fused.models.blocks import PlainStage


def params_m(name, **options):
    with torch.device("meta"):  # no memory, no init cost: counts only
        model = create_model(name, **options)
    return sum(p.numel() for p in model.parameters()) / 1e6


# (name, num_classes, options, paper P(M)); CIFAR: within 0.01M of the printed value
CIFAR_TABLES = [
    # Table 3, CIFAR-100 and CIFAR-10: original, SENet, DIANet (r=4)
    *[(f"{prefix}{model}", classes, {}, p)
      for model, classes, counts in [
          ("resnet164", 100, (1.73, 1.93, 1.95)), ("preresnet164", 100, (1.73, 1.92, 1.96)),
          ("wrn52_4", 100, (12.07, 12.42, 12.30)), ("resnext101_8x32", 100, (32.14, 34.03, 33.01)),
          ("resnet164", 10, (1.70, 1.91, 1.92)), ("preresnet164", 10, (1.70, 1.90, 1.94)),
          ("wrn52_4", 10, (12.05, 12.40, 12.28)), ("resnext101_8x32", 10, (32.09, 33.98, 32.96))]
      for prefix, p in zip(("", "se_", "dia_"), counts)],
    # Table 4: reduction ratio
    *[("dia_resnet164", 100, {"reduction": r}, p) for r, p in ((1, 2.59), (4, 1.95), (8, 1.84), (16, 1.78))],
    # Table 5: depth, SENet vs DIANet
    *[(f"{prefix}resnet{d}", 100, {}, p) for d, se, dia in ((83, 0.99, 1.11), (164, 1.93, 1.95), (245, 2.87, 2.78),
                                                             (407, 4.74, 4.45))
      for prefix, p in (("se_", se), ("dia_", dia))],
    # Table 6: three stacked cells
    ("dia_resnet164", 100, {"num_cells": 3}, 3.33),
    # Table 7: DIA removed from one stage
    *[("dia_resnet164", 100, {"dia_stages": stages}, p)
      for stages, p in (((2, 3), 1.94), ((1, 3), 1.90), ((1, 2), 1.78))],
    # Table 8: no BatchNorm (the DIANet column's increments match r=16)
    *[(f"{prefix}resnet{d}", 100, {"norm": False, **extra}, p)
      for d, counts in ((83, (0.88, 0.98, 0.94)), (164, (1.70, 1.91, 1.76)), (245, (2.53, 2.83, 2.58)),
                        (326, (3.35, 3.75, 3.41)))
      for (prefix, extra), p in zip((("", {}), ("se_", {}), ("dia_", {"reduction": 16})), counts)],
]

# Table 3, ImageNet: within 1% with the paper's ratios (r=20; r=10 for ResNet-152, the default)
IMAGENET_TABLE = [(f"{prefix}{model}", p) for model, counts in (
    ("resnet34", (21.81, 21.97, 21.98)), ("resnet50", (25.58, 28.09, 28.38)),
    ("resnet152", (60.27, 66.82, 65.85)), ("resnext50_32x4d", (25.03, 27.56, 27.83)))
    for prefix, p in zip(("", "se_", "dia_"), counts)]


@pytest.mark.parametrize("name, classes, options, paper", CIFAR_TABLES,
                         ids=[f"{n}-c{c}-{o}" for n, c, o, _ in CIFAR_TABLES])
def test_cifar_parameter_counts_match_the_paper(name, classes, options, paper):
    assert abs(params_m(name, num_classes=classes, **options) - paper) <= 0.01


@pytest.mark.parametrize("name, paper", IMAGENET_TABLE)
def test_imagenet_parameter_counts_match_the_paper(name, paper):
    assert abs(params_m(name) - paper) <= 0.01 * paper


def test_names_parse_and_every_listed_model_builds():
    assert parse_name("dia_se_wrn52_4")["attention"] == "dia_se"
    assert parse_name("dia_resnext101_8x32")["cardinality"] == 8
    for name in list_models():
        assert params_m(name) > 0
    with pytest.raises(ValueError, match="name: expected"):
        create_model("densenet121")
    with pytest.raises(ValueError, match=r"depth: expected 9n\+2"):
        create_model("dia_preresnet21")


def test_dia_models_share_one_unit_per_stage():
    model = create_model("dia_resnet20", num_classes=10, dia_stages=(1, 3))
    assert [type(s) for s in model.stages] == [DIAStage, PlainStage, DIAStage]
    assert isinstance(model.stages[0].unit, DIALSTM) and model.stages[0].unit.channels == 16
    assert isinstance(create_model("dia_se_resnet20").stages[1].unit, DIASE)


def test_forward_interface_and_attention_vectors():
    torch.manual_seed(0)
    model = create_model("dia_resnet20", num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, attention = model(x, return_attention=True)
    assert logits.shape == (2, 7)
    assert [a.shape for a in attention] == [(2, 3, 16), (2, 3, 32), (2, 3, 64)]
    torch.testing.assert_close(model(x), logits)
    assert ((attention[0] > 0) & (attention[0] < 1)).all()  # sigmoid(o) * sigmoid(c)


@pytest.mark.parametrize("name", ["dia_preresnet11", "dia_wrn10_2", "dia_resnext11_2x16", "se_resnet20"])
def test_other_families_run_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ablation_switches():
    no_norm = create_model("dia_resnet20", norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_norm.modules())
    no_skip = create_model("dia_resnet20", skip=False)
    branch, identity = no_skip.stages[0].blocks[0](torch.randn(1, 16, 8, 8))
    assert identity is None
    no_skip(torch.randn(1, 3, 8, 8)).sum().backward()
    tanh = create_model("dia_resnet20", cell_activation="tanh", num_cells=2)
    assert tanh.stages[0].unit.cell_activation == "tanh" and tanh.stages[0].unit.num_cells == 2
    with pytest.raises(ValueError, match=r"dia_stages: expected stage numbers in 1..3"):
        create_model("dia_resnet20", dia_stages=(0, 4))
    with pytest.raises(ValueError, match="attention: expected one of"):
        create_model("resnet20", attention="cbam")


def test_channels_last_and_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = create_model("dia_resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.slow  # a DIA-ResNet-164 step per backend, the interpreter's minutes
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_dia_resnet164_forward_backward_on_cpu(backend):
    torch.manual_seed(0)
    model = create_model("dia_resnet164", num_classes=100, backend=backend)
    x = torch.randn(2, 3, 32, 32) if backend == "reference" else torch.randn(1, 3, 8, 8)
    loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
