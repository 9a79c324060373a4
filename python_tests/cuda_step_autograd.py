"""A torch.autograd.Function over the CUDA backend's host wrapper (forward / backward of the
contract in docs/design.md §2), with the signature of reference.dia_lstm_step, so that the tests
can run dia_fused.testing.compare_backend on the wrapper directly, whatever ops.py does with it."""
from __future__ import annotations

import torch

from dia_fused.kernels import cuda_dia_step


class _CudaStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, path, relu, activation, dropout_masks, identity, x, h, c, *weights):
        out, h_new, c_new, pooled = cuda_dia_step.forward(
            x, h, c, list(weights), identity, relu, activation, dropout_masks, path=path)
        ctx.save_for_backward(x, out, pooled, h, c, dropout_masks, *weights)
        ctx.options = (path, relu, activation, identity is not None)
        return out, h_new, c_new

    @staticmethod
    def backward(ctx, grad_out, grad_h_new, grad_c_new):
        x, out, pooled, h, c, dropout_masks, *weights = ctx.saved_tensors
        path, relu, activation, identity_given = ctx.options
        grad_x, grad_identity, grad_h, grad_c, grad_weights = cuda_dia_step.backward(
            grad_out, grad_h_new, grad_c_new, x, out, pooled, h, c, weights, identity_given,
            relu, activation, dropout_masks, path=path)
        return (None, None, None, None, grad_identity, grad_x, grad_h, grad_c, *grad_weights)


def cuda_step(path: str = "auto"):
    """step(x, h, c, weights, identity=None, relu=False, activation="sigmoid", dropout_masks=None)
    -> (out, h_new, c_new) through cuda_dia_step.forward / backward on the given path."""
    def step(x, h, c, weights, identity=None, relu=False, activation="sigmoid", dropout_masks=None):
        return _CudaStep.apply(path, relu, activation, dropout_masks, identity, x, h, c, *weights)
    return step
