"""The split path with its reductions split over CTAs (split-K: PARTIAL launches, then a FINISH
launch adding the partial sums in split order): against float64 under the tolerance rule on odd
shapes in both layouts, and deterministic (two runs, the same bits)."""

import os
import sys
from dataclasses import replace

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


def spread_backward():
    """The fused path with its backward spread over column parts (the gates' gradients, then du
    split over K, then d pooled and dh0): at C = 40, r = 2 three column parts, two R parts, du in 3
    splits."""
    from dia_fused.kernels.triton import host

    return host.KernelSettings(
        lstm=host.LSTMConfig(split_min=1 << 30, spread_min=1, block_c=16, block_r=16),
        map=host.current_settings().map,
    )


@pytest.mark.parametrize(
    "n, c, h, w, r, dtype, channels_last",
    [
        (17, 40, 1, 1, 2, torch.float32, False),  # two sample tiles, H*W = 1
        (1, 40, 2, 3, 2, torch.float32, True),  # batch 1, channels_last
        pytest.param(3, 50, 3, 3, 3, torch.bfloat16, True, marks=pytest.mark.slow),
    ],
    ids=["n17-hw1-fp32", "batch1-fp32-cl", "c50-r3-bf16-cl"],
)
def test_spread_backward_matches_float64(n, c, h, w, r, dtype, channels_last):
    from dia_fused.kernels.triton import host

    inputs = random_step_inputs(
        n, c, h, w, reduction=r, device=DEVICE, channels_last=channels_last, seed=c + n
    )
    with host.use_settings(spread_backward()):
        compare_backend(triton_step, inputs, dtype, relu=True, activation="tanh")


def test_spread_backward_launches_and_is_deterministic(monkeypatch):
    """The forward stays one LSTM launch; the backward's LSTM is the gates' gradients (from the
    saved gates), du PARTIAL and FINISH, d pooled / dh0, with the same bits on every run."""
    from dia_fused.kernels.triton import host

    launched = []

    class Logged:  # launches the kernel, and logs its name
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(self.kernel.__name__)
            return self.kernel[grid]

    for name in [name for name in vars(host) if name.endswith("_kernel")]:
        monkeypatch.setattr(host, name, Logged(getattr(host, name)))
    inputs = random_step_inputs(3, 40, 1, 2, reduction=2, device=DEVICE, seed=9)
    with host.use_settings(spread_backward()):
        first = step_outputs_and_grads(triton_step, inputs.to(torch.float32))
        assert launched == (
            ["_pool_kernel", "_lstm_forward_kernel", "_scale_kernel", "_grad_attention_kernel"]
            + ["_lstm_backward_kernel"] * 4
            + ["_weight_grad_kernel", "_grad_input_kernel"]
        )
        second = step_outputs_and_grads(triton_step, inputs.to(torch.float32))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_the_default_plan_spreads_the_backward_where_the_model_says_it_is_faster():
    """spread_min sits where the traffic model's one-program and spread backward cross: at
    128xCx16x16, r = 4, the default plan takes the faster of the two by bench/roofline.py for
    every C from 64 to 152, and the split path from split_min on."""
    from dia_fused.kernels.triton import host

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import roofline

    settings = host.KernelSettings()

    def backward_phases(channels):
        x = torch.empty(128, channels, 16, 16, device="meta")
        plan = host.launch_plan(x, 1, channels // 4, settings)
        return [phase for phase, _, _ in plan.backward_lstm], plan.split

    def predicted_us(channels, spread_min):
        lstm = replace(settings.lstm, spread_min=spread_min)
        row = roofline.row(
            roofline.Step(128, channels, 16, 16), "triton", settings=replace(settings, lstm=lstm)
        )
        return row.forward_us + row.backward_us

    for channels in (64, 96, 112, 128, 132, 144, 152):
        phases, split = backward_phases(channels)
        assert not split
        spread_faster = predicted_us(channels, 1) < predicted_us(channels, 1 << 30)
        spread = phases == [host.Phase.GATES, host.Phase.REDUCED_GRAD, host.Phase.INPUT_GRAD]
        assert spread == spread_faster and (spread or phases == [host.Phase.FUSED]), channels
    assert backward_phases(256) == (
        [host.Phase.GATES, host.Phase.REDUCED_GRAD, host.Phase.INPUT_GRAD],
        True,
    )
