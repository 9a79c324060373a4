"""Convert DIA models of other codebases to dia_fused models with the same weights.

    convert(model)                          official DIANet CIFAR models (dia_resnet bottleneck,
                                            dia_preresnet, dia_wrn, dia_resnext) and pytorchcv DIA
                                            models (diaresnet*_cifar*, diapreresnet*_cifar*,
                                            ImageNet diaresnet*)
    load_official_state_dict(name, sd)      an official checkpoint into the matching dia_fused model

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

import re
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .models import create_model
from .models.blocks import DIANet
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


def load_official_state_dict(
    name: str, state_dict: Mapping[str, torch.Tensor], num_classes: int = None, **options
) -> DIANet:
    """Builds `name` (e.g. 'dia_resnet164') and loads an official DIANet checkpoint's state dict
    (a `module.` prefix from DataParallel is removed; a {'state_dict': ...} checkpoint works too).
    Layers are matched in the checkpoint's order (the official modules' registration order, with
    each block's shortcut moved after its branch), each checked for its keys and shapes; a missing
    or unexpected key raises naming it. BN layers without `num_batches_tracked` (checkpoints of
    PyTorch < 0.4.1) load, with the count at 0: it only matters for BN with momentum=None.

    A WRN checkpoint does not record the dropout rate of its blocks (the official dia_wrn's
    `dropRate`): pass `dropout=` (0.0 is the official default); training outputs differ from the
    source's under any other rate, eval outputs do not depend on it."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if re.search(r"wrn", name) and "dropout" not in options:
        raise ValueError(
            f"dropout: {name} is a WRN and a checkpoint does not record its "
            f"blocks' dropout rate (the official dia_wrn's dropRate, 0.0 by "
            f"default): pass dropout= the source's rate; training outputs differ "
            f"from the source's under another rate"
        )
    state_dict = {
        k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()
    }
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    units: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if ".lstm." in key:
            stage, rest = key.split(".lstm.", 1)
            units.setdefault(stage, {})[rest] = value
        else:
            prefix, leaf = key.rsplit(".", 1)
            layers.setdefault(prefix, {})[leaf] = value
    if not units:
        raise ValueError(
            "state_dict: expected an official DIANet checkpoint (keys with '.lstm.'), found none"
        )
    for stage, state in units.items():
        _check_lstm_keys(stage, state)
    first = next(iter(units.values()))
    options.setdefault(
        "reduction", first["w_ih.0.seq.0.weight"].shape[1] // first["w_ih.0.seq.0.weight"].shape[0]
    )
    options.setdefault("num_cells", _num_cells(first))
    if num_classes is None:
        num_classes = list(layers.values())[-1]["weight"].shape[0]
    target = create_model(name, num_classes=num_classes, **options)
    source_layers = _shortcuts_last(
        list(layers.items()), lambda n: re.search(r"downsample|[Ss]hortcut", n)
    )
    target_layers = [
        (n, m)
        for n, m in target.named_modules()
        if isinstance(m, MAPPED_TYPES) and ".unit." not in f".{n}."
    ]
    if len(source_layers) != len(target_layers):
        raise ValueError(
            f"state_dict: {len(source_layers)} layers in the checkpoint, {len(target_layers)} in "
            f"{name}: not the same architecture"
        )
    for (sname, sstate), (dname, dmod) in zip(source_layers, target_layers):
        expected = dmod.state_dict()
        missing = sorted(set(expected) - set(sstate) - {"num_batches_tracked"})
        unexpected = sorted(set(sstate) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"state_dict: layer {sname} does not match {name} layer {dname} "
                f"({type(dmod).__name__}): missing keys "
                f"{[f'{sname}.{k}' for k in missing]}, unexpected keys "
                f"{[f'{sname}.{k}' for k in unexpected]}"
            )
        if any(sstate[k].shape != v.shape for k, v in expected.items() if k in sstate):
            raise ValueError(
                f"state_dict: layer {sname} "
                f"{[tuple(v.shape) for v in sstate.values()]} "
                f"does not match {name} layer {dname} "
                f"{[tuple(v.shape) for v in expected.values()]}"
            )
        dmod.load_state_dict(sstate, strict=False)  # keys checked: num_batches_tracked may lack
    dia_units = [s.unit for s in target.stages if isinstance(getattr(s, "unit", None), DIALSTM)]
    if len(dia_units) != len(units):
        raise ValueError(
            f"state_dict: {len(units)} DIA units in the checkpoint, {len(dia_units)} in {name}"
        )
    for unit, (stage, state) in zip(dia_units, units.items()):
        shapes = {k: tuple(v.shape) for k, v in unit.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if set(state) != set(shapes) or any(
            tuple(state[k].shape) != shape for k, shape in shapes.items()
        ):
            raise ValueError(
                f"state_dict: the DIA LSTM {stage}.lstm does not match {name}'s unit "
                f"{shapes}: got {got}"
            )
        unit.load_state_dict(state)
    return target


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
