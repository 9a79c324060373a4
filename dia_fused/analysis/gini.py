"""Figure 5 of the paper: random-forest Gini importance of h_1 .. h_{t-1} for h_t, per stage.

The DIA unit of a stage produces one attention vector h_t (N, C) per block t = 1..T (the hidden
state of its last LSTM cell, `model(x, return_attention=True)`). For every target block t >= 2 a
random forest (scikit-learn RandomForestRegressor) is fitted to predict h_t from the preceding
h_1 .. h_{t-1}; its Gini importance (mean decrease in impurity, `feature_importances_`) measures
how much of the prediction of h_t rests on each h_i. Row t of the stage's matrix holds the
importance of h_1 .. h_{t-1} (it sums to 1); entries on and above the diagonal are undefined.

How the features are formed (the paper's Appendix B gives the procedure as its Algorithm 1, whose
body is not in our copy of the paper; this is the direct reading of "take h_1..h_{t-1} as input
variables and h_t as output variable"):

* ``vector`` (default): one sample per image. Inputs: the concatenation [h_1, ..., h_{t-1}]
  (N, (t-1)*C); output: h_t (N, C), a multi-output regression (one forest predicts all C channels,
  the impurity decrease summed over them). The importance of variable h_i is the sum of the
  importances of its C input columns.
* ``channel``: one sample per (image, channel) pair. Inputs: the scalars h_1[c] .. h_{t-1}[c]
  (N*C, t-1); output: the scalar h_t[c]. Each h_i is then a single input column. This reads the
  per-channel recalibration as the quantity of interest and ignores cross-channel mixing.

Attention vectors are taken in eval mode (BatchNorm running statistics, no dropout) over the test
split, without augmentation.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

FEATURE_MODES = ("vector", "channel")


def _stage_samples(attention: np.ndarray, target: int, mode: str):
    """(X, y, groups): inputs, output and the input-column -> source-block map for target t
    (0-based `target` >= 1) of one stage's attention (N, T, C)."""
    n, _, channels = attention.shape
    sources = attention[:, :target, :]  # (N, t-1, C)
    if mode == "vector":
        x = sources.reshape(n, target * channels)
        y = attention[:, target, :]
        groups = np.repeat(np.arange(target), channels)
    elif mode == "channel":
        x = sources.transpose(0, 2, 1).reshape(n * channels, target)
        y = attention[:, target, :].reshape(n * channels)
        groups = np.arange(target)
    else:
        raise ValueError(f"mode: expected one of {FEATURE_MODES}, got {mode!r}")
    return x, y, groups


def gini_importance(
    attention: np.ndarray,
    mode: str = "vector",
    n_estimators: int = 100,
    max_features: Optional[float] = None,
    max_samples: Optional[int] = None,
    seed: int = 0,
    n_jobs: Optional[int] = None,
) -> np.ndarray:
    """The (T, T) importance matrix of one stage: [t, i] = Gini importance of h_{i+1} for
    h_{t+1}, for i < t (rows sum to 1 for t >= 1); NaN elsewhere, and on the rows of targets that
    are constant over the samples (nothing to predict).

    attention: (N, T, C) attention vectors of one stage. max_features: fraction of input columns
    tried per split (None: all, scikit-learn's default for regression). max_samples: subsample
    of rows per target (None: all), to bound the cost of the `channel` mode.
    """
    from sklearn.ensemble import RandomForestRegressor

    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim != 3:
        raise ValueError(f"attention: expected (N, T, C), got shape {attention.shape}")
    n, blocks, _ = attention.shape
    if blocks < 2:
        raise ValueError(
            f"attention: expected a stage of at least 2 blocks (T >= 2: h_1 is the "
            f"predecessor of h_2), got T = {blocks}"
        )
    if n < 2:
        raise ValueError(f"attention: expected at least 2 samples (images), got {n}")
    rng = np.random.default_rng(seed)
    matrix = np.full((blocks, blocks), np.nan)
    for target in range(1, blocks):
        x, y, groups = _stage_samples(attention, target, mode)
        if max_samples is not None and x.shape[0] > max_samples:
            keep = rng.choice(x.shape[0], size=max_samples, replace=False)
            x, y = x[keep], y[keep]
        if np.ptp(y, axis=0).max() == 0:
            continue  # a constant h_t (e.g. dead ReLUs in the reduction): nothing to explain, NaN
        forest = RandomForestRegressor(
            n_estimators=n_estimators,
            max_features=max_features,
            random_state=seed + target,
            n_jobs=n_jobs,
        )
        forest.fit(x, y)
        per_source = np.bincount(groups, weights=forest.feature_importances_, minlength=target)
        total = per_source.sum()
        # constant inputs give no split at all: all importances 0 (reported as such)
        matrix[target, :target] = per_source / total if total > 0 else 0.0
    return matrix


def plot_gini(
    matrices: Sequence[np.ndarray],
    path: str,
    titles: Optional[Sequence[str]] = None,
    suptitle: Optional[str] = None,
) -> str:
    """One heatmap per stage, side by side (Figure 5 layout: row = target h_t, column = source
    h_i, lower triangle). Written as PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(matrices)
    if count == 0:
        raise ValueError("matrices: expected at least one stage")
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count + 0.6, 4.2), squeeze=False)
    for k, (ax, matrix) in enumerate(zip(axes[0], matrices)):
        blocks = matrix.shape[0]
        # rows t = 2..T, columns i = 1..T-1: the defined part (h_1 has no predecessor)
        shown = np.ma.masked_invalid(matrix[1:, :-1])
        image = ax.imshow(shown, cmap="viridis", vmin=0.0, interpolation="nearest")
        ax.set_title(titles[k] if titles else f"stage {k + 1}")
        ax.set_xlabel("source layer $h_i$")
        ax.set_ylabel("target layer $h_t$")
        ticks = np.arange(blocks - 1)[:: max(1, (blocks - 1) // 9)]
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 2) for t in ticks])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_matrices(matrices: Sequence[np.ndarray], path: str, **meta) -> str:
    """The numbers behind the figure (.npz: stage1, stage2, ... and the metadata)."""
    arrays: Dict[str, np.ndarray] = {f"stage{k + 1}": m for k, m in enumerate(matrices)}
    arrays.update({k: np.asarray(v) for k, v in meta.items()})
    np.savez(path, **arrays)
    return path


def collect_attention(model, batches, max_images: Optional[int] = None) -> List[np.ndarray]:
    """Runs `model(x, return_attention=True)` in eval mode over `batches` (iterable of input
    tensors) and returns one (N, T, C) float array per DIA stage."""
    import torch

    model.eval()
    per_stage: List[List[np.ndarray]] = []
    seen = 0
    with torch.no_grad():
        for inputs in batches:
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                inputs = inputs[: max_images - seen]
            _, attention = model(inputs, return_attention=True)
            if not per_stage:
                per_stage = [[] for _ in attention]
            for store, a in zip(per_stage, attention):
                store.append(a.float().cpu().numpy())
            seen += inputs.shape[0]
    if not per_stage:
        raise ValueError("the model returned no attention (it has no DIA stage), or no data")
    return [np.concatenate(s) for s in per_stage]
