"""Residual blocks and stages shared by the CIFAR and ImageNet DIANets.

Every block maps x to (branch, identity): the branch output after its last BatchNorm and the
shortcut (None when skip connections are ablated). The stage adds them: through the shared DIA unit
(modules.DIAStage) or, without DIA, directly (PlainStage); SE models put a per-block SE module at
the end of the branch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import check_positive_int
from ..modules import DIALSTM, DIASE, DIAStage, _attention_vector, block_output, reduced_width

ATTENTIONS = ("none", "se", "dia", "dia_se")


def norm_layer(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm else nn.Identity()


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
    )


class SE(nn.Module):
    """Squeeze-and-excitation of one block (Hu et al.): x * sigmoid(W2 relu(W1 mean(x)))."""

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        hidden = reduced_width(channels, reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=bias),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class ResidualBlock(nn.Module):
    """Base: `branch` (nn.Sequential ending in a norm), `shortcut` (projection or None: identity),
    optional per-block SE (`se` = (reduction, bias)), the `skip` ablation, and `preact` (the
    pre-activation applied to x first; the projection reads it when `preact_shortcut`)."""

    def __init__(
        self,
        branch: nn.Module,
        shortcut: Optional[nn.Module],
        out_channels: int,
        *,
        se: Optional[tuple],
        skip: bool,
        preact: Optional[nn.Module] = None,
        preact_shortcut: bool = False,
    ):
        super().__init__()
        self.preact = preact
        self.preact_shortcut = preact_shortcut
        self.branch = branch
        self.shortcut = shortcut
        self.se = SE(out_channels, *se) if se else None  # se: (reduction, bias) or None
        self.skip = skip

    def forward(self, x):
        pre = x if self.preact is None else self.preact(x)
        branch = self.branch(pre)
        if self.se is not None:
            branch = self.se(branch)
        if not self.skip:
            return branch, None
        if self.shortcut is None:
            return branch, x
        return branch, self.shortcut(pre if self.preact_shortcut else x)


def projection(
    cin: int, cout: int, stride: int, norm: bool, with_norm: bool = True
) -> Optional[nn.Module]:
    if cin == cout and stride == 1:
        return None
    layers = [conv(cin, cout, 1, stride)]
    if with_norm:
        layers.append(norm_layer(cout, norm))
    return nn.Sequential(*layers)


def basic_block(cin, cout, stride, *, norm=True, se=None, skip=True):
    """conv3x3-bn-relu-conv3x3-bn (post-activation ResNet)."""
    branch = nn.Sequential(
        conv(cin, cout, 3, stride),
        norm_layer(cout, norm),
        nn.ReLU(inplace=True),
        conv(cout, cout, 3),
        norm_layer(cout, norm),
    )
    return ResidualBlock(branch, projection(cin, cout, stride, norm), cout, se=se, skip=skip)


def bottleneck_block(
    cin,
    planes,
    stride,
    *,
    expansion=4,
    groups=1,
    width=None,
    norm=True,
    se=None,
    skip=True,
    stride_in_1x1=False,
):
    """1x1-bn-relu-3x3(groups)-bn-relu-1x1-bn (post-activation ResNet / ResNeXt); the stride on the
    3x3, or on the first 1x1 (`stride_in_1x1`, the original ResNet v1 and pytorchcv's default)."""
    width = width or planes
    cout = planes * expansion
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    branch = nn.Sequential(
        conv(cin, width, 1, s1),
        norm_layer(width, norm),
        nn.ReLU(inplace=True),
        conv(width, width, 3, s3, groups),
        norm_layer(width, norm),
        nn.ReLU(inplace=True),
        conv(width, cout, 1),
        norm_layer(cout, norm),
    )
    return ResidualBlock(branch, projection(cin, cout, stride, norm), cout, se=se, skip=skip)


def preact_block(
    cin,
    planes,
    stride,
    *,
    bottleneck=True,
    norm=True,
    se=None,
    skip=True,
    extra_norm=True,
    shortcut_from_preact=False,
):
    """Pre-activation block: bn-relu, then 1x1-bn-relu-3x3-bn-relu-1x1 (bottleneck, x4 channels) or
    3x3-bn-relu-3x3 (basic), + the official DIA code's extra BN at the end of the branch (so the
    unit pools normalised features). The projection shortcut (no BN) reads x (official DIANet) or
    the pre-activated x (`shortcut_from_preact`, pytorchcv)."""
    cout = planes * 4 if bottleneck else planes
    if bottleneck:
        layers = [
            conv(cin, planes, 1),
            norm_layer(planes, norm),
            nn.ReLU(inplace=True),
            conv(planes, planes, 3, stride),
            norm_layer(planes, norm),
            nn.ReLU(inplace=True),
            conv(planes, cout, 1),
        ]
    else:
        layers = [
            conv(cin, planes, 3, stride),
            norm_layer(planes, norm),
            nn.ReLU(inplace=True),
            conv(planes, planes, 3),
        ]
    if extra_norm:
        layers.append(norm_layer(cout, norm))
    shortcut = projection(cin, cout, stride, norm, with_norm=False)
    preact = nn.Sequential(norm_layer(cin, norm), nn.ReLU(inplace=True))
    return ResidualBlock(
        nn.Sequential(*layers),
        shortcut,
        cout,
        se=se,
        skip=skip,
        preact=preact,
        preact_shortcut=shortcut_from_preact,
    )


def wide_block(cin, cout, stride, *, dropout=0.0, norm=True, se=None, skip=True, extra_norm=True):
    """WRN pre-activation block bn-relu-3x3-bn-relu-(dropout)-3x3 (+ the official DIA code's extra
    BN). When the width changes, the pre-activation is shared with the 1x1 projection shortcut."""
    layers = [conv(cin, cout, 3, stride), norm_layer(cout, norm), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(conv(cout, cout, 3))
    if extra_norm:
        layers.append(norm_layer(cout, norm))
    equal = cin == cout
    shortcut = None if equal else conv(cin, cout, 1, stride)
    preact = nn.Sequential(norm_layer(cin, norm), nn.ReLU(inplace=True))
    return ResidualBlock(
        nn.Sequential(*layers),
        shortcut,
        cout,
        se=se,
        skip=skip,
        preact=preact,
        preact_shortcut=not equal,
    )


class PlainStage(nn.Module):
    """A stage without a shared unit: out = relu?(branch + identity) per block."""

    def __init__(self, blocks, relu: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.relu = relu

    def forward(self, x, return_attention: bool = False):
        for index, block in enumerate(self.blocks):
            branch, identity = block_output(block(x), index, block)
            x = branch if identity is None else branch + identity
            if self.relu:
                x = torch.relu(x)
        return (x, None) if return_attention else x


def make_stage(
    blocks,
    channels: int,
    *,
    attention: str,
    with_unit: bool,
    relu: bool,
    reduction: int,
    num_cells: int,
    cell_activation: str,
    backend: str,
    se_reduction: int = 16,
    mask=None,
) -> nn.Module:
    """The stage for `attention`: DIAStage with a DIALSTM / DIASE unit (MaskedDIAStage when only
    the blocks of `mask` use it), or a PlainStage."""
    with_unit = with_unit and (mask is None or any(mask))
    if attention == "dia" and with_unit:
        unit = DIALSTM(
            channels,
            reduction=reduction,
            num_cells=num_cells,
            cell_activation=cell_activation,
            backend=backend,
        )
    elif attention == "dia_se" and with_unit:
        unit = DIASE(channels, reduction=se_reduction)
    else:
        return PlainStage(blocks, relu=relu)
    if mask is None or all(mask):
        return DIAStage(blocks, unit, relu=relu)
    return MaskedDIAStage(blocks, unit, mask, relu=relu)


class MaskedDIAStage(DIAStage):
    """A DIAStage whose unit only the blocks in `mask` use (EAN's per-block option, Huang et al.
    2020): the other blocks add branch and shortcut (and ReLU) without attention, and the LSTM
    state passes them unchanged. The attention vectors are those of the masked-in blocks."""

    def __init__(self, blocks, unit: nn.Module, mask, relu: bool = True):
        super().__init__(blocks, unit, relu=relu)
        self.mask = tuple(bool(m) for m in mask)
        if len(self.mask) != len(self.blocks):
            raise ValueError(
                f"mask: expected one bool per block ({len(self.blocks)}), got {len(self.mask)}"
            )

    def extra_repr(self) -> str:
        return f"mask={self.mask}"

    def forward(self, x, return_attention: bool = False):
        state, attention = None, []
        for index, (block, uses_unit) in enumerate(zip(self.blocks, self.mask)):
            branch, identity = block_output(block(x), index, block)
            if uses_unit:
                x, state = self.unit(branch, state, identity=identity, relu=self.relu)
                if return_attention:
                    attention.append(_attention_vector(self.unit, branch, state))
                continue
            x = branch if identity is None else branch + identity
            if self.relu:
                x = torch.relu(x)
        return (x, torch.stack(attention, dim=1)) if return_attention else x


class DIANet(nn.Module):
    """stem -> stages -> head. `model(x, return_attention=True)` also returns the attention vectors
    (N, T, C) of every stage with a shared unit, in order."""

    def __init__(self, stem: nn.Module, stages, head: nn.Module):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x, return_attention: bool = False):
        # `is True`, not truth: under torch.fx.symbolic_trace the flag is a Proxy (no bool), and
        # the traced graph is the plain forward
        wants_attention = return_attention is True
        if not wants_attention and return_attention is not False:
            if not isinstance(return_attention, torch.fx.Proxy):
                raise TypeError(
                    f"return_attention: expected a bool, got {type(return_attention).__name__}"
                )
        x = self.stem(x)
        attention = []
        for stage in self.stages:
            if wants_attention:
                x, attn = stage(x, return_attention=True)
                if attn is not None:
                    attention.append(attn)
            else:
                x = stage(x)
        logits = self.head(x)
        return (logits, attention) if wants_attention else logits


class Head(nn.Module):
    """(optional norm + relu) -> global average pool -> linear classifier."""

    def __init__(
        self, channels: int, num_classes: int, *, preact_norm: bool = False, norm: bool = True
    ):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        self.norm = (
            nn.Sequential(norm_layer(channels, norm), nn.ReLU(inplace=True))
            if preact_norm
            else None
        )
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        return self.fc(torch.flatten(x.mean((2, 3)), 1))
