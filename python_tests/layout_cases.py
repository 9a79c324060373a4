"""Strided, sliced, permuted and mixed-layout inputs of one DIA step, checked against the reference
for a fused backend: the host wrappers address several maps with one set of strides, so every
map must reach the kernels dense in one layout (a view where possible, a copy otherwise), and
nothing may be read or written past a tensor."""

from __future__ import annotations

import torch

from dia_fused import DIALSTM
from dia_fused.testing import max_abs_error

CASES = ["sliced-w", "sliced-c-and-h", "permuted-nhwc-identity-nchw", "size1-dims-odd-strides"]


def _case(case, gen, device):
    """(x_base, identity_base, x, identity): views with the layout of `case` on fresh leaves."""

    def leaf(*shape):
        return (
            torch.randn(*shape, generator=gen, dtype=torch.float64)
            .float()
            .to(device)
            .requires_grad_()
        )

    if case == "sliced-w":  # H stride = W * W stride still holds
        x_base, i_base = leaf(3, 12, 4, 10), leaf(3, 12, 4, 10)
        return x_base, i_base, x_base[..., ::2], i_base[..., ::2]
    if case == "sliced-c-and-h":  # H and W do not collapse into one index
        x_base, i_base = leaf(3, 24, 9, 5), leaf(3, 12, 3, 5)
        return x_base, i_base, x_base[:, ::2, ::3], i_base
    if case == "permuted-nhwc-identity-nchw":
        x_base, i_base = leaf(3, 4, 5, 12), leaf(3, 12, 4, 5)
        return x_base, i_base, x_base.permute(0, 3, 1, 2), i_base
    if case == "size1-dims-odd-strides":  # a W = 1 dim with a stride no layout would give
        x_base, i_base = leaf(2, 12, 7, 1), leaf(2, 12, 7, 1)
        return (
            x_base,
            i_base,
            x_base.as_strided((2, 12, 7, 1), (84, 7, 1, 999)),
            i_base.as_strided((2, 12, 7, 1), (84, 7, 1, 5)),
        )
    raise AssertionError(case)


def check_against_reference(backend: str, case: str, grad_layout: str, device) -> None:
    results = []
    for name in (backend, "reference"):
        gen = torch.Generator().manual_seed(3)
        x_base, i_base, x, identity = _case(case, gen, device)
        unit = DIALSTM(12, reduction=4, backend=name).to(device)
        torch.manual_seed(0)
        for p in unit.parameters():
            torch.nn.init.normal_(p, std=0.3)
        out, (h, c) = unit(x, identity=identity)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).float().to(device)
        if grad_layout == "nhwc":
            grad = grad.contiguous(memory_format=torch.channels_last)
        torch.autograd.backward((out, h), (grad, torch.ones_like(h)))
        results.append(
            [
                out.detach(),
                h.detach(),
                x_base.grad,
                i_base.grad,
                *[p.grad for p in unit.parameters()],
            ]
        )
    for got, want in zip(*results):
        assert max_abs_error(got, want) <= 1e-5 * max(1.0, want.abs().max().item())
