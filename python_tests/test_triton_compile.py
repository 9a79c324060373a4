"""Every Triton kernel specialisation the host wrappers launch compiles for sm_90 and sm_80 on this
machine (no GPU needed: Triton's compiler and ptxas), and the LSTM kernels do not spill on sm_90 nor
sm_80. The interpreter runs programs a GPU compile would reject, so this is the CPU-side
guard for the GPU build. Runs python_tests/triton_aot.py in a process without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # Triton's compiler and ptxas over every specialisation, two arches

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # the script's sys.path holds python_tests/, not the repository root: this checkout's dia_fused
    paths = [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_aot.py"), "--arch", "90", "--arch", "80"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if not lines and "nvidia" in run.stderr and "backend" in run.stderr.lower():
        pytest.skip(f"this triton has no NVIDIA backend: {run.stderr[-300:]}")
    assert lines, f"triton_aot.py printed no record (exit {run.returncode}):\n{run.stderr[-3000:]}"
    return lines, run


def test_every_kernel_specialisation_compiles_for_sm90_and_sm80(records):
    lines, run = records
    failed = [r for r in lines if not r["ok"]]
    assert not failed, "\n".join(
        f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['error']}" for r in failed
    )
    assert run.returncode == 0, run.stderr[-2000:]
    kernels = {r["kernel"] for r in lines}
    assert kernels == {
        "_pool_kernel",
        "_sum_splits_kernel",
        "_lstm_forward_kernel",
        "_scale_kernel",
        "_grad_attention_kernel",
        "_lstm_backward_kernel",
        "_weight_grad_kernel",
        "_grad_input_kernel",
    }
    assert {r["arch"] for r in lines} == {80, 90}


# the most shared memory one CTA may use (opt-in), per arch: the pipelining buffers must fit
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.parametrize("arch", [90, 80])
def test_lstm_kernels_do_not_spill(records, arch):
    """Every LSTM and weight-gradient specialisation (the defaults: one cell on the split path,
    2-3 stacked cells on the fused path, fp32 / bf16 / fp16; and the forced fused and split-K
    variants) keeps its live values in registers and its buffers in shared memory."""
    lines, _ = records
    lstm = [
        r
        for r in lines
        if r["arch"] == arch
        and (r["kernel"].startswith("_lstm") or r["kernel"] == "_weight_grad_kernel")
    ]
    assert {r["constexprs"].get("NUM_CELLS") for r in lstm} >= {1, 2, 3}
    for r in lstm:
        if "stack_bytes" not in r:
            pytest.skip(f"no resource report (cuobjdump missing): {r}")
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, r
        if r.get("dynamic_shared_bytes") is not None:
            assert r["dynamic_shared_bytes"] <= MAX_SHARED_BYTES[arch], r
