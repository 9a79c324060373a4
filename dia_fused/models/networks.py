"""CIFAR (ResNet, PreResNet, WRN, ResNeXt) and ImageNet (ResNet, ResNeXt) networks with
attention "none" | "se" | "dia" | "dia_se", following the official DIANet code's architectures."""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops import BACKEND_CHOICES
from ..reference import CELL_ACTIVATIONS
from .blocks import (
    ATTENTIONS,
    DIANet,
    Head,
    basic_block,
    bottleneck_block,
    conv,
    make_stage,
    norm_layer,
    preact_block,
    wide_block,
)


# Per-block SE of the SE baselines, (reduction, bias): the paper's SE parameter counts (Table 3)
# match r=16 with biases for ResNet/PreResNet and r=4 without biases for WRN and ResNeXt.
SE_RESNET, SE_WIDE = (16, True), (4, False)


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _attention_options(
    attention,
    num_stages,
    *,
    dia_stages,
    reduction,
    num_cells,
    cell_activation,
    backend,
    dia_reduction,
    se,
):
    """Validated attention options: (stages with a shared unit, make_stage's unit options, the
    per-block SE (reduction, bias) or None). `reduction` is the attention module's (DIA-LSTM,
    DIA-SE or per-block SE; default `dia_reduction`, 16, `se`'s); an option the attention does
    not use is an error, never ignored (backend "auto" is no request)."""
    check_choice("attention", attention, ATTENTIONS)
    check_choice("backend", backend, BACKEND_CHOICES)
    if reduction is not None:
        check_positive_int("reduction", reduction)
    if num_cells is not None:
        check_positive_int("num_cells", num_cells)
    if cell_activation is not None:
        check_choice("cell_activation", cell_activation, CELL_ACTIVATIONS)
    lstm, unit = attention == "dia", attention in ("dia", "dia_se")
    unused = [
        (name, value, needs)
        for name, value, used, needs in (
            ("reduction", reduction, attention != "none", "an attention module"),
            ("num_cells", num_cells, lstm, "a DIA-LSTM unit"),
            ("cell_activation", cell_activation, lstm, "a DIA-LSTM unit"),
            ("backend", None if backend == "auto" else backend, lstm, "a DIA-LSTM unit"),
            ("dia_stages", dia_stages, unit, "a shared DIA unit"),
        )
        if value is not None and not used
    ]
    if unused:
        name, value, needs = unused[0]
        raise ValueError(
            f"{name}: used by {needs}, which the model (attention {attention!r}) "
            f"does not have; got {name}={value!r}"
        )
    stages = _check_stages(dia_stages, num_stages) if unit else ()
    options = dict(
        reduction=reduction or dia_reduction,
        num_cells=num_cells or 1,
        cell_activation=cell_activation or "sigmoid",
        backend=backend,
        se_reduction=reduction or 16,
    )
    block_se = (reduction or se[0], se[1]) if attention == "se" else None
    # what the options left out resolve to, so that a description passing a default explicitly
    # can be told equal to one that leaves it out (train.modelspec.resolved_options)
    resolved = {
        "attention": attention,
        "reduction": {
            "dia": options["reduction"],
            "dia_se": options["se_reduction"],
            "se": block_se and block_se[0],
        }.get(attention),
        "num_cells": options["num_cells"] if lstm else None,
        "cell_activation": options["cell_activation"] if lstm else None,
        "dia_stages": list(stages) if unit else None,
    }
    return stages, options, block_se, resolved


def _check_stages(dia_stages, num_stages: int) -> tuple:
    if dia_stages is None:
        return tuple(range(1, num_stages + 1))
    if isinstance(dia_stages, (str, bytes)) or not isinstance(dia_stages, Iterable):
        raise TypeError(
            f"dia_stages: expected a sequence of stage numbers, got {type(dia_stages).__name__}"
        )
    stages = tuple(dia_stages)
    if any(isinstance(s, bool) or not isinstance(s, int) for s in stages):
        raise TypeError(f"dia_stages: expected int stage numbers, got {stages}")
    in_range = all(1 <= s <= num_stages for s in stages)
    if not stages or len(set(stages)) != len(stages) or not in_range:
        raise ValueError(
            f"dia_stages: expected stage numbers in 1..{num_stages}, each once, at "
            f"least one (attention 'none' for none), got {stages}"
        )
    return stages


def _check_block_masks(dia_blocks, layers, attention):
    """dia_blocks as one tuple of bools per stage, or None; errors name what is wrong."""
    if dia_blocks is None:
        return None
    if attention not in ("dia", "dia_se"):
        raise ValueError(
            f"dia_blocks: used by a shared DIA unit, which the model (attention {attention!r}) "
            f"does not have; got dia_blocks={dia_blocks!r}"
        )
    ok = isinstance(dia_blocks, (list, tuple)) and len(dia_blocks) == len(layers)
    ok = ok and all(
        isinstance(m, (list, tuple))
        and len(m) == n
        and all(isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)) for v in m)
        for m, n in zip(dia_blocks, layers)
    )
    if not ok:
        raise ValueError(
            f"dia_blocks: expected one mask per stage of bools (or 0/1), one per block (blocks per "
            f"stage {list(layers)}), got {dia_blocks!r}"
        )
    return [tuple(bool(v) for v in m) for m in dia_blocks]


def _build(
    stem, stage_specs, head, *, attention, dia_stages, relu, unit_options, resolved, masks=None
):
    """stage_specs: [(blocks, channels)] in order; the unit options go to make_stage; `resolved`
    (the attention options as built) is kept as the model's `attention_options`; `masks` the
    per-stage block masks (dia_blocks) or None."""
    stages = [
        make_stage(
            blocks,
            channels,
            attention=attention,
            with_unit=(i + 1) in dia_stages,
            relu=relu,
            mask=None if masks is None else masks[i],
            **unit_options,
        )
        for i, (blocks, channels) in enumerate(stage_specs)
    ]
    net = DIANet(stem, stages, head)
    net.attention_options = resolved
    return net


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    *,
    block: str = "auto",
    attention: str = "dia",
    reduction: int = None,
    num_cells: int = None,
    cell_activation: str = None,
    backend: str = "auto",
    norm: bool = True,
    skip: bool = True,
    dia_stages: Sequence[int] = None,
    stride_in_1x1: bool = False,
) -> DIANet:
    """CIFAR ResNet: basic (6n+2) or bottleneck (9n+2) blocks, stages of 16/32/64 planes."""
    check_positive_int("depth", depth)
    _check_flags(norm=norm, skip=skip, stride_in_1x1=stride_in_1x1)
    if block == "auto":
        block = (
            "bottleneck" if (depth - 2) % 9 == 0 and ((depth - 2) % 6 or depth > 110) else "basic"
        )
    check_choice("block", block, ("basic", "bottleneck"))
    per = 6 if block == "basic" else 9
    if (depth - 2) % per or depth < per + 2:
        raise ValueError(f"depth: expected {per}n+2 for {block} blocks, got {depth}")
    n, expansion = (depth - 2) // per, (1 if block == "basic" else 4)
    stages, unit_options, se, resolved = _attention_options(
        attention,
        3,
        dia_stages=dia_stages,
        reduction=reduction,
        num_cells=num_cells,
        cell_activation=cell_activation,
        backend=backend,
        dia_reduction=4,
        se=SE_RESNET,
    )
    specs, cin = [], 16
    for i, planes in enumerate((16, 32, 64)):
        blocks = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            if block == "basic":
                blocks.append(basic_block(cin, planes, stride, norm=norm, se=se, skip=skip))
            else:
                blocks.append(
                    bottleneck_block(
                        cin,
                        planes,
                        stride,
                        norm=norm,
                        se=se,
                        skip=skip,
                        stride_in_1x1=stride_in_1x1,
                    )
                )
            cin = planes * expansion
        specs.append((blocks, cin))
    stem = nn.Sequential(conv(3, 16, 3), norm_layer(16, norm), nn.ReLU(inplace=True))
    return _build(
        stem,
        specs,
        Head(cin, num_classes),
        attention=attention,
        dia_stages=stages,
        relu=True,
        unit_options=unit_options,
        resolved=resolved,
    )


def cifar_preresnet(
    depth: int,
    num_classes: int = 10,
    *,
    block: str = "bottleneck",
    attention: str = "dia",
    reduction: int = None,
    num_cells: int = None,
    cell_activation: str = None,
    backend: str = "auto",
    norm: bool = True,
    skip: bool = True,
    dia_stages: Sequence[int] = None,
    extra_norm: bool = None,
    shortcut_from_preact: bool = False,
) -> DIANet:
    """CIFAR PreResNet (bottleneck 9n+2 as in the official DIA code, or basic 6n+2) with BN+ReLU
    before the global pool. `extra_norm` (default: in stages with a shared unit, as in the official
    code) ends each branch with a BN; `shortcut_from_preact` takes the projection from the
    pre-activated input (pytorchcv)."""
    check_positive_int("depth", depth)
    _check_flags(norm=norm, skip=skip, shortcut_from_preact=shortcut_from_preact)
    if extra_norm is not None:
        _check_flags(extra_norm=extra_norm)
    check_choice("block", block, ("basic", "bottleneck"))
    per = 9 if block == "bottleneck" else 6
    if (depth - 2) % per or depth < per + 2:
        raise ValueError(f"depth: expected {per}n+2 ({block} PreResNet), got {depth}")
    n = (depth - 2) // per
    stages, unit_options, se, resolved = _attention_options(
        attention,
        3,
        dia_stages=dia_stages,
        reduction=reduction,
        num_cells=num_cells,
        cell_activation=cell_activation,
        backend=backend,
        dia_reduction=4,
        se=SE_RESNET,
    )
    specs, cin = [], 16
    for i, planes in enumerate((16, 32, 64)):
        extra = (i + 1) in stages if extra_norm is None else extra_norm
        blocks = []
        for j in range(n):
            blocks.append(
                preact_block(
                    cin,
                    planes,
                    2 if (i > 0 and j == 0) else 1,
                    bottleneck=block == "bottleneck",
                    norm=norm,
                    se=se,
                    skip=skip,
                    extra_norm=extra,
                    shortcut_from_preact=shortcut_from_preact,
                )
            )
            cin = planes * (4 if block == "bottleneck" else 1)
        specs.append((blocks, cin))
    return _build(
        conv(3, 16, 3),
        specs,
        Head(cin, num_classes, preact_norm=True, norm=norm),
        attention=attention,
        dia_stages=stages,
        relu=False,
        unit_options=unit_options,
        resolved=resolved,
    )


def cifar_wrn(
    depth: int,
    widen_factor: int,
    num_classes: int = 10,
    *,
    dropout: float = 0.0,
    attention: str = "dia",
    reduction: int = None,
    num_cells: int = None,
    cell_activation: str = None,
    backend: str = "auto",
    norm: bool = True,
    skip: bool = True,
    dia_stages: Sequence[int] = None,
) -> DIANet:
    """Wide ResNet (6n+4) of width 16k/32k/64k with pre-activation blocks; `dropout` between the
    convolutions of each block."""
    check_positive_int("depth", depth)
    check_positive_int("widen_factor", widen_factor)
    _check_flags(norm=norm, skip=skip)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"depth: expected 6n+4 (WRN), got {depth}")
    n = (depth - 4) // 6
    stages, unit_options, se, resolved = _attention_options(
        attention,
        3,
        dia_stages=dia_stages,
        reduction=reduction,
        num_cells=num_cells,
        cell_activation=cell_activation,
        backend=backend,
        dia_reduction=4,
        se=SE_WIDE,
    )
    specs, cin = [], 16
    for i, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
        extra = (i + 1) in stages
        blocks = []
        for j in range(n):
            blocks.append(
                wide_block(
                    cin,
                    width,
                    2 if (i > 0 and j == 0) else 1,
                    dropout=dropout,
                    norm=norm,
                    se=se,
                    skip=skip,
                    extra_norm=extra,
                )
            )
            cin = width
        specs.append((blocks, cin))
    return _build(
        conv(3, 16, 3),
        specs,
        Head(cin, num_classes, preact_norm=True, norm=norm),
        attention=attention,
        dia_stages=stages,
        relu=False,
        unit_options=unit_options,
        resolved=resolved,
    )


def cifar_resnext(
    depth: int,
    cardinality: int,
    widen_factor: int = 4,
    num_classes: int = 10,
    *,
    base_width: int = 32,
    attention: str = "dia",
    reduction: int = None,
    num_cells: int = None,
    cell_activation: str = None,
    backend: str = "auto",
    norm: bool = True,
    skip: bool = True,
    dia_stages: Sequence[int] = None,
) -> DIANet:
    """CIFAR ResNeXt (9n+2) of the official code: stages of 32/64/128 * widen_factor output
    channels (128/256/512 with 4) and `cardinality` groups of base_width * 2**stage channels in
    the grouped 3x3 (the official code's: 32, whatever the widen factor)."""
    for name, value in (
        ("depth", depth),
        ("cardinality", cardinality),
        ("widen_factor", widen_factor),
        ("base_width", base_width),
    ):
        check_positive_int(name, value)
    _check_flags(norm=norm, skip=skip)
    if (depth - 2) % 9 or depth < 11:
        raise ValueError(f"depth: expected 9n+2 (ResNeXt), got {depth}")
    n = (depth - 2) // 9
    stages, unit_options, se, resolved = _attention_options(
        attention,
        3,
        dia_stages=dia_stages,
        reduction=reduction,
        num_cells=num_cells,
        cell_activation=cell_activation,
        backend=backend,
        dia_reduction=4,
        se=SE_WIDE,
    )
    specs, cin = [], 32
    for i, cout in enumerate((32 * widen_factor, 64 * widen_factor, 128 * widen_factor)):
        width = cardinality * base_width * 2**i
        blocks = []
        for j in range(n):
            blocks.append(
                bottleneck_block(
                    cin,
                    cout,
                    2 if (i > 0 and j == 0) else 1,
                    expansion=1,
                    groups=cardinality,
                    width=width,
                    norm=norm,
                    se=se,
                    skip=skip,
                )
            )
            cin = cout
        specs.append((blocks, cin))
    stem = nn.Sequential(conv(3, 32, 3), norm_layer(32, norm), nn.ReLU(inplace=True))
    return _build(
        stem,
        specs,
        Head(cin, num_classes),
        attention=attention,
        dia_stages=stages,
        relu=True,
        unit_options=unit_options,
        resolved=resolved,
    )


IMAGENET_LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def imagenet_resnet(
    depth: int,
    num_classes: int = 1000,
    *,
    cardinality: int = 1,
    base_width: int = 64,
    attention: str = "dia",
    reduction: int = None,
    num_cells: int = None,
    cell_activation: str = None,
    backend: str = "auto",
    norm: bool = True,
    skip: bool = True,
    dia_stages: Sequence[int] = None,
    stride_in_1x1: bool = False,
    dia_blocks: Sequence[Sequence[bool]] = None,
) -> DIANet:
    """ImageNet ResNet / ResNeXt (torchvision layout: stride on the 3x3 unless `stride_in_1x1`;
    `cardinality` groups of base_width * 2**stage channels). The paper's reduction ratios are
    the DIA defaults: r=20, and r=10 for ResNet-152. `dia_blocks`: EAN's per-block option, one
    mask per stage of the blocks that use the stage's unit (default: all)."""
    for name, value in (("depth", depth), ("cardinality", cardinality), ("base_width", base_width)):
        check_positive_int(name, value)
    _check_flags(norm=norm, skip=skip, stride_in_1x1=stride_in_1x1)
    if depth not in IMAGENET_LAYERS:
        raise ValueError(
            f"depth: expected one of {sorted(IMAGENET_LAYERS)} (ImageNet ResNet), got {depth}"
        )
    block, layers = IMAGENET_LAYERS[depth]
    masks = _check_block_masks(dia_blocks, layers, attention)
    if (cardinality > 1 or base_width != 64) and block != "bottleneck":
        raise ValueError(
            f"cardinality, base_width: ResNeXt needs bottleneck blocks (depth >= "
            f"50), got depth {depth}"
        )
    stages, unit_options, se, resolved = _attention_options(
        attention,
        4,
        dia_stages=dia_stages,
        reduction=reduction,
        num_cells=num_cells,
        cell_activation=cell_activation,
        backend=backend,
        dia_reduction=10 if depth == 152 else 20,
        se=SE_RESNET,
    )
    if masks is not None:
        resolved["dia_blocks"] = [list(m) for m in masks]
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
                blocks.append(
                    bottleneck_block(
                        cin,
                        planes,
                        stride,
                        groups=cardinality,
                        width=width,
                        norm=norm,
                        se=se,
                        skip=skip,
                        stride_in_1x1=stride_in_1x1,
                    )
                )
                cin = planes * 4
        specs.append((blocks, cin))
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        norm_layer(64, norm),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    return _build(
        stem,
        specs,
        Head(cin, num_classes),
        attention=attention,
        dia_stages=stages,
        relu=True,
        unit_options=unit_options,
        resolved=resolved,
        masks=masks,
    )
