"""Hardening on CPU: every backend available here against the reference over random shapes
(hypothesis), determinism, NaN propagation, autocast, large fp16 inputs, portability of saved
modules across backends, pickling/deepcopy, and DDP (gloo, 2 processes) against one process."""

import copy
import io
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dia_fused import DIALSTM, available_backends, reference
from dia_fused.testing import backend_step, compare_backend, max_abs_error, random_step_inputs

import ddp_check
from ddp_check import TinyNet

CPU_BACKENDS = available_backends("cpu")
FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


@pytest.mark.slow  # hypothesis sweep (interpreter for triton)
@pytest.mark.skipif(
    not FUSED_CPU_BACKENDS,
    reason="no fused backend runs on CPU here "
    "(the triton backend needs TRITON_INTERPRET=1 and the triton package)",
)
@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    channels=st.integers(4, 20),
    height=st.integers(1, 4),
    width=st.integers(1, 4),
    reduction=st.integers(1, 4),
    num_cells=st.integers(1, 2),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    channels_last=st.booleans(),
    identity=st.booleans(),
    relu=st.booleans(),
    activation=st.sampled_from(reference.CELL_ACTIVATIONS),
    seed=st.integers(0, 2**16),
)
def test_property_backend_matches_reference(
    backend,
    n,
    channels,
    height,
    width,
    reduction,
    num_cells,
    dtype,
    channels_last,
    identity,
    relu,
    activation,
    seed,
):
    reduction = min(reduction, channels)
    inputs = random_step_inputs(
        n,
        channels,
        height,
        width,
        reduction=reduction,
        num_cells=num_cells,
        identity=identity,
        dropout_p=0.3,
        channels_last=channels_last,
        seed=seed,
    )
    compare_backend(backend_step(backend), inputs, dtype, relu=relu, activation=activation)


@pytest.mark.slow  # interpreter sweep
@pytest.mark.skipif(
    "triton" not in CPU_BACKENDS, reason="the triton backend needs TRITON_INTERPRET=1 on CPU"
)
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(1, 40),
    channels=st.integers(8, 80),
    hw=st.integers(1, 3),
    reduction=st.integers(1, 6),
    split=st.booleans(),
    block_n=st.sampled_from([16, 32]),
    block_c=st.sampled_from([16, 32, 64]),
    forward_groups=st.integers(1, 8),
    activation=st.sampled_from(reference.CELL_ACTIVATIONS),
    seed=st.integers(0, 2**16),
)
def test_property_triton_launch_configurations_match_reference(
    monkeypatch,
    n,
    channels,
    hw,
    reduction,
    split,
    block_n,
    block_c,
    forward_groups,
    activation,
    seed,
):
    """Every path and tiling of the Triton LSTM kernels (fused with column groups, or split) over
    random batch sizes and widths (several sample tiles, partial chunks)."""
    from dia_fused.kernels import triton as triton_kernels

    config = triton_kernels.LSTMConfig(
        block_n=block_n,
        block_c=block_c,
        block_r=block_c,
        forward_groups=forward_groups,
        split_min=0 if split else 1 << 30,
    )
    settings = triton_kernels.KernelSettings(lstm=config, map=triton_kernels.current_settings().map)
    inputs = random_step_inputs(n, channels, hw, 1, reduction=min(reduction, channels), seed=seed)
    with triton_kernels.use_settings(settings):
        compare_backend(
            backend_step("triton"), inputs, torch.float32, relu=True, activation=activation
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_algorithms_give_bitwise_identical_runs(backend):
    inputs = random_step_inputs(2, 12, 3, 3, reduction=3, num_cells=2, dropout_p=0.5, seed=5)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            got = inputs.to().requires_grad_()
            out, h, c = backend_step(backend)(
                got.x,
                got.h,
                got.c,
                got.weights,
                got.identity,
                True,
                dropout_masks=got.dropout_masks,
            )
            (out.sum() + h.square().sum() + c.sum()).backward()
            runs.append([out, h, c] + [t.grad for t in got.tensors()])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_propagate_like_the_reference(backend):
    inputs = random_step_inputs(3, 8, 2, 2, reduction=2, seed=2)
    inputs.x[0, 1, 0, 0] = float("nan")
    inputs.x[1, 2, 1, 1] = float("inf")
    got = backend_step(backend)(*inputs.args(), inputs.identity, True)
    want = reference.dia_lstm_step(*inputs.args(), identity=inputs.identity, relu=True)
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        assert torch.equal(torch.isinf(g), torch.isinf(w))
    assert torch.isfinite(got[0][2]).all()  # the clean sample stays clean


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_fp16_inputs_do_not_overflow(backend):
    inputs = random_step_inputs(2, 8, 3, 3, reduction=2, seed=4)
    inputs.x.mul_(1e4)
    inputs.identity.mul_(1e4)
    compare_backend(backend_step(backend), inputs, torch.float16, relu=True)
    out, h, c = backend_step(backend)(*inputs.to(torch.float16).args())
    assert torch.isfinite(out).all() and torch.isfinite(h).all() and torch.isfinite(c).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_keeps_fp32_state_and_parameters_and_follows_autocast_for_outputs(backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    unit = DIALSTM(8, reduction=2, backend=backend)
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        branch = conv(x)
        out, (h, c) = unit(branch, identity=branch)
    assert branch.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert h.dtype == torch.float32 and c.dtype == torch.float32
    ref_unit = DIALSTM(8, reduction=2, backend="reference")
    ref_unit.load_state_dict(unit.state_dict())
    expected, (h_ref, _) = ref_unit(branch.detach(), identity=branch.detach())
    assert max_abs_error(h, h_ref) < 1e-5
    assert max_abs_error(out, expected) <= 2 * 2**-8 * max(1.0, expected.abs().max().item())
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in unit.parameters())


@pytest.mark.parametrize("source", CPU_BACKENDS)
def test_saved_model_loads_with_every_backend_and_gives_the_same_outputs(source):
    torch.manual_seed(0)
    model = TinyNet(source).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    for target in CPU_BACKENDS:
        other = TinyNet(target).eval()
        buffer.seek(0)
        other.load_state_dict(torch.load(buffer))
        with torch.no_grad():
            assert max_abs_error(other(x), expected) < 1e-5, (source, target)


def test_pickle_and_deepcopy_keep_weights_and_configuration():
    torch.manual_seed(0)
    model = TinyNet("reference").eval()
    x = torch.randn(1, 3, 4, 4)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.stage.unit.extra_repr() == model.stage.unit.extra_repr()
        with torch.no_grad():
            assert torch.equal(clone(x), model(x))


@pytest.mark.slow  # DDP: two processes
@pytest.mark.parametrize("backend", CPU_BACKENDS)  # triton: the fused custom ops' flat weight grads
def test_ddp_two_gloo_processes_give_single_process_gradients(backend, tmp_path):
    ddp_check.assert_ddp_matches_single_process(backend, "cpu", tmp_path)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_returns_empty_outputs_and_zero_weight_gradients(backend):
    unit = DIALSTM(8, reduction=2, num_cells=2, backend=backend)
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    out, (h, c) = unit(x, identity=x.detach())
    assert out.shape == (0, 8, 3, 3) and h.shape == (2, 0, 8) and c.shape == (2, 0, 8)
    (out.sum() + h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape
    for name, p in unit.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


@pytest.mark.slow  # torch.compile of a model
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_of_a_dia_resnet_has_no_graph_breaks(backend):
    from dia_fused.models import create_model

    torch.manual_seed(0)
    model = create_model("dia_resnet20", num_classes=10, backend=backend).eval()
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert max_abs_error(compiled(x), model(x)) < 1e-5


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_activation_checkpointing_gives_the_reference_gradients(backend, use_reentrant):
    """torch.utils.checkpoint over two chained steps: the forward runs without gradients (the
    fused backends' direct route), the recomputation with them (their autograd route)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    unit = DIALSTM(16, reduction=4, backend=backend)
    ref = DIALSTM(16, reduction=4, backend="reference")
    ref.load_state_dict(unit.state_dict())
    x, identity = torch.randn(2, 16, 3, 3, requires_grad=True), torch.randn(2, 16, 3, 3)

    def loss(module, inp):
        out, state = module(inp, identity=identity)
        out, (h, c) = module(out, state, identity=identity)
        return out.square().sum() + h.sum() + c.sum()

    checkpoint(lambda inp: loss(unit, inp), x, use_reentrant=use_reentrant).backward()
    got = [x.grad.clone()] + [p.grad for p in unit.parameters()]
    x.grad = None
    loss(ref, x).backward()
    expected = [x.grad] + [p.grad for p in ref.parameters()]
    for g, e in zip(got, expected):
        assert max_abs_error(g, e) <= 1e-4 * max(1.0, e.abs().max().item())
