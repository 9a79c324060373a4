"""The CUDA launch model of bench/roofline.py against the kernels: the grids the model predicts
for each launch (split-K and split-H*W axes, finish launches, lane groups of NCHW planes) equal
those the emulated kernels (python_tests/emulation) launch, so the model cannot drift from the
launch code. Byte counts of the CUDA kernels are modelled, not counted (docs/design.md §6.3)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from dia_fused.kernels import cuda_dia_step
from dia_fused.testing import backend_step, random_step_inputs, step_outputs_and_grads

import cuda_emulation

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import roofline  # noqa: E402

pytestmark = pytest.mark.skipif(
    cuda_emulation.unavailable_reason() is not None,
    reason=f"kernel emulation: {cuda_emulation.unavailable_reason()}",
)


def _grid3(grid):
    return tuple(grid) + (1,) * (3 - len(grid))


def _model_grids(step, backward):
    return [_grid3(x.grid) for x in roofline.cuda_launches(step, backward)]


@pytest.mark.parametrize(
    "n,c,h,w,dtype,channels_last",
    [
        (2, 16, 32, 32, torch.float32, True),  # split H*W: 16 blocks per sample
        (2, 16, 32, 32, torch.bfloat16, True),
        (3, 37, 7, 7, torch.bfloat16, False),  # 16 lanes per plane (unroll 4 of 1 element)
        (3, 37, 5, 5, torch.float32, False),
        (2, 40, 4, 4, torch.float32, False),  # 16-byte vectors
    ],
)
def test_streaming_pass_grids_match_the_model(emu, n, c, h, w, dtype, channels_last):
    dtype_name = str(dtype).removeprefix("torch.")
    step = roofline.Step(n, c, h, w, dtype=dtype_name, channels_last=channels_last)
    gen = torch.Generator().manual_seed(31)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, grad_out, out = (
        torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=fmt)
        for _ in range(3)
    )
    vec = torch.zeros(n, c)
    emu.grids.clear()
    emu.pool(x, vec.clone())
    emu.scale_residual(x, vec, x, True)
    emu.grad_attention(grad_out, x, out, True, True)
    emu.grad_input(grad_out, out, vec, vec, True)
    got = {name: grids for name, grids in emu.grids}
    model = {
        kernel: [_grid3(x.grid) for x in roofline._cuda_stream(kernel, step, 0, 0, roofline.H100)]
        for kernel in ("pool", "scale", "grad_attention", "grad_input")
    }
    assert got["pool"] == model["pool"]
    assert got["scale_residual"] == model["scale"]
    assert got["grad_attention"] == model["grad_attention"]
    assert got["grad_input"] == model["grad_input"]


def test_split_step_grids_match_the_model(cuda_on_cpu):
    """C = 260 on the split path (R = 13): every launch of the forward and the backward, the
    split-K GEMM phases and their finish launches included, in order."""
    n, c, h, w, reduction = 33, 260, 1, 2, 20
    inputs = random_step_inputs(n, c, h, w, reduction=reduction, seed=32)
    cuda_on_cpu.grids.clear()
    with cuda_dia_step.use_settings(cuda_dia_step.KernelSettings(path="split")):
        step_outputs_and_grads(backend_step("cuda"), inputs.to(torch.float32), relu=True)
    by_pass = {"forward": [], "backward": []}
    for name, grids in cuda_on_cpu.grids:
        is_backward = name in ("grad_attention", "cell0_backward", "grad_input")
        by_pass["backward" if is_backward else "forward"] += grids
    step = roofline.Step(n, c, h, w, reduction=reduction)
    assert len(by_pass["backward"]) == 7  # du split, with its sum
    assert by_pass["forward"] == _model_grids(step, False)
    assert by_pass["backward"] == _model_grids(step, True)
