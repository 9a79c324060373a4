"""Feature-map layouts for the fused host wrappers: both backends walk H * W of a map as one strided
axis and write their outputs with the strides of x, so the maps must reach the kernels dense in
NCHW or channels_last."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def canonical(t: Tensor) -> Tensor:
    """t in the canonical strides of NCHW or channels_last (a view when t is dense in one of them:
    strides of size-1 dims never move an address), else a contiguous copy (sliced or permuted maps
    whose H and W do not form one axis). empty_like of the result has exactly its strides."""
    n, c, h, w = t.shape
    if t.is_contiguous():
        strides = (c * h * w, h * w, w, 1)
    elif t.is_contiguous(memory_format=torch.channels_last):
        strides = (h * w * c, 1, w * c, c)
    else:
        return t.contiguous()
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


def is_channels_last(t: Tensor) -> bool:
    """Whether canonical(t) lays t out channels_last (NCHW wins where both fit, e.g. C = 1)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format canonical() gives x."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def in_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """t with exactly the strides of the canonical map x, copied only when its layout differs."""
    if t.stride() == x.stride():  # t has x's shape: x's canonical strides are its own
        return t
    t = canonical(t)
    if t.stride() == x.stride():
        return t
    return canonical(t.contiguous(memory_format=memory_format(x)))
