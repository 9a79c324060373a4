"""The reference step (the spec) against an independent formulation of the official code, gradcheck
through chained steps, and the DIALSTM / DIASE / DIAStage modules on the reference backend."""

import pytest
import torch
from torch import nn

from dia_fused import DIALSTM, DIASE, DIAStage, reference
from dia_fused.testing import random_step_inputs


class OfficialSmallCell(nn.Module):
    """The official DIANet `small_cell` (reduction 4 is hard-coded there; a parameter here)."""

    def __init__(self, input_size, hidden_size, reduction):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(input_size, input_size // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(input_size // reduction, 4 * hidden_size),
        )

    def forward(self, x):
        return self.seq(x)


class OfficialLSTMCell(nn.Module):
    """The official DIANet `LSTMCell`, written out independently from its published formulas."""

    def __init__(self, size, nlayers, reduction=4, dropout=0.1):
        super().__init__()
        self.nlayers = nlayers
        self.dropout = nn.Dropout(p=dropout)
        ih, hh = [], []
        for i in range(nlayers):
            if i == 0:
                ih.append(OfficialSmallCell(size, size, reduction))
                hh.append(OfficialSmallCell(size, size, reduction))
            else:
                ih.append(nn.Linear(size, 4 * size))
                hh.append(nn.Linear(size, 4 * size))
        self.w_ih = nn.ModuleList(ih)
        self.w_hh = nn.ModuleList(hh)

    def forward(self, input, hidden):
        hy, cy = [], []
        for i in range(self.nlayers):
            hx, cx = hidden[0][i], hidden[1][i]
            gates = self.w_ih[i](input) + self.w_hh[i](hx)
            i_gate, f_gate, c_gate, o_gate = gates.chunk(4, 1)
            ncx = torch.sigmoid(f_gate) * cx + torch.sigmoid(i_gate) * torch.tanh(c_gate)
            nhx = torch.sigmoid(o_gate) * torch.sigmoid(ncx)
            cy.append(ncx)
            hy.append(nhx)
            input = self.dropout(nhx)
        return torch.stack(hy, 0), torch.stack(cy, 0)


def official_block_step(lstm, x, identity, state):
    """What the official `Attention.forward` does for one block (post-activation ResNet)."""
    seq = nn.AdaptiveAvgPool2d((1, 1))(x).flatten(1)
    h, c = lstm(seq, state)
    out = torch.relu(x * h[-1][:, :, None, None] + identity)
    return out, (h, c)


@pytest.mark.parametrize("num_cells", [1, 2])
def test_official_state_dict_loads_and_matches_over_five_steps(num_cells):
    torch.manual_seed(0)
    channels, n = 24, 3
    official = OfficialLSTMCell(channels, num_cells).eval()
    unit = DIALSTM(channels, reduction=4, num_cells=num_cells).eval()
    assert list(unit.state_dict()) == list(official.state_dict())
    unit.load_state_dict(official.state_dict())  # strict: same keys and shapes
    state_official = (torch.zeros(num_cells, n, channels), torch.zeros(num_cells, n, channels))
    state = None
    for _ in range(5):
        x, idt = torch.randn(n, channels, 5, 7), torch.randn(n, channels, 5, 7)
        expected, state_official = official_block_step(official, x, idt, state_official)
        out, state = unit(x, state, identity=idt)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(state[0], state_official[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(state[1], state_official[1], atol=1e-6, rtol=0)


def test_reference_matches_official_formulas_in_float64_with_dropout_masks():
    torch.manual_seed(1)
    channels, n, cells = 16, 4, 3
    official = OfficialLSTMCell(channels, cells, reduction=2, dropout=0.0).double()
    unit = DIALSTM(channels, reduction=2, num_cells=cells).double()
    unit.load_state_dict(official.state_dict())
    x = torch.randn(n, channels, 3, 3, dtype=torch.float64)
    h0 = torch.randn(cells, n, channels, dtype=torch.float64)
    c0 = torch.randn(cells, n, channels, dtype=torch.float64)
    masks = torch.bernoulli(torch.full((cells - 1, n, channels), 0.5, dtype=torch.float64)) * 2
    # the official cell with its dropout replaced by the same fixed masks
    hy, cy, inp = [], [], x.mean((2, 3))
    for i in range(cells):
        gates = official.w_ih[i](inp) + official.w_hh[i](h0[i])
        gi, gf, gg, go = gates.chunk(4, 1)
        ci = torch.sigmoid(gf) * c0[i] + torch.sigmoid(gi) * torch.tanh(gg)
        hi = torch.sigmoid(go) * torch.sigmoid(ci)
        hy.append(hi), cy.append(ci)
        inp = hi * masks[i] if i < cells - 1 else hi
    out, h, c = reference.dia_lstm_step(x, h0, c0, unit.flat_weights(), dropout_masks=masks)
    torch.testing.assert_close(h, torch.stack(hy), atol=1e-12, rtol=0)
    torch.testing.assert_close(c, torch.stack(cy), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, x * hy[-1][:, :, None, None], atol=1e-12, rtol=0)


@pytest.mark.slow  # float64 gradcheck of three chained steps
@pytest.mark.parametrize("activation", reference.CELL_ACTIVATIONS)
@pytest.mark.parametrize("num_cells", [1, 2])
def test_gradcheck_three_chained_steps(activation, num_cells):
    inputs = random_step_inputs(
        2, 8, 2, 3, reduction=2, num_cells=num_cells, dtype=torch.float64, dropout_p=0.5, seed=3
    )
    identities = [
        torch.randn(2, 8, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    xs = [inputs.x.clone().requires_grad_()] + [
        torch.randn_like(inputs.x).requires_grad_() for _ in range(2)
    ]
    weights = [w.clone().requires_grad_() for w in inputs.weights]
    h0, c0 = inputs.h.clone().requires_grad_(), inputs.c.clone().requires_grad_()

    def three_steps(h, c, *flat):
        xs_, ids, ws = flat[:3], flat[3:6], flat[6:]
        outs = []
        for t in range(3):
            out, h, c = reference.dia_lstm_step(
                xs_[t],
                h,
                c,
                ws,
                identity=ids[t],
                relu=(t != 1),
                activation=activation,
                dropout_masks=inputs.dropout_masks,
            )
            outs.append(out)
        return (*outs, h, c)

    assert torch.autograd.gradcheck(three_steps, (h0, c0, *xs, *identities, *weights))


def test_module_backward_reaches_every_parameter_and_input():
    unit = DIALSTM(12, reduction=3, num_cells=2)
    x = torch.randn(2, 12, 4, 4, requires_grad=True)
    idt = torch.randn(2, 12, 4, 4, requires_grad=True)
    out, state = unit(x, identity=idt)
    out2, state = unit(out, state, identity=idt, relu=False)
    (out2.square().sum() + state[0].sum() + state[1].sum()).backward()
    for name, p in unit.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and idt.grad.abs().sum() > 0


def test_parameter_count_matches_the_design_formula():
    for channels, r in ((64, 4), (256, 4), (2048, 20), (30, 7)):
        unit = DIALSTM(channels, reduction=r)
        cr = channels // r
        expected = 2 * (channels * cr + cr + cr * 4 * channels + 4 * channels)
        assert sum(p.numel() for p in unit.parameters()) == expected


def test_stacked_cell_keys_follow_the_official_layout():
    keys = list(DIALSTM(8, num_cells=3).state_dict())
    assert sorted(keys) == sorted(reference.weight_names(3))
    assert "w_ih.1.weight" in keys and "w_hh.2.bias" in keys


@pytest.mark.parametrize("num_cells", [1, 2, 3])
def test_flat_weights_are_the_parameters_in_weight_names_order(num_cells):
    unit = DIALSTM(16, reduction=4, num_cells=num_cells)
    unit.w_hh[0].seq[2].weight = nn.Parameter(torch.randn(64, 4))  # a replaced parameter is seen
    params = dict(unit.named_parameters())
    flat = unit.flat_weights()
    assert len(flat) == len(reference.weight_names(num_cells))
    assert all(t is params[name] for t, name in zip(flat, reference.weight_names(num_cells)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_fp32_state_and_return_input_dtype(dtype):
    unit = DIALSTM(16)
    x = torch.randn(2, 16, 3, 3).to(dtype)
    out, (h, c) = unit(x)
    assert out.dtype == dtype and h.dtype == torch.float32 and c.dtype == torch.float32
    expected, _ = unit(x.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_channels_last_input_gives_channels_last_output_with_same_values():
    unit = DIALSTM(16)
    x = torch.randn(2, 16, 5, 5)
    idt = torch.randn(2, 16, 5, 5)
    out, _ = unit(x, identity=idt)
    out_cl, _ = unit(
        x.contiguous(memory_format=torch.channels_last),
        identity=idt.contiguous(memory_format=torch.channels_last),
    )
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out, atol=1e-6, rtol=0)


def test_empty_batch_returns_empty():
    unit = DIALSTM(8)
    out, (h, c) = unit(torch.randn(0, 8, 4, 4))
    assert out.shape == (0, 8, 4, 4) and h.shape == (1, 0, 8)


def test_training_dropout_only_between_stacked_cells():
    torch.manual_seed(0)
    single = DIALSTM(8, num_cells=1, dropout=0.5).train()
    x = torch.randn(3, 8, 2, 2)
    # one cell: dropout never applies, train and eval agree
    torch.testing.assert_close(single(x)[0], single.eval()(x)[0])
    stacked = DIALSTM(8, num_cells=2, dropout=0.5).train()
    runs = {tuple(stacked(x)[1][0][-1].flatten().tolist()) for _ in range(4)}
    assert len(runs) > 1  # the masks differ between calls in training


class Block(nn.Module):
    """A residual block returning (branch, identity)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x), x


def test_stage_chains_blocks_through_one_shared_unit_and_returns_attention():
    torch.manual_seed(0)
    blocks = [Block(8) for _ in range(3)]
    unit = DIALSTM(8)
    stage = DIAStage(blocks, unit)
    x = torch.randn(2, 8, 6, 6)
    y, attention = stage(x, return_attention=True)
    state, expected, attn = None, x, []
    for block in blocks:
        branch, idt = block(expected)
        expected, state = unit(branch, state, identity=idt)
        attn.append(state[0][-1])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(attention, torch.stack(attn, 1))
    assert attention.shape == (2, 3, 8)
    torch.testing.assert_close(stage(x), y)  # state reset at every forward


def test_dia_se_stage_shares_one_se_module():
    torch.manual_seed(0)
    unit = DIASE(16, reduction=4)
    stage = DIAStage([Block(16), Block(16)], unit, relu=False)
    x = torch.randn(2, 16, 3, 3)
    y, attention = stage(x, return_attention=True)
    branch, idt = stage.blocks[0](x)
    a0 = torch.sigmoid(unit.fc(branch.mean((2, 3))))
    x1 = branch * a0[:, :, None, None] + idt
    branch, idt = stage.blocks[1](x1)
    a1 = torch.sigmoid(unit.fc(branch.mean((2, 3))))
    torch.testing.assert_close(y, branch * a1[:, :, None, None] + idt)
    torch.testing.assert_close(attention, torch.stack([a0, a1], 1))
    assert sum(p.numel() for p in unit.parameters()) == 16 * 4 + 4 + 4 * 16 + 16
