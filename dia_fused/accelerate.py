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

What accelerate replaces is checked: the LSTM's cells and widths, the stage's pooling (global
average) and its activation after the residual add (ReLU); anything else is refused with a
ValueError naming the module. The LSTM's Linear layers are read as their own forward would see
them (forward pre-hooks: torch.nn.utils.prune, the old-style weight_norm / spectral_norm;
parametrizations). A fused module that finds another LSTM, attention, pooling or activation
module in its place at a forward plans again for it (or refuses it, naming it). A forward hook
(or pre-hook, backward hook, global module hook) on a module the fused step does not call (the
LSTM and its submodules, the pooling, the activation, pytorchcv's DIAAttention) makes that
stage run the source's own forward, so the hook fires as without accelerate.

The knowledge of each source lives in its adapter (dia_fused/adapters/official.py,
pytorchcv.py).

Numerics: the fused step keeps the LSTM math in fp32 (fp64 for fp64 models), also under autocast,
where the source would run its LSTM Linears in half precision.
"""

from __future__ import annotations

from typing import List

from torch import nn

from . import ops
from ._checks import check_choice
from .adapters import WITH_DIA, WRAPPERS, official, pytorchcv, source_with_dia, unwrap
from .adapters.base import check_not_compiled, swap_class, unswap_class

SUPPORTED = (
    f"{official.SUPPORTED} or {pytorchcv.SUPPORTED}, also inside nn.DataParallel or "
    f"DistributedDataParallel"
)


def accelerate(
    model: nn.Module, backend: str = "auto", *, keep_rng_stream: bool = True
) -> nn.Module:
    """Runs every DIA stage of `model` with the fused step, in place; returns `model`.

    Idempotent (a second call only updates `backend` / `keep_rng_stream`). Raises TypeError for
    a model it does not support (the message lists what it supports) and ValueError naming the
    module whose structure does not match; it never fuses part of a model.
    See the module docstring for what is kept, checked and for dropout."""
    check_not_compiled(model, "accelerate")
    check_choice("backend", backend, ops.BACKEND_CHOICES)
    if not isinstance(keep_rng_stream, bool):
        raise TypeError(f"keep_rng_stream: expected a bool, got {type(keep_rng_stream).__name__}")
    plan = _plan(unwrap(model), backend, keep_rng_stream)  # validates everything before changing
    for module, mixin, step_plan in plan:
        swap_class(module, mixin)
        module.__dict__["_dia_fused"] = step_plan
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undoes `accelerate` in place (a model never accelerated is returned unchanged)."""
    for module in unwrap(model).modules():
        if "_dia_fused" in module.__dict__ and unswap_class(module):
            del module.__dict__["_dia_fused"]
    return model


def fused_stages(model: nn.Module) -> List[str]:
    """Names of the stages of `model` that run the fused step (each stage once, in order)."""
    names: List[str] = []
    for module in unwrap(model).modules():
        step_plan = module.__dict__.get("_dia_fused")
        if step_plan is not None and step_plan.stage not in names:
            names.append(step_plan.stage)
    return names


def _plan(model: nn.Module, backend: str, keep_rng_stream: bool):
    """[(module to fuse, mixin, StepPlan)] for every DIA stage of `model`, or raises."""
    source = source_with_dia(model)
    if source is None:
        named = any(s.name_only_match(model) for s in WITH_DIA)
        raise TypeError(
            f"model: expected one of the {SUPPORTED}; got {type(model).__module__}."
            f"{type(model).__qualname__}"
            + (" without DIA attention stages" if named else "")
            + " (to add DIA to a torchvision or timm ResNet: dia_fused.add_dia)"
        )
    plan = source.plan(model, backend, keep_rng_stream)
    covered = {id(step_plan_parts(p)) for p in plan}
    lstm_types = tuple(t for s in WITH_DIA for t in s.LSTM_TYPES)
    for name, module in model.named_modules():
        if type(module).__name__ in lstm_types and id(module) not in covered:
            raise ValueError(
                f"model: the DIA LSTM {name} belongs to no stage that accelerate matched "
                f"(a stage of an unexpected structure); nothing was changed"
            )
    return plan


def step_plan_parts(entry) -> nn.Module:
    """The LSTM module of one planned entry."""
    _, _, step_plan = entry
    return next(part for path, part in step_plan.parts if path[-1] == "lstm")


__all__ = ["accelerate", "restore", "fused_stages", "unwrap", "SUPPORTED", "WRAPPERS"]
