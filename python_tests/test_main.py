"""`python -m dia_fused`: versions, the backends of each device with the reason for those that
cannot run, and each available backend checked against float64 and timed."""

import pytest
import torch

from dia_fused import ops
from dia_fused.__main__ import main


def test_no_check_lists_versions_knobs_and_every_backend(capsys):
    assert main(["--no-check"]) == 0
    out = capsys.readouterr().out
    for word in (
        "torch",
        "DIA_FUSED_BACKEND",
        "DIA_FUSED_TRITON_LSTM",
        "DIA_FUSED_AUTO_TABLE",
        "backends on cpu:",
        "reference  available",
    ):
        assert word in out
    for name in ops.BACKENDS:
        reason = ops.backend_unavailable_reason(name, "cpu")
        assert (f"{name:<10} unavailable: {reason}" if reason else f"{name:<10} available") in out


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the GPU check runs real shapes; bench/gpu_session.sh runs it"
)
def test_check_runs_every_available_cpu_backend_against_float64(capsys, monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    assert main([]) == 0
    out = capsys.readouterr().out
    backends = out.split("backends on cpu:")[1].splitlines()
    for name in ops.available_backends("cpu"):
        line = next(line for line in backends if line.strip().startswith(name + " "))
        assert "max error vs float64" in line and "forward+backward" in line, line
    assert (
        "backend='auto' on cpu (cuda > triton > reference): "
        "a training step N=8 C=64 16x16 fp32 runs reference" in out
    )


def test_malformed_backend_variable_is_one_error_line_before_any_output(capsys, monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "bogus")
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-check"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.splitlines() == [
        "error: DIA_FUSED_BACKEND: expected one of ('auto', 'reference', 'triton', 'cuda') "
        "(or unset), got 'bogus'"
    ]


def test_unknown_option_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--backend", "triton"])  # it has none: DIA_FUSED_BACKEND or the caller's argument
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.splitlines() == [
        "error: unrecognized arguments: --backend triton (see python -m dia_fused --help)"
    ]


def test_says_why_auto_leaves_the_interpreted_triton_out(capsys, monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    assert main(["--no-check"]) == 0
    out = capsys.readouterr().out
    interpreted = ops.backend_unavailable_reason("triton", "cpu") is None
    assert ("auto never picks" in out) == (interpreted and not torch.cuda.is_available())
    monkeypatch.setenv(ops.ENV_BACKEND, "reference")  # auto is what the variable says: no note
    assert main(["--no-check"]) == 0
    assert "auto never picks" not in capsys.readouterr().out


def test_names_the_state_of_the_cuda_extension(capsys):
    assert main(["--no-check"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "CUDA extension" in x)
    if torch.version.cuda is None:
        assert "a CPU build of torch" in line
    else:
        assert "dia_fused._C" in line
