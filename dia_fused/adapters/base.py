"""What every source adapter shares: the fused-class swap (same class name, picklable), the plan
of one fused module (StepPlan), reading the source LSTM's weights as its Linears see them, the
fused DIA step on a source LSTM, and the hook and structure checks made at every forward.

A source adapter (official.py, pytorchcv.py, torchvision.py, timm.py) holds all the knowledge of
one codebase; this module holds none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

from .. import ops
from ..modules import linear_weights
from ..reference import state_dtype

Tensor = torch.Tensor
# the layers that convert and load_official_state_dict map one to one between a source and dia_fused
MAPPED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
_FUSED_MIXINS: Dict[str, type] = {}
_CLASSES: Dict[Tuple[type, type], type] = {}


def fused_mixin(mixin: type) -> type:
    """Registers a mixin (by class name) so that pickled fused modules find it again."""
    if _FUSED_MIXINS.setdefault(mixin.__name__, mixin) is not mixin:
        raise ValueError(f"mixin: a fused mixin named {mixin.__name__} is already registered")
    return mixin


def fused_class(original: type, mixin: type) -> type:
    """The subclass of `original` with `mixin`'s methods first, same name (one per pair)."""
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


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_dia_fused_original", type(module))


def swap_class(module: nn.Module, mixin: type) -> None:
    module.__class__ = fused_class(original_class(module), mixin)


def unswap_class(module: nn.Module) -> bool:
    """Puts the original class back; True if the module had a fused class."""
    original = getattr(type(module), "_dia_fused_original", None)
    if original is None:
        return False
    module.__class__ = original
    return True


def _reduce_fused(self, protocol):
    # pickle and deepcopy: the class is rebuilt from the original class and the mixin's name
    cls = type(self)
    mixin = next(base for base in cls.__bases__ if base in _FUSED_MIXINS.values())
    return _rebuild_fused, (cls._dia_fused_original, mixin.__name__), dict(self.__dict__)


def _rebuild_fused(original: type, mixin_name: str):
    cls = fused_class(original, _FUSED_MIXINS[mixin_name])
    return cls.__new__(cls)


@dataclass(frozen=True)
class StepPlan:
    """What a fused module of an accelerated model needs besides its own submodules. Plain data
    plus references to the source submodules the plan was made from (`parts`): a forward that
    finds another module there makes a new plan (DataParallel replicas, a swapped LSTM)."""

    stage: str  # name of the stage in the model, for fused_stages and errors
    linear_paths: Tuple[Tuple[str, ...], ...]  # the LSTM's Linears, reference.weight_names order
    num_cells: int
    channels: int
    relu: bool  # ReLU after the residual add
    backend: str
    keep_rng_stream: bool
    parts: Tuple[Tuple[Tuple[str, ...], nn.Module], ...] = ()  # (path from the module, module)
    # modules the fused forward does not call: a hook on one runs the source forward instead
    bypassed: Tuple[Tuple[str, ...], ...] = ()
    source: str = ""  # the adapter's own record (official: the model's class name)

    def with_options(self, backend: str, keep_rng_stream: bool) -> "StepPlan":
        return replace(self, backend=backend, keep_rng_stream=keep_rng_stream)


def submodule(module: nn.Module, path: Sequence[str]) -> Optional[nn.Module]:
    for name in path:
        module = module._modules.get(name) if isinstance(module, nn.Module) else None
    return module


def plan_is_current(module: nn.Module, plan: StepPlan) -> bool:
    """The submodules the plan was made from are still the module's."""
    return all(submodule(module, path) is part for path, part in plan.parts)


def current_plan(module: nn.Module, replan: Callable[[nn.Module, StepPlan], StepPlan]) -> StepPlan:
    """The fused module's plan (accelerate's), made again by `replan(module, plan)` and kept when
    a submodule it was made from is no longer the module's (a swapped LSTM, a replica)."""
    plan = module.__dict__["_dia_fused"]
    if not plan_is_current(module, plan):
        plan = module.__dict__["_dia_fused"] = replan(module, plan)
    return plan


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_backward_hooks", None)
        or getattr(module, "_backward_pre_hooks", None)
    )


def hooks_on_bypassed(module: nn.Module, plan: StepPlan) -> bool:
    """A hook that the fused forward would skip: on a module it does not call (a global module
    hook counts too). The Linears of the LSTM are read as their forward would see them (forward
    pre-hooks run: prune, weight_norm), so only their forward hooks count."""
    if (
        _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
        or _module_globals._global_backward_hooks
    ):
        return True
    for path in plan.bypassed:
        for inner in submodule(module, path).modules():
            if isinstance(inner, nn.Linear):
                if inner._forward_hooks or getattr(inner, "_backward_hooks", None):
                    return True
            elif _hooked(inner):
                return True
    return False


def lstm_weights(lstm: nn.Module, plan: StepPlan):
    """The LSTM's weights in reference.weight_names order, as its Linears' own forward sees them
    (forward pre-hooks, parametrizations): modules.linear_weights."""
    out = []
    for path in plan.linear_paths:
        out += linear_weights(submodule(lstm, path))
    return out


def _dropout_masks(dropout: nn.Dropout, plan: StepPlan, x: Tensor) -> Optional[Tensor]:
    """The scaled keep-masks between cells, drawn as the official and pytorchcv LSTM cells draw
    them (one dropout call per cell, the last cell's included; see accelerate's docstring)."""
    if not dropout.training or dropout.p == 0:
        return None
    draws = plan.num_cells if plan.keep_rng_stream else plan.num_cells - 1
    if draws == 0:
        return None
    ones = torch.ones((x.shape[0], plan.channels), dtype=state_dtype(x.dtype), device=x.device)
    masks = [F.dropout(ones, dropout.p, True) for _ in range(draws)]
    return torch.stack(masks[: plan.num_cells - 1]) if plan.num_cells > 1 else None


def source_step(lstm: nn.Module, plan: StepPlan, weights, branch: Tensor, identity: Tensor, state):
    """One fused DIA step with a source LSTM's weights and dropout: (out, (h, c))."""
    if not isinstance(branch, Tensor) or branch.dim() != 4:
        raise TypeError(
            f"{plan.stage}: a residual block returned {type(branch).__name__} as its branch, "
            f"expected a 4-D tensor"
        )
    if state is None:
        shape = (plan.num_cells, branch.shape[0], plan.channels)
        h = torch.zeros(shape, dtype=state_dtype(branch.dtype), device=branch.device)
        state = (h, torch.zeros_like(h))
    masks = _dropout_masks(lstm._modules["dropout"], plan, branch)
    out, h, c = ops.dia_step(
        branch, state[0], state[1], weights, identity, plan.relu, "sigmoid", masks, plan.backend
    )
    return out, (h, c)


@dataclass(frozen=True)
class LSTMLayout:
    """Where a source's LSTM cell stack keeps its Linears: two sides (input, hidden), each a
    `container` of one module per cell, `count` cells, and a `dropout`; cell 0 of a side is a small
    cell Linear(C, C // r), ReLU, Linear(C // r, 4C) at `first_cell` (two paths from the side),
    stacked cell k a Linear(C, 4C) at `stacked_cell(k)`."""

    description: str  # what the error says the LSTM should be
    sides: Tuple[str, str]
    container: type
    count: str  # the attribute holding the number of cells
    first_cell: Tuple[Tuple[str, ...], Tuple[str, ...]]
    stacked_cell: Callable[[int], str]


def lstm_layout(lstm, name: str, layout: LSTMLayout, check_first_cells: Callable) -> tuple:
    """(Linear paths in reference.weight_names order, num_cells, channels) of a source LSTM laid
    out as `layout`, or raises naming the first module that differs; `check_first_cells(lstm,
    name)` checks the source's own structure of cell 0 (the ReLU) after the containers."""
    containers = [getattr(lstm, side, None) for side in layout.sides]
    num_cells = getattr(lstm, layout.count, None)
    if not (
        all(isinstance(c, layout.container) for c in containers)
        and isinstance(num_cells, int)
        and len(containers[0]) == len(containers[1]) == num_cells >= 1
        and isinstance(getattr(lstm, "dropout", None), nn.Dropout)
    ):
        raise ValueError(f"{name}: expected {layout.description}, got {type(lstm).__name__}")
    check_first_cells(lstm, name)
    first = submodule(lstm, (layout.sides[0], *layout.first_cell[0]))
    channels, hidden = first.in_features, first.out_features
    paths = []

    def add(path: Tuple[str, ...], in_features: int, out_features: int) -> None:
        check_linear(submodule(lstm, path), ".".join((name, *path)), in_features, out_features)
        paths.append(path)

    for side in layout.sides:
        add((side, *layout.first_cell[0]), channels, hidden)
        add((side, *layout.first_cell[1]), hidden, 4 * channels)
    for cell in range(1, num_cells):
        for side in layout.sides:
            add((side, layout.stacked_cell(cell)), channels, 4 * channels)
    return tuple(paths), num_cells, channels


def lstm_options(lstm, layout: LSTMLayout) -> Tuple[int, int]:
    """(reduction, num_cells) of a source LSTM laid out as `layout`."""
    first = submodule(lstm, (layout.sides[0], *layout.first_cell[0]))
    return first.in_features // first.out_features, getattr(lstm, layout.count)


def check_linear(module, name: str, in_features: int, out_features: int) -> None:
    """Raises naming `name` unless `module` is a Linear(in, out) with bias."""
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


def check_global_pool(module, name: str) -> None:
    """Raises naming `name` unless `module` is a global average pooling (what the step does)."""
    size = getattr(module, "output_size", None)
    if type(module) is not nn.AdaptiveAvgPool2d or size not in (1, (1, 1), [1, 1]):
        raise ValueError(
            f"{name}: expected nn.AdaptiveAvgPool2d(1), the global average pooling the fused step "
            f"computes, got {module!r}; restore the pooling or do not accelerate this model"
        )


def check_relu(module, name: str) -> None:
    """Raises naming `name` unless `module` is a plain nn.ReLU (the fused epilogue's)."""
    if type(module) is not nn.ReLU:
        raise ValueError(
            f"{name}: expected nn.ReLU, the activation after the residual add that the fused step "
            f"computes, got {module!r}; restore it or do not accelerate this model"
        )


def check_not_compiled(model: nn.Module, function: str) -> None:
    """A torch.compile wrapper: its graph is fixed; the model inside must be changed first."""
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError(
            f"model: got a torch.compile wrapper (OptimizedModule); call {function} on the model "
            f"before torch.compile (m = torch.compile({function}(m))), or pass m._orig_mod"
        )
