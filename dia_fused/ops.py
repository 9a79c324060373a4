"""The DIA step's entry point, `dia_step`, and the step plan behind it (docs/design.md §3).

The first step with a given signature (type, shape, dtype and device of every tensor argument,
strides of the maps, the options, whether autograd records it, the text of the DIA_FUSED_*
variables and the kernel settings in force) runs every check and resolves the backend
(backends.py), then records what such steps need in a plan: the backend, its kernel settings, the
zero state's shape, the weight gradients' views and the route. Later steps with that signature
only look the plan up and ask what can change from call to call: whether a dispatch mode or a
torch.func transform is active. Errors are those of the checks, raised before any kernel runs, on
the first step with the signature (a signature that failed is not recorded, so it fails every
time). Under torch.compile and export steps are not planned: they are traced whole, every check
included.

Routes of a fused step (one formula, step_autograd.py):
- the custom op `dia_fused::step_forward` (step_op.py): tensor subclasses (FakeTensor, DTensor)
  and dispatch modes, torch.compile;
- `FunctorchStep` under torch.func transforms;
- `EagerStep` (an autograd.Function, no dispatcher) for eager steps autograd records;
- the kernel module's forward directly for the rest (no_grad, inference_mode).
Export routing: an exported or traced graph holds the reference math whatever backend was asked
for, so that it runs wherever it is loaded, ONNX runtimes included.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import backends, reference, settings
from ._checks import check_step_args, check_unit_input
from .backends import (  # noqa: F401  (the public names of the dispatch live here too)
    AUTO_ORDER,
    BACKEND_CHOICES,
    BACKENDS,
    BackendUnavailableError,
    auto_order,
    available_backends,
    backend_unavailable_reason,
    resolve_backend,
    shape_key,
    step_key,
    step_unavailable_reason,
)
from .settings import ENV_BACKEND
from .step_autograd import apply_eager_step
from .step_autograd import FunctorchStep as _FunctorchStep
from .step_op import (  # noqa: F401  (step_forward: patched by tests that count its calls)
    StepOptions,
    host_forward,
    settings_environment,
    step_backward,
    step_forward,
)

Tensor = torch.Tensor

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "AUTO_ORDER",
    "ENV_BACKEND",
    "BackendUnavailableError",
    "backend_unavailable_reason",
    "step_unavailable_reason",
    "available_backends",
    "auto_order",
    "resolve_backend",
    "dia_step",
    "step_key",
    "shape_key",
    "clear_plans",
]

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
MAX_PLANS = 512  # distinct signatures kept; past it the plans start over


def __getattr__(name: str):
    if name == "triton_host":  # the Triton kernel module, imported on first use
        return backends.triton_host()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dia_step(
    x: Tensor,  # (N, C, H, W)
    h: Optional[Tensor],  # (L, N, C), reference.state_dtype(x.dtype); None (with c): zeros
    c: Optional[Tensor],  # (L, N, C)
    weights: Sequence[Tensor],  # flat, reference.weight_names(L) order
    identity: Optional[Tensor] = None,  # (N, C, H, W) or None
    relu: Optional[bool] = False,  # None: on when an identity is given (the unit's default)
    activation: str = "sigmoid",
    dropout_masks: Optional[Tensor] = None,  # (L-1, N, C) scaled keep-masks or None
    backend: str = "auto",
    *,
    unit_channels: Optional[int] = None,  # a DIA unit's C: x is checked as that unit's input
) -> Tuple[Tensor, Tensor, Tensor]:
    """One DIA-LSTM step on the chosen backend: (out, h_new, c_new). See reference.dia_lstm_step.
    A zero state (h = c = None) and `unit_channels` are for modules.DIALSTM."""
    if torch.compiler.is_compiling() or _exporting():
        return _unplanned_step(
            x, h, c, weights, identity, relu, activation, dropout_masks, backend, unit_channels
        )
    try:
        grad = torch.is_grad_enabled() and _requires_grad(x, h, c, weights, identity, dropout_masks)
        key = _signature(
            grad,
            x,
            h,
            c,
            weights,
            identity,
            relu,
            activation,
            dropout_masks,
            backend,
            unit_channels,
        )
    except (AttributeError, TypeError):  # not a tensor, not a sequence: the checks say which
        grad, key = None, None
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan = _new_plan(
            grad, x, h, c, weights, identity, relu, activation, dropout_masks, backend,
            unit_channels,
        )  # fmt: skip
        if key is not None:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    if grad is None:  # arguments without a signature, which passed the checks
        masks = None if plan.no_masks else dropout_masks  # (ignored for one cell)
        grad = torch.is_grad_enabled() and _requires_grad(x, h, c, weights, identity, masks)
    return plan.run(grad, x, h, c, weights, identity, dropout_masks)


_plans = {}


def clear_plans() -> None:
    """Forgets every step plan: for code that changes what a plan recorded by other means than the
    arguments, the environment or use_settings (tests replacing a kernel module's functions)."""
    _plans.clear()


def _requires_grad(x, h, c, weights, identity, dropout_masks) -> bool:
    if x.requires_grad or (h is not None and (h.requires_grad or c.requires_grad)):
        return True
    if identity is not None and identity.requires_grad:
        return True
    for w in weights:
        if w.requires_grad:
            return True
    return dropout_masks is not None and dropout_masks.requires_grad


def _signature(grad, x, h, c, weights, identity, relu, activation, masks, backend, unit_channels):
    """The step's signature (a plan's key), or None where an option has an unexpected type (such
    steps are checked every time); AttributeError where an argument is not a tensor."""
    if (
        (relu is not None and relu.__class__ is not bool)
        or activation.__class__ is not str
        or backend.__class__ is not str
        or weights.__class__ not in (list, tuple)
        or (unit_channels is not None and unit_channels.__class__ is not int)
    ):
        return None
    key = [grad, relu, activation, backend, unit_channels, settings_environment()]
    key += (x.__class__, x.shape, x.stride(), x.dtype, x.device)
    if identity is not None:
        key += (identity.__class__, identity.shape, identity.stride(), identity.dtype)
        key.append(identity.device)
    else:
        key.append(None)
    for t in (h, c, masks):
        key += (None,) if t is None else (t.__class__, t.shape, t.dtype, t.device)
    for w in weights:
        key += (w.__class__, w.shape, w.dtype, w.device)
    return tuple(key)


def _exporting() -> bool:
    """torch.export / dynamo ONNX export (is_exporting, torch >= 2.6), torch.jit.trace, or the
    TorchScript-based ONNX export."""
    return _is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _zero_state(x: Tensor, weights: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """(h, c) zeros for a step on x, in the state dtype."""
    shape = (reference.num_cells_of(weights), x.shape[0], x.shape[1])
    dtype = reference.state_dtype(x.dtype)
    return (
        torch.zeros(shape, dtype=dtype, device=x.device),
        torch.zeros(shape, dtype=dtype, device=x.device),
    )


class _ZeroState:
    """The zero state of a plan's steps. Kept for all of them where that is safe (every backend
    only reads its input state, never returns or writes it, so it stays zeros), made outside
    inference mode so that steps autograd records may save it; made per step where a dispatch
    mode (FakeTensorMode, ...) or a tensor subclass would make it belong to one call."""

    def __init__(self, x: Tensor, weights: Sequence[Tensor], keep: bool):
        self.kept = None
        if keep:
            with torch.inference_mode(False):
                self.kept = _zero_state(x, weights)

    def get(self, x: Tensor, weights: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        return self.kept if self.kept is not None else _zero_state(x, weights)


def _checked(x, h, c, weights, identity, relu, activation, dropout_masks, unit_channels):
    """Every check of a step, in the order the errors are reported: (h, c, relu, dropout_masks)
    with the zero state made, relu's default applied and masks dropped where there are none."""
    if unit_channels is not None:
        relu = check_unit_input(x, unit_channels, identity, relu)
    if h is None and unit_channels is not None:
        h, c = _zero_state(x, weights)
    check_step_args(x, h, c, weights, identity, activation, dropout_masks)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(
            f"x: expected H*W >= 1 (the attention pools over H, W), got shape {tuple(x.shape)}"
        )
    if reference.num_cells_of(weights) == 1:
        dropout_masks = None
    return h, c, bool(relu), dropout_masks


def _new_plan(
    grad, x, h, c, weights, identity, relu, activation, dropout_masks, backend, unit_channels
):
    zero_state = h is None
    h, c, relu, dropout_masks = _checked(
        x, h, c, weights, identity, relu, activation, dropout_masks, unit_channels
    )
    if grad is None:
        grad = torch.is_grad_enabled() and _requires_grad(x, h, c, weights, identity, dropout_masks)
    if isinstance(backend, str) and backend == "auto":
        backend = settings.backend_for_auto()
    # only auto looks at the step's shape (so a named backend never specialises on it)
    step = None
    if backend == "auto" and x.is_cuda:
        step = (x.shape[1], x.shape[2] * x.shape[3], backends.dtype_name(x.dtype), grad)
    name = backends.resolve_backend(backend, x.device, step, x.dtype)
    tensors = (x, h, c, identity, dropout_masks, *weights)
    custom_op = any(t is not None and type(t) not in _PLAIN_TENSOR_TYPES for t in tensors)
    state = None
    if zero_state:
        keep = not custom_op and not is_in_torch_dispatch_mode()
        state = _ZeroState(x, weights, keep)
    if name == "reference":
        return _ReferencePlan(state, relu, activation, dropout_masks is None)
    views, offset = [], 0
    for w in weights:  # each weight's gradient in the flat fp32 gradient, as an as_strided view
        views.append((tuple(w.shape), w.contiguous().stride(), offset))
        offset += w.numel()
    if any(w.dtype != torch.float32 for w in weights):
        views = None  # cast one by one
    kernels = backends.kernel_module(name)
    kernel_settings = kernels.current_settings()
    launch = None
    if hasattr(kernels, "launch_plan"):  # checks x for the kernels (once, here)
        launch = kernels.launch_plan(x, h.shape[0], weights[0].shape[0], kernel_settings)
    options = StepOptions(
        name,
        identity is not None,
        relu,
        activation,
        settings=kernel_settings,
        launch=launch,
        environment=settings_environment(),
        weight_grad_views=None if views is None else tuple(views),
    )
    return _FusedPlan(state, options, dropout_masks is None, custom_op)


class _ReferencePlan:
    def __init__(self, state, relu: bool, activation: str, no_masks: bool):
        self.state, self.relu, self.activation, self.no_masks = state, relu, activation, no_masks

    def run(self, grad, x, h, c, weights, identity, dropout_masks):
        if h is None:
            h, c = self.state.get(x, weights)
        return reference.dia_lstm_step(
            x,
            h,
            c,
            weights,
            identity=identity,
            relu=self.relu,
            activation=self.activation,
            dropout_masks=None if self.no_masks else dropout_masks,
        )


class _FusedPlan:
    """A fused step: its options (backend, kernel settings, weight-gradient views) and route."""

    def __init__(self, state, options: StepOptions, no_masks: bool, custom_op: bool):
        self.state, self.options, self.no_masks, self.custom_op = (
            state,
            options,
            no_masks,
            custom_op,
        )

    def run(self, grad, x, h, c, weights, identity, dropout_masks):
        if h is None:
            h, c = self.state.get(x, weights)
        if self.no_masks:
            dropout_masks = None
        o = self.options
        if self.custom_op or is_in_torch_dispatch_mode():  # something must see the step whole
            out, h_new, c_new, _ = step_forward(
                x, h, c, list(weights), identity, o.relu, o.activation, dropout_masks, o.backend
            )
        elif _functorch_transforming():
            out, h_new, c_new, _ = _FunctorchStep.apply(
                o.backend, o.relu, o.activation, x, h, c, identity, dropout_masks, *weights
            )
        elif grad:
            out, h_new, c_new, _ = apply_eager_step(o, x, h, c, identity, dropout_masks, *weights)
        else:  # nothing to record: EagerStep's forward without the autograd node
            out, h_new, c_new, _ = host_forward(
                o.backend, x, h, c, weights, identity, o.relu, o.activation, dropout_masks,
                o.settings, o.launch,
            )  # fmt: skip
        return out, h_new, c_new


def _functorch_transforming() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active: its tensors look like
    plain ones, but neither EagerStep nor the custom op's autograd (both set the context in
    forward, the only style that is cheap per call) may run under it, so the step takes
    FunctorchStep. Torch has no public query for it: this private one is the check that
    torch.autograd.Function.apply itself makes on every call for the same decision (one C read
    of thread-local state)."""
    return torch._C._are_functorch_transforms_active()


def _unplanned_step(
    x, h, c, weights, identity, relu, activation, dropout_masks, backend, unit_channels
):
    """A step under torch.compile or export: every check and the backend choice traced with it
    (torch.compile resolves the backend once, at trace time), the fused backends through the
    custom op, an exported graph with the reference math."""
    h, c, relu, dropout_masks = _checked(
        x, h, c, weights, identity, relu, activation, dropout_masks, unit_channels
    )
    if not _exporting():
        if isinstance(backend, str) and backend == "auto":
            backend = settings.backend_for_auto()
        step = backends.step_key(x, weights) if backend == "auto" else None
        name = backends.resolve_backend(backend, x.device, step, x.dtype)
        if name != "reference":
            weights = list(weights)
            out, h_new, c_new, _ = step_forward(
                x, h, c, weights, identity, relu, activation, dropout_masks, name
            )
            return out, h_new, c_new
    return reference.dia_lstm_step(
        x,
        h,
        c,
        weights,
        identity=identity,
        relu=relu,
        activation=activation,
        dropout_masks=dropout_masks,
    )
