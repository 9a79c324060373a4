"""One DIA step, forward and forward+backward, for every available backend (eager, and replayed
from a CUDA graph), the eager reference and torch.compile(reference), over CIFAR and ImageNet stage
shapes, fp32 and bf16.

On a GPU: the real shapes. On a CPU-only machine: the eager reference on scaled-down CIFAR shapes
(batch 8) and one compiled-reference shape, so that `pytest bench/` stays short there.
"""

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, run_timed
from dia_fused import ops, reference
from dia_fused.testing import capture_cuda_graph, random_step_inputs

# (N, C, H, W): CIFAR ResNet-164 stages at batch 128, ImageNet ResNet-50 stages at batch 64, and the
# large map of the bandwidth target.
GPU_SHAPES = [
    (128, 64, 32, 32),
    (128, 128, 16, 16),
    (128, 256, 8, 8),
    (64, 256, 56, 56),
    (64, 512, 28, 28),
    (64, 1024, 14, 14),
    (64, 2048, 7, 7),
    (256, 256, 56, 56),
]
CPU_SHAPES = [(8, 64, 32, 32), (8, 128, 16, 16), (8, 256, 8, 8)]
SHAPES = GPU_SHAPES if ON_GPU else CPU_SHAPES
DTYPES = [torch.float32, torch.bfloat16]


def feature_map_bytes(shape, dtype, backward):
    """HBM traffic of the fused step's feature maps: forward reads x and identity and writes out;
    backward reads grad_out, out and x (twice: reduction, then dx) and writes dx and d_identity."""
    n, c, h, w = shape
    elems = n * c * h * w * torch.empty((), dtype=dtype).element_size()
    return elems * (3 + (7 if backward else 0))


def fused_backends():
    return [
        b
        for b in ("triton", "cuda")
        if ops.backend_unavailable_reason(b, DEVICE) is None and not (DEVICE.type == "cpu")
    ]  # interpreted Triton on CPU is a correctness tool, not a benchmark


def eager_step(backend):
    def step(x, h, c, w, idt):
        return ops.dia_step(x, h, c, w, idt, True, "sigmoid", None, backend)

    return step


_compiled_reference = None


def compiled_reference_step(x, h, c, w, idt):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference.dia_lstm_step)
    return _compiled_reference(x, h, c, w, identity=idt, relu=True)


# "<backend>_graph": the same step captured in a CUDA graph and replayed, i.e. without host
# overhead: what the kernels cost on the GPU, where the eager numbers may be bounded by the host
IMPLEMENTATIONS = (
    ["reference", "compiled_reference"]
    + fused_backends()
    + [f"{b}_graph" for b in fused_backends() if ON_GPU]
)


def make_fn(impl, inputs, backward):
    if impl.endswith("_graph"):
        graph, _ = capture_cuda_graph(make_fn(impl[: -len("_graph")], inputs, backward))
        return graph.replay
    step = compiled_reference_step if impl == "compiled_reference" else eager_step(impl)
    x, h, c, w = inputs.args()
    idt = inputs.identity
    if not backward:

        def fn():
            with torch.no_grad():
                step(x, h, c, w, idt)

        return fn
    inputs.requires_grad_()

    def fn():
        out, h1, c1 = step(x, h, c, w, idt)
        torch.autograd.backward((out, h1, c1), (out.detach(), h1.detach(), c1.detach()))

    return fn


def cases():
    for impl in IMPLEMENTATIONS:
        for shape in SHAPES:
            for dtype in DTYPES:
                if (
                    impl == "compiled_reference"
                    and not ON_GPU
                    and (shape != SHAPES[-1] or dtype != torch.float32)
                ):
                    # CPU: one compiled shape (inductor compiles take tens of seconds here)
                    continue
                # on CPU the inductor compile is slow (the GPU phases run these whole)
                marks = [pytest.mark.slow] if impl == "compiled_reference" and not ON_GPU else []
                yield pytest.param(
                    impl,
                    shape,
                    dtype,
                    marks=marks,
                    id=f"{impl}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}",
                )


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl, shape, dtype", list(cases()))
def test_dia_step(benchmark, impl, shape, dtype, backward):
    benchmark.group = (
        f"step {'x'.join(map(str, shape))} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}"
    )
    inputs = random_step_inputs(*shape, dtype=dtype, device=DEVICE, seed=0)
    fn = make_fn(impl, inputs, backward)
    run_timed(
        benchmark,
        fn,
        inner=20 if ON_GPU else 2,
        rounds=10 if ON_GPU else 3,
        bytes_moved=feature_map_bytes(shape, dtype, backward),
    )
    benchmark.extra_info.update(impl=impl, shape=list(shape), dtype=str(dtype))
