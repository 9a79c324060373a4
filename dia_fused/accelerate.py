"""Make official DIANet and pytorchcv DIA models fast in place, keeping everything the user holds.

    accelerate(model, backend="auto", keep_rng_stream=True) -> model     (in place, idempotent)
    restore(model) -> model                                              (undoes accelerate)
    fused_stages(model) -> list of the names of the stages that run fused

Supported (also inside nn.DataParallel / DistributedDataParallel):
  - official DIANet CIFAR models (gbup-group/DIANet models/cifar): ResNet and PreResNet with
    Bottleneck blocks, WideResNet, CifarResNeXt; the stage modules are their `Attention` modules;
  - pytorchcv 0.0.74 DIA models: CIFARDIAResNet, CIFARDIAPreResNet (diaresnet*_cifar*,
    diapreresnet*_cifar*, *_svhn) and the ImageNet DIAResNet, DIAPreResNet (diaresnet*,
    diapreresnet*); the residual units (DIAResUnit, DIAPreResUnit) are fused one by one.

How: the module that runs a DIA step (official `Attention`, pytorchcv residual unit) gets as its
class a subclass of its own class, with the same name, whose forward runs the residual branches as
the source does (same calls, same order) and each DIA step, pool -> shared LSTM cell -> scale ->
residual add (-> ReLU), as one `ops.dia_step` call on the source LSTM's own Parameters, read at
every forward. Nothing else changes: the model's class and module tree, its Parameter objects
(an optimizer built before keeps training them), its state_dict keys and values, its train/eval
behaviour. DataParallel replicas, deepcopy and pickling keep the fused class (unpickling needs
dia_fused); `restore` puts the original classes back.

Dropout: the official LSTMCell (and pytorchcv's DIALSTMCell) applies its nn.Dropout to the output
of every cell, the last one included, and feeds the dropped output of cell l to cell l + 1. The
draw on the last cell's output changes no value (it is discarded) but it advances the random
number generator. In training, the fused step draws the masks between cells exactly as the source
does (one dropout call per cell, in cell order, same shape, dtype and device), so stacked cells
get the source's masks; with `keep_rng_stream=True` (default) it also makes the unused draw on the
last cell's output, so every later random operation (a WRN block's dropout, the next batch's
augmentation) gets the numbers it gets without accelerate: training runs are reproducible across
accelerate on and off under the same seed. `keep_rng_stream=False` skips that draw (one small
kernel fewer per step in training), values unchanged, later random numbers shifted.

Numerics: the fused step keeps the LSTM math in fp32 (fp64 for fp64 models), also under autocast,
where the source would run its LSTM Linears in half precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._checks import check_choice
from .reference import state_dtype

Tensor = torch.Tensor

# official top-level class -> (stage attributes, residual block class, ReLU after the residual add)
OFFICIAL = {
    "ResNet": (("layer1", "layer2", "layer3"), "Bottleneck", True),
    "PreResNet": (("layer1", "layer2", "layer3"), "Bottleneck", False),
    "WideResNet": (("block1", "block2", "block3"), "BasicBlock", False),
    "CifarResNeXt": (("stage_1", "stage_2", "stage_3"), "ResNeXtBottleneck", True),
}
# pytorchcv top-level class -> its residual unit class
PYTORCHCV = {
    "CIFARDIAResNet": "DIAResUnit",
    "DIAResNet": "DIAResUnit",
    "CIFARDIAPreResNet": "DIAPreResUnit",
    "DIAPreResNet": "DIAPreResUnit",
}
SUPPORTED = (
    "official DIANet CIFAR models (gbup-group/DIANet models/cifar: ResNet and PreResNet with "
    "Bottleneck blocks, WideResNet, CifarResNeXt) or pytorchcv DIA models (CIFARDIAResNet, "
    "CIFARDIAPreResNet, DIAResNet, DIAPreResNet: diaresnet*, diapreresnet*), also inside "
    "nn.DataParallel or DistributedDataParallel"
)
WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


@dataclass(frozen=True)
class _Config:
    """What a fused module needs besides its own submodules (plain data: DataParallel replicas
    share it)."""

    stage: str  # name of the stage in the model, for fused_stages and errors
    weight_paths: Tuple[Tuple[str, ...], ...]  # paths in the LSTM, reference.weight_names order
    num_cells: int
    channels: int
    relu: bool
    backend: str
    keep_rng_stream: bool


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside nn.DataParallel / DistributedDataParallel (nested too), else `model`."""
    while isinstance(model, WRAPPERS):
        model = model.module
    return model


def accelerate(
    model: nn.Module, backend: str = "auto", *, keep_rng_stream: bool = True
) -> nn.Module:
    """Runs every DIA stage of `model` with the fused step, in place; returns `model`.

    Idempotent (a second call only updates `backend` / `keep_rng_stream`). Raises TypeError for
    a model it does not support (the message lists what it supports) and ValueError naming the
    module whose structure does not match; it never fuses part of a model.
    See the module docstring for what is kept and for dropout."""
    check_choice("backend", backend, ops.BACKEND_CHOICES)
    if not isinstance(keep_rng_stream, bool):
        raise TypeError(f"keep_rng_stream: expected a bool, got {type(keep_rng_stream).__name__}")
    plan = _plan(unwrap(model), backend, keep_rng_stream)  # validates everything before changing
    for module, mixin, config in plan:
        original = getattr(type(module), "_dia_fused_original", type(module))
        module.__class__ = _fused_class(original, mixin)
        module.__dict__["_dia_fused"] = config
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undoes `accelerate` in place (a model never accelerated is returned unchanged)."""
    for module in unwrap(model).modules():
        original = getattr(type(module), "_dia_fused_original", None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_dia_fused", None)
    return model


def fused_stages(model: nn.Module) -> List[str]:
    """Names of the stages of `model` that run the fused step (each stage once, in order)."""
    names: List[str] = []
    for module in unwrap(model).modules():
        config = module.__dict__.get("_dia_fused")
        if config is not None and config.stage not in names:
            names.append(config.stage)
    return names


# --- matching the source's structure --------------------------------------------------------------


def _plan(model: nn.Module, backend: str, keep_rng_stream: bool):
    """[(module to fuse, mixin, config)] for every DIA stage of `model`, or raises."""
    kind = type(model).__name__
    if kind in OFFICIAL and any(
        _is_official_stage(getattr(model, a, None)) for a in OFFICIAL[kind][0]
    ):
        plan = _plan_official(model, kind, backend, keep_rng_stream)
    elif kind in PYTORCHCV:
        plan = _plan_pytorchcv(model, kind, backend, keep_rng_stream)
    else:
        raise TypeError(
            f"model: expected one of the {SUPPORTED}; got {type(model).__module__}."
            f"{type(model).__qualname__}"
            + (" without DIA attention stages" if kind in OFFICIAL else "")
        )
    covered = {id(m) for m in _covered_lstms(plan)}
    for name, module in model.named_modules():
        if type(module).__name__ in ("LSTMCell", "DIALSTMCell") and id(module) not in covered:
            raise ValueError(
                f"model: the DIA LSTM {name} belongs to no stage that accelerate matched "
                f"(a stage of an unexpected structure); nothing was changed"
            )
    return plan


def _covered_lstms(plan):
    for module, _, _ in plan:
        yield module.lstm if hasattr(module, "lstm") else module.attention.lstm


def _is_official_stage(module) -> bool:
    return (
        isinstance(module, nn.Module)
        and type(module).__name__ == "Attention"
        and hasattr(module, "lstm")
    )


def _plan_official(model, kind, backend, keep_rng_stream):
    attrs, block_class, relu = OFFICIAL[kind]
    plan = []
    for attr in attrs:
        stage = getattr(model, attr, None)
        if not _is_official_stage(stage):
            raise ValueError(
                f"model.{attr}: expected the official DIA `Attention` stage of {kind}, "
                f"got {type(stage).__name__}"
            )
        blocks = getattr(stage, "ModuleList", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(
                f"model.{attr}.ModuleList: expected a non-empty ModuleList or Sequential "
                f"of residual blocks, got {type(blocks).__name__}"
            )
        for index, block in enumerate(blocks):
            if type(block).__name__ != block_class:
                extra = (
                    (
                        " (the official ResNet with BasicBlock returns (out, pooled) instead of "
                        "(branch, residual) and is no DIANet)"
                    )
                    if kind == "ResNet"
                    else ""
                )
                raise ValueError(
                    f"model.{attr}.ModuleList.{index}: expected a {block_class} block in "
                    f"an official {kind}, got {type(block).__name__}{extra}"
                )
        paths, num_cells, channels = _official_lstm(stage.lstm, f"model.{attr}.lstm")
        plan.append(
            (
                stage,
                _FusedAttention,
                _Config(attr, paths, num_cells, channels, relu, backend, keep_rng_stream),
            )
        )
    return plan


def _plan_pytorchcv(model, kind, backend, keep_rng_stream):
    unit_class = PYTORCHCV[kind]
    mixin = _FusedResUnit if unit_class == "DIAResUnit" else _FusedPreResUnit
    plan, stages = [], {}
    for name, module in model.named_modules():
        if type(module).__name__ != unit_class:
            continue
        attention = getattr(module, "attention", None)
        if type(attention).__name__ != "DIAAttention" or not hasattr(attention, "lstm"):
            raise ValueError(
                f"model.{name}.attention: expected a pytorchcv DIAAttention, got "
                f"{type(attention).__name__}"
            )
        for attr in ("body", "resize_identity"):
            if not hasattr(module, attr):
                raise ValueError(f"model.{name}: a pytorchcv {unit_class} without `{attr}`")
        if module.resize_identity and not isinstance(
            getattr(module, "identity_conv", None), nn.Module
        ):
            raise ValueError(f"model.{name}: resize_identity is set but identity_conv is missing")
        lstm = attention.lstm
        if id(lstm) not in stages:
            stages[id(lstm)] = (
                name.rpartition(".")[0] or name,
                *_pytorchcv_lstm(lstm, f"model.{name}.attention.lstm"),
            )
        stage, paths, num_cells, channels = stages[id(lstm)]
        relu = unit_class == "DIAResUnit"  # DIAPreResUnit: no activation after the residual add
        plan.append(
            (
                module,
                mixin,
                _Config(stage, paths, num_cells, channels, relu, backend, keep_rng_stream),
            )
        )
    if not plan:
        raise ValueError(f"model: a pytorchcv {kind} without {unit_class} units")
    return plan


def _linear(module, name: str, in_features: int, out_features: int) -> None:
    if (
        not isinstance(module, nn.Linear)
        or module.bias is None
        or (module.in_features, module.out_features) != (in_features, out_features)
    ):
        got = (
            f"Linear({module.in_features}, {module.out_features}, bias={module.bias is not None})"
            if isinstance(module, nn.Linear)
            else type(module).__name__
        )
        raise ValueError(
            f"{name}: expected Linear({in_features}, {out_features}) with bias, got {got}"
        )


def _official_lstm(lstm, name):
    """(weight paths, num_cells, channels) of an official LSTMCell (w_ih.0.seq.0.weight ...)."""
    w_ih, w_hh = getattr(lstm, "w_ih", None), getattr(lstm, "w_hh", None)
    num_cells = getattr(lstm, "nlayers", None)
    if not (
        isinstance(w_ih, nn.ModuleList)
        and isinstance(w_hh, nn.ModuleList)
        and isinstance(num_cells, int)
        and len(w_ih) == len(w_hh) == num_cells >= 1
        and isinstance(getattr(lstm, "dropout", None), nn.Dropout)
    ):
        raise ValueError(
            f"{name}: expected the official LSTMCell (w_ih, w_hh: ModuleLists of nlayers cells, "
            f"dropout: nn.Dropout), got {type(lstm).__name__}"
        )
    cell0 = []
    for path in ("w_ih", "w_hh"):
        seq = getattr(getattr(lstm, path)[0], "seq", None)
        if not isinstance(seq, nn.Sequential) or len(seq) != 3 or not isinstance(seq[1], nn.ReLU):
            raise ValueError(f"{name}.{path}.0: expected small_cell (seq: Linear, ReLU, Linear)")
        cell0.append(seq)
    channels, hidden = cell0[0][0].in_features, cell0[0][0].out_features
    for path, seq in zip(("w_ih", "w_hh"), cell0):
        _linear(seq[0], f"{name}.{path}.0.seq.0", channels, hidden)
        _linear(seq[2], f"{name}.{path}.0.seq.2", hidden, 4 * channels)
    paths = [
        (path, "0", "seq", index, leaf)
        for path in ("w_ih", "w_hh")
        for index in ("0", "2")
        for leaf in ("weight", "bias")
    ]
    for cell in range(1, num_cells):
        for path in ("w_ih", "w_hh"):
            _linear(getattr(lstm, path)[cell], f"{name}.{path}.{cell}", channels, 4 * channels)
            paths += [(path, str(cell), "weight"), (path, str(cell), "bias")]
    return tuple(paths), num_cells, channels


def _pytorchcv_lstm(lstm, name):
    """(weight paths, num_cells, channels) of pytorchcv's DIALSTMCell (x_amps.amp1.fc1...)."""
    x_amps, h_amps = getattr(lstm, "x_amps", None), getattr(lstm, "h_amps", None)
    num_cells = getattr(lstm, "num_layers", None)
    if not (
        isinstance(x_amps, nn.Sequential)
        and isinstance(h_amps, nn.Sequential)
        and isinstance(num_cells, int)
        and len(x_amps) == len(h_amps) == num_cells >= 1
        and isinstance(getattr(lstm, "dropout", None), nn.Dropout)
    ):
        raise ValueError(
            f"{name}: expected pytorchcv's DIALSTMCell (x_amps, h_amps: Sequentials of num_layers "
            f"amplifiers, dropout: nn.Dropout), got {type(lstm).__name__}"
        )
    first = x_amps.amp1 if hasattr(x_amps, "amp1") else None
    if first is None or not isinstance(getattr(first, "fc1", None), nn.Linear):
        raise ValueError(f"{name}.x_amps.amp1: expected FirstLSTMAmp (fc1, activ, fc2)")
    channels, hidden = first.fc1.in_features, first.fc1.out_features
    paths = []
    for path in ("x_amps", "h_amps"):
        amp = getattr(getattr(lstm, path), "amp1", None)
        if not isinstance(getattr(amp, "activ", None), nn.ReLU):
            raise ValueError(f"{name}.{path}.amp1: expected FirstLSTMAmp (fc1, ReLU activ, fc2)")
        _linear(amp.fc1, f"{name}.{path}.amp1.fc1", channels, hidden)
        _linear(amp.fc2, f"{name}.{path}.amp1.fc2", hidden, 4 * channels)
        paths += [(path, "amp1", fc, leaf) for fc in ("fc1", "fc2") for leaf in ("weight", "bias")]
    for cell in range(1, num_cells):
        for path in ("x_amps", "h_amps"):
            _linear(
                getattr(getattr(lstm, path), f"amp{cell + 1}", None),
                f"{name}.{path}.amp{cell + 1}",
                channels,
                4 * channels,
            )
            paths += [(path, f"amp{cell + 1}", "weight"), (path, f"amp{cell + 1}", "bias")]
    return tuple(paths), num_cells, channels


# --- the fused forwards ---------------------------------------------------------------------------


def _weights(lstm: nn.Module, paths) -> List[Tensor]:
    """The LSTM's current parameters in weight order: submodules through `_modules` (attribute
    lookup on every step costs host time), the tensor by attribute where it is not a plain
    parameter (a parametrization computes it)."""
    out = []
    for *mods, leaf in paths:
        module = lstm
        for name in mods:
            module = module._modules[name]
        tensor = module._parameters.get(leaf)
        out.append(tensor if tensor is not None else getattr(module, leaf))
    return out


def _dropout_masks(dropout: nn.Dropout, config: _Config, x: Tensor) -> Optional[Tensor]:
    """The scaled keep-masks between cells, drawn as the source draws them (see the module
    docstring), or None."""
    if not dropout.training or dropout.p == 0:
        return None
    draws = config.num_cells if config.keep_rng_stream else config.num_cells - 1
    if draws == 0:
        return None
    ones = torch.ones((x.shape[0], config.channels), dtype=state_dtype(x.dtype), device=x.device)
    masks = [F.dropout(ones, dropout.p, True) for _ in range(draws)]
    return torch.stack(masks[: config.num_cells - 1]) if config.num_cells > 1 else None


def _step(lstm: nn.Module, config: _Config, weights, branch: Tensor, identity: Tensor, state):
    """One fused DIA step: (out, (h, c))."""
    if not isinstance(branch, Tensor) or branch.dim() != 4:
        raise TypeError(
            f"{config.stage}: a residual block returned {type(branch).__name__} as its branch, "
            f"expected a 4-D tensor"
        )
    if state is None:
        shape = (config.num_cells, branch.shape[0], config.channels)
        h = torch.zeros(shape, dtype=state_dtype(branch.dtype), device=branch.device)
        state = (h, torch.zeros_like(h))
    masks = _dropout_masks(lstm._modules["dropout"], config, branch)
    out, h, c = ops.dia_step(
        branch, state[0], state[1], weights, identity, config.relu, "sigmoid", masks, config.backend
    )
    return out, (h, c)


class _FusedAttention:
    """Official `Attention`: for each block, (branch, residual) = block(x), then the fused step."""

    def forward(self, x):
        config = self.__dict__["_dia_fused"]
        lstm = self._modules["lstm"]
        weights = _weights(lstm, config.weight_paths)
        state = None
        for layer in self.ModuleList:
            out = layer(x)
            if not isinstance(out, tuple) or len(out) != 2:
                raise TypeError(
                    f"{config.stage}: expected each block to return (branch, residual), got "
                    f"{type(out).__name__}"
                )
            x, state = _step(lstm, config, weights, out[0], out[1], state)
        return x


def _pytorchcv_state(hc):
    """pytorchcv passes (list of h per cell, list of c per cell); a fused unit passes tensors."""
    if hc is None:
        return None
    h, c = hc
    return (
        h if isinstance(h, Tensor) else torch.stack(list(h)),
        c if isinstance(c, Tensor) else torch.stack(list(c)),
    )


class _FusedResUnit:
    """pytorchcv DIAResUnit: identity, body, then the fused step (post-activation)."""

    def forward(self, x, hc=None):
        config = self.__dict__["_dia_fused"]
        identity = self.identity_conv(x) if self.resize_identity else x
        x = self.body(x)
        lstm = self.attention.lstm
        # the state goes on as (h, c) tensors of (cells, N, C): h[i], h[-1] index like pytorchcv's
        # lists
        return _step(
            lstm, config, _weights(lstm, config.weight_paths), x, identity, _pytorchcv_state(hc)
        )


class _FusedPreResUnit:
    """pytorchcv DIAPreResUnit: body (and its pre-activation), identity, then the fused step."""

    def forward(self, x, hc=None):
        config = self.__dict__["_dia_fused"]
        identity = x
        x, x_pre_activ = self.body(x)
        if self.resize_identity:
            identity = self.identity_conv(x_pre_activ)
        lstm = self.attention.lstm
        return _step(
            lstm, config, _weights(lstm, config.weight_paths), x, identity, _pytorchcv_state(hc)
        )


MIXINS = {m.__name__: m for m in (_FusedAttention, _FusedResUnit, _FusedPreResUnit)}
_CLASSES: Dict[Tuple[type, type], type] = {}


def _fused_class(original: type, mixin: type) -> type:
    """The subclass of `original` with `mixin`'s forward, same name (one per pair)."""
    key = (original, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(
            original.__name__,
            (mixin, original),
            {
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                "__doc__": original.__doc__,
                "_dia_fused_original": original,
                "__reduce_ex__": _reduce_fused,
            },
        )
    return _CLASSES[key]


def _reduce_fused(self, protocol):
    # pickle and deepcopy: the class is rebuilt from the original and the mixin's name
    cls = type(self)
    mixin = next(base for base in cls.__bases__ if base in MIXINS.values())
    return _rebuild_fused, (cls._dia_fused_original, mixin.__name__), dict(self.__dict__)


def _rebuild_fused(original: type, mixin_name: str):
    cls = _fused_class(original, MIXINS[mixin_name])
    return cls.__new__(cls)


__all__ = ["accelerate", "restore", "fused_stages", "unwrap", "SUPPORTED"]
