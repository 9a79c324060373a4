"""Adapter for the official DIANet CIFAR code (gbup-group/DIANet models/cifar): ResNet and
PreResNet with Bottleneck blocks, WideResNet, CifarResNeXt.

A stage is an `Attention` module: `ModuleList` of residual blocks returning (branch, residual),
`lstm` (the official `LSTMCell`: w_ih.0.seq.0 ... for cell 0, w_ih.1 ... for stacked cells,
dropout), `GlobalAvg` (the pooling) and `relu` (after the residual add, where the file uses it).
"""

from __future__ import annotations

from torch import nn

from .base import (
    StepPlan,
    check_global_pool,
    check_linear,
    check_relu,
    fused_mixin,
    hooks_on_bypassed,
    lstm_weights,
    original_class,
    plan_is_current,
    source_step,
)

NAME = "official DIANet"
# top-level class -> (stage attributes, residual block class, ReLU after the residual add)
MODELS = {
    "ResNet": (("layer1", "layer2", "layer3"), "Bottleneck", True),
    "PreResNet": (("layer1", "layer2", "layer3"), "Bottleneck", False),
    "WideResNet": (("block1", "block2", "block3"), "BasicBlock", False),
    "CifarResNeXt": (("stage_1", "stage_2", "stage_3"), "ResNeXtBottleneck", True),
}
SUPPORTED = (
    "official DIANet CIFAR models (gbup-group/DIANet models/cifar: ResNet and PreResNet with "
    "Bottleneck blocks, WideResNet, CifarResNeXt)"
)
ATTENTION_TYPES = ("Attention",)  # modules whose `lstm` is a stage's LSTM
LSTM_TYPES = ("LSTMCell",)


def is_stage(module) -> bool:
    return (
        isinstance(module, nn.Module)
        and type(module).__name__ == "Attention"
        and hasattr(module, "lstm")
    )


def recognises(model: nn.Module) -> bool:
    kind = type(model).__name__
    return kind in MODELS and any(is_stage(getattr(model, a, None)) for a in MODELS[kind][0])


def name_only_match(model: nn.Module) -> bool:
    """A model with an official class name but no DIA stages (for the error message)."""
    return type(model).__name__ in MODELS


def plan(model: nn.Module, backend: str, keep_rng_stream: bool):
    """[(stage module, mixin, StepPlan)] for every stage, or raises naming the module."""
    kind = type(model).__name__
    attrs = MODELS[kind][0]
    result = []
    for attr in attrs:
        stage = getattr(model, attr, None)
        if not is_stage(stage):
            raise ValueError(
                f"model.{attr}: expected the official DIA `Attention` stage of {kind}, "
                f"got {type(stage).__name__}"
            )
        plan_ = plan_stage(stage, attr, kind, backend, keep_rng_stream)
        result.append((stage, FusedAttention, plan_))
    return result


def plan_stage(stage, attr: str, kind: str, backend: str, keep_rng_stream: bool) -> StepPlan:
    _, block_class, relu = MODELS[kind]
    blocks = getattr(stage, "ModuleList", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(
            f"model.{attr}.ModuleList: expected a non-empty ModuleList or Sequential "
            f"of residual blocks, got {type(blocks).__name__}"
        )
    for index, block in enumerate(blocks):
        if type(block).__name__ != block_class:
            extra = (
                " (the official ResNet with BasicBlock returns (out, pooled) instead of "
                "(branch, residual) and is no DIANet)"
                if kind == "ResNet"
                else ""
            )
            raise ValueError(
                f"model.{attr}.ModuleList.{index}: expected a {block_class} block in "
                f"an official {kind}, got {type(block).__name__}{extra}"
            )
    check_global_pool(getattr(stage, "GlobalAvg", None), f"model.{attr}.GlobalAvg")
    if relu:
        check_relu(getattr(stage, "relu", None), f"model.{attr}.relu")
    paths, num_cells, channels = lstm_layout(stage.lstm, f"model.{attr}.lstm")
    parts = [(("lstm",), stage.lstm), (("GlobalAvg",), stage.GlobalAvg)]
    if relu:
        parts.append((("relu",), stage.relu))
    return StepPlan(
        attr,
        paths,
        num_cells,
        channels,
        relu,
        backend,
        keep_rng_stream,
        parts=tuple(parts),
        bypassed=tuple(path for path, _ in parts),
        source=kind,
    )


def lstm_layout(lstm, name):
    """(Linear paths, num_cells, channels) of an official LSTMCell, or raises naming it."""
    w_ih, w_hh = getattr(lstm, "w_ih", None), getattr(lstm, "w_hh", None)
    num_cells = getattr(lstm, "nlayers", None)
    if not (
        isinstance(w_ih, nn.ModuleList)
        and isinstance(w_hh, nn.ModuleList)
        and isinstance(num_cells, int)
        and len(w_ih) == len(w_hh) == num_cells >= 1
        and isinstance(getattr(lstm, "dropout", None), nn.Dropout)
    ):
        raise ValueError(
            f"{name}: expected the official LSTMCell (w_ih, w_hh: ModuleLists of nlayers cells, "
            f"dropout: nn.Dropout), got {type(lstm).__name__}"
        )
    cell0 = []
    for path in ("w_ih", "w_hh"):
        seq = getattr(getattr(lstm, path)[0], "seq", None)
        if not isinstance(seq, nn.Sequential) or len(seq) != 3 or not isinstance(seq[1], nn.ReLU):
            raise ValueError(f"{name}.{path}.0: expected small_cell (seq: Linear, ReLU, Linear)")
        cell0.append(seq)
    channels, hidden = cell0[0][0].in_features, cell0[0][0].out_features
    for path, seq in zip(("w_ih", "w_hh"), cell0):
        check_linear(seq[0], f"{name}.{path}.0.seq.0", channels, hidden)
        check_linear(seq[2], f"{name}.{path}.0.seq.2", hidden, 4 * channels)
    paths = [(path, "0", "seq", index) for path in ("w_ih", "w_hh") for index in ("0", "2")]
    for cell in range(1, num_cells):
        for path in ("w_ih", "w_hh"):
            check_linear(getattr(lstm, path)[cell], f"{name}.{path}.{cell}", channels, 4 * channels)
            paths.append((path, str(cell)))
    return tuple(paths), num_cells, channels


def lstm_state(lstm):
    """The LSTM's state dict under the official keys (dia_fused's DIALSTM uses them too)."""
    return lstm.state_dict()


def lstm_options(lstm):
    """(reduction, num_cells) of an official LSTMCell."""
    first = lstm.w_ih[0].seq[0]
    return first.in_features // first.out_features, lstm.nlayers


@fused_mixin
class FusedAttention:
    """Official `Attention`: for each block, (branch, residual) = block(x), then the fused step.
    A hook on the LSTM, the pooling or the ReLU runs the source forward (so the hook fires)."""

    def forward(self, x):
        plan_ = self.__dict__["_dia_fused"]
        if not plan_is_current(self, plan_):
            plan_ = plan_stage(
                self, plan_.stage, plan_.source, plan_.backend, plan_.keep_rng_stream
            )
            self.__dict__["_dia_fused"] = plan_
        if hooks_on_bypassed(self, plan_):
            return original_class(self).forward(self, x)
        lstm = self._modules["lstm"]
        weights = lstm_weights(lstm, plan_)
        state = None
        for layer in self.ModuleList:
            out = layer(x)
            if not isinstance(out, tuple) or len(out) != 2:
                raise TypeError(
                    f"{plan_.stage}: expected each block to return (branch, residual), got "
                    f"{type(out).__name__}"
                )
            x, state = source_step(lstm, plan_, weights, out[0], out[1], state)
        return x


def convert_target(model: nn.Module, common: dict):
    """(the dia_fused model with `model`'s architecture and `common` options, input size)."""
    from ..models.networks import cifar_preresnet, cifar_resnet, cifar_resnext, cifar_wrn

    kind = type(model).__name__
    if kind == "ResNet":
        blocks = model.layer1.ModuleList
        if not hasattr(blocks[0], "conv3"):
            raise ValueError(
                "model: the official DIA ResNet with BasicBlock returns (out, GAP) instead of "
                "(branch, residual) and is not a DIANet; only Bottleneck is supported"
            )
        target = cifar_resnet(
            9 * len(blocks) + 2, model.fc.out_features, block="bottleneck", **common
        )
    elif kind == "PreResNet":
        n = len(model.layer1.ModuleList)
        target = cifar_preresnet(9 * n + 2, model.fc.out_features, extra_norm=True, **common)
    elif kind == "WideResNet":
        blocks = model.block1.ModuleList
        widen = blocks[0].conv1.out_channels // 16
        target = cifar_wrn(
            6 * len(blocks) + 4, widen, model.fc.out_features, dropout=blocks[0].droprate, **common
        )
    else:  # CifarResNeXt
        target = cifar_resnext(
            model.depth, model.cardinality, model.widen_factor, model.num_classes, **common
        )
    return target, (1, 3, 32, 32)
