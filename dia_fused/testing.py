"""Helpers shared by the test suites and `python -m dia_fused`: random step inputs, random BN layers
for comparing models, and the tolerance rule of docs/design.md §4.

Tolerance rule: a backend's max error against the float64 reference is at most twice the error of
the same-dtype PyTorch reference, plus a small absolute floor (scaled by the magnitude of the
values compared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import ops, reference

Tensor = torch.Tensor

ABS_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass
class StepInputs:
    x: Tensor
    h: Tensor
    c: Tensor
    weights: List[Tensor]
    identity: Optional[Tensor]
    dropout_masks: Optional[Tensor]

    def args(self):
        return self.x, self.h, self.c, self.weights

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "StepInputs":
        """A detached leaf copy: x and identity in `dtype`; state, weights and masks in its state
        dtype (fp32 weights with half activations, as under autocast)."""
        dtype = dtype or self.x.dtype
        sdtype = reference.state_dtype(dtype)

        def cast(t, dt):
            return None if t is None else t.detach().to(device=device or t.device, dtype=dt).clone()

        return StepInputs(
            cast(self.x, dtype),
            cast(self.h, sdtype),
            cast(self.c, sdtype),
            [cast(w, sdtype) for w in self.weights],
            cast(self.identity, dtype),
            cast(self.dropout_masks, sdtype),
        )

    def requires_grad_(self) -> "StepInputs":
        for t in self.tensors():
            t.requires_grad_(True)
        return self

    def tensors(self) -> List[Tensor]:
        ts = [self.x, self.h, self.c, *self.weights]
        if self.identity is not None:
            ts.append(self.identity)
        return ts


def random_step_inputs(
    n: int,
    channels: int,
    height: int,
    width: int,
    *,
    reduction: int = 4,
    num_cells: int = 1,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    identity: bool = True,
    dropout_p: float = 0.0,
    channels_last: bool = False,
    seed: int = 0,
) -> StepInputs:
    """Inputs for one DIA step with weights at the scale of nn.Linear's default init."""
    gen = torch.Generator().manual_seed(seed)
    sdtype = reference.state_dtype(dtype)
    hidden = channels // reduction

    def rand(*shape, scale=1.0, dt=sdtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(
            device=device, dtype=dt
        )

    x = rand(n, channels, height, width, dt=dtype)
    idt = rand(n, channels, height, width, dt=dtype) if identity else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        idt = None if idt is None else idt.contiguous(memory_format=torch.channels_last)
    weights = []
    for _ in range(2):  # ih and hh paths of cell 0
        weights += [
            rand(hidden, channels, scale=channels**-0.5),
            rand(hidden, scale=0.1),
            rand(4 * channels, hidden, scale=hidden**-0.5),
            rand(4 * channels, scale=0.1),
        ]
    for _ in range(1, num_cells):
        for _ in range(2):
            weights += [
                rand(4 * channels, channels, scale=channels**-0.5),
                rand(4 * channels, scale=0.1),
            ]
    h = torch.sigmoid(rand(num_cells, n, channels))
    c = rand(num_cells, n, channels)
    masks = None
    if num_cells > 1 and dropout_p > 0:
        keep = 1 - dropout_p
        masks = (torch.rand(num_cells - 1, n, channels, generator=gen) < keep).to(
            device=device, dtype=sdtype
        ) / keep
    return StepInputs(x, h, c, weights, idt, masks)


def backend_step(backend: str):
    """ops.dia_step on `backend`, with the signature of reference.dia_lstm_step (what
    compare_backend and step_outputs_and_grads call)."""

    def step(x, h, c, w, identity=None, relu=False, activation="sigmoid", dropout_masks=None):
        return ops.dia_step(x, h, c, w, identity, relu, activation, dropout_masks, backend)

    return step


def max_abs_error(actual: Tensor, expected: Tensor) -> float:
    return (
        (actual.detach().double() - expected.detach().double()).abs().max().item()
        if actual.numel()
        else 0.0
    )


def tolerance_bound(same_dtype: Tensor, ref64: Tensor, dtype: torch.dtype) -> float:
    """2x the same-dtype reference's error against float64, plus the scaled absolute floor."""
    scale = max(1.0, ref64.detach().abs().max().item()) if ref64.numel() else 1.0
    return 2.0 * max_abs_error(same_dtype, ref64) + ABS_FLOOR[dtype] * scale


def assert_within_tolerance(
    name: str,
    actual: Tensor,
    same_dtype: Tensor,
    ref64: Tensor,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Raises AssertionError naming `name` when `actual` breaks the tolerance rule."""
    if actual.shape != ref64.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}"
        )
    dtype = dtype or same_dtype.dtype
    err = max_abs_error(actual, ref64)
    bound = tolerance_bound(same_dtype, ref64, dtype)
    if not err <= bound:  # `not <=` so that NaN fails
        raise AssertionError(
            f"{name}: max error vs float64 reference {err:.3e} > bound {bound:.3e} "
            f"(same-dtype reference error {max_abs_error(same_dtype, ref64):.3e})"
        )


def step_outputs_and_grads(
    step, inputs: StepInputs, *, relu: bool = True, activation: str = "sigmoid", grad_seed: int = 1
) -> Dict[str, Tensor]:
    """Runs `step` (the signature of reference.dia_lstm_step) and backpropagates fixed random
    cotangents into out, h and c; returns outputs and the gradient of every input, by name."""
    inputs.requires_grad_()
    out, h, c = step(
        inputs.x,
        inputs.h,
        inputs.c,
        inputs.weights,
        identity=inputs.identity,
        relu=relu,
        activation=activation,
        dropout_masks=inputs.dropout_masks,
    )
    gen = torch.Generator().manual_seed(grad_seed)
    cotangents = [
        torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in (out, h, c)
    ]
    torch.autograd.backward((out, h, c), cotangents)
    result = {
        "out": out.detach(),
        "h": h.detach(),
        "c": c.detach(),
        "grad_x": inputs.x.grad,
        "grad_h0": inputs.h.grad,
        "grad_c0": inputs.c.grad,
    }
    names = reference.weight_names(reference.num_cells_of(inputs.weights))
    for name, w in zip(names, inputs.weights):
        result["grad_" + name] = w.grad
    if inputs.identity is not None:
        result["grad_identity"] = inputs.identity.grad
    return result


def compare_backend(step, inputs: StepInputs, dtype: torch.dtype, **kwargs) -> Dict[str, float]:
    """Checks `step` on `inputs` cast to `dtype` against the same-dtype and float64 references,
    for outputs, state and every gradient; raises AssertionError on a violation and returns the
    max error of each quantity."""
    got = step_outputs_and_grads(step, inputs.to(dtype), **kwargs)
    same = step_outputs_and_grads(reference.dia_lstm_step, inputs.to(dtype), **kwargs)
    ref64 = step_outputs_and_grads(reference.dia_lstm_step, inputs.to(torch.float64), **kwargs)
    errors = {}
    for key, value in ref64.items():
        if got[key] is None:
            raise AssertionError(f"{key}: the backend produced no gradient")
        assert_within_tolerance(key, got[key], same[key], value, dtype)
        errors[key] = max_abs_error(got[key], value)
    return errors


def capture_cuda_graph(
    fn: Callable[[], Any], warmup: int = 3
) -> Tuple["torch.cuda.CUDAGraph", Any]:
    """(graph, fn's outputs in the graph's memory): fn run `warmup` times on a side stream first
    (allocator, lazy loading, kernel compilation, optimizer state), then captured; replaying the
    graph rewrites those outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` with non-trivial statistics and affine parameters in every BatchNorm2d (a fresh
    model's are 0/1, which hides a swapped or missed norm when models are compared); in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
    return model
