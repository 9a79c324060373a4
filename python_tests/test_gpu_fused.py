"""Both fused backends through the public entry points on a GPU (issues 3 and 8): the real DIANet
shapes, fp32/bf16/fp16, channels_last, CUDA-graph capture and replay of a step with poisoned
outputs, a whole training step of a DIA-ResNet captured in a CUDA graph against eager over 10
steps, torch.compile(fullgraph=True) of a DIA-ResNet, autocast, determinism and DDP (2 processes on
one GPU). Tolerance rule of docs/design.md §4. Skipped where no CUDA device exists; where one does,
an unavailable backend is a failure (with its reason)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dia_fused import DIALSTM, ops
from dia_fused.models import create_model
from dia_fused.testing import (
    backend_step,
    capture_cuda_graph,
    compare_backend,
    max_abs_error,
    random_step_inputs,
    step_outputs_and_grads,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FUSED = ["triton", "cuda"]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.fixture(params=FUSED)
def backend(request):
    reason = ops.backend_unavailable_reason(request.param, "cuda")
    assert reason is None, f"backend {request.param} must run on a GPU machine: {reason}"
    return request.param


SHAPES = [
    pytest.param(128, 64, 32, 32, 4, id="cifar-c64-32"),
    pytest.param(128, 128, 16, 16, 4, id="cifar-c128-16"),
    pytest.param(128, 256, 8, 8, 4, id="cifar-c256-8"),
    pytest.param(16, 256, 56, 56, 16, id="imagenet-c256-56"),
    pytest.param(16, 512, 28, 28, 16, id="imagenet-c512-28"),
    pytest.param(16, 1024, 14, 14, 16, id="imagenet-c1024-14"),
    pytest.param(16, 2048, 7, 7, 16, id="imagenet-c2048-7"),
    pytest.param(5, 100, 9, 7, 4, id="odd-c100-9x7"),
    pytest.param(1, 2048, 1, 1, 16, id="batch1-hw1"),
    pytest.param(37, 24, 3, 3, 3, id="c24-r3"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,h,w,r", SHAPES)
def test_real_shapes(backend, n, c, h, w, r, dtype, channels_last):
    inputs = random_step_inputs(
        n, c, h, w, reduction=r, device="cuda", channels_last=channels_last, seed=c + h
    )
    compare_backend(backend_step(backend), inputs, dtype, relu=True)


@pytest.mark.parametrize("num_cells", [2, 3])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_stacked_cells_and_activations(backend, num_cells, activation):
    inputs = random_step_inputs(
        64, 128, 8, 8, reduction=4, num_cells=num_cells, dropout_p=0.2, device="cuda"
    )
    compare_backend(backend_step(backend), inputs, torch.float32, relu=False, activation=activation)


def test_deterministic_bitwise(backend):
    inputs = random_step_inputs(128, 256, 8, 8, reduction=4, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        first = step_outputs_and_grads(backend_step(backend), inputs.to(torch.float32))
        second = step_outputs_and_grads(backend_step(backend), inputs.to(torch.float32))
    finally:
        torch.use_deterministic_algorithms(False)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_cuda_graph_replay_with_poisoned_outputs(backend):
    """Forward + backward of DIALSTM captured once; before each replay the outputs are filled with
    NaN and the inputs get new values: every replay must match eager on the new inputs."""
    torch.manual_seed(0)
    unit = DIALSTM(64, reduction=4, backend=backend).cuda()
    static_x = torch.randn(32, 64, 16, 16, device="cuda", requires_grad=True)
    static_identity = torch.randn_like(static_x)

    def run():
        out, (h, c) = unit(static_x, identity=static_identity)
        out2, (h, c) = unit(out, (h, c), identity=static_identity, relu=False)
        loss = out2.square().mean() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [static_x, *unit.parameters()])
        return [out2, h, c, *grads]

    graph, captured = capture_cuda_graph(run, warmup=2)
    for trial in range(3):
        with torch.no_grad():
            static_x.copy_(torch.randn_like(static_x))
            for t in captured:
                t.fill_(float("nan"))
        graph.replay()
        eager = run()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want), f"replay {trial} differs from eager"


def _small_dia_resnet(backend):
    torch.manual_seed(0)
    return create_model("dia_resnet20", num_classes=10, backend=backend).cuda()


def test_training_step_in_a_cuda_graph_matches_eager_over_ten_steps(backend):
    """Forward, backward and SGD-momentum step of a DIA-ResNet-20 captured in one CUDA graph and
    replayed over 10 batches: the losses equal those of the same steps run eagerly."""
    model = _small_dia_resnet(backend)
    start = copy.deepcopy(model.state_dict())
    eager_model = copy.deepcopy(model)
    data = [
        (torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda"))
        for _ in range(10)
    ]

    def make_step(net):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

        def step(x, y):
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss

        return step, opt

    eager_step, _ = make_step(eager_model)
    eager_losses = [eager_step(x, y).item() for x, y in data]

    graph_step, graph_opt = make_step(model)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    # warm-up: allocator, lazy init, momentum buffers
    graph, static_loss = capture_cuda_graph(lambda: graph_step(static_x, static_y), warmup=3)
    # back to the start, in place (the graph holds these tensors): weights, BN statistics and
    # momentum (zero momentum with dampening 0 is what a fresh optimizer's first step does)
    with torch.no_grad():
        model.load_state_dict(start)
        for state in graph_opt.state.values():
            state["momentum_buffer"].zero_()
    graph_losses = []
    for x, y in data:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        graph_losses.append(static_loss.item())
    for step, (g, e) in enumerate(zip(graph_losses, eager_losses)):
        assert abs(g - e) <= 1e-4 * max(1.0, abs(e)), f"step {step}: graph loss {g} vs eager {e}"


def test_compile_fullgraph_dia_resnet_without_graph_breaks(backend):
    model = _small_dia_resnet(backend)
    x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    out, want = compiled(x), model(x)
    assert max_abs_error(out, want) <= 1e-4 * max(1.0, want.abs().max().item())
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    want.sum().backward()
    assert max_abs_error(grad, x.grad) <= 1e-4 * max(1.0, x.grad.abs().max().item())


@pytest.mark.parametrize(
    "magnitude", [1.0, 1e4]
)  # 1e4: fp16 inputs near its range (x + identity = 2e4)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_keeps_fp32_state_and_matches_the_reference(backend, dtype, magnitude):
    torch.manual_seed(0)
    unit = DIALSTM(128, reduction=4, backend=backend).cuda()
    ref = DIALSTM(128, reduction=4, backend="reference").cuda()
    ref.load_state_dict(unit.state_dict())
    x = torch.randn(64, 128, 8, 8, device="cuda") * magnitude
    with torch.autocast("cuda", dtype=dtype):
        xs = x.to(dtype)
        out, (h, c) = unit(xs, identity=xs)
        ref_out, (ref_h, ref_c) = ref(xs, identity=xs)
    assert out.dtype == dtype and h.dtype == torch.float32 and c.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(h).all()
    assert max_abs_error(h, ref_h) <= 1e-4
    assert max_abs_error(out, ref_out) <= 2 * torch.finfo(dtype).eps * ref_out.abs().max().item()


def test_ddp_two_processes_on_one_gpu_give_single_process_gradients(backend, tmp_path):
    import ddp_check

    ddp_check.assert_ddp_matches_single_process(backend, "cuda", tmp_path)


@pytest.mark.parametrize("grad_layout", ["like-out", "nhwc"])
@pytest.mark.parametrize(
    "case", ["sliced-w", "sliced-c-and-h", "permuted-nhwc-identity-nchw", "size1-dims-odd-strides"]
)
def test_non_dense_and_mixed_layouts_match_the_reference(backend, case, grad_layout):
    import layout_cases

    layout_cases.check_against_reference(backend, case, grad_layout, "cuda")
