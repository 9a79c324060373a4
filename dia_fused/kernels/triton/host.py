"""Host wrappers of the Triton backend: `forward` / `backward` of the kernel-module contract
(docs/design.md §2; shared with the CUDA backend, step_op.py wraps both in the same custom op).

Launches per step on the fused path (any number of stacked cells; N, C, H*W of any size):

    forward   1. pool            s = mean_HW x                            reads x once
              2. LSTM cells      gates -> (h_new, c_new), one program per BLOCK_N samples;
                                 saves relu(u) and the gates for the backward (SavedLayout)
              3. scale epilogue  out = relu?(x * a + identity)            reads x (+ identity) once,
                                 last-pooled rows first (L2)
    backward  1. grad attention  da = sum_HW z * x, writes d_identity = z reads grad_out, x (+ out)
              2. LSTM backward   from the saved gates: dgates, ds, dh, dc per sample tile
              3. weight grads    dW = D^T V over all samples (one program per output tile:
                                 deterministic, no atomics), biases = column sums of D
              4. grad input      dx = z * a + ds / HW                     reads d_identity (= z),
                                 else grad_out (+ out), in the reverse of 1.'s order (L2)

That is the fused path (small and CIFAR-sized units, and every stacked-cell unit). One-cell units
from C * C/r = LSTMConfig.spread_min (4352: C >= 132 at r = 4) keep its forward and spread the
backward's LSTM (2.) over (sample tiles x column or reduced-width parts): the gates' gradients,
du (split over K), ds and dh0 (3-4 launches where one program per sample tile would do all of it
serially). One-cell units with C * C/r >= LSTMConfig.split_min (6144 by default: C >= 160 at
r = 4) take the split path, where each LSTM phase is its own launch spread over GEMM-like grids
(sample tiles x reduced-width or channel chunks): forward pool, relu(u), gates, scale (4);
backward grad attention, the gates' gradients, du, ds and dh0, weight grads, grad input (6). One
program per sample tile would run all of a large unit's matmuls on a handful of SMs. Neither
backward recomputes relu(u) or the gates: the forward saves them.

The small LSTM runs in fp32 whatever the input dtype (the recurrent state is fp32 for fp32 and half
inputs); its matmuls use `tl.dot` with IEEE fp32 precision (no TF32), so the numbers follow the
fp32 reference. The LSTM kernels walk through the cells in phases that exchange (BLOCK_N, K)
operands through fp32 buffers of one row per sample (the forward's `saved`, layout in
`SavedLayout`, and the backward's `scratch`, in `WorkLayout`), separated by CTA barriers. Maps
dense in NCHW or channels_last are addressed in place through their strides; other strided maps
(slices, permutations) are copied once (kernels/layouts.py).
Stacked cells add one launch that packs their weights into one fp32 buffer.

Runs on CUDA tensors, and on CPU tensors when the kernels were defined under TRITON_INTERPRET=1
(set before dia_fused.kernels.triton is imported: Triton reads it when @triton.jit runs).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import ContextManager, Optional, Sequence, Tuple

import torch
from triton.runtime.interpreter import InterpretedFunction

from ... import reference
from .. import SUPPORTED_DTYPES, SettingsOverride, layouts
from ..cuda_build import ACTIVATION_CODES
from . import config as settings_of
from .config import KernelSettings, LSTMConfig, MapConfig, lstm_num_stages
from .lstm_kernels import (
    STACKED_CELL_JOBS,
    Phase,
    SplitK,
    _lstm_backward_kernel,
    _lstm_forward_kernel,
    _weight_grad_kernel,
)
from .map_kernels import (
    _grad_attention_kernel,
    _grad_input_kernel,
    _pool_kernel,
    _scale_kernel,
    _sum_splits_kernel,
)

Tensor = torch.Tensor

# whether Triton defined the kernels for its interpreter (TRITON_INTERPRET=1 at their import): a
# fact about the imported kernels, where the variable could have changed since
INTERPRETED = isinstance(_pool_kernel, InterpretedFunction)

_override = SettingsOverride(KernelSettings)


def current_settings() -> KernelSettings:
    """The settings a call without `settings=` runs with: those of the innermost use_settings(),
    else the defaults with the DIA_FUSED_TRITON_* variables applied (ValueError naming a bad
    one)."""
    override = _override.value
    return override if override is not None else settings_of.from_environment(INTERPRETED)


def use_settings(settings: KernelSettings) -> ContextManager[KernelSettings]:
    """Steps inside run with `settings` (for callers that reach the kernels through ops.dia_step,
    such as the tuner and tests, where no `settings=` argument can travel); see SettingsOverride."""
    return _override.use(settings)


def unavailable_reason(device) -> Optional[str]:
    """None when the triton backend can run on `device`, else why not; a malformed
    DIA_FUSED_TRITON_* variable is a reason too (its message names it)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    elif not (device.type == "cpu" and INTERPRETED):
        return (
            f"the triton backend runs on CUDA devices (CPU tensors only under the Triton "
            f"interpreter: TRITON_INTERPRET=1 set before dia_fused.kernels.triton is "
            f"imported), got device {device}"
        )
    try:
        current_settings()
    except ValueError as err:
        return f"its launch settings are malformed: {err}"
    return None


# Host-side arithmetic in plain Python: triton.cdiv / next_power_of_2 are constexpr functions that
# cost microseconds per call on the host, and a launch plan is made for every step without one.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _map_strides(t: Tensor) -> Tuple[int, int, int]:
    """(n, c, hw) strides of a map whose H and W collapse into one index (NCHW or channels_last)."""
    sn, sc, sh, sw = t.stride()
    if t.shape[2] > 1 and sh != t.shape[3] * sw:
        raise ValueError(
            f"x: expected a contiguous or channels_last layout (H stride = W * W stride), "
            f"got strides {t.stride()}"
        )
    return sn, sc, sw


@functools.lru_cache(maxsize=1024)
def _map_blocks(
    channels: int, hw: int, channels_last: bool, config: "MapConfig"
) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) tile of the map kernels for this map (see MapConfig)."""
    if channels_last:
        block_c = min(_next_power_of_2(channels), config.c_block)
        return block_c, max(1, min(_next_power_of_2(hw), config.tile // block_c))
    block_hw = min(_next_power_of_2(hw), config.hw_block, config.tile)
    return max(
        1, min(_next_power_of_2(channels), config.tile // block_hw, config.c_block)
    ), block_hw


def _k_step(config: LSTMConfig) -> int:
    """Reduction step of the LSTM matmuls: the interpreter is fastest with few, wide steps."""
    return 64 if INTERPRETED else config.block_k


def _gate_k_step(config: LSTMConfig, split: bool) -> int:
    """Reduction step of the gate matmuls on the split or the fused path (a divisor of _k_step:
    split-K chunks are whole steps)."""
    if INTERPRETED:
        return 64
    return min(config.gate_block_k if split else config.fused_gate_block_k, config.block_k)


@dataclass(frozen=True)
class LSTMBlocks:
    n: int  # samples per LSTM program
    c: int  # channel columns per gate tile
    r: int  # reduced-width columns per tile
    k: int  # reduction step of the matmuls
    kg: int  # reduction step of the gate matmuls
    num_warps: int

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def of(channels: int, hidden: int, config: LSTMConfig, split: bool) -> "LSTMBlocks":
        k = _k_step(config)
        return LSTMBlocks(
            n=config.block_n,
            c=max(16, min(config.block_c, _next_power_of_2(channels))),
            r=max(16, min(config.block_r, _next_power_of_2(hidden))),
            k=k,
            kg=_gate_k_step(config, split),
            num_warps=config.num_warps,
        )

    def forward_groups(self, channels: int, num_cells: int, config: LSTMConfig) -> int:
        """Programs per sample tile in the forward: the gate columns split between them, each
        recomputing the cheap reduced paths (~1/4 of a cell's work) for itself. Stacked cells need
        all columns of a cell before the next one: one group."""
        return 1 if num_cells > 1 else max(1, min(config.forward_groups, _cdiv(channels, self.c)))

    def kwargs(self):
        return dict(
            BLOCK_N=self.n,
            BLOCK_C=self.c,
            BLOCK_R=self.r,
            BLOCK_K=self.k,
            BLOCK_KG=self.kg,
            num_warps=self.num_warps,
        )


@dataclass(frozen=True)
class SavedLayout:
    """Columns of the (N, size) fp32 buffer the forward saves for the backward (one row per
    sample): what the backward would otherwise recompute from the weights, and the V (input)
    operands of every weight gradient dW = D^T V, read by _weight_grad_kernel:

        ru    relu(u_ih) | relu(u_hh)        (R each)   V of wih2 | whh2
        v0    pooled | h[0]                  (C each)   V of wih1 | whh1
        vs    cell 1 .. L-1: input | h[l]    (C each)   V of wih_l | whh_l
        gates cell 0 .. L-1                  (4C each)  pre-activations"""

    ru: int
    v0: int
    vs: int
    gates: int
    size: int

    @staticmethod
    def of(channels: int, hidden: int, num_cells: int) -> "SavedLayout":
        v0 = 2 * hidden
        vs = v0 + 2 * channels
        gates = vs + 2 * channels * (num_cells - 1)
        return SavedLayout(ru=0, v0=v0, vs=vs, gates=gates, size=gates + 4 * channels * num_cells)


@dataclass(frozen=True)
class WorkLayout:
    """Columns of the backward's (N, size) fp32 workspace: the D (output-gradient) operands of
    the weight gradients, and what flows between cells:

        du      du_ih | du_hh                (R each)   D of wih1 | whh1
        dgates  cell 0 .. L-1                (4C each)  D of wih2, whh2 (cell 0), wih_l, whh_l
        carry                                (C)        d(input of cell l) flowing into cell l-1"""

    du: int
    dgates: int
    carry: int
    size: int

    @staticmethod
    def of(channels: int, hidden: int, num_cells: int) -> "WorkLayout":
        dgates = 2 * hidden
        carry = dgates + 4 * channels * num_cells
        return WorkLayout(du=0, dgates=dgates, carry=carry, size=carry + channels)


@functools.lru_cache(maxsize=1024)
def split_k_launches(tiles: int, parts: int, reduction: int, config: LSTMConfig, split: bool):
    """[(MODE, grid, splits)] of one LSTM phase over a reduction of length `reduction`: one DIRECT
    launch, or on the split path, when the (tiles, parts) grid leaves room in config.split_ctas
    programs and the reduction is longer than config.split_k (rounded up to whole k-steps), a
    PARTIAL launch over (tiles, parts, splits) and a FINISH launch over (tiles, parts) that adds the
    splits in order (deterministic: no atomics). As many splits as fit in split_ctas programs: more
    would only add a k-loop prologue (a latency) per program and longer FINISH sums."""
    k_step = _k_step(config)
    splits = (
        min(
            _cdiv(reduction, _cdiv(config.split_k, k_step) * k_step),
            max(1, config.split_ctas // (tiles * parts)),
        )
        if split and tiles  # an empty batch launches nothing
        else 1
    )
    if splits <= 1:
        return ((SplitK.DIRECT, (tiles, parts, 1), 1),)
    return (
        (SplitK.PARTIAL, (tiles, parts, splits), splits),
        (SplitK.FINISH, (tiles, parts, 1), splits),
    )


def _split_path(channels: int, hidden: int, num_cells: int, config: LSTMConfig) -> bool:
    """Large one-cell steps run the LSTM as several GEMM-like launches (every phase spread over the
    reduced-width or channel chunks) instead of one program per sample tile doing all of it."""
    return num_cells == 1 and channels * hidden >= config.split_min


def _spread_backward(channels: int, hidden: int, num_cells: int, config: LSTMConfig) -> bool:
    """One-cell fused-path steps from config.spread_min on run the backward's LSTM over column and
    reduced-width parts (3-4 launches, du split over K) instead of one program per sample tile
    doing all of it serially."""
    return num_cells == 1 and config.spread_min <= channels * hidden < config.split_min


def _lstm_launches(phases, tiles: int, config: LSTMConfig, split: bool):
    """[(phase, row length of its split-K partials, split_k_launches)] of a sequence of LSTM
    phases given as (phase, parts, its reduction length, the row length of its partials); `split`:
    whether their reductions may split over K."""
    return tuple(
        (phase, width, split_k_launches(tiles, parts, reduction, config, split))
        for phase, parts, reduction, width in phases
    )


def _partials_size(launches, n: int) -> int:
    """Elements of the one fp32 buffer for the split-K partials of every phase of a step (the
    phases run one after another, so they share it): the largest splits x N x row length among
    them; 0 when no phase splits."""
    return max(
        [
            phase_launches[0][2] * n * width
            for _, width, phase_launches in launches
            if phase_launches[0][0] == SplitK.PARTIAL
        ]
        + [0]
    )


def _partials(size: int, dummy: Tensor) -> Tensor:
    """The split-K partials buffer of a step, or `dummy` (never read) when no phase splits."""
    return torch.empty(size, device=dummy.device, dtype=torch.float32) if size else dummy


# (BLOCK_M, BLOCK_K, BLOCK_N) of _weight_grad_kernel: output tile, and samples per step; the small
# tile when the large one leaves the grid under LSTMConfig.weight_grad_ctas (weight_grad_blocks)
WEIGHT_GRAD_BLOCKS = (64, 64, 64) if INTERPRETED else (64, 64, 32)
SMALL_WEIGHT_GRAD_BLOCKS = (32, 32, WEIGHT_GRAD_BLOCKS[2])


def weight_grad_tiles(channels: int, hidden: int, num_cells: int, block_m: int, block_k: int):
    """Programs of _weight_grad_kernel: the output tiles of every weight gradient, none empty."""
    w1 = _cdiv(hidden, block_m) * _cdiv(channels, block_k)
    w2 = _cdiv(4 * channels, block_m) * _cdiv(hidden, block_k)
    stacked = _cdiv(4 * channels, block_m) * _cdiv(channels, block_k)
    return 2 * (w1 + w2) + STACKED_CELL_JOBS * (num_cells - 1) * stacked


def weight_grad_blocks(channels: int, hidden: int, num_cells: int, config: LSTMConfig):
    """(BLOCK_M, BLOCK_K, BLOCK_N) of _weight_grad_kernel for these weights: 32x32 output tiles
    where 64x64 ones would be fewer than config.weight_grad_ctas (2-4x the programs, each 1/2-1/4
    of the work: the small units' weight gradients on more of the GPU)."""
    large = weight_grad_tiles(channels, hidden, num_cells, *WEIGHT_GRAD_BLOCKS[:2])
    return SMALL_WEIGHT_GRAD_BLOCKS if large < config.weight_grad_ctas else WEIGHT_GRAD_BLOCKS


SUM_SPLITS_BLOCK = 1024  # elements per program of _sum_splits_kernel


@functools.lru_cache(maxsize=1024)
def hw_split_plan(
    n: int, channels: int, hw: int, block_c: int, block_hw: int, config: MapConfig
) -> Tuple[int, int]:
    """(splits, positions per split) of H*W for the reducing map kernels (pool, grad attention):
    when their (N, C-blocks) grid has fewer than config.min_ctas programs (channels_last maps with
    few samples: one program per sample walks all of H*W), H*W splits over a third grid axis and
    _sum_splits_kernel adds the per-split sums in order (deterministic)."""
    programs, hw_tiles = n * _cdiv(channels, block_c), _cdiv(hw, block_hw)
    few = 0 < programs < config.min_ctas  # an empty batch launches nothing
    splits = min(hw_tiles, _cdiv(config.min_ctas, programs)) if few else 1
    per_split = _cdiv(hw_tiles, max(1, splits)) * block_hw
    return _cdiv(hw, per_split), per_split


def _split_sums(splits: int, n: int, channels: int, out: Tensor) -> Tensor:
    """Where a reducing map kernel writes: `out` itself, or (splits, N, C) fp32 partial sums."""
    if splits == 1:
        return out
    return torch.empty((splits, n, channels), device=out.device, dtype=torch.float32)


def _finish_split_sums(partials: Tensor, out: Tensor, splits: int, scale: float) -> None:
    if splits > 1:
        _sum_splits_kernel[(_cdiv(out.numel(), SUM_SPLITS_BLOCK),)](
            partials, out, out.numel(), splits, scale, BLOCK=SUM_SPLITS_BLOCK
        )


def _like_x(x: Tensor) -> Tensor:
    return torch.empty_like(x)  # x is canonical (dense): empty_like keeps its exact strides


MAX_GRID_X = (
    2**31 - 1
)  # CUDA's limit on the first grid dimension: the elementwise kernels' 1-D grid


def _elementwise_grid(n: int, channels: int, hw: int, block_c: int, block_hw: int) -> Tuple[int]:
    return (n * _cdiv(channels, block_c) * _cdiv(hw, block_hw),)


def _check(x: Tensor, config: MapConfig) -> None:
    """Before any copy of the map: the dtype, and a map the elementwise kernels' grid can cover."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: the triton backend supports {SUPPORTED_DTYPES}, got {x.dtype}")
    n, channels, height, width = x.shape
    block_c, block_hw = _map_blocks(
        channels, height * width, layouts.is_channels_last(x), config
    )  # as canonical()
    (programs,) = _elementwise_grid(n, channels, height * width, block_c, block_hw)
    if programs > MAX_GRID_X:
        raise ValueError(
            f"x: {programs} tiles of {block_c} channels x {block_hw} positions are more than the "
            f"triton backend's map kernels cover ({MAX_GRID_X}), got shape {tuple(x.shape)}; use "
            f"backend='reference' for such maps"
        )


class StackedPacks:
    """The stacked cells' weights packed into one fp32 buffer, shared by a forward and its
    backward: the forward always packs (one torch.cat), and its backward finds that pack by the
    weights' identity (the same tensor objects, at the same storage address and version counter)
    instead of packing again. Sound because autograd saves the weights for the backward: an
    in-place change between the two bumps a version and autograd raises (or the key misses and
    the backward packs). Across steps nothing is reused: a write through `.data` or outside
    autograd (optimizers that bypass version counters) would leave a cross-step cache stale, and
    under CUDA graph capture a pack made outside the graph would not follow the weights on replay;
    so forwards never read the cache, and steps inside a capture neither read nor fill it (their
    torch.cat is captured)."""

    MAX_ENTRIES = 8  # units (weight sets) kept: one entry per unit, its latest forward's pack

    def __init__(self):
        # storage addresses of a unit's stacked weights -> (their versions, shapes, dtypes and
        # devices; weak references to them; the pack): a unit's next forward replaces its entry
        self._packs = {}

    @staticmethod
    def _state(stacked: Sequence[Tensor]):
        return tuple((w._version, w.shape, w.dtype, w.device) for w in stacked)

    @staticmethod
    def _pack(stacked: Sequence[Tensor]) -> Tensor:
        return torch.cat([w.reshape(-1).float() for w in stacked])

    @staticmethod
    def _capturing(stacked: Sequence[Tensor]) -> bool:
        return stacked[0].is_cuda and torch.cuda.is_current_stream_capturing()

    def for_forward(self, stacked: Sequence[Tensor]) -> Tensor:
        packed = self._pack(stacked)
        if not self._capturing(stacked):
            key = tuple(w.data_ptr() for w in stacked)
            self._packs.pop(key, None)
            if len(self._packs) >= self.MAX_ENTRIES:
                self._packs.pop(next(iter(self._packs)))  # the oldest
            self._packs[key] = (self._state(stacked), [weakref.ref(w) for w in stacked], packed)
        return packed

    def for_backward(self, stacked: Sequence[Tensor]) -> Tensor:
        if self._capturing(stacked):
            return self._pack(stacked)
        entry = self._packs.get(tuple(w.data_ptr() for w in stacked))
        # the same tensor objects (not new ones at a freed one's address), unchanged since
        if (
            entry is not None
            and entry[0] == self._state(stacked)
            and all(ref() is w for ref, w in zip(entry[1], stacked))
        ):
            return entry[2]
        return self._pack(stacked)


stacked_packs = StackedPacks()


def _lstm_operands(
    dummy: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    dropout_masks: Optional[Tensor],
    backward: bool,
):
    """Kernel operands both LSTM kernels start with: contiguous state, the 8 cell-0 tensors, the
    stacked cells packed into one fp32 buffer (only when there are stacked cells: the forward
    packs, its backward reuses that pack, see StackedPacks) and the masks; `dummy` (never read)
    stands in for an absent pack or masks."""
    cell0 = [w.contiguous() for w in weights[: reference.CELL0_WEIGHTS]]
    stacked = weights[reference.CELL0_WEIGHTS :]
    if not stacked:
        packed = dummy
    elif backward:
        packed = stacked_packs.for_backward(stacked)
    else:
        packed = stacked_packs.for_forward(stacked)
    masks = dropout_masks.contiguous() if dropout_masks is not None else dummy
    return [h.contiguous(), c.contiguous(), *cell0, packed, masks]


@dataclass(frozen=True)
class LaunchPlan:
    """What a step's launches need that depends only on its signature (shapes, layout of x,
    settings): made per call, or once per signature by the caller's step plan (dia_fused/ops.py)
    and passed as `launch=`."""

    settings: KernelSettings
    block_c: int  # map tile: channels
    block_hw: int  # map tile: positions of H*W
    blocks: LSTMBlocks
    split: bool  # the split LSTM path (_split_path)
    groups: int  # column groups of the fused forward
    hw_splits: int  # H*W splits of the reducing map kernels (hw_split_plan)
    hw_per_split: int  # positions of H*W per split
    forward_lstm: tuple  # _lstm_launches of the forward's LSTM phases
    backward_lstm: tuple  # _lstm_launches of the backward's LSTM phases
    forward_partials: int  # _partials_size of the forward
    backward_partials: int  # _partials_size of the backward
    saved_layout: SavedLayout
    work_layout: WorkLayout
    slots: int  # row length of the forward's relu(u) slots: 2R per column group
    weight_grad_blocks: Tuple[int, int, int]  # weight_grad_blocks
    weight_grad_tiles: int  # programs of _weight_grad_kernel
    x_strides: Optional[Tuple[int, ...]]  # x.stride() where x was canonical (else None)
    map_strides: Tuple[int, int, int]  # _map_strides of canonical(x) for that x
    weight_numel: int  # elements of all weights (the flat weight gradient)
    # _lstm_options per (activation, masks given), filled on first use
    lstm_options: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def map_of(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
        """(canonical(x), its _map_strides): x itself and the planned strides when x has the
        canonical strides of the plan's x (a step plan's signature fixes them)."""
        if x.stride() == self.x_strides:
            return x, self.map_strides
        x = layouts.canonical(x)
        return x, _map_strides(x)

    def options(self, num_cells: int, activation: str, dropout_masks: Optional[Tensor]) -> dict:
        """_lstm_options for this plan's settings and blocks."""
        key = (num_cells, activation, dropout_masks is not None)
        options = self.lstm_options.get(key)
        if options is None:
            options = _lstm_options(
                num_cells, activation, dropout_masks, self.settings, self.blocks
            )
            self.lstm_options[key] = options
        return options


def launch_plan(x: Tensor, num_cells: int, hidden: int, settings: KernelSettings) -> LaunchPlan:
    """The launch plan of steps on maps like `x` (checked here: dtype, grid size)."""
    _check(x, settings.map)
    n, channels, height, width = x.shape
    split = _split_path(channels, hidden, num_cells, settings.lstm)
    blocks = LSTMBlocks.of(channels, hidden, settings.lstm, split)
    groups = 1 if split else blocks.forward_groups(channels, num_cells, settings.lstm)
    block_c, block_hw = _map_blocks(
        channels, height * width, layouts.is_channels_last(x), settings.map
    )
    hw_splits, hw_per_split = hw_split_plan(
        n, channels, height * width, block_c, block_hw, settings.map
    )
    config, tiles = settings.lstm, _cdiv(n, blocks.n)
    r_parts, c_parts = _cdiv(hidden, blocks.r), _cdiv(channels, blocks.c)
    # (phase, parts, its reduction length, the row length of its split-K partials)
    reduced = (Phase.REDUCED, r_parts, channels, 2 * hidden)
    forward_phases = [reduced, (Phase.GATES, c_parts, hidden, 4 * channels)]
    gradients = _lstm_launches(
        [
            (Phase.REDUCED_GRAD, r_parts, 4 * channels, 2 * hidden),
            (Phase.INPUT_GRAD, c_parts, hidden, 2 * channels),
        ],
        tiles,
        config,
        True,
    )
    if split or _spread_backward(channels, hidden, num_cells, config):
        # the gates' gradients from the saved gates (pointwise: no reduction to split)
        gates = _lstm_launches([(Phase.GATES, c_parts, 0, 0)], tiles, config, False)
        backward_lstm = gates + gradients
    else:
        backward_lstm = _lstm_launches([(Phase.FUSED, 1, 0, 0)], tiles, config, False)
    forward_lstm = _lstm_launches(
        forward_phases if split else [(Phase.FUSED, groups, 0, 0)], tiles, config, split
    )
    wg_blocks = weight_grad_blocks(channels, hidden, num_cells, config)
    canonical = layouts.canonical(x)
    return LaunchPlan(
        settings,
        block_c,
        block_hw,
        blocks,
        split,
        groups,
        hw_splits,
        hw_per_split,
        forward_lstm,
        backward_lstm,
        _partials_size(forward_lstm, n),
        _partials_size(backward_lstm, n),
        SavedLayout.of(channels, hidden, num_cells),
        WorkLayout.of(channels, hidden, num_cells),
        2 * hidden * groups,
        wg_blocks,
        weight_grad_tiles(channels, hidden, num_cells, *wg_blocks[:2]),
        x.stride() if canonical.stride() == x.stride() else None,
        _map_strides(canonical),
        reference.weight_elements(channels, hidden, num_cells),
    )


def _lstm_options(num_cells, activation, dropout_masks, settings, blocks) -> dict:
    """The constexprs (and launch options) both LSTM kernels take, but PHASE and MODE."""
    return dict(
        NUM_CELLS=num_cells,
        ACTIVATION=ACTIVATION_CODES[activation],
        HAS_MASKS=dropout_masks is not None,
        DOT_PRECISION=settings.dot_precision,
        num_stages=lstm_num_stages(num_cells),
        **blocks.kwargs(),
    )


def _forward_phases(
    launches, operands, h_new, c_new, saved, slots, partials, sizes, layout, options
) -> None:
    """Launches _lstm_forward_kernel for each (phase, partials row length, split-K launches) of
    `launches` (LaunchPlan.forward_lstm); `sizes` (N, C, R), `options` the kernel's constexprs
    but PHASE and MODE."""
    n, channels, hidden = sizes
    for phase, width, phase_launches in launches:
        for mode, grid, splits in phase_launches:
            _lstm_forward_kernel[grid](
                *operands,
                h_new,
                c_new,
                saved,
                slots,
                partials,
                width,
                splits,
                n,
                channels,
                hidden,
                layout.size,
                slots.shape[1],
                layout.ru,
                layout.v0,
                layout.vs,
                layout.gates,
                PHASE=phase,
                MODE=mode,
                **options,
            )


def saved_shape(x_shape: Sequence[int], weights: Sequence[Tensor]) -> Tuple[int, int]:
    """Shape of what forward saves for backward (fp32, SavedLayout): (N, its row length)."""
    num_cells = reference.num_cells_of(weights)
    return (x_shape[0], SavedLayout.of(x_shape[1], weights[0].shape[0], num_cells).size)


def forward(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    identity: Optional[Tensor],
    relu: bool,
    activation: str,
    dropout_masks: Optional[Tensor],
    settings: Optional[KernelSettings] = None,
    launch: Optional[LaunchPlan] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, h_new, c_new, saved) of one DIA step; out laid out like x, saved of `saved_shape`.
    `settings` default: current_settings(); `launch` (made with them) default: launch_plan()."""
    if launch is None:
        launch = launch_plan(x, h.shape[0], weights[0].shape[0], settings or current_settings())
    settings = launch.settings
    map_config = settings.map
    x, strides = launch.map_of(x)
    identity = None if identity is None else layouts.canonical(identity)
    n, channels, height, width = x.shape
    hw, num_cells, hidden = height * width, h.shape[0], weights[0].shape[0]
    layout = launch.saved_layout
    saved = torch.empty((n, layout.size), device=x.device, dtype=torch.float32)
    h_new = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    c_new = torch.empty(c.shape, device=c.device, dtype=c.dtype)
    out = _like_x(x)
    if n == 0:
        return out, h_new, c_new, saved
    pooled = torch.empty((n, channels), device=x.device, dtype=torch.float32)
    block_c, block_hw = launch.block_c, launch.block_hw
    hw_splits, hw_per_split = launch.hw_splits, launch.hw_per_split
    pool_out = _split_sums(hw_splits, n, channels, pooled)
    _pool_kernel[(n, _cdiv(channels, block_c), hw_splits)](
        x,
        pool_out,
        n,
        channels,
        hw,
        hw_per_split,
        1.0 / hw if hw_splits == 1 else 1.0,
        *strides,
        BLOCK_C=block_c,
        BLOCK_HW=block_hw,
        num_warps=map_config.num_warps,
    )
    _finish_split_sums(pool_out, pooled, hw_splits, 1.0 / hw)
    slots = torch.empty((n, launch.slots), device=x.device, dtype=torch.float32)
    operands = [pooled, *_lstm_operands(pooled, h, c, weights, dropout_masks, backward=False)]
    partials = _partials(launch.forward_partials, pooled)
    options = launch.options(num_cells, activation, dropout_masks)
    sizes = (n, channels, hidden)
    _forward_phases(
        launch.forward_lstm, operands, h_new, c_new, saved, slots, partials, sizes, layout, options
    )
    idt = identity if identity is not None else x
    grid = _elementwise_grid(n, channels, hw, block_c, block_hw)
    _scale_kernel[grid](
        x,
        h_new[-1],
        idt,
        out,
        n,
        channels,
        hw,
        *strides,
        *(strides if identity is None else _map_strides(idt)),
        HAS_IDENTITY=identity is not None,
        RELU=relu,
        BLOCK_C=block_c,
        BLOCK_HW=block_hw,
        num_warps=map_config.num_warps,
    )
    return out, h_new, c_new, saved


def backward(
    grad_out: Tensor,
    grad_h_new: Optional[Tensor],
    grad_c_new: Optional[Tensor],
    x: Tensor,
    out: Tensor,
    saved: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    identity_given: bool,
    relu: bool,
    activation: str,
    dropout_masks: Optional[Tensor],
    settings: Optional[KernelSettings] = None,
    launch: Optional[LaunchPlan] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """(grad_x, grad_identity or None, grad_h, grad_c, grad_weights): grad_weights is ONE flat fp32
    tensor, every weight's gradient flattened in weight order (the autograd formula splits it).
    `settings` default: current_settings(); pass the forward's."""
    if launch is None:
        launch = launch_plan(x, h.shape[0], weights[0].shape[0], settings or current_settings())
    settings = launch.settings
    map_config = settings.map
    x, strides = launch.map_of(x)  # as the forward saw it: `out` has these strides
    n, channels, height, width = x.shape
    hw, num_cells, hidden = height * width, h.shape[0], weights[0].shape[0]
    grad_out, out = layouts.in_layout_of(grad_out, x), layouts.in_layout_of(out, x)
    grad_x = _like_x(x)
    grad_identity = _like_x(x) if identity_given else None
    grad_h = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    grad_c = torch.empty(c.shape, device=c.device, dtype=c.dtype)
    grad_weights = torch.empty(launch.weight_numel, device=x.device, dtype=torch.float32)
    layout, work = launch.saved_layout, launch.work_layout
    scratch = torch.empty((n, work.size), device=x.device, dtype=torch.float32)
    block_c, block_hw = launch.block_c, launch.block_hw
    if n:
        grad_a = torch.empty((n, channels), device=x.device, dtype=torch.float32)
        hw_splits, hw_per_split = launch.hw_splits, launch.hw_per_split
        grad_a_out = _split_sums(hw_splits, n, channels, grad_a)
        _grad_attention_kernel[(n, _cdiv(channels, block_c), hw_splits)](
            grad_out,
            x,
            out,
            grad_a_out,
            grad_identity if identity_given else grad_a,
            n,
            channels,
            hw,
            hw_per_split,
            *strides,
            RELU=relu,
            HAS_IDENTITY=identity_given,
            BLOCK_C=block_c,
            BLOCK_HW=block_hw,
            num_warps=map_config.num_warps,
        )
        _finish_split_sums(grad_a_out, grad_a, hw_splits, 1.0)
        grad_pooled = torch.empty((n, channels), device=x.device, dtype=torch.float32)
        attention = torch.empty((n, channels), device=x.device, dtype=torch.float32)
        operands = _lstm_operands(saved, h, c, weights, dropout_masks, backward=True)
        options = launch.options(num_cells, activation, dropout_masks)
        partials = _partials(launch.backward_partials, grad_a)
        for phase, width, phase_launches in launch.backward_lstm:
            for mode, grid, splits in phase_launches:
                _lstm_backward_kernel[grid](
                    *operands,
                    saved,
                    scratch,
                    partials,
                    width,
                    splits,
                    grad_a,
                    grad_a if grad_h_new is None else grad_h_new.contiguous(),
                    grad_a if grad_c_new is None else grad_c_new.contiguous(),
                    grad_pooled,
                    attention,
                    grad_h,
                    grad_c,
                    n,
                    channels,
                    hidden,
                    layout.size,
                    work.size,
                    layout.ru,
                    layout.gates,
                    work.du,
                    work.dgates,
                    work.carry,
                    HAS_GRAD_H=grad_h_new is not None,
                    HAS_GRAD_C=grad_c_new is not None,
                    PHASE=phase,
                    MODE=mode,
                    **options,
                )
    # over an empty batch this writes zeros: the gradient of a sum over no samples
    wg_m, wg_k, wg_n = launch.weight_grad_blocks
    _weight_grad_kernel[(launch.weight_grad_tiles,)](
        saved,
        scratch,
        grad_weights,
        n,
        channels,
        hidden,
        layout.size,
        work.size,
        layout.ru,
        layout.v0,
        layout.vs,
        work.du,
        work.dgates,
        BLOCK_M=wg_m,
        BLOCK_K=wg_k,
        BLOCK_N=wg_n,
        DOT_PRECISION=settings.dot_precision,
        num_warps=8,
    )
    if n:
        grid = _elementwise_grid(n, channels, hw, block_c, block_hw)
        # with an identity, d_identity already holds z = relu-masked grad_out (exactly: masking
        # keeps values), so one map is read instead of two (grad_out and the forward output)
        z, z_mask_source = (grad_identity, grad_identity) if identity_given else (grad_out, out)
        _grad_input_kernel[grid](
            z,
            z_mask_source,
            attention,
            grad_pooled,
            grad_x,
            n,
            channels,
            hw,
            *strides,
            RELU=relu and not identity_given,
            BLOCK_C=block_c,
            BLOCK_HW=block_hw,
            num_warps=map_config.num_warps,
        )
    return grad_x, grad_identity, grad_h, grad_c, grad_weights
