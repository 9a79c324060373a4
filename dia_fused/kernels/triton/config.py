"""Launch settings of the Triton backend: objects the host wrappers take at call time. The
environment (DIA_FUSED_TRITON_LSTM, _MAP, _DOT_PRECISION, parsed in dia_fused/settings.py) only
supplies the defaults, read when a step runs; bench/tune_triton.py and the tests pass settings
directly. Plain Python: importable without triton."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

from ... import settings as env

# IEEE fp32 FMA dots follow the fp32 reference; "tf32x3" (tensor cores, ~fp32 accuracy) is a
# candidate for tuning on a GPU (bench/tune_triton.py)
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


def lstm_num_stages(num_cells: int) -> int:
    """Software-pipelining depth of the LSTM kernels: Triton's default 3, 2 with stacked cells,
    whose forward keeps more tiles live (the saved copies) and at 3 stages spills on sm_80
    (python_tests/test_triton_compile.py)."""
    return 3 if num_cells == 1 else 2


@dataclass(frozen=True)
class MapConfig:
    """Tiles of the feature-map kernels (pool, scale, grad attention, grad input): at most `tile`
    elements (registers), wide along the map's contiguous axis so that loads coalesce: up to
    `hw_block` positions of H*W in NCHW, up to `c_block` channels in channels_last (64 fp32
    channels = 256 B rows: whole sectors)."""

    tile: int = 4096
    hw_block: int = 256
    c_block: int = 64
    num_warps: int = 4
    # pool and grad attention split H*W over more programs when their (N, C-blocks) grid is
    # smaller than this: two waves of an H100's 132 SMs (bench/roofline.py)
    min_ctas: int = 264

    @staticmethod
    def from_env(text: Optional[str], base: Optional["MapConfig"] = None) -> "MapConfig":
        """`base` (default MapConfig()) with the fields named in `text` ("tile=8192,...")."""
        return env.parse_fields(
            MapConfig,
            env.ENV_TRITON_MAP,
            text,
            {"tile": 16, "hw_block": 1, "c_block": 1, "num_warps": 1},
            base,
        )


@dataclass(frozen=True)
class LSTMConfig:
    """Launch configuration of the LSTM kernels. The defaults come from the sm_90 resource report
    (python_tests/triton_aot.py: no register spills)."""

    block_n: int = 16  # samples per program (tl.dot needs >= 16)
    block_c: int = 32  # most gate columns per tile
    block_r: int = 32  # most reduced-width columns per tile
    block_k: int = 64  # reduction step of the matmuls (two products per step)
    # reduction step of the gate matmuls, whose loop runs 8 products per step: on the split path,
    # and in the fused kernels (which hold every phase's values: 32 spills there on sm_80); wider
    # spills on sm_80 (python_tests/triton_aot.py)
    gate_block_k: int = 32
    fused_gate_block_k: int = 16
    num_warps: int = 8  # 4 warps spill on sm_90
    forward_groups: int = 4  # most column groups of the one-cell fused forward (per sample tile)
    # one-cell steps with C * C/r at least this take the split path: by bench/roofline.py the
    # fused path is as fast up to C * C/r = 4096 (C = 64..128 at r = 4) with 7 launches instead of
    # 12-14, the split path faster from about 6400 on
    split_min: int = 6144
    # one-cell fused-path steps with C * C/r at least this run the backward's LSTM as 3-4
    # launches over (sample tiles x column or reduced-width parts) instead of one program per
    # sample tile: the gates' gradients, du (split-K), d pooled and dh0; by bench/roofline.py
    # (the gates saved by the forward) faster from C = 132 at r = 4 (C * C/r = 4356: 128x132x16x16
    # 83.7 vs 86.9 us), slower at C = 128 (4096: 83.1 vs 81.3 us at 128x128x16x16)
    spread_min: int = 4352
    # split path: a phase whose grid has fewer than split_ctas programs (one wave of an H100's 132
    # SMs) splits its reduction into as many parts as fit in that many, none shorter than split_k
    # (rounded up to whole k-steps): bench/roofline.py
    split_k: int = 64
    split_ctas: int = 132
    # the weight-gradient kernel takes 32x32 output tiles instead of 64x64 when the 64x64 tiles
    # are fewer than this (one wave of an H100): 2-4x the CTAs, each a half to a quarter of the FMAs
    # (bench/roofline.py)
    weight_grad_ctas: int = 132

    @staticmethod
    def from_env(text: Optional[str], base: Optional["LSTMConfig"] = None) -> "LSTMConfig":
        """`base` (default LSTMConfig()) with the fields named in `text` ("block_n=32,...")."""
        return env.parse_fields(
            LSTMConfig,
            env.ENV_TRITON_LSTM,
            text,
            {
                "block_n": 16,
                "block_c": 16,
                "block_r": 16,
                "block_k": 16,
                "gate_block_k": 16,
                "fused_gate_block_k": 16,
                "split_k": 16,
            },
            base,
        )


def check_dot_precision(value: str) -> str:
    if value not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision: expected one of {DOT_PRECISIONS}, got {value!r}")
    return value


@dataclass(frozen=True)
class KernelSettings:
    """Everything a Triton step's launches depend on besides the tensors."""

    lstm: LSTMConfig = field(default_factory=LSTMConfig)
    map: MapConfig = field(default_factory=MapConfig)
    dot_precision: str = "ieee"

    def __post_init__(self):
        check_dot_precision(self.dot_precision)


# the interpreter runs fastest with small map tiles (it executes every element in numpy)
INTERPRETER_MAP = MapConfig(hw_block=64)


def from_environment(interpreted: bool) -> KernelSettings:
    """The defaults with the DIA_FUSED_TRITON_* variables applied; ValueError naming the variable
    when one is malformed. Cheap on the hot path: parsed once per distinct text."""
    return _parse(
        env.raw(env.ENV_TRITON_LSTM),
        env.raw(env.ENV_TRITON_MAP),
        env.raw(env.ENV_TRITON_DOT_PRECISION),
        interpreted,
    )


@functools.lru_cache(maxsize=16)  # failures are not cached: a bad value raises at every use
def _parse(
    lstm: Optional[str], map_text: Optional[str], precision: Optional[str], interpreted: bool
) -> KernelSettings:
    return KernelSettings(
        lstm=LSTMConfig.from_env(lstm),
        map=MapConfig.from_env(map_text, INTERPRETER_MAP if interpreted else None),
        dot_precision=env.parse_choice(
            env.ENV_TRITON_DOT_PRECISION, precision, DOT_PRECISIONS, "ieee"
        ),
    )
