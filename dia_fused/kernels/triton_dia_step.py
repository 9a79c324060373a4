"""Triton backend of the DIA-LSTM step: `forward` / `backward` of the kernel host-wrapper contract
(shared with the CUDA backend; ops.py wraps both in the same custom ops).

This first version fuses the passes over the feature map, which carry all of the step's bytes:

    forward:  pool (1 kernel: mean over H, W)  ->  LSTM cells (fp32 torch ops on (N, C) tensors)
              ->  scale epilogue (1 kernel: out = relu?(x * a + identity))
    backward: attention-gradient reduction (1 kernel: da = sum_HW z * x, and d_identity = z)
              ->  LSTM backward (recomputed from pooled, h, c; fp32 torch autograd on (N, C) tensors)
              ->  input gradient (1 kernel: dx = z * a + ds / HW)

x is read once per pass; contiguous and channels_last layouts are both addressed through strides
(flat H*W index times the W stride), so no copy of the map is made. The small LSTM in between is
still several launches; fusing it into the pool and epilogue kernels is the next step (issue 3).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 set before this module is imported.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import lstm_cells

Tensor = torch.Tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if device.type == "cpu" and INTERPRETED:
        return None
    return (f"the triton backend runs on CUDA devices (CPU tensors only under the Triton interpreter: "
            f"TRITON_INTERPRET=1 set before dia_fused.kernels is imported), got device {device}")


@triton.jit
def _pool_kernel(
    x_ptr,  # (N, C, H, W) any float dtype, strides below
    pooled_ptr,  # (N, C) fp32, contiguous: mean over H, W
    C, HW,  # channels, H*W
    stride_xn, stride_xc, stride_xhw,  # x strides; stride_xhw = W stride (H stride = W * it)
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
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
def _scale_kernel(
    x_ptr,  # (N, C, H, W)
    a_ptr,  # (N, C) fp32 attention, contiguous
    identity_ptr,  # (N, C, H, W) or x_ptr when HAS_IDENTITY is False (not read)
    out_ptr,  # (N, C, H, W) x's dtype, x's strides
    C, HW,
    stride_xn, stride_xc, stride_xhw,  # x and out strides
    stride_in, stride_ic, stride_ihw,  # identity strides
    HAS_IDENTITY: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
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
    n = tl.program_id(0)
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
    C, HW,
    stride_xn, stride_xc, stride_xhw,
    RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
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


def _map_strides(t: Tensor) -> Tuple[int, int, int]:
    """(n, c, hw) strides of a map whose H and W collapse into one index (NCHW or channels_last)."""
    sn, sc, sh, sw = t.stride()
    if t.shape[2] > 1 and sh != t.shape[3] * sw:
        raise ValueError(f"x: expected a contiguous or channels_last layout (H stride = W * W stride), "
                         f"got strides {t.stride()}")
    return sn, sc, sw


def _blocks(channels: int, hw: int) -> Tuple[int, int]:
    """Tile of (channels, H*W): wide along the contiguous H*W of NCHW maps, capped for registers."""
    block_hw = min(triton.next_power_of_2(hw), 256 if not INTERPRETED else 64)
    block_c = max(1, min(triton.next_power_of_2(channels), 4096 // block_hw, 64))
    return block_c, block_hw


def _like_x(x: Tensor, dtype=None) -> Tensor:
    return torch.empty_like(x, dtype=dtype)  # keeps x's layout (contiguous or channels_last)


def _check(x: Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: the triton backend supports {SUPPORTED_DTYPES}, got {x.dtype}")


def forward(x: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], identity: Optional[Tensor],
            relu: bool, activation: str, dropout_masks: Optional[Tensor]
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, h_new, c_new, pooled) of one DIA step; out laid out like x, pooled (N, C) fp32."""
    _check(x)
    n, channels, height, width = x.shape
    hw = height * width
    strides = _map_strides(x)
    block_c, block_hw = _blocks(channels, hw)
    pooled = torch.empty((n, channels), device=x.device, dtype=torch.float32)
    if n:
        _pool_kernel[(n, triton.cdiv(channels, block_c))](x, pooled, channels, hw, *strides,
                                                          BLOCK_C=block_c, BLOCK_HW=block_hw)
    h_new, c_new, _ = _cells(pooled, h, c, weights, activation, dropout_masks)
    attention = h_new[-1].float().contiguous()
    out = _like_x(x)
    if n:
        idt = identity if identity is not None else x
        grid = (n, triton.cdiv(channels, block_c), triton.cdiv(hw, block_hw))
        _scale_kernel[grid](x, attention, idt, out, channels, hw, *strides, *_map_strides(idt),
                            HAS_IDENTITY=identity is not None, RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return out, h_new, c_new, pooled


def _cells(pooled, h, c, weights, activation, dropout_masks):
    """The small LSTM step in fp32; returns (h_new, c_new, saved-for-backward) in the state dtype."""
    masks = None if dropout_masks is None else dropout_masks.float()
    h_new, c_new, saved = lstm_cells.cells_forward(pooled, h.float(), c.float(), [w.float() for w in weights],
                                                   activation, masks)
    return h_new.to(h.dtype), c_new.to(c.dtype), saved


def backward(grad_out: Tensor, grad_h_new: Optional[Tensor], grad_c_new: Optional[Tensor],
             x: Tensor, out: Tensor, pooled: Tensor, h: Tensor, c: Tensor,
             weights: Sequence[Tensor], identity_given: bool, relu: bool, activation: str,
             dropout_masks: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, List[Tensor]]:
    """(grad_x, grad_identity or None, grad_h, grad_c, grad_weights in weight order)."""
    n, channels, height, width = x.shape
    hw = height * width
    strides = _map_strides(x)
    if grad_out.stride() != x.stride():
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    block_c, block_hw = _blocks(channels, hw)
    grad_a = torch.empty((n, channels), device=x.device, dtype=torch.float32)
    grad_identity = _like_x(x) if identity_given else None
    if n:
        _grad_attention_kernel[(n, triton.cdiv(channels, block_c))](
            grad_out, x, out, grad_a, grad_identity if identity_given else grad_a, channels, hw, *strides,
            RELU=relu, HAS_IDENTITY=identity_given, BLOCK_C=block_c, BLOCK_HW=block_hw)
    # LSTM backward by recomputation from (pooled, h, c, weights), in fp32
    h_new, _, saved = _cells(pooled, h, c, weights, activation, dropout_masks)
    grad_h_total = torch.zeros_like(h, dtype=torch.float32) if grad_h_new is None else grad_h_new.float().clone()
    grad_h_total[-1] += grad_a
    grad_c_total = torch.zeros_like(c, dtype=torch.float32) if grad_c_new is None else grad_c_new.float()
    masks = None if dropout_masks is None else dropout_masks.float()
    grad_pooled, grad_h, grad_c, grad_weights = lstm_cells.cells_backward(
        grad_h_total, grad_c_total, h.float(), c.float(), [w.float() for w in weights], activation, masks, saved)
    attention = h_new[-1].float().contiguous()
    grad_x = _like_x(x)
    if n:
        grid = (n, triton.cdiv(channels, block_c), triton.cdiv(hw, block_hw))
        _grad_input_kernel[grid](grad_out, out, attention, grad_pooled.contiguous(), grad_x, channels, hw,
                                 *strides, RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return (grad_x, grad_identity, grad_h.to(h.dtype), grad_c.to(c.dtype),
            [g.to(w.dtype) for g, w in zip(grad_weights, weights)])


def _memory_format(x: Tensor):
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
