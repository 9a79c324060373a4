"""Triton kernels of the DIA step's small LSTM on (N, C) tensors: the cells forward (fused, or the
split path's phases), their backward, and the weight gradients. Matmuls run in fp32 with
`tl.dot` at the precision the host passes (DOT_PRECISION: "ieee" by default, so the numbers follow
the fp32 reference, docs/design.md §4). Phases exchange (BLOCK_N, K) operands through fp32
buffers of one row per sample, separated by CTA barriers: the forward writes what the backward
reads into `saved` (host.SavedLayout: relu(u), the gates, the weight gradients' V operands), the
backward its gradients into `scratch` (host.WorkLayout).
"""

from __future__ import annotations

import triton
import triton.language as tl


class Phase:
    """Host-side values of the LSTM kernels' PHASE argument: the whole step in one launch, or one
    launch of the split path."""

    FUSED = 0  # forward: grid (tiles, column groups); backward: grid (tiles,)
    REDUCED = 1  # forward kernel, grid (tiles, R parts): relu(u) only
    GATES = 2  # grid (tiles, column parts): the gates (forward) or their gradients (backward)
    REDUCED_GRAD = 3  # backward kernel, grid (tiles, R parts): du
    INPUT_GRAD = 4  # backward kernel, grid (tiles, column parts): d pooled, dh0


# the same values as compile-time constants for the kernels
PHASE_FUSED = tl.constexpr(Phase.FUSED)
PHASE_REDUCED = tl.constexpr(Phase.REDUCED)
PHASE_GATES = tl.constexpr(Phase.GATES)
PHASE_REDUCED_GRAD = tl.constexpr(Phase.REDUCED_GRAD)
PHASE_INPUT_GRAD = tl.constexpr(Phase.INPUT_GRAD)


class SplitK:
    """Host-side values of the LSTM kernels' MODE argument: a phase computed whole (DIRECT), or its
    long reductions split over a grid axis: PARTIAL launches (grid (tiles, parts, splits)) write
    one partial sum per split, then one FINISH launch (grid (tiles, parts)) adds them in split
    order (deterministic) and runs the rest of the phase."""

    DIRECT = 0
    PARTIAL = 1
    FINISH = 2


MODE_DIRECT = tl.constexpr(SplitK.DIRECT)
MODE_PARTIAL = tl.constexpr(SplitK.PARTIAL)
MODE_FINISH = tl.constexpr(SplitK.FINISH)
SPLIT_UNROLL = tl.constexpr(8)  # partial sums a FINISH program loads at once
CELL0_JOBS = 4  # weight-gradient matmuls of cell 0: wih1, wih2, whh1, whh2 (each with its bias)
STACKED_CELL_JOBS = 2  # per stacked cell: wih, whh


@triton.jit
def _relu(v):
    return tl.where(v < 0, 0.0, v)  # like torch.relu: NaN stays NaN


@triton.jit
def _tanh(v):
    return (
        2.0 * tl.sigmoid(2.0 * v) - 1.0
    )  # no libdevice (the interpreter lacks it); abs error ~1e-7


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
    a_ptr,
    stride_am,
    stride_ak,  # A (rows, K) of any float dtype: a_ptr + m * stride_am + k * stride_ak
    b_ptr,
    stride_bk,
    stride_bn,  # B (K, cols) of any float dtype
    rows,
    row_mask,  # (BLOCK_M,) row indices of A and their validity
    cols,
    col_mask,  # (BLOCK_N,) column indices of B and their validity
    k_begin,
    k_end,  # the reduction runs over k in [k_begin, k_end)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
):
    """(BLOCK_M, BLOCK_N) fp32 tile of A @ B over k in [k_begin, k_end), accumulated in BLOCK_K
    steps with fp32 dots of DOT_PRECISION (masked entries are zero, so padding never reaches a
    stored value)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _matmul_pair(
    a1_ptr,
    a2_ptr,
    stride_am,  # A1, A2 (rows, K) of any float dtype, unit column stride: a + m * stride_am + k
    b1_ptr,
    b2_ptr,
    stride_bk,
    stride_bn,  # B1, B2 (K, cols) of any float dtype: b + k * stride_bk + n * stride_bn
    rows,
    row_mask,  # (BLOCK_M,) row indices of A1, A2 and their validity
    cols,
    col_mask,  # (BLOCK_N,) column indices of B1, B2 and their validity
    k_begin,
    k_end,  # the reductions run over k in [k_begin, k_end)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
):
    """(A1 @ B1, A2 @ B2): two fp32 tiles like _matmul_tile's, in one loop, so that each k-step's
    four loads are in flight together (one latency per step for both products, not one each)."""
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        a_offsets = rows[:, None] * stride_am + ks[None, :]
        a_mask = row_mask[:, None] & k_mask[None, :]
        b_offsets = ks[:, None] * stride_bk + cols[None, :] * stride_bn
        b_mask = k_mask[:, None] & col_mask[None, :]
        a1 = tl.load(a1_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32)
        b1 = tl.load(b1_ptr + b_offsets, mask=b_mask, other=0.0).to(tl.float32)
        a2 = tl.load(a2_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + b_offsets, mask=b_mask, other=0.0).to(tl.float32)
        acc1 += tl.dot(a1, b1, input_precision=DOT_PRECISION)
        acc2 += tl.dot(a2, b2, input_precision=DOT_PRECISION)
    return acc1, acc2


@triton.jit
def _bias_row(b_ptr, cols, col_mask):
    """(1, BLOCK_N) fp32 row of a bias."""
    return tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _split_range(K, split, splits, BLOCK_K: tl.constexpr):
    """[begin, end) of a reduction over K that split `split` of `splits` computes: whole BLOCK_K
    steps each (the last split may be short or empty)."""
    chunk = tl.cdiv(tl.cdiv(K, splits), BLOCK_K) * BLOCK_K
    begin = split * chunk
    return begin, tl.minimum(begin + chunk, K)


@triton.jit
def _store_partial(
    partial_ptr,  # (splits, N, P) fp32: the split-K partial sums of one phase
    P,
    N,
    split,
    rows,
    row_mask,
    cols,  # columns of the phase's output (slot offset included)
    col_mask,
    value,
):
    m = row_mask[:, None] & col_mask[None, :]
    tl.store(partial_ptr + (split * N + rows[:, None]) * P + cols[None, :], value, mask=m)


@triton.jit
def _sum_partials(
    partial_ptr,  # (splits, N, P) fp32
    P,
    N,
    splits,
    rows,
    row_mask,
    cols,
    col_mask,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The sum over the splits of a phase's partials, always in split order: the same bits on
    every run (no atomics). SPLIT_UNROLL loads per iteration, independent of each other, so that
    they are in flight together."""
    m = row_mask[:, None] & col_mask[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split0 in range(0, splits, SPLIT_UNROLL):
        for u in tl.static_range(SPLIT_UNROLL):
            split = split0 + u + tl.zeros_like(cols)[None, :]  # (1, BLOCK_N): a tensor mask
            acc += tl.load(
                partial_ptr + (split * N + rows[:, None]) * P + cols[None, :],
                mask=m & (split < splits),
                other=0.0,
            )
    return acc


@triton.jit
def _gate_tiles(
    a1_ptr,
    stride_a1,  # input path: A1 (rows, K) fp32, row stride stride_a1, unit column stride
    w1_ptr,  # its linear's weight (4C, K) contiguous
    a2_ptr,
    stride_a2,  # recurrent path: A2 (rows, K) of the state dtype
    w2_ptr,  # its weight (4C, K)
    C,
    K,
    rows,
    row_mask,
    cs,
    c_mask,  # channel indices of one gate column chunk (gate q is at columns q*C + cs)
    k_begin,
    k_end,  # the part of the reduction computed (0, K: all of it)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
):
    """The four (BLOCK_M, BLOCK_N) gate tiles i, f, g, o of A1 W1^T + A2 W2^T over k in
    [k_begin, k_end), without biases: one loop, each k-step loading A1 and A2 once for all four
    gates, its ten loads in flight together."""
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = C * K  # offset of the next gate's rows in W
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        a_mask = row_mask[:, None] & k_mask[None, :]
        a1 = tl.load(a1_ptr + rows[:, None] * stride_a1 + ks[None, :], mask=a_mask, other=0.0)
        a2 = tl.load(a2_ptr + rows[:, None] * stride_a2 + ks[None, :], mask=a_mask, other=0.0)
        a1, a2 = a1.to(tl.float32), a2.to(tl.float32)
        w_offsets = ks[:, None] + cs[None, :] * K  # (K, cols) view of W's gate-i rows
        w_mask = k_mask[:, None] & c_mask[None, :]
        w1 = w1_ptr + w_offsets
        w2 = w2_ptr + w_offsets
        acc_i += tl.dot(a1, tl.load(w1, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
        acc_i += tl.dot(a2, tl.load(w2, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
        acc_f += tl.dot(
            a1, tl.load(w1 + gate, mask=w_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_f += tl.dot(
            a2, tl.load(w2 + gate, mask=w_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_g += tl.dot(
            a1, tl.load(w1 + 2 * gate, mask=w_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_g += tl.dot(
            a2, tl.load(w2 + 2 * gate, mask=w_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_o += tl.dot(
            a1, tl.load(w1 + 3 * gate, mask=w_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_o += tl.dot(
            a2, tl.load(w2 + 3 * gate, mask=w_mask, other=0.0), input_precision=DOT_PRECISION
        )
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _cells_forward_tile(
    tile,  # index of this program's block of BLOCK_N samples
    u_part,
    u_parts,  # this program computes reduced-width chunks u_part, u_part + u_parts, ... (if DO_U)
    gate_part,
    gate_parts,  # and gate column chunks gate_part, gate_part + gate_parts, ... (if DO_GATES)
    ru_slot,  # slot of relu(u) in `slots_ptr`: the fused forward's column parts each compute u
    # into their own; slot 0's is also saved
    split,
    splits,  # split-K: this program reduces part `split` of `splits` of K (MODE PARTIAL)
    partial_ptr,  # (splits, N, P) fp32 split-K partials of this launch's phase (MODE != DIRECT)
    P,  # their row length: 2R (u: ih | hh) or 4C (gates of cell 0)
    pooled_ptr,  # (N, C) fp32
    h_ptr,
    c_ptr,  # (L, N, C) state dtype, contiguous: previous state
    wih1_ptr,
    bih1_ptr,
    wih2_ptr,
    bih2_ptr,  # cell 0 ih path: (R, C), (R,), (4C, R), (4C,)
    whh1_ptr,
    bhh1_ptr,
    whh2_ptr,
    bhh2_ptr,  # cell 0 hh path: same shapes
    stacked_ptr,  # (L-1, 8C^2 + 8C) fp32: [wih (4C, C), bih (4C), whh (4C, C), bhh (4C)] per
    # stacked cell
    masks_ptr,  # (L-1, N, C) dropout keep-masks (scaled) between cells, read if HAS_MASKS
    h_new_ptr,
    c_new_ptr,  # (L, N, C) out, state dtype
    saved_ptr,  # (N, S) fp32 out: what the backward reads (host.SavedLayout), one row per sample
    slots_ptr,  # (N, SLOTS) fp32 workspace: relu(u_ih) (R), relu(u_hh) (R) per slot
    N,
    C,
    R,
    S,  # samples, channels, reduced width C/r, saved row length
    SLOTS,  # slots row length
    off_ru,  # saved column of relu(u_ih) (R) followed by relu(u_hh) (R)
    off_v0,  # saved column of the pooled copy (C) and the h[0] copy (C)
    off_vs,  # saved column of stacked cell 1's [input (C), h copy (C)]; cell l at + 2C (l-1)
    off_gates,  # saved column of cell 0's pre-activation gates (4C); cell l at + 4C l
    NUM_CELLS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    DO_U: tl.constexpr,
    DO_GATES: tl.constexpr,
    MODE: tl.constexpr,  # DIRECT, or split-K PARTIAL / FINISH (one cell, one of DO_U, DO_GATES)
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr,  # reduction step of the gate matmuls (divides BLOCK_K)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
):
    """The stacked LSTM step for BLOCK_N samples, keeping in `saved` what the backward reads
    (relu(u), the weight gradients' V operands, every cell's gates): the backward recomputes none
    of it. DO_U / DO_GATES select the phases (both: the fused step; one: a launch of the split
    path).
    MODE PARTIAL computes only this split's part of the phase's matmuls into `partial_ptr`; MODE
    FINISH sums those parts in split order and runs the rest of the phase (biases onwards)."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    saved_rows = saved_ptr + rows[:, None] * S
    slot_ptr = slots_ptr + ru_slot * 2 * R  # this program's relu(u): (rows, 2R) of stride SLOTS
    slot_rows = slot_ptr + rows[:, None] * SLOTS
    if DO_U:  # cell 0's reduced paths: relu(W1 v + b1) for v = pooled (ih) and v = h[0] (hh)
        k_begin, k_end = _split_range(C, split, splits, BLOCK_K)
        for r0 in range(u_part * BLOCK_R, R, u_parts * BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            rr_mask = row_mask[:, None] & r_mask[None, :]
            if MODE == MODE_FINISH:
                u_ih = _sum_partials(
                    partial_ptr, P, N, splits, rows, row_mask, rs, r_mask, BLOCK_N, BLOCK_R
                ) + _bias_row(bih1_ptr, rs, r_mask)
                u_hh = _sum_partials(
                    partial_ptr, P, N, splits, rows, row_mask, R + rs, r_mask, BLOCK_N, BLOCK_R
                ) + _bias_row(bhh1_ptr, rs, r_mask)
            else:
                u_ih, u_hh = _matmul_pair(
                    pooled_ptr,
                    h_ptr,
                    C,
                    wih1_ptr,
                    whh1_ptr,
                    1,
                    C,
                    rows,
                    row_mask,
                    rs,
                    r_mask,
                    k_begin,
                    k_end,
                    BLOCK_N,
                    BLOCK_R,
                    BLOCK_K,
                    DOT_PRECISION,
                )
                if MODE == MODE_DIRECT:
                    u_ih += _bias_row(bih1_ptr, rs, r_mask)
                    u_hh += _bias_row(bhh1_ptr, rs, r_mask)
            if MODE == MODE_PARTIAL:
                _store_partial(partial_ptr, P, N, split, rows, row_mask, rs, r_mask, u_ih)
                _store_partial(partial_ptr, P, N, split, rows, row_mask, R + rs, r_mask, u_hh)
            else:
                tl.store(slot_rows + rs[None, :], _relu(u_ih), mask=rr_mask)
                tl.store(slot_rows + R + rs[None, :], _relu(u_hh), mask=rr_mask)
                # one copy saved, slot 0's (a mask, not a branch: fewer registers on sm_80)
                saved_mask = rr_mask & (rs * 0 + ru_slot == 0)[None, :]
                tl.store(saved_rows + off_ru + rs[None, :], _relu(u_ih), mask=saved_mask)
                tl.store(saved_rows + off_ru + R + rs[None, :], _relu(u_hh), mask=saved_mask)
        if DO_GATES:
            # relu(u) written above is read by other threads of this program below
            tl.debug_barrier()
    if DO_GATES:
        # a loop, not unrolled: the cells' code once keeps the stacked forward in registers
        for cell in tl.range(0, NUM_CELLS, loop_unroll_factor=1):
            if cell == 0:  # gates = Wih2 relu(u_ih) + bih2 + Whh2 relu(u_hh) + bhh2
                a1_ptr, stride_a1, w1_ptr, b1_ptr, k1 = slot_ptr, SLOTS, wih2_ptr, bih2_ptr, R
                a2_ptr, stride_a2, w2_ptr, b2_ptr = slot_ptr + R, SLOTS, whh2_ptr, bhh2_ptr
            else:  # gates = Wih input + bih + Whh h[cell] + bhh (both paths reduce over C)
                cell_w = stacked_ptr + (cell - 1) * (8 * C * C + 8 * C)
                a1_ptr, stride_a1, w1_ptr, b1_ptr, k1 = (
                    saved_ptr + off_vs + (cell - 1) * 2 * C,
                    S,
                    cell_w,
                    cell_w + 4 * C * C,
                    C,
                )
                a2_ptr, stride_a2 = h_ptr + cell * N * C, C
                w2_ptr, b2_ptr = cell_w + 4 * C * C + 4 * C, cell_w + 8 * C * C + 4 * C
            k_begin, k_end = _split_range(k1, split, splits, BLOCK_K)
            for col0 in range(gate_part * BLOCK_C, C, gate_parts * BLOCK_C):
                cs = col0 + tl.arange(0, BLOCK_C)
                c_mask = cs < C
                m = row_mask[:, None] & c_mask[None, :]
                nc = cell * N * C + rows[:, None] * C + cs[None, :]
                if MODE != MODE_PARTIAL:
                    if cell == 0:  # the V operands of cell 0's weight gradients: pooled, h[0]
                        tl.store(
                            saved_rows + off_v0 + cs[None, :],
                            tl.load(pooled_ptr + nc, mask=m),
                            mask=m,
                        )
                        tl.store(
                            saved_rows + off_v0 + C + cs[None, :],
                            tl.load(h_ptr + nc, mask=m).to(tl.float32),
                            mask=m,
                        )
                if cell + 1 < NUM_CELLS:  # (stacked cells: never split over K)
                    # the h copy of the next cell (V of its whh), before the gate tiles are live
                    tl.store(
                        saved_rows + off_vs + cell * 2 * C + C + cs[None, :],
                        tl.load(h_ptr + nc + N * C, mask=m).to(tl.float32),
                        mask=m,
                    )
                if MODE == MODE_FINISH:
                    gate_i = _finished_gate(
                        partial_ptr,
                        P,
                        N,
                        splits,
                        rows,
                        row_mask,
                        cs,
                        c_mask,
                        b1_ptr,
                        b2_ptr,
                        BLOCK_N,
                        BLOCK_C,
                    )
                    gate_f = _finished_gate(
                        partial_ptr,
                        P,
                        N,
                        splits,
                        rows,
                        row_mask,
                        C + cs,
                        c_mask,
                        b1_ptr,
                        b2_ptr,
                        BLOCK_N,
                        BLOCK_C,
                    )
                    gate_g = _finished_gate(
                        partial_ptr,
                        P,
                        N,
                        splits,
                        rows,
                        row_mask,
                        2 * C + cs,
                        c_mask,
                        b1_ptr,
                        b2_ptr,
                        BLOCK_N,
                        BLOCK_C,
                    )
                    gate_o = _finished_gate(
                        partial_ptr,
                        P,
                        N,
                        splits,
                        rows,
                        row_mask,
                        3 * C + cs,
                        c_mask,
                        b1_ptr,
                        b2_ptr,
                        BLOCK_N,
                        BLOCK_C,
                    )
                else:
                    gate_i, gate_f, gate_g, gate_o = _gate_tiles(
                        a1_ptr,
                        stride_a1,
                        w1_ptr,
                        a2_ptr,
                        stride_a2,
                        w2_ptr,
                        C,
                        k1,
                        rows,
                        row_mask,
                        cs,
                        c_mask,
                        k_begin,
                        k_end,
                        BLOCK_N,
                        BLOCK_C,
                        BLOCK_KG,
                        DOT_PRECISION,
                    )
                    if MODE == MODE_DIRECT:
                        gate_i += _bias_row(b1_ptr, cs, c_mask) + _bias_row(b2_ptr, cs, c_mask)
                        gate_f += _bias_row(b1_ptr, C + cs, c_mask) + _bias_row(
                            b2_ptr, C + cs, c_mask
                        )
                        gate_g += _bias_row(b1_ptr, 2 * C + cs, c_mask) + _bias_row(
                            b2_ptr, 2 * C + cs, c_mask
                        )
                        gate_o += _bias_row(b1_ptr, 3 * C + cs, c_mask) + _bias_row(
                            b2_ptr, 3 * C + cs, c_mask
                        )
                if MODE == MODE_PARTIAL:
                    _store_partial(partial_ptr, P, N, split, rows, row_mask, cs, c_mask, gate_i)
                    _store_partial(partial_ptr, P, N, split, rows, row_mask, C + cs, c_mask, gate_f)
                    _store_partial(
                        partial_ptr, P, N, split, rows, row_mask, 2 * C + cs, c_mask, gate_g
                    )
                    _store_partial(
                        partial_ptr, P, N, split, rows, row_mask, 3 * C + cs, c_mask, gate_o
                    )
                else:
                    gates = saved_rows + off_gates + cell * 4 * C + cs[None, :]
                    tl.store(gates, gate_i, mask=m)
                    tl.store(gates + C, gate_f, mask=m)
                    tl.store(gates + 2 * C, gate_g, mask=m)
                    tl.store(gates + 3 * C, gate_o, mask=m)
                    c_prev = tl.load(c_ptr + nc, mask=m, other=0.0).to(tl.float32)
                    c_new = tl.sigmoid(gate_f) * c_prev + tl.sigmoid(gate_i) * _tanh(gate_g)
                    act, _ = _activation_and_grad(c_new, ACTIVATION)
                    h_new = tl.sigmoid(gate_o) * act
                    tl.store(c_new_ptr + nc, c_new.to(c_new_ptr.dtype.element_ty), mask=m)
                    tl.store(h_new_ptr + nc, h_new.to(h_new_ptr.dtype.element_ty), mask=m)
                    if cell + 1 < NUM_CELLS:  # the next cell's input
                        nxt = saved_rows + off_vs + cell * 2 * C + cs[None, :]
                        if HAS_MASKS:
                            h_new = h_new * tl.load(masks_ptr + nc, mask=m, other=0.0).to(
                                tl.float32
                            )
                        tl.store(nxt, h_new, mask=m)
            tl.debug_barrier()


@triton.jit
def _finished_gate(
    partial_ptr,
    P,
    N,
    splits,
    rows,
    row_mask,
    gate_cols,
    col_mask,
    b1_ptr,
    b2_ptr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """A gate tile of cell 0 from its split-K partials: their sum plus both biases."""
    return (
        _sum_partials(
            partial_ptr, P, N, splits, rows, row_mask, gate_cols, col_mask, BLOCK_N, BLOCK_C
        )
        + _bias_row(b1_ptr, gate_cols, col_mask)
        + _bias_row(b2_ptr, gate_cols, col_mask)
    )


@triton.jit
def _lstm_forward_kernel(
    pooled_ptr,
    h_ptr,
    c_ptr,
    wih1_ptr,
    bih1_ptr,
    wih2_ptr,
    bih2_ptr,
    whh1_ptr,
    bhh1_ptr,
    whh2_ptr,
    bhh2_ptr,
    stacked_ptr,
    masks_ptr,
    h_new_ptr,
    c_new_ptr,
    saved_ptr,
    slots_ptr,
    partial_ptr,  # (splits, N, P) fp32: split-K partials (MODE != DIRECT)
    P,
    splits,
    N,
    C,
    R,
    S,
    SLOTS,
    off_ru,
    off_v0,
    off_vs,
    off_gates,  # see _cells_forward_tile
    NUM_CELLS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    PHASE: tl.constexpr,  # FUSED: grid (tiles, column parts) each computing u into its own
    # slot; REDUCED: grid (tiles, R parts), relu(u) only; GATES: grid (tiles, column parts) reading
    # relu(u) from slot 0
    MODE: tl.constexpr,  # SplitK: DIRECT, PARTIAL (grid axis 2: the split) or FINISH
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr,  # reduction step of the gate matmuls (divides BLOCK_K)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
):
    part, parts = tl.program_id(1), tl.num_programs(1)
    if PHASE == PHASE_FUSED:  # every column part computes all of u, into its own slot
        u_part, u_parts, ru_slot = 0, 1, part
    else:  # REDUCED splits u over the parts; GATES reads it from the one slot
        u_part, u_parts, ru_slot = part, parts, 0
    _cells_forward_tile(
        tl.program_id(0),
        u_part,
        u_parts,
        part,
        parts,
        ru_slot,
        tl.program_id(2),
        splits,
        partial_ptr,
        P,
        pooled_ptr,
        h_ptr,
        c_ptr,
        wih1_ptr,
        bih1_ptr,
        wih2_ptr,
        bih2_ptr,
        whh1_ptr,
        bhh1_ptr,
        whh2_ptr,
        bhh2_ptr,
        stacked_ptr,
        masks_ptr,
        h_new_ptr,
        c_new_ptr,
        saved_ptr,
        slots_ptr,
        N,
        C,
        R,
        S,
        SLOTS,
        off_ru,
        off_v0,
        off_vs,
        off_gates,
        NUM_CELLS,
        ACTIVATION,
        HAS_MASKS,
        PHASE != PHASE_GATES,
        PHASE != PHASE_REDUCED,
        MODE,
        BLOCK_N,
        BLOCK_C,
        BLOCK_R,
        BLOCK_K,
        BLOCK_KG,
        DOT_PRECISION,
    )


@triton.jit
def _lstm_backward_kernel(
    h_ptr,
    c_ptr,
    wih1_ptr,
    bih1_ptr,
    wih2_ptr,
    bih2_ptr,
    whh1_ptr,
    bhh1_ptr,
    whh2_ptr,
    bhh2_ptr,
    stacked_ptr,
    masks_ptr,
    saved_ptr,  # (N, S) fp32 from the forward (host.SavedLayout): relu(u) and the gates are read
    scratch_ptr,  # (N, W) fp32 workspace (host.WorkLayout): filled with the D operands of the
    # weight-gradient kernel
    partial_ptr,  # (splits, N, P) fp32: split-K partials of this launch's phase (MODE != DIRECT)
    P,  # their row length: 2R (du: ih | hh) or 2C (d pooled | dh0)
    splits,
    grad_a_ptr,  # (N, C) fp32: gradient of the attention (last cell's h) from the map
    grad_h_new_ptr,
    grad_c_new_ptr,  # (L, N, C) incoming state gradients, read if HAS_GRAD_H / HAS_GRAD_C
    grad_pooled_ptr,  # (N, C) fp32 out
    attention_ptr,  # (N, C) fp32 out: the attention (last cell's h) from the saved gates, for
    # the input gradient
    grad_h_ptr,
    grad_c_ptr,  # (L, N, C) out, state dtype: gradients of the previous state
    N,
    C,
    R,
    S,  # saved row length
    W,  # scratch row length
    off_ru,  # saved column of relu(u_ih) (R), relu(u_hh) (R)
    off_gates,  # saved column of cell 0's pre-activation gates (4C); cell l at + 4C l
    off_du,  # scratch column of du_ih (R) followed by du_hh (R): gradients of the reduced paths
    off_dgates,  # scratch column of cell 0's gate gradients (4C); cell l at + 4C l
    off_carry,  # scratch column (C) of the gradient flowing into cell l-1's output from cell l
    NUM_CELLS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_GRAD_H: tl.constexpr,
    HAS_GRAD_C: tl.constexpr,
    PHASE: tl.constexpr,  # FUSED: everything, grid (tiles,). Otherwise (one cell): GATES grid
    # (tiles, column parts): the gates' gradients; REDUCED_GRAD (tiles, R parts): du; INPUT_GRAD
    # (tiles, column parts): ds, dh0
    MODE: tl.constexpr,  # SplitK: DIRECT, PARTIAL (grid axis 2: the split) or FINISH
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr,  # the forward's gate k-step (unused here: the gates are saved)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
):
    tile, split = tl.program_id(0), tl.program_id(2)
    if PHASE == PHASE_FUSED:
        part, parts = 0, 1
    else:
        part, parts = tl.program_id(1), tl.num_programs(1)
    gates_phase = PHASE == PHASE_FUSED or PHASE == PHASE_GATES
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    saved_rows = saved_ptr + rows[:, None] * S
    scratch_rows = scratch_ptr + rows[:, None] * W
    for step in tl.static_range(NUM_CELLS):
        cell = NUM_CELLS - 1 - step
        # pointwise LSTM backward: gate gradients of this cell, and dc_prev
        for col0 in range(part * BLOCK_C, C if gates_phase else 0, parts * BLOCK_C):
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
                grad_h_cell += tl.load(
                    grad_a_ptr + rows[:, None] * C + cs[None, :], mask=m, other=0.0
                )
            else:
                grad_h_cell += tl.load(scratch_rows + off_carry + cs[None, :], mask=m, other=0.0)
            gates = saved_rows + off_gates + cell * 4 * C + cs[None, :]
            sig_i = tl.sigmoid(tl.load(gates, mask=m, other=0.0))
            sig_f = tl.sigmoid(tl.load(gates + C, mask=m, other=0.0))
            tanh_g = _tanh(tl.load(gates + 2 * C, mask=m, other=0.0))
            sig_o = tl.sigmoid(tl.load(gates + 3 * C, mask=m, other=0.0))
            c_prev = tl.load(c_ptr + nc, mask=m, other=0.0).to(tl.float32)
            act, act_grad = _activation_and_grad(sig_f * c_prev + sig_i * tanh_g, ACTIVATION)
            dc = grad_c_cell + grad_h_cell * sig_o * act_grad
            if cell == NUM_CELLS - 1:
                tl.store(attention_ptr + rows[:, None] * C + cs[None, :], sig_o * act, mask=m)
            dgates = scratch_rows + off_dgates + cell * 4 * C + cs[None, :]
            tl.store(dgates, dc * tanh_g * sig_i * (1.0 - sig_i), mask=m)
            tl.store(dgates + C, dc * c_prev * sig_f * (1.0 - sig_f), mask=m)
            tl.store(dgates + 2 * C, dc * sig_i * (1.0 - tanh_g * tanh_g), mask=m)
            tl.store(dgates + 3 * C, grad_h_cell * act * sig_o * (1.0 - sig_o), mask=m)
            tl.store(grad_c_ptr + nc, (dc * sig_f).to(grad_c_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()
        dgates_ptr = scratch_ptr + off_dgates + cell * 4 * C  # (N, 4C) rows of stride W
        if cell > 0:  # dh_prev = dgates Whh;  d(input) = dgates Wih, through the dropout mask
            cell_w = stacked_ptr + (cell - 1) * (8 * C * C + 8 * C)
            for col0 in range(0, C, BLOCK_C):
                cs = col0 + tl.arange(0, BLOCK_C)
                c_mask = cs < C
                m = row_mask[:, None] & c_mask[None, :]
                nc = cell * N * C + rows[:, None] * C + cs[None, :]
                grad_h_prev, grad_input = _matmul_pair(
                    dgates_ptr,
                    dgates_ptr,
                    W,
                    cell_w + 4 * C * C + 4 * C,
                    cell_w,
                    C,
                    1,
                    rows,
                    row_mask,
                    cs,
                    c_mask,
                    0,
                    4 * C,
                    BLOCK_N,
                    BLOCK_C,
                    BLOCK_K,
                    DOT_PRECISION,
                )
                tl.store(grad_h_ptr + nc, grad_h_prev.to(grad_h_ptr.dtype.element_ty), mask=m)
                if HAS_MASKS:
                    grad_input = grad_input * tl.load(masks_ptr + nc - N * C, mask=m, other=0.0).to(
                        tl.float32
                    )
                tl.store(scratch_rows + off_carry + cs[None, :], grad_input, mask=m)
            tl.debug_barrier()
        else:  # the reduced paths: du = (dgates W2) * relu'(u); ds = du_ih Wih1; dh0 = du_hh Whh1
            k_begin, k_end = _split_range(4 * C, split, splits, BLOCK_K)
            for r0 in range(
                part * BLOCK_R,
                R if PHASE == PHASE_FUSED or PHASE == PHASE_REDUCED_GRAD else 0,
                parts * BLOCK_R,
            ):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_mask = rs < R
                rr_mask = row_mask[:, None] & r_mask[None, :]
                if MODE == MODE_FINISH:
                    du_ih = _sum_partials(
                        partial_ptr, P, N, splits, rows, row_mask, rs, r_mask, BLOCK_N, BLOCK_R
                    )
                    du_hh = _sum_partials(
                        partial_ptr, P, N, splits, rows, row_mask, R + rs, r_mask, BLOCK_N, BLOCK_R
                    )
                else:
                    du_ih, du_hh = _matmul_pair(
                        dgates_ptr,
                        dgates_ptr,
                        W,
                        wih2_ptr,
                        whh2_ptr,
                        R,
                        1,
                        rows,
                        row_mask,
                        rs,
                        r_mask,
                        k_begin,
                        k_end,
                        BLOCK_N,
                        BLOCK_R,
                        BLOCK_K,
                        DOT_PRECISION,
                    )
                if MODE == MODE_PARTIAL:
                    _store_partial(partial_ptr, P, N, split, rows, row_mask, rs, r_mask, du_ih)
                    _store_partial(partial_ptr, P, N, split, rows, row_mask, R + rs, r_mask, du_hh)
                else:
                    ru_ih = tl.load(saved_rows + off_ru + rs[None, :], mask=rr_mask, other=0.0)
                    ru_hh = tl.load(saved_rows + off_ru + R + rs[None, :], mask=rr_mask, other=0.0)
                    tl.store(
                        scratch_rows + off_du + rs[None, :],
                        tl.where(ru_ih > 0, du_ih, 0.0),
                        mask=rr_mask,
                    )
                    tl.store(
                        scratch_rows + off_du + R + rs[None, :],
                        tl.where(ru_hh > 0, du_hh, 0.0),
                        mask=rr_mask,
                    )
            tl.debug_barrier()
            k_begin, k_end = _split_range(R, split, splits, BLOCK_K)
            for col0 in range(
                part * BLOCK_C,
                C if PHASE == PHASE_FUSED or PHASE == PHASE_INPUT_GRAD else 0,
                parts * BLOCK_C,
            ):
                cs = col0 + tl.arange(0, BLOCK_C)
                c_mask = cs < C
                m = row_mask[:, None] & c_mask[None, :]
                nc = rows[:, None] * C + cs[None, :]
                if MODE == MODE_FINISH:
                    grad_pooled = _sum_partials(
                        partial_ptr, P, N, splits, rows, row_mask, cs, c_mask, BLOCK_N, BLOCK_C
                    )
                    grad_h0 = _sum_partials(
                        partial_ptr, P, N, splits, rows, row_mask, C + cs, c_mask, BLOCK_N, BLOCK_C
                    )
                else:
                    grad_pooled, grad_h0 = _matmul_pair(
                        scratch_ptr + off_du,
                        scratch_ptr + off_du + R,
                        W,
                        wih1_ptr,
                        whh1_ptr,
                        C,
                        1,
                        rows,
                        row_mask,
                        cs,
                        c_mask,
                        k_begin,
                        k_end,
                        BLOCK_N,
                        BLOCK_C,
                        BLOCK_K,
                        DOT_PRECISION,
                    )
                if MODE == MODE_PARTIAL:
                    _store_partial(
                        partial_ptr, P, N, split, rows, row_mask, cs, c_mask, grad_pooled
                    )
                    _store_partial(
                        partial_ptr, P, N, split, rows, row_mask, C + cs, c_mask, grad_h0
                    )
                else:
                    tl.store(grad_pooled_ptr + nc, grad_pooled, mask=m)
                    tl.store(grad_h_ptr + nc, grad_h0.to(grad_h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _weight_grad_kernel(
    saved_ptr,  # (N, S) fp32 from the forward: the V (input) operands
    scratch_ptr,  # (N, W) fp32 from _lstm_backward_kernel: the D (output-gradient) operands
    grad_w_ptr,  # flat fp32 out: every weight gradient flattened, in reference.weight_names order
    N,
    C,
    R,
    S,
    W,
    off_ru,
    off_v0,
    off_vs,
    off_du,
    off_dgates,  # see the LSTM kernels
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32x3" or "tf32"
):
    """Each program writes one (BLOCK_M, BLOCK_K) tile of one weight gradient dW = D^T V (M, K),
    summed over all N samples in a fixed order, and its bias gradient (column sums of D) in the
    first column of tiles. Jobs: 0 wih1, 1 wih2, 2 whh1, 3 whh2, then wih_l, whh_l per stacked
    cell; the 1-D grid holds exactly their tiles (weight_grad_tiles), job after job, row-major."""
    pid = tl.program_id(0)
    w1_tiles = tl.cdiv(R, BLOCK_M) * tl.cdiv(C, BLOCK_K)  # W1 (R, C)
    w2_tiles = tl.cdiv(4 * C, BLOCK_M) * tl.cdiv(R, BLOCK_K)  # W2 (4C, R)
    path_tiles = w1_tiles + w2_tiles
    if pid < 2 * path_tiles:
        second = (pid % path_tiles >= w1_tiles).to(tl.int32)
        job = 2 * (pid // path_tiles) + second
        tile = pid % path_tiles - second * w1_tiles
    else:
        stacked_tiles = tl.cdiv(4 * C, BLOCK_M) * tl.cdiv(C, BLOCK_K)
        job = 4 + (pid - 2 * path_tiles) // stacked_tiles
        tile = (pid - 2 * path_tiles) % stacked_tiles
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
    k_tiles = tl.cdiv(k_size, BLOCK_K)
    tile_m, tile_k = tile // k_tiles, tile % k_tiles
    ms = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = ms < m_size
    k_mask = ks < k_size
    # A[m, n] = D[n, m] (D^T), B[n, k] = V[n, k]; the reduction runs over the samples
    grad_w = _matmul_tile(
        scratch_ptr + d_col,
        1,
        W,
        saved_ptr + v_col,
        S,
        1,
        ms,
        m_mask,
        ks,
        k_mask,
        0,
        N,
        BLOCK_M,
        BLOCK_K,
        BLOCK_N,
        DOT_PRECISION,
    )
    tl.store(
        grad_w_ptr + out + ms[:, None] * k_size + ks[None, :],
        grad_w,
        mask=m_mask[:, None] & k_mask[None, :],
    )
    if tile_k == 0:
        grad_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            d = tl.load(
                scratch_ptr + d_col + ns[:, None] * W + ms[None, :],
                mask=(ns < N)[:, None] & m_mask[None, :],
                other=0.0,
            )
            grad_b += tl.sum(d, axis=0)
        tl.store(grad_w_ptr + out + m_size * k_size + ms, grad_b, mask=m_mask)
