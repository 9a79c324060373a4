"""The DIA-LSTM step in plain PyTorch: the executable spec every backend matches.

docs/design.md §1. For one residual block t of a stage, with branch output x_t (N, C, H, W):

    s_t   = mean_{H,W} x_t                                              (N, C)
    cell 0:  gates = Wih2 relu(Wih1 s_t + bih1) + bih2
                   + Whh2 relu(Whh1 h0_{t-1} + bhh1) + bhh2             (N, 4C)
    cell l>0: gates = Wih_l dropout(h_{l-1,t}) + bih_l + Whh_l h_{l,t-1} + bhh_l
    i, f, g, o = gates.chunk(4)
    c = sigmoid(f) c_prev + sigmoid(i) tanh(g);   h = sigmoid(o) act(c)
    a_t = h of the last cell;   y_t = x_t * a_t;   out = relu?(y_t + identity_t)

Numerics: the recurrent state and the LSTM math are kept in `state_dtype(x.dtype)` (float32 for
half inputs, float64 for float64), the pooled mean accumulates in that dtype, and the feature-map
epilogue is computed in it and rounded once to x.dtype. Fused kernels do the same, so they are
compared against this function run on the same inputs (docs/design.md §4).

Weights are passed as one flat sequence, in the order of `weight_names(num_cells)`:
cell 0 has 8 tensors (the reduced ih and hh paths), every stacked cell l >= 1 has 4.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

CELL_ACTIVATIONS = ("sigmoid", "tanh", "relu")
CELL0_WEIGHTS = 8  # wih1, bih1, wih2, bih2, whh1, bhh1, whh2, bhh2
STACKED_CELL_WEIGHTS = 4  # wih, bih, whh, bhh


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the recurrent state (h, c) and of the LSTM math for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (meta, for shape propagation, has no autocast)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A context with autocast disabled on `device_type`: entered only where autocast is on."""
    if autocasting(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def weight_names(num_cells: int) -> Tuple[str, ...]:
    """Names (official `LSTMCell` state-dict keys) of the flat weight sequence, in order."""
    names = []
    for path in ("w_ih", "w_hh"):
        names += [
            f"{path}.0.seq.0.weight",
            f"{path}.0.seq.0.bias",
            f"{path}.0.seq.2.weight",
            f"{path}.0.seq.2.bias",
        ]
    for cell in range(1, num_cells):
        names += [
            f"w_ih.{cell}.weight",
            f"w_ih.{cell}.bias",
            f"w_hh.{cell}.weight",
            f"w_hh.{cell}.bias",
        ]
    return tuple(names)


def weight_elements(channels: int, hidden: int, num_cells: int) -> int:
    """Elements of the flat weight sequence of `num_cells` cells on C = channels, R = hidden: per
    path of cell 0 (R, C), (R), (4C, R), (4C); per path of a stacked cell (4C, C), (4C)."""
    cell0 = 2 * (hidden * channels + hidden + 4 * channels * hidden + 4 * channels)
    return cell0 + (num_cells - 1) * 2 * (4 * channels * channels + 4 * channels)


def num_cells_of(weights: Sequence[Tensor]) -> int:
    """Number of stacked cells described by a flat weight sequence."""
    extra = len(weights) - CELL0_WEIGHTS
    if extra < 0 or extra % STACKED_CELL_WEIGHTS:
        raise ValueError(
            f"weights: expected {CELL0_WEIGHTS} + {STACKED_CELL_WEIGHTS}*(num_cells-1) tensors, "
            f"got {len(weights)}"
        )
    return 1 + extra // STACKED_CELL_WEIGHTS


def cell_activation(c: Tensor, activation: str) -> Tensor:
    """act(c) of the output gate: sigmoid (DIA default), tanh (standard LSTM) or relu."""
    if activation == "sigmoid":
        return torch.sigmoid(c)
    if activation == "tanh":
        return torch.tanh(c)
    if activation == "relu":
        return torch.relu(c)
    raise ValueError(f"cell_activation: expected one of {CELL_ACTIVATIONS}, got {activation!r}")


def reduced_linear(v: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """W2 relu(W1 v + b1) + b2: the shared dimension reduction of cell 0 (paper Fig. 4)."""
    return F.linear(F.relu(F.linear(v, w1, b1)), w2, b2)


def lstm_pointwise(gates: Tensor, c_prev: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    """(h, c) from pre-activation gates (N, 4C) in i, f, g, o order and the previous cell state."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * cell_activation(c, activation)
    return h, c


def dia_lstm_cells(
    s: Tensor,  # (N, C) pooled features, state dtype
    h: Tensor,  # (L, N, C) previous hidden state
    c: Tensor,  # (L, N, C) previous cell state
    weights: Sequence[Tensor],  # flat, see weight_names(L)
    activation: str = "sigmoid",
    dropout_masks: Optional[Tensor] = None,  # (L-1, N, C) scaled keep-masks between cells, or None
) -> Tuple[Tensor, Tensor]:
    """One step of the stacked modified LSTM. Returns the new (h, c), each (L, N, C)."""
    num_cells = num_cells_of(weights)
    dtype = h.dtype
    w = [t.to(dtype) for t in weights]
    gates = reduced_linear(s, *w[0:4]) + reduced_linear(h[0], *w[4:8])
    h_cell, c_cell = lstm_pointwise(gates, c[0], activation)
    hs, cs = [h_cell], [c_cell]
    for cell in range(1, num_cells):
        wih, bih, whh, bhh = w[CELL0_WEIGHTS + STACKED_CELL_WEIGHTS * (cell - 1) :][:4]
        inp = h_cell if dropout_masks is None else h_cell * dropout_masks[cell - 1]
        gates = F.linear(inp, wih, bih) + F.linear(h[cell], whh, bhh)
        h_cell, c_cell = lstm_pointwise(gates, c[cell], activation)
        hs.append(h_cell)
        cs.append(c_cell)
    return torch.stack(hs), torch.stack(cs)


def dia_lstm_step(
    x: Tensor,  # (N, C, H, W) residual-branch output
    h: Tensor,  # (L, N, C) hidden state, state_dtype(x.dtype)
    c: Tensor,  # (L, N, C) cell state, state_dtype(x.dtype)
    weights: Sequence[Tensor],  # flat, see weight_names(L)
    identity: Optional[Tensor] = None,  # (N, C, H, W) shortcut added after the attention
    relu: bool = False,  # relu(x * a + identity): post-activation residual networks
    activation: str = "sigmoid",
    dropout_masks: Optional[Tensor] = None,  # (L-1, N, C) or None
) -> Tuple[Tensor, Tensor, Tensor]:
    """One DIA-LSTM step: returns (out, h_new, c_new); out has x's dtype and shape."""
    compute = h.dtype
    # autocast would run the small linears in half precision; the spec keeps them in `compute`
    with autocast_off(x.device.type):
        s = x.mean(dim=(2, 3), dtype=compute)
        h_new, c_new = dia_lstm_cells(s, h, c, weights, activation, dropout_masks)
    out = x.to(compute) * h_new[-1][:, :, None, None]
    if identity is not None:
        out = out + identity.to(compute)
    if relu:
        out = torch.relu(out)
    return out.to(x.dtype), h_new, c_new
