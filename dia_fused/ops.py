"""Backend dispatch for the DIA step: the one entry point the modules call (DESIGN section 2).

Backends: `reference` (plain PyTorch, autograd by PyTorch), `triton` and `cuda` (fused kernels).
Both fused backends share ONE pair of torch.library custom ops, `dia_fused::step_forward` and
`dia_fused::step_backward`, with a fake (meta) implementation and an autograd formula, so they work
under torch.compile(fullgraph=True), dispatch modes and in CUDA-graph capture. The ops dispatch on a
`backend` string to the kernel module's `forward` / `backward` host wrappers (kernels/*_dia_step.py).
Eager steps on plain tensors take the same wrappers and formula without the dispatcher, whose cost
is most of a step's host time: directly without gradients, through `_EagerStep` (an
autograd.Function) with them (`_eager_route`). `auto` picks, among
the backends available for the tensor's device, the fastest measured for the step's shape on this GPU
(backend_table.py), else cuda > triton > reference; the environment variable
DIA_FUSED_BACKEND overrides the requested name. A backend named explicitly that is unavailable
raises with the reason: there is no silent fallback.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import operator
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backend_table, reference
from ._checks import check_choice, check_step_args

Tensor = torch.Tensor
StepFn = Callable[..., Tuple[Tensor, Tensor, Tensor]]

BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
AUTO_ORDER = ("cuda", "triton", "reference")
ENV_BACKEND = "DIA_FUSED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name on a device where it cannot run; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    # device -> None when usable there, else the reason it is not
    unavailable_reason: Callable[[torch.device], Optional[str]]
    # (x, h, c, weights, identity, relu, activation, dropout_masks) -> (out, h, c)
    step: StepFn


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    check_choice("backend.name", backend.name, BACKENDS)
    _REGISTRY[backend.name] = backend


FUSED_MODULES = {"triton": "dia_fused.kernels.triton_dia_step",
                 "cuda": "dia_fused.kernels.cuda_dia_step"}


def _lookup(name: str) -> Backend:
    if name not in _REGISTRY:
        register_backend(Backend(name, _fused_unavailable_reason(name), _fused_step(name)))
    return _REGISTRY[name]


@functools.lru_cache(maxsize=None)  # every step asks; a failed import is not cached and raises again
def _kernel_module(name: str):
    """The host-wrapper module of fused backend `name` (forward / backward / unavailable_reason)."""
    return importlib.import_module(FUSED_MODULES[name])


def _fused_unavailable_reason(name: str) -> Callable[[torch.device], Optional[str]]:
    def reason(device: torch.device) -> Optional[str]:
        try:
            module = _kernel_module(name)
        except ModuleNotFoundError as err:
            if err.name not in (FUSED_MODULES[name], "triton"):
                raise
            missing = "the triton package" if err.name == "triton" else f"module {FUSED_MODULES[name]}"
            return f"the {name} backend needs {missing}, which is not part of this installation"
        return module.unavailable_reason(device)
    return reason


def backend_unavailable_reason(name: str, device) -> Optional[str]:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    check_choice("backend", name, BACKENDS)
    return _lookup(name).unavailable_reason(torch.device(device))


def available_backends(device) -> Tuple[str, ...]:
    return tuple(b for b in BACKENDS if backend_unavailable_reason(b, device) is None)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def auto_order(device, step: Optional[Tuple[int, int, str, bool]] = None) -> Tuple[str, ...]:
    """The order in which `auto` tries the backends on `device`: fastest first as measured for
    `step` = (channels, H*W, dtype name, training) where the table has this GPU (backend_table),
    else cuda > triton > reference."""
    device = torch.device(device)
    measured = None
    if step is not None and device.type == "cuda":
        measured = backend_table.measured_order(_device_name(device), *step)
    if measured is None:
        return AUTO_ORDER
    return measured + tuple(name for name in AUTO_ORDER if name not in measured)


def step_key(x: Tensor, weights: Sequence[Tensor]) -> Optional[Tuple[int, int, str, bool]]:
    """(channels, H*W, dtype name, training) of a step on `x`: what auto's measured choice depends
    on (on a GPU only: None elsewhere)."""
    return shape_key(x, weights) if x.is_cuda else None


def shape_key(x: Tensor, weights: Sequence[Tensor]) -> Tuple[int, int, str, bool]:
    # operator.index makes torch.compile specialise symbolic C and H*W (with guards) into the plain
    # ints assume_constant_result needs; int() would keep them symbolic and break the graph
    return (operator.index(x.shape[1]), operator.index(x.shape[2] * x.shape[3]), str(x.dtype).replace("torch.", ""),
            _needs_grad((x, *weights)))


def _needs_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether autograd will record a step on `tensors` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _requested(backend: str) -> str:
    """The backend asked for: DIA_FUSED_BACKEND overrides the argument."""
    return os.environ.get(ENV_BACKEND) or backend


@torch.compiler.assume_constant_result  # pure in (arguments, environment): resolved once at trace time
def resolve_backend(requested: str, device, step: Optional[Tuple[int, int, str, bool]] = None) -> str:
    """The backend that runs for `requested` on `device` (DIA_FUSED_BACKEND overrides); for
    `auto`, `step` = (channels, H*W, dtype name, training) selects by the measured table."""
    requested = _requested(requested)
    check_choice("backend", requested, BACKEND_CHOICES)
    # an exported or traced graph must run where dia_fused's ops do not exist (ONNX runtimes):
    # the step decomposes into the reference math (is_exporting: torch >= 2.6)
    if (getattr(torch.compiler, "is_exporting", lambda: False)() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()):
        return "reference"
    device = torch.device(device)
    if requested == "auto":
        for name in auto_order(device, step):
            # Triton on CPU tensors is the interpreter: a correctness tool, never an automatic choice
            if name == "triton" and device.type == "cpu":
                continue
            if backend_unavailable_reason(name, device) is None:
                return name
        raise AssertionError("the reference backend is always available")
    reason = backend_unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} cannot run on {device}: {reason}")
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
        raise ValueError(f"x: expected H*W >= 1 (the attention pools over H, W), got shape "
                         f"{tuple(x.shape)}")
    # only auto looks at the step's shape (so a named backend never specialises a compiled graph on it)
    step = step_key(x, weights) if _requested(backend) == "auto" else None
    name = resolve_backend(backend, x.device, step)
    if reference.num_cells_of(weights) == 1:
        dropout_masks = None
    return _lookup(name).step(x, h, c, tuple(weights), identity, bool(relu), activation,
                              dropout_masks)


register_backend(Backend(
    "reference",
    lambda device: None,
    lambda x, h, c, w, identity, relu, activation, masks: reference.dia_lstm_step(
        x, h, c, w, identity=identity, relu=relu, activation=activation, dropout_masks=masks),
))


# ---------------------------------------------------------------------------------------------
# Fused backends: one pair of custom ops for triton and cuda.


def _autocast_off(device_type: str):
    """Autocast disabled inside, entered only where it is on (entering costs ~3 us a call)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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
    results = _kernel_forward(x, h, c, weights, identity, relu, activation, dropout_masks, backend)
    return tuple(_unaliased(results, [x, h, c, identity, dropout_masks, *weights]))


def _kernel_forward(x, h, c, weights, identity, relu, activation, dropout_masks, backend):
    """The host wrapper's (out, h_new, c_new, pooled), as it returns them (the custom op unaliases)."""
    with _autocast_off(x.device.type):  # fp32 LSTM math, whatever autocast says
        return _kernel_module(backend).forward(x, h, c, weights, identity, relu, activation, dropout_masks)


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
    one flat fp32 tensor, the weight gradients flattened and concatenated in weight order (a
    kernel can write them all in one launch; the autograd formula splits it into views)."""
    grad_x, grad_identity, grad_h, grad_c, grad_weights = _kernel_backward(
        grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, weights, identity_given, relu, activation,
        dropout_masks, backend)
    if grad_identity is None:
        grad_identity = grad_out.new_empty(0)
    inputs = [grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, dropout_masks, *weights]
    return _unaliased([grad_x, grad_identity, grad_h, grad_c, grad_weights], inputs)


def _kernel_backward(grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, weights, identity_given, relu,
                     activation, dropout_masks, backend):
    """The host wrapper's (grad_x, grad_identity or None, grad_h, grad_c, flat fp32 weight grads),
    possibly aliasing its inputs (the custom op unaliases)."""
    with _autocast_off(x.device.type):
        grad_x, grad_identity, grad_h, grad_c, grad_weights = _kernel_module(backend).backward(
            grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, weights, identity_given, relu,
            activation, dropout_masks)
    if not isinstance(grad_weights, Tensor):  # a host wrapper that returns one tensor per weight
        grad_weights = torch.cat([g.reshape(-1).float() for g in grad_weights])
    return grad_x, grad_identity, grad_h, grad_c, grad_weights


@step_backward.register_fake
def _step_backward_fake(grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, weights, identity_given,
                        relu, activation, dropout_masks, backend):
    grad_identity = torch.empty_like(grad_out) if identity_given else grad_out.new_empty(0)
    grad_weights = x.new_empty((sum(w.numel() for w in weights),), dtype=torch.float32)
    return [torch.empty_like(x), grad_identity, torch.empty_like(h), torch.empty_like(c), grad_weights]


def _save_for_backward(ctx, x, h, c, weights, identity, relu, activation, dropout_masks, backend, out, pooled):
    ctx.save_for_backward(x, out, pooled, h, c, dropout_masks, *weights)
    # unused outputs (pooled always, the state after a stage's last block) get None, not zeros:
    # the kernels skip them, where materialised zeros would cost a fill launch each
    ctx.set_materialize_grads(False)
    ctx.options = (identity is not None, relu, activation, backend)


def _input_grads(ctx, grad_out, grad_h_new, grad_c_new, backward):
    """(grad_x, grad_h, grad_c, [grad of each weight], grad_identity or None) by `backward`:
    the step_backward custom op, or its implementation on the eager path."""
    x, out, pooled, h, c, dropout_masks, *weights = ctx.saved_tensors
    identity_given, relu, activation, backend = ctx.options
    if grad_out is None:  # only the state was used downstream
        grad_out = torch.zeros_like(out)
    grad_x, grad_identity, grad_h, grad_c, flat_grad_weights = backward(
        grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, weights, identity_given, relu,
        activation, dropout_masks, backend)
    grad_weights = [g.view(w.shape) if w.dtype == torch.float32 else g.view(w.shape).to(w.dtype)
                    for g, w in zip(flat_grad_weights.split([w.numel() for w in weights]), weights)]
    return grad_x, grad_h, grad_c, grad_weights, (grad_identity if identity_given else None)


def _step_forward_setup(ctx, inputs, output):
    _save_for_backward(ctx, *inputs, output[0], output[3])


def _step_forward_backward(ctx, grad_out, grad_h_new, grad_c_new, grad_pooled):
    grad_x, grad_h, grad_c, grad_weights, grad_identity = _input_grads(ctx, grad_out, grad_h_new, grad_c_new,
                                                                       step_backward)
    return grad_x, grad_h, grad_c, grad_weights, grad_identity, None, None, None, None


torch.library.register_autograd("dia_fused::step_forward", _step_forward_backward,
                                setup_context=_step_forward_setup)


class _EagerStep(torch.autograd.Function):
    """The custom ops' host wrappers and autograd formula without the dispatcher, for eager steps
    on plain tensors: torch.library's autograd wrapper (pytree flattening of the arguments, two
    redispatches, unaliasing) made a training step's host time 503 us instead of 288 us on a
    2-core CPU (kernels stubbed, N=8 C=64 8x8)."""

    @staticmethod
    def forward(ctx, x, h, c, identity, dropout_masks, relu, activation, backend, *weights):
        out, h_new, c_new, pooled = _kernel_forward(x, h, c, list(weights), identity, relu, activation,
                                                    dropout_masks, backend)
        _save_for_backward(ctx, x, h, c, weights, identity, relu, activation, dropout_masks, backend, out, pooled)
        return out, h_new, c_new

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels have no double backward: say so, not zeros
    def backward(ctx, grad_out, grad_h_new, grad_c_new):
        grad_x, grad_h, grad_c, grad_weights, grad_identity = _input_grads(ctx, grad_out, grad_h_new, grad_c_new,
                                                                           _kernel_backward)
        return (grad_x, grad_h, grad_c, grad_identity, None, None, None, None, *grad_weights)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)  # not subclasses such as FakeTensor


def _eager_route(tensors: Sequence[Optional[Tensor]]) -> Optional[str]:
    """How an eager step on `tensors` may skip the dispatcher: "direct" (nothing to differentiate:
    the host wrapper), "function" (autograd through _EagerStep), or None: through the
    custom ops, which torch.compile, dispatch modes, functorch transforms and tensor subclasses
    (FakeTensor) need."""
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None
            or not all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)):
        return None
    return "function" if _needs_grad(tensors) else "direct"


def _fused_step(name: str) -> StepFn:
    def step(x, h, c, weights, identity, relu, activation, dropout_masks):
        weights = list(weights)
        route = _eager_route((x, h, c, identity, dropout_masks, *weights))
        if route == "function":
            return _EagerStep.apply(x, h, c, identity, dropout_masks, relu, activation, name, *weights)
        run = _kernel_forward if route == "direct" else step_forward
        out, h_new, c_new, _ = run(x, h, c, weights, identity, relu, activation, dropout_masks, name)
        return out, h_new, c_new
    return step
