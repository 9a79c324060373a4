"""The Triton backend of the DIA step (docs/design.md §3): kernels over the feature maps
(map_kernels.py) and over the small LSTM (lstm_kernels.py), their launch settings (config.py) and
the host wrappers of the kernel-module contract (host.py). Importing it needs the triton package
(`pip install triton`, or the `dia_fused[triton]` extra)."""

from .config import DOT_PRECISIONS, KernelSettings, LSTMConfig, MapConfig
from .host import INTERPRETED, backward, current_settings, forward, unavailable_reason, use_settings

__all__ = [
    "DOT_PRECISIONS",
    "INTERPRETED",
    "KernelSettings",
    "LSTMConfig",
    "MapConfig",
    "backward",
    "current_settings",
    "forward",
    "unavailable_reason",
    "use_settings",
]
