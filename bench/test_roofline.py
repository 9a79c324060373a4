"""bench/roofline.py as a program: the table covers every benchmark step of both backends, no
prediction beats the floor (the model cannot claim more than the bytes allow), and --check fails
exactly when a step's prediction exceeds CHECK_RATIO x its floor. Its byte counts are checked
against the Triton kernels in python_tests/test_triton_traffic.py."""

import pytest

import roofline
import test_step_bench


def test_table_covers_every_benchmark_step(capsys):
    assert roofline.main([]) == 0
    text = capsys.readouterr().out
    for step in roofline.benchmark_steps():
        for backend in ("triton", "cuda"):
            assert f"| {step.label()} | {backend} |" in text
    assert "model estimates, not measurements" in text


def test_no_prediction_beats_the_floor():
    for step in roofline.benchmark_steps():
        for backend in ("triton", "cuda"):
            assert roofline.row(step, backend).ratio >= 1.0, (step, backend)


@pytest.mark.parametrize("limit, code", [(1e9, 0), (1.0, 1)])
def test_check_exit_status_follows_the_ratio(monkeypatch, capsys, limit, code):
    monkeypatch.setattr(roofline, "CHECK_RATIO", limit)
    assert roofline.main(["--check", "--backend", "triton"]) == code
    assert "steps within" in capsys.readouterr().out


def test_benchmark_prediction_is_the_models_forward_plus_backward():
    step = roofline.Step(128, 256, 8, 8)
    forward = roofline.predict(roofline.triton_launches(step, False))
    backward = roofline.predict(roofline.triton_launches(step, True))
    got = test_step_bench.predicted_ms("triton_graph", step, True)
    assert got == pytest.approx((forward + backward) / 1e3)
    assert test_step_bench.predicted_ms("reference", step, True) is None
