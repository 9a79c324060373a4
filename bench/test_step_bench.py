"""One DIA step, forward and forward+backward, for every available backend (eager, and replayed
from a CUDA graph), the eager reference and torch.compile(reference), over CIFAR and ImageNet stage
shapes, fp32 and bf16, NCHW and (on a GPU) channels_last. Each fused time is recorded with its
achieved bandwidth (the traffic model's minimum bytes over the time) and its ratio to the model's
prediction (bench/roofline.py). test_timed_step_is_correct checks, once per shape, that the
callable being timed computes the float64 reference's outputs and gradients.

On a GPU: the real shapes. On a CPU-only machine: the eager reference on scaled-down CIFAR shapes
(batch 8) and one compiled-reference shape, so that `pytest bench/` stays short there.
"""

import pytest
import torch

import roofline
from bench_utils import DEVICE, ON_GPU, run_timed
from dia_fused import ops, reference
from dia_fused.testing import (
    assert_within_tolerance,
    capture_cuda_graph,
    random_step_inputs,
    step_outputs_and_grads,
)

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


LAYOUTS = [False, True] if ON_GPU else [False]  # channels_last beside NCHW on a GPU


def model_step(shape, dtype, channels_last) -> roofline.Step:
    """The step as the traffic model sees it (identity, relu, all gradients: as timed here)."""
    return roofline.Step(*shape, dtype=str(dtype)[6:], channels_last=channels_last)


def step_bytes(step: roofline.Step, backward: bool) -> int:
    """The step's minimum bytes (the model's floor): achieved bandwidth is these over the time."""
    return roofline.minimum_bytes(step, False) + (
        roofline.minimum_bytes(step, True) if backward else 0
    )


def predicted_ms(impl: str, step: roofline.Step, backward: bool):
    """The traffic model's H100 time of a fused backend's step, else None."""
    backend = impl[: -len("_graph")] if impl.endswith("_graph") else impl
    if backend not in ("triton", "cuda"):
        return None
    passes = (False, True) if backward else (False,)
    return sum(roofline.predict(roofline.launches_of(step, backend, b)) for b in passes) / 1e3


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


def cotangents(inputs, grad_seed: int = 1):
    """Fixed cotangents of (out, h', c'), drawn as testing.step_outputs_and_grads draws them, so
    that what the benchmark times can be checked against that function's reference results."""
    x, h, c = inputs.x, inputs.h, inputs.c
    gen = torch.Generator().manual_seed(grad_seed)
    return [
        torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
        for t in (x, h, c)  # out, h' and c' have the shapes and dtypes of x, h and c
    ]


def results(inputs, out, h1, c1, backward):
    """What one timed call computed, keyed as testing.step_outputs_and_grads keys it."""
    got = {"out": out, "h": h1, "c": c1}
    if backward:
        got.update(grad_x=inputs.x.grad, grad_h0=inputs.h.grad, grad_c0=inputs.c.grad)
        names = reference.weight_names(reference.num_cells_of(inputs.weights))
        got.update({"grad_" + name: w.grad for name, w in zip(names, inputs.weights)})
        got["grad_identity"] = inputs.identity.grad
    return got


def make_fn(impl, inputs, backward):
    """The timed callable; each call returns what it computed (see results)."""
    if impl.endswith("_graph"):
        graph, outputs = capture_cuda_graph(make_fn(impl[: -len("_graph")], inputs, backward))

        def replay():
            graph.replay()
            return outputs

        return replay
    step = compiled_reference_step if impl == "compiled_reference" else eager_step(impl)
    x, h, c, w = inputs.args()
    idt = inputs.identity
    if not backward:

        def fn():
            with torch.no_grad():
                return results(inputs, *step(x, h, c, w, idt), backward=False)

        return fn
    inputs.requires_grad_()
    leaves = inputs.tensors()
    grads = cotangents(inputs)

    def fn():
        for t in leaves:
            t.grad = None  # as zero_grad(set_to_none=True) in training: no accumulation kernels
        out, h1, c1 = step(x, h, c, w, idt)
        torch.autograd.backward((out, h1, c1), grads)
        return results(inputs, out.detach(), h1.detach(), c1.detach(), backward=True)

    return fn


def cases():
    for impl in IMPLEMENTATIONS:
        for shape in SHAPES:
            for dtype in DTYPES:
                for channels_last in LAYOUTS:
                    if (
                        impl == "compiled_reference"
                        and not ON_GPU
                        and (shape != SHAPES[-1] or dtype != torch.float32)
                    ):
                        # CPU: one compiled shape (inductor compiles take tens of seconds here)
                        continue
                    # on CPU the inductor compile is slow (the GPU phases run these whole)
                    marks = (
                        [pytest.mark.slow] if impl == "compiled_reference" and not ON_GPU else []
                    )
                    layout = "-cl" if channels_last else ""
                    yield pytest.param(
                        impl,
                        shape,
                        dtype,
                        channels_last,
                        marks=marks,
                        id=f"{impl}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}{layout}",
                    )


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl, shape, dtype, channels_last", list(cases()))
def test_dia_step(benchmark, impl, shape, dtype, channels_last, backward):
    layout = "channels_last" if channels_last else "nchw"
    benchmark.group = (
        f"step {'x'.join(map(str, shape))} {str(dtype)[6:]} {layout} "
        f"{'fwd+bwd' if backward else 'fwd'}"
    )
    inputs = random_step_inputs(
        *shape, dtype=dtype, device=DEVICE, seed=0, channels_last=channels_last
    )
    fn = make_fn(impl, inputs, backward)
    step = model_step(shape, dtype, channels_last)
    run_timed(
        benchmark,
        fn,
        inner=20 if ON_GPU else 2,
        rounds=10 if ON_GPU else 3,
        bytes_moved=step_bytes(step, backward),
    )
    info = benchmark.extra_info
    info.update(impl=impl, shape=list(shape), dtype=str(dtype), layout=layout)
    predicted = predicted_ms(impl, step, backward)
    if predicted is not None:
        info["predicted_ms"] = predicted
        info["measured_over_predicted"] = info["per_call_ms"] / predicted


def correctness_cases():
    """Every timed implementation once per shape (float32), as cases() times it."""
    for impl in IMPLEMENTATIONS:
        for shape in SHAPES:
            slow = impl == "compiled_reference" and not ON_GPU
            if slow and shape != SHAPES[-1]:
                continue
            marks = [pytest.mark.slow] if slow else []
            yield pytest.param(impl, shape, marks=marks, id=f"{impl}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl, shape", list(correctness_cases()))
def test_timed_step_is_correct(impl, shape, backward):
    """One call of exactly the callable test_dia_step times, against the float64 reference under
    the tolerance rule (docs/design.md §4.1): outputs, new state and, with backward, every
    gradient. A benchmark of a step that computes something else fails here."""
    dtype = torch.float32
    inputs = random_step_inputs(*shape, dtype=dtype, device=DEVICE, seed=0)
    got = make_fn(impl, inputs, backward)()
    same = step_outputs_and_grads(reference.dia_lstm_step, inputs.to(dtype), relu=True)
    ref64 = step_outputs_and_grads(reference.dia_lstm_step, inputs.to(torch.float64), relu=True)
    for key, value in got.items():
        assert value is not None, f"{key}: the timed step produced no gradient"
        assert_within_tolerance(f"{impl} {key}", value, same[key], ref64[key], dtype)
    assert set(got) == (set(ref64) if backward else {"out", "h", "c"})
