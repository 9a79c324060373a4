"""The fused backends' custom ops (dia_fused::step_forward / step_backward) on CPU: routed to the
csrc kernels compiled as host C++ (python_tests/cuda_emulation.py), through ops.dia_step and
DIALSTM exactly as on a GPU. Checks the tolerance rule, torch.library.opcheck, autograd through
chained steps, and torch.compile(fullgraph=True) with the fake implementations."""

import pytest
import torch

import cuda_emulation
import layout_cases
from dia_fused import DIALSTM, ops
from dia_fused.testing import backend_step, compare_backend, max_abs_error, random_step_inputs

pytestmark = pytest.mark.skipif(
    cuda_emulation.unavailable_reason() is not None,
    reason=f"kernel emulation: {cuda_emulation.unavailable_reason()}",
)


ops_step = backend_step("cuda")


@pytest.mark.parametrize("num_cells", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("identity", [True, False])
def test_custom_ops_match_the_reference(cuda_on_cpu, num_cells, dtype, identity):
    inputs = random_step_inputs(
        2, 12, 3, 2, reduction=3, num_cells=num_cells, identity=identity, dropout_p=0.4, seed=11
    )
    assert compare_backend(ops_step, inputs, dtype, relu=identity)


def test_opcheck_on_both_ops(cuda_on_cpu):
    inputs = random_step_inputs(2, 8, 2, 2, reduction=2, seed=3).requires_grad_()
    args = (
        inputs.x,
        inputs.h,
        inputs.c,
        list(inputs.weights),
        inputs.identity,
        True,
        "sigmoid",
        None,
        "cuda",
    )
    torch.library.opcheck(torch.ops.dia_fused.step_forward.default, args)
    out, h, c, saved = ops.step_forward(
        *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:3]],
        [w.detach() for w in inputs.weights],
        inputs.identity.detach(),
        True,
        "sigmoid",
        None,
        "cuda",
    )
    bwd_args = (
        torch.randn_like(out),
        torch.randn_like(h),
        torch.randn_like(c),
        inputs.x.detach(),
        out,
        saved,
        inputs.h.detach(),
        inputs.c.detach(),
        [w.detach() for w in inputs.weights],
        True,
        True,
        "sigmoid",
        None,
        "cuda",
    )
    torch.library.opcheck(torch.ops.dia_fused.step_backward.default, bwd_args)


def test_dialstm_chained_steps_match_the_reference_module(cuda_on_cpu):
    torch.manual_seed(0)
    fused = DIALSTM(12, reduction=4, backend="cuda")
    ref = DIALSTM(12, reduction=4, backend="reference")
    ref.load_state_dict(fused.state_dict())
    xs = [torch.randn(2, 12, 3, 3) for _ in range(3)]
    results = []
    for unit in (fused, ref):
        state, loss = None, 0
        for x in xs:
            out, state = unit(x, state, identity=x)
            loss = loss + out.square().sum()
        (loss + state[1].sum()).backward()
        results.append((out, state, [p.grad for p in unit.parameters()]))
    (out_f, state_f, grads_f), (out_r, state_r, grads_r) = results
    assert max_abs_error(out_f, out_r) < 1e-5
    assert (
        max_abs_error(state_f[0], state_r[0]) < 1e-5
        and max_abs_error(state_f[1], state_r[1]) < 1e-5
    )
    for g_f, g_r in zip(grads_f, grads_r):
        assert max_abs_error(g_f, g_r) <= 1e-4 * max(1.0, g_r.abs().max().item())


def test_torch_compile_fullgraph_through_the_custom_ops(cuda_on_cpu):
    torch.manual_seed(0)
    unit = DIALSTM(8, reduction=2, backend="cuda")

    def two_steps(x):
        out, state = unit(x, identity=x)
        out, state = unit(out, state, identity=x, relu=False)
        return out, state[0]

    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    expected = two_steps(x)
    got = compiled(x)
    for g, e in zip(got, expected):
        assert max_abs_error(g, e) < 1e-6
    got[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("grad_layout", ["like-out", "nhwc"])
@pytest.mark.parametrize("case", layout_cases.CASES)
def test_non_dense_and_mixed_layouts_match_the_reference(cuda_on_cpu, case, grad_layout):
    layout_cases.check_against_reference("cuda", case, grad_layout, "cpu")


def test_eager_steps_skip_the_dispatcher_with_the_same_results(cuda_on_cpu, monkeypatch):
    """Eagerly on plain tensors a step calls the host wrappers without the dispatcher: directly
    without gradients, through an autograd.Function with them (the same kernels and formula).
    Under a dispatch mode and under torch.compile it goes through the custom ops, and every
    route gives the same outputs and gradients."""
    calls, seen = [], []
    custom_op = ops.step_forward
    monkeypatch.setattr(ops, "step_forward", lambda *args: calls.append(1) or custom_op(*args))
    unit = DIALSTM(12, reduction=3, backend="cuda")
    x, identity = torch.randn(2, 12, 3, 2), torch.randn(2, 12, 3, 2)

    def train_step():
        unit.zero_grad()
        xg = x.clone().requires_grad_()
        out, (h, c) = unit(xg, identity=identity)
        (out.square().sum() + h.sum()).backward()
        return [out.detach(), xg.grad] + [p.grad.clone() for p in unit.parameters()]

    class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        direct, _ = unit(x, identity=identity)
    with torch.inference_mode():
        unit(x, identity=identity)
    eager = train_step()  # autograd through step_autograd.EagerStep
    assert calls == []
    with Recorder():  # a mode sees the ops whole
        dispatched = train_step()
    assert len(calls) == 1
    assert {"dia_fused.step_forward.default", "dia_fused.step_backward.default"} <= set(seen)
    assert torch.equal(direct, eager[0])
    assert all(torch.equal(a, b) for a, b in zip(eager, dispatched))
    with torch.no_grad():
        compiled = torch.compile(lambda t: unit(t, identity=identity)[0], fullgraph=True)(x)
    assert len(calls) == 2 and torch.equal(compiled, direct)


def test_double_backward_is_an_error_not_zeros(cuda_on_cpu):
    unit = DIALSTM(12, reduction=3, backend="cuda")
    x = torch.randn(2, 12, 3, 2, requires_grad=True)
    out, _ = unit(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.sum().backward()


def test_each_check_runs_once_per_input_signature(cuda_on_cpu, monkeypatch):
    """The step plan: the first step with a signature runs the checks and the backend choice,
    later ones go straight to the kernels; a new signature (shape, dtype, layout, options) is
    checked again."""
    checked = []
    real_check = ops.check_step_args
    monkeypatch.setattr(ops, "check_step_args", lambda *a: checked.append(1) or real_check(*a))
    unit = DIALSTM(12, reduction=3, backend="cuda")
    x = torch.randn(2, 12, 3, 2)
    with torch.no_grad():
        first, _ = unit(x)
        for _ in range(3):
            again, _ = unit(x)
        assert len(checked) == 1 and torch.equal(first, again)
        unit(x.contiguous(memory_format=torch.channels_last))  # new strides
        unit(x, identity=x)  # new options
        unit(x[:1])  # new shape
    unit(x)  # recorded by autograd: its own plan
    assert len(checked) == 5
    assert cuda_on_cpu.launches.count("forward_fused") == 8


def test_a_changed_variable_dtype_or_shape_takes_effect_on_the_next_step(cuda_on_cpu, monkeypatch):
    """What a plan recorded follows the DIA_FUSED_* variables, use_settings blocks, the dtype and
    the shape of the next step: nothing is stale, and errors come back on every bad step."""
    from dia_fused.kernels import cuda_dia_step

    torch.manual_seed(0)
    unit = DIALSTM(12, reduction=3, backend="cuda")
    auto = DIALSTM(12, reduction=3)
    auto.load_state_dict(unit.state_dict())
    x = torch.randn(2, 12, 3, 2)
    launches = cuda_on_cpu.launches
    with torch.no_grad():
        expected, _ = unit(x)
        assert launches == ["forward_fused"]
        monkeypatch.setenv("DIA_FUSED_CUDA_PATH", "split")
        launches.clear()
        assert max_abs_error(unit(x)[0], expected) < 1e-5
        assert "forward_fused" not in launches and "pool" in launches
        for _ in range(2):  # a bad value fails every step, not only the first
            monkeypatch.setenv("DIA_FUSED_CUDA_PATH", "sideways")
            with pytest.raises(ValueError, match="DIA_FUSED_CUDA_PATH: expected one of"):
                unit(x)
        monkeypatch.delenv("DIA_FUSED_CUDA_PATH")
        with cuda_dia_step.use_settings(cuda_dia_step.KernelSettings(path="split")):
            launches.clear()
            unit(x)
            assert "forward_fused" not in launches
        launches.clear()
        auto(x)  # the cuda backend is available here (cuda_on_cpu): auto takes it
        assert launches == ["forward_fused"]
        monkeypatch.setenv("DIA_FUSED_BACKEND", "reference")
        launches.clear()
        assert max_abs_error(auto(x)[0], expected) < 1e-5
        assert launches == []
        monkeypatch.setenv("DIA_FUSED_BACKEND", "bogus")
        with pytest.raises(ValueError, match="DIA_FUSED_BACKEND"):
            auto(x)
        with pytest.raises(ops.BackendUnavailableError, match="float64"):
            unit.double()(x.double())  # a new dtype the named backend cannot run
        unit.float()
        with pytest.raises(ValueError, match="expected 12 channels"):
            unit(torch.randn(2, 8, 3, 2))  # a new shape, checked before any kernel
        y = torch.randn(3, 12, 1, 5)
        reference = DIALSTM(12, reduction=3, backend="reference")
        reference.load_state_dict(unit.state_dict())
        assert max_abs_error(unit(y)[0], reference(y)[0]) < 1e-5
        with pytest.raises(ValueError, match="H\\*W >= 1"):
            unit(torch.randn(2, 12, 0, 3))


def test_a_backward_runs_with_the_settings_current_when_it_runs(cuda_on_cpu):
    """As without a plan: a use_settings block around the forward alone does not reach its
    backward (autograd runs that later, outside the block); one around both does."""
    from dia_fused.kernels import cuda_dia_step

    unit = DIALSTM(12, reduction=3, backend="cuda")
    x = torch.randn(2, 12, 3, 2, requires_grad=True)
    split = cuda_dia_step.KernelSettings(path="split")
    for around_backward in (False, True):
        cuda_on_cpu.launches.clear()
        with cuda_dia_step.use_settings(split):
            out, _ = unit(x)
            if around_backward:
                out.sum().backward()
        if not around_backward:
            out.sum().backward()
        assert "forward_fused" not in cuda_on_cpu.launches
        assert ("backward_fused" in cuda_on_cpu.launches) is not around_backward


def test_reset_build_makes_auto_choose_again(emu, monkeypatch):
    """A plan assumes availability fixed, except across cuda_dia_step.reset_build() (retrying a
    failed build): after it, auto's next step chooses again."""
    from dia_fused.kernels import cuda_dia_step

    monkeypatch.delenv("DIA_FUSED_BACKEND", raising=False)
    monkeypatch.setattr(cuda_dia_step, "unavailable_reason", lambda device: "not built (test)")
    unit = DIALSTM(12, reduction=3)
    x = torch.randn(2, 12, 3, 2)
    with torch.no_grad():
        unit(x)
        assert emu.launches == []  # the reference
        monkeypatch.setattr(cuda_dia_step, "unavailable_reason", lambda device: None)
        cuda_dia_step.reset_build()
        unit(x)
    assert emu.launches == ["forward_fused"]


def test_planned_weight_gradient_views_follow_the_flat_gradient_anywhere_in_its_storage():
    from dia_fused.step_autograd import weight_grads
    from dia_fused.step_op import SavedStep, StepOptions

    weights = [torch.randn(3, 4), torch.randn(3), torch.randn(2, 3)]
    views, offset = [], 0
    for w in weights:
        views.append((tuple(w.shape), w.stride(), offset))
        offset += w.numel()
    options = StepOptions("triton", False, False, "sigmoid", weight_grad_views=tuple(views))
    saved = SavedStep(None, None, None, None, None, None, weights, options)
    for start in (0, 7):  # a gradient carved from a larger buffer
        flat = torch.arange(100.0)[start : start + offset]
        expected = flat.split_with_sizes([w.numel() for w in weights])
        for got, want, w in zip(weight_grads(flat, saved), expected, weights):
            assert torch.equal(got, want.view(w.shape))


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_a_zero_state_made_under_a_fake_mode_stays_in_that_mode(cuda_on_cpu, backend):
    """Plans keep the zero initial state only where it is a plain tensor: one made under a
    FakeTensorMode belongs to that mode and is made again under the next."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    unit = DIALSTM(8, reduction=2, backend=backend)
    for _ in range(2):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            out, (h, _) = unit(mode.from_tensor(torch.randn(2, 8, 3, 3)))
            assert isinstance(out, FakeTensor) and out.fake_mode is mode
            assert isinstance(h, FakeTensor) and h.fake_mode is mode
    out, _ = unit(torch.randn(2, 8, 3, 3))
    assert type(out) is torch.Tensor and torch.isfinite(out).all()
