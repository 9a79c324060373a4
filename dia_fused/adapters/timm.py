"""Adapter for timm's ResNet class (timm.models.resnet.ResNet: resnet*, resnext*, wide_resnet*,
and its variants with an attention slot or a deep stem: seresnet*, ecaresnet*, resnet*d, ...), also
inside timm's features_only wrappers.

A stage is an nn.Sequential (`layer1`..`layer4`) of BasicBlock or Bottleneck. A block's branch is
conv1-bn1-(drop_block)-act1-aa-conv2-bn2 (BasicBlock) or conv1-bn1-act1-conv2-bn2-drop_block-act2-
aa-conv3-bn3 (Bottleneck), then its own attention module `se` when it has one; DIA scales the
branch after that, before `drop_path` and the residual add; the block ends with act2 / act3.
Recognised by module and class name, so timm need not be importable here.
"""

from __future__ import annotations

from torch import nn

from .residual import BlockRules, block_mixin, rules_by_class

NAME = "timm"
MODULE = "timm.models.resnet"
SUPPORTED = (
    "timm ResNets (timm.models.resnet.ResNet: resnet*, resnext*, wide_resnet*, seresnet*, "
    "ecaresnet*, resnet*d, ..., also with features_only=True)"
)


class TimmBasicBlock(BlockRules):
    def branch(self, block, x):
        out = block.act1(block.drop_block(block.bn1(block.conv1(x))))
        out = block.bn2(block.conv2(block.aa(out)))
        if block.se is not None:
            out = block.se(out)
        return out, (x if block.downsample is None else block.downsample(x))

    def drop_path(self, block):
        return block.drop_path

    def activation(self, block) -> nn.Module:
        return block.act2

    def channels(self, block) -> int:
        return block.conv2.out_channels


class TimmBottleneck(TimmBasicBlock):
    def branch(self, block, x):
        out = block.act1(block.bn1(block.conv1(x)))
        out = block.act2(block.drop_block(block.bn2(block.conv2(out))))
        out = block.bn3(block.conv3(block.aa(out)))
        if block.se is not None:
            out = block.se(out)
        return out, (x if block.downsample is None else block.downsample(x))

    def activation(self, block) -> nn.Module:
        return block.act3

    def channels(self, block) -> int:
        return block.conv3.out_channels


COMMON = (
    *("conv1", "bn1", "act1", "aa", "conv2", "bn2"),
    *("drop_block", "se", "drop_path", "downsample"),
)
BLOCKS = {
    "BasicBlock": (TimmBasicBlock(), COMMON + ("act2",)),
    "Bottleneck": (TimmBottleneck(), COMMON + ("act2", "conv3", "bn3", "act3")),
}


def block_rules(block: nn.Module):
    """The rules for `block` if it is a timm ResNet block as timm defines it, else None."""
    return rules_by_class(block, MODULE, BLOCKS)


for _rules, _ in BLOCKS.values():
    block_mixin(_rules)  # registered at import: unpickling finds them
