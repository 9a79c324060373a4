"""The emulated CUDA kernels (test_cuda_backend_emulated.py) under AddressSanitizer and
ThreadSanitizer: no access outside the tensors and workspaces, no data race on shared memory
between the threads of a block (a missing __syncthreads shows up here), on one case of every
kernel path. CPU-side counterparts of compute-sanitizer memcheck and racecheck, which run on the
GPU (see the report in issue 5); each run is a pytest subprocess with the sanitizer's runtime
preloaded into Python.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

import cuda_emulation

HERE = os.path.dirname(os.path.abspath(__file__))

# one case per kernel path: fused and split, both walks, tiles over N / C / R, half types, stacked
CASES = (
    "odd-hw-fused-nchw or odd-hw-split-nhwc or tiles-split-nhwc or tiles-fused-nhwc "
    "or vec8-rows-fused-nhwc-dtype0 or vec8-planes-split-nchw-dtype1 "
    "or stacked_cells and 3-0.5 and dtype0 "
    "or share_warps or split_hw_deterministically"
)


def sanitizer_runtime(name: str):
    """Path of lib{a,t}san.so next to g++, or None."""
    try:
        path = subprocess.run(
            ["g++", f"-print-file-name=lib{name}.so"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.isfile(path) else None


@pytest.mark.slow  # a sanitized pytest run each
@pytest.mark.skipif(
    cuda_emulation.unavailable_reason() is not None,
    reason=f"kernel emulation: {cuda_emulation.unavailable_reason()}",
)
@pytest.mark.parametrize(
    "sanitizer,runtime,options",
    [
        ("address", "asan", "ASAN_OPTIONS"),
        ("thread", "tsan", "TSAN_OPTIONS"),
    ],
)
def test_emulated_kernels_under_sanitizer(sanitizer, runtime, options, tmp_path):
    library = sanitizer_runtime(runtime)
    if library is None:
        pytest.skip(f"lib{runtime}.so not found beside g++")
    cuda_emulation.build(sanitizer)  # compile here, outside the sanitized process
    proc, details = _sanitized_pytest(library, sanitizer, options, tmp_path / "report")
    if proc.returncode != 0 or details:
        problem = _collection_failure(library, sanitizer, options, tmp_path / "probe")
        if problem is not None:
            pytest.skip(problem)
    assert proc.returncode == 0 and not details, (
        f"{sanitizer} sanitizer: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{details}"
    )
    assert " passed" in proc.stdout and "deselected" in proc.stdout, proc.stdout[-2000:]


def _sanitized_pytest(library, sanitizer, options, log, *extra):
    """pytest on the CASES of test_cuda_backend_emulated.py with the sanitizer's runtime preloaded:
    (the finished process, the text of the sanitizer's reports, "" when none)."""
    env = dict(
        os.environ,
        LD_PRELOAD=library,
        **{
            cuda_emulation.SANITIZER_ENV: sanitizer,
            options: f"log_path={log}:detect_leaks=0:exitcode=66",
        },
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            *extra,
            os.path.join(HERE, "test_cuda_backend_emulated.py"),
            "-k",
            CASES,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(HERE),
        timeout=900,
    )
    reports = sorted(log.parent.glob(log.name + "*"))
    return proc, "\n".join(p.read_text()[:4000] for p in reports)


def _collection_failure(library, sanitizer, options, log):
    """Why the sanitizer cannot host the test process at all, or None. Collecting the tests only
    imports modules (torch, triton, dia_fused: no emulated kernel is loaded or run), so a failure
    there is the tool's limit with this interpreter's native modules (e.g. AddressSanitizer's
    CHECK on real___cxa_throw when a pybind11 module throws during triton's import), not a fault
    of the kernels under test."""
    proc, details = _sanitized_pytest(library, sanitizer, options, log, "--collect-only")
    if proc.returncode == 0 and not details:
        return None
    text = (details or proc.stderr or proc.stdout).strip()
    first = next(
        (line.strip() for line in text.splitlines() if "Sanitizer" in line),
        text.splitlines()[0] if text else f"exit {proc.returncode}, no output",
    )
    return (
        f"{sanitizer} sanitizer cannot host the test process here: with "
        f"LD_PRELOAD={library}, importing the test modules fails before any kernel runs "
        f"(torch {_version('torch')}, triton {_version('triton')}): {first}"
    )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
