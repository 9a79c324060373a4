"""pytest configuration of the microbenchmarks."""

import os

import pytest
import torch

from bench_utils import DEVICE, ON_GPU
from dia_fused import ops


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # each benchmark names its backend; an override from the environment would mislabel results
    monkeypatch.delenv("DIA_FUSED_BACKEND", raising=False)
    ops.clear_plans()  # plans record availability, which benchmarks fake with stubs
    yield
    ops.clear_plans()


def pytest_report_header(config):
    return (
        f"dia_fused bench: device={DEVICE} "
        f"({torch.cuda.get_device_name() if ON_GPU else 'no GPU'}), "
        f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}"
    )
