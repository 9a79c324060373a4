"""DIA units as nn.Modules: DIALSTM (the paper's DIA-LSTM), DIASE (DIA-SE) and DIAStage.

A unit is shared by all residual blocks of a stage. Every unit has the same call:

    out, state = unit(x, state=None, identity=None, relu=None)

with x the branch output (N, C, H, W), `identity` the shortcut and `relu` the post-activation
(default: on when an identity is given). DIAStage runs the blocks of a stage through one unit.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._checks import check_choice, check_positive_int, check_unit_input
from .reference import CELL_ACTIVATIONS, state_dtype

Tensor = torch.Tensor
State = Tuple[Tensor, Tensor]


def reduced_width(channels: int, reduction: int) -> int:
    """C // r, like the official code; a ratio larger than C is an error, not a zero width."""
    check_positive_int("channels", channels)
    check_positive_int("reduction", reduction)
    if reduction > channels:
        raise ValueError(f"reduction: expected a ratio <= channels ({channels}), got {reduction}")
    return channels // reduction


class ReducedLinear(nn.Module):
    """Linear(C, C/r) -> ReLU -> Linear(C/r, 4C); the official `small_cell` (keys `seq.0`,
    `seq.2`)."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)
        )

    def forward(self, v: Tensor) -> Tensor:
        return self.seq(v)


def linear_weights(layer: nn.Module) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of a Linear as its own forward would see them. The unit never calls its
    Linear layers (the backends compute them), so what nn.Module.__call__ would do first is done
    here: the forward pre-hooks run (torch.nn.utils.prune and the old-style weight_norm and
    spectral_norm recompute the weight in one; they get no inputs), and the tensors are read as
    attributes (parametrizations compute them there). Plain parameters without hooks are read
    from the parameter dict: every step asks, and attribute lookup costs more."""
    params = layer._parameters
    if not layer._forward_pre_hooks and "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    for hook_id, hook in tuple(layer._forward_pre_hooks.items()):
        if hook_id in layer._forward_pre_hooks_with_kwargs:
            hook(layer, (), {})
        else:
            hook(layer, ())
    return layer.weight, layer.bias


class DIALSTM(nn.Module):
    """The DIA-LSTM unit: GAP -> modified LSTM (shared reduction, sigmoid output) -> x * h.

    Args:
        channels: C of the feature maps of the stage.
        reduction: r of the shared reduction Linear(C, C // r) of cell 0.
        num_cells: stacked cells (cells >= 1 are plain Linear(C, 4C), dropout between cells).
        dropout: dropout probability between stacked cells (training only).
        cell_activation: act of h = sigmoid(o) * act(c): "sigmoid" (paper), "tanh", "relu".
        backend: "auto" | "reference" | "triton" | "cuda". DIA_FUSED_BACKEND, when set, says what
            "auto" stands for; a backend named here wins over it.

    The state_dict has exactly the keys of the official implementation's `LSTMCell`.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        num_cells: int = 1,
        dropout: float = 0.1,
        cell_activation: str = "sigmoid",
        backend: str = "auto",
    ):
        super().__init__()
        hidden = reduced_width(channels, reduction)
        check_positive_int("num_cells", num_cells)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1
        ):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        check_choice("cell_activation", cell_activation, CELL_ACTIVATIONS)
        check_choice("backend", backend, ops.BACKEND_CHOICES)
        self.channels, self.reduction, self.num_cells = channels, reduction, num_cells
        self.dropout, self.cell_activation, self.backend = float(dropout), cell_activation, backend
        cells_ih = [ReducedLinear(channels, hidden, 4 * channels)]
        cells_hh = [ReducedLinear(channels, hidden, 4 * channels)]
        for _ in range(1, num_cells):
            cells_ih.append(nn.Linear(channels, 4 * channels))
            cells_hh.append(nn.Linear(channels, 4 * channels))
        self.w_ih = nn.ModuleList(cells_ih)
        self.w_hh = nn.ModuleList(cells_hh)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, reduction={self.reduction}, num_cells={self.num_cells}, "
            f"dropout={self.dropout}, cell_activation={self.cell_activation!r}, "
            f"backend={self.backend!r}"
        )

    def flat_weights(self) -> Tuple[Tensor, ...]:
        """The weights in reference.weight_names order (the backends' calling convention), as the
        cells' Linear layers would use them: see `linear_weights` (parametrizations, pruning)."""
        ih, hh = self._modules["w_ih"]._modules, self._modules["w_hh"]._modules
        out = []
        for cells in (ih, hh):  # cell 0: Linear(C, C/r) -> ReLU -> Linear(C/r, 4C)
            layers = cells["0"]._modules["seq"]._modules
            out += linear_weights(layers["0"])
            out += linear_weights(layers["2"])
        for cell in range(1, self.num_cells):  # cells 1..: Linear(C, 4C)
            out += linear_weights(ih[str(cell)])
            out += linear_weights(hh[str(cell)])
        return tuple(out)

    def initial_state(self, x: Tensor) -> State:
        """Zero (h, c), each (num_cells, N, C) in the state dtype of x (fp32 for half inputs)."""
        shape = (self.num_cells, x.shape[0], self.channels)
        zeros = torch.zeros(shape, dtype=state_dtype(x.dtype), device=x.device)
        return zeros, zeros.clone()

    def resolved_backend(self, x_or_device) -> str:
        """The backend a forward runs with (`auto` resolved, DIA_FUSED_BACKEND standing for it when
        set): for an input x exactly; for a device, auto's choice without a step shape (cuda >
        triton > reference)."""
        if isinstance(x_or_device, Tensor):
            return ops.resolve_backend(
                self.backend, x_or_device.device, ops.step_key(x_or_device, self.flat_weights())
            )
        return ops.resolve_backend(self.backend, x_or_device)

    def forward(
        self,
        x: Tensor,
        state: Optional[State] = None,
        identity: Optional[Tensor] = None,
        relu: Optional[bool] = None,
    ) -> Tuple[Tensor, State]:
        # the input checks run once per input signature, in ops.dia_step's plan (unit_channels)
        if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 2):
            raise TypeError(f"state: expected a tuple (h, c) or None, got {type(state).__name__}")
        dropout = self.dropout if self.training and self.num_cells > 1 else 0.0
        step = dialstm_step(
            x,
            state,
            identity,
            relu,
            self.flat_weights(),
            self.num_cells,
            self.channels,
            dropout,
            self.cell_activation,
            self.backend,
        )
        # out read last: in a torch.fx graph the unit's (and its block's) last node is then its
        # output, which create_feature_extractor takes as the module's
        h, c = step[1], step[2]
        return step[0], (h, c)


@torch.fx.wrap  # one call in a torch.fx graph (symbolic_trace, create_feature_extractor)
def dialstm_step(
    x, state, identity, relu, weights, num_cells, channels, dropout, activation, backend
):
    """DIALSTM's step: dropout masks between cells when `dropout` > 0, then ops.dia_step, which
    checks the unit's input and makes the zero state when `state` is None: (out, h, c)."""
    h, c = (None, None) if state is None else state
    masks = None
    if dropout > 0:
        check_unit_input(x, channels, identity, relu)  # the masks take x's shape
        keep = 1.0 - dropout
        masks = torch.empty(
            (num_cells - 1, x.shape[0], channels), dtype=state_dtype(x.dtype), device=x.device
        )
        masks = masks.bernoulli_(keep).div_(keep)
    return ops.dia_step(
        x, h, c, weights, identity, relu, activation, masks, backend, unit_channels=channels
    )


class DIASE(nn.Module):
    """DIA-SE (paper Table 1): one SE module, Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> sigmoid,
    shared by all blocks of a stage. Same call as DIALSTM; it has no recurrent state (returns
    None)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = reduced_width(channels, reduction)
        self.channels, self.reduction = channels, reduction
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def extra_repr(self) -> str:
        return f"{self.channels}, reduction={self.reduction}"

    def forward(
        self, x: Tensor, state=None, identity: Optional[Tensor] = None, relu: Optional[bool] = None
    ) -> Tuple[Tensor, None]:
        relu = check_unit_input(x, self.channels, identity, relu)
        a = torch.sigmoid(self.fc(x.mean(dim=(2, 3))))
        out = x * a[:, :, None, None]
        if identity is not None:
            out = out + identity
        return (F.relu(out) if relu else out), None


class DIAStage(nn.Module):
    """Runs the residual blocks of one stage through one shared unit.

    Each block maps x to (branch, identity); the stage returns unit(branch, state, identity, relu)
    chained over the blocks, with the state reset (zeros) at every forward.

    Args:
        blocks: the residual blocks, in order.
        unit: a DIALSTM or DIASE (anything with the unit call).
        relu: post-activation after the residual add (False for pre-activation networks).
    """

    def __init__(self, blocks: Iterable[nn.Module], unit: nn.Module, relu: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if len(self.blocks) == 0:
            raise ValueError("blocks: expected at least one residual block, got none")
        self.unit = unit
        self.relu = relu

    def forward(self, x: Tensor, return_attention: bool = False):
        state = None
        attention = []
        for index, block in enumerate(self.blocks):
            branch, identity = block_output(block(x), index, block)
            x, state = self.unit(branch, state, identity=identity, relu=self.relu)
            if return_attention:
                attention.append(_attention_vector(self.unit, branch, state))
        if return_attention:
            return x, torch.stack(attention, dim=1)
        return x


def block_output(result, index: int, block: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """A stage block's (branch, identity), or a TypeError naming the block: a block that returns
    one tensor would otherwise be unpacked along its batch dimension."""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return result
    if isinstance(result, Tensor):
        got = f"a Tensor of shape {tuple(result.shape)}"
    elif isinstance(result, (tuple, list)):
        got = f"a {type(result).__name__} of {len(result)} items"
    else:
        got = type(result).__name__
    raise TypeError(
        f"blocks[{index}] ({type(block).__name__}): expected a block that returns "
        f"(branch, identity), the residual branch and the shortcut (None without "
        f"one), got {got}"
    )


def _attention_vector(unit: nn.Module, branch: Tensor, state) -> Tensor:
    """a_t (N, C) of the step just run: h of the last cell for DIA-LSTM, recomputed for DIA-SE."""
    if state is not None:
        return state[0][-1]
    return torch.sigmoid(unit.fc(branch.mean(dim=(2, 3))))
