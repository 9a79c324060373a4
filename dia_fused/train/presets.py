"""The paper's CIFAR hyperparameters (Appendix A, table 1) as --preset defaults.

A preset only changes argument defaults: any flag given explicitly on the command line wins
(e.g. `--preset resnet164 -a resnet` trains the plain ResNet-164 with the DIANet-164 recipe).
Values follow the appendix and the official run_code.py: all use batch 128, SGD momentum 0.9,
lr 0.1.
"""

from __future__ import annotations

from typing import Any, Dict

_COMMON = {"train_batch": 128, "momentum": 0.9, "lr": 0.1}

PRESETS: Dict[str, Dict[str, Any]] = {
    "resnet164": dict(
        _COMMON,
        arch="dia_resnet",
        depth=164,
        block_name="Bottleneck",
        epochs=180,
        schedule=[60, 120],
        gamma=0.1,
        weight_decay=1e-4,
    ),
    "preresnet164": dict(
        _COMMON,
        arch="dia_preresnet",
        depth=164,
        block_name="Bottleneck",
        epochs=164,
        schedule=[81, 122],
        gamma=0.1,
        weight_decay=1e-4,
    ),
    "wrn52_4": dict(
        _COMMON,
        arch="dia_wrn",
        depth=52,
        widen_factor=4,
        drop=0.3,
        epochs=200,
        schedule=[80, 120, 160],
        gamma=0.2,
        weight_decay=5e-4,
    ),
    "resnext101_8x32": dict(
        _COMMON,
        arch="dia_resnext",
        depth=101,
        cardinality=8,
        widen_factor=4,
        epochs=300,
        schedule=[150, 225],
        gamma=0.1,
        weight_decay=5e-4,
    ),
}
