"""The tuning harness runs end to end: on CPU under the Triton interpreter with a tiny shape (its
timings mean nothing there), on a GPU through bench/gpu_session.sh with the real shapes."""

import json
import os
import subprocess
import sys

import pytest
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _repo_env(**extra):
    """The environment with this checkout's dia_fused importable (first on PYTHONPATH): the
    subprocess runs a script in bench/, whose sys.path holds bench/ and not the repository root."""
    paths = [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)


@pytest.mark.slow  # the tuning harness's candidates under the interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/tune_triton.py itself")
def test_tuning_harness_smoke(tmp_path):
    pytest.importorskip("triton")  # the harness runs its candidates under TRITON_INTERPRET=1 itself
    out = tmp_path / "tune.json"
    script = os.path.join(HERE, "tune_triton.py")
    run = subprocess.run(
        [sys.executable, script, "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=_repo_env(TRITON_INTERPRET="1"),
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {(r["config"], r["map_config"]) for r in records} == {
        ("defaults", "defaults"),
        ("forward_groups=1", "defaults"),
        ("defaults", "tile=256"),
    }
    assert all(r["ok"] and r["triton_forward_backward_ms"] > 0 for r in records)
    assert "best over all shapes" in run.stdout
