"""The CUDA backend on a GPU: its host wrapper and compiled kernels against the float64 reference
(tolerance rule of docs/design.md §4) over outputs, state and every gradient, on the real shapes of
DIANet (CIFAR ResNet-164 stages, ImageNet ResNet-50 stages), odd shapes, fp32/bf16/fp16,
contiguous and channels_last, both kernel paths, stacked cells; plus CUDA-graph capture,
determinism, and DIALSTM(backend="cuda") once ops.py routes to this backend.

Skipped where no CUDA device exists; where one does, an unavailable backend is a failure.
The same kernels run on the CPU through the emulation in test_cuda_backend_emulated.py.
"""

from __future__ import annotations

import pytest
import torch

from dia_fused import DIALSTM, ops
from dia_fused.kernels import cuda_dia_step
from dia_fused.testing import (
    backend_step,
    capture_cuda_graph,
    compare_backend,
    random_step_inputs,
    step_outputs_and_grads,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(scope="module", autouse=True)
def backend_ready():
    reason = cuda_dia_step.unavailable_reason("cuda")
    assert reason is None, f"the cuda backend must be available on a GPU machine: {reason}"


ops_step = backend_step("cuda")


def forced(path):
    """Steps (forward and backward) inside run the cuda kernels of `path`."""
    return cuda_dia_step.use_settings(cuda_dia_step.KernelSettings(path=path))


def check(inputs, dtype, path, relu=True, activation="sigmoid"):
    with forced(path):
        errors = compare_backend(ops_step, inputs, dtype, relu=relu, activation=activation)
    assert errors


# CIFAR ResNet-164 stages: batch 128, reduction 4
CIFAR = [
    pytest.param(128, 64, 32, 32, id="cifar-c64-32"),
    pytest.param(128, 128, 16, 16, id="cifar-c128-16"),
    pytest.param(128, 256, 8, 8, id="cifar-c256-8"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("path", ["auto", "fused", "split"])
@pytest.mark.parametrize("n,c,h,w", CIFAR)
def test_cifar_shapes(n, c, h, w, path, dtype, channels_last):
    inputs = random_step_inputs(
        n, c, h, w, reduction=4, channels_last=channels_last, device="cuda", seed=c
    )
    check(inputs, dtype, path)


# ImageNet ResNet-50 stages (reduced batch: the float64 reference runs beside it), reduction 16
IMAGENET = [
    pytest.param(8, 256, 56, 56, id="imagenet-c256-56"),
    pytest.param(8, 512, 28, 28, id="imagenet-c512-28"),
    pytest.param(16, 1024, 14, 14, id="imagenet-c1024-14"),
    pytest.param(32, 2048, 7, 7, id="imagenet-c2048-7"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,c,h,w", IMAGENET)
def test_imagenet_shapes(n, c, h, w, dtype, channels_last):
    inputs = random_step_inputs(
        n, c, h, w, reduction=16, channels_last=channels_last, device="cuda", seed=c
    )
    check(inputs, dtype, "auto")


# edges: odd C (not a multiple of tiles or vectors), H*W = 1, batch 1, N over a GEMM tile
EDGES = [
    pytest.param(7, 100, 9, 9, 4, id="odd-c100"),
    pytest.param(5, 1000, 5, 3, 10, id="odd-c1000"),
    pytest.param(16, 512, 1, 1, 16, id="hw1"),
    pytest.param(1, 256, 56, 56, 16, id="batch1-c256"),
    pytest.param(1, 2048, 7, 7, 16, id="batch1-c2048"),
    pytest.param(33, 36, 3, 5, 4, id="n33-c36"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("path", ["auto", "split"])
@pytest.mark.parametrize("n,c,h,w,r", EDGES)
def test_edge_shapes(n, c, h, w, r, path, dtype, channels_last):
    inputs = random_step_inputs(
        n, c, h, w, reduction=r, channels_last=channels_last, device="cuda", seed=n + c
    )
    check(inputs, dtype, path)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("identity,relu", [(False, False), (True, False), (True, True)])
def test_options(identity, relu, activation, path):
    inputs = random_step_inputs(32, 64, 8, 8, reduction=4, identity=identity, device="cuda")
    check(inputs, torch.float32, path, relu=relu, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_cells,dropout_p", [(2, 0.0), (3, 0.1)])
def test_stacked_cells(num_cells, dropout_p, dtype):
    inputs = random_step_inputs(
        64,
        128,
        16,
        16,
        reduction=4,
        num_cells=num_cells,
        dropout_p=dropout_p,
        channels_last=True,
        device="cuda",
    )
    check(inputs, dtype, "auto")


def test_mixed_layouts():
    inputs = random_step_inputs(16, 64, 16, 16, reduction=4, device="cuda")
    inputs.x = inputs.x.contiguous(memory_format=torch.channels_last)
    for path in ("fused", "split"):
        check(inputs, torch.float32, path)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_deterministic(path):
    inputs = random_step_inputs(128, 128, 16, 16, reduction=4, device="cuda").to(torch.float32)
    with forced(path):
        first = step_outputs_and_grads(ops_step, inputs.to(torch.float32), relu=True)
        second = step_outputs_and_grads(ops_step, inputs.to(torch.float32), relu=True)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("path", ["fused", "split"])
def test_cuda_graph_capture(path):
    """forward + backward captured in a CUDA graph (no host syncs) and replayed on new inputs."""
    inputs = random_step_inputs(32, 64, 16, 16, reduction=4, device="cuda")
    x, h, c, w = inputs.args()
    identity = inputs.identity
    static_x, static_grad = x.clone(), torch.randn_like(x)

    settings = cuda_dia_step.KernelSettings(path=path)

    def run():
        out, h_new, c_new, saved = cuda_dia_step.forward(
            static_x, h, c, w, identity, True, "sigmoid", None, settings
        )
        grads = cuda_dia_step.backward(
            static_grad,
            None,
            None,
            static_x,
            out,
            saved,
            h,
            c,
            w,
            True,
            True,
            "sigmoid",
            None,
            settings,
        )
        return out, h_new, grads[0]

    graph, captured = capture_cuda_graph(run, warmup=1)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    eager = run()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dialstm_module_backend_cuda():
    reason = ops.backend_unavailable_reason("cuda", "cuda")
    if reason is not None and "not part of this build" in reason:
        pytest.skip(f"ops.py does not route to the cuda backend yet: {reason}")
    assert reason is None, reason
    torch.manual_seed(0)
    ref_unit = DIALSTM(64, reduction=4, backend="reference").cuda()
    unit = DIALSTM(64, reduction=4, backend="cuda").cuda()
    unit.load_state_dict(ref_unit.state_dict())
    x = torch.randn(16, 64, 8, 8, device="cuda", requires_grad=True)
    identity = torch.randn_like(x)
    out, (h, c) = unit(x, identity=identity)
    ref_out, (ref_h, ref_c) = ref_unit(x, identity=identity)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    (out.sum() + h.sum()).backward()
    grad = x.grad.clone()
    x.grad = None
    (ref_out.sum() + ref_h.sum()).backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-5)
