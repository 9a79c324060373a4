"""CPU tests of the CUDA backend's Python side that need neither a GPU nor a compiler: the
availability reasons, the shared build settings, and the stacked-cell math the host wrapper runs
with ATen between cell 0 and the scale."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dia_fused import reference, settings
from dia_fused.kernels import cuda_build, cuda_dia_step
from dia_fused.testing import random_step_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unavailable_reason_names_the_device_and_the_fix():
    assert "CUDA devices only" in cuda_dia_step.unavailable_reason("cpu")
    reason = cuda_dia_step.unavailable_reason("cuda")
    if torch.version.cuda is None:
        assert "CPU-only build" in reason and "pip install --no-build-isolation ." in reason
    elif not torch.cuda.is_available():
        assert "no CUDA device" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_forward_without_cuda_raises_with_the_reason():
    inputs = random_step_inputs(1, 4, 2, 2, reduction=2)
    with pytest.raises(RuntimeError, match="cannot run on cpu: the cuda backend runs on CUDA"):
        cuda_dia_step.forward(*inputs.args(), None, False, "sigmoid", None)


def test_build_settings_load_without_torch():
    """setup.py loads cuda_build.py by path at build time, where torch may be absent."""
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torch'] = None\n"  # any import of torch now fails
        f"spec = importlib.util.spec_from_file_location('b', {cuda_build.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.SOURCES, m.default_arch_flags())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != cuda_build.ARCH_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "compute_80" in out.stdout and "sm_90" in out.stdout


def test_sources_are_found_and_complete():
    csrc = cuda_build.csrc_dir()
    assert csrc is not None
    for name in cuda_build.SOURCES + cuda_build.HEADERS:
        assert os.path.isfile(os.path.join(csrc, name))
    # CMakeLists.txt takes the list from cuda_build.py --cmake (run as CMake runs it) and keeps
    # no copy of its own
    run = subprocess.run(
        [sys.executable, cuda_build.__file__, "--cmake"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = {
        line.split()[0][4:]: line[:-1].split()[1:]
        for line in run.stdout.splitlines()
        if line.startswith("set(")
    }
    assert lines["DIA_FUSED_SOURCES"] == [f"csrc/{name}" for name in cuda_build.SOURCES]
    assert lines["DIA_FUSED_CUDA_ARCHITECTURES"] == ["80-real", "90"]
    for name in lines["DIA_FUSED_SOURCES"] + lines["DIA_FUSED_HEADERS"]:
        assert os.path.isfile(os.path.join(ROOT, name))
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        cmake = f.read()
    assert "/dia_fused/kernels/cuda_build.py" in cmake
    assert '"${DIA_FUSED_BUILD_SETTINGS}" --cmake' in cmake
    assert "add_library(dia_fused_objects OBJECT ${DIA_FUSED_SOURCES})" in cmake
    for name in cuda_build.SOURCES + ("80-real",):
        assert name not in cmake, f"CMakeLists.txt copies {name!r} from cuda_build.py"


def test_arch_list_env_defers_to_torch(monkeypatch):
    monkeypatch.setenv(cuda_build.ARCH_ENV, "9.0a")
    assert cuda_build.default_arch_flags() == []
    monkeypatch.delenv(cuda_build.ARCH_ENV)
    assert cuda_build.default_arch_flags() == cuda_build.arch_flags("8.0;9.0+PTX")


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_stacked_cells_match_reference_and_autograd(activation, dropout_p):
    """Cells 1..L-1 as the host wrapper runs them: forward equal to reference.dia_lstm_cells,
    hand-written backward equal to autograd through it (float64)."""
    inputs = random_step_inputs(4, 6, 1, 1, num_cells=3, dropout_p=dropout_p, seed=3).to(
        torch.float64
    )
    pooled = torch.randn(4, 6, dtype=torch.float64)
    h, c, weights, masks = inputs.h, inputs.c, inputs.weights, inputs.dropout_masks
    h_ref, c_ref = reference.dia_lstm_cells(pooled, h, c, weights, activation, masks)

    h_cell0 = h_ref[0].clone().requires_grad_()
    h_prev = h.clone().requires_grad_()
    c_prev = c.clone().requires_grad_()
    stacked_w = [w.clone().requires_grad_() for w in weights[8:]]
    fwd = cuda_dia_step.stacked_cells_forward(h_cell0, h_prev, c_prev, stacked_w, activation, masks)
    torch.testing.assert_close(torch.stack(fwd.h), h_ref[1:])
    torch.testing.assert_close(torch.stack(fwd.c), c_ref[1:])

    grad_h_new, grad_c_new = torch.randn_like(h), torch.randn_like(c)
    grad_attention = torch.randn_like(h[0])
    loss = (
        (torch.stack(fwd.h) * grad_h_new[1:]).sum()
        + (torch.stack(fwd.c) * grad_c_new[1:]).sum()
        + (fwd.h[-1] * grad_attention).sum()
        + (h_cell0 * grad_h_new[0]).sum()
    )
    expected = torch.autograd.grad(loss, [h_cell0, h_prev, c_prev, *stacked_w])

    got_h0, got_h_prev, got_c_prev, got_w = cuda_dia_step.stacked_cells_backward(
        fwd, h, c, weights[8:], activation, masks, grad_h_new, grad_c_new, grad_attention
    )
    torch.testing.assert_close(got_h0, expected[0])
    torch.testing.assert_close(torch.stack(got_h_prev), expected[1][1:])
    torch.testing.assert_close(torch.stack(got_c_prev), expected[2][1:])
    for got, want in zip(got_w, expected[3:]):
        torch.testing.assert_close(got, want)


def test_stacked_backward_without_state_grads():
    inputs = random_step_inputs(2, 4, 1, 1, num_cells=2, seed=1).to(torch.float64)
    h_cell0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    fwd = cuda_dia_step.stacked_cells_forward(
        h_cell0, inputs.h, inputs.c, inputs.weights[8:], "sigmoid", None
    )
    grad_attention = torch.randn(2, 4, dtype=torch.float64)
    (expected,) = torch.autograd.grad((fwd.h[-1] * grad_attention).sum(), [h_cell0])
    got = cuda_dia_step.stacked_cells_backward(
        fwd, inputs.h, inputs.c, inputs.weights[8:], "sigmoid", None, None, None, grad_attention
    )[0]
    torch.testing.assert_close(got, expected)


def test_path_names_are_checked(monkeypatch):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="path: expected one of"):
        cuda_dia_step.KernelSettings(path="fast")
    with pytest.raises(ValueError, match="path='fused' needs num_cells == 1"):
        cuda_dia_step._fused_path("fused", x, 2, 2)
    with pytest.raises(TypeError, match="settings: expected a KernelSettings, got str"):
        with cuda_dia_step.use_settings("fused"):
            pass


def test_path_default_comes_from_the_environment_at_each_call(monkeypatch):
    monkeypatch.delenv(settings.ENV_CUDA_PATH, raising=False)
    assert cuda_dia_step.current_settings().path == "auto"
    monkeypatch.setenv(settings.ENV_CUDA_PATH, "split")
    assert cuda_dia_step.current_settings().path == "split"
    with cuda_dia_step.use_settings(cuda_dia_step.KernelSettings(path="fused")):
        assert cuda_dia_step.current_settings().path == "fused"
    assert cuda_dia_step.current_settings().path == "split"
    monkeypatch.setenv(settings.ENV_CUDA_PATH, "fast")
    with pytest.raises(ValueError, match="DIA_FUSED_CUDA_PATH: expected one of"):
        cuda_dia_step.current_settings()


def test_the_constants_header_is_generated_from_cuda_build():
    """csrc/dia_step_constants.h holds what cuda_build.py says (regenerate it with
    `python dia_fused/kernels/cuda_build.py --header` after changing a number there)."""
    with open(os.path.join(cuda_build.csrc_dir(), cuda_build.CONSTANTS_HEADER)) as f:
        assert f.read() == cuda_build.constants_header()


def test_a_failed_build_is_reported_and_can_be_retried(monkeypatch):
    monkeypatch.setattr(cuda_dia_step, "_extension", None)
    monkeypatch.setattr(cuda_dia_step, "_load_error", None)
    monkeypatch.setattr(cuda_dia_step, "_jit_blocker", lambda: "no CUDA toolkit (test)")
    assert cuda_dia_step._load() is None
    monkeypatch.setattr(cuda_dia_step, "_jit_blocker", lambda: "no ninja (test)")
    assert cuda_dia_step._load() is None and cuda_dia_step._load_error.startswith("no CUDA toolkit")
    assert cuda_dia_step.reset_build().startswith("no CUDA toolkit (test)")
    assert cuda_dia_step._load() is None and cuda_dia_step._load_error.startswith("no ninja (test)")
