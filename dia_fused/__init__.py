"""dia_fused: the DIA-LSTM attention unit of DIANet with fused Triton and CUDA kernels."""

from .accelerate import accelerate, fused_stages, restore
from .adapters import add_dia, remove_dia
from .modules import DIALSTM, DIASE, DIAStage
from .ops import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_unavailable_reason,
    dia_step,
    resolve_backend,
)

__version__ = "0.1.0"

__all__ = [
    "DIALSTM",
    "DIASE",
    "DIAStage",
    "dia_step",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_unavailable_reason",
    "resolve_backend",
    "accelerate",
    "restore",
    "fused_stages",
    "add_dia",
    "remove_dia",
    "__version__",
]
