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
    *[
        (f"{prefix}{model}", classes, {}, p)
        for model, classes, counts in [
            ("resnet164", 100, (1.73, 1.93, 1.95)),
            ("preresnet164", 100, (1.73, 1.92, 1.96)),
            ("wrn52_4", 100, (12.07, 12.42, 12.30)),
            ("resnext101_8x32", 100, (32.14, 34.03, 33.01)),
            ("resnet164", 10, (1.70, 1.91, 1.92)),
            ("preresnet164", 10, (1.70, 1.90, 1.94)),
            ("wrn52_4", 10, (12.05, 12.40, 12.28)),
            ("resnext101_8x32", 10, (32.09, 33.98, 32.96)),
        ]
        for prefix, p in zip(("", "se_", "dia_"), counts)
    ],
    # Table 4: reduction ratio
    *[
        ("dia_resnet164", 100, {"reduction": r}, p)
        for r, p in ((1, 2.59), (4, 1.95), (8, 1.84), (16, 1.78))
    ],
    # Table 5: depth, SENet vs DIANet
    *[
        (f"{prefix}resnet{d}", 100, {}, p)
        for d, se, dia in (
            (83, 0.99, 1.11),
            (164, 1.93, 1.95),
            (245, 2.87, 2.78),
            (407, 4.74, 4.45),
        )
        for prefix, p in (("se_", se), ("dia_", dia))
    ],
    # Table 6: three stacked cells
    ("dia_resnet164", 100, {"num_cells": 3}, 3.33),
    # Table 7: DIA removed from one stage
    *[
        ("dia_resnet164", 100, {"dia_stages": stages}, p)
        for stages, p in (((2, 3), 1.94), ((1, 3), 1.90), ((1, 2), 1.78))
    ],
    # Table 8: no BatchNorm (the DIANet column's increments match r=16)
    *[
        (f"{prefix}resnet{d}", 100, {"norm": False, **extra}, p)
        for d, counts in (
            (83, (0.88, 0.98, 0.94)),
            (164, (1.70, 1.91, 1.76)),
            (245, (2.53, 2.83, 2.58)),
            (326, (3.35, 3.75, 3.41)),
        )
        for (prefix, extra), p in zip((("", {}), ("se_", {}), ("dia_", {"reduction": 16})), counts)
    ],
]

# Table 3, ImageNet: within 1% with the paper's ratios (r=20; r=10 for ResNet-152, the default)
IMAGENET_TABLE = [
    (f"{prefix}{model}", p)
    for model, counts in (
        ("resnet34", (21.81, 21.97, 21.98)),
        ("resnet50", (25.58, 28.09, 28.38)),
        ("resnet152", (60.27, 66.82, 65.85)),
        ("resnext50_32x4d", (25.03, 27.56, 27.83)),
    )
    for prefix, p in zip(("", "se_", "dia_"), counts)
]


@pytest.mark.parametrize(
    "name, classes, options, paper",
    CIFAR_TABLES,
    ids=[f"{n}-c{c}-{o}" for n, c, o, _ in CIFAR_TABLES],
)
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


@pytest.mark.parametrize(
    "name", ["dia_preresnet11", "dia_wrn10_2", "dia_resnext11_2x16", "se_resnet20"]
)
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
    torch.testing.assert_close(
        cl(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-4, rtol=1e-4
    )
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


# --- the name grammar, exactly --------------------------------------------------------------------


def _structure(name, **options):
    """(main-path weighted layers, [(groups, channels per group) of each stage's grouped 3x3],
    [stage output channels]) of a model built on meta."""
    with torch.device("meta"):
        model = create_model(name, **options)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.stem.modules())
    groups, outputs = [], []
    for stage in model.stages:
        for block in stage.blocks:
            convs += sum(isinstance(m, torch.nn.Conv2d) for m in block.branch.modules())
        grouped = [
            m
            for m in stage.blocks[0].branch.modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
        ][-1]
        groups.append((grouped.groups, grouped.out_channels // grouped.groups))
        outputs.append(stage.blocks[-1].branch[-1].num_features)
    return convs + 1, groups, outputs  # + the classifier


@pytest.mark.parametrize(
    "name, depth, groups, outputs",
    [
        ("resnet20", 20, [(1, 16), (1, 32), (1, 64)], [16, 32, 64]),
        ("dia_resnet164", 164, [(1, 16), (1, 32), (1, 64)], [64, 128, 256]),
        ("resnet50_cifar", 50, [(1, 16), (1, 32), (1, 64)], [16, 32, 64]),
        ("se_resnet18", 18, [(1, 64), (1, 128), (1, 256), (1, 512)], [64, 128, 256, 512]),
        ("dia_resnet50", 50, [(1, 64), (1, 128), (1, 256), (1, 512)], [256, 512, 1024, 2048]),
        ("dia_preresnet164", 164, [(1, 16), (1, 32), (1, 64)], [64, 128, 256]),
        # WRN-d-k: depth counts two more than the main path (6n+4 with n blocks per stage)
        ("dia_wrn28_10", 26, [(1, 160), (1, 320), (1, 640)], [160, 320, 640]),
        ("dia_wrn16_4", 14, [(1, 64), (1, 128), (1, 256)], [64, 128, 256]),
        ("dia_resnext29_8x64", 29, [(8, 64), (8, 128), (8, 256)], [128, 256, 512]),
        ("dia_resnext29_8x64d", 29, [(8, 64), (8, 128), (8, 256)], [128, 256, 512]),
        ("dia_resnext29_16x32", 29, [(16, 32), (16, 64), (16, 128)], [128, 256, 512]),
        ("dia_resnext101_8x32", 101, [(8, 32), (8, 64), (8, 128)], [128, 256, 512]),
        ("dia_resnext50_32x4d", 50, [(32, 4), (32, 8), (32, 16), (32, 32)], [256, 512, 1024, 2048]),
        ("dia_resnext50_8x16", 50, [(8, 16), (8, 32), (8, 64), (8, 128)], [256, 512, 1024, 2048]),
    ],
)
def test_every_part_of_a_name_builds_what_it_says(name, depth, groups, outputs):
    assert _structure(name) == (depth, groups, outputs)


def test_resnext_widen_factor_option_scales_outputs_not_groups():
    _, groups, outputs = _structure("dia_resnext29_8x32", widen_factor=8)
    assert groups == [(8, 32), (8, 64), (8, 128)] and outputs == [256, 512, 1024]


@pytest.mark.parametrize(
    "name, problem, suggestion",
    [
        ("dia_resnet50_32x4d", "a resnet name takes no cardinality x width", "dia_resnext50_32x4d"),
        ("dia_resnet164_4", "a resnet name takes no widen factor", "dia_resnet164"),
        ("dia_resnet20\n", "expected", "dia_resnet20"),
        (" DIA_ResNet20", "expected", "dia_resnet20"),
        (
            "dia_preresnet164_8x32",
            "a preresnet name takes no cardinality x width",
            "dia_preresnet164",
        ),
        ("dia_preresnet164_cifar", "a preresnet name takes no '_cifar' suffix", "dia_preresnet164"),
        ("dia_wrn28", "a wrn name needs its widen factor", "dia_wrn28_4"),
        ("dia_wrn28_8x32", "a wrn name takes no cardinality x width", "dia_wrn28_4"),
        ("dia_wrn28_10_cifar", "a wrn name takes no '_cifar' suffix", "dia_wrn28_10"),
        ("dia_resnext29", "a resnext name needs its cardinality x width", "dia_resnext29_8x32"),
        ("dia_resnext29_4", "a resnext name takes no widen factor", "dia_resnext29_8x32"),
        ("se_resnext50", "a resnext name needs its cardinality x width", "se_resnext50_32x4d"),
        ("resnet020", "without leading zeros", "resnet20"),
        ("dia_wrn16_0", "numbers >= 1", None),
        ("dia_resnext29_0x32", "numbers >= 1", None),
        ("dia_resnet", "expected", None),
        ("densenet121", "expected", None),
    ],
)
def test_a_name_outside_the_grammar_is_rejected_with_the_closest_names(name, problem, suggestion):
    with pytest.raises(ValueError, match="^name: ") as info:
        create_model(name)
    message = str(info.value)
    assert problem in message and f"got {name!r}" in message
    if suggestion is not None:
        assert repr(suggestion) in message.split("; did you mean ")[1]
        parse_name(suggestion)  # itself a name of the grammar
    with pytest.raises(TypeError, match="name: expected a str, got int"):
        parse_name(164)


def test_options_the_name_sets_are_not_accepted_twice():
    with pytest.raises(ValueError, match=r"widen_factor: set by the name 'dia_wrn16_4'"):
        create_model("dia_wrn16_4", widen_factor=8)
    with pytest.raises(ValueError, match=r"cardinality: set by the name 'resnet50'"):
        create_model("resnet50", cardinality=32)
    with pytest.raises(ValueError, match=r"base_width: set by the name"):
        create_model("dia_resnext29_8x32", base_width=64)


FAMILY_NAMES = [
    "resnet20",
    "preresnet20",
    "wrn16_2",
    "resnext29_2x8",
    "resnet18",
    "resnext50_32x4d",
]
ALL_NAMES = [
    f"{prefix}{body}" for body in FAMILY_NAMES for prefix in ("", "se_", "dia_", "dia_se_")
]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_options_are_validated_for_every_family_and_attention(name):
    """Invalid values are errors everywhere; a valid DIA-LSTM option on a model without a
    DIA-LSTM unit is an error (it would be ignored), never dropped."""
    attention = parse_name(name)["attention"]
    bad = [
        ({"backend": "gpu"}, ValueError, r"backend: expected one of"),
        ({"cell_activation": "gelu"}, ValueError, r"cell_activation: expected one of"),
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"num_classes": 2.5}, TypeError, r"num_classes: expected an int"),
        ({"reduction": 0}, ValueError, r"reduction: expected an int >= 1"),
        ({"num_cells": True}, TypeError, r"num_cells: expected an int"),
        ({"norm": "no"}, TypeError, r"norm: expected a bool"),
    ]
    if attention in ("dia", "dia_se"):
        bad += [
            ({"dia_stages": (1.0,)}, TypeError, r"dia_stages: expected int stage numbers"),
            ({"dia_stages": (1, 1)}, ValueError, r"expected stage numbers in 1\.\..*each once"),
            ({"dia_stages": ()}, ValueError, r"at least one"),
            ({"dia_stages": (9,)}, ValueError, r"dia_stages: expected stage numbers in 1\.\."),
            ({"dia_stages": "12"}, TypeError, r"dia_stages: expected a sequence"),
        ]
    else:
        bad += [({"dia_stages": (1,)}, ValueError, r"dia_stages: used by a shared DIA unit")]
    if attention != "dia":
        bad += [
            (
                {"num_cells": 2},
                ValueError,
                r"num_cells: used by a DIA-LSTM unit, which the "
                rf"model \(attention '{attention}'\) does not",
            ),
            ({"cell_activation": "tanh"}, ValueError, r"cell_activation: used by a DIA-LSTM"),
            ({"backend": "reference"}, ValueError, r"backend: used by a DIA-LSTM unit"),
        ]
    if attention == "none":
        bad += [({"reduction": 8}, ValueError, r"reduction: used by an attention module")]
    for options, error, match in bad:
        with pytest.raises(error, match=match), torch.device("meta"):
            create_model(name, **options)
    with torch.device("meta"):
        create_model(name, backend="auto")  # no request: every model accepts it


def test_reduction_is_applied_to_the_attention_module_it_names():
    with torch.device("meta"):
        se = create_model("se_resnet20", reduction=8)
        dia_se = create_model("dia_se_resnet20", reduction=8)
        dia = create_model("dia_resnet20", reduction=8)
        defaults = [
            create_model(n)
            for n in ("se_resnet20", "dia_se_resnet20", "dia_resnet20", "se_wrn16_4")
        ]
    assert se.stages[0].blocks[0].se.fc[0].out_features == 16 // 8
    assert dia_se.stages[0].unit.reduction == 8 and dia.stages[0].unit.reduction == 8
    # the paper's defaults: per-block SE r=16 (r=4 without biases for WRN), DIA-SE 16, DIA-LSTM 4
    assert defaults[0].stages[0].blocks[0].se.fc[0].out_features == 1
    assert defaults[1].stages[0].unit.reduction == 16 and defaults[2].stages[0].unit.reduction == 4
    assert defaults[3].stages[0].blocks[0].se.fc[0].out_features == 64 // 4
    with pytest.raises(ValueError, match=r"reduction: expected a ratio <= channels \(16\)"):
        create_model("se_resnet20", reduction=32)


def test_wrn_and_resnext_arguments_are_checked():
    from dia_fused.models import cifar_resnext, cifar_wrn, imagenet_resnet

    with pytest.raises(ValueError, match=r"dropout: expected a probability in \[0, 1\), got -1"):
        create_model("dia_wrn16_4", dropout=-1)
    with pytest.raises(ValueError, match=r"dropout: expected a probability"):
        create_model("dia_wrn16_4", dropout=1.0)
    with pytest.raises(ValueError, match=r"widen_factor: expected an int >= 1, got 0"):
        cifar_wrn(16, 0)
    with pytest.raises(ValueError, match=r"cardinality: expected an int >= 1, got 0"):
        cifar_resnext(29, 0)
    with pytest.raises(ValueError, match=r"widen_factor: expected an int >= 1, got 0"):
        create_model("dia_resnext29_8x32", widen_factor=0)
    with pytest.raises(ValueError, match=r"ResNeXt needs bottleneck blocks"):
        imagenet_resnet(18, base_width=32)


def test_list_models_names_are_unique_and_grammatical():
    names = list_models()
    assert len(names) == len(set(names)) == 56
    for name in names:
        spec = parse_name(name)
        prefix = "" if spec["attention"] == "none" else spec["attention"] + "_"
        assert name.startswith(prefix + spec["family"])
    paper = {"dia_resnet164", "dia_wrn52_4", "dia_resnext101_8x32", "dia_resnext50_32x4d"}
    assert paper <= set(names)


def test_ean_block_mask_of_the_imagenet_zoo():
    """dia_blocks (EAN): only the masked-in blocks use the stage's unit; the others add and
    activate plainly with the state passing them; a stage without any gets no unit."""
    from dia_fused.models.blocks import DIAStage, MaskedDIAStage, PlainStage

    torch.manual_seed(0)
    model = create_model("dia_resnet18", num_classes=5, dia_blocks=[[1, 0], [1, 1], [0, 0], [0, 1]])
    assert [type(s) for s in model.stages] == [MaskedDIAStage, DIAStage, PlainStage, MaskedDIAStage]
    assert model.attention_options["dia_blocks"] == [
        [True, False],
        [True, True],
        [False] * 2,
        [False, True],
    ]
    model.eval()
    stage, x = model.stages[0], torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        branch, identity = stage.blocks[0](x)
        y, state = stage.unit(branch, None, identity=identity)
        branch, identity = stage.blocks[1](y)
        torch.testing.assert_close(stage(x), torch.relu(branch + identity))
        _, attention = model(torch.randn(2, 3, 32, 32), return_attention=True)
    assert [tuple(a.shape) for a in attention] == [(2, 1, 64), (2, 2, 128), (2, 1, 512)]
    with pytest.raises(ValueError, match=r"dia_blocks: expected one mask per stage"):
        create_model("dia_resnet18", dia_blocks=[[1, 0], [1, 1], [0, 0]])
    with pytest.raises(ValueError, match=r"dia_blocks: used by a shared DIA unit"):
        create_model("resnet18", dia_blocks=[[1, 0], [1, 1], [0, 0], [0, 1]])
