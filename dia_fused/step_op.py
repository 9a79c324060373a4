"""The fused step as torch.library custom ops, with fakes and vmap rules (docs/design.md §3.2).

`dia_fused::step_forward` (and `dia_fused::step_backward`, its gradient) run both fused backends'
host wrappers; torch.compile, export, dispatch modes and tensor subclasses see each one whole.
Their autograd formula is registered in step_autograd.py. `host_forward` / `host_backward` are
the calls into a kernel module that every route shares (the eager routes call them directly).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import backends, settings
from .kernels import kernel_state
from .reference import autocasting

Tensor = torch.Tensor


class StepOptions(NamedTuple):
    """What a fused step's backward needs besides tensors (fixed per step plan)."""

    backend: str  # "triton" | "cuda"
    identity_given: bool
    relu: bool
    activation: str
    settings: object = None  # the forward's kernel settings; None: the module's current ones
    launch: object = None  # the kernel module's launch plan for such steps, where it has one
    # what the settings were made from (settings_environment()): the backward uses them only
    # while it has not changed, else the settings current then, like an unplanned backward
    environment: Optional[tuple] = None
    # (size, stride, offset) of each weight's gradient in the flat fp32 gradient (as_strided views);
    # only where every weight is fp32
    weight_grad_views: Optional[Tuple[Tuple[tuple, tuple, int], ...]] = None


class SavedStep(NamedTuple):
    """One step as its backward sees it: the tensors the forward saved and the options."""

    x: Tensor  # (N, C, H, W)
    out: Tensor  # (N, C, H, W) the forward's output (relu mask)
    saved: Tensor  # fp32, the kernel module's saved_shape: what its forward keeps of the LSTM
    h: Tensor  # (L, N, C) the step's input state
    c: Tensor  # (L, N, C)
    dropout_masks: Optional[Tensor]  # (L-1, N, C) or None
    weights: Sequence[Tensor]  # flat, reference.weight_names(L) order
    options: StepOptions


def settings_environment() -> tuple:
    """What a step's kernel settings (and its plan) are made from besides the arguments: the
    DIA_FUSED_* variables' text, the use_settings blocks in force, availability changes."""
    return settings.step_texts(), kernel_state()


def host_forward(
    backend, x, h, c, weights, identity, relu, activation, dropout_masks, settings=None, launch=None
):
    """The kernel module's (out, h_new, c_new, saved), possibly aliasing inputs; `settings` None:
    the module's current settings; `launch`: its launch plan (kernel modules that have one)."""
    device_type = x.device.type
    if autocasting(device_type):  # fp32 LSTM math
        with torch.autocast(device_type, enabled=False):
            return host_forward(
                backend,
                x,
                h,
                c,
                weights,
                identity,
                relu,
                activation,
                dropout_masks,
                settings,
                launch,
            )
    kernels = backends.kernel_module(backend)
    if launch is None:
        return kernels.forward(
            x, h, c, weights, identity, relu, activation, dropout_masks, settings
        )
    return kernels.forward(
        x, h, c, weights, identity, relu, activation, dropout_masks, settings, launch
    )


def host_backward(grad_out, grad_h_new, grad_c_new, saved: SavedStep):
    """The kernel module's (grad_x, grad_identity or None, grad_h, grad_c, grad_weights) for
    `saved`: grad_weights one flat fp32 tensor (weight order) or one fp32 tensor per weight."""
    options = saved.options
    settings, launch = options.settings, options.launch
    if options.environment is not None and settings_environment() != options.environment:
        settings, launch = None, None
    device_type = saved.x.device.type
    if autocasting(device_type):  # fp32 LSTM math
        with torch.autocast(device_type, enabled=False):
            return host_backward(grad_out, grad_h_new, grad_c_new, saved)
    # the launch plan, where the kernel module has one, follows the settings
    launch = () if launch is None else (launch,)
    arguments = backward_arguments(grad_out, grad_h_new, grad_c_new, saved)
    return backends.kernel_module(options.backend).backward(*arguments, settings, *launch)


def backward_arguments(grad_out, grad_h_new, grad_c_new, saved: SavedStep) -> tuple:
    """The arguments that a kernel module's backward and the step_backward op both begin with:
    the incoming gradients, then the saved step (tensors and options) in the op's order."""
    options = saved.options
    return (
        grad_out,
        grad_h_new,
        grad_c_new,
        saved.x,
        saved.out,
        saved.saved,
        saved.h,
        saved.c,
        saved.weights,
        options.identity_given,
        options.relu,
        options.activation,
        saved.dropout_masks,
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
    """(out, h_new, c_new, saved): saved (fp32, the kernel module's saved_shape) is what the
    backward reads of the LSTM besides the state and weights."""
    results = host_forward(backend, x, h, c, weights, identity, relu, activation, dropout_masks)
    return tuple(_unaliased(results, [x, h, c, identity, dropout_masks, *weights]))


@step_forward.register_fake
def _step_forward_fake(x, h, c, weights, identity, relu, activation, dropout_masks, backend):
    shape = backends.kernel_module(backend).saved_shape(x.shape, weights)
    saved = x.new_empty(shape, dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(h), torch.empty_like(c), saved


@torch.library.custom_op("dia_fused::step_backward", mutates_args=())
def step_backward(
    grad_out: Tensor,  # (N, C, H, W) like x
    grad_h_new: Optional[Tensor],  # (L, N, C), None where h_new got no gradient
    grad_c_new: Optional[Tensor],  # (L, N, C), None where c_new got no gradient
    x: Tensor,  # (N, C, H, W)
    out: Tensor,  # (N, C, H, W) the forward's output (relu mask)
    saved: Tensor,  # fp32, what step_forward saved
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
    options = StepOptions(backend, identity_given, relu, activation)
    step = SavedStep(x, out, saved, h, c, dropout_masks, weights, options)
    grad_x, grad_identity, grad_h, grad_c, grad_weights = host_backward(
        grad_out, grad_h_new, grad_c_new, step
    )
    if grad_identity is None:
        grad_identity = grad_out.new_empty(0)
    if not isinstance(grad_weights, Tensor):  # one tensor per weight (the cuda backend)
        grad_weights = torch.cat([g.reshape(-1) for g in grad_weights])
    inputs = [grad_out, grad_h_new, grad_c_new, x, out, saved, h, c, dropout_masks, *weights]
    return _unaliased([grad_x, grad_identity, grad_h, grad_c, grad_weights], inputs)


@step_backward.register_fake
def _step_backward_fake(
    grad_out, grad_h_new, grad_c_new, x, out, saved, h, c, weights, identity_given, *options
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
