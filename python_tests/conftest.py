"""Shared test setup: the Triton interpreter where there is no GPU (set before any kernel module is
imported), and the csrc kernels compiled for the CPU (cuda_emulation.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cuda_emulation  # noqa: E402
from dia_fused import ops  # noqa: E402
from dia_fused.kernels import cuda_dia_step  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_step_plans():
    """Step plans record which backends are available, and tests fake that (monkeypatch): each
    test starts without plans, and leaves none behind."""
    ops.clear_plans()
    yield
    ops.clear_plans()


@pytest.fixture(scope="session")
def emulated_extension():
    reason = cuda_emulation.unavailable_reason()
    if reason is not None:
        pytest.skip(f"kernel emulation: {reason}")
    return cuda_emulation.EmulatedExtension()


@pytest.fixture
def emu(emulated_extension, monkeypatch):
    """Routes the host wrapper of the cuda backend to the emulated kernels for CPU tensors."""
    monkeypatch.setattr(cuda_dia_step, "_extension_for", lambda x: emulated_extension)
    monkeypatch.setattr(cuda_dia_step, "_sm_count", lambda device: 132)
    emulated_extension.launches.clear()
    return emulated_extension


@pytest.fixture
def cuda_on_cpu(emu, monkeypatch):
    """The cuda backend through ops.dia_step (the product's wiring), available for CPU tensors and
    running the emulated kernels."""
    monkeypatch.setattr(cuda_dia_step, "unavailable_reason", lambda device: None)
    monkeypatch.delenv("DIA_FUSED_BACKEND", raising=False)
    return emu


def pytest_terminal_summary(terminalreporter):
    """Tests skipped for a package that is not installed are named at the end with the install
    command, not only counted as "s" (the compat tests need pytorchcv, the export test onnx)."""
    missing = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "pip install" in reason:
            reason = reason.removeprefix("Skipped: ")
            missing[reason] = missing.get(reason, 0) + 1
    for reason, count in missing.items():
        terminalreporter.write_line(
            f"SKIPPED {count} test(s), a package is missing: {reason}", yellow=True, bold=True
        )
