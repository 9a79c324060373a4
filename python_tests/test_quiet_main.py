"""`python -m dia_fused` prints no third-party warning caused by importing what it does not need yet
(for example torch.utils.cpp_extension's "No CUDA runtime is found" on a CUDA build of torch
without a GPU: the CUDA extension's loader is needed only for a CUDA step)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python's warnings ("...Warning: ...") and the glog-style lines of torch's logging ("W1201 ...")
WARNING_LINE = re.compile(r"warning|^[WE]\d{4} ", re.IGNORECASE)


@pytest.mark.parametrize("args", [["--no-check"], []], ids=["listing", "checked-and-timed"])
def test_main_prints_no_warning(args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("PYTHONWARNINGS", "DIA_FUSED_BACKEND", "TORCH_LOGS"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "dia_fused", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend" in proc.stdout  # it ran: the backends table is printed
    noisy = [line for line in proc.stderr.splitlines() if WARNING_LINE.search(line)]
    assert noisy == [], "\n".join(noisy)
