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

What a source is (its stages and LSTMs, the dia_fused model of the same architecture, the order
its layers run in, the key names of an official checkpoint) is its adapter's knowledge
(adapters/official.py, adapters/pytorchcv.py); this module holds the source-independent part.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .adapters import official, source_with_dia, unwrap
from .adapters.base import MAPPED_TYPES, lstm_options
from .models.blocks import DIANet
from .modules import DIALSTM


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
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = _load_file(os.fspath(state_dict))
    return official.load_checkpoint(name, state_dict, num_classes, options)


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
    reduction, num_cells = lstm_options(units[0], source.LSTM_LAYOUT)
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
    """Conv/BN/Linear modules in the order a forward calls them, outside `skip` modules. Seen
    through the tensors the torch functions receive, not through hooks: `module.forward(x)` calls
    count."""
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
    return recorder.order


def _copy_layers(model: nn.Module, target: nn.Module, input_size, source) -> None:
    lstm_types = tuple({type(u) for u in _stage_units(model, source)})
    src = source.layer_order(_execution_order(model, input_size, lstm_types + (DIALSTM,)))
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
