"""CIFAR (ResNet, PreResNet, WRN, ResNeXt) and ImageNet (ResNet, ResNeXt) networks with
attention "none" | "se" | "dia" | "dia_se", following the official DIANet code's architectures."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .._checks import check_choice
from .blocks import (ATTENTIONS, DIANet, Head, basic_block, bottleneck_block, conv, make_stage, norm_layer,
                     preact_bottleneck_block, wide_block)


# Per-block SE of the SE baselines, (reduction, bias): the paper's SE parameter counts (Table 3) match
# r=16 with biases for ResNet/PreResNet and r=4 without biases for WRN and ResNeXt.
SE_RESNET, SE_WIDE = (16, True), (4, False)


def _common(attention, dia_stages, num_stages):
    check_choice("attention", attention, ATTENTIONS)
    stages = tuple(dia_stages) if dia_stages is not None else tuple(range(1, num_stages + 1))
    bad = [s for s in stages if s not in range(1, num_stages + 1)]
    if bad:
        raise ValueError(f"dia_stages: expected stage numbers in 1..{num_stages}, got {stages}")
    return stages


def _build(stem, stage_specs, head, *, attention, dia_stages, relu, unit_options):
    """stage_specs: [(blocks, channels)] in order; the unit options go to make_stage."""
    stages = [make_stage(blocks, channels, attention=attention, with_unit=(i + 1) in dia_stages, relu=relu,
                         **unit_options) for i, (blocks, channels) in enumerate(stage_specs)]
    return DIANet(stem, stages, head)


def cifar_resnet(depth: int, num_classes: int = 10, *, block: str = "auto", attention: str = "dia",
                 reduction: int = 4, num_cells: int = 1, cell_activation: str = "sigmoid", backend: str = "auto",
                 norm: bool = True, skip: bool = True, dia_stages: Sequence[int] = None) -> DIANet:
    """CIFAR ResNet: basic (6n+2) or bottleneck (9n+2) blocks, stages of 16/32/64 planes."""
    if block == "auto":
        block = "bottleneck" if (depth - 2) % 9 == 0 and ((depth - 2) % 6 or depth > 110) else "basic"
    check_choice("block", block, ("basic", "bottleneck"))
    per = 6 if block == "basic" else 9
    if (depth - 2) % per or depth < per + 2:
        raise ValueError(f"depth: expected {per}n+2 for {block} blocks, got {depth}")
    n, expansion = (depth - 2) // per, (1 if block == "basic" else 4)
    stages = _common(attention, dia_stages, 3)
    se = SE_RESNET if attention == "se" else None
    specs, cin = [], 16
    for i, planes in enumerate((16, 32, 64)):
        blocks = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            if block == "basic":
                blocks.append(basic_block(cin, planes, stride, norm=norm, se=se, skip=skip))
            else:
                blocks.append(bottleneck_block(cin, planes, stride, norm=norm, se=se, skip=skip))
            cin = planes * expansion
        specs.append((blocks, cin))
    stem = nn.Sequential(conv(3, 16, 3), norm_layer(16, norm), nn.ReLU(inplace=True))
    return _build(stem, specs, Head(cin, num_classes), attention=attention, dia_stages=stages, relu=True,
                  unit_options=dict(reduction=reduction, num_cells=num_cells, cell_activation=cell_activation,
                                    backend=backend))


def cifar_preresnet(depth: int, num_classes: int = 10, *, attention: str = "dia", reduction: int = 4,
                    num_cells: int = 1, cell_activation: str = "sigmoid", backend: str = "auto", norm: bool = True,
                    skip: bool = True, dia_stages: Sequence[int] = None) -> DIANet:
    """CIFAR PreResNet with bottleneck blocks (9n+2) and BN+ReLU before the global pool; the
    branch ends in the official DIA code's extra BN when the stage has a DIA unit."""
    if (depth - 2) % 9 or depth < 11:
        raise ValueError(f"depth: expected 9n+2 (bottleneck PreResNet), got {depth}")
    n = (depth - 2) // 9
    stages = _common(attention, dia_stages, 3)
    se = SE_RESNET if attention == "se" else None
    specs, cin = [], 16
    for i, planes in enumerate((16, 32, 64)):
        extra = attention in ("dia", "dia_se") and (i + 1) in stages
        blocks = []
        for j in range(n):
            blocks.append(preact_bottleneck_block(cin, planes, 2 if (i > 0 and j == 0) else 1, norm=norm, se=se,
                                                  skip=skip, extra_norm=extra))
            cin = planes * 4
        specs.append((blocks, cin))
    return _build(conv(3, 16, 3), specs, Head(cin, num_classes, preact_norm=True, norm=norm), attention=attention,
                  dia_stages=stages, relu=False,
                  unit_options=dict(reduction=reduction, num_cells=num_cells, cell_activation=cell_activation,
                                    backend=backend))


def cifar_wrn(depth: int, widen_factor: int, num_classes: int = 10, *, dropout: float = 0.0, attention: str = "dia",
              reduction: int = 4, num_cells: int = 1, cell_activation: str = "sigmoid", backend: str = "auto",
              norm: bool = True, skip: bool = True, dia_stages: Sequence[int] = None) -> DIANet:
    """Wide ResNet (6n+4) of width 16k/32k/64k with pre-activation blocks."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"depth: expected 6n+4 (WRN), got {depth}")
    n = (depth - 4) // 6
    stages = _common(attention, dia_stages, 3)
    se = SE_WIDE if attention == "se" else None
    specs, cin = [], 16
    for i, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
        extra = attention in ("dia", "dia_se") and (i + 1) in stages
        blocks = []
        for j in range(n):
            blocks.append(wide_block(cin, width, 2 if (i > 0 and j == 0) else 1, dropout=dropout, norm=norm, se=se,
                                     skip=skip, extra_norm=extra))
            cin = width
        specs.append((blocks, cin))
    return _build(conv(3, 16, 3), specs, Head(cin, num_classes, preact_norm=True, norm=norm), attention=attention,
                  dia_stages=stages, relu=False,
                  unit_options=dict(reduction=reduction, num_cells=num_cells, cell_activation=cell_activation,
                                    backend=backend))


def cifar_resnext(depth: int, cardinality: int, widen_factor: int = 4, num_classes: int = 10, *,
                  attention: str = "dia", reduction: int = 4, num_cells: int = 1, cell_activation: str = "sigmoid",
                  backend: str = "auto", norm: bool = True, skip: bool = True,
                  dia_stages: Sequence[int] = None) -> DIANet:
    """CIFAR ResNeXt (9n+2) of the official code: stages of 128/256/512 output channels (with
    widen factor 4), inner width cardinality * out / widen_factor, grouped 3x3."""
    if (depth - 2) % 9 or depth < 11:
        raise ValueError(f"depth: expected 9n+2 (ResNeXt), got {depth}")
    n = (depth - 2) // 9
    stages = _common(attention, dia_stages, 3)
    se = SE_WIDE if attention == "se" else None
    specs, cin = [], 32
    for i, cout in enumerate((32 * widen_factor, 64 * widen_factor, 128 * widen_factor)):
        width = cardinality * cout // widen_factor
        blocks = []
        for j in range(n):
            blocks.append(bottleneck_block(cin, cout, 2 if (i > 0 and j == 0) else 1, expansion=1, groups=cardinality,
                                           width=width, norm=norm, se=se, skip=skip))
            cin = cout
        specs.append((blocks, cin))
    stem = nn.Sequential(conv(3, 32, 3), norm_layer(32, norm), nn.ReLU(inplace=True))
    return _build(stem, specs, Head(cin, num_classes), attention=attention, dia_stages=stages, relu=True,
                  unit_options=dict(reduction=reduction, num_cells=num_cells, cell_activation=cell_activation,
                                    backend=backend))


IMAGENET_LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                   101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


def imagenet_resnet(depth: int, num_classes: int = 1000, *, cardinality: int = 1, base_width: int = 64,
                    attention: str = "dia", reduction: int = None, num_cells: int = 1,
                    cell_activation: str = "sigmoid", backend: str = "auto", norm: bool = True, skip: bool = True,
                    dia_stages: Sequence[int] = None) -> DIANet:
    """ImageNet ResNet / ResNeXt (torchvision layout, stride on the 3x3). The paper's reduction
    ratios are the defaults: r=20, and r=10 for ResNet-152."""
    if depth not in IMAGENET_LAYERS:
        raise ValueError(f"depth: expected one of {sorted(IMAGENET_LAYERS)} (ImageNet ResNet), got {depth}")
    block, layers = IMAGENET_LAYERS[depth]
    if cardinality > 1 and block != "bottleneck":
        raise ValueError(f"cardinality: ResNeXt needs bottleneck blocks (depth >= 50), got depth {depth}")
    if reduction is None:
        reduction = 10 if depth == 152 else 20
    stages = _common(attention, dia_stages, 4)
    se = SE_RESNET if attention == "se" else None
    specs, cin = [], 64
    for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
        blocks = []
        for j in range(count):
            stride = 2 if (i > 0 and j == 0) else 1
            if block == "basic":
                blocks.append(basic_block(cin, planes, stride, norm=norm, se=se, skip=skip))
                cin = planes
            else:
                width = int(planes * base_width / 64) * cardinality
                blocks.append(bottleneck_block(cin, planes, stride, groups=cardinality, width=width, norm=norm,
                                               se=se, skip=skip))
                cin = planes * 4
        specs.append((blocks, cin))
    stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm_layer(64, norm), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
    return _build(stem, specs, Head(cin, num_classes), attention=attention, dia_stages=stages, relu=True,
                  unit_options=dict(reduction=reduction, num_cells=num_cells, cell_activation=cell_activation,
                                    backend=backend))
