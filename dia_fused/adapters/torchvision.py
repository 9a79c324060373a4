"""Adapter for torchvision's ResNets (torchvision.models.resnet: resnet18..152, resnext50_32x4d,
resnext101_*, wide_resnet50_2 / 101_2), also inside the models built on them (detection
backbones: BackboneWithFPN's IntermediateLayerGetter, Faster R-CNN).

A stage is an nn.Sequential (`layer1`..`layer4`) of BasicBlock or Bottleneck; a block's branch is
conv1-bn1-relu-conv2-bn2 (-relu-conv3-bn3), its shortcut `downsample(x)` or x, and it ends with
`relu(branch + shortcut)`, reusing its one `relu` module. Recognised by module and class name, so
torchvision need not be importable here.
"""

from __future__ import annotations

from torch import nn

from .residual import BlockRules, block_mixin, rules_by_class

NAME = "torchvision"
MODULE = "torchvision.models.resnet"
SUPPORTED = (
    "torchvision ResNets (torchvision.models.resnet.ResNet: resnet18..152, resnext50_32x4d, "
    "resnext101_*, wide_resnet50_2 / 101_2, also inside a detection backbone or model)"
)


class TorchvisionBlock(BlockRules):
    def branch(self, block, x):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
        if "conv3" in block._modules:  # Bottleneck
            out = block.bn3(block.conv3(block.relu(out)))
        return out, (x if block.downsample is None else block.downsample(x))

    def activation(self, block) -> nn.Module:
        return block.relu

    def channels(self, block) -> int:
        return (block.conv3 if "conv3" in block._modules else block.conv2).out_channels


RULES = TorchvisionBlock()
block_mixin(RULES)  # registered at import: unpickling finds it
BASIC = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")
BLOCKS = {
    "BasicBlock": (RULES, BASIC),
    "Bottleneck": (RULES, BASIC + ("conv3", "bn3")),
}


def block_rules(block: nn.Module):
    """The rules for `block` if it is a torchvision ResNet block as torchvision defines it, else
    None."""
    return rules_by_class(block, MODULE, BLOCKS)
