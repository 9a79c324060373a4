"""Adapter for pytorchcv 0.0.74's DIA models: CIFARDIAResNet, CIFARDIAPreResNet (diaresnet*_cifar*,
diapreresnet*_cifar*, *_svhn) and the ImageNet DIAResNet, DIAPreResNet (diaresnet*,
diapreresnet*).

A stage is `features.stageN`; each residual unit (DIAResUnit, DIAPreResUnit) holds the stage's one
`attention` (DIAAttention: `pool`, `lstm` = DIALSTMCell with x_amps.amp1.fc1 ... and dropout) and
passes the LSTM state (lists of h and c per cell) to the next unit. DIAResUnit applies `activ`
(ReLU) after the residual add; DIAPreResUnit nothing. Every unit lists the shared attention in
its state_dict (the EMA caveat of the README).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .base import (
    LSTMLayout,
    StepPlan,
    check_global_pool,
    check_relu,
    current_plan,
    fused_mixin,
    hooks_on_bypassed,
    lstm_layout,
    lstm_weights,
    original_class,
    source_step,
)

NAME = "pytorchcv"
# top-level class -> its residual unit class
MODELS = {
    "CIFARDIAResNet": "DIAResUnit",
    "DIAResNet": "DIAResUnit",
    "CIFARDIAPreResNet": "DIAPreResUnit",
    "DIAPreResNet": "DIAPreResUnit",
}
SUPPORTED = (
    "pytorchcv DIA models (CIFARDIAResNet, CIFARDIAPreResNet, DIAResNet, DIAPreResNet: "
    "diaresnet*, diapreresnet*)"
)
ATTENTION_TYPES = ("DIAAttention",)  # modules whose `lstm` is a stage's LSTM
LSTM_TYPES = ("DIALSTMCell",)


def recognises(model: nn.Module) -> bool:
    return type(model).__name__ in MODELS


def name_only_match(model: nn.Module) -> bool:
    return False


def plan(model: nn.Module, backend: str, keep_rng_stream: bool):
    """[(residual unit, mixin, StepPlan)] for every unit, or raises naming the module."""
    kind = type(model).__name__
    unit_class = MODELS[kind]
    result, stages = [], {}
    for name, module in model.named_modules():
        if type(module).__name__ != unit_class:
            continue
        lstm = getattr(getattr(module, "attention", None), "lstm", None)
        stage = stages.setdefault(id(lstm), name.rpartition(".")[0] or name)
        plan_ = plan_unit(module, f"model.{name}", stage, backend, keep_rng_stream)
        mixin = FusedPreResUnit if plan_.source == "DIAPreResUnit" else FusedResUnit
        result.append((module, mixin, plan_))
    if not result:
        raise ValueError(f"model: a pytorchcv {kind} without {unit_class} units")
    return result


def plan_unit(module, name: str, stage: str, backend: str, keep_rng_stream: bool) -> StepPlan:
    unit_class = original_class(module).__name__
    attention = getattr(module, "attention", None)
    if type(attention).__name__ != "DIAAttention" or not hasattr(attention, "lstm"):
        raise ValueError(
            f"{name}.attention: expected a pytorchcv DIAAttention, got {type(attention).__name__}"
        )
    for attr in ("body", "resize_identity"):
        if not hasattr(module, attr):
            raise ValueError(f"{name}: a pytorchcv {unit_class} without `{attr}`")
    if module.resize_identity and not isinstance(getattr(module, "identity_conv", None), nn.Module):
        raise ValueError(f"{name}: resize_identity is set but identity_conv is missing")
    check_global_pool(getattr(attention, "pool", None), f"{name}.attention.pool")
    relu = unit_class == "DIAResUnit"  # DIAPreResUnit: no activation after the residual add
    if relu:
        check_relu(getattr(module, "activ", None), f"{name}.activ")
    paths, num_cells, channels = lstm_layout(
        attention.lstm, f"{name}.attention.lstm", LSTM_LAYOUT, _check_first_amps
    )
    if getattr(attention, "num_layers", num_cells) != num_cells:
        raise ValueError(
            f"{name}.attention: num_layers {attention.num_layers} but its lstm has {num_cells} "
            f"cells"
        )
    parts = [(("attention",), attention), (("attention", "lstm"), attention.lstm)]
    parts.append((("attention", "pool"), attention.pool))
    if relu:
        parts.append((("activ",), module.activ))
    return StepPlan(
        stage,
        paths,
        num_cells,
        channels,
        relu,
        backend,
        keep_rng_stream,
        parts=tuple(parts),
        bypassed=(("attention",),) + ((("activ",),) if relu else ()),
        source=unit_class,
    )


LSTM_LAYOUT = LSTMLayout(
    description="pytorchcv's DIALSTMCell (x_amps, h_amps: Sequentials of num_layers amplifiers, "
    "dropout: nn.Dropout)",
    sides=("x_amps", "h_amps"),
    container=nn.Sequential,
    count="num_layers",
    first_cell=(("amp1", "fc1"), ("amp1", "fc2")),  # FirstLSTMAmp
    stacked_cell=lambda cell: f"amp{cell + 1}",
)


def _check_first_amps(lstm, name: str) -> None:
    first = lstm.x_amps.amp1 if hasattr(lstm.x_amps, "amp1") else None
    if first is None or not isinstance(getattr(first, "fc1", None), nn.Linear):
        raise ValueError(f"{name}.x_amps.amp1: expected FirstLSTMAmp (fc1, activ, fc2)")
    for path in LSTM_LAYOUT.sides:
        amp = getattr(getattr(lstm, path), "amp1", None)
        if not isinstance(getattr(amp, "activ", None), nn.ReLU):
            raise ValueError(f"{name}.{path}.amp1: expected FirstLSTMAmp (fc1, ReLU activ, fc2)")


def lstm_state(lstm):
    """A DIALSTMCell's state dict renamed to the official LSTMCell keys (DIALSTM's)."""
    renamed = {}
    for key, value in lstm.state_dict().items():
        path, amp, *rest = key.split(".")  # x_amps.amp1.fc1.weight / x_amps.amp2.weight
        target = {"x_amps": "w_ih", "h_amps": "w_hh"}[path]
        cell = int(amp[len("amp") :]) - 1
        if cell == 0:
            renamed[f"{target}.0.seq.{0 if rest[0] == 'fc1' else 2}.{rest[1]}"] = value
        else:
            renamed[f"{target}.{cell}.{rest[0]}"] = value
    return renamed


def _state(hc):
    """pytorchcv passes (list of h per cell, list of c per cell); a fused unit passes tensors."""
    if hc is None:
        return None
    h, c = hc
    return (
        h if isinstance(h, torch.Tensor) else torch.stack(list(h)),
        c if isinstance(c, torch.Tensor) else torch.stack(list(c)),
    )


def _replan(unit, plan_: StepPlan) -> StepPlan:
    """After a swapped attention / LSTM / activation, in a replica."""
    name = f"a unit of {plan_.stage}"
    return plan_unit(unit, name, plan_.stage, plan_.backend, plan_.keep_rng_stream)


@fused_mixin
class FusedResUnit:
    """pytorchcv DIAResUnit: identity, body, then the fused step (post-activation). A hook on the
    attention (or inside it) or on `activ` runs the source forward."""

    def forward(self, x, hc=None):
        plan_ = current_plan(self, _replan)
        if hooks_on_bypassed(self, plan_):
            return original_class(self).forward(self, x, hc)
        identity = self.identity_conv(x) if self.resize_identity else x
        x = self.body(x)
        lstm = self.attention.lstm
        # the state goes on as (h, c) tensors of (cells, N, C): h[i], h[-1] index like
        # pytorchcv's lists
        return source_step(lstm, plan_, lstm_weights(lstm, plan_), x, identity, _state(hc))


@fused_mixin
class FusedPreResUnit:
    """pytorchcv DIAPreResUnit: body (and its pre-activation), identity, then the fused step."""

    def forward(self, x, hc=None):
        plan_ = current_plan(self, _replan)
        if hooks_on_bypassed(self, plan_):
            return original_class(self).forward(self, x, hc)
        identity = x
        x, x_pre_activ = self.body(x)
        if self.resize_identity:
            identity = self.identity_conv(x_pre_activ)
        lstm = self.attention.lstm
        return source_step(lstm, plan_, lstm_weights(lstm, plan_), x, identity, _state(hc))


def convert_target(model: nn.Module, common: dict):
    """(the dia_fused model with `model`'s architecture and `common` options, input size)."""
    from ..models.networks import IMAGENET_LAYERS, cifar_preresnet, cifar_resnet, imagenet_resnet

    kind = type(model).__name__
    if kind == "DIAPreResNet":
        raise TypeError(
            "model: expected an official DIANet (ResNet, PreResNet, WideResNet, CifarResNeXt) or "
            "a pytorchcv DIA model (CIFARDIAResNet, CIFARDIAPreResNet, DIAResNet), got "
            "DIAPreResNet (pytorchcv's ImageNet DIA-PreResNet has no dia_fused equivalent; "
            "accelerate it instead)"
        )
    stages = [m for n, m in model.features.named_children() if n.startswith("stage")]
    counts = [len(list(s.children())) for s in stages]
    first = next(iter(stages[0].children()))
    bottleneck = hasattr(first.body, "conv3")
    block = "bottleneck" if bottleneck else "basic"
    num_classes = model.output.out_features
    second = next(iter(stages[1].children()))
    stride_in_1x1 = bottleneck and second.body.conv1.conv.stride == (2, 2)
    if kind == "DIAResNet":
        depth = next(
            (
                d
                for d, (b, layers) in IMAGENET_LAYERS.items()
                if list(layers) == counts and b == block
            ),
            None,
        )
        if depth is None:
            raise ValueError(
                f"model: pytorchcv DIAResNet with stage sizes {counts} has no dia_fused ImageNet "
                f"equivalent (depths {sorted(IMAGENET_LAYERS)})"
            )
        return (
            imagenet_resnet(depth, num_classes, stride_in_1x1=stride_in_1x1, **common),
            (1, 3, 224, 224),
        )
    depth = counts[0] * (9 if bottleneck else 6) + 2
    if kind == "CIFARDIAResNet":
        return (
            cifar_resnet(depth, num_classes, block=block, stride_in_1x1=stride_in_1x1, **common),
            (1, 3, 32, 32),
        )
    return (
        cifar_preresnet(
            depth, num_classes, block=block, extra_norm=False, shortcut_from_preact=True, **common
        ),
        (1, 3, 32, 32),
    )


SHORTCUT_NAME = "identity_conv"  # a unit's projection shortcut


def layer_order(layers):
    """The conv/norm/linear layers [(name, module)] in the order a forward ran them, in dia_fused's
    order: pytorchcv runs a unit's shortcut before its body, dia_fused after, so each unit's
    shortcut layers move after the unit's other layers."""
    result, pending = [], []
    for name, module in layers:
        if f".{SHORTCUT_NAME}" in name:
            pending.append((name, module))
            continue
        if pending and not name.startswith(_unit_prefix(pending[0][0])):
            result += pending
            pending = []
        result.append((name, module))
    return result + pending


def _unit_prefix(name: str) -> str:
    """'features.stage1.unit1.identity_conv.conv' -> 'features.stage1.unit1.'."""
    match = re.match(r"^(.*?unit\d+)\.", name)
    return match.group(1) + "." if match else name
