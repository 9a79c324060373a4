"""Triton kernels over the feature maps (N, C, H, W) of the DIA step: pool, scale epilogue, grad
attention, grad input. Each walks H * W as one strided axis (maps dense in NCHW or
channels_last); the host wrappers are in host.py, the step's math in docs/design.md §1."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pool_kernel(
    x_ptr,  # (N, C, H, W) any float dtype, strides below
    pooled_ptr,  # (N, C) fp32, contiguous: mean over H, W; with HW splits (splits, N, C) sums
    N,
    C,
    HW,  # channels, H*W
    hw_per_split,  # positions of H*W per program along grid axis 2 (a multiple of BLOCK_HW)
    scale,  # 1 / HW, or 1 for the partial sums of a split H*W (_sum_splits_kernel scales)
    stride_xn,
    stride_xc,
    stride_xhw,  # x strides; stride_xhw = W stride (H stride = W * it)
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # N*C*H*W may pass 2^31
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_mask = cs < C
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    base = x_ptr + n * stride_xn + cs[:, None] * stride_xc
    end = tl.minimum(HW, (split + 1) * hw_per_split)
    for start in range(split * hw_per_split, end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw[None, :] < end)
        acc += tl.load(base + hw[None, :] * stride_xhw, mask=mask, other=0.0).to(tl.float32)
    tl.store(pooled_ptr + (split * N + n) * C + cs, tl.sum(acc, axis=1) * scale, mask=c_mask)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,  # (splits, M) fp32: per-split sums of a map reduction split over H*W
    out_ptr,  # (M,) fp32: their sum in split order (deterministic), times scale
    M,
    splits,
    scale,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < M
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(partial_ptr + split * M + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, acc * scale, mask=mask)


@triton.jit
def _elementwise_tile(N, C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(n, channel indices, hw indices) of this program of an elementwise map kernel. Its 1-D grid
    of N * C-blocks * HW-blocks tiles runs in the reverse of the order in which the reducing kernel
    before it (pool, grad attention: grid (N, C-blocks), n fastest, each program over all H*W) read
    the map: the rows read last, the likeliest to be still in L2, are re-read first."""
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    pid = tl.program_id(0)
    row = N * tl.cdiv(C, BLOCK_C) - 1 - pid // hw_blocks  # the reducing kernel's program, reversed
    n = (row % N).to(tl.int64)  # N*C*H*W may pass 2^31
    cs = (row // N) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (pid % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return n, cs, hw


@triton.jit
def _scale_kernel(
    x_ptr,  # (N, C, H, W)
    a_ptr,  # (N, C) fp32 attention, contiguous
    identity_ptr,  # (N, C, H, W) or x_ptr when HAS_IDENTITY is False (not read)
    out_ptr,  # (N, C, H, W) x's dtype, x's strides
    N,
    C,
    HW,
    stride_xn,
    stride_xc,
    stride_xhw,  # x and out strides
    stride_in,
    stride_ic,
    stride_ihw,  # identity strides
    HAS_IDENTITY: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    n, cs, hw = _elementwise_tile(N, C, HW, BLOCK_C, BLOCK_HW)  # 1-D grid, see there
    mask = (cs[:, None] < C) & (hw[None, :] < HW)
    offsets = n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw
    a = tl.load(a_ptr + n * C + cs, mask=cs < C, other=0.0)
    y = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * a[:, None]
    if HAS_IDENTITY:
        i_offsets = n * stride_in + cs[:, None] * stride_ic + hw[None, :] * stride_ihw
        y += tl.load(identity_ptr + i_offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # like torch.relu: NaN stays NaN
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_attention_kernel(
    grad_out_ptr,  # (N, C, H, W) upstream gradient, x's strides
    x_ptr,  # (N, C, H, W)
    out_ptr,  # (N, C, H, W) forward output (relu mask)
    grad_a_ptr,  # (N, C) fp32 out: sum over H, W of z * x; with HW splits (splits, N, C) sums
    grad_identity_ptr,  # (N, C, H, W) out: z, x's strides (not written without identity)
    N,
    C,
    HW,
    hw_per_split,  # positions of H*W per program along grid axis 2 (a multiple of BLOCK_HW)
    stride_xn,
    stride_xc,
    stride_xhw,  # strides shared by grad_out, x, out, grad_identity
    RELU: tl.constexpr,
    HAS_IDENTITY: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # N*C*H*W may pass 2^31
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_mask = cs < C
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    end = tl.minimum(HW, (split + 1) * hw_per_split)
    for start in range(split * hw_per_split, end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw[None, :] < end)
        offsets = n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw
        z = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            z = tl.where(
                tl.load(out_ptr + offsets, mask=mask, other=0.0) <= 0, 0.0, z
            )  # relu backward
        if HAS_IDENTITY:
            tl.store(
                grad_identity_ptr + offsets, z.to(grad_identity_ptr.dtype.element_ty), mask=mask
            )
        acc += z * tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_a_ptr + (split * N + n) * C + cs, tl.sum(acc, axis=1), mask=c_mask)


@triton.jit
def _grad_input_kernel(
    grad_out_ptr,  # (N, C, H, W), x's strides
    out_ptr,  # (N, C, H, W) forward output (relu mask)
    a_ptr,  # (N, C) fp32 attention
    grad_pooled_ptr,  # (N, C) fp32 gradient of the pooled mean
    grad_x_ptr,  # (N, C, H, W) out, x's dtype and strides: z * a + grad_pooled / HW
    N,
    C,
    HW,
    stride_xn,
    stride_xc,
    stride_xhw,
    RELU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    n, cs, hw = _elementwise_tile(N, C, HW, BLOCK_C, BLOCK_HW)  # 1-D grid, see there
    c_mask = cs < C
    mask = c_mask[:, None] & (hw[None, :] < HW)
    offsets = n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw
    z = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.where(tl.load(out_ptr + offsets, mask=mask, other=0.0) <= 0, 0.0, z)  # relu backward
    a = tl.load(a_ptr + n * C + cs, mask=c_mask, other=0.0)
    gp = tl.load(grad_pooled_ptr + n * C + cs, mask=c_mask, other=0.0)
    gx = z * a[:, None] + gp[:, None] / HW
    tl.store(grad_x_ptr + offsets, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
