"""Every environment variable dia_fused reads at run time, parsed here and nowhere else.

Each reader is called where its value is used (never at import), so a value set after import
counts, and a bad value raises ValueError naming the variable at the point of use: a bad
DIA_FUSED_TRITON_* value makes the triton backend unavailable with that message as the reason
(available_backends(), `python -m dia_fused`), not an import error.

Variables (docs/design.md §3, §5):
  DIA_FUSED_BACKEND               the backend that `backend="auto"` stands for (an explicit name
                                  passed by the caller wins over it)
  DIA_FUSED_AUTO_TABLE            the measured table behind auto (backend_table.py)
  DIA_FUSED_TRITON_LSTM           default LSTM launch configuration, "block_n=32,num_warps=4"
  DIA_FUSED_TRITON_MAP            default feature-map tiles, "tile=8192,num_warps=8"
  DIA_FUSED_TRITON_DOT_PRECISION  default tl.dot precision: ieee, tf32x3 or tf32
  DIA_FUSED_CUDA_PATH             default kernels of the cuda backend: auto, fused or split
  TRITON_INTERPRET                read by Triton itself when the kernels are defined; shown here
  TORCH_CUDA_ARCH_LIST            the arches of the CUDA extension (read by torch's builder too)
  DIA_FUSED_VERBOSE_BUILD         1: print the compiler output of the build on first use
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence

from .names import BACKEND_CHOICES

ENV_BACKEND = "DIA_FUSED_BACKEND"
ENV_AUTO_TABLE = "DIA_FUSED_AUTO_TABLE"
ENV_TRITON_LSTM = "DIA_FUSED_TRITON_LSTM"
ENV_TRITON_MAP = "DIA_FUSED_TRITON_MAP"
ENV_TRITON_DOT_PRECISION = "DIA_FUSED_TRITON_DOT_PRECISION"
ENV_CUDA_PATH = "DIA_FUSED_CUDA_PATH"
ENV_TRITON_INTERPRET = "TRITON_INTERPRET"
ENV_ARCH_LIST = "TORCH_CUDA_ARCH_LIST"
ENV_VERBOSE_BUILD = "DIA_FUSED_VERBOSE_BUILD"

# what `python -m dia_fused` lists, in this order
ALL = (
    ENV_BACKEND,
    ENV_AUTO_TABLE,
    ENV_TRITON_LSTM,
    ENV_TRITON_MAP,
    ENV_TRITON_DOT_PRECISION,
    ENV_CUDA_PATH,
    ENV_TRITON_INTERPRET,
    ENV_ARCH_LIST,
    ENV_VERBOSE_BUILD,
)

_encoded_names: Dict[str, object] = {}


def raw(name: str) -> Optional[str]:
    """The variable's text, None when unset or empty (empty means unset everywhere).

    Read on every step, so without os.environ.get where CPython allows: for an unset variable
    (the usual case) get() raises and catches a KeyError inside, which costs more than the rest
    of a step's settings lookup. os.environ's own backing dict, which get() reads and every
    os.environ write updates, answers the same without it."""
    environ = os.environ
    data = getattr(environ, "_data", None)  # absent where os.environ was replaced by a dict
    if data is None:
        return environ.get(name) or None
    key = _encoded_names.get(name)
    if key is None:
        key = _encoded_names[name] = environ.encodekey(name)
    value = data.get(key)
    return environ.decodevalue(value) or None if value is not None else None


# the variables a step's plan depends on (ops.py): their text is part of the plan's signature.
# All but TRITON_INTERPRET (it counts once, when the kernels are defined) and VERBOSE_BUILD (output)
NOT_PER_STEP = (ENV_TRITON_INTERPRET, ENV_VERBOSE_BUILD)
STEP_VARIABLES = tuple(name for name in ALL if name not in NOT_PER_STEP)
_encoded_step_variables: Optional[tuple] = None


def step_texts() -> tuple:
    """The raw values (None where unset) of STEP_VARIABLES, read on every step: one C-level pass
    over os.environ's backing dict (see raw())."""
    global _encoded_step_variables
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None:
        return tuple(map(environ.get, STEP_VARIABLES))
    if _encoded_step_variables is None:
        _encoded_step_variables = tuple(map(environ.encodekey, STEP_VARIABLES))
    return tuple(map(data.get, _encoded_step_variables))


def backend_for_auto() -> str:
    """The backend `auto` stands for: DIA_FUSED_BACKEND when set (validated), else "auto"."""
    value = raw(ENV_BACKEND)
    if value is None:
        return "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(
            f"{ENV_BACKEND}: expected one of {BACKEND_CHOICES} (or unset), got {value!r}"
        )
    return value


def auto_table_path(default: str) -> str:
    return raw(ENV_AUTO_TABLE) or default


def triton_interpret() -> bool:
    return raw(ENV_TRITON_INTERPRET) == "1"


def cuda_arch_list() -> Optional[str]:
    return raw(ENV_ARCH_LIST)


def verbose_build() -> bool:
    return raw(ENV_VERBOSE_BUILD) == "1"


def parse_fields(cls, env_name: str, text: Optional[str], powers_of_two: Dict[str, int], base=None):
    """`base` (default cls()) with the int fields named in `text` ("name=int,...") replaced; each
    field named in `powers_of_two` must be a power of 2 at least the given minimum. Errors name
    `env_name`."""
    config = cls() if base is None else base
    if not text:
        return config
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields or not value.strip().isdigit():
            raise ValueError(
                f"{env_name}: expected comma-separated name=int with names "
                f"{sorted(fields)}, got {text!r}"
            )
        values[key] = int(value)
    config = dataclasses.replace(config, **values)
    for name, minimum in powers_of_two.items():
        value = getattr(config, name)
        if value < minimum or value & (value - 1):
            raise ValueError(f"{env_name}: {name} must be a power of 2 >= {minimum}, got {value}")
    return config


def parse_choice(env_name: str, text: Optional[str], choices: Sequence[str], default: str) -> str:
    if not text:
        return default
    if text not in choices:
        raise ValueError(f"{env_name}: expected one of {tuple(choices)}, got {text!r}")
    return text
