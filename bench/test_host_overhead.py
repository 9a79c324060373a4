"""Host-side cost of the fused backends' Python wrappers per DIA step, kernels stubbed out: the part
of a step that CUDA graphs remove and that eager training pays 54 times per ResNet-164 pass.
Runs on any machine (the Triton kernels are replaced, so no GPU and no interpreter is involved);
extra_info has the per-call time in microseconds."""

import pytest
import torch

from dia_fused import DIALSTM, ops
from dia_fused.testing import random_step_inputs

pytest.importorskip("triton")
from dia_fused.kernels.triton import host as triton_dia_step  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def stubbed(monkeypatch):
    for name in dir(triton_dia_step):
        if name.endswith("_kernel"):
            monkeypatch.setattr(triton_dia_step, name, _NoLaunch())
    monkeypatch.setattr(
        triton_dia_step, "unavailable_reason", lambda device: None
    )  # CPU tensors, no interpreter
    inputs = random_step_inputs(128, 64, 32, 32, reduction=4)
    out, h_new, c_new, pooled = triton_dia_step.forward(
        *inputs.args(), inputs.identity, True, "sigmoid", None
    )
    return inputs, out, pooled


@pytest.mark.parametrize("direction", ["forward", "backward", "dia_step_no_grad", "unit_no_grad"])
def test_triton_host_wrapper_overhead(benchmark, stubbed, direction):
    """forward / backward: the host wrappers alone; dia_step_no_grad: the whole path of an eager
    inference step, ops.dia_step (checks, backend choice, the op's implementation) included;
    unit_no_grad: the same step through DIALSTM (its weight reads and zero state added)."""
    inputs, out, pooled = stubbed
    x, h, c, w = inputs.args()
    grad_out = torch.empty_like(out)
    if direction == "unit_no_grad":
        unit = DIALSTM(x.shape[1], reduction=4, backend="triton").eval()

        def call():
            with torch.no_grad():
                unit(x, identity=inputs.identity)
    elif direction == "forward":

        def call():
            triton_dia_step.forward(x, h, c, w, inputs.identity, True, "sigmoid", None)
    elif direction == "dia_step_no_grad":

        def call():
            with torch.no_grad():
                ops.dia_step(x, h, c, w, inputs.identity, True, "sigmoid", None, "triton")
    else:

        def call():
            triton_dia_step.backward(
                grad_out, None, None, x, out, pooled, h, c, w, True, True, "sigmoid", None
            )

    benchmark.group = "host wrapper overhead (kernels stubbed), N=128 C=64 32x32"
    benchmark.pedantic(call, rounds=200, iterations=5, warmup_rounds=5)
    benchmark.extra_info["per_call_us"] = benchmark.stats.stats.median * 1e6
    assert benchmark.stats.stats.median < 0.01  # a hang or a pathological slowdown, not a target
