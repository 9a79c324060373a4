"""Backend dispatch for the DIA step: the one entry point the modules call (docs/design.md §3).

Backends: `reference` (plain PyTorch, autograd by PyTorch), `triton` and `cuda` (fused kernels, in
the kernel modules kernels/triton/ and kernels/cuda_dia_step.py). Dispatch asks one question,
`step_unavailable_reason(name, device, dtype)`: each kernel module answers for the device
(`unavailable_reason`) and declares the dtypes it takes (`SUPPORTED_DTYPES`); the reference takes
every step. `auto` runs the first backend that can take the step, in the order measured for its
shape on this GPU (backend_table.py), else cuda > triton > reference: a float64 step on a GPU runs
on the reference. A backend named explicitly that cannot take the step raises
BackendUnavailableError with the reason before any kernel runs; there is no silent fallback.
DIA_FUSED_BACKEND sets what `auto` stands for; an explicit name wins over it.

Both fused backends run through one torch.library custom op, `dia_fused::step_forward` (with
`dia_fused::step_backward` for its gradient), which torch.compile, export, CUDA graphs, dispatch
modes and tensor subclasses see whole. Eager steps on plain tensors take `_EagerStep`, an
autograd.Function over the same host wrappers with the same autograd formula, without the
dispatcher round trips that are most of a step's host time (bench/test_host_overhead.py).
Under torch.func transforms (grad, vmap, jacrev, ...) steps take `_FunctorchStep`: the same
formula in the form functorch requires, through the custom ops (with vmap rules).
"""

from __future__ import annotations

import functools
import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import backend_table, reference, settings
from ._checks import check_choice, check_step_args
from .kernels import SUPPORTED_DTYPES, cuda_dia_step
from .names import AUTO_ORDER, BACKEND_CHOICES, BACKENDS
from .settings import ENV_BACKEND

try:
    from .kernels.triton import host as triton_host

    _TRITON_MISSING = None
except ModuleNotFoundError as err:  # triton is an optional dependency; anything else is a bug
    if err.name != "triton":
        raise
    triton_host = None
    _TRITON_MISSING = (
        "the triton backend needs the triton package, which is not installed: "
        "pip install triton (or pip install 'dia_fused[triton]')"
    )

Tensor = torch.Tensor
StepKey = Tuple[int, int, str, bool]  # (channels, H*W, dtype name, training)

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
]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name for a step it cannot run; the message says why."""


def _kernel_module(name: str):
    """The kernel module of fused backend `name`: forward, backward, unavailable_reason,
    SUPPORTED_DTYPES (docs/design.md §2)."""
    return triton_host if name == "triton" else cuda_dia_step


def backend_unavailable_reason(name: str, device) -> Optional[str]:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    check_choice("backend", name, BACKENDS)
    if name == "reference":
        return None
    if name == "triton" and triton_host is None:
        return _TRITON_MISSING
    return _kernel_module(name).unavailable_reason(torch.device(device))


def _dtype_unavailable_reason(name: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    if name == "reference" or dtype is None:
        return None
    supported = (
        SUPPORTED_DTYPES
        if name == "triton" and triton_host is None
        else _kernel_module(name).SUPPORTED_DTYPES
    )
    if dtype in supported:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in supported)
    return (
        f"the {name} backend takes {names} inputs, got {str(dtype).replace('torch.', '')} "
        f"(backend='reference' runs every dtype)"
    )


def step_unavailable_reason(
    name: str, device, dtype: Optional[torch.dtype] = None
) -> Optional[str]:
    """The dispatch's one question: None if backend `name` can run a step on `device` with inputs
    of `dtype` (any layout: the fused host wrappers take every stride), else why not."""
    return backend_unavailable_reason(name, device) or _dtype_unavailable_reason(name, dtype)


def available_backends(device, dtype: Optional[torch.dtype] = None) -> Tuple[str, ...]:
    return tuple(b for b in BACKENDS if step_unavailable_reason(b, device, dtype) is None)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def auto_order(
    device, step: Optional[StepKey] = None, table_path: Optional[str] = None
) -> Tuple[str, ...]:
    """The order in which `auto` tries the backends on `device`: fastest first as measured for
    `step` where the table (at `table_path`, default backend_table.table_path()) has this GPU,
    else cuda > triton > reference."""
    device = torch.device(device)
    measured = None
    if step is not None and device.type == "cuda":
        path = table_path or backend_table.table_path()
        measured = backend_table.measured_order(_device_name(device), *step, path=path)
    if measured is None:
        return AUTO_ORDER
    return measured + tuple(name for name in AUTO_ORDER if name not in measured)


def step_key(x: Tensor, weights: Sequence[Tensor]) -> Optional[StepKey]:
    """(channels, H*W, dtype name, training) of a step on `x`: what auto's measured choice depends
    on (on a GPU only: None elsewhere)."""
    return shape_key(x, weights) if x.is_cuda else None


def shape_key(x: Tensor, weights: Sequence[Tensor]) -> StepKey:
    # operator.index makes torch.compile specialise symbolic C and H*W (with guards) into the plain
    # ints assume_constant_result needs; int() would keep them symbolic and break the graph
    return (
        operator.index(x.shape[1]),
        operator.index(x.shape[2] * x.shape[3]),
        _dtype_name(x.dtype),
        _needs_grad((x, *weights)),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _needs_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether autograd will record a step on `tensors` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(
    requested: str, device, step: Optional[StepKey] = None, dtype: Optional[torch.dtype] = None
) -> str:
    """The backend that runs for `requested` on `device`: for `auto` (or what DIA_FUSED_BACKEND
    sets it to), `step` = (channels, H*W, dtype name, training) selects by the measured table.
    The step's dtype (`dtype`, else the one in `step`) rules out backends that cannot take it."""
    if isinstance(requested, str) and requested == "auto":
        requested = settings.backend_for_auto()
    check_choice("backend", requested, BACKEND_CHOICES)
    dtype_name = _dtype_name(dtype) if dtype is not None else (step[2] if step else None)
    table = None
    if requested == "auto" and step is not None and torch.device(device).type == "cuda":
        table = backend_table.table_path()
    return _resolve(requested, device, step, dtype_name, table)


# The environment was read by the caller: this is pure in its arguments (and the table file,
# fixed for the process), so torch.compile resolves it once at trace time.
@torch.compiler.assume_constant_result
def _resolve(
    requested: str,
    device,
    step: Optional[StepKey],
    dtype_name: Optional[str],
    table_path: Optional[str],
) -> str:
    device = torch.device(device)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    if requested == "auto":
        for name in auto_order(device, step, table_path):
            # Triton on CPU tensors is the interpreter: a correctness tool, never an automatic
            # choice
            if name == "triton" and device.type == "cpu":
                continue
            if (
                backend_unavailable_reason(name, device) is None
                and _dtype_unavailable_reason(name, dtype) is None
            ):
                return name
        raise AssertionError("the reference backend takes every step")
    reason = backend_unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} cannot run on {device}: {reason}")
    reason = _dtype_unavailable_reason(requested, dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend={requested!r} cannot run a {dtype_name} step: {reason}"
        )
    return requested


def dia_step(
    x: Tensor,  # (N, C, H, W)
    h: Tensor,  # (L, N, C), reference.state_dtype(x.dtype)
    c: Tensor,  # (L, N, C)
    weights: Sequence[Tensor],  # flat, reference.weight_names(L) order
    identity: Optional[Tensor] = None,  # (N, C, H, W) or None
    relu: bool = False,
    activation: str = "sigmoid",
    dropout_masks: Optional[Tensor] = None,  # (L-1, N, C) scaled keep-masks or None
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """One DIA-LSTM step on the chosen backend: (out, h_new, c_new). See reference.dia_lstm_step."""
    check_step_args(x, h, c, weights, identity, activation, dropout_masks)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(
            f"x: expected H*W >= 1 (the attention pools over H, W), got shape {tuple(x.shape)}"
        )
    if reference.num_cells_of(weights) == 1:
        dropout_masks = None
    # Export routing: an exported or traced graph holds the reference math (any backend asked
    # for), so that it runs wherever it is loaded, ONNX runtimes included, without this package's
    # kernels (docs/design.md §3).
    if _exporting():
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
    if isinstance(backend, str) and backend == "auto":
        backend = settings.backend_for_auto()
    # only auto looks at the step's shape (so a named backend never specialises a compiled graph
    # on it)
    step = step_key(x, weights) if backend == "auto" else None
    name = resolve_backend(backend, x.device, step, x.dtype)
    if name == "reference":
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
    weights = list(weights)
    relu = bool(relu)
    if _eager(x, h, c, identity, dropout_masks, weights):
        if _functorch_transforming():
            out, h_new, c_new, _ = _FunctorchStep.apply(
                name, relu, activation, x, h, c, identity, dropout_masks, *weights
            )
        elif _needs_grad((x, h, c, identity, dropout_masks, *weights)):
            out, h_new, c_new, _ = _EagerStep.apply(
                name, relu, activation, x, h, c, identity, dropout_masks, *weights
            )
        else:  # nothing to record: _EagerStep's forward without the autograd node
            out, h_new, c_new, _ = _host_forward(
                x, h, c, weights, identity, relu, activation, dropout_masks, name
            )
    else:
        out, h_new, c_new, _ = step_forward(
            x, h, c, weights, identity, relu, activation, dropout_masks, name
        )
    return out, h_new, c_new


def _exporting() -> bool:
    """torch.export / dynamo ONNX export (is_exporting, torch >= 2.6), torch.jit.trace, or the
    TorchScript-based ONNX export."""
    return _is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _functorch_transforming() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active: its tensors look like
    plain ones, but neither _EagerStep nor the custom op's autograd (both set the context in
    forward, the only style that is cheap per call) may run under it, so the step takes
    _FunctorchStep. Torch has no public query for it: this private one is the check that
    torch.autograd.Function.apply itself makes on every call for the same decision (one C read
    of thread-local state, cheaper than restructuring _EagerStep). Asked only on the eager route
    (_eager: never under torch.compile)."""
    return torch._C._are_functorch_transforms_active()


def _eager(x, h, c, identity, dropout_masks, weights) -> bool:
    """Whether a step may take _EagerStep instead of the custom op. The op is needed wherever
    something must see the step as one operator: torch.compile and export (is_compiling, public),
    tensor subclasses such as FakeTensor or DTensor (their exact type, public), and dispatch modes.
    Torch has no public query for an active dispatch mode: is_in_torch_dispatch_mode is torch's
    own, unprefixed function for it (in a private module), which reads one Python flag, cheap
    enough for every step."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return False
    for t in (x, h, c, identity, dropout_masks):
        if t is not None and type(t) not in _PLAIN_TENSOR_TYPES:
            return False
    return all(type(w) in _PLAIN_TENSOR_TYPES for w in weights)


# ---------------------------------------------------------------------------------------------
# The fused backends' host wrappers, the custom op, and the one autograd formula.


def _host_forward(x, h, c, weights, identity, relu, activation, dropout_masks, backend):
    """The kernel module's (out, h_new, c_new, pooled), possibly aliasing inputs."""
    with reference.autocast_off(x.device.type):  # fp32 LSTM math
        return _kernel_module(backend).forward(
            x, h, c, weights, identity, relu, activation, dropout_masks
        )


def _host_backward(
    grad_out,
    grad_h_new,
    grad_c_new,
    x,
    out,
    pooled,
    h,
    c,
    weights,
    identity_given,
    relu,
    activation,
    dropout_masks,
    backend,
):
    """The kernel module's (grad_x, grad_identity or None, grad_h, grad_c, grad_weights):
    grad_weights one flat fp32 tensor (weight order) or one fp32 tensor per weight."""
    with reference.autocast_off(x.device.type):  # fp32 LSTM math
        return _kernel_module(backend).backward(
            grad_out,
            grad_h_new,
            grad_c_new,
            x,
            out,
            pooled,
            h,
            c,
            weights,
            identity_given,
            relu,
            activation,
            dropout_masks,
        )


def _unaliased(results: Sequence[Tensor], inputs: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """Custom-op outputs may alias neither inputs nor each other (a host wrapper may return
    grad_out itself, or views of one buffer): clone those that would."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    unaliased = []
    for t in results:
        if t.numel():
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        unaliased.append(t)
    return unaliased


@torch.library.custom_op("dia_fused::step_forward", mutates_args=())
def step_forward(
    x: Tensor,  # (N, C, H, W) fp32/bf16/fp16, contiguous or channels_last
    h: Tensor,  # (L, N, C) state dtype
    c: Tensor,  # (L, N, C) state dtype
    weights: List[Tensor],  # flat, reference.weight_names(L) order
    identity: Optional[Tensor],  # (N, C, H, W) like x, or None
    relu: bool,
    activation: str,
    dropout_masks: Optional[Tensor],  # (L-1, N, C) or None
    backend: str,  # "triton" | "cuda"
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, h_new, c_new, pooled): pooled (N, C) fp32 is saved for the backward."""
    results = _host_forward(x, h, c, weights, identity, relu, activation, dropout_masks, backend)
    return tuple(_unaliased(results, [x, h, c, identity, dropout_masks, *weights]))


@step_forward.register_fake
def _step_forward_fake(x, h, c, weights, identity, relu, activation, dropout_masks, backend):
    pooled = x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(h), torch.empty_like(c), pooled


@torch.library.custom_op("dia_fused::step_backward", mutates_args=())
def step_backward(
    grad_out: Tensor,  # (N, C, H, W) like x
    grad_h_new: Optional[Tensor],  # (L, N, C), None where h_new got no gradient
    grad_c_new: Optional[Tensor],  # (L, N, C), None where c_new got no gradient
    x: Tensor,  # (N, C, H, W)
    out: Tensor,  # (N, C, H, W) the forward's output (relu mask)
    pooled: Tensor,  # (N, C) fp32
    h: Tensor,  # (L, N, C) the step's input state
    c: Tensor,  # (L, N, C)
    weights: List[Tensor],
    identity_given: bool,
    relu: bool,
    activation: str,
    dropout_masks: Optional[Tensor],
    backend: str,
) -> List[Tensor]:
    """[grad_x, grad_identity (empty if no identity), grad_h, grad_c, grad_weights]: grad_weights is
    one flat fp32 tensor, the weight gradients flattened and concatenated in weight order (one
    output of a fixed schema, which the autograd formula splits into views)."""
    grad_x, grad_identity, grad_h, grad_c, grad_weights = _host_backward(
        grad_out,
        grad_h_new,
        grad_c_new,
        x,
        out,
        pooled,
        h,
        c,
        weights,
        identity_given,
        relu,
        activation,
        dropout_masks,
        backend,
    )
    if grad_identity is None:
        grad_identity = grad_out.new_empty(0)
    if not isinstance(grad_weights, Tensor):  # one tensor per weight (the cuda backend)
        grad_weights = torch.cat([g.reshape(-1) for g in grad_weights])
    inputs = [grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, dropout_masks, *weights]
    return _unaliased([grad_x, grad_identity, grad_h, grad_c, grad_weights], inputs)


@step_backward.register_fake
def _step_backward_fake(
    grad_out,
    grad_h_new,
    grad_c_new,
    x,
    out,
    pooled,
    h,
    c,
    weights,
    identity_given,
    relu,
    activation,
    dropout_masks,
    backend,
):
    grad_identity = torch.empty_like(grad_out) if identity_given else grad_out.new_empty(0)
    grad_weights = x.new_empty((sum(w.numel() for w in weights),), dtype=torch.float32)
    return [
        torch.empty_like(x),
        grad_identity,
        torch.empty_like(h),
        torch.empty_like(c),
        grad_weights,
    ]


# The autograd formula, shared by the custom op (register_autograd) and _EagerStep: the forward
# keeps (x, out, pooled, h, c, masks, weights); the backward runs the kernel module's backward
# (through the step_backward op on the op's route) and casts the fp32 weight gradients once.


def _save(ctx, backend, relu, activation, x, h, c, identity, dropout_masks, weights, out, pooled):
    ctx.save_for_backward(x, out, pooled, h, c, dropout_masks, *weights)
    # unused outputs (pooled always, the state after a stage's last block) get None, not zeros:
    # the kernels skip them, where materialised zeros would cost a fill launch each
    ctx.set_materialize_grads(False)
    ctx.options = (identity is not None, relu, activation, backend)


def _weight_grads(grad_weights, weights: Sequence[Tensor]) -> List[Tensor]:
    """Each weight's gradient in its shape and dtype, from one flat fp32 tensor (views) or one
    fp32 tensor per weight; cast only where the weight is not fp32."""
    if isinstance(grad_weights, Tensor):
        grad_weights = grad_weights.split_with_sizes([w.numel() for w in weights])
    return [
        g.view(w.shape) if g.dtype == w.dtype else g.view(w.shape).to(w.dtype)
        for g, w in zip(grad_weights, weights)
    ]


def _backward(ctx, grad_out, grad_h_new, grad_c_new, kernel_backward):
    """(grad_x, grad_h, grad_c, grad_identity or None, [grad of each weight])."""
    x, out, pooled, h, c, dropout_masks, *weights = ctx.saved_tensors
    identity_given, relu, activation, backend = ctx.options
    if grad_out is None:  # only the state was used downstream
        grad_out = torch.zeros_like(out)
    grad_x, grad_identity, grad_h, grad_c, grad_weights = kernel_backward(
        grad_out,
        grad_h_new,
        grad_c_new,
        x,
        out,
        pooled,
        h,
        c,
        weights,
        identity_given,
        relu,
        activation,
        dropout_masks,
        backend,
    )
    return (
        grad_x,
        grad_h,
        grad_c,
        grad_identity if identity_given else None,
        _weight_grads(grad_weights, weights),
    )


def _op_setup_context(ctx, inputs, output):
    x, h, c, weights, identity, relu, activation, dropout_masks, backend = inputs
    _save(
        ctx,
        backend,
        relu,
        activation,
        x,
        h,
        c,
        identity,
        dropout_masks,
        weights,
        output[0],
        output[3],
    )


def _op_backward(ctx, grad_out, grad_h_new, grad_c_new, grad_pooled):
    grad_x, grad_h, grad_c, grad_identity, grad_weights = _backward(
        ctx, grad_out, grad_h_new, grad_c_new, step_backward
    )
    return grad_x, grad_h, grad_c, grad_weights, grad_identity, None, None, None, None


torch.library.register_autograd(
    "dia_fused::step_forward", _op_backward, setup_context=_op_setup_context
)


class _EagerStep(torch.autograd.Function):
    """The custom op's host wrappers and autograd formula without the dispatcher, for eager steps
    on plain tensors (see _eager). Returns (out, h_new, c_new, pooled) like the op. Written with
    ctx in forward: a setup_context staticmethod would make every apply bind the arguments with
    inspect.signature, which costs more than the rest of the eager route; torch.func transforms,
    which need setup_context, take _FunctorchStep instead (see _functorch_transforming)."""

    @staticmethod
    def forward(ctx, backend, relu, activation, x, h, c, identity, dropout_masks, *weights):
        out, h_new, c_new, pooled = _host_forward(
            x, h, c, list(weights), identity, relu, activation, dropout_masks, backend
        )
        ctx.mark_non_differentiable(pooled)
        _save(
            ctx, backend, relu, activation, x, h, c, identity, dropout_masks, weights, out, pooled
        )
        return out, h_new, c_new, pooled

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward in the kernels: say so
    def backward(ctx, grad_out, grad_h_new, grad_c_new, grad_pooled):
        grad_x, grad_h, grad_c, grad_identity, grad_weights = _backward(
            ctx, grad_out, grad_h_new, grad_c_new, _host_backward
        )
        return (None, None, None, grad_x, grad_h, grad_c, grad_identity, None, *grad_weights)


class _FunctorchStep(torch.autograd.Function):
    """The step under torch.func transforms: the same autograd formula as the custom op, written
    with setup_context (which functorch requires) and with its forward and backward through the
    custom ops, whose vmap rules (_vmap_by_loop) run a batched step one slice at a time. Too slow
    for every step (apply binds the arguments with inspect.signature), right for transforms."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backend, relu, activation, x, h, c, identity, dropout_masks, *weights):
        return step_forward(
            x, h, c, list(weights), identity, relu, activation, dropout_masks, backend
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, relu, activation, x, h, c, identity, dropout_masks, *weights = inputs
        ctx.mark_non_differentiable(output[3])
        _save(
            ctx,
            backend,
            relu,
            activation,
            x,
            h,
            c,
            identity,
            dropout_masks,
            weights,
            output[0],
            output[3],
        )

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(
            "the fused backends (triton, cuda) have no forward-mode AD "
            "(torch.func.jvp, jacfwd, hessian): use backend='reference'"
        )

    @staticmethod
    def backward(ctx, grad_out, grad_h_new, grad_c_new, grad_pooled):
        # once_differentiable does not reach through functorch levels (a second grad would
        # silently be zero): the gradients are computed as constants, then tied to everything
        # they depend on through _NoDoubleBackward, which raises if differentiated
        with torch.no_grad():
            grad_x, grad_h, grad_c, grad_identity, grad_weights = _backward(
                ctx, grad_out, grad_h_new, grad_c_new, step_backward
            )
        grads = [grad_x, grad_h, grad_c, grad_identity, *grad_weights]
        given = [g for g in grads if g is not None]
        sources = [
            t for t in (grad_out, grad_h_new, grad_c_new, *ctx.saved_tensors) if t is not None
        ]
        tied = iter(_NoDoubleBackward.apply(len(given), *given, *sources))
        grad_x, grad_h, grad_c, grad_identity, *grad_weights = [
            None if g is None else next(tied) for g in grads
        ]
        return (None, None, None, grad_x, grad_h, grad_c, grad_identity, None, *grad_weights)


class _NoDoubleBackward(torch.autograd.Function):
    """apply(n, *grads, *sources) -> grads (views): the step's gradients, connected to the tensors
    they were computed from so that differentiating them again raises instead of giving zeros."""

    generate_vmap_rule = True

    @staticmethod
    def forward(count, *tensors):
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "the fused backends (triton, cuda) have no double backward: "
            "differentiate the step twice with backend='reference'"
        )


def _slice(arg, dim: Optional[int], index: int):
    """Sample `index` of a vmapped argument (in_dim `dim`; a list has one in_dim per entry)."""
    if isinstance(arg, (list, tuple)):
        return [a if d is None else a.select(d, index) for a, d in zip(arg, dim)]
    return arg if dim is None else arg.select(dim, index)


def _vmap_by_loop(op):
    """A vmap rule for `op`: the op once per sample of the vmapped dimension, results stacked
    along dim 0. The kernels have no batch dimension of their own to fold it into."""

    def rule(info, in_dims, *args):
        results = [
            op(*(_slice(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)
        ]
        stacked = [torch.stack(parts) for parts in zip(*results)]
        out_dims = [0] * len(stacked)
        if isinstance(results[0], tuple):
            return tuple(stacked), tuple(out_dims)
        return stacked, out_dims

    return rule


torch.library.register_vmap("dia_fused::step_forward", _vmap_by_loop(step_forward))
torch.library.register_vmap("dia_fused::step_backward", _vmap_by_loop(step_backward))
