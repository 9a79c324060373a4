"""The small (N, C) LSTM part of the DIA step in fp32 torch ops, forward with what the backward
needs and an explicit backward (no autograd: custom-op implementations run below the autograd
dispatch key). Used by the triton backend between its feature-map kernels."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import reference

Tensor = torch.Tensor


def _act_and_grad(c: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    """act(c) and act'(c)."""
    if activation == "sigmoid":
        s = torch.sigmoid(c)
        return s, s * (1 - s)
    if activation == "tanh":
        t = torch.tanh(c)
        return t, 1 - t * t
    return torch.relu(c), (c > 0).to(c.dtype)


def cells_forward(pooled: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], activation: str,
                  masks: Optional[Tensor]):
    """(h_new, c_new, saved): h, c (L, N, C) fp32; weights fp32 in reference.weight_names order."""
    wih1, bih1, wih2, bih2, whh1, bhh1, whh2, bhh2 = weights[:8]
    u_ih = F.linear(pooled, wih1, bih1)
    u_hh = F.linear(h[0], whh1, bhh1)
    inputs, gates = [pooled], []
    g = F.linear(torch.relu(u_ih), wih2, bih2) + F.linear(torch.relu(u_hh), whh2, bhh2)
    hs, cs = [], []
    for cell in range(h.shape[0]):
        if cell > 0:
            wih, bih, whh, bhh = weights[8 + 4 * (cell - 1):][:4]
            inp = hs[-1] if masks is None else hs[-1] * masks[cell - 1]
            inputs.append(inp)
            g = F.linear(inp, wih, bih) + F.linear(h[cell], whh, bhh)
        gates.append(g)
        gi, gf, gg, go = g.chunk(4, dim=1)
        c_new = torch.sigmoid(gf) * c[cell] + torch.sigmoid(gi) * torch.tanh(gg)
        hs.append(torch.sigmoid(go) * _act_and_grad(c_new, activation)[0])
        cs.append(c_new)
    return torch.stack(hs), torch.stack(cs), (u_ih, u_hh, inputs, gates, cs)


def cells_backward(grad_h: Tensor, grad_c: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor],
                   activation: str, masks: Optional[Tensor], saved) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """(grad_pooled, grad_h0, grad_c0, grad_weights) from the gradients of h_new and c_new."""
    u_ih, u_hh, inputs, gates, cs = saved
    num_cells = h.shape[0]
    grad_h = grad_h.clone()
    grad_h0, grad_c0 = torch.zeros_like(h), torch.zeros_like(c)
    grad_weights: List[Tensor] = [None] * len(weights)
    grad_pooled = None
    for cell in reversed(range(num_cells)):
        gi, gf, gg, go = gates[cell].chunk(4, dim=1)
        si, sf, tg, so = torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg), torch.sigmoid(go)
        act, dact = _act_and_grad(cs[cell], activation)
        dh = grad_h[cell]
        dc = grad_c[cell] + dh * so * dact
        dgates = torch.cat([dc * tg * si * (1 - si), dc * c[cell] * sf * (1 - sf),
                            dc * si * (1 - tg * tg), dh * act * so * (1 - so)], dim=1)
        grad_c0[cell] = dc * sf
        if cell > 0:
            k = 8 + 4 * (cell - 1)
            wih, _, whh, _ = weights[k:k + 4]
            grad_weights[k:k + 4] = [dgates.t() @ inputs[cell], dgates.sum(0), dgates.t() @ h[cell], dgates.sum(0)]
            grad_h0[cell] = dgates @ whh
            d_inp = dgates @ wih
            grad_h[cell - 1] += d_inp if masks is None else d_inp * masks[cell - 1]
            continue
        wih1, _, wih2, _, whh1, _, whh2, _ = weights[:8]
        for path, (u, w1, w2, v) in enumerate(((u_ih, wih1, wih2, inputs[0]), (u_hh, whh1, whh2, h[0]))):
            r = torch.relu(u)
            du = (dgates @ w2) * (u > 0).to(u.dtype)
            grad_weights[4 * path:4 * path + 4] = [du.t() @ v, du.sum(0), dgates.t() @ r, dgates.sum(0)]
            if path == 0:
                grad_pooled = du @ w1
            else:
                grad_h0[0] = du @ w1
    return grad_pooled, grad_h0, grad_c0, grad_weights


assert reference.CELL0_WEIGHTS == 8 and reference.STACKED_CELL_WEIGHTS == 4  # the layout used above
