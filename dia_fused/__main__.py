"""`python -m dia_fused`: versions, backends available here (and why the others are not), and for
each available backend one DIALSTM step checked against the float64 reference and timed."""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import sys
import time

import torch

from . import __version__, backend_table, command_line, ops, reference, settings
from .testing import compare_backend, random_step_inputs

# (N, C, H, W) of the check: the CIFAR stage-1 step on a GPU, small on CPU, tiny for the interpreter
SHAPES = {"cuda": (128, 64, 32, 32), "cpu": (8, 64, 16, 16), "interpreter": (2, 16, 4, 4)}
STATIC_ORDER = " > ".join(ops.AUTO_ORDER)  # auto's order without measurements


def versions() -> dict:
    info = {
        "dia_fused": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name()
    for name in settings.ALL:
        info[name] = settings.raw(name) or "unset"
    for name in (
        settings.ENV_TRITON_LSTM,
        settings.ENV_TRITON_MAP,
        settings.ENV_TRITON_DOT_PRECISION,
    ):
        info[name] = settings.raw(name) or "unset (defaults)"
    table = backend_table.table_path()
    if settings.raw(settings.ENV_AUTO_TABLE) is None:
        absent = (
            ""
            if os.path.exists(table)
            else f": absent, auto uses {STATIC_ORDER}; bench/make_auto_table.py writes it"
        )
        info[settings.ENV_AUTO_TABLE] = f"unset ({table}{absent})"
    info["CUDA extension"] = cuda_extension_state()
    return info


def cuda_extension_state() -> str:
    """Whether the ahead-of-time dia_fused._C is installed (found, not imported: importing it needs
    a GPU-ready torch); pip shows a failed build of it only with -v."""
    if importlib.util.find_spec("dia_fused._C") is not None:
        return "dia_fused._C built ahead of time"
    if torch.version.cuda is None:
        return "none (a CPU build of torch: the cuda backend needs a CUDA build)"
    return (
        "dia_fused._C not built ahead of time (its build failed or was skipped at install: "
        "DIA_FUSED_BUILD_CUDA=1 pip install -v --no-build-isolation . shows why); "
        "the first CUDA step builds it"
    )


def step_seconds(name: str, inputs, backward: bool, min_run_time: float) -> float:
    """Median seconds of one step (with its backward when `backward`) on backend `name`: blocks of
    calls, each block timed between device synchronisations, until `min_run_time` has passed.
    Timed here rather than with torch.utils.benchmark, whose import pulls in
    torch.utils.cpp_extension and its warning on a CUDA build of torch without a GPU."""
    x, h, c, weights = inputs.args()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run():
        out, h1, c1 = ops.dia_step(x, h, c, weights, inputs.identity, True, "sigmoid", None, name)
        if backward:
            torch.autograd.backward((out, h1, c1), (out, h1, c1))

    run()  # warm-up: compilation, caches
    sync()
    start = time.perf_counter()
    run()
    sync()
    per_block = max(1, int(min_run_time / 10 / max(time.perf_counter() - start, 1e-9)))
    samples, spent = [], 0.0
    while spent < min_run_time or len(samples) < 3:
        start = time.perf_counter()
        for _ in range(per_block):
            run()
        sync()
        block = time.perf_counter() - start
        samples.append(block / per_block)
        spent += block
    return statistics.median(samples)


def check_backend(name: str, device: torch.device) -> dict:
    interpreted = name == "triton" and device.type == "cpu"
    shape = SHAPES["interpreter" if interpreted else device.type]
    inputs = random_step_inputs(*shape, device=device, seed=0)

    def step(x, h, c, w, **kw):
        return ops.dia_step(
            x, h, c, w, kw["identity"], kw["relu"], kw["activation"], kw["dropout_masks"], name
        )

    errors = compare_backend(step, inputs, torch.float32)
    timed = inputs.to().requires_grad_()
    min_run = 0.05 if interpreted else 0.2
    fwd = step_seconds(name, timed, backward=False, min_run_time=min_run)
    fwd_bwd = step_seconds(name, timed, backward=True, min_run_time=min_run)
    return {
        "shape": shape,
        "max_error": max(errors.values()),
        "out_error": errors["out"],
        "forward_ms": fwd * 1e3,
        "forward_backward_ms": fwd_bwd * 1e3,
    }


def main(argv=None) -> int:
    parser = command_line.ArgumentParser(prog="python -m dia_fused", description=__doc__)
    parser.add_argument("--no-check", action="store_true", help="only list versions and backends")
    args = parser.parse_args(argv)
    try:  # a malformed DIA_FUSED_BACKEND is a user error: one line, before any output
        settings.backend_for_auto()
    except ValueError as err:
        command_line.fail(str(err))

    print("dia_fused environment")
    info = versions()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"  {key:<{width}} {value}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    failures = 0
    for device in devices:
        print(f"\nbackends on {device}:")
        for name in ops.BACKENDS:
            reason = ops.backend_unavailable_reason(name, device)
            if reason is not None:
                print(f"  {name:<10} unavailable: {reason}")
                continue
            if args.no_check:
                print(f"  {name:<10} available")
                continue
            try:
                r = check_backend(name, device)
            except AssertionError as err:
                failures += 1
                print(f"  {name:<10} FAILED the check against the float64 reference: {err}")
                continue
            n, c, h, w = r["shape"]
            print(
                f"  {name:<10} available; step N={n} C={c} {h}x{w} fp32: "
                f"max error vs float64 {r['max_error']:.2e} (out {r['out_error']:.2e}), "
                f"forward {r['forward_ms']:.3f} ms, "
                f"forward+backward {r['forward_backward_ms']:.3f} ms"
            )
    device = devices[-1]
    n, c, h, w = SHAPES[device.type]
    auto = ops.resolve_backend(
        "auto", device, (c, h * w, "float32", True) if device.type == "cuda" else None
    )
    how = STATIC_ORDER
    if device.type == "cuda":
        name, table = torch.cuda.get_device_name(device), backend_table.table_path()
        how = (
            f"fastest measured for the step's shape on this GPU ({table})"
            if backend_table.has_device(name)
            else f"{how}: no measurements for {name} in {table} (bench/make_auto_table.py)"
        )
    print(
        f"\nbackend='auto' on {device} ({how}): "
        f"a training step N={n} C={c} {h}x{w} fp32 runs {auto}"
    )
    if (
        device.type == "cpu"
        and settings.backend_for_auto() == "auto"
        and ops.backend_unavailable_reason("triton", device) is None
    ):
        print(
            "  (triton on CPU tensors is the Triton interpreter (TRITON_INTERPRET=1), a "
            "correctness tool that auto never picks; backend='triton' runs it)"
        )
    print(f"cell activations: {', '.join(reference.CELL_ACTIVATIONS)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
