"""Convert DIA models of other codebases to dia_fused models with the same weights.

    convert(model)                          official DIANet CIFAR models (dia_resnet bottleneck,
                                            dia_preresnet, dia_wrn, dia_resnext) and pytorchcv DIA
                                            models (diaresnet*_cifar*, diapreresnet*_cifar*,
                                            ImageNet diaresnet*)
    load_official_state_dict(name, sd)      an official checkpoint (state dict, checkpoint dict or
                                            file path) into the dia_fused model `name`, key by key

The residual branches are matched module by module in execution order, so differences in module
names and nesting do not matter: on a small input, a TorchFunctionMode records which module's
weight (or BN running mean) each torch function receives, mapped back by identity, so modules
called through `.forward(x)` (the official ResNeXt), which bypasses hooks, are seen too. Every pair
is checked for type and shape, and a mismatch raises naming both modules. Models inside
nn.DataParallel / DistributedDataParallel are unwrapped. The shared LSTM of each
stage maps onto the stage's DIALSTM (official keys are DIALSTM's keys). The converted model keeps
the source's reduction ratio and is returned in the source's train/eval mode.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .models import create_model, parse_name
from .models.blocks import DIANet
from .models.networks import IMAGENET_LAYERS
from .adapters import source_with_dia, unwrap
from .modules import DIALSTM
from .reference import weight_names

MAPPED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
SHORTCUT_NAMES = ("identity_conv",)  # pytorchcv runs the shortcut before the branch; ours after


def convert(model: nn.Module, *, backend: str = "auto") -> DIANet:
    """The dia_fused equivalent of `model` (official DIANet or pytorchcv DIA, also inside
    DataParallel / DistributedDataParallel, also accelerated), same weights."""
    model = unwrap(model)
    target, source, units, input_size = _target_for(model, backend)
    _copy_layers(model, target, input_size, source)
    _copy_units(units, target, source)
    return target.train(model.training)


def load_official_state_dict(name: str, state_dict, num_classes: int = None, **options) -> DIANet:
    """Builds `name` (e.g. 'dia_resnet164') and loads an official DIANet CIFAR checkpoint into it.

    `state_dict`: the model's state dict, a checkpoint {'state_dict': ...} (as the official
    cifar.py saves), or the path of such a file (loaded with `torch.load(weights_only=True)`; a
    file that needs more is refused, saying how to load it yourself). A `module.` prefix from
    DataParallel is removed. Every key is matched by its name (stage, block index, layer:
    `layer2.ModuleList.10.bn3.weight`), whatever the order of the keys; a missing, unexpected or
    differently shaped key raises naming the first ones, with the dia_fused name the checkpoint
    looks like when it is not `name`. BN layers without `num_batches_tracked` (checkpoints of
    PyTorch < 0.4.1) load, with the count at 0: it only matters for BN with momentum=None.

    A WRN checkpoint does not record the dropout rate of its blocks (the official dia_wrn's
    `dropRate`): pass `dropout=` (0.0 is the official default); training outputs differ from the
    source's under any other rate, eval outputs do not depend on it."""
    state_dict = _official_state(state_dict)
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
    guess = _official_guess(state_dict)
    family = _official_family(name, guess)
    target = create_model(name, num_classes=num_classes, **options)
    names = _official_names(target, family, name, guess)
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


def _official_state(state_dict) -> Dict[str, torch.Tensor]:
    """The flat state dict of a state dict, a {'state_dict': ...} checkpoint or a file's path,
    without the `module.` prefix of DataParallel."""
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = _load_file(os.fspath(state_dict))
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


def _load_file(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state_dict: no file at {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"state_dict: {path!r} holds objects other than tensors and plain values, which "
            f"torch.load(weights_only=True) refuses to run ({str(err).splitlines()[0]}); if "
            f"you trust the file, pass torch.load({path!r}, weights_only=False) instead"
        ) from err
    except Exception as err:
        raise ValueError(
            f"state_dict: could not load {path!r} ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        ) from err


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
_OFFICIAL_NAMES = {
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


def _official_names(target: DIANet, family: str, name: str, guess) -> Dict[str, str]:
    """Official key -> `target`'s state-dict key, for every tensor of `target`."""
    stage_name, stem, block_types, shortcut_names, head = _OFFICIAL_NAMES[family]
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


def _official_family(name: str, guess) -> str:
    """The official family whose names `name`'s checkpoint has; refuses the ImageNet networks."""
    parsed = parse_name(name)
    family, depth = parsed["family"], parsed["depth"]
    imagenet = not parsed["cifar"] and (
        (family == "resnet" and depth in IMAGENET_LAYERS) or (family == "resnext" and depth == 50)
    )
    if imagenet or family not in _OFFICIAL_NAMES:
        what = "an ImageNet network" if imagenet else f"a {family}"
        raise ValueError(
            f"name: {name!r} is {what}; the official DIANet checkpoints are CIFAR ResNet, "
            f"PreResNet, WRN and ResNeXt networks"
            + (f" (the CIFAR network of this depth: {name}_cifar)" if imagenet else "")
            + _hint(name, {}, guess)
        )
    return family


def _official_guess(state: Mapping[str, torch.Tensor]):
    """(name, options, description) of the dia_fused model an official checkpoint looks like,
    or None, read from its key names and shapes."""
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


def _block_prefix(name: str) -> str:
    """'layer1.ModuleList.3.downsample.0' -> 'layer1.ModuleList.3.' (the residual block's
    prefix)."""
    match = re.match(r"^(.*?(?:ModuleList\.\d+|unit\d+|blocks\.\d+))\.", name)
    return match.group(1) + "." if match else name


def _shortcuts_last(items, is_shortcut):
    """Moves each residual block's shortcut entries after the block's other entries (the official
    WRN registers its shortcut conv before the branch's last BN; pytorchcv runs it first)."""
    result, pending = [], []
    for name, value in items:
        if is_shortcut(name):
            pending.append((name, value))
            continue
        if pending and not name.startswith(_block_prefix(pending[0][0])):
            result += pending
            pending = []
        result.append((name, value))
    return result + pending


# --- the target architecture of a source model ----------------------------------------------------


def _stage_units(model: nn.Module, source) -> List[nn.Module]:
    """The shared LSTM cell of every DIA stage of `model`, in stage order (deduplicated)."""
    seen, units = set(), []
    for _, module in model.named_modules():
        lstm = getattr(module, "lstm", None)
        if (
            isinstance(lstm, nn.Module)
            and id(lstm) not in seen
            and type(module).__name__ in source.ATTENTION_TYPES
        ):
            seen.add(id(lstm))
            units.append(lstm)
    return units


def _target_for(model: nn.Module, backend: str):
    """(dia_fused model, the source's stage LSTMs, input size) for `model`, by its adapter."""
    source = source_with_dia(model)
    units = _stage_units(model, source) if source is not None else []
    if not units:
        raise TypeError(
            f"model: expected an official DIANet or pytorchcv DIA model "
            f"with shared DIA-LSTM units, "
            f"got {type(model).__name__} without any"
        )
    reduction, num_cells = source.lstm_options(units[0])
    common = dict(attention="dia", reduction=reduction, num_cells=num_cells, backend=backend)
    target, input_size = source.convert_target(model, common)
    return target, source, units, input_size


# --- weights --------------------------------------------------------------------------------------


class _CallRecorder(TorchFunctionMode):
    """Records, in order of first use, the modules whose key tensor (a conv/linear weight, a BN
    running mean) a torch function receives: `F.conv2d(x, self.weight, ...)` and the like."""

    def __init__(self, owners: Dict[int, Tuple[str, nn.Module]]):
        super().__init__()
        self.owners, self.order, self.seen = owners, [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            owner = self.owners.get(id(value)) if isinstance(value, torch.Tensor) else None
            if owner is not None and id(owner[1]) not in self.seen:
                self.seen.add(id(owner[1]))
                self.order.append(owner)
        return func(*args, **kwargs)


def _key_tensor(module: nn.Module):
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
        return module.running_mean
    return module.weight


def _execution_order(
    model: nn.Module, input_size, skip: Tuple[type, ...]
) -> List[Tuple[str, nn.Module]]:
    """Conv/BN/Linear modules in the order a forward calls them, outside `skip` modules, with each
    pytorchcv shortcut moved after the rest of its residual unit. Seen through the tensors the
    torch functions receive, not through hooks: `module.forward(x)` calls count."""
    excluded = {
        id(m)
        for _, outer in model.named_modules()
        if isinstance(outer, skip)
        for m in outer.modules()
    }
    owners = {
        id(_key_tensor(m)): (n, m)
        for n, m in model.named_modules()
        if isinstance(m, MAPPED_TYPES) and id(m) not in excluded and _key_tensor(m) is not None
    }
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    was_training = model.training
    recorder = _CallRecorder(owners)
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(torch.zeros(input_size, device=device))
    finally:
        model.train(was_training)
    return _shortcuts_last(recorder.order, lambda n: any(f".{s}" in n for s in SHORTCUT_NAMES))


def _copy_layers(model: nn.Module, target: nn.Module, input_size, source) -> None:
    lstm_types = tuple({type(u) for u in _stage_units(model, source)})
    src = _execution_order(model, input_size, lstm_types + (DIALSTM,))
    dst = _execution_order(target, input_size, (DIALSTM,))
    if len(src) != len(dst):
        raise ValueError(
            f"model: {len(src)} conv/norm/linear layers run in the source, {len(dst)} in the "
            f"dia_fused model: the architectures differ"
        )
    for (sname, smod), (dname, dmod) in zip(src, dst):
        sstate, dstate = smod.state_dict(), dmod.state_dict()
        if type(smod) is not type(dmod) or {k: v.shape for k, v in sstate.items()} != {
            k: v.shape for k, v in dstate.items()
        }:
            raise ValueError(
                f"model: layer {sname} ({smod}) does not match dia_fused layer {dname} ({dmod})"
            )
        dmod.load_state_dict(sstate)


def _copy_units(units: List[nn.Module], target: DIANet, source) -> None:
    dia_units = [s.unit for s in target.stages if isinstance(getattr(s, "unit", None), DIALSTM)]
    if len(dia_units) != len(units):
        raise ValueError(
            f"model: {len(units)} shared DIA units in the source, {len(dia_units)} in the target"
        )
    for lstm, unit in zip(units, dia_units):
        unit.load_state_dict(source.lstm_state(lstm))
