"""The analysis figures on CPU: Gini importance (Figure 5) and stage-output gradients (Figure 6)."""

from __future__ import annotations

import os

import matplotlib.image
import numpy as np
import pytest
import torch

from dia_fused.analysis import gini, gradients
from dia_fused.analysis.cli import console_main
from dia_fused.analysis.cli import main as analysis_main
from dia_fused.train.cli import main as train_main
from dia_fused.train.modelspec import build_model


def png_shape(path):
    assert os.path.getsize(path) > 5000  # a real picture, not an empty canvas
    return matplotlib.image.imread(path).shape


def test_gini_importance_finds_the_true_predecessor():
    rng = np.random.default_rng(0)
    n, channels = 400, 4
    h1, h2 = rng.uniform(size=(n, channels)), rng.uniform(size=(n, channels))
    h3 = np.tanh(3 * h1)  # depends on h_1 only
    h4 = 0.5 * h2**2  # depends on h_2 only
    attention = np.stack([h1, h2, h3, h4], axis=1)  # (N, T, C)
    for mode in gini.FEATURE_MODES:
        matrix = gini.gini_importance(attention, mode=mode, n_estimators=30, seed=0)
        assert matrix.shape == (4, 4)
        assert (
            np.isnan(matrix[0]).all()
            and np.isnan(np.triu(matrix + 1)[np.triu_indices(4)] - 1).all()
        )
        np.testing.assert_allclose(np.nansum(matrix[1:], axis=1), 1.0)
        assert matrix[2, 0] > 0.9, (mode, matrix)  # h_3 <- h_1
        assert matrix[3, 1] > 0.8, (mode, matrix)  # h_4 <- h_2
    with pytest.raises(ValueError, match="at least 2 blocks"):
        gini.gini_importance(attention[:, :1])


@pytest.mark.slow  # trains a small model, then renders the heatmaps
def test_gini_cli_renders_figure_5(tmp_path):
    ckpt_dir = tmp_path / "run"
    train_main(
        [
            "-d",
            "synthetic",
            "--synthetic-size",
            "100",
            "--synthetic-classes",
            "10",
            "-a",
            "dia_resnet",
            "--depth",
            "20",
            "--epochs",
            "1",
            "--train-batch",
            "50",
            "--lr",
            "0.01",
            "--max-steps",
            "1",
            "--manualSeed",
            "2",
            "--device",
            "cpu",
            "--dia-stages",
            "1",
            "3",
            "-c",
            str(ckpt_dir),
        ]
    )
    png = tmp_path / "gini.png"
    result = analysis_main(
        [
            "gini",
            str(ckpt_dir / "checkpoint.pth.tar"),
            "--images",
            "20",
            "--batch-size",
            "10",
            "--trees",
            "10",
            "-o",
            str(png),
        ]
    )
    assert len(result["matrices"]) == 2 and result["titles"] == ["stage 1", "stage 3"]
    for matrix, attention in zip(result["matrices"], result["attention"]):
        assert attention.shape[:2] == (20, 3) and matrix.shape == (3, 3)  # 3 blocks per stage
        varies = np.ptp(attention, axis=0).max(axis=1) > 0  # per block t
        for t in (1, 2):
            # a barely trained unit can have dead ReLUs and a constant h_t
            if not varies[t]:
                assert np.isnan(matrix[t]).all()  # nothing to explain
            elif not varies[:t].any():
                assert (matrix[t, :t] == 0).all()  # nothing to explain it with
            else:
                assert matrix[t, :t].sum() == pytest.approx(1.0)
    assert png_shape(png) == (504, 1080, 4)  # 2 panels at 120 dpi
    saved = np.load(tmp_path / "gini.npz")
    np.testing.assert_array_equal(saved["stage2"], result["matrices"][1])
    assert list(saved["titles"]) == ["stage 1", "stage 3"]


def test_stage_output_gradients_are_the_gradients_of_the_stage_outputs():
    torch.manual_seed(0)
    model = build_model(
        {"name": "resnet20", "num_classes": 10, "options": {"attention": "dia", "skip": False}},
        backend="reference",
    )
    inputs, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    values = gradients.stage_output_gradients(
        model, [(inputs, targets)], max_values_per_stage=10**9
    )
    # independent check: keep the stage outputs and ask autograd for their gradients
    outputs = []
    handles = [s.register_forward_hook(lambda m, i, o: outputs.append(o)) for s in model.stages]
    model.train()
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    expected = torch.autograd.grad(loss, outputs)
    for h in handles:
        h.remove()
    assert [v.size for v in values] == [4 * 16 * 32 * 32, 4 * 32 * 16 * 16, 4 * 64 * 8 * 8]
    for got, want in zip(values, expected):
        np.testing.assert_allclose(
            np.sort(got), np.sort(want.abs().flatten().numpy()), rtol=1e-5, atol=1e-12
        )


@pytest.mark.slow  # ResNet-56 twice; resnet8 runs the same command in the default set (below)
def test_gradients_cli_renders_figure_6(tmp_path):
    png = tmp_path / "gradients.png"
    result = analysis_main(
        [
            "gradients",
            "--synthetic-size",
            "20",
            "--batch-size",
            "8",
            "--batches",
            "1",
            "--device",
            "cpu",
            "-o",
            str(png),
        ]
    )
    assert set(result["stats"]) == {"DIANet", "ResNet"}
    assert all(len(stages) == 3 for stages in result["stats"].values())
    assert all(
        s["mean"] > 0 and np.isfinite(s["std"])
        for stages in result["stats"].values()
        for s in stages
    )
    assert png_shape(png) == (432, 1584, 4)
    saved = np.load(tmp_path / "gradients.npz")
    assert saved["DIANet_stage3"].size == 8 * 64 * 8 * 8


# ---------------------------------------------------------------------------------------------
# output path and what the gradients figure shows
# ---------------------------------------------------------------------------------------------

GRADIENT_ARGS = [
    "gradients",
    "--arch",
    "resnet8",
    "--synthetic-size",
    "20",
    "--batch-size",
    "4",
    "--batches",
    "1",
    "--device",
    "cpu",
    "--backend",
    "reference",
]


# user errors are AnalysisError, a ValueError: matched as such (with their message) so that the
# tests also run against the code before it


def _no_work(monkeypatch):
    """Makes the computation fail loudly: an output error must come before it."""

    def work(*args, **kwargs):
        raise AssertionError("the computation ran before the output path was checked")

    monkeypatch.setattr(gradients, "stage_output_gradients", work)
    monkeypatch.setattr(gini, "collect_attention", work)


def test_output_into_a_missing_folder_is_created(tmp_path):
    png = tmp_path / "new" / "sub" / "gradients.png"
    result = analysis_main(GRADIENT_ARGS + ["-o", str(png)])
    assert png.is_file() and (tmp_path / "new" / "sub" / "gradients.npz").is_file()
    assert result["png"] == str(png)


def test_unwritable_output_fails_before_the_work(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write into the folder"):
        analysis_main(GRADIENT_ARGS + ["-o", str(blocker / "gradients.png")])
    with pytest.raises(ValueError, match="is a folder"):
        analysis_main(GRADIENT_ARGS + ["-o", str(tmp_path)])
    # gini: before the checkpoint is even read
    with pytest.raises(ValueError, match="cannot write into the folder"):
        analysis_main(["gini", str(tmp_path / "none.pth.tar"), "-o", str(blocker / "g.png")])


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders"
)
def test_read_only_output_folder_fails_before_the_work(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write into the folder"):
            analysis_main(GRADIENT_ARGS + ["-o", str(folder / "gradients.png")])
    finally:
        folder.chmod(0o755)


def _checkpoint(path, name, options, num_classes=100):
    """A checkpoint as python -m dia_fused.train writes it, of freshly initialised weights."""
    from dia_fused.train import checkpoint as ckpt_io

    spec = {"name": name, "num_classes": num_classes, "options": options}
    model = build_model(spec, backend="reference")
    ckpt_io.atomic_save({"state_dict": model.state_dict(), "model": spec, "epoch": 3}, str(path))
    return str(path)


def test_gradients_says_what_it_plots(tmp_path, capsys):
    result = analysis_main(GRADIENT_ARGS + ["-o", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert "DIANet untrained" in out and "ResNet untrained" in out and "Figure 6" in out
    assert "untrained" in result["title"] and "without skip connections" in result["title"]
    dia = _checkpoint(
        tmp_path / "dia.pth.tar", "resnet8", {"block": "basic", "attention": "dia", "skip": False}
    )
    result = analysis_main(GRADIENT_ARGS + ["-o", str(tmp_path / "g.png"), "--dia-checkpoint", dia])
    assert result["states"]["DIANet"] == "trained (dia.pth.tar, epoch 3)"
    assert result["states"]["ResNet"].startswith("untrained")
    assert "DIANet trained" in result["title"]


@pytest.mark.parametrize(
    "name, options, flag, message",
    [
        (
            "resnet14",
            {"attention": "dia", "skip": False},
            "--dia-checkpoint",
            "depth 14 .expected 8",
        ),
        ("resnet8", {"attention": "dia"}, "--dia-checkpoint", "skip True .expected False"),
        (
            "resnet8",
            {"attention": "dia", "skip": False},
            "--plain-checkpoint",
            "attention 'dia' .expected 'none'",
        ),
    ],
)
def test_gradients_refuses_a_checkpoint_of_another_network(tmp_path, name, options, flag, message):
    path = _checkpoint(tmp_path / "other.pth.tar", name, options)
    with pytest.raises(ValueError, match=f"{flag} .*another network.*{message}") as err:
        analysis_main(GRADIENT_ARGS + ["-o", str(tmp_path / "g.png"), flag, path])
    assert "\n" not in str(err.value)


def test_gradients_checkpoint_error_is_one_line_on_the_command_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = _checkpoint(tmp_path / "deep.pth.tar", "resnet14", {"attention": "dia", "skip": False})
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia_fused.analysis",
            *GRADIENT_ARGS,
            "-o",
            str(tmp_path / "g.png"),
            "--dia-checkpoint",
            path,
        ],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dia-checkpoint")


# ---------------------------------------------------------------------------------------------
# the command line: one error line (exit status 2) before any work, outputs next to checkpoints
# ---------------------------------------------------------------------------------------------


def _console_error(argv, capsys):
    """The one stderr line and exit status of `python -m dia_fused.analysis argv`, in process."""
    with pytest.raises(SystemExit) as exit_info:
        console_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return exit_info.value.code, lines[0]


def test_gini_without_scikit_learn_names_the_extra_in_one_line(tmp_path):
    """Run as a user would, with scikit-learn hidden: the install line, before any work (the
    checkpoint does not even exist)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hide = "import sys; sys.modules['sklearn'] = None; import runpy; "
    run = "runpy.run_module('dia_fused.analysis', run_name='__main__', alter_sys=True)"
    proc = subprocess.run(
        [sys.executable, "-c", hide + run, "gini", str(tmp_path / "none.pth.tar")],
        env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: python -m dia_fused.analysis gini needs scikit-learn")
    assert lines[0].endswith('pip install "dia_fused[analysis]"')
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_are_named_before_any_work(tmp_path, monkeypatch, capsys):
    import sys

    _no_work(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, line = _console_error(GRADIENT_ARGS + ["-o", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "gradients needs matplotlib" in line and "dia_fused[analysis]" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gini", "{tmp}/none.pth.tar"], "error: checkpoint: no file at"),
        (GRADIENT_ARGS, "error: -o: without --dia-checkpoint or --plain-checkpoint"),
        (GRADIENT_ARGS + ["-o", "{tmp}/g.png", "--batches", "0"], "--batches: expected >= 1"),
        (GRADIENT_ARGS + ["-o", "{tmp}/g.png", "--device", "bogus"], "error: --device bogus"),
        (["gini"], "required: checkpoint"),
        (["gini", "{tmp}/x.pth.tar", "--mode", "bogus"], "--mode: invalid choice"),
    ],
)
def test_bad_input_is_one_error_line_with_exit_status_2(
    argv, message, tmp_path, monkeypatch, capsys
):
    _no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code, line = _console_error([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2 and message in line, line
    assert list(tmp_path.iterdir()) == []


def test_gini_checkpoint_without_a_model_description_is_one_line(tmp_path, monkeypatch, capsys):
    from dia_fused.train import checkpoint as ckpt_io

    _no_work(monkeypatch)
    path = tmp_path / "bare.pth.tar"
    ckpt_io.atomic_save({"state_dict": {}}, str(path))
    code, line = _console_error(["gini", str(path)], capsys)
    assert code == 2 and "no model description" in line


def test_gradients_writes_next_to_the_checkpoint_not_into_the_current_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    dia = _checkpoint(
        run / "dia.pth.tar", "resnet8", {"block": "basic", "attention": "dia", "skip": False}
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = analysis_main(GRADIENT_ARGS + ["--dia-checkpoint", dia])
    assert result["png"] == str(run / "gradients.png")
    assert (run / "gradients.png").is_file() and (run / "gradients.npz").is_file()
    assert list(cwd.iterdir()) == []
