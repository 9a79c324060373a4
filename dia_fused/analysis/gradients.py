"""Figure 6 of the paper: the distribution of |gradient| at the output tensor of each stage of a
ResNet-56 with every skip connection removed, with and without the DIA unit.

The gradient of the loss with respect to each stage's output is captured by a forward hook on
`model.stages[i]` that registers a tensor hook on the output. The loss is the mean cross-entropy
of a batch in training mode (batch statistics in BatchNorm, as during training); the absolute
values of all gradient entries over all batches form the histogram of a stage.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor


def stage_output_gradients(
    model: nn.Module,
    batches: Iterable[Tuple[Tensor, Tensor]],
    max_values_per_stage: int = 200_000,
    seed: int = 0,
) -> List[np.ndarray]:
    """|dL/d(stage output)| per stage of `model` (which has `model.stages`), over `batches` of
    (inputs, targets). At most `max_values_per_stage` values are kept per stage (a uniform random
    subset when there are more), so the figure of a large run stays cheap to draw."""
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        raise TypeError(f"model: expected a `stages` nn.ModuleList, got {type(stages).__name__}")
    captured: List[List[Tensor]] = [[] for _ in stages]

    def make_hook(index: int):
        def forward_hook(module, inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if tensor.requires_grad:
                tensor.register_hook(
                    lambda grad: captured[index].append(grad.detach().abs().flatten().float().cpu())
                )

        return forward_hook

    handles = [stage.register_forward_hook(make_hook(i)) for i, stage in enumerate(stages)]
    criterion = nn.CrossEntropyLoss()
    model.train()
    try:
        for inputs, targets in batches:
            model.zero_grad(set_to_none=True)
            criterion(model(inputs), targets).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    rng = np.random.default_rng(seed)
    out = []
    for index, parts in enumerate(captured):
        if not parts:
            raise RuntimeError(f"stage {index + 1}: no gradient reached its output")
        values = torch.cat(parts).numpy()
        if values.size > max_values_per_stage:
            values = rng.choice(values, size=max_values_per_stage, replace=False)
        out.append(values)
    return out


def summarize(values: np.ndarray) -> Dict[str, float]:
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


def plot_gradients(
    series: Dict[str, Sequence[np.ndarray]],
    path: str,
    bins: int = 60,
    colors: Dict[str, str] = None,
    title: Optional[str] = None,
) -> str:
    """One panel per stage; one histogram per model (label -> per-stage |grad| arrays), on a
    log-spaced |gradient| axis shared by the models of a panel, under `title` (what the models
    are: trained or not, with or without skips). PNG, Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(series)
    if not labels:
        raise ValueError("series: expected at least one model")
    stage_count = len(series[labels[0]])
    if any(len(series[k]) != stage_count for k in labels):
        raise ValueError("series: every model must have the same number of stages")
    colors = colors or {}
    fig, axes = plt.subplots(1, stage_count, figsize=(4.4 * stage_count, 3.6), squeeze=False)
    for stage, ax in enumerate(axes[0]):
        arrays = [np.asarray(series[k][stage], dtype=np.float64) for k in labels]
        positive = np.concatenate([a[a > 0] for a in arrays])
        if positive.size == 0:
            edges = np.linspace(0, 1, bins + 1)
        else:
            low, high = np.log10(positive.min()), np.log10(positive.max())
            edges = np.logspace(low, high if high > low else low + 1, bins + 1)
            ax.set_xscale("log")
        for label, values in zip(labels, arrays):
            stats = summarize(values)
            zeros = 100.0 * np.mean(values == 0)  # off the log axis: said in the legend
            ax.hist(
                values[values > 0] if positive.size else values,
                bins=edges,
                alpha=0.55,
                color=colors.get(label),
                label=f"{label}: mean {stats['mean']:.2e}, std {stats['std']:.2e}, "
                f"{zeros:.0f}% zero",
            )
        ax.set_title(f"stage {stage + 1} output")
        ax.set_xlabel("|gradient|")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
