"""The fused step's one autograd formula and the autograd.Functions that run it (docs/design.md
§3.2).

The forward keeps (x, out, saved, h, c, masks, weights) and the step's options; the backward runs
the kernel module's backward on that saved step (through the step_backward op on the op's route)
and turns the fp32 weight gradients into each weight's shape and dtype. Three users:

- the custom op `dia_fused::step_forward` (register_autograd): compile, export, dispatch modes;
- `EagerStep`: eager steps on plain tensors, without the dispatcher;
- `FunctorchStep`: under torch.func transforms, through the custom ops (with their vmap rules).

The kernels have no double backward. A gradient computed with create_graph=True is tied to every
tensor it was computed from (`_NoDoubleBackward`), so differentiating it again raises instead of
giving zeros or dropping the term, whether or not the incoming gradient itself requires grad.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .step_op import (
    SavedStep,
    StepOptions,
    backward_arguments,
    host_backward,
    host_forward,
    step_backward,
    step_forward,
)

Tensor = torch.Tensor

DOUBLE_BACKWARD_ERROR = (
    "the fused backends (triton, cuda) have no double backward (their backward is marked with "
    "@once_differentiable): differentiate the step twice with backend='reference'"
)


def save(ctx, options: StepOptions, x, h, c, dropout_masks, weights, out, saved) -> None:
    ctx.save_for_backward(x, out, saved, h, c, dropout_masks, *weights)
    # unused outputs (saved always, the state after a stage's last block) get None, not zeros:
    # the kernels skip them, where materialised zeros would cost a fill launch each
    ctx.set_materialize_grads(False)
    ctx.options = options


def _saved_step(ctx) -> SavedStep:
    x, out, saved, h, c, dropout_masks, *weights = ctx.saved_tensors
    return SavedStep(x, out, saved, h, c, dropout_masks, weights, ctx.options)


def _op_kernel_backward(grad_out, grad_h_new, grad_c_new, saved: SavedStep):
    arguments = backward_arguments(grad_out, grad_h_new, grad_c_new, saved)
    return step_backward(*arguments, saved.options.backend)


def weight_grads(grad_weights, saved: SavedStep) -> List[Tensor]:
    """Each weight's gradient in its shape and dtype, from one flat fp32 tensor (views) or one
    fp32 tensor per weight; cast only where the weight is not fp32."""
    views = saved.options.weight_grad_views
    if views is not None and isinstance(grad_weights, Tensor):  # planned: fp32 weights
        base = grad_weights.storage_offset()  # as_strided offsets count from the storage
        if base == 0:
            return [grad_weights.as_strided(*view) for view in views]  # the cheapest views
        return [grad_weights.as_strided(size, stride, base + at) for size, stride, at in views]
    weights = saved.weights
    if isinstance(grad_weights, Tensor):
        grad_weights = grad_weights.split_with_sizes([w.numel() for w in weights])
    return [
        (g if g.shape == w.shape else g.view(w.shape))
        if g.dtype == w.dtype
        else g.view(w.shape).to(w.dtype)
        for g, w in zip(grad_weights, weights)
    ]


def _backward(ctx, grad_out, grad_h_new, grad_c_new, kernel_backward, always_tie=False):
    """[grad_x, grad_h, grad_c, grad_identity or None, *grad of each weight]."""
    if not torch.is_grad_enabled() and not always_tie:  # a plain backward (no create_graph)
        return _gradients(ctx, grad_out, grad_h_new, grad_c_new, kernel_backward)
    with torch.no_grad():
        grads = _gradients(ctx, grad_out, grad_h_new, grad_c_new, kernel_backward)
    sources = (grad_out, grad_h_new, grad_c_new, *ctx.saved_tensors)
    return _tied(grads, [t for t in sources if t is not None], always_tie)


def _gradients(ctx, grad_out, grad_h_new, grad_c_new, kernel_backward):
    saved = _saved_step(ctx)
    if grad_out is None:  # only the state was used downstream
        grad_out = torch.zeros_like(saved.out)
    grad_x, grad_identity, grad_h, grad_c, flat = kernel_backward(
        grad_out, grad_h_new, grad_c_new, saved
    )
    grads = [grad_x, grad_h, grad_c, grad_identity if saved.options.identity_given else None]
    return grads + weight_grads(flat, saved)


def _tied(grads: List[Optional[Tensor]], sources, always: bool) -> List[Optional[Tensor]]:
    """`grads` connected to the tensors they were computed from, so that differentiating them
    raises (a double backward the kernels cannot compute). Outside functorch only sources that
    require grad count: with none, the gradients are constants nothing can differentiate."""
    if not always:
        sources = [t for t in sources if t.requires_grad]
        if not sources:
            return grads
    given = [g for g in grads if g is not None]
    tied = iter(_NoDoubleBackward.apply(len(given), *given, *sources))
    return [None if g is None else next(tied) for g in grads]


def _op_setup_context(ctx, inputs, output):
    x, h, c, weights, identity, relu, activation, dropout_masks, backend = inputs
    options = StepOptions(backend, identity is not None, relu, activation)
    save(ctx, options, x, h, c, dropout_masks, weights, output[0], output[3])


def _op_backward(ctx, grad_out, grad_h_new, grad_c_new, grad_saved):
    grad_x, grad_h, grad_c, grad_identity, *grad_weights = _backward(
        ctx, grad_out, grad_h_new, grad_c_new, _op_kernel_backward
    )
    return grad_x, grad_h, grad_c, grad_weights, grad_identity, None, None, None, None


torch.library.register_autograd(
    "dia_fused::step_forward", _op_backward, setup_context=_op_setup_context
)


class EagerStep(torch.autograd.Function):
    """The custom op's host wrappers and autograd formula without the dispatcher, for eager steps
    on plain tensors. apply(options, x, h, c, identity, dropout_masks, *weights) ->
    (out, h_new, c_new, saved). Written with ctx in forward: a setup_context staticmethod would
    make every apply bind the arguments with inspect.signature, which costs more than the rest of
    the eager route; torch.func transforms, which need setup_context, take FunctorchStep."""

    @staticmethod
    def forward(ctx, options, x, h, c, identity, dropout_masks, *weights):
        out, h_new, c_new, saved = host_forward(
            options.backend, x, h, c, weights, identity, options.relu, options.activation,
            dropout_masks, options.settings, options.launch,
        )  # fmt: skip
        ctx.mark_non_differentiable(saved)
        save(ctx, options, x, h, c, dropout_masks, weights, out, saved)
        return out, h_new, c_new, saved

    @staticmethod
    def backward(ctx, grad_out, grad_h_new, grad_c_new, grad_saved):
        grad_x, grad_h, grad_c, grad_identity, *grad_weights = _backward(
            ctx, grad_out, grad_h_new, grad_c_new, host_backward
        )
        return (None, grad_x, grad_h, grad_c, grad_identity, None, *grad_weights)


# EagerStep.apply without torch.autograd.Function.apply's Python preamble: that detects a
# setup_context (EagerStep has none) and unwraps tensors of finished torch.func transforms, one
# call per argument (the route runs outside transforms, on the tensors the step was given); the
# two cost more than the rest of a recorded step's forward on the host (bench/test_host_overhead).
# What is left is the C++ apply that Function.apply ends with.
apply_eager_step = super(torch.autograd.Function, EagerStep).apply


class FunctorchStep(torch.autograd.Function):
    """The step under torch.func transforms: the same autograd formula as the custom op, written
    with setup_context (which functorch requires) and with its forward and backward through the
    custom ops, whose vmap rules run a batched step one slice at a time. Too slow for every step
    (apply binds the arguments with inspect.signature), right for transforms."""

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
        options = StepOptions(backend, identity is not None, relu, activation)
        save(ctx, options, x, h, c, dropout_masks, weights, output[0], output[3])

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(
            "the fused backends (triton, cuda) have no forward-mode AD "
            "(torch.func.jvp, jacfwd, hessian): use backend='reference'"
        )

    @staticmethod
    def backward(ctx, grad_out, grad_h_new, grad_c_new, grad_saved):
        # grad mode does not tell whether a functorch level above differentiates again: always tie
        grad_x, grad_h, grad_c, grad_identity, *grad_weights = _backward(
            ctx, grad_out, grad_h_new, grad_c_new, _op_kernel_backward, always_tie=True
        )
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
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)
