"""bench/summarize.py renders BENCHMARKS.md from real (CPU, tiny) outputs of model_bench.py and of
pytest-benchmark's JSON, so that the GPU session's results only need running it."""

import os
import subprocess
import sys

import pytest

import model_bench
import summarize

HERE = os.path.dirname(os.path.abspath(__file__))


def test_summary_from_model_bench_and_step_bench(tmp_path):
    assert (
        model_bench.main(
            [
                "--json",
                str(tmp_path / "model_bench.json"),
                "--depth",
                "11",
                "--batch",
                "2",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--no-bf16",
                "--variants",
                "plain",
                "dia_fused",
                "dia_reference",
            ]
        )
        == 0
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(HERE, "test_step_bench.py"),
            "-k",
            "reference-8x256x8x8-float32 and not compiled",
            f"--benchmark-json={tmp_path / 'step_bench.json'}",
        ],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=600,
        # the checkout's dia_fused, also where the package is not pip-installed
        env=dict(
            os.environ,
            PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        ),
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (tmp_path / "env.txt").write_text("gpu: none (CPU test)\n")
    text = summarize.summarize(str(tmp_path))
    assert (
        "| dia_fused (auto: train reference/reference/reference, "
        "infer reference/reference/reference) |"
        in text
        and "| plain | 1.00x" in text
    )
    assert "| dia_reference |" in text
    step_rows = [line for line in text.splitlines() if line.startswith("| 8x256x8x8 | float32 |")]
    assert {row.split(" | ")[2] for row in step_rows} == {"nchw"}
    assert {row.split(" | ")[3] for row in step_rows} == {"fwd", "fwd+bwd"}
    assert "gpu: none (CPU test)" in text


def test_missing_results_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        summarize.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert "neither model_bench.json nor step_bench*.json" in capsys.readouterr().err


def test_step_table_reports_bandwidth_and_the_model_ratio():
    def entry(impl, ms, **extra):
        info = dict(impl=impl, shape=[2, 8, 4, 4], dtype="torch.bfloat16", layout="channels_last")
        return {
            "name": "test_dia_step[x-fwd_bwd]",
            "extra_info": dict(info, per_call_ms=ms, **extra),
        }

    bench = {
        "benchmarks": [
            entry("reference", 2.0),
            entry(
                "triton",
                0.5,
                GB_per_s=1234.0,
                pct_peak_bandwidth=37.0,
                predicted_ms=0.25,
                measured_over_predicted=2.0,
            ),
        ]
    }
    (row,) = [line for line in summarize.step_table(bench) if line.startswith("| 2x8x4x4")]
    assert row == (
        "| 2x8x4x4 | bfloat16 | channels_last | fwd+bwd | 2.000 ms | 4.0x (0.500 ms) | "
        "1234 GB/s, 37% (triton) | 2.00 (250 us) |"
    )
