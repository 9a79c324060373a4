"""Edges of the DIA unit: reparametrized cell weights (torch.nn.utils.parametrizations, pruning,
the old hook-based weight_norm), meta tensors (shape propagation), and stage blocks that break the
(branch, identity) contract."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

from dia_fused import DIALSTM, DIAStage, available_backends, reference
from dia_fused.testing import max_abs_error

CPU_BACKENDS = available_backends("cpu")


def _unit_and_input(backend, num_cells=2, seed=0):
    torch.manual_seed(seed)
    unit = DIALSTM(8, reduction=2, num_cells=num_cells, dropout=0.0, backend=backend)
    x = torch.randn(2, 8, 3, 3)
    return unit, x


def _reference_run(weights, x, num_cells):
    """The step on explicit weights: the reference function, no module involved."""
    h = torch.zeros(num_cells, x.shape[0], x.shape[1])
    out, h_new, c_new = reference.dia_lstm_step(x, h, h.clone(), weights, x, relu=True)
    return out, h_new


def _loss(out, h_new):
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h_new.square().sum()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_norm_parametrization_on_cell_linears(backend):
    """weight_norm (a parametrization: `weight` leaves the parameter dict) on the reduced ih layer
    and a stacked cell: the forward uses g * v / |v| and the gradients reach g and v."""
    unit, x = _unit_and_input(backend)
    layers = [unit.w_ih[0].seq[0], unit.w_hh[1]]
    for layer in layers:
        parametrizations.weight_norm(layer)
    names = reference.weight_names(2)
    # the same weights as leaves, the reparametrization written out
    g = {id(m): m.parametrizations.weight.original0.detach().clone().requires_grad_()
         for m in layers}
    v = {id(m): m.parametrizations.weight.original1.detach().clone().requires_grad_()
         for m in layers}
    plain = {n: p.detach().clone().requires_grad_() for n, p in unit.named_parameters()
             if "parametrizations" not in n}
    weights = []
    for name in names:
        path, attr = name.rsplit(".", 1)
        layer = unit.get_submodule(path)
        if id(layer) in g and attr == "weight":
            vv = v[id(layer)]
            weights.append(g[id(layer)] * vv / vv.norm(dim=1, keepdim=True))
        else:
            weights.append(plain[name])
    want_out, want_h = _reference_run(weights, x, 2)
    _loss(want_out, want_h).backward()

    out, (h, _) = unit(x, identity=x, relu=True)
    assert max_abs_error(out, want_out) < 1e-5 and max_abs_error(h, want_h) < 1e-5
    _loss(out, h).backward()
    for layer in layers:
        original = layer.parametrizations.weight
        assert max_abs_error(original.original0.grad, g[id(layer)].grad) < 1e-5
        assert max_abs_error(original.original1.grad, v[id(layer)].grad) < 1e-5
    for name, p in unit.named_parameters():
        if "parametrizations" not in name:
            assert max_abs_error(p.grad, plain[name].grad) < 1e-5, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pruned_cell_linear_uses_the_current_mask_and_weights(backend):
    """torch.nn.utils.prune keeps `weight_orig` and recomputes `weight` in a forward pre-hook:
    every step uses weight_orig * mask as it is now (not as it was at pruning time), and the
    gradient reaches weight_orig through the mask; two optimizer steps match a plain copy."""
    unit, x = _unit_and_input(backend)
    layer = unit.w_hh[0].seq[2]
    prune.l1_unstructured(layer, "weight", amount=0.5)
    mask, start = layer.weight_mask.clone(), layer.weight_orig.detach().clone()
    plain, _ = _unit_and_input(backend)
    with torch.no_grad():
        plain.w_hh[0].seq[2].weight.mul_(mask)
    opt = torch.optim.SGD(unit.parameters(), lr=0.5)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.5)
    for _ in range(2):
        for model, optimizer in ((unit, opt), (plain, opt_plain)):
            optimizer.zero_grad()
            out, (h, _) = model(x, identity=x, relu=True)
            _loss(out, h).backward()
            optimizer.step()
        # the plain copy's pruned entries got gradients; the pruned unit's weight_orig got them
        # through the mask (zero there): re-mask the copy to compare like with like
        with torch.no_grad():
            plain.w_hh[0].seq[2].weight.mul_(mask)
        assert max_abs_error(layer.weight_orig.grad, plain.w_hh[0].seq[2].weight.grad * mask) < 1e-5
    with torch.no_grad():
        out, _ = unit(x, identity=x, relu=True)
        want, _ = plain(x, identity=x, relu=True)
    assert max_abs_error(out, want) < 1e-5
    assert not torch.equal(layer.weight_orig, start)  # the steps moved it: a stale weight would show


def test_old_style_weight_norm_hook_on_a_cell_linear():
    """torch.nn.utils.weight_norm (deprecated, still shipped) recomputes `weight` in a forward
    pre-hook from weight_g and weight_v: the unit runs it and gradients reach both."""
    unit, x = _unit_and_input("reference", num_cells=1)
    layer = unit.w_ih[0].seq[2]
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(layer)
    with torch.no_grad():  # a weight the hook must recompute: the attribute set at wrapping is stale
        layer.weight_g.mul_(2)
    out, (h, _) = unit(x, identity=x, relu=True)
    weights = [w.detach() for w in unit.flat_weights()]
    want_out, _ = _reference_run(weights, x, 1)
    g, v = layer.weight_g.detach(), layer.weight_v.detach()
    assert max_abs_error(weights[2], g * v / v.norm(dim=1, keepdim=True)) < 1e-6
    assert max_abs_error(out, want_out) < 1e-6
    _loss(out, h).backward()
    assert layer.weight_g.grad is not None and layer.weight_g.grad.abs().sum() > 0
    assert layer.weight_v.grad is not None and layer.weight_v.grad.abs().sum() > 0


def test_plain_parameters_are_returned_themselves():
    """Without hooks or parametrizations the weights are the parameters (no copies)."""
    unit, _ = _unit_and_input("reference")
    by_name = dict(unit.named_parameters())
    for name, weight in zip(reference.weight_names(2), unit.flat_weights()):
        assert weight is by_name[name], name
