"""The traffic model (bench/roofline.py) against the Triton kernels as they are: under
TRITON_INTERPRET=1 every masked load and store of every launch is counted (the elements its mask
lets through, times their size), and the model's grid, loaded bytes and stored bytes of each launch
must equal them, on small shapes covering every path (fused and split LSTM, stacked cells with
masks, both layouts, identity/relu on and off, absent state gradients)."""

import contextlib
import os
import sys
from dataclasses import dataclass, field, replace
from typing import List

import pytest
import torch

from dia_fused import reference
from dia_fused.kernels.triton.config import KernelSettings, LSTMConfig
from dia_fused.testing import random_step_inputs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import roofline  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="counts the loads and stores of the Triton interpreter",
)


@dataclass
class CountedLaunch:
    kernel: str
    grid: tuple
    loads: int = 0
    stores: int = 0


@dataclass
class TrafficCounter:
    launches: List[CountedLaunch] = field(default_factory=list)


@contextlib.contextmanager
def counting():
    """Counts the bytes each interpreted launch loads and stores (masked-off elements excluded)."""
    from triton.runtime import interpreter

    counter = TrafficCounter()
    builder = interpreter.InterpreterBuilder
    load, store, call = (
        builder.create_masked_load,
        builder.create_masked_store,
        interpreter.GridExecutor.__call__,
    )

    def size(ptrs):
        return ptrs.get_element_ty().primitive_bitwidth // 8

    def counted_load(self, ptrs, mask, other, *args):
        counter.launches[-1].loads += int(mask.data.sum()) * size(ptrs)
        return load(self, ptrs, mask, other, *args)

    def counted_store(self, ptrs, value, mask, *args):
        counter.launches[-1].stores += int(mask.data.sum()) * size(ptrs)
        return store(self, ptrs, value, mask, *args)

    def counted_call(self, *args, **kwargs):
        grid = tuple(self.grid) if not callable(self.grid) else None
        counter.launches.append(CountedLaunch(self.fn.__name__, grid))
        return call(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    interpreter.GridExecutor.__call__ = counted_call
    try:
        yield counter
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        interpreter.GridExecutor.__call__ = call


FUSED, SPLIT = LSTMConfig(split_min=1 << 30, spread_min=1 << 30), LSTMConfig(split_min=0)
CASES = {
    # name: (roofline.Step, the LSTM configuration)
    "fused-odd-c": (roofline.Step(3, 20, 3, 5, reduction=4), FUSED),
    "fused-bf16-cl-no-identity": (
        roofline.Step(17, 24, 2, 3, dtype="bfloat16", channels_last=True, identity=False),
        FUSED,
    ),
    "fused-no-relu-no-state-grads": (
        roofline.Step(2, 12, 1, 1, reduction=3, relu=False, grad_state=False),
        FUSED,
    ),
    "fused-relu-no-identity": pytest.param(
        roofline.Step(2, 70, 9, 9, reduction=7, identity=False), FUSED, marks=pytest.mark.slow
    ),
    "stacked-3-cells-masks": (roofline.Step(2, 8, 2, 2, reduction=2, cells=3, masks=True), FUSED),
    # the fused path's spread backward: 3 column parts each recomputing relu(u), du split over K
    "spread-backward": (
        roofline.Step(3, 40, 2, 2, reduction=2),
        LSTMConfig(split_min=1 << 30, spread_min=1, block_c=16, block_r=16),
    ),
    "split-path": pytest.param(
        roofline.Step(18, 72, 2, 2, reduction=2), SPLIT, marks=pytest.mark.slow
    ),
    # pool and grad attention split H*W (2 samples: fewer programs than MapConfig.min_ctas)
    "channels-last-hw-split": (roofline.Step(2, 20, 6, 6, channels_last=True), SPLIT),
    # every phase split over K (the interpreter's k-step is 64: splits of 64)
    "split-k-every-phase": (
        roofline.Step(3, 72, 1, 2, reduction=1),
        LSTMConfig(split_min=1, split_k=16, block_c=16, block_r=16),
    ),
    # split_ctas caps the splits: du (K = 288, 5 k-steps) over 5 R parts splits in 2, not 5; the
    # 64x64 weight-gradient tiles (weight_grad_ctas=0; small units take 32x32 by default)
    "split-k-capped-by-split-ctas": (
        roofline.Step(3, 72, 1, 2, reduction=1),
        LSTMConfig(
            split_min=1, split_k=16, split_ctas=10, block_c=16, block_r=16, weight_grad_ctas=0
        ),
    ),
}


def run_step(s: roofline.Step, settings: KernelSettings):
    from dia_fused.kernels.triton import host

    dtype = getattr(torch, s.dtype)
    inputs = random_step_inputs(
        s.n,
        s.c,
        s.h,
        s.w,
        reduction=s.reduction,
        num_cells=s.cells,
        identity=s.identity,
        dropout_p=0.5 if s.masks else 0.0,
        channels_last=s.channels_last,
        seed=1,
    )
    x = inputs.x.to(dtype)
    identity = None if inputs.identity is None else inputs.identity.to(dtype)
    masks = inputs.dropout_masks if s.masks else None
    with counting() as forward:
        out, h_new, c_new, saved = host.forward(
            x, inputs.h, inputs.c, inputs.weights, identity, s.relu, "sigmoid", masks, settings
        )
    grads = (torch.randn_like(h_new), torch.randn_like(c_new)) if s.grad_state else (None, None)
    with counting() as backward:
        host.backward(
            torch.randn_like(out),
            *grads,
            x,
            out,
            saved,
            inputs.h,
            inputs.c,
            inputs.weights,
            identity is not None,
            s.relu,
            "sigmoid",
            masks,
            settings,
        )
    return forward.launches, backward.launches


@pytest.mark.parametrize(
    "s, lstm",
    list(CASES.values()),
    ids=list(CASES),
)
def test_model_counts_the_bytes_the_kernels_move(s, lstm):
    from dia_fused.kernels.triton import host

    # small map tiles: several tiles of H*W per sample in channels_last too
    settings = KernelSettings(lstm=lstm, map=replace(host.current_settings().map, tile=256))
    counted = run_step(s, settings)
    for backward, launches in enumerate(counted):
        model = roofline.triton_launches(s, bool(backward), settings, interpreted=True)
        assert [(m.kernel, m.grid) for m in model] == [(c.kernel, c.grid) for c in launches]
        for m, c in zip(model, launches):
            assert (m.kernel, m.grid, m.loads, m.stores) == (c.kernel, c.grid, c.loads, c.stores)


def test_the_counter_sees_masked_elements_only():
    """The counting itself: one pool launch over a known map loads exactly its bytes."""
    from dia_fused.kernels.triton import host

    x = torch.randn(2, 5, 3, 3)
    with counting() as counter:
        host.forward(
            x,
            torch.zeros(1, 2, 5),
            torch.zeros(1, 2, 5),
            random_step_inputs(2, 5, 3, 3, reduction=5).weights,
            None,
            False,
            "sigmoid",
            None,
        )
    assert counter.launches[0].kernel == "_pool_kernel"
    assert counter.launches[0].loads == x.numel() * 4
    assert counter.launches[0].stores == 2 * 5 * 4
    assert reference.CELL0_WEIGHTS == 8
