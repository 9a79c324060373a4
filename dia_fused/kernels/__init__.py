"""Kernel modules of the fused backends (docs/design.md §2): each provides
`unavailable_reason(device)`, `SUPPORTED_DTYPES`, `forward(...)` and `backward(...)`, and the
launch settings they take at call time (`KernelSettings`, `current_settings()`,
`use_settings(...)`)."""

import contextlib
from typing import Iterator, Optional

import torch

from .cuda_build import ACTIVATION_CODES

# the input dtypes both fused backends take (float64 runs through the reference backend)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "ACTIVATION_CODES",
    "SUPPORTED_DTYPES",
    "SettingsOverride",
    "availability_changed",
    "kernel_state",
]

_overrides = []  # every SettingsOverride, in creation order
_availability_changes = 0


def availability_changed() -> None:
    """For a kernel module whose availability may change (cuda_dia_step.reset_build): step plans
    made before are not used again."""
    global _availability_changes
    _availability_changes += 1


def kernel_state() -> tuple:
    """What step plans depend on in the kernel modules besides the environment: the settings of
    every innermost use_settings() block (None outside one) and the count of availability
    changes. Part of a plan's signature (ops.py): a block takes effect on its first step."""
    return (_availability_changes, *[override.value for override in _overrides])


class SettingsOverride:
    """The kernel settings that steps run with inside `use(...)` blocks (the innermost block
    wins), for callers that reach a kernel module through ops.dia_step, such as the tuner and the
    tests, where no settings argument can travel. Process-wide, not per thread. A block must also
    cover the backward of its steps where that should run with the same settings: autograd runs
    it later, outside the block, with the settings current then."""

    def __init__(self, settings_type: type):
        self.settings_type = settings_type
        self.value: Optional[object] = None
        _overrides.append(self)

    @contextlib.contextmanager
    def use(self, settings) -> Iterator[object]:
        if not isinstance(settings, self.settings_type):
            raise TypeError(
                f"settings: expected a {self.settings_type.__name__}, got {type(settings).__name__}"
            )
        previous, self.value = self.value, settings
        try:
            yield settings
        finally:
            self.value = previous
