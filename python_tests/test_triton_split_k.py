"""The split path with its reductions split over CTAs (split-K: PARTIAL launches, then a FINISH
launch adding the partial sums in split order): against float64 under the tolerance rule on odd
shapes in both layouts, and deterministic (two runs, the same bits)."""

import pytest
import torch

from dia_fused import ops
from dia_fused.testing import (
    backend_step,
    compare_backend,
    random_step_inputs,
    step_outputs_and_grads,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", DEVICE) is not None,
    reason=f"{ops.backend_unavailable_reason('triton', DEVICE)}",
)
triton_step = backend_step("triton")


def every_phase_split():
    """Settings where every LSTM phase of these shapes splits its reduction (split_k 16 rounds up
    to one k-step: 64 under the interpreter, 64 by default on a GPU)."""
    from dia_fused.kernels.triton import host

    return host.KernelSettings(
        lstm=host.LSTMConfig(split_min=0, split_k=16, block_c=16, block_r=16),
        map=host.current_settings().map,
    )


@pytest.mark.parametrize(
    "n, c, h, w, r, dtype, channels_last",
    [
        (3, 72, 1, 1, 1, torch.float32, False),  # R = C = 72 > 64: all four phases split
        pytest.param(1, 130, 2, 3, 2, torch.bfloat16, True, marks=pytest.mark.slow),
        pytest.param(17, 66, 3, 3, 1, torch.float16, False, marks=pytest.mark.slow),
    ],
    ids=["hw1-fp32", "batch1-c130-r65-bf16-cl", "n17-two-tiles-c66-fp16"],
)
def test_split_k_matches_float64(n, c, h, w, r, dtype, channels_last):
    from dia_fused.kernels.triton import host

    inputs = random_step_inputs(
        n, c, h, w, reduction=r, device=DEVICE, channels_last=channels_last, seed=c
    )
    with host.use_settings(every_phase_split()):
        compare_backend(triton_step, inputs, dtype, relu=True)


def test_split_k_is_deterministic():
    """The partial sums are added in split order by one program each (no atomics): two runs give
    the same bits for every output and gradient."""
    from dia_fused.kernels.triton import host

    inputs = random_step_inputs(3, 72, 1, 2, reduction=1, device=DEVICE, seed=5)
    with host.use_settings(every_phase_split()):
        first = step_outputs_and_grads(triton_step, inputs.to(torch.float32))
        second = step_outputs_and_grads(triton_step, inputs.to(torch.float32))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_phase_splits_into_as_many_parts_as_fit_in_split_ctas():
    """The split count fills one wave of split_ctas programs and no more, with no split shorter
    than split_k (whole k-steps): fewer, longer programs pay fewer k-loop prologues."""
    from dia_fused.kernels.triton import host

    config = host.LSTMConfig(split_k=64, split_ctas=132)
    # du of 32x2048x7x7: (2 tiles, 16 parts) over K = 4C = 8192 -> 132 // 32 = 4 splits
    assert host.split_k_launches(2, 16, 8192, config, True) == (
        (host.SplitK.PARTIAL, (2, 16, 4), 4),
        (host.SplitK.FINISH, (2, 16, 1), 4),
    )
    # a grid of 128 programs fills the wave already: one DIRECT launch
    assert host.split_k_launches(2, 64, 512, config, True) == ((host.SplitK.DIRECT, (2, 64, 1), 1),)
    # a short reduction: at most K / split_k splits
    assert host.split_k_launches(1, 2, 128, config, True)[0] == (host.SplitK.PARTIAL, (1, 2, 2), 2)
    # the fused path never splits
    assert host.split_k_launches(1, 1, 8192, config, False) == ((host.SplitK.DIRECT, (1, 1, 1), 1),)
