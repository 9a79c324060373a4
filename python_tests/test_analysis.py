"""The analysis figures on CPU: Gini importance (Figure 5) and stage-output gradients (Figure 6)."""
from __future__ import annotations

import os

import matplotlib.image
import numpy as np
import pytest
import torch

from dia_fused.analysis import gini, gradients
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
    h4 = 0.5 * h2 ** 2  # depends on h_2 only
    attention = np.stack([h1, h2, h3, h4], axis=1)  # (N, T, C)
    for mode in gini.FEATURE_MODES:
        matrix = gini.gini_importance(attention, mode=mode, n_estimators=30, seed=0)
        assert matrix.shape == (4, 4)
        assert np.isnan(matrix[0]).all() and np.isnan(np.triu(matrix + 1)[np.triu_indices(4)]
                                                       - 1).all()
        np.testing.assert_allclose(np.nansum(matrix[1:], axis=1), 1.0)
        assert matrix[2, 0] > 0.9, (mode, matrix)  # h_3 <- h_1
        assert matrix[3, 1] > 0.8, (mode, matrix)  # h_4 <- h_2
    with pytest.raises(ValueError, match="at least 2 blocks"):
        gini.gini_importance(attention[:, :1])


@pytest.mark.slow  # trains a small model, then renders the heatmaps
def test_gini_cli_renders_figure_5(tmp_path):
    ckpt_dir = tmp_path / "run"
    train_main(["-d", "synthetic", "--synthetic-size", "100", "--synthetic-classes", "10",
                "-a", "dia_resnet", "--depth", "20", "--epochs", "1", "--train-batch", "50",
                "--lr", "0.01", "--max-steps", "1", "--manualSeed", "2", "--device", "cpu",
                "--dia-stages", "1", "3", "-c", str(ckpt_dir)])
    png = tmp_path / "gini.png"
    result = analysis_main(["gini", str(ckpt_dir / "checkpoint.pth.tar"), "--images", "20",
                            "--batch-size", "10", "--trees", "10", "-o", str(png)])
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
    model = build_model({"name": "resnet20", "num_classes": 10,
                         "options": {"attention": "dia", "skip": False}}, backend="reference")
    inputs, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    values = gradients.stage_output_gradients(model, [(inputs, targets)],
                                              max_values_per_stage=10**9)
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
        np.testing.assert_allclose(np.sort(got), np.sort(want.abs().flatten().numpy()),
                                   rtol=1e-5, atol=1e-12)


def test_gradients_cli_renders_figure_6(tmp_path):
    png = tmp_path / "gradients.png"
    result = analysis_main(["gradients", "--synthetic-size", "20", "--batch-size", "8",
                            "--batches", "1", "--device", "cpu", "-o", str(png)])
    assert set(result["stats"]) == {"DIANet", "ResNet"}
    assert all(len(stages) == 3 for stages in result["stats"].values())
    assert all(s["mean"] > 0 and np.isfinite(s["std"]) for stages in result["stats"].values()
               for s in stages)
    assert png_shape(png) == (432, 1584, 4)
    saved = np.load(tmp_path / "gradients.npz")
    assert saved["DIANet_stage3"].size == 8 * 64 * 8 * 8
