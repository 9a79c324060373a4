"""The measured choice behind `backend="auto"` on a GPU: the fastest backend per step shape.

The table (`dia_fused/auto_backend.json`, or the file named by DIA_FUSED_AUTO_TABLE) is written by
`bench/make_auto_table.py` from the step benchmarks of a GPU session. Per GPU name it lists the
measured steps with the median time of each backend:

    {"format": 1, "devices": {"NVIDIA H100 80GB HBM3": {"source": "bench/results/...",
        "steps": [{"channels": 64, "hw": 1024, "batch": 128, "dtype": "float32", "pass": "fwd_bwd",
                   "ms": {"reference": 0.93, "triton": 0.11, "cuda": 0.09}}, ...]}}}

A step is matched to the measured step of the same pass nearest in log2(C) and log2(H*W), of its
dtype where measured (float16 falls back to bfloat16, then float32). The backends come out fastest
first; ops.resolve_backend runs the first one available. A GPU without an entry keeps the static
order cuda > triton > reference. A table that is present but malformed raises (it is never
skipped silently).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Dict, Optional, Sequence, Tuple

from . import settings
from .names import BACKENDS as BACKEND_NAMES

ENV_TABLE = settings.ENV_AUTO_TABLE
DEFAULT_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_backend.json")
FORMAT = 1
PASSES = ("fwd", "fwd_bwd")
# where a dtype was not measured, the nearest stand-in: same element size first
DTYPE_FALLBACK = {
    "float16": ("float16", "bfloat16", "float32"),
    "bfloat16": ("bfloat16", "float16", "float32"),
    "float32": ("float32",),
}


def table_path() -> str:
    return settings.auto_table_path(DEFAULT_TABLE)


@functools.lru_cache(maxsize=8)
def load_table(path: str) -> Dict[str, list]:
    """{device name: [step entries]} of the table at `path` ({} when the default file is absent)."""
    if not os.path.exists(path):
        if path != DEFAULT_TABLE:
            raise FileNotFoundError(f"{ENV_TABLE}={path}: no such file")
        return {}
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
    validate(table, path)
    return {name: device["steps"] for name, device in table["devices"].items()}


def validate(table, path: str = "table") -> None:
    """Raises ValueError naming the first entry of `table` that is not of the format above."""
    if (
        not isinstance(table, dict)
        or table.get("format") != FORMAT
        or not isinstance(table.get("devices"), dict)
    ):
        raise ValueError(
            f"{path}: expected {{'format': {FORMAT}, 'devices': {{...}}}}, got keys "
            f"{sorted(table) if isinstance(table, dict) else type(table).__name__}"
        )
    for name, device in table["devices"].items():
        steps = device.get("steps") if isinstance(device, dict) else None
        if not isinstance(steps, list):
            raise ValueError(f"{path}: devices[{name!r}]: expected a dict with a 'steps' list")
        for i, step in enumerate(steps):
            where = f"{path}: devices[{name!r}].steps[{i}]"
            if not isinstance(step, dict):
                raise ValueError(f"{where}: expected a dict, got {type(step).__name__}")
            for key in ("channels", "hw"):
                if not isinstance(step.get(key), int) or step[key] < 1:
                    raise ValueError(
                        f"{where}.{key}: expected a positive int, got {step.get(key)!r}"
                    )
            if step.get("dtype") not in DTYPE_FALLBACK:
                raise ValueError(
                    f"{where}.dtype: expected one of {sorted(DTYPE_FALLBACK)}, "
                    f"got {step.get('dtype')!r}"
                )
            if step.get("pass") not in PASSES:
                raise ValueError(
                    f"{where}.pass: expected one of {PASSES}, got {step.get('pass')!r}"
                )
            ms = step.get("ms")
            if (
                not isinstance(ms, dict)
                or not ms
                or any(
                    k not in BACKEND_NAMES or not isinstance(v, (int, float)) or v <= 0
                    for k, v in ms.items()
                )
            ):
                raise ValueError(
                    f"{where}.ms: expected {{backend: positive milliseconds}} "
                    f"over {BACKEND_NAMES}, "
                    f"got {ms!r}"
                )


def has_device(device_name: str) -> bool:
    return device_name in load_table(table_path())


def nearest_step(
    steps: Sequence[dict], channels: int, hw: int, dtype: str, training: bool
) -> Optional[dict]:
    """The measured step nearest to (channels, hw) among those of the pass and the closest dtype."""
    wanted_pass = PASSES[int(training)]
    for stand_in in DTYPE_FALLBACK.get(dtype, ("float32",)):
        candidates = [s for s in steps if s["pass"] == wanted_pass and s["dtype"] == stand_in]
        if candidates:
            return min(
                candidates,
                key=lambda s: (
                    math.log2(s["channels"] / channels) ** 2 + math.log2(s["hw"] / hw) ** 2
                ),
            )
    return None


def measured_order(
    device_name: str, channels: int, hw: int, dtype: str, training: bool, path: Optional[str] = None
) -> Optional[Tuple[str, ...]]:
    """Backends fastest first at the nearest measured step on `device_name` in the table at
    `path` (default table_path()); None when the table has no step for it (then auto keeps its
    static order)."""
    return _measured_order(path or table_path(), device_name, channels, hw, dtype, training)


@functools.lru_cache(maxsize=4096)  # every step asks: a cache hit is far cheaper than a search
def _measured_order(
    path: str, device_name: str, channels: int, hw: int, dtype: str, training: bool
) -> Optional[Tuple[str, ...]]:
    steps = load_table(path).get(device_name)
    if not steps:
        return None
    step = nearest_step(steps, channels, hw, dtype, training)
    if step is None:
        return None
    return tuple(sorted(step["ms"], key=step["ms"].get))
