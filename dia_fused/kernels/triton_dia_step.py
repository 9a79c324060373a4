"""Triton backend of the DIA-LSTM step: `forward` / `backward` of the kernel host-wrapper contract
(shared with the CUDA backend; ops.py wraps both in the same custom ops).

Launches per step on the fused path (any number of stacked cells; N, C, H*W of any size):

    forward   1. pool            s = mean_HW x                                   reads x once
              2. LSTM cells      gates -> (h_new, c_new), one program per BLOCK_N samples
              3. scale epilogue  out = relu?(x * a + identity)                   reads x (+ identity) once,
                                 last-pooled rows first (L2)
    backward  1. grad attention  da = sum_HW z * x, writes d_identity = z       reads grad_out, x (+ out)
              2. LSTM backward   recomputes the gates, then dgates, ds, dh, dc per sample tile
              3. weight grads    dW = D^T V over all samples (one program per output tile:
                                 deterministic, no atomics), biases = column sums of D
              4. grad input      dx = z * a + ds / HW      reads d_identity (= z), else grad_out (+ out),
                                 in the reverse of 1.'s order (L2)

That is the fused path (small and CIFAR-sized units, and every stacked-cell unit). One-cell units
with C * C/r >= LSTMConfig.split_min (ImageNet stages 3-4 by default) take the split path instead,
where each LSTM phase is its own launch spread over GEMM-like grids (sample tiles x reduced-width or
channel chunks): forward pool, relu(u), gates, scale (4); backward grad attention, relu(u), gates and
their gradients, du, ds and dh0, weight grads, grad input (7). One program per sample tile would run
all of a large unit's matmuls on a handful of SMs.

The small LSTM runs in fp32 whatever the input dtype (the recurrent state is fp32 for fp32 and half
inputs); its matmuls use `tl.dot` with IEEE fp32 precision (no TF32), so the numbers follow the
fp32 reference. The LSTM kernels walk through the cells in phases that exchange (BLOCK_N, K)
operands through an fp32 workspace (`scratch`, one row per sample, layout in `_ScratchLayout`),
separated by CTA barriers. Maps dense in NCHW or channels_last are addressed in place through
their strides; other strided maps (slices, permutations) are copied once (kernels/layouts.py).
Stacked cells add one launch that packs their weights into one fp32 buffer.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 set before this module is imported.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from . import layouts

Tensor = torch.Tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_CODES = {"sigmoid": 0, "tanh": 1, "relu": 2}
# IEEE fp32 FMA dots follow the fp32 reference; "tf32x3" (tensor cores, ~fp32 accuracy) is for tuning
# on a GPU (bench/tune_triton.py): read once at import, the kernels see it as a compile-time constant
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
DOT_PRECISION = tl.constexpr(os.environ.get("DIA_FUSED_TRITON_DOT_PRECISION") or "ieee")
if DOT_PRECISION.value not in DOT_PRECISIONS:
    raise ValueError(f"DIA_FUSED_TRITON_DOT_PRECISION: expected one of {DOT_PRECISIONS}, got {DOT_PRECISION.value!r}")
# phases of the LSTM kernels (constexpr PHASE): the fused step, or one launch of the split path
PHASE_FUSED, PHASE_REDUCED, PHASE_GATES, PHASE_REDUCED_GRAD, PHASE_INPUT_GRAD = (tl.constexpr(i) for i in range(5))
CELL0_JOBS = 4  # weight-gradient matmuls of cell 0: wih1, wih2, whh1, whh2 (each with its bias)
STACKED_CELL_JOBS = 2  # per stacked cell: wih, whh


def unavailable_reason(device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if device.type == "cpu" and INTERPRETED:
        return None
    return (f"the triton backend runs on CUDA devices (CPU tensors only under the Triton interpreter: "
            f"TRITON_INTERPRET=1 set before dia_fused.kernels is imported), got device {device}")


# ---------------------------------------------------------------------------------------------
# Feature-map kernels: everything that touches (N, C, H, W) tensors.


@triton.jit
def _pool_kernel(
    x_ptr,  # (N, C, H, W) any float dtype, strides below
    pooled_ptr,  # (N, C) fp32, contiguous: mean over H, W
    C, HW,  # channels, H*W
    stride_xn, stride_xc, stride_xhw,  # x strides; stride_xhw = W stride (H stride = W * it)
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # N*C*H*W may pass 2^31
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    base = x_ptr + n * stride_xn + cs[:, None] * stride_xc
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw[None, :] < HW)
        acc += tl.load(base + hw[None, :] * stride_xhw, mask=mask, other=0.0).to(tl.float32)
    tl.store(pooled_ptr + n * C + cs, tl.sum(acc, axis=1) / HW, mask=c_mask)


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
    N, C, HW,
    stride_xn, stride_xc, stride_xhw,  # x and out strides
    stride_in, stride_ic, stride_ihw,  # identity strides
    HAS_IDENTITY: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
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
    grad_a_ptr,  # (N, C) fp32 out: sum over H, W of z * x
    grad_identity_ptr,  # (N, C, H, W) out: z, x's strides (not written without identity)
    C, HW,
    stride_xn, stride_xc, stride_xhw,  # strides shared by grad_out, x, out, grad_identity
    RELU: tl.constexpr, HAS_IDENTITY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # N*C*H*W may pass 2^31
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw[None, :] < HW)
        offsets = n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw
        z = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            z = tl.where(tl.load(out_ptr + offsets, mask=mask, other=0.0) <= 0, 0.0, z)  # relu backward
        if HAS_IDENTITY:
            tl.store(grad_identity_ptr + offsets, z.to(grad_identity_ptr.dtype.element_ty), mask=mask)
        acc += z * tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_a_ptr + n * C + cs, tl.sum(acc, axis=1), mask=c_mask)


@triton.jit
def _grad_input_kernel(
    grad_out_ptr,  # (N, C, H, W), x's strides
    out_ptr,  # (N, C, H, W) forward output (relu mask)
    a_ptr,  # (N, C) fp32 attention
    grad_pooled_ptr,  # (N, C) fp32 gradient of the pooled mean
    grad_x_ptr,  # (N, C, H, W) out, x's dtype and strides: z * a + grad_pooled / HW
    N, C, HW,
    stride_xn, stride_xc, stride_xhw,
    RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
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


# ---------------------------------------------------------------------------------------------
# LSTM kernels: everything on (N, C) tensors. Elementwise helpers first.


@triton.jit
def _relu(v):
    return tl.where(v < 0, 0.0, v)  # like torch.relu: NaN stays NaN


@triton.jit
def _tanh(v):
    return 2.0 * tl.sigmoid(2.0 * v) - 1.0  # no libdevice (the interpreter lacks it); abs error ~1e-7


@triton.jit
def _activation_and_grad(c, ACTIVATION: tl.constexpr):
    """act(c), act'(c) of the output gate: 0 sigmoid, 1 tanh, 2 relu."""
    if ACTIVATION == 0:
        act = tl.sigmoid(c)
        grad = act * (1.0 - act)
    elif ACTIVATION == 1:
        act = _tanh(c)
        grad = 1.0 - act * act
    else:
        act = _relu(c)
        grad = tl.where(c > 0, 1.0, 0.0)
    return act, grad


@triton.jit
def _matmul_tile(
    a_ptr, stride_am, stride_ak,  # A (rows, K) of any float dtype: a_ptr + m * stride_am + k * stride_ak
    b_ptr, stride_bk, stride_bn,  # B (K, cols) of any float dtype
    rows, row_mask,  # (BLOCK_M,) row indices of A and their validity
    cols, col_mask,  # (BLOCK_N,) column indices of B and their validity
    K,  # reduction length
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 tile of A @ B, accumulated over K in BLOCK_K steps with IEEE fp32 dots
    (masked entries are zero, so padding never reaches a stored value)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_tile(
    a_ptr, stride_a,  # A (rows, K), row stride stride_a, unit column stride
    w_ptr,  # W (out, K) contiguous: the nn.Linear weight; rows `cols` of it are used
    b_ptr,  # (out,) bias
    rows, row_mask, cols, col_mask, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A @ W[cols]^T + b[cols]: one (BLOCK_M, BLOCK_N) tile of F.linear(A, W, b)."""
    acc = _matmul_tile(a_ptr, stride_a, 1, w_ptr, 1, K, rows, row_mask, cols, col_mask, K,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    return acc + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _gate_tile(
    a1_ptr, stride_a1, w1_ptr, b1_ptr, k1,  # input path: A1 (rows, k1) and its linear (4C, k1), (4C,)
    a2_ptr, stride_a2, w2_ptr, b2_ptr, k2,  # recurrent path: A2 (rows, k2) and its linear
    rows, row_mask, gate_cols, col_mask,  # gate_cols: q*C + channel indices of one gate chunk
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of the pre-activation gates: linear1(A1) + linear2(A2)."""
    return (_linear_tile(a1_ptr, stride_a1, w1_ptr, b1_ptr, rows, row_mask, gate_cols, col_mask, k1,
                         BLOCK_M, BLOCK_N, BLOCK_K)
            + _linear_tile(a2_ptr, stride_a2, w2_ptr, b2_ptr, rows, row_mask, gate_cols, col_mask, k2,
                           BLOCK_M, BLOCK_N, BLOCK_K))


@triton.jit
def _cells_forward_tile(
    tile,  # index of this program's block of BLOCK_N samples
    u_part, u_parts,  # this program computes reduced-width chunks u_part, u_part + u_parts, ... (if DO_U)
    gate_part, gate_parts,  # and gate column chunks gate_part, gate_part + gate_parts, ... (if DO_GATES)
    ru_slot,  # scratch slot of relu(u): the fused forward's column parts each recompute u into their own
    pooled_ptr,  # (N, C) fp32
    h_ptr, c_ptr,  # (L, N, C) state dtype, contiguous: previous state
    wih1_ptr, bih1_ptr, wih2_ptr, bih2_ptr,  # cell 0 ih path: (R, C), (R,), (4C, R), (4C,)
    whh1_ptr, bhh1_ptr, whh2_ptr, bhh2_ptr,  # cell 0 hh path: same shapes
    stacked_ptr,  # (L-1, 8C^2 + 8C) fp32: [wih (4C, C), bih (4C), whh (4C, C), bhh (4C)] per stacked cell
    masks_ptr,  # (L-1, N, C) dropout keep-masks (scaled) between cells, read if HAS_MASKS
    h_new_ptr, c_new_ptr,  # (L, N, C) out, state dtype; if SAVE: h_new_ptr is the (N, C) fp32 attention
    scratch_ptr,  # (N, S) fp32 workspace
    N, C, R, S,  # samples, channels, reduced width C/r, scratch row length
    off_ru,  # scratch column of relu(u_ih) (R) followed by relu(u_hh) (R); slot k at + 2R k
    off_v0,  # scratch column of the pooled copy (C) and the h[0] copy (C): written if SAVE
    off_vs,  # scratch column of stacked cell 1's [input (C), h copy (C)]; cell l at + 2C (l-1)
    off_gates,  # scratch column of cell 0's pre-activation gates (4C); cell l at + 4C l: written if SAVE
    NUM_CELLS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_MASKS: tl.constexpr, SAVE: tl.constexpr,
    DO_U: tl.constexpr, DO_GATES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The stacked LSTM step for BLOCK_N samples; SAVE keeps in scratch what the backward needs.
    DO_U / DO_GATES select the phases (both: the fused step; one: a launch of the split path)."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    scratch_rows = scratch_ptr + rows[:, None] * S
    off_ru = off_ru + ru_slot * 2 * R
    if DO_U:  # cell 0's reduced paths: relu(W1 v + b1) for v = pooled (ih) and v = h[0] (hh)
        for r0 in range(u_part * BLOCK_R, R, u_parts * BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            rr_mask = row_mask[:, None] & r_mask[None, :]
            u_ih = _linear_tile(pooled_ptr, C, wih1_ptr, bih1_ptr, rows, row_mask, rs, r_mask, C,
                                BLOCK_N, BLOCK_R, BLOCK_K)
            u_hh = _linear_tile(h_ptr, C, whh1_ptr, bhh1_ptr, rows, row_mask, rs, r_mask, C,
                                BLOCK_N, BLOCK_R, BLOCK_K)
            tl.store(scratch_rows + off_ru + rs[None, :], _relu(u_ih), mask=rr_mask)
            tl.store(scratch_rows + off_ru + R + rs[None, :], _relu(u_hh), mask=rr_mask)
        if DO_GATES:
            tl.debug_barrier()  # relu(u) written above is read by other threads of this program below
    if DO_GATES:
        for cell in tl.static_range(NUM_CELLS):
            if cell == 0:  # gates = Wih2 relu(u_ih) + bih2 + Whh2 relu(u_hh) + bhh2
                a1_ptr, w1_ptr, b1_ptr, k1 = scratch_ptr + off_ru, wih2_ptr, bih2_ptr, R
                a2_ptr, stride_a2, w2_ptr, b2_ptr, k2 = scratch_ptr + off_ru + R, S, whh2_ptr, bhh2_ptr, R
            else:  # gates = Wih input + bih + Whh h[cell] + bhh
                cell_w = stacked_ptr + (cell - 1) * (8 * C * C + 8 * C)
                a1_ptr, w1_ptr, b1_ptr, k1 = scratch_ptr + off_vs + (cell - 1) * 2 * C, cell_w, cell_w + 4 * C * C, C
                a2_ptr, stride_a2, k2 = h_ptr + cell * N * C, C, C
                w2_ptr, b2_ptr = cell_w + 4 * C * C + 4 * C, cell_w + 8 * C * C + 4 * C
            for col0 in range(gate_part * BLOCK_C, C, gate_parts * BLOCK_C):
                cs = col0 + tl.arange(0, BLOCK_C)
                c_mask = cs < C
                m = row_mask[:, None] & c_mask[None, :]
                nc = cell * N * C + rows[:, None] * C + cs[None, :]
                if SAVE and cell == 0:  # the V operands of cell 0's weight gradients: pooled, h[0]
                    tl.store(scratch_rows + off_v0 + cs[None, :], tl.load(pooled_ptr + nc, mask=m), mask=m)
                    tl.store(scratch_rows + off_v0 + C + cs[None, :], tl.load(h_ptr + nc, mask=m).to(tl.float32),
                             mask=m)
                gate_i = _gate_tile(a1_ptr, S, w1_ptr, b1_ptr, k1, a2_ptr, stride_a2, w2_ptr, b2_ptr, k2,
                                    rows, row_mask, cs, c_mask, BLOCK_N, BLOCK_C, BLOCK_K)
                gate_f = _gate_tile(a1_ptr, S, w1_ptr, b1_ptr, k1, a2_ptr, stride_a2, w2_ptr, b2_ptr, k2,
                                    rows, row_mask, C + cs, c_mask, BLOCK_N, BLOCK_C, BLOCK_K)
                gate_g = _gate_tile(a1_ptr, S, w1_ptr, b1_ptr, k1, a2_ptr, stride_a2, w2_ptr, b2_ptr, k2,
                                    rows, row_mask, 2 * C + cs, c_mask, BLOCK_N, BLOCK_C, BLOCK_K)
                gate_o = _gate_tile(a1_ptr, S, w1_ptr, b1_ptr, k1, a2_ptr, stride_a2, w2_ptr, b2_ptr, k2,
                                    rows, row_mask, 3 * C + cs, c_mask, BLOCK_N, BLOCK_C, BLOCK_K)
                c_prev = tl.load(c_ptr + nc, mask=m, other=0.0).to(tl.float32)
                c_new = tl.sigmoid(gate_f) * c_prev + tl.sigmoid(gate_i) * _tanh(gate_g)
                act, _ = _activation_and_grad(c_new, ACTIVATION)
                h_new = tl.sigmoid(gate_o) * act
                if not SAVE:
                    tl.store(c_new_ptr + nc, c_new.to(c_new_ptr.dtype.element_ty), mask=m)
                    tl.store(h_new_ptr + nc, h_new.to(h_new_ptr.dtype.element_ty), mask=m)
                elif cell == NUM_CELLS - 1:  # the backward's recomputation keeps only the attention
                    tl.store(h_new_ptr + rows[:, None] * C + cs[None, :], h_new, mask=m)
                if cell + 1 < NUM_CELLS:  # the next cell's input, and its h copy for the weight gradients
                    nxt = scratch_rows + off_vs + cell * 2 * C + cs[None, :]
                    if HAS_MASKS:
                        h_new = h_new * tl.load(masks_ptr + nc, mask=m, other=0.0).to(tl.float32)
                    tl.store(nxt, h_new, mask=m)
                    if SAVE:
                        tl.store(nxt + C, tl.load(h_ptr + nc + N * C, mask=m).to(tl.float32), mask=m)
                if SAVE:
                    gates = scratch_rows + off_gates + cell * 4 * C + cs[None, :]
                    tl.store(gates, gate_i, mask=m)
                    tl.store(gates + C, gate_f, mask=m)
                    tl.store(gates + 2 * C, gate_g, mask=m)
                    tl.store(gates + 3 * C, gate_o, mask=m)
            tl.debug_barrier()


@triton.jit
def _lstm_forward_kernel(
    pooled_ptr, h_ptr, c_ptr,
    wih1_ptr, bih1_ptr, wih2_ptr, bih2_ptr, whh1_ptr, bhh1_ptr, whh2_ptr, bhh2_ptr, stacked_ptr, masks_ptr,
    h_new_ptr, c_new_ptr, scratch_ptr,
    N, C, R, S, off_ru, off_v0, off_vs, off_gates,  # see _cells_forward_tile
    NUM_CELLS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_MASKS: tl.constexpr,
    PHASE: tl.constexpr,  # FUSED: grid (tiles, column parts) each recomputing u into its own slot;
    # REDUCED: grid (tiles, R parts), relu(u) only; GATES: grid (tiles, column parts) reading relu(u)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    part, parts = tl.program_id(1), tl.num_programs(1)
    if PHASE == PHASE_FUSED:  # every column part computes all of u, into its own slot
        u_part, u_parts, ru_slot = 0, 1, part
    else:  # REDUCED splits u over the parts; GATES reads it from the one slot
        u_part, u_parts, ru_slot = part, parts, 0
    _cells_forward_tile(tl.program_id(0), u_part, u_parts, part, parts, ru_slot, pooled_ptr, h_ptr, c_ptr,
                        wih1_ptr, bih1_ptr, wih2_ptr, bih2_ptr, whh1_ptr, bhh1_ptr, whh2_ptr, bhh2_ptr,
                        stacked_ptr, masks_ptr, h_new_ptr, c_new_ptr, scratch_ptr,
                        N, C, R, S, off_ru, off_v0, off_vs, off_gates,
                        NUM_CELLS, ACTIVATION, HAS_MASKS, False, PHASE != PHASE_GATES, PHASE != PHASE_REDUCED,
                        BLOCK_N, BLOCK_C, BLOCK_R, BLOCK_K)


@triton.jit
def _lstm_backward_kernel(
    pooled_ptr, h_ptr, c_ptr,
    wih1_ptr, bih1_ptr, wih2_ptr, bih2_ptr, whh1_ptr, bhh1_ptr, whh2_ptr, bhh2_ptr, stacked_ptr, masks_ptr,
    scratch_ptr,  # (N, S) fp32: filled with the D and V operands of the weight-gradient kernel
    grad_a_ptr,  # (N, C) fp32: gradient of the attention (last cell's h) from the map
    grad_h_new_ptr, grad_c_new_ptr,  # (L, N, C) incoming state gradients, read if HAS_GRAD_H / HAS_GRAD_C
    grad_pooled_ptr,  # (N, C) fp32 out
    attention_ptr,  # (N, C) fp32 out: the recomputed attention (last cell's h), for the input gradient
    grad_h_ptr, grad_c_ptr,  # (L, N, C) out, state dtype: gradients of the previous state
    N, C, R, S, off_ru, off_v0, off_vs, off_gates,  # see _cells_forward_tile
    off_du,  # scratch column of du_ih (R) followed by du_hh (R): gradients of the reduced paths
    off_dgates,  # scratch column of cell 0's gate gradients (4C); cell l at + 4C l
    off_carry,  # scratch column (C) of the gradient flowing into cell l-1's output from cell l
    NUM_CELLS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_MASKS: tl.constexpr,
    HAS_GRAD_H: tl.constexpr, HAS_GRAD_C: tl.constexpr,
    PHASE: tl.constexpr,  # FUSED: everything, grid (tiles,). The split path (one cell; relu(u) in scratch
    # from the forward kernel's REDUCED phase): GATES grid (tiles, column parts): recomputed gates and
    # their gradients; REDUCED_GRAD (tiles, R parts): du; INPUT_GRAD (tiles, column parts): ds, dh0
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    if PHASE == PHASE_FUSED:
        part, parts = 0, 1
    else:
        part, parts = tl.program_id(1), tl.num_programs(1)
    if PHASE == PHASE_FUSED or PHASE == PHASE_GATES:
        _cells_forward_tile(tile, 0, 1, part, parts, 0, pooled_ptr, h_ptr, c_ptr,
                            wih1_ptr, bih1_ptr, wih2_ptr, bih2_ptr, whh1_ptr, bhh1_ptr, whh2_ptr, bhh2_ptr,
                            stacked_ptr, masks_ptr, attention_ptr, attention_ptr, scratch_ptr,
                            N, C, R, S, off_ru, off_v0, off_vs, off_gates,
                            NUM_CELLS, ACTIVATION, HAS_MASKS, True, PHASE == PHASE_FUSED, True,
                            BLOCK_N, BLOCK_C, BLOCK_R, BLOCK_K)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    scratch_rows = scratch_ptr + rows[:, None] * S
    for step in tl.static_range(NUM_CELLS):
        cell = NUM_CELLS - 1 - step
        # pointwise LSTM backward: gate gradients of this cell, and dc_prev
        for col0 in range(part * BLOCK_C, C if PHASE == PHASE_FUSED or PHASE == PHASE_GATES else 0,
                          parts * BLOCK_C):
            cs = col0 + tl.arange(0, BLOCK_C)
            m = row_mask[:, None] & (cs < C)[None, :]
            nc = cell * N * C + rows[:, None] * C + cs[None, :]
            grad_h_cell = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            grad_c_cell = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            if HAS_GRAD_H:
                grad_h_cell += tl.load(grad_h_new_ptr + nc, mask=m, other=0.0).to(tl.float32)
            if HAS_GRAD_C:
                grad_c_cell += tl.load(grad_c_new_ptr + nc, mask=m, other=0.0).to(tl.float32)
            if cell == NUM_CELLS - 1:
                grad_h_cell += tl.load(grad_a_ptr + rows[:, None] * C + cs[None, :], mask=m, other=0.0)
            else:
                grad_h_cell += tl.load(scratch_rows + off_carry + cs[None, :], mask=m, other=0.0)
            gates = scratch_rows + off_gates + cell * 4 * C + cs[None, :]
            sig_i = tl.sigmoid(tl.load(gates, mask=m, other=0.0))
            sig_f = tl.sigmoid(tl.load(gates + C, mask=m, other=0.0))
            tanh_g = _tanh(tl.load(gates + 2 * C, mask=m, other=0.0))
            sig_o = tl.sigmoid(tl.load(gates + 3 * C, mask=m, other=0.0))
            c_prev = tl.load(c_ptr + nc, mask=m, other=0.0).to(tl.float32)
            act, act_grad = _activation_and_grad(sig_f * c_prev + sig_i * tanh_g, ACTIVATION)
            dc = grad_c_cell + grad_h_cell * sig_o * act_grad
            dgates = scratch_rows + off_dgates + cell * 4 * C + cs[None, :]
            tl.store(dgates, dc * tanh_g * sig_i * (1.0 - sig_i), mask=m)
            tl.store(dgates + C, dc * c_prev * sig_f * (1.0 - sig_f), mask=m)
            tl.store(dgates + 2 * C, dc * sig_i * (1.0 - tanh_g * tanh_g), mask=m)
            tl.store(dgates + 3 * C, grad_h_cell * act * sig_o * (1.0 - sig_o), mask=m)
            tl.store(grad_c_ptr + nc, (dc * sig_f).to(grad_c_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()
        dgates_ptr = scratch_ptr + off_dgates + cell * 4 * C  # (N, 4C) rows of stride S
        if cell > 0:  # dh_prev = dgates Whh;  d(input) = dgates Wih, through the dropout mask
            cell_w = stacked_ptr + (cell - 1) * (8 * C * C + 8 * C)
            for col0 in range(0, C, BLOCK_C):
                cs = col0 + tl.arange(0, BLOCK_C)
                c_mask = cs < C
                m = row_mask[:, None] & c_mask[None, :]
                nc = cell * N * C + rows[:, None] * C + cs[None, :]
                grad_h_prev = _matmul_tile(dgates_ptr, S, 1, cell_w + 4 * C * C + 4 * C, C, 1,
                                           rows, row_mask, cs, c_mask, 4 * C, BLOCK_N, BLOCK_C, BLOCK_K)
                tl.store(grad_h_ptr + nc, grad_h_prev.to(grad_h_ptr.dtype.element_ty), mask=m)
                grad_input = _matmul_tile(dgates_ptr, S, 1, cell_w, C, 1,
                                          rows, row_mask, cs, c_mask, 4 * C, BLOCK_N, BLOCK_C, BLOCK_K)
                if HAS_MASKS:
                    grad_input = grad_input * tl.load(masks_ptr + nc - N * C, mask=m, other=0.0).to(tl.float32)
                tl.store(scratch_rows + off_carry + cs[None, :], grad_input, mask=m)
            tl.debug_barrier()
        else:  # the reduced paths: du = (dgates W2) * relu'(u); ds = du_ih Wih1; dh0 = du_hh Whh1
            for r0 in range(part * BLOCK_R, R if PHASE == PHASE_FUSED or PHASE == PHASE_REDUCED_GRAD else 0,
                            parts * BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_mask = rs < R
                rr_mask = row_mask[:, None] & r_mask[None, :]
                du_ih = _matmul_tile(dgates_ptr, S, 1, wih2_ptr, R, 1, rows, row_mask, rs, r_mask, 4 * C,
                                     BLOCK_N, BLOCK_R, BLOCK_K)
                du_hh = _matmul_tile(dgates_ptr, S, 1, whh2_ptr, R, 1, rows, row_mask, rs, r_mask, 4 * C,
                                     BLOCK_N, BLOCK_R, BLOCK_K)
                ru_ih = tl.load(scratch_rows + off_ru + rs[None, :], mask=rr_mask, other=0.0)
                ru_hh = tl.load(scratch_rows + off_ru + R + rs[None, :], mask=rr_mask, other=0.0)
                tl.store(scratch_rows + off_du + rs[None, :], tl.where(ru_ih > 0, du_ih, 0.0), mask=rr_mask)
                tl.store(scratch_rows + off_du + R + rs[None, :], tl.where(ru_hh > 0, du_hh, 0.0), mask=rr_mask)
            tl.debug_barrier()
            for col0 in range(part * BLOCK_C, C if PHASE == PHASE_FUSED or PHASE == PHASE_INPUT_GRAD else 0,
                              parts * BLOCK_C):
                cs = col0 + tl.arange(0, BLOCK_C)
                c_mask = cs < C
                m = row_mask[:, None] & c_mask[None, :]
                nc = rows[:, None] * C + cs[None, :]
                grad_pooled = _matmul_tile(scratch_ptr + off_du, S, 1, wih1_ptr, C, 1, rows, row_mask, cs, c_mask, R,
                                           BLOCK_N, BLOCK_C, BLOCK_K)
                tl.store(grad_pooled_ptr + nc, grad_pooled, mask=m)
                grad_h0 = _matmul_tile(scratch_ptr + off_du + R, S, 1, whh1_ptr, C, 1, rows, row_mask, cs, c_mask, R,
                                       BLOCK_N, BLOCK_C, BLOCK_K)
                tl.store(grad_h_ptr + nc, grad_h0.to(grad_h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _weight_grad_kernel(
    scratch_ptr,  # (N, S) fp32 from _lstm_backward_kernel: the D (output-gradient) and V (input) operands
    grad_w_ptr,  # flat fp32 out: every weight gradient flattened, in reference.weight_names order
    N, C, R, S, off_ru, off_v0, off_vs, off_du, off_dgates,  # see the LSTM kernels
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (job, i, j) writes the (BLOCK_M, BLOCK_K) tile (i, j) of one weight gradient
    dW = D^T V (M, K) summed over all N samples in a fixed order, and its bias gradient (column sums
    of D) when j == 0. Jobs: 0 wih1, 1 wih2, 2 whh1, 3 whh2, then wih_l, whh_l per stacked cell."""
    job = tl.program_id(0)
    cell0_block = R * C + R + 4 * C * R + 4 * C  # numel of one reduced path's 4 tensors
    if job < 4:
        path = job // 2  # 0: ih, 1: hh
        if job % 2 == 0:  # W1 (R, C): D = du, V = pooled | h0
            m_size, k_size = R, C
            d_col, v_col = off_du + path * R, off_v0 + path * C
            out = path * cell0_block
        else:  # W2 (4C, R): D = dgates of cell 0, V = relu(u)
            m_size, k_size = 4 * C, R
            d_col, v_col = off_dgates, off_ru + path * R
            out = path * cell0_block + R * C + R
    else:
        cell = 1 + (job - 4) // 2
        which = (job - 4) % 2  # 0: wih (V = the cell's input), 1: whh (V = its h copy)
        m_size, k_size = 4 * C, C
        d_col, v_col = off_dgates + cell * 4 * C, off_vs + (cell - 1) * 2 * C + which * C
        out = 2 * cell0_block + (job - 4) * (4 * C * C + 4 * C)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = ms < m_size
    k_mask = ks < k_size
    if (tl.program_id(1) * BLOCK_M < m_size) & (tl.program_id(2) * BLOCK_K < k_size):
        # A[m, n] = D[n, m] (D^T), B[n, k] = V[n, k]; the reduction runs over the samples
        grad_w = _matmul_tile(scratch_ptr + d_col, 1, S, scratch_ptr + v_col, S, 1, ms, m_mask, ks, k_mask, N,
                              BLOCK_M, BLOCK_K, BLOCK_N)
        tl.store(grad_w_ptr + out + ms[:, None] * k_size + ks[None, :], grad_w,
                 mask=m_mask[:, None] & k_mask[None, :])
        if tl.program_id(2) == 0:
            grad_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                ns = n0 + tl.arange(0, BLOCK_N)
                d = tl.load(scratch_ptr + d_col + ns[:, None] * S + ms[None, :],
                            mask=(ns < N)[:, None] & m_mask[None, :], other=0.0)
                grad_b += tl.sum(d, axis=0)
            tl.store(grad_w_ptr + out + m_size * k_size + ms, grad_b, mask=m_mask)


# ---------------------------------------------------------------------------------------------
# Host wrappers.


# Host-side arithmetic in plain Python: triton.cdiv / next_power_of_2 are constexpr functions that
# cost microseconds per call on the host, and the launch plan is recomputed every step.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _map_strides(t: Tensor) -> Tuple[int, int, int]:
    """(n, c, hw) strides of a map whose H and W collapse into one index (NCHW or channels_last)."""
    sn, sc, sh, sw = t.stride()
    if t.shape[2] > 1 and sh != t.shape[3] * sw:
        raise ValueError(f"x: expected a contiguous or channels_last layout (H stride = W * W stride), "
                         f"got strides {t.stride()}")
    return sn, sc, sw


def _config_from_env(cls, env_name: str, text: Optional[str], minimums: dict):
    """cls() with the fields named in `text` ("name=int,...", from env_name) replaced; each field of
    `minimums` must be a power of 2 at least its minimum."""
    config = cls()
    if not text:
        return config
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields or not value.strip().isdigit():
            raise ValueError(f"{env_name}: expected comma-separated name=int with names {sorted(fields)}, got {text!r}")
        values[key] = int(value)
    config = dataclasses.replace(config, **values)
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if value < minimum or value & (value - 1):
            raise ValueError(f"{env_name}: {name} must be a power of 2 >= {minimum}, got {value}")
    return config


@dataclass(frozen=True)
class MapConfig:
    """Tiles of the feature-map kernels (pool, scale, grad attention, grad input): at most `tile`
    elements (registers), wide along the map's contiguous axis so that loads coalesce: up to
    `hw_block` positions of H*W in NCHW, up to `c_block` channels in channels_last (64 fp32
    channels = 256 B rows: whole sectors). bench/tune_triton.py times alternatives through the
    environment variable DIA_FUSED_TRITON_MAP ("tile=8192,num_warps=8")."""
    tile: int = 4096
    hw_block: int = 64 if INTERPRETED else 256  # the interpreter is fastest with small tiles
    c_block: int = 64
    num_warps: int = 4

    @staticmethod
    def from_env(text: Optional[str]) -> "MapConfig":
        return _config_from_env(MapConfig, ENV_MAP_CONFIG, text,
                                {"tile": 16, "hw_block": 1, "c_block": 1, "num_warps": 1})


@functools.lru_cache(maxsize=1024)
def _map_blocks(channels: int, hw: int, channels_last: bool, config: "MapConfig") -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) tile of the map kernels for this map (see MapConfig)."""
    if channels_last:
        block_c = min(_next_power_of_2(channels), config.c_block)
        return block_c, max(1, min(_next_power_of_2(hw), config.tile // block_c))
    block_hw = min(_next_power_of_2(hw), config.hw_block, config.tile)
    return max(1, min(_next_power_of_2(channels), config.tile // block_hw, config.c_block)), block_hw


@dataclass(frozen=True)
class LSTMConfig:
    """Launch configuration of the LSTM kernels. The defaults come from the sm_90 resource report
    (python_tests/triton_aot.py: no register spills); bench/tune_triton.py times alternatives on a
    GPU through the environment variable DIA_FUSED_TRITON_LSTM ("block_n=32,num_warps=4,...")."""
    block_n: int = 16  # samples per program (tl.dot needs >= 16)
    block_c: int = 64  # most gate columns per tile
    block_r: int = 64  # most reduced-width columns per tile
    block_k: int = 32  # reduction step of the matmuls
    num_warps: int = 8  # 4 warps spill on sm_90 (255 registers + 88-184 B of stack)
    forward_groups: int = 4  # most column groups of the one-cell fused forward (programs per sample tile)
    split_min: int = 65536  # one-cell steps with C * C/r at least this take the split path (GEMM-like grids)

    @staticmethod
    def from_env(text: Optional[str]) -> "LSTMConfig":
        return _config_from_env(LSTMConfig, ENV_LSTM_CONFIG, text,
                                {"block_n": 16, "block_c": 16, "block_r": 16, "block_k": 16})


ENV_LSTM_CONFIG = "DIA_FUSED_TRITON_LSTM"
ENV_MAP_CONFIG = "DIA_FUSED_TRITON_MAP"
LSTM_CONFIG = LSTMConfig.from_env(os.environ.get(ENV_LSTM_CONFIG))
MAP_CONFIG = MapConfig.from_env(os.environ.get(ENV_MAP_CONFIG))


@dataclass(frozen=True)
class _LSTMBlocks:
    n: int  # samples per LSTM program
    c: int  # channel columns per gate tile
    r: int  # reduced-width columns per tile
    k: int  # reduction step of the matmuls
    num_warps: int

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def of(channels: int, hidden: int, config: LSTMConfig) -> "_LSTMBlocks":
        # the interpreter is fastest with few, wide steps
        k = 64 if INTERPRETED else config.block_k
        return _LSTMBlocks(n=config.block_n, c=max(16, min(config.block_c, _next_power_of_2(channels))),
                           r=max(16, min(config.block_r, _next_power_of_2(hidden))), k=k,
                           num_warps=config.num_warps)

    def forward_groups(self, channels: int, num_cells: int, config: LSTMConfig) -> int:
        """Programs per sample tile in the forward: the gate columns split between them, each
        recomputing the cheap reduced paths (~1/4 of a cell's work) for itself. Stacked cells need
        all columns of a cell before the next one: one group."""
        return 1 if num_cells > 1 else max(1, min(config.forward_groups, _cdiv(channels, self.c)))

    def kwargs(self):
        return dict(BLOCK_N=self.n, BLOCK_C=self.c, BLOCK_R=self.r, BLOCK_K=self.k, num_warps=self.num_warps)


@dataclass(frozen=True)
class _ScratchLayout:
    """Columns of the (N, size) fp32 workspace of the LSTM kernels (one row per sample). The
    backward keeps, per sample, the D (output-gradient) and V (input) operands of every weight
    gradient dW = D^T V, read by _weight_grad_kernel:

        du    du_ih | du_hh                  (R each)   D of wih1 | whh1
        ru    relu(u_ih) | relu(u_hh)        (R each)   V of wih2 | whh2
        v0    pooled | h[0]                  (C each)   V of wih1 | whh1
        dgates  cell 0 .. L-1                (4C each)  D of wih2, whh2 (cell 0), wih_l, whh_l
        vs    cell 1 .. L-1: input | h[l]    (C each)   V of wih_l | whh_l
        gates cell 0 .. L-1                  (4C each)  pre-activations, recomputed
        carry                                (C)        d(input of cell l) flowing into cell l-1
    The forward needs only ru and the inputs of the stacked cells."""
    du: int = 0
    ru: int = 0
    v0: int = 0
    dgates: int = 0
    vs: int = 0
    gates: int = 0
    carry: int = 0
    size: int = 0

    @staticmethod
    def forward(channels: int, hidden: int, num_cells: int, groups: int) -> "_ScratchLayout":
        ru_size = 2 * hidden * groups  # one slot per column group
        return _ScratchLayout(ru=0, vs=ru_size, size=ru_size + 2 * channels * (num_cells - 1))

    @staticmethod
    def backward(channels: int, hidden: int, num_cells: int) -> "_ScratchLayout":
        ru, v0, dgates = 2 * hidden, 4 * hidden, 4 * hidden + 2 * channels
        vs = dgates + 4 * channels * num_cells
        gates = vs + 2 * channels * (num_cells - 1)
        carry = gates + 4 * channels * num_cells
        return _ScratchLayout(du=0, ru=ru, v0=v0, dgates=dgates, vs=vs, gates=gates, carry=carry,
                              size=carry + channels)


_PHASE = tuple(p.value for p in (PHASE_FUSED, PHASE_REDUCED, PHASE_GATES, PHASE_REDUCED_GRAD, PHASE_INPUT_GRAD))


def _split_path(channels: int, hidden: int, num_cells: int) -> bool:
    """Large one-cell steps run the LSTM as several GEMM-like launches (every phase spread over the
    reduced-width or channel chunks) instead of one program per sample tile doing all of it."""
    return num_cells == 1 and channels * hidden >= LSTM_CONFIG.split_min


def _like_x(x: Tensor) -> Tensor:
    return torch.empty_like(x)  # x is canonical (dense): empty_like keeps its exact strides


MAX_GRID_X = 2**31 - 1  # CUDA's limit on the first grid dimension: the elementwise kernels' 1-D grid


def _elementwise_grid(n: int, channels: int, hw: int, block_c: int, block_hw: int) -> Tuple[int]:
    return (n * _cdiv(channels, block_c) * _cdiv(hw, block_hw),)


def _check(x: Tensor) -> None:
    """Before any copy of the map: the dtype, and a map the elementwise kernels' grid can cover."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: the triton backend supports {SUPPORTED_DTYPES}, got {x.dtype}")
    n, channels, height, width = x.shape
    block_c, block_hw = _map_blocks(channels, height * width, layouts.is_channels_last(x), MAP_CONFIG)  # as canonical()
    (programs,) = _elementwise_grid(n, channels, height * width, block_c, block_hw)
    if programs > MAX_GRID_X:
        raise ValueError(f"x: {programs} tiles of {block_c} channels x {block_hw} positions are more than the triton "
                         f"backend's map kernels cover ({MAX_GRID_X}), got shape {tuple(x.shape)}; use "
                         f"backend='reference' for such maps")


def _lstm_operands(pooled: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor],
                   dropout_masks: Optional[Tensor]):
    """Kernel operands of the LSTM kernels: contiguous state, the 8 cell-0 tensors, the stacked
    cells packed into one fp32 buffer (one copy, only when there are stacked cells) and the masks."""
    cell0 = [w.contiguous() for w in weights[:reference.CELL0_WEIGHTS]]
    stacked = (torch.cat([w.reshape(-1).float() for w in weights[reference.CELL0_WEIGHTS:]])
               if len(weights) > reference.CELL0_WEIGHTS else pooled)
    masks = dropout_masks.contiguous() if dropout_masks is not None else pooled
    return [pooled, h.contiguous(), c.contiguous(), *cell0, stacked, masks]


def forward(x: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], identity: Optional[Tensor],
            relu: bool, activation: str, dropout_masks: Optional[Tensor]
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, h_new, c_new, pooled) of one DIA step; out laid out like x, pooled (N, C) fp32."""
    _check(x)
    x = layouts.canonical(x)
    identity = None if identity is None else layouts.canonical(identity)
    n, channels, height, width = x.shape
    hw, num_cells, hidden = height * width, h.shape[0], weights[0].shape[0]
    pooled = torch.empty((n, channels), device=x.device, dtype=torch.float32)
    h_new = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    c_new = torch.empty(c.shape, device=c.device, dtype=c.dtype)
    out = _like_x(x)
    if n == 0:
        return out, h_new, c_new, pooled
    strides = _map_strides(x)
    block_c, block_hw = _map_blocks(channels, hw, layouts.is_channels_last(x), MAP_CONFIG)
    _pool_kernel[(n, _cdiv(channels, block_c))](x, pooled, channels, hw, *strides,
                                                BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=MAP_CONFIG.num_warps)
    blocks = _LSTMBlocks.of(channels, hidden, LSTM_CONFIG)
    tiles = _cdiv(n, blocks.n)
    split = _split_path(channels, hidden, num_cells)
    groups = 1 if split else blocks.forward_groups(channels, num_cells, LSTM_CONFIG)
    layout = _ScratchLayout.forward(channels, hidden, num_cells, groups)
    scratch = torch.empty((n, layout.size), device=x.device, dtype=torch.float32)
    operands = _lstm_operands(pooled, h, c, weights, dropout_masks)
    phases = ([(_PHASE[1], _cdiv(hidden, blocks.r)), (_PHASE[2], _cdiv(channels, blocks.c))]
              if split else [(_PHASE[0], groups)])
    for phase, parts in phases:
        _lstm_forward_kernel[(tiles, parts)](
            *operands, h_new, c_new, scratch,
            n, channels, hidden, layout.size, layout.ru, layout.v0, layout.vs, layout.gates,
            NUM_CELLS=num_cells, ACTIVATION=ACTIVATION_CODES[activation], HAS_MASKS=dropout_masks is not None,
            PHASE=phase, **blocks.kwargs())
    idt = identity if identity is not None else x
    grid = _elementwise_grid(n, channels, hw, block_c, block_hw)
    _scale_kernel[grid](x, h_new[-1], idt, out, n, channels, hw, *strides, *_map_strides(idt),
                        HAS_IDENTITY=identity is not None, RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw,
                        num_warps=MAP_CONFIG.num_warps)
    return out, h_new, c_new, pooled


def backward(grad_out: Tensor, grad_h_new: Optional[Tensor], grad_c_new: Optional[Tensor],
             x: Tensor, out: Tensor, pooled: Tensor, h: Tensor, c: Tensor,
             weights: Sequence[Tensor], identity_given: bool, relu: bool, activation: str,
             dropout_masks: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """(grad_x, grad_identity or None, grad_h, grad_c, grad_weights): grad_weights is ONE flat fp32
    tensor, every weight's gradient flattened in weight order (ops.py splits it into views)."""
    x = layouts.canonical(x)  # as the forward saw it: `out` has these strides
    n, channels, height, width = x.shape
    hw, num_cells, hidden = height * width, h.shape[0], weights[0].shape[0]
    grad_out, out = layouts.in_layout_of(grad_out, x), layouts.in_layout_of(out, x)
    grad_x = _like_x(x)
    grad_identity = _like_x(x) if identity_given else None
    grad_h = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    grad_c = torch.empty(c.shape, device=c.device, dtype=c.dtype)
    grad_weights = torch.empty(sum(w.numel() for w in weights), device=x.device, dtype=torch.float32)
    layout = _ScratchLayout.backward(channels, hidden, num_cells)
    scratch = torch.empty((n, layout.size), device=x.device, dtype=torch.float32)
    strides = _map_strides(x)
    block_c, block_hw = _map_blocks(channels, hw, layouts.is_channels_last(x), MAP_CONFIG)
    if n:
        grad_a = torch.empty((n, channels), device=x.device, dtype=torch.float32)
        _grad_attention_kernel[(n, _cdiv(channels, block_c))](
            grad_out, x, out, grad_a, grad_identity if identity_given else grad_a, channels, hw, *strides,
            RELU=relu, HAS_IDENTITY=identity_given, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=MAP_CONFIG.num_warps)
        blocks = _LSTMBlocks.of(channels, hidden, LSTM_CONFIG)
        grad_pooled = torch.empty((n, channels), device=x.device, dtype=torch.float32)
        attention = torch.empty((n, channels), device=x.device, dtype=torch.float32)
        tiles = _cdiv(n, blocks.n)
        operands = _lstm_operands(pooled, h, c, weights, dropout_masks)
        options = dict(NUM_CELLS=num_cells, ACTIVATION=ACTIVATION_CODES[activation],
                       HAS_MASKS=dropout_masks is not None, **blocks.kwargs())
        r_parts, c_parts = _cdiv(hidden, blocks.r), _cdiv(channels, blocks.c)
        if _split_path(channels, hidden, num_cells):  # relu(u) first, by the forward kernel's phase
            _lstm_forward_kernel[(tiles, r_parts)](
                *operands, grad_a, grad_a, scratch, n, channels, hidden, layout.size, layout.ru, layout.v0,
                layout.vs, layout.gates, PHASE=_PHASE[1], **options)
            phases = [(_PHASE[2], c_parts), (_PHASE[3], r_parts), (_PHASE[4], c_parts)]
        else:
            phases = [(_PHASE[0], 1)]
        for phase, parts in phases:
            _lstm_backward_kernel[(tiles, parts)](
                *operands, scratch, grad_a,
                grad_a if grad_h_new is None else grad_h_new.contiguous(),
                grad_a if grad_c_new is None else grad_c_new.contiguous(),
                grad_pooled, attention, grad_h, grad_c,
                n, channels, hidden, layout.size, layout.ru, layout.v0, layout.vs, layout.gates,
                layout.du, layout.dgates, layout.carry,
                HAS_GRAD_H=grad_h_new is not None, HAS_GRAD_C=grad_c_new is not None, PHASE=phase, **options)
    # over an empty batch this writes zeros: the gradient of a sum over no samples
    wg_m, wg_k, wg_n = (64, 64, 64) if INTERPRETED else (64, 64, 32)
    jobs = CELL0_JOBS + STACKED_CELL_JOBS * (num_cells - 1)
    _weight_grad_kernel[(jobs, _cdiv(4 * channels, wg_m), _cdiv(max(channels, hidden), wg_k))](
        scratch, grad_weights, n, channels, hidden, layout.size, layout.ru, layout.v0, layout.vs, layout.du,
        layout.dgates, BLOCK_M=wg_m, BLOCK_K=wg_k, BLOCK_N=wg_n, num_warps=8)
    if n:
        grid = _elementwise_grid(n, channels, hw, block_c, block_hw)
        # with an identity, d_identity already holds z = relu-masked grad_out (exactly: masking
        # keeps values), so one map is read instead of two (grad_out and the forward output)
        z, z_mask_source = (grad_identity, grad_identity) if identity_given else (grad_out, out)
        _grad_input_kernel[grid](z, z_mask_source, attention, grad_pooled, grad_x, n, channels, hw,
                                 *strides, RELU=relu and not identity_given, BLOCK_C=block_c, BLOCK_HW=block_hw,
                                 num_warps=MAP_CONFIG.num_warps)
    return grad_x, grad_identity, grad_h, grad_c, grad_weights

