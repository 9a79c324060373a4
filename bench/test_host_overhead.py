"""Host-side cost of a fused DIA step, kernels stubbed out: the part of a step that CUDA graphs
remove and that eager training pays 54 times per ResNet-164 pass.

Measured as issue #20 prescribes, so that numbers from a shared machine compare: tiny tensors
(N=1, C=64, 1x1), one thread, thread CPU time (time.thread_time_ns: time stolen by other processes
does not count), the cases interleaved round by round, best of the rounds. Each case is reported as
a ratio to `nn.LSTMCell(64, 64)` measured in the same rounds, for both fused backends: the Triton
kernels are replaced by no-ops, the cuda backend's compiled extension by Python functions that
allocate its outputs (the C++ bindings allocate them too). No GPU and no interpreter is involved.

`python bench/test_host_overhead.py` prints the table (BENCHMARKS.md, "Host overhead").
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List

import pytest
import torch
from torch import nn

from dia_fused import DIALSTM
from dia_fused.kernels import cuda_dia_step

pytest.importorskip("triton")

CHANNELS = 64
BACKENDS = ("triton", "cuda")
# the Done-when bounds of issue #20: the unit's host cost per step over nn.LSTMCell's
MAX_NO_GRAD_RATIO = 1.3
MAX_FORWARD_BACKWARD_RATIO = 1.2


def _no_launch(*args, **kwargs) -> None:
    pass


class _NoLaunch:
    """A Triton kernel whose launches do nothing (as cheaply as a Python call can)."""

    def __getitem__(self, grid):
        return _no_launch


class _StubExtension:
    """dia_fused._C's functions, allocating their outputs without running anything (one CPU
    tensor each, as the bindings' at::empty)."""

    @staticmethod
    def forward_fused(x, h0, c0, weights, identity, relu, code):
        saved = h0.new_empty(cuda_dia_step.saved_shape(x.shape, weights))
        return torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0), saved

    @staticmethod
    def backward_fused(grad_out, gh0, gc0, x, out, saved, h0, c0, weights, identity_given, *_):
        grad_identity = torch.empty_like(x) if identity_given else None
        grads = [torch.empty_like(w) for w in weights]
        return (torch.empty_like(x), grad_identity, torch.empty_like(h0), torch.empty_like(c0)) + (
            *grads,
        )


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[None]:
    """Both fused backends available for CPU tensors, with stubbed kernels."""
    from dia_fused.kernels.triton import host as triton_host

    extension = _StubExtension()
    patches = [(cuda_dia_step, "_extension_for", lambda x: extension)]
    patches += [(cuda_dia_step, "unavailable_reason", lambda device: None)]
    patches += [(cuda_dia_step, "_sm_count", lambda device: 132)]
    patches += [(triton_host, "unavailable_reason", lambda device: None)]
    patches += [(triton_host, n, _NoLaunch()) for n in dir(triton_host) if n.endswith("_kernel")]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    clear = getattr(sys.modules.get("dia_fused.ops"), "clear_plans", lambda: None)
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        clear()  # plans made before the stubs hold the real availability
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        clear()


def _cases() -> Dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.randn(1, CHANNELS, 1, 1)
    x_grad = x.clone().requires_grad_()
    cell = nn.LSTMCell(CHANNELS, CHANNELS)
    cell_input, cell_input_grad = x.view(1, CHANNELS), x.view(1, CHANNELS).clone().requires_grad_()
    units = {name: DIALSTM(CHANNELS, backend=name).eval() for name in BACKENDS}

    def no_grad(call):
        def run():
            with torch.no_grad():
                call()

        return run

    cases = {
        "nn.LSTMCell no_grad": no_grad(lambda: cell(cell_input)),
        "nn.LSTMCell fwd+bwd": lambda: cell(cell_input_grad)[0].sum().backward(),
    }
    for name, unit in units.items():
        cases[f"{name} no_grad"] = no_grad(lambda unit=unit: unit(x))
        cases[f"{name} fwd+bwd"] = lambda unit=unit: unit(x_grad)[0].sum().backward()
    return cases


def measure(rounds: int = 30, calls: int = 40) -> Dict[str, float]:
    """Best-of-`rounds` thread CPU time per call in microseconds of each case, interleaved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stubbed_kernels():
            cases = _cases()
            best = {name: float("inf") for name in cases}
            for call in cases.values():  # warm-up: plans, caches, lazy imports
                for _ in range(3):
                    call()
            for _ in range(rounds):
                for name, call in cases.items():
                    start = time.thread_time_ns()
                    for _ in range(calls):
                        call()
                    best[name] = min(best[name], (time.thread_time_ns() - start) / calls / 1e3)
            return best
    finally:
        torch.set_num_threads(threads)


def ratios(best: Dict[str, float]) -> Dict[str, float]:
    return {
        name: us / best["nn.LSTMCell " + name.split(" ", 1)[1]]
        for name, us in best.items()
        if not name.startswith("nn.")
    }


def functions_entered(backend: str = "triton", backward: bool = False) -> int:
    """Python functions entered (sys.setprofile 'call' events) by one unit step without grad, or
    by its forward+backward."""
    with stubbed_kernels():
        unit = DIALSTM(CHANNELS, backend=backend).eval()
        x = torch.randn(1, CHANNELS, 1, 1, requires_grad=backward)
        events: List[str] = []

        def profile(frame, event, arg):
            if event == "call":
                events.append(frame.f_code.co_name)

        def step():
            if backward:
                unit(x)[0].sum().backward()
            else:
                with torch.no_grad():
                    unit(x)

        for _ in range(3):
            step()
        sys.setprofile(profile)
        step()
        sys.setprofile(None)
    return len(events)


def table(best: Dict[str, float]) -> str:
    lines = ["| case | us per call (best of rounds) | ratio to nn.LSTMCell |", "|---|---|---|"]
    ratio = ratios(best)
    for name, us in best.items():
        lines.append(f"| {name} | {us:.1f} | {ratio.get(name, 1.0):.2f}x |")
    return "\n".join(lines)


def _bound(name: str) -> float:
    return MAX_NO_GRAD_RATIO if name.endswith("no_grad") else MAX_FORWARD_BACKWARD_RATIO


def measure_in_fresh_process(rounds: int = 30, calls: int = 25) -> Dict[str, float]:
    """measure() in a new interpreter that imports only what a step needs. The same code measures
    10-25% slower in a process that has run the rest of the suite (its Python-heavy paths more than
    nn.LSTMCell's C++ ones: 170 -> 190-208 us forward+backward against 146 -> 162 us), which would
    make the ratio a property of the tests that ran before it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import json; from bench import test_host_overhead as t; "
        f"print(json.dumps(t.measure(rounds={rounds}, calls={calls})))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600
    )
    if run.returncode != 0:
        raise RuntimeError(f"the measurement process failed ({run.returncode}):\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_unit_host_cost_against_lstm_cell(record_property):
    """The fused unit's host cost per step, as a ratio to nn.LSTMCell(64, 64) in the same run:
    without grad at most 1.3x, forward+backward at most 1.2x (issue #20). Best of interleaved
    rounds of thread CPU time, each measurement in a fresh process; a machine busy through a whole
    measurement gets up to four more (each case keeps its best ratio: on the shared 2-CPU box one
    measurement's forward+backward ratio moves by +-0.07 with the same code)."""
    ratio: Dict[str, float] = {}
    for _ in range(5):
        best = measure_in_fresh_process(rounds=30, calls=25)
        for name, value in ratios(best).items():
            ratio[name] = min(value, ratio.get(name, value))
        if all(ratio[name] <= _bound(name) for name in ratio):
            break
    for name, value in ratio.items():
        record_property(name, round(value, 3))
    print("\n" + table(best))
    for backend in BACKENDS:
        assert ratio[f"{backend} no_grad"] <= MAX_NO_GRAD_RATIO, table(best)
        assert ratio[f"{backend} fwd+bwd"] <= MAX_FORWARD_BACKWARD_RATIO, table(best)


if __name__ == "__main__":
    result = measure()
    print(table(result))
    for backend in BACKENDS:
        print(
            f"Python functions entered per no-grad step ({backend}): {functions_entered(backend)}"
        )
