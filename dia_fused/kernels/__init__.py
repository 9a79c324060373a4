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

__all__ = ["ACTIVATION_CODES", "SUPPORTED_DTYPES", "SettingsOverride", "overriding_settings"]

_overrides = []  # every SettingsOverride, in creation order


def overriding_settings() -> tuple:
    """The settings of every kernel module's innermost use_settings() block (None outside one):
    part of a step plan's signature (ops.py), so that a block takes effect on its first step."""
    return tuple([override.value for override in _overrides])


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
