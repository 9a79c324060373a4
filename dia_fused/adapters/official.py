"""Adapter for the official DIANet CIFAR code (gbup-group/DIANet models/cifar): ResNet and
PreResNet with Bottleneck blocks, WideResNet, CifarResNeXt.

A stage is an `Attention` module: `ModuleList` of residual blocks returning (branch, residual),
`lstm` (the official `LSTMCell`: w_ih.0.seq.0 ... for cell 0, w_ih.1 ... for stacked cells,
dropout), `GlobalAvg` (the pooling) and `relu` (after the residual add, where the file uses it).

A checkpoint (the official cifar.py's {'state_dict': ...}) is read by its key names: `LAYER_NAMES`
maps each family's module names onto a dia_fused model's layers, and a checkpoint that does not fit
the name asked for is told what it looks like (`load_official_state_dict('dia_wrn16_8', ...)`).
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..modules import DIALSTM
from ..reference import weight_names
from .base import (
    MAPPED_TYPES,
    LSTMLayout,
    StepPlan,
    check_global_pool,
    check_relu,
    current_plan,
    fused_mixin,
    hooks_on_bypassed,
    lstm_layout,
    lstm_weights,
    original_class,
    source_step,
)

NAME = "official DIANet"
# top-level class -> (stage attributes, residual block class, ReLU after the residual add)
MODELS = {
    "ResNet": (("layer1", "layer2", "layer3"), "Bottleneck", True),
    "PreResNet": (("layer1", "layer2", "layer3"), "Bottleneck", False),
    "WideResNet": (("block1", "block2", "block3"), "BasicBlock", False),
    "CifarResNeXt": (("stage_1", "stage_2", "stage_3"), "ResNeXtBottleneck", True),
}
SUPPORTED = (
    "official DIANet CIFAR models (gbup-group/DIANet models/cifar: ResNet and PreResNet with "
    "Bottleneck blocks, WideResNet, CifarResNeXt)"
)
ATTENTION_TYPES = ("Attention",)  # modules whose `lstm` is a stage's LSTM
LSTM_TYPES = ("LSTMCell",)


def is_stage(module) -> bool:
    return (
        isinstance(module, nn.Module)
        and type(module).__name__ == "Attention"
        and hasattr(module, "lstm")
    )


def recognises(model: nn.Module) -> bool:
    kind = type(model).__name__
    return kind in MODELS and any(is_stage(getattr(model, a, None)) for a in MODELS[kind][0])


def name_only_match(model: nn.Module) -> bool:
    """A model with an official class name but no DIA stages (for the error message)."""
    return type(model).__name__ in MODELS


def plan(model: nn.Module, backend: str, keep_rng_stream: bool):
    """[(stage module, mixin, StepPlan)] for every stage, or raises naming the module."""
    kind = type(model).__name__
    attrs = MODELS[kind][0]
    result = []
    for attr in attrs:
        stage = getattr(model, attr, None)
        if not is_stage(stage):
            raise ValueError(
                f"model.{attr}: expected the official DIA `Attention` stage of {kind}, "
                f"got {type(stage).__name__}"
            )
        plan_ = plan_stage(stage, attr, kind, backend, keep_rng_stream)
        result.append((stage, FusedAttention, plan_))
    return result


def plan_stage(stage, attr: str, kind: str, backend: str, keep_rng_stream: bool) -> StepPlan:
    _, block_class, relu = MODELS[kind]
    blocks = getattr(stage, "ModuleList", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(
            f"model.{attr}.ModuleList: expected a non-empty ModuleList or Sequential "
            f"of residual blocks, got {type(blocks).__name__}"
        )
    for index, block in enumerate(blocks):
        if type(block).__name__ != block_class:
            extra = (
                " (the official ResNet with BasicBlock returns (out, pooled) instead of "
                "(branch, residual) and is no DIANet)"
                if kind == "ResNet"
                else ""
            )
            raise ValueError(
                f"model.{attr}.ModuleList.{index}: expected a {block_class} block in "
                f"an official {kind}, got {type(block).__name__}{extra}"
            )
    check_global_pool(getattr(stage, "GlobalAvg", None), f"model.{attr}.GlobalAvg")
    if relu:
        check_relu(getattr(stage, "relu", None), f"model.{attr}.relu")
    paths, num_cells, channels = lstm_layout(
        stage.lstm, f"model.{attr}.lstm", LSTM_LAYOUT, _check_small_cells
    )
    parts = [(("lstm",), stage.lstm), (("GlobalAvg",), stage.GlobalAvg)]
    if relu:
        parts.append((("relu",), stage.relu))
    return StepPlan(
        attr,
        paths,
        num_cells,
        channels,
        relu,
        backend,
        keep_rng_stream,
        parts=tuple(parts),
        bypassed=tuple(path for path, _ in parts),
        source=kind,
    )


LSTM_LAYOUT = LSTMLayout(
    description="the official LSTMCell (w_ih, w_hh: ModuleLists of nlayers cells, "
    "dropout: nn.Dropout)",
    sides=("w_ih", "w_hh"),
    container=nn.ModuleList,
    count="nlayers",
    first_cell=(("0", "seq", "0"), ("0", "seq", "2")),  # small_cell
    stacked_cell=str,
)


def _check_small_cells(lstm, name: str) -> None:
    for path in LSTM_LAYOUT.sides:
        seq = getattr(getattr(lstm, path)[0], "seq", None)
        if not isinstance(seq, nn.Sequential) or len(seq) != 3 or not isinstance(seq[1], nn.ReLU):
            raise ValueError(f"{name}.{path}.0: expected small_cell (seq: Linear, ReLU, Linear)")


def lstm_state(lstm):
    """The LSTM's state dict under the official keys (dia_fused's DIALSTM uses them too)."""
    return lstm.state_dict()


def _replan(stage, plan_: StepPlan) -> StepPlan:
    return plan_stage(stage, plan_.stage, plan_.source, plan_.backend, plan_.keep_rng_stream)


@fused_mixin
class FusedAttention:
    """Official `Attention`: for each block, (branch, residual) = block(x), then the fused step.
    A hook on the LSTM, the pooling or the ReLU runs the source forward (so the hook fires)."""

    def forward(self, x):
        plan_ = current_plan(self, _replan)
        if hooks_on_bypassed(self, plan_):
            return original_class(self).forward(self, x)
        lstm = self._modules["lstm"]
        weights = lstm_weights(lstm, plan_)
        state = None
        for layer in self.ModuleList:
            out = layer(x)
            if not isinstance(out, tuple) or len(out) != 2:
                raise TypeError(
                    f"{plan_.stage}: expected each block to return (branch, residual), got "
                    f"{type(out).__name__}"
                )
            x, state = source_step(lstm, plan_, weights, out[0], out[1], state)
        return x


def convert_target(model: nn.Module, common: dict):
    """(the dia_fused model with `model`'s architecture and `common` options, input size)."""
    from ..models.networks import cifar_preresnet, cifar_resnet, cifar_resnext, cifar_wrn

    kind = type(model).__name__
    if kind == "ResNet":
        blocks = model.layer1.ModuleList
        if not hasattr(blocks[0], "conv3"):
            raise ValueError(
                "model: the official DIA ResNet with BasicBlock returns (out, GAP) instead of "
                "(branch, residual) and is not a DIANet; only Bottleneck is supported"
            )
        target = cifar_resnet(
            9 * len(blocks) + 2, model.fc.out_features, block="bottleneck", **common
        )
    elif kind == "PreResNet":
        n = len(model.layer1.ModuleList)
        target = cifar_preresnet(9 * n + 2, model.fc.out_features, extra_norm=True, **common)
    elif kind == "WideResNet":
        blocks = model.block1.ModuleList
        widen = blocks[0].conv1.out_channels // 16
        target = cifar_wrn(
            6 * len(blocks) + 4, widen, model.fc.out_features, dropout=blocks[0].droprate, **common
        )
    else:  # CifarResNeXt
        target = cifar_resnext(
            model.depth, model.cardinality, model.widen_factor, model.num_classes, **common
        )
    return target, (1, 3, 32, 32)


def layer_order(layers):
    """The conv/norm/linear layers [(name, module)] in the order a forward ran them, in dia_fused's
    order: the official blocks run their layers in that order already (shortcut after branch)."""
    return layers


# --- official checkpoints (load_official_state_dict) ----------------------------------------------


def load_checkpoint(name: str, state_dict, num_classes: Optional[int], options: dict):
    """load_official_state_dict once a file is read: builds `name` and loads the official
    checkpoint `state_dict` (a state dict or {'state_dict': ...}) into it, key by key."""
    from ..models import create_model

    state_dict = _flat_state(state_dict)
    if re.search(r"wrn", name) and "dropout" not in options:
        raise ValueError(
            f"dropout: {name} is a WRN and a checkpoint does not record its "
            f"blocks' dropout rate (the official dia_wrn's dropRate, 0.0 by "
            f"default): pass dropout= the source's rate; training outputs differ "
            f"from the source's under another rate"
        )
    units: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if ".lstm." in key:
            stage, rest = key.split(".lstm.", 1)
            units.setdefault(stage, {})[rest] = value
    if not units:
        raise ValueError(
            "state_dict: expected an official DIANet checkpoint (keys with '.lstm.'), found none"
        )
    for stage, state in sorted(units.items()):
        _check_lstm_keys(stage, state)
    first = units[min(units, key=_natural_key)]
    cell0 = first["w_ih.0.seq.0.weight"]
    options.setdefault("reduction", cell0.shape[1] // cell0.shape[0])
    options.setdefault("num_cells", _num_cells(first))
    if num_classes is None:
        num_classes = _classifier_width(state_dict)
    guess = _guess(state_dict)
    family = _family(name, guess)
    target = create_model(name, num_classes=num_classes, **options)
    names = _key_names(target, family, name, guess)
    expected = {key for key in names if not key.endswith("num_batches_tracked")}
    missing = sorted(expected - set(state_dict), key=_natural_key)
    unexpected = sorted(set(state_dict) - set(names), key=_natural_key)
    target_state = target.state_dict()
    if missing or unexpected:
        layers = {k.rsplit(".", 1)[0] for k in state_dict if ".lstm." not in k}
        ours = {k.rsplit(".", 1)[0] for k in names if ".lstm." not in k}
        raise ValueError(
            f"state_dict: {len(layers)} layers in the checkpoint, {len(ours)} in {name}, by name: "
            f"missing keys {_first(missing)}, unexpected keys {_first(unexpected)}"
            f"{_hint(name, options, guess)}"
        )
    shapes = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(target_state[names[key]].shape)}"
        for key in sorted(state_dict, key=_natural_key)
        if state_dict[key].shape != target_state[names[key]].shape
    ]
    if shapes:
        raise ValueError(
            f"state_dict: shapes differ from {name}'s (checkpoint vs {name}): "
            f"{'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}"
            f"{_hint(name, options, guess)}"
        )
    if family == "resnet" and not any(k.endswith(".conv3.weight") for k in state_dict):
        raise ValueError(
            f"state_dict: the checkpoint is the official DIA ResNet with BasicBlock, which "
            f"applies the attention after the residual add (its blocks return (out, pooled)): "
            f"not the DIANet {name} computes; only the Bottleneck DIA ResNet loads"
        )
    # keys checked: only num_batches_tracked may be absent
    target.load_state_dict({names[k]: v for k, v in state_dict.items()}, strict=False)
    return target


def _flat_state(state_dict) -> Dict[str, torch.Tensor]:
    """The flat state dict of a state dict or a {'state_dict': ...} checkpoint (as the official
    cifar.py saves), without the `module.` prefix of DataParallel."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a state dict, a checkpoint dict with 'state_dict' or a file "
            f"path, got {type(state_dict).__name__}"
        )
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(
            f"state_dict: expected tensors, got {type(state_dict[bad[0]]).__name__} at {bad[0]!r}"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _natural_key(key: str):
    """'layer1.ModuleList.10.bn1' after 'layer1.ModuleList.2.bn1' (numbers compared as numbers)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key)]


def _first(keys: List[str], count: int = 5) -> str:
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return f"{keys[:count]}{more}"


def _classifier_width(state: Mapping[str, torch.Tensor]) -> int:
    """The classes of an official checkpoint: rows of its one 2-D weight outside the LSTMs."""
    linear = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    linear = [k for k in linear if ".lstm." not in k]
    if len(linear) != 1:
        raise ValueError(
            f"state_dict: expected one classifier weight (2-D, outside the LSTMs), got "
            f"{sorted(linear, key=_natural_key)}; pass num_classes="
        )
    return state[linear[0]].shape[0]


# The official DIANet CIFAR code's module names (gbup-group/DIANet models/cifar), per family: the
# stage attribute, the stem's layers, each block's layers in execution order (one tuple per block
# type the official family has), its projection shortcut's layers, and the head's layers. A
# dia_fused block registers its layers in execution order too (preact, branch, shortcut): the
# n-th conv/norm/linear of a block is the block type's n-th official name.
LAYER_NAMES = {
    "resnet": (
        "layer{}",
        ("conv1", "bn1"),
        # Bottleneck, and the BasicBlock (named, to tell it apart; refused when loaded)
        (("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"), ("conv1", "bn1", "conv2", "bn2")),
        ("downsample.0", "downsample.1"),
        ("fc",),
    ),
    "preresnet": (
        "layer{}",
        ("conv1",),
        (("bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "bn_additional"),),
        ("downsample.0",),
        ("bn", "fc"),
    ),
    "wrn": (
        "block{}",
        ("conv1",),
        (("bn1", "conv1", "bn2", "conv2", "bn_additional"),),
        ("convShortcut",),
        ("bn1", "fc"),
    ),
    "resnext": (
        "stage_{}",
        ("conv_1_3x3", "bn_1"),
        (("conv_reduce", "bn_reduce", "conv_conv", "bn", "conv_expand", "bn_expand"),),
        ("shortcut.shortcut_conv", "shortcut.shortcut_bn"),
        ("classifier",),
    ),
}


def _layers(module: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    return [
        (f"{prefix}.{n}" if n else prefix, m)
        for n, m in module.named_modules()
        if isinstance(m, MAPPED_TYPES)
    ]


def _key_names(target, family: str, name: str, guess) -> Dict[str, str]:
    """Official key -> `target`'s state-dict key, for every tensor of `target` (a DIANet)."""
    stage_name, stem, block_types, shortcut_names, head = LAYER_NAMES[family]
    names: Dict[str, str] = {}

    def add(prefix: str, layers, official: Tuple[str, ...], part: str) -> None:
        if len(layers) != len(official):
            raise ValueError(
                f"state_dict: {name}'s {part} has {len(layers)} conv/norm/linear layers, the "
                f"official {family}'s {len(official)} ({', '.join(official)})"
                f"{_hint(name, {}, guess)}"
            )
        for (module_name, module), layer in zip(layers, official):
            for key in module.state_dict():
                names[f"{prefix}{layer}.{key}"] = f"{module_name}.{key}"

    add("", _layers(target.stem, "stem"), stem, "stem")
    for s, stage in enumerate(target.stages):
        official_stage = stage_name.format(s + 1)
        for b, block in enumerate(stage.blocks):
            ours = f"stages.{s}.blocks.{b}"
            layers = _layers(block, ours)
            shortcut = [(n, m) for n, m in layers if n.startswith(f"{ours}.shortcut")]
            core = [(n, m) for n, m in layers if not n.startswith(f"{ours}.shortcut")]
            block_type = next((t for t in block_types if len(t) == len(core)), block_types[0])
            add(
                f"{official_stage}.ModuleList.{b}.",
                core + shortcut,
                block_type + shortcut_names[: len(shortcut)],
                f"block {ours}",
            )
        unit = getattr(stage, "unit", None)
        if isinstance(unit, DIALSTM):
            for key in unit.state_dict():
                names[f"{official_stage}.lstm.{key}"] = f"stages.{s}.unit.{key}"
    add("", _layers(target.head, "head"), head, "head")
    return names


def _family(name: str, guess) -> str:
    """The official family whose names `name`'s checkpoint has; refuses the ImageNet networks."""
    from ..models import parse_name
    from ..models.networks import IMAGENET_LAYERS

    parsed = parse_name(name)
    family, depth = parsed["family"], parsed["depth"]
    imagenet = not parsed["cifar"] and (
        (family == "resnet" and depth in IMAGENET_LAYERS) or (family == "resnext" and depth == 50)
    )
    if imagenet or family not in LAYER_NAMES:
        what = "an ImageNet network" if imagenet else f"a {family}"
        raise ValueError(
            f"name: {name!r} is {what}; the official DIANet checkpoints are CIFAR ResNet, "
            f"PreResNet, WRN and ResNeXt networks"
            + (f" (the CIFAR network of this depth: {name}_cifar)" if imagenet else "")
            + _hint(name, {}, guess)
        )
    return family


def _guess(state: Mapping[str, torch.Tensor]):
    """(name, options, description) of the dia_fused model an official checkpoint looks like,
    or None, read from its key names and shapes."""
    from ..models.networks import IMAGENET_LAYERS

    blocks: Dict[Tuple[str, int], set] = {}
    for key in state:
        match = re.match(r"^(layer|block|stage_)1\.ModuleList\.(\d+)\.(.+)\.[^.]+$", key)
        if match:
            blocks.setdefault((match.group(1), int(match.group(2))), set()).add(match.group(3))
    if not blocks:
        return None
    kind = next(iter(blocks))[0]
    n = 1 + max(b for _, b in blocks)
    first = blocks.get((kind, 0), set())
    if kind == "stage_" and "conv_conv" in first:
        conv = state["stage_1.ModuleList.0.conv_conv.weight"]
        cardinality = conv.shape[0] // conv.shape[1]
        widen = state["stage_1.ModuleList.0.conv_expand.weight"].shape[0] // 32
        depth = 9 * n + 2
        name = f"dia_resnext{depth}_{cardinality}x{conv.shape[1]}" + ("_cifar" * (depth == 50))
        options = {"widen_factor": widen} if widen != 4 else {}
        return name, options, f"ResNeXt with {n} blocks per stage"
    if kind == "block" and "conv1" in first:
        widen = state["block1.ModuleList.0.conv1.weight"].shape[0] // 16
        return (
            f"dia_wrn{6 * n + 4}_{widen}",
            {"dropout": "<its rate>"},
            f"WRN with {n} blocks per stage",
        )
    if kind == "layer" and "bn_additional" in first:
        return f"dia_preresnet{9 * n + 2}", {}, f"PreResNet with {n} bottleneck blocks per stage"
    if kind == "layer" and "conv3" in first:
        depth = 9 * n + 2
        name = f"dia_resnet{depth}" + ("_cifar" if depth in IMAGENET_LAYERS else "")
        # depths that are also 6n+2 name the basic-block network by default
        options = {"block": "bottleneck"} if (depth - 2) % 6 == 0 else {}
        return name, options, f"ResNet with {n} bottleneck blocks per stage"
    if kind == "layer":
        return (
            None,
            {},
            f"ResNet with {n} basic blocks per stage, which the official code does not build as "
            f"a DIANet (its BasicBlock returns (out, pooled)): no dia_fused equivalent",
        )
    return None


def _hint(name: str, options: Mapping, guess) -> str:
    if guess is None:
        return ""
    guess_name, guess_options, description = guess
    if guess_name is None:
        return f"; the checkpoint is an official {description}"
    if guess_name == name and all(options.get(k) == v for k, v in guess_options.items()):
        return ""
    extra = "".join(f", {k}={v!r}" for k, v in guess_options.items())
    return (
        f"; the checkpoint looks like an official {description}: "
        f"load_official_state_dict({guess_name!r}, ...{extra})"
    )


def _num_cells(state: Mapping[str, torch.Tensor]) -> int:
    """Cells of an official LSTMCell state: cell 0 (small_cell) and every stacked cell."""
    matches = (re.fullmatch(r"w_[ih]h\.(\d+)\.(?:weight|bias)", k) for k in state)
    stacked = {int(m.group(1)) for m in matches if m}
    return 1 + len(stacked)


def _check_lstm_keys(stage: str, state: Mapping[str, torch.Tensor]) -> None:
    """Raises naming the missing and unexpected keys of one stage's official LSTMCell."""
    expected = set(weight_names(_num_cells(state)))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"state_dict: the DIA LSTM {stage}.lstm is not an official LSTMCell's: "
            f"missing keys {[f'{stage}.lstm.{k}' for k in missing]}, unexpected keys "
            f"{[f'{stage}.lstm.{k}' for k in unexpected]}"
        )
