"""Traffic model of one DIA step: every launch the Triton and CUDA backends make, its grid, the
bytes it loads and stores, its serial work per CTA, and from these a predicted time on a named GPU
(rules in docs/design.md §6.3). No GPU is needed: the model is plain arithmetic over the launch
geometry, and python_tests/test_triton_traffic.py checks its byte counts of the Triton kernels
against what the kernels really load and store under TRITON_INTERPRET=1, so that it cannot drift
from them.

    python bench/roofline.py             # the table of the benchmark shapes
    python bench/roofline.py --check     # exit 1 when a shape's prediction exceeds 1.5x its floor

The floor of a step is its minimum bytes (every input read once, every output written once) at
90% of the HBM bandwidth plus `launch_us` per launch the modelled implementation makes.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dia_fused.kernels.cuda_build import (  # noqa: E402
    GATE_SPLIT_K,
    HIDDEN_GRAD_SPLIT_K,
    INPUT_GRAD_SPLIT_K,
    MAP_REDUCE_MIN_BLOCKS,
    REDUCED_LINEAR_SPLIT_K,
)
from dia_fused import reference  # noqa: E402
from dia_fused.kernels.triton.config import (  # noqa: E402
    KernelSettings,
    LSTMConfig,
    MapConfig,
    lstm_num_stages,
)

BENCHMARK_SHAPES = [
    (128, 64, 32, 32),
    (128, 128, 16, 16),
    (128, 256, 8, 8),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CHECK_RATIO = 1.5  # --check: predicted forward+backward time at most this times the floor
HBM_EFFICIENCY = 0.9  # share of the peak HBM bandwidth a streaming kernel reaches


@dataclass(frozen=True)
class GPU:
    """What the prediction needs of a device (docs/design.md §6.3 gives the sources)."""

    name: str
    hbm_bytes_per_us: float  # peak HBM bandwidth
    sms: int
    launch_us: float  # cost of one launch in an eager step (the floor charges the same)
    dram_latency_us: float  # a dependent DRAM load: one tile in flight moves tile/latency
    l2_latency_us: float  # a dependent L2 hit (the LSTM operands live in L2)
    l2_bytes_per_us: float  # L2 bandwidth, all SMs together
    fma_per_sm_per_us: float  # fp32 FMA lanes x clock (IEEE dots run on them, not tensor cores)
    warps_per_sm: int


H100 = GPU(
    name="H100 SXM",
    hbm_bytes_per_us=3.35e6,
    sms=132,
    launch_us=2.0,
    dram_latency_us=0.8,
    l2_latency_us=0.35,
    l2_bytes_per_us=10e6,
    fma_per_sm_per_us=128 * 1755.0,
    warps_per_sm=64,
)
LSTM_CTAS_PER_SM = 1  # 8 warps at 94-208 registers (python_tests/triton_aot.py): one fits
TRITON_NUM_STAGES = 3  # Triton's default software-pipelining depth on sm_80 / sm_90
EMPTY_CTA_US = 0.05  # a CTA that only checks its bounds and exits


@dataclass(frozen=True)
class Step:
    """One DIA step as the benchmarks run it (bench/test_step_bench.py): an identity, relu, the
    gradients of out, h' and c' all given."""

    n: int
    c: int
    h: int
    w: int
    dtype: str = "float32"
    channels_last: bool = False
    cells: int = 1
    reduction: int = 4
    identity: bool = True
    relu: bool = True
    grad_state: bool = True
    masks: bool = False

    @property
    def hw(self) -> int:
        return self.h * self.w

    @property
    def r(self) -> int:
        return max(1, self.c // self.reduction)

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def map_bytes(self) -> int:
        return self.n * self.c * self.hw * self.e

    def weight_elems(self) -> int:
        return reference.weight_elements(self.c, self.r, self.cells)

    def label(self) -> str:
        layout = "cl" if self.channels_last else "nchw"
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]
        return f"{self.n}x{self.c}x{self.h}x{self.w} {short} {layout}"


@dataclass
class Launch:
    """One kernel launch: requested bytes (what its loads and stores ask for, counted per masked
    element: what the interpreter test checks), its DRAM bytes (first touches only: repeated reads
    of a small operand hit L2), and its serial critical path per CTA."""

    kernel: str
    grid: Tuple[int, ...]
    loads: int = 0
    stores: int = 0
    dram: int = 0
    serial_us: float = 0.0  # latency-bound span: CTAs' dependent-load chains over the SMs
    l2: int = 0  # bytes served by L2 (requested minus DRAM)
    predicted_us: float = 0.0

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)


# ------------------------------------------------------------------------------------------------
# Request counting: mirrors of the kernels' loops (one function per kernel)
# ------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Program:
    """Requests of one CTA, by buffer (buffer -> bytes), and its latency chain: `steps` dependent
    L2 round trips (loops of plain loads), `loops` software-pipelined dot loops of `k_steps` steps
    in all, and its FMAs."""

    loads: Counter = field(default_factory=Counter)
    stores: Counter = field(default_factory=Counter)
    stages: int = TRITON_NUM_STAGES  # software-pipelining depth of its dot loops
    steps: int = 0
    loops: int = 0
    k_steps: int = 0
    fma: int = 0

    def matmul(self, a: str, ea: int, b: str, eb: int, rows: int, k: int, cols: int, blocks):
        """_matmul_tile: A (rows valid, K) and B (K, cols valid), BLOCK_K at a time."""
        self.loads[a] += rows * k * ea
        self.loads[b] += k * cols * eb
        self.loop(k, 1, blocks)

    def loop(self, k: int, dots: int, blocks):
        """One software-pipelined loop over K, BLOCK_K at a time, `dots` products per k-step
        (their loads issued together: one latency per step for all of them)."""
        block_m, block_n, block_k = blocks
        steps = _cdiv(k, block_k)
        self.loops += steps > 0
        self.k_steps += steps
        self.fma += dots * steps * block_m * block_n * block_k

    def matmul_pair(self, a1: str, a2: str, ea: int, b1: str, b2: str, rows, k, cols, blocks):
        """_matmul_pair: A1 @ B1 and A2 @ B2 (A of ea bytes, B fp32 weights) in one loop."""
        for a, b in ((a1, b1), (a2, b2)):
            self.loads[a] += rows * k * ea
            self.loads[b] += k * cols * 4
        self.loop(k, 2, blocks)

    def linear(self, a: str, ea: int, w: str, rows: int, k: int, cols: int, blocks):
        self.matmul(a, ea, w, 4, rows, k, cols, blocks)
        self.loads[w + ".bias"] += cols * 4


SUM_SPLITS_BLOCK = 1024  # host.SUM_SPLITS_BLOCK


def hw_split_plan(step: Step, block_c: int, block_hw: int, config: MapConfig) -> Tuple[int, int]:
    """host.hw_split_plan: (splits, positions per split) of H*W for pool and grad attention."""
    programs, hw_tiles = step.n * _cdiv(step.c, block_c), _cdiv(step.hw, block_hw)
    few = 0 < programs < config.min_ctas  # an empty batch launches nothing
    splits = min(hw_tiles, _cdiv(config.min_ctas, programs)) if few else 1
    per_split = _cdiv(hw_tiles, max(1, splits)) * block_hw
    return _cdiv(step.hw, per_split), per_split


def _sum_splits_launches(s: Step, splits: int, gpu: GPU) -> List[Launch]:
    """_sum_splits_kernel after a reduction split over H*W: reads the (splits, N, C) sums."""
    if splits <= 1:
        return []
    nc4 = s.n * s.c * 4
    launch = Launch(
        "_sum_splits_kernel",
        (_cdiv(s.n * s.c, SUM_SPLITS_BLOCK),),
        loads=splits * nc4,
        stores=nc4,
        dram=nc4,  # the partial sums were just written: L2
    )
    launch.l2 = launch.loads
    launch.serial_us = splits * gpu.l2_latency_us
    return [launch]


def triton_map_blocks(step: Step, config: MapConfig) -> Tuple[int, int]:
    """host._map_blocks: (BLOCK_C, BLOCK_HW) of the map kernels."""
    if step.channels_last:
        block_c = min(_next_power_of_2(step.c), config.c_block)
        return block_c, max(1, min(_next_power_of_2(step.hw), config.tile // block_c))
    block_hw = min(_next_power_of_2(step.hw), config.hw_block, config.tile)
    return max(1, min(_next_power_of_2(step.c), config.tile // block_hw, config.c_block)), block_hw


@dataclass(frozen=True)
class _LSTMGeometry:
    bn: int
    bc: int
    br: int
    bk: int
    bkg: int  # k-step of the gate matmuls
    groups: int
    split: bool
    wg: Tuple[int, int, int]  # weight-grad BLOCK_M, BLOCK_K, BLOCK_N
    split_k: int  # split path: the shortest split of a reduction (whole k-steps)
    split_ctas: int  # split path: a phase splits into as many parts as fit in this many CTAs
    spread: bool  # fused path: the backward's LSTM over column parts (host._spread_backward)
    stages: int  # the LSTM kernels' num_stages (config.lstm_num_stages)

    def splits(self, reduction: int, ctas: int, split: bool) -> int:
        """host.split_k_launches: the splits of a reduction over a (tiles, parts) grid of `ctas`."""
        if not split:
            return 1
        return min(_cdiv(reduction, self.split_k), max(1, self.split_ctas // ctas))


def weight_grad_blocks(step: Step, config: LSTMConfig, interpreted: bool) -> Tuple[int, int, int]:
    """host.weight_grad_blocks: (BLOCK_M, BLOCK_K, BLOCK_N) of the weight-gradient kernel."""
    bn = 64 if interpreted else 32
    large = (64, 64, bn)
    if weight_grad_tile_count(step, large) < config.weight_grad_ctas:
        return (32, 32, bn)
    return large


def weight_grad_tile_count(s: Step, blocks) -> int:
    """host.weight_grad_tiles."""
    bm, bk = blocks[:2]
    w1 = _cdiv(s.r, bm) * _cdiv(s.c, bk)
    w2 = _cdiv(4 * s.c, bm) * _cdiv(s.r, bk)
    stacked = _cdiv(4 * s.c, bm) * _cdiv(s.c, bk)
    return 2 * (w1 + w2) + 2 * (s.cells - 1) * stacked


def triton_lstm_geometry(step: Step, config: LSTMConfig, interpreted: bool) -> _LSTMGeometry:
    """host.LSTMBlocks / _split_path / forward_groups, and the weight-grad tile."""
    bc = max(16, min(config.block_c, _next_power_of_2(step.c)))
    bk = 64 if interpreted else config.block_k
    split = step.cells == 1 and step.c * step.r >= config.split_min
    spread = step.cells == 1 and not split and step.c * step.r >= config.spread_min
    groups = (
        1 if (split or step.cells > 1) else max(1, min(config.forward_groups, _cdiv(step.c, bc)))
    )
    return _LSTMGeometry(
        bn=config.block_n,
        bc=bc,
        br=max(16, min(config.block_r, _next_power_of_2(step.r))),
        bk=bk,
        bkg=64
        if interpreted
        else min(config.gate_block_k if split else config.fused_gate_block_k, config.block_k),
        groups=groups,
        split=split,
        wg=weight_grad_blocks(step, config, interpreted),
        split_k=_cdiv(config.split_k, bk) * bk,
        split_ctas=config.split_ctas,
        spread=spread,
        stages=lstm_num_stages(step.cells),
    )


def _row_sizes(step: Step, groups: int) -> Dict[str, int]:
    """Row lengths of host.SavedLayout ("saved"), the forward's relu(u) slots ("slots", `groups`
    of them) and host.WorkLayout ("scratch")."""
    c, r, cells = step.c, step.r, step.cells
    return {
        "saved": 2 * r + 2 * c + 2 * c * (cells - 1) + 4 * c * cells,
        "slots": 2 * r * groups,
        "scratch": 2 * r + 4 * c * cells + c,
    }


DIRECT, PARTIAL, FINISH = 0, 1, 2  # lstm_kernels.SplitK


def _split_length(k: int, split: int, splits: int, bk: int) -> int:
    """lstm_kernels._split_range: how much of a reduction of length k split `split` covers."""
    chunk = _cdiv(_cdiv(k, splits), bk) * bk
    begin = split * chunk
    return max(0, min(begin + chunk, k) - begin)


SPLIT_UNROLL = 8  # lstm_kernels.SPLIT_UNROLL


def _sum_partials(p: _Program, splits: int, rows: int, cols: int):
    p.loads["partials"] += splits * rows * cols * 4
    p.steps += _cdiv(splits, SPLIT_UNROLL)  # one L2 round trip per SPLIT_UNROLL splits


def _cells_forward(
    p: _Program,
    s: Step,
    g: _LSTMGeometry,
    tile,
    u_part,
    u_parts,
    part,
    parts,
    ru_slot,
    do_u,
    do_gates,
    mode=DIRECT,
    split=0,
    splits=1,
):
    """_cells_forward_tile."""
    es, nr = 4, min(g.bn, s.n - tile * g.bn)  # state dtype: fp32 for fp32 and half inputs
    c, r = s.c, s.r
    if do_u:
        k = _split_length(c, split, splits, g.bk)
        for r0 in range(u_part * g.br, r, u_parts * g.br):
            rc = min(g.br, r - r0)
            if mode == FINISH:
                _sum_partials(p, splits, nr, rc)
                _sum_partials(p, splits, nr, rc)
                p.loads["wih1.bias"] += rc * 4
                p.loads["whh1.bias"] += rc * 4
            else:
                p.matmul_pair("pooled", "h", es, "wih1", "whh1", nr, k, rc, (g.bn, g.br, g.bk))
                if mode == DIRECT:
                    p.loads["wih1.bias"] += rc * 4
                    p.loads["whh1.bias"] += rc * 4
            if mode == PARTIAL:
                p.stores["partials"] += 2 * nr * rc * 4
                continue
            p.stores["slots"] += 2 * nr * rc * 4
            if ru_slot == 0:
                p.stores["saved"] += 2 * nr * rc * 4
    if not do_gates:
        return
    for cell in range(s.cells):
        k = _split_length(r if cell == 0 else c, split, splits, g.bk)
        for col0 in range(part * g.bc, c, parts * g.bc):
            cc = min(g.bc, c - col0)
            if cell == 0 and mode != PARTIAL:
                p.loads["pooled"] += nr * cc * 4
                p.loads["h"] += nr * cc * es
                p.stores["saved"] += 2 * nr * cc * 4
            if mode == FINISH:
                for _gate in range(4):
                    _sum_partials(p, splits, nr, cc)
                    p.loads["wih2.bias"] += cc * 4
                    p.loads["whh2.bias"] += cc * 4
            else:  # _gate_tiles: A1, A2 once per k-step, the 4 gates' rows of W1 and W2
                a1, a2, ea2, w1, w2 = (
                    ("slots", "slots", 4, "wih2", "whh2")
                    if cell == 0
                    else ("saved", "h", es, "stacked", "stacked")
                )
                p.loads[a1] += nr * k * 4
                p.loads[a2] += nr * k * ea2
                p.loads[w1] += 4 * k * cc * 4
                p.loads[w2] += 4 * k * cc * 4
                p.loop(k, 8, (g.bn, g.bc, g.bkg))
                if mode == DIRECT:
                    bias = ("wih2.bias", "whh2.bias") if cell == 0 else ("stacked.bias",) * 2
                    for b in bias:
                        p.loads[b] += 4 * cc * 4
            if mode == PARTIAL:
                p.stores["partials"] += 4 * nr * cc * 4
                continue
            p.loads["c"] += nr * cc * es
            p.stores["state"] += 2 * nr * cc * es
            if cell + 1 < s.cells:  # the next cell's input and its h copy
                if s.masks:
                    p.loads["masks"] += nr * cc * es
                p.loads["h"] += nr * cc * es
                p.stores["saved"] += 2 * nr * cc * 4
            p.stores["saved"] += 4 * nr * cc * 4  # the gates


def _lstm_backward(
    p: _Program,
    s: Step,
    g: _LSTMGeometry,
    tile,
    part,
    parts,
    phase,
    mode=DIRECT,
    split=0,
    splits=1,
):
    """_lstm_backward_kernel; phase in fused, gates, reduced_grad, input_grad."""
    es, nr = 4, min(g.bn, s.n - tile * g.bn)
    c, r = s.c, s.r
    gates = phase in ("fused", "gates")
    for step in range(s.cells):
        cell = s.cells - 1 - step
        for col0 in range(part * g.bc, c if gates else 0, parts * g.bc):
            cc = min(g.bc, c - col0)
            if s.grad_state:
                p.loads["grad_state"] += 2 * nr * cc * es
            p.loads["grad_a" if cell == s.cells - 1 else "scratch"] += nr * cc * 4
            p.loads["saved"] += 4 * nr * cc * 4
            p.loads["c"] += nr * cc * es
            if cell == s.cells - 1:
                p.stores["attention"] += nr * cc * 4
            p.stores["scratch"] += 4 * nr * cc * 4
            p.stores["grad_c"] += nr * cc * es
        if cell > 0:
            for col0 in range(0, c, g.bc):
                cc = min(g.bc, c - col0)
                blocks = (g.bn, g.bc, g.bk)
                p.matmul_pair("scratch", "scratch", 4, "stacked", "stacked", nr, 4 * c, cc, blocks)
                p.stores["grad_h"] += nr * cc * es
                if s.masks:
                    p.loads["masks"] += nr * cc * es
                p.stores["scratch"] += nr * cc * 4
            continue
        k = _split_length(4 * c, split, splits, g.bk)
        for r0 in range(part * g.br, r if phase in ("fused", "reduced_grad") else 0, parts * g.br):
            rc = min(g.br, r - r0)
            if mode == FINISH:
                _sum_partials(p, splits, nr, rc)
                _sum_partials(p, splits, nr, rc)
            else:
                blocks = (g.bn, g.br, g.bk)
                p.matmul_pair("scratch", "scratch", 4, "wih2", "whh2", nr, k, rc, blocks)
            if mode == PARTIAL:
                p.stores["partials"] += 2 * nr * rc * 4
            else:
                p.loads["saved"] += 2 * nr * rc * 4
                p.stores["scratch"] += 2 * nr * rc * 4
        k = _split_length(r, split, splits, g.bk)
        for col0 in range(part * g.bc, c if phase in ("fused", "input_grad") else 0, parts * g.bc):
            cc = min(g.bc, c - col0)
            if mode == FINISH:
                _sum_partials(p, splits, nr, cc)
                _sum_partials(p, splits, nr, cc)
            else:
                blocks = (g.bn, g.bc, g.bk)
                p.matmul_pair("scratch", "scratch", 4, "wih1", "whh1", nr, k, cc, blocks)
            if mode == PARTIAL:
                p.stores["partials"] += 2 * nr * cc * 4
            else:
                p.stores["grad_pooled"] += nr * cc * 4
                p.stores["grad_h"] += nr * cc * es


def _weight_grad(p: _Program, s: Step, g: _LSTMGeometry, job: int, tile: int):
    """_weight_grad_kernel program for `tile` (row-major) of weight gradient `job`."""
    c, r = s.c, s.r
    bm, bk, bn = g.wg
    if job < 4:
        m_size, k_size = (r, c) if job % 2 == 0 else (4 * c, r)
    else:
        m_size, k_size = 4 * c, c
    i, j = divmod(tile, _cdiv(k_size, bk))
    mv, kv = min(bm, m_size - i * bm), min(bk, k_size - j * bk)
    p.matmul("scratch", 4, "saved", 4, mv, s.n, kv, (bm, bk, bn))  # D from the backward, V saved
    p.stores["grad_w"] += mv * kv * 4
    if j == 0:
        p.loads["scratch"] += mv * s.n * 4
        p.steps += _cdiv(s.n, bn)
        p.stores["grad_w"] += mv * 4


def _weight_grad_jobs(s: Step, g: _LSTMGeometry):
    """(job, tiles) of host.weight_grad_tiles, in grid order."""
    bm, bk = g.wg[:2]
    w1 = _cdiv(s.r, bm) * _cdiv(s.c, bk)
    w2 = _cdiv(4 * s.c, bm) * _cdiv(s.r, bk)
    stacked = _cdiv(4 * s.c, bm) * _cdiv(s.c, bk)
    return [(0, w1), (1, w2), (2, w1), (3, w2)] + [
        (4 + k, stacked) for k in range(2 * (s.cells - 1))
    ]


def _launch_of(kernel: str, grid, programs: Sequence[_Program]) -> Tuple[Launch, List[_Program]]:
    launch = Launch(kernel=kernel, grid=tuple(grid))
    for p in programs:
        launch.loads += sum(p.loads.values())
        launch.stores += sum(p.stores.values())
    return launch, list(programs)


# ------------------------------------------------------------------------------------------------
# The Triton backend
# ------------------------------------------------------------------------------------------------


def _buffer_bytes(s: Step) -> Dict[str, int]:
    """Sizes of the (N, C)-sized and weight buffers: the DRAM bytes of a launch touching them."""
    nc4 = s.n * s.c * 4
    c, r, cells = s.c, s.r, s.cells
    return {
        "pooled": nc4,
        "h": cells * nc4,
        "c": cells * nc4,
        "state": 2 * cells * nc4,
        "grad_state": 2 * cells * nc4,
        "grad_c": cells * nc4,
        "grad_h": cells * nc4,
        "grad_a": nc4,
        "attention": nc4,
        "grad_pooled": nc4,
        "masks": max(0, cells - 1) * nc4,
        "wih1": r * c * 4,
        "whh1": r * c * 4,
        "wih2": 4 * c * r * 4,
        "whh2": 4 * c * r * 4,
        "wih1.bias": r * 4,
        "whh1.bias": r * 4,
        "wih2.bias": 16 * c,
        "whh2.bias": 16 * c,
        "stacked": max(0, cells - 1) * (8 * c * c + 8 * c) * 4,
        "stacked.bias": max(0, cells - 1) * 8 * c * 4,
        "grad_w": s.weight_elems() * 4,
    }


def _lstm_launch(
    kernel, grid, programs, s: Step, rows: Dict[str, int], gpu: GPU, partial_bytes: int = 0
) -> Launch:
    """`rows`: _row_sizes, for the DRAM bytes of the saved, slots and scratch buffers."""
    launch, _ = _launch_of(kernel, grid, programs)
    sizes = dict(_buffer_bytes(s), partials=partial_bytes)
    sizes.update({name: s.n * row * 4 for name, row in rows.items()})
    requested, stored = Counter(), Counter()
    for p in programs:
        requested.update(p.loads)
        stored.update(p.stores)
    dram = sum(min(b, sizes[k]) for k, b in requested.items())
    dram += sum(min(b, sizes[k]) for k, b in stored.items())
    launch.dram = dram
    launch.l2 = launch.loads + launch.stores - dram
    times = [_lstm_cta_us(p, gpu) for p in programs]
    launch.serial_us = _makespan(times, gpu.sms * LSTM_CTAS_PER_SM)
    return launch


def _lstm_cta_us(p: "_Program", gpu: GPU) -> float:
    """One LSTM CTA: a dot loop is software-pipelined (Triton's default num_stages, cp.async in
    the PTX): its first k-step waits a full L2 latency, each later one latency / (stages - 1);
    a plain load loop waits a full latency per iteration; the FMAs run on the SM's fp32 lanes. A
    CTA without work costs its scheduling only."""
    if not (p.steps or p.k_steps):
        return EMPTY_CTA_US
    pipelined = p.loops + (p.k_steps - p.loops) / (p.stages - 1)
    return (p.steps + pipelined) * gpu.l2_latency_us + p.fma / gpu.fma_per_sm_per_us


def _makespan(times: Sequence[float], slots: int) -> float:
    """A greedy scheduler's span of CTAs of these durations over `slots` resident places: the
    longest CTA, or the total work spread over the places, whichever is larger."""
    return max(max(times, default=0.0), sum(times) / slots)


def _map_launch(
    kernel,
    grid,
    s: Step,
    loads: int,
    stores: int,
    dram: int,
    tiles_per_cta: int,
    num_warps: int,
    gpu: GPU,
) -> Launch:
    launch = Launch(kernel=kernel, grid=tuple(grid), loads=loads, stores=stores, dram=dram)
    launch.l2 = loads + stores - dram
    resident = gpu.sms * max(1, gpu.warps_per_sm // (2 * num_warps))  # registers: half the warps
    launch.serial_us = _makespan([tiles_per_cta * gpu.dram_latency_us] * launch.ctas, resident)
    return launch


def _phase_launches(kernel, s, g, tiles, parts, reduction, width, rows, program, gpu, split_k=None):
    """host.split_k_launches of one LSTM phase: DIRECT, or PARTIAL then FINISH (split_k, default
    the split path's flag); `program(p, tile, part, mode, split, splits)` walks one CTA."""
    splits = g.splits(reduction, tiles * parts, g.split if split_k is None else split_k)
    if splits <= 1:
        plan = [(DIRECT, 1)]
    else:
        plan = [(PARTIAL, splits), (FINISH, 1)]
    launches = []
    for mode, grid_splits in plan:
        programs = []
        for tile in range(tiles):
            for part in range(parts):
                for split in range(grid_splits):
                    p = _Program(stages=g.stages)
                    program(p, tile, part, mode, split, splits)
                    programs.append(p)
        partials = splits * s.n * width * 4
        launches.append(
            _lstm_launch(kernel, (tiles, parts, grid_splits), programs, s, rows, gpu, partials)
        )
    return launches


def triton_launches(
    s: Step,
    backward: bool,
    settings: Optional[KernelSettings] = None,
    interpreted: bool = False,
    gpu: GPU = H100,
) -> List[Launch]:
    """The launches of host.forward (backward=False) or host.backward, in order."""
    settings = settings or KernelSettings()
    mc = settings.map
    bc, bhw = triton_map_blocks(s, mc)
    n, c, hw = s.n, s.c, s.hw
    nc4, maps = n * c * 4, s.map_bytes
    hw_blocks, c_blocks = _cdiv(hw, bhw), _cdiv(c, bc)
    elementwise_grid = (n * c_blocks * hw_blocks,)
    g = triton_lstm_geometry(s, settings.lstm, interpreted)
    tiles = _cdiv(n, g.bn)
    r_parts, c_parts = _cdiv(s.r, g.br), _cdiv(c, g.bc)
    launches = []
    splits, per_split = hw_split_plan(s, bc, bhw, mc)
    split_tiles = _cdiv(per_split, bhw)  # tiles of H*W per program of pool / grad attention
    partials = splits * nc4 if splits > 1 else 0
    if not backward:
        launches.append(
            _map_launch(
                "_pool_kernel",
                (n, c_blocks, splits),
                s,
                maps,
                max(nc4, partials),
                maps + max(nc4, partials),
                split_tiles,
                mc.num_warps,
                gpu,
            )
        )
        launches += _sum_splits_launches(s, splits, gpu)
        rows = _row_sizes(s, g.groups)
        if g.split:
            phases = [("reduced", r_parts, c, 2 * s.r), ("gates", c_parts, s.r, 4 * c)]
        else:
            phases = [("fused", g.groups, 0, 0)]
        for phase, parts, reduction, width in phases:

            def program(p, tile, part, mode, split, splits, phase=phase, parts=parts):
                if phase == "fused":  # every column part computes u into its own slot
                    _cells_forward(p, s, g, tile, 0, 1, part, parts, part, True, True)
                else:
                    u = phase == "reduced"
                    _cells_forward(
                        p, s, g, tile, part, parts, part, parts, 0, u, not u, mode, split, splits
                    )

            launches += _phase_launches(
                "_lstm_forward_kernel", s, g, tiles, parts, reduction, width, rows, program, gpu
            )
        loads = maps * (2 if s.identity else 1) + hw_blocks * nc4
        launches.append(
            _map_launch(
                "_scale_kernel",
                elementwise_grid,
                s,
                loads,
                maps,
                loads - hw_blocks * nc4 + nc4 + maps,
                1,
                mc.num_warps,
                gpu,
            )
        )
        return launches
    # backward
    ga_loads = maps * (3 if s.relu else 2)
    ga_stores = max(nc4, partials) + (maps if s.identity else 0)
    launches.append(
        _map_launch(
            "_grad_attention_kernel",
            (n, c_blocks, splits),
            s,
            ga_loads,
            ga_stores,
            ga_loads + ga_stores,
            split_tiles,
            mc.num_warps,
            gpu,
        )
    )
    launches += _sum_splits_launches(s, splits, gpu)
    rows = _row_sizes(s, g.groups)
    # (phase, parts, its reduction length, the row length of its partials, split-K)
    gradients = [
        ("reduced_grad", r_parts, 4 * c, 2 * s.r, True),
        ("input_grad", c_parts, s.r, 2 * c, True),
    ]
    if g.split or g.spread:  # the gates' gradients from the saved gates: pointwise, no split
        phases = [("gates", c_parts, 0, 0, False)] + gradients
    else:
        phases = [("fused", 1, 0, 0, False)]
    for phase, parts, reduction, width, split_k in phases:

        def program(p, tile, part, mode, split, splits, phase=phase, parts=parts):
            _lstm_backward(p, s, g, tile, part, parts, phase, mode, split, splits)

        launches += _phase_launches(
            "_lstm_backward_kernel",
            s,
            g,
            tiles,
            parts,
            reduction,
            width,
            rows,
            program,
            gpu,
            split_k,
        )
    programs = []
    for job, tiles_of_job in _weight_grad_jobs(s, g):
        for tile in range(tiles_of_job):
            p = _Program()
            _weight_grad(p, s, g, job, tile)
            programs.append(p)
    wg_grid = (len(programs),)
    launches.append(_lstm_launch("_weight_grad_kernel", wg_grid, programs, s, rows, gpu))
    z_loads = maps * (2 if (s.relu and not s.identity) else 1)
    gi_loads = z_loads + 2 * hw_blocks * nc4
    launches.append(
        _map_launch(
            "_grad_input_kernel",
            elementwise_grid,
            s,
            gi_loads,
            maps,
            z_loads + 2 * nc4 + maps,
            1,
            mc.num_warps,
            gpu,
        )
    )
    return launches


# ------------------------------------------------------------------------------------------------
# The CUDA backend (csrc/): modelled from its launch code, not checked by an interpreter
# ------------------------------------------------------------------------------------------------

CUDA_STREAM_THREADS, CUDA_STREAM_ROW_LANES, CUDA_FUSED_THREADS = 256, 64, 512
CUDA_FUSED_MAX_CHANNELS, CUDA_FUSED_SMALL_MAP, CUDA_GEMM = 256, 1 << 14, (32, 32, 32)
CUDA_HIDDEN_GRAD_SPLIT_K = HIDDEN_GRAD_SPLIT_K  # chunks of K = 4C of hidden_grad_kernel
CUDA_REDUCED_LINEAR_SPLIT_K = REDUCED_LINEAR_SPLIT_K  # chunks of K = C of reduced_linear_kernel
CUDA_GATE_SPLIT_K = GATE_SPLIT_K  # chunks of K = R of each path of gate_gemm_kernel
CUDA_INPUT_GRAD_SPLIT_K = INPUT_GRAD_SPLIT_K  # chunks of K = R of input_grad_kernel
CUDA_FINISH_UNROLL = 8  # loads in flight per thread of the split-sum kernels (#pragma unroll 8)


def _cuda_vec(s: Step) -> int:
    """16-byte accesses when the contiguous axis divides into them (aligned allocations)."""
    vec = 16 // s.e
    return vec if (s.c if s.channels_last else s.hw) % vec == 0 else 1


CUDA_UNROLL = {"pool": 4, "scale": 2, "grad_attention": 2, "grad_input": 2}  # Op::kUnroll base
CUDA_MAP_REDUCE_MIN_BLOCKS = MAP_REDUCE_MIN_BLOCKS  # kMapReduceMinBlocks


def _cuda_unroll(s: Step, kernel: str) -> int:
    """stream_unroll: the base, doubled up to 4 when an access is one 2-byte element."""
    base = CUDA_UNROLL[kernel]
    return 2 * base if s.e * _cuda_vec(s) < 4 and base < 4 else base


def _cuda_plane_lanes(s: Step, unroll: int) -> int:
    """stream_plane_lanes: lanes per NCHW plane, the fewest (a power of 2 up to 32) whose
    accesses cover the plane at once."""
    accesses = _cdiv(s.hw, _cuda_vec(s) * unroll)
    return min(32, _next_power_of_2(accesses))


def _cuda_row_lanes(s: Step) -> int:
    return min(_cdiv(s.c, _cuda_vec(s)), CUDA_STREAM_ROW_LANES)


def cuda_map_reduce_splits(s: Step) -> Tuple[int, int]:
    """map_reduce_splits and map_split_rows: (splits, rows per split) of H*W of the channels_last
    streaming passes; NCHW: (1, H*W)."""
    if not s.channels_last:
        return 1, s.hw
    lanes = _cuda_row_lanes(s)
    blocks = s.n * _cdiv(s.c, lanes * _cuda_vec(s))
    rows_per_step = CUDA_STREAM_THREADS // lanes
    steps = _cdiv(s.hw, rows_per_step)
    splits = 1
    if blocks < CUDA_MAP_REDUCE_MIN_BLOCKS:
        splits = min(steps, _cdiv(CUDA_MAP_REDUCE_MIN_BLOCKS, blocks))
        splits = _cdiv(steps, _cdiv(steps, splits))
    return splits, _cdiv(steps, splits) * rows_per_step


def _cuda_stream(kernel: str, s: Step, loads: int, stores: int, gpu: GPU) -> List[Launch]:
    """A streaming pass of csrc (pool, scale, grad attention, grad input) whose threads each have
    `_cuda_unroll` accesses in flight (stream_accesses, Op::kUnroll). channels_last: (N, channel
    tiles, H*W splits) blocks, each walking its rows 256/lanes at a time, the reductions' split
    sums added by sum_splits_kernel (the apply passes take the same splits); NCHW: a group of
    _cuda_plane_lanes lanes per (n, c) plane."""
    vec, unroll = _cuda_vec(s), _cuda_unroll(s, kernel)
    reduction = kernel in ("pool", "grad_attention")
    splits = 1
    if s.channels_last:
        lanes = _cuda_row_lanes(s)
        splits, rows = cuda_map_reduce_splits(s)
        grid = (s.n, _cdiv(s.c, lanes * vec), splits)
        steps = _cdiv(rows, (CUDA_STREAM_THREADS // lanes) * unroll)
    else:
        lanes = _cuda_plane_lanes(s, unroll)
        grid = (_cdiv(s.n * s.c, CUDA_STREAM_THREADS // lanes),)
        steps = _cdiv(s.hw, lanes * vec * unroll)
    nc4 = s.n * s.c * 4
    # the (splits, N, C) partial sums replace the (N, C) sums
    partials = (splits - 1) * nc4 if reduction else 0
    name = "scale_residual_kernel" if kernel == "scale" else kernel + "_kernel"
    launch = Launch(name, grid, loads=loads, stores=stores + partials, dram=loads + stores)
    launch.l2 = partials
    resident = gpu.sms * (gpu.warps_per_sm // (CUDA_STREAM_THREADS // 32))
    launch.serial_us = _makespan([steps * gpu.dram_latency_us] * launch.ctas, resident)
    if splits == 1 or not reduction:
        return [launch]
    finish = Launch(
        "sum_splits_kernel",
        (_cdiv(s.n * s.c, CUDA_STREAM_THREADS),),
        loads=splits * nc4,
        stores=nc4,
        dram=0,  # the partial sums were just written: L2; the (N, C) sums are counted above
    )
    finish.l2 = finish.loads + finish.stores
    finish.serial_us = _cdiv(splits, CUDA_FINISH_UNROLL) * gpu.l2_latency_us
    return [launch, finish]


def _cuda_gemm(kernel: str, grid, k: int, loads: int, stores: int, dram: int, gpu: GPU) -> Launch:
    """A GemmTile launch (32x32 tile, k 32 per shared-memory stage, 128 threads). The next stage
    loads while the current one multiplies (gemm_tile_accumulate): a block's chain is one load
    latency, then per stage the larger of a load latency and its FMAs."""
    launch = Launch(kernel, tuple(grid), loads=loads, stores=stores, dram=dram)
    launch.l2 = max(0, loads + stores - dram)
    bm, bn, bk = CUDA_GEMM
    stage_fma_us = bm * bn * bk / (gpu.fma_per_sm_per_us / 4)  # 4 resident blocks share an SM
    steps = _cdiv(k, bk)
    chain = gpu.l2_latency_us + (steps - 1) * max(gpu.l2_latency_us, stage_fma_us) + stage_fma_us
    resident = gpu.sms * 4
    launch.serial_us = _makespan([chain] * launch.ctas, resident)
    return launch


def cuda_fused_round_trips(s: Step, kernel: str) -> int:
    """DRAM round trips of one streaming pass of a one-block-per-sample kernel: channels_last,
    block_rows_reduce / block_rows_apply (a row of C per fused_row_lanes lanes, the block's
    groups walking the rows, `_cuda_unroll` in flight); NCHW, block_planes_reduce /
    block_planes_apply (a group of _cuda_plane_lanes lanes per plane, the block's groups walking
    the channels)."""
    vec, unroll = _cuda_vec(s), _cuda_unroll(s, kernel)
    if s.channels_last:
        groups = CUDA_FUSED_THREADS // _cdiv(s.c, vec)
        return _cdiv(_cdiv(s.hw, groups), unroll)
    lanes = _cuda_plane_lanes(s, unroll)
    return _cdiv(s.c, CUDA_FUSED_THREADS // lanes) * _cdiv(s.hw, lanes * vec * unroll)


def cuda_fused_path(s: Step, gpu: GPU = H100) -> bool:
    """cuda_dia_step._fused_path with path='auto'."""
    fits = s.cells == 1 and s.c <= CUDA_FUSED_MAX_CHANNELS and 2 * s.r <= CUDA_FUSED_THREADS
    return fits and (s.n >= gpu.sms // 2 or s.c * s.hw <= CUDA_FUSED_SMALL_MAP)


def cuda_launches(s: Step, backward: bool, gpu: GPU = H100) -> List[Launch]:
    """The launches of cuda_dia_step.forward / backward (one cell)."""
    if s.cells != 1:
        raise ValueError(f"cells: the cuda model covers one cell, got {s.cells}")
    n, c, r, maps, nc4 = s.n, s.c, s.r, s.map_bytes, s.n * s.c * 4
    w = s.weight_elems() * 4
    # one sample's cell 0, forward or backward: two reduced and two gate linears (the backward
    # starts from the saved u and gates: Cell0Saved)
    cell_fma = 2 * c * r + 8 * c * r
    saved = n * (2 * r + 4 * c) * 4  # u and the gate pre-activations (the pooled mean: in nc4)
    if cuda_fused_path(s, gpu):
        launch = Launch(
            "fused_backward_kernel" if backward else "fused_forward_kernel",
            (n,),
            loads=maps * (5 if backward else 3) + n * w + (saved if backward else 0),
            stores=maps * (2 if backward else 1) + (0 if backward else saved),
        )
        launch.dram = maps * (6 if backward else 3) + w + saved
        launch.l2 = launch.loads + launch.stores - launch.dram
        passes = ("grad_attention", "grad_input") if backward else ("pool", "scale")
        per_block = sum(cuda_fused_round_trips(s, k) for k in passes) * gpu.dram_latency_us
        per_block += cell_fma / (gpu.fma_per_sm_per_us / 4) + 6 * gpu.l2_latency_us
        launch.serial_us = _cdiv(n, gpu.sms) * per_block
        launches = [launch]
        if backward:
            launches.append(_cuda_weight_grad(s, gpu))
        return launches
    tiles = _cdiv(n, CUDA_GEMM[0])
    if not backward:
        return [
            *_cuda_stream("pool", s, maps, nc4, gpu),
            *_cuda_reduced_linear(s, tiles, gpu),
            *_cuda_gates(s, tiles, gpu),
            *_cuda_stream("scale", s, maps * 2, maps, gpu),
        ]
    return [
        *_cuda_stream("grad_attention", s, maps * 3, maps + nc4, gpu),
        _cuda_gate_backward(s, gpu),
        *_cuda_hidden_grad(s, tiles, gpu),
        *_cuda_input_grad(s, tiles, gpu),
        _cuda_weight_grad(s, gpu),
        *_cuda_stream("grad_input", s, maps + 2 * nc4, maps, gpu),
    ]


def _cuda_gates(s: Step, tiles: int, gpu: GPU) -> List[Launch]:
    """gate_gemm_kernel (grid axis z: 2 paths x chunks of K = R, gate_splits(R) partial sums of
    the (N, 4C) pre-activations), then the pointwise gate_forward_kernel adding them in order, one
    thread per (sample, channel), saving the sums."""
    n, c, r, nc4 = s.n, s.c, s.r, s.n * s.c * 4
    splits = 2 * _cdiv(r, CUDA_GATE_SPLIT_K)
    partials = splits * 4 * nc4
    gemm = _cuda_gemm(
        "gate_gemm_kernel",
        (_cdiv(4 * c, 32), tiles, splits),
        min(r, CUDA_GATE_SPLIT_K),
        2 * n * r * 4 * _cdiv(4 * c, 32) + 8 * c * r * 4 * tiles,
        partials,
        2 * n * r * 4 + 8 * c * r * 4 + partials,
        gpu,
    )
    # c0 in; h', c' and the 4 gate pre-activations (saved) out
    pointwise = Launch(
        "gate_forward_kernel",
        (_cdiv(n * c, CUDA_STREAM_THREADS),),
        loads=partials + nc4 + 2 * 4 * c * 4,
        stores=6 * nc4,
    )
    pointwise.dram = 7 * nc4 + 2 * 4 * c * 4
    pointwise.l2 = partials
    pointwise.serial_us = (_cdiv(splits, CUDA_FINISH_UNROLL) + 1) * gpu.l2_latency_us
    return [gemm, pointwise]


def _cuda_gate_backward(s: Step, gpu: GPU) -> Launch:
    """gate_backward_kernel, one thread per (sample, channel): the 4 saved gate pre-activations,
    c0, grad h' and da, grad c' in; the 4 gate gradients, grad c0 and h out."""
    nc4 = s.n * s.c * 4
    launch = Launch(
        "gate_backward_kernel",
        (_cdiv(s.n * s.c, CUDA_STREAM_THREADS),),
        loads=8 * nc4,
        stores=6 * nc4,
    )
    launch.dram = 14 * nc4
    launch.serial_us = gpu.dram_latency_us
    return launch


def _cuda_split_k_finish(kernel: str, s: Step, splits: int, gpu: GPU) -> Launch:
    """A finish kernel adding `splits` (2, N, R) split-K partial sums in order (8 loads in flight
    per thread: #pragma unroll 8), reading u or writing it."""
    size = 2 * s.n * s.r * 4
    finish = Launch(
        kernel,
        (_cdiv(2 * s.n * s.r, CUDA_STREAM_THREADS),),
        loads=splits * size + size,
        stores=size,
        dram=2 * size,
    )
    finish.l2 = splits * size
    finish.serial_us = _cdiv(splits, CUDA_FINISH_UNROLL) * gpu.l2_latency_us
    return finish


def _cuda_reduced_linear(s: Step, tiles: int, gpu: GPU) -> List[Launch]:
    """reduced_linear_kernel over K = C in reduced_linear_splits(C) chunks (grid axis z: 2 paths x
    chunks), then reduced_linear_finish_kernel adding the chunks in order when there are several."""
    n, c, r, nc4 = s.n, s.c, s.r, s.n * s.c * 4
    splits = _cdiv(c, CUDA_REDUCED_LINEAR_SPLIT_K)
    partials = splits * 2 * n * r * 4
    out = partials if splits > 1 else 2 * n * r * 4
    gemm = _cuda_gemm(
        "reduced_linear_kernel",
        (_cdiv(r, 32), tiles, 2 * splits),
        min(c, CUDA_REDUCED_LINEAR_SPLIT_K),
        2 * n * c * 4 * _cdiv(r, 32) + 2 * r * c * 4 * tiles,
        out,
        2 * nc4 + 2 * r * c * 4 + out,
        gpu,
    )
    if splits == 1:
        return [gemm]
    finish = _cuda_split_k_finish("reduced_linear_finish_kernel", s, splits, gpu)
    finish.loads -= 2 * n * r * 4  # reads the biases, not u
    finish.dram = 2 * n * r * 4
    return [gemm, finish]


def _cuda_input_grad(s: Step, tiles: int, gpu: GPU) -> List[Launch]:
    """input_grad_kernel over K = R in input_grad_splits(R) chunks (grid axis z: 2 paths x
    chunks), then input_grad_finish_kernel adding the chunks in order when there are several."""
    n, c, r, nc4 = s.n, s.c, s.r, s.n * s.c * 4
    splits = _cdiv(r, CUDA_INPUT_GRAD_SPLIT_K)
    out = splits * 2 * nc4 if splits > 1 else 2 * nc4
    gemm = _cuda_gemm(
        "input_grad_kernel",
        (_cdiv(c, 32), tiles, 2 * splits),
        min(r, CUDA_INPUT_GRAD_SPLIT_K),
        2 * n * r * 4 * _cdiv(c, 32) + 2 * r * c * 4 * tiles,
        out,
        2 * n * r * 4 + 2 * r * c * 4 + out,
        gpu,
    )
    if splits == 1:
        return [gemm]
    finish = Launch(
        "input_grad_finish_kernel",
        (_cdiv(2 * n * c, CUDA_STREAM_THREADS),),
        loads=out,
        stores=2 * nc4,
        dram=2 * nc4,
    )
    finish.l2 = out
    finish.serial_us = _cdiv(splits, CUDA_FINISH_UNROLL) * gpu.l2_latency_us
    return [gemm, finish]


def _cuda_hidden_grad(s: Step, tiles: int, gpu: GPU) -> List[Launch]:
    """hidden_grad_kernel over K = 4C in hidden_grad_splits(C) chunks (grid axis z: 2 paths x
    chunks), then hidden_grad_finish_kernel adding the chunks in order when there are several."""
    n, c, r, nc4 = s.n, s.c, s.r, s.n * s.c * 4
    splits = _cdiv(4 * c, CUDA_HIDDEN_GRAD_SPLIT_K)
    partials = splits * 2 * n * r * 4
    gemm = _cuda_gemm(
        "hidden_grad_kernel",
        (_cdiv(r, 32), tiles, 2 * splits),
        min(4 * c, CUDA_HIDDEN_GRAD_SPLIT_K),
        2 * n * 4 * c * 4 * _cdiv(r, 32) + 8 * c * r * 4 * tiles,
        partials if splits > 1 else 2 * n * r * 4,
        4 * nc4 + 8 * c * r * 4 + (partials if splits > 1 else 2 * n * r * 4),
        gpu,
    )
    if splits == 1:
        return [gemm]
    return [gemm, _cuda_split_k_finish("hidden_grad_finish_kernel", s, splits, gpu)]


def _cuda_weight_grad(s: Step, gpu: GPU) -> Launch:
    c, r, n = s.c, s.r, s.n
    problems = [(4 * c, r), (4 * c, r), (r, c), (r, c)]
    tiles = sum(_cdiv(m, 32) * _cdiv(k + 1, 32) for m, k in problems)
    loads = sum(_cdiv(k + 1, 32) * m * n * 4 + _cdiv(m, 32) * k * n * 4 for m, k in problems)
    dram = 2 * n * 4 * c * 4 + 2 * n * r * 4 + 2 * n * c * 4 + s.weight_elems() * 4
    return _cuda_gemm("weight_grad_kernel", (tiles,), n, loads, s.weight_elems() * 4, dram, gpu)


# ------------------------------------------------------------------------------------------------
# Prediction, floor, table
# ------------------------------------------------------------------------------------------------


def predict(launches: List[Launch], gpu: GPU = H100) -> float:
    """Predicted microseconds of a list of launches: each one's launch cost plus the largest of
    its DRAM time (at HBM_EFFICIENCY of peak), its L2 time and its serial critical path."""
    total = 0.0
    for launch in launches:
        launch.predicted_us = gpu.launch_us + max(
            launch.dram / (HBM_EFFICIENCY * gpu.hbm_bytes_per_us),
            launch.l2 / gpu.l2_bytes_per_us,
            launch.serial_us,
        )
        total += launch.predicted_us
    return total


def minimum_bytes(s: Step, backward: bool) -> int:
    """Bytes any implementation must move: each input read once, each output written once."""
    maps, nc4 = s.map_bytes, s.n * s.c * 4
    w = s.weight_elems() * 4
    state = 2 * s.cells * nc4
    if not backward:  # x, identity -> out; h, c, weights -> h', c'
        return maps * (2 + s.identity) + 2 * state + w
    # grad_out, x, out (relu mask) -> grad_x, grad_identity; h, c, pooled, grad_h', grad_c'
    # -> grad_h, grad_c, grad_w
    return maps * (3 + s.relu + s.identity) + 3 * state + nc4 + 2 * w


def launches_of(
    s: Step,
    backend: str,
    backward: bool,
    gpu: GPU = H100,
    settings: Optional[KernelSettings] = None,
) -> List[Launch]:
    """The launches of one pass; `settings` (Triton only, default KernelSettings()) as the host
    wrappers would get them."""
    if backend == "triton":
        return triton_launches(s, backward, settings, gpu=gpu)
    if backend == "cuda":
        return cuda_launches(s, backward, gpu)
    raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")


@dataclass
class Row:
    step: Step
    backend: str
    forward_us: float
    backward_us: float
    floor_us: float
    launches: int
    lstm_us: float  # the LSTM launches of the backward

    @property
    def ratio(self) -> float:
        return (self.forward_us + self.backward_us) / self.floor_us


@functools.lru_cache(maxsize=None)
def row(s: Step, backend: str, gpu: GPU = H100, settings: Optional[KernelSettings] = None) -> Row:
    fwd = launches_of(s, backend, False, gpu, settings)
    bwd = launches_of(s, backend, True, gpu, settings)
    f_us, b_us = predict(fwd, gpu), predict(bwd, gpu)
    count = len(fwd) + len(bwd)
    floor = (minimum_bytes(s, False) + minimum_bytes(s, True)) / (
        HBM_EFFICIENCY * gpu.hbm_bytes_per_us
    ) + gpu.launch_us * count
    lstm = sum(x.predicted_us for x in bwd if not _is_map_kernel(x.kernel))
    return Row(s, backend, f_us, b_us, floor, count, lstm)


def _is_map_kernel(kernel: str) -> bool:
    return any(k in kernel for k in ("pool", "scale", "grad_attention", "grad_input"))


def benchmark_steps() -> List[Step]:
    return [
        Step(*shape, dtype=dtype, channels_last=cl)
        for shape in BENCHMARK_SHAPES
        for dtype in ("float32", "bfloat16")
        for cl in (False, True)
    ]


def table(rows: List[Row]) -> List[str]:
    lines = [
        "| step | backend | launches | floor us | fwd us | bwd us | bwd LSTM us | pred/floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "" if r.ratio <= CHECK_RATIO else " ✗"
        lines.append(
            f"| {r.step.label()} | {r.backend} | {r.launches} | {r.floor_us:.1f} | "
            f"{r.forward_us:.1f} | {r.backward_us:.1f} | {r.lstm_us:.1f} | {r.ratio:.2f}{mark} |"
        )
    return lines


def launch_table(
    s: Step, backend: str, gpu: GPU = H100, settings: Optional[KernelSettings] = None
) -> List[str]:
    lines = [
        f"{s.label()} {backend}",
        "| pass | kernel | grid | CTAs | loads MB | stores MB | DRAM MB | serial us | pred us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, backward in (("fwd", False), ("bwd", True)):
        launches = launches_of(s, backend, backward, gpu, settings)
        predict(launches, gpu)
        for x in launches:
            lines.append(
                f"| {name} | {x.kernel} | {x.grid} | {x.ctas} | {x.loads / 1e6:.2f} | "
                f"{x.stores / 1e6:.2f} | {x.dram / 1e6:.2f} | {x.serial_us:.1f} | "
                f"{x.predicted_us:.1f} |"
            )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when a prediction exceeds {CHECK_RATIO}x the floor",
    )
    parser.add_argument("--backend", choices=("triton", "cuda", "both"), default="both")
    parser.add_argument(
        "--lstm",
        metavar="FIELDS",
        help="Triton LSTM settings as DIA_FUSED_TRITON_LSTM takes them, e.g. the kernels before "
        "the split-K path: split_min=65536,block_c=64,block_r=64,block_k=32,split_k=1048576",
    )
    parser.add_argument(
        "--map",
        metavar="FIELDS",
        help="Triton map settings (DIA_FUSED_TRITON_MAP), e.g. min_ctas=0",
    )
    parser.add_argument(
        "--launches", metavar="NxCxHxW", help="also list every launch of this shape (fp32 NCHW)"
    )
    args = parser.parse_args(argv)
    backends = ("triton", "cuda") if args.backend == "both" else (args.backend,)
    settings = KernelSettings(lstm=LSTMConfig.from_env(args.lstm), map=MapConfig.from_env(args.map))
    rows = [row(s, b, H100, settings) for s in benchmark_steps() for b in backends]
    print(f"Predicted forward+backward on {H100.name} (model estimates, not measurements)")
    print("\n".join(table(rows)))
    if args.launches:
        shape = tuple(int(v) for v in args.launches.split("x"))
        for b in backends:
            print()
            print("\n".join(launch_table(Step(*shape), b, H100, settings)))
    failing = [r for r in rows if r.ratio > CHECK_RATIO]
    if args.check:
        print(f"\n{len(rows) - len(failing)} of {len(rows)} steps within {CHECK_RATIO}x the floor")
        return 1 if failing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
