"""Kernel modules of the fused backends (docs/design.md §2): each provides
`unavailable_reason(device)`, `SUPPORTED_DTYPES`, `forward(...)` and `backward(...)`."""
import torch

from .cuda_build import ACTIVATION_CODES

# the input dtypes both fused backends take (float64 runs through the reference backend)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["ACTIVATION_CODES", "SUPPORTED_DTYPES"]
