"""Argument checks shared by the public entry points: errors name the argument, expected, actual."""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

from .reference import CELL_ACTIVATIONS, num_cells_of, state_dtype, weight_names

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, *, dims: Optional[int] = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {value.dtype}")
    if dims is not None and value.dim() != dims:
        raise ValueError(
            f"{name}: expected a {dims}-D tensor, got {value.dim()}-D of shape {tuple(value.shape)}"
        )


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_same_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"{name}: expected device {ref.device} (the device of {ref_name}), got {value.device}"
        )


def check_identity(identity, x: Tensor) -> None:
    """The shortcut added after the attention: x's shape, dtype and device (never broadcast)."""
    check_tensor("identity", identity, dims=4)
    if identity.shape != x.shape:
        raise ValueError(
            f"identity: expected the shape of x {tuple(x.shape)}, got {tuple(identity.shape)}"
        )
    if identity.dtype != x.dtype:
        raise TypeError(f"identity: expected the dtype of x ({x.dtype}), got {identity.dtype}")
    check_same_device("identity", identity, "x", x)


def check_unit_input(x, channels: int, identity, relu) -> bool:
    """The input of a DIA unit (modules.py): x of the unit's channels, the shortcut, and the
    post-activation flag; returns relu with its default (on when an identity is given)."""
    if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: no values to check
        return identity is not None if relu is None else relu
    check_tensor("x", x, dims=4)
    if x.shape[1] != channels:
        raise ValueError(
            f"x: expected {channels} channels (N, {channels}, H, W), got shape {tuple(x.shape)}"
        )
    if identity is not None:
        check_identity(identity, x)
    if relu is None:
        return identity is not None
    if not isinstance(relu, bool):
        raise TypeError(f"relu: expected a bool or None, got {type(relu).__name__}")
    return relu


def check_step_args(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    identity: Optional[Tensor],
    activation: str,
    dropout_masks: Optional[Tensor],
) -> None:
    """Validates the arguments of one DIA step (ops.dia_step); never broadcasts silently."""
    check_tensor("x", x, dims=4)
    n, channels = x.shape[0], x.shape[1]
    check_choice("activation", activation, CELL_ACTIVATIONS)
    if not isinstance(weights, (list, tuple)):
        raise TypeError(
            f"weights: expected a list or tuple of tensors, got {type(weights).__name__}"
        )
    num_cells = num_cells_of(weights)
    sdtype = state_dtype(x.dtype)
    for name, t in (("h", h), ("c", c)):
        check_tensor(f"state {name}", t, dims=3)
        if tuple(t.shape) != (num_cells, n, channels):
            raise ValueError(
                f"state {name}: expected shape (num_cells, N, C) = "
                f"{(num_cells, n, channels)}, got {tuple(t.shape)}"
            )
        if t.dtype != sdtype:
            raise TypeError(
                f"state {name}: expected dtype {sdtype} (the state dtype for x of "
                f"{x.dtype}), got {t.dtype}"
            )
        check_same_device(f"state {name}", t, "x", x)
    hidden = weights[0].shape[0] if isinstance(weights[0], torch.Tensor) else None
    device = x.device
    # torch.compile traces the checks once per graph: the uncached function (no lru_cache warning)
    shapes = (
        _expected_weight_shapes.__wrapped__
        if torch.compiler.is_compiling()
        else _expected_weight_shapes
    )
    for (name, expected), t in zip(shapes(num_cells, channels, hidden), weights):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            check_tensor(f"weight {name}", t)  # raises, naming what it got
        if t.device != device:
            check_same_device(f"weight {name}", t, "x", x)
        if t.shape != expected:
            raise ValueError(
                f"weight {name}: expected shape {expected} for C={channels}, got {tuple(t.shape)}"
            )
    if identity is not None:
        check_identity(identity, x)
    if num_cells > 1 and dropout_masks is not None:
        check_tensor("dropout_masks", dropout_masks, dims=3)
        if tuple(dropout_masks.shape) != (num_cells - 1, n, channels):
            raise ValueError(
                f"dropout_masks: expected shape {(num_cells - 1, n, channels)}, "
                f"got {tuple(dropout_masks.shape)}"
            )
        check_same_device("dropout_masks", dropout_masks, "x", x)


@functools.lru_cache(
    maxsize=256
)  # every step checks its weights: the names and shapes once per unit shape
def _expected_weight_shapes(
    num_cells: int, channels: int, hidden: Optional[int]
) -> Tuple[Tuple[str, tuple], ...]:
    return tuple(
        (name, _expected_weight_shape(name, channels, hidden)) for name in weight_names(num_cells)
    )


def _expected_weight_shape(name: str, channels: int, hidden: Optional[int]) -> tuple:
    if ".seq." in name:
        first = ".seq.0." in name
        if name.endswith("weight"):
            return (hidden, channels) if first else (4 * channels, hidden)
        return (hidden,) if first else (4 * channels,)
    return (4 * channels, channels) if name.endswith("weight") else (4 * channels,)
