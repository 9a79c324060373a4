"""torch.func transforms (grad, vmap, jacrev and their compositions) over the fused backends, on
CPU: triton under the interpreter and cuda on its emulated kernels, tiny shapes. Each result must
match the same transform over the reference backend; what the kernels cannot do (a second
derivative, forward mode) must raise, never give zeros."""

import pytest
import torch
from torch.func import grad, jacrev, vmap

import cuda_emulation
from dia_fused import ops
from dia_fused.testing import random_step_inputs


@pytest.fixture(params=["triton", "cuda"])
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        from dia_fused.kernels import triton as triton_kernels

        if not triton_kernels.INTERPRETED:
            pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    else:
        if cuda_emulation.unavailable_reason() is not None:
            pytest.skip(f"kernel emulation: {cuda_emulation.unavailable_reason()}")
        request.getfixturevalue("cuda_on_cpu")
    return request.param


@pytest.fixture
def inputs():
    return random_step_inputs(2, 16, 2, 2, reduction=4, seed=5)


def step(inputs, backend, x=None, h=None, weights=None):
    return ops.dia_step(
        inputs.x if x is None else x,
        inputs.h if h is None else h,
        inputs.c,
        inputs.weights if weights is None else weights,
        inputs.identity,
        True,
        "sigmoid",
        None,
        backend,
    )


def leaves(result):
    if isinstance(result, (tuple, list)):
        return [leaf for part in result for leaf in leaves(part)]
    return [result]


def assert_same(fused, reference):
    fused, reference = leaves(fused), leaves(reference)
    assert len(fused) == len(reference) > 0
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grad_of_a_loss(backend, inputs):
    def loss(name):
        def f(x, h, weights):
            out, h_new, c_new = step(inputs, name, x, h, weights)
            return out.square().sum() + h_new.sum() + 0.5 * c_new.square().sum()

        return grad(f, argnums=(0, 1, 2))(inputs.x, inputs.h, inputs.weights)

    assert_same(loss(backend), loss("reference"))


def test_vmap_over_a_batch_of_maps_and_states(backend, inputs):
    xs = torch.stack([inputs.x, 2 * inputs.x, -inputs.x])
    hs = torch.stack([inputs.h, inputs.h.flip(1), 0.5 * inputs.h])

    def run(name):
        return vmap(lambda x, h: step(inputs, name, x, h))(xs, hs)

    assert_same(run(backend), run("reference"))


def test_jacrev_of_the_new_state(backend, inputs):
    def run(name):
        return jacrev(lambda x: step(inputs, name, x)[1].sum(0))(inputs.x)

    assert_same(run(backend), run("reference"))


def test_per_sample_weight_gradients(backend, inputs):
    """vmap(grad(...)): the usual per-sample-gradient recipe, over the samples of x."""

    def run(name):
        def loss(weights, x):
            out, _, c_new = ops.dia_step(
                x[None],
                inputs.h[:, :1],
                inputs.c[:, :1],
                weights,
                None,
                True,
                "sigmoid",
                None,
                name,
            )
            return out.square().sum() + c_new.sum()

        return vmap(grad(loss), in_dims=(None, 0))(inputs.weights, inputs.x)

    assert_same(run(backend), run("reference"))


def test_second_derivative_and_forward_mode_raise(backend, inputs):
    def loss(x):
        return step(inputs, backend, x)[0].square().sum()

    with pytest.raises(RuntimeError, match="no double backward"):
        grad(lambda x: grad(loss)(x).sum())(inputs.x)
    with pytest.raises(RuntimeError, match="no forward-mode AD"):
        torch.func.jacfwd(loss)(inputs.x)


def test_plain_eager_steps_do_not_take_the_transform_route(backend, inputs, monkeypatch):
    def refuse(*args):
        raise AssertionError("a step outside torch.func took _FunctorchStep")

    monkeypatch.setattr(ops._FunctorchStep, "apply", refuse)
    x = inputs.x.clone().requires_grad_()
    step(inputs, backend, x)[0].sum().backward()
    with torch.no_grad():
        step(inputs, backend)
    assert x.grad is not None


@pytest.mark.parametrize("cotangent", ["constant", "depends on the output"])
def test_a_second_derivative_through_eager_autograd_raises(backend, inputs, cotangent):
    """create_graph=True on an eager step gives gradients that carry the step, whatever the
    incoming gradient: differentiating them again raises. A constant cotangent (out.sum()) once
    gave gradients without grad_fn, so the second derivative silently had no term."""
    x = inputs.x.clone().requires_grad_()
    weights = [w.clone().requires_grad_() for w in inputs.weights]
    out = step(inputs, backend, x, weights=weights)[0]
    loss = out.sum() if cotangent == "constant" else out.square().sum()
    grad_x, *grad_weights = torch.autograd.grad(loss, [x, *weights], create_graph=True)
    assert grad_x.requires_grad and all(g.requires_grad for g in grad_weights)
    with pytest.raises(RuntimeError, match="no double backward"):
        grad_x.square().sum().backward()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(grad_weights[0].sum(), weights[0])


def test_a_gradient_penalty_is_refused_not_dropped(backend):
    """A gradient penalty (WGAN-GP style) on the unit's input gradient: the loss holds a term that
    needs the second derivative, so backward raises instead of training without it."""
    from dia_fused import DIALSTM

    torch.manual_seed(0)
    unit = DIALSTM(16, reduction=4, backend=backend)
    x = torch.randn(2, 16, 2, 2, requires_grad=True)
    out, _ = unit(x)
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    loss = out.square().mean() + grad_x.square().sum()
    with pytest.raises(RuntimeError, match="no double backward"):
        loss.backward()
    plain_out, _ = unit(x)  # without create_graph nothing changes: a first derivative
    plain_out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in unit.parameters())
