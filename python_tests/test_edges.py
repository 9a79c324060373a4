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
    g = {
        id(m): m.parametrizations.weight.original0.detach().clone().requires_grad_() for m in layers
    }
    v = {
        id(m): m.parametrizations.weight.original1.detach().clone().requires_grad_() for m in layers
    }
    plain = {
        n: p.detach().clone().requires_grad_()
        for n, p in unit.named_parameters()
        if "parametrizations" not in n
    }
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
    # the steps moved it: a weight computed once at pruning time would show
    assert not torch.equal(layer.weight_orig, start)


def test_old_style_weight_norm_hook_on_a_cell_linear():
    """torch.nn.utils.weight_norm (deprecated, still shipped) recomputes `weight` in a forward
    pre-hook from weight_g and weight_v: the unit runs it and gradients reach both."""
    unit, x = _unit_and_input("reference", num_cells=1)
    layer = unit.w_ih[0].seq[2]
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(layer)
    # a weight the hook must recompute: the attribute set at wrapping time is stale
    with torch.no_grad():
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unit_and_step_propagate_shapes_on_meta(dtype):
    """Meta tensors (no data: shapes, dtypes and devices only) through DIALSTM in training mode
    (dropout masks between stacked cells), its backward, ops.dia_step and DIASE."""
    from dia_fused import DIASE, ops

    with torch.device("meta"):
        unit = DIALSTM(16, reduction=4, num_cells=2, dropout=0.2)
        se = DIASE(16, reduction=4)
    x = torch.empty(3, 16, 5, 4, device="meta", dtype=dtype, requires_grad=True)
    out, (h, c) = unit(x, identity=x.detach())
    assert (out.shape, out.dtype, out.device.type) == (x.shape, dtype, "meta")
    assert h.shape == c.shape == (2, 3, 16) and h.dtype == torch.float32 and h.is_meta
    (out.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape and x.grad.is_meta
    assert all(p.grad is not None and p.grad.shape == p.shape for p in unit.parameters())
    assert unit.resolved_backend(x) == "reference"
    step_out, step_h, _ = ops.dia_step(x.detach(), h.detach(), c.detach(), unit.flat_weights())
    assert step_out.shape == x.shape and step_h.shape == h.shape and step_out.is_meta
    se_out, state = se(x.detach(), identity=x.detach())
    assert se_out.shape == x.shape and se_out.is_meta and state is None


@pytest.mark.parametrize(
    "name, logits, attention",
    [
        ("dia_resnet20", (2, 10), [(2, 3, 16), (2, 3, 32), (2, 3, 64)]),
        ("dia_se_preresnet20", (2, 10), [(2, 2, 64), (2, 2, 128), (2, 2, 256)]),
        ("dia_resnet18", (2, 1000), [(2, 2, 64), (2, 2, 128), (2, 2, 256), (2, 2, 512)]),
    ],
)
def test_models_propagate_shapes_on_meta(name, logits, attention):
    from dia_fused.models import create_model

    with torch.device("meta"):
        model = create_model(name)
        y, attn = model(torch.empty(2, 3, 32, 32), return_attention=True)
    assert y.is_meta and tuple(y.shape) == logits
    assert [tuple(a.shape) for a in attn] == attention


def test_training_cli_refuses_the_meta_device(tmp_path):
    """Before any work: meta tensors hold no data, so there is nothing to train or measure."""
    from dia_fused.train.cli import main
    from dia_fused.train.distributed import pick_device

    with pytest.raises(ValueError, match=r"--device meta: meta tensors hold no data"):
        main(["--device", "meta", "-d", "synthetic", "--epochs", "1", "-c", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"expected cpu or cuda"):
        pick_device("meta", 0)  # the analysis CLI's device choice too


class _OneTensor(nn.Module):
    def forward(self, x):
        return x * 2


class _Triple(nn.Module):
    def forward(self, x):
        return x, x, None


@pytest.mark.parametrize("stage_type", ["dia", "plain"])
def test_a_stage_block_that_breaks_the_branch_identity_contract_is_named(stage_type):
    """A block returning one tensor would be unpacked along its batch dimension (N=2 gives two
    3-D "branch" and "identity" tensors); the stage names the block and what it returned."""
    from dia_fused.models.blocks import PlainStage

    class Pair(nn.Module):
        def forward(self, x):
            return x, None

    def stage(blocks):
        if stage_type == "dia":
            return DIAStage(blocks, DIALSTM(8, reduction=2, backend="reference"))
        return PlainStage(blocks)

    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(
        TypeError,
        match=r"blocks\[1\] \(_OneTensor\): expected a block that "
        r"returns \(branch, identity\).*got a Tensor of shape "
        r"\(2, 8, 3, 3\)",
    ):
        stage([Pair(), _OneTensor()])(x)
    with pytest.raises(TypeError, match=r"blocks\[0\] \(_Triple\): .*got a tuple of 3 items"):
        stage([_Triple()])(x)
    assert stage([Pair(), Pair()])(x).shape == x.shape
