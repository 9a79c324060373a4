"""add_dia's machinery for networks without DIA (torchvision, timm): one shared DIALSTM per stage.

A stage is an nn.Sequential of residual blocks the source adapter knows. add_dia gives the stage
and each of its blocks a subclass of its own class (same name, base.fused_class) and registers the
stage's DIALSTM as the child `dia` of the first block that uses it (so the stage's children stay
its blocks: code that iterates a stage, timm's checkpoint_seq included, sees the blocks). The stage
forward runs its blocks in order, passing the unit and the LSTM state (h, c) to each block in a
`dia_carry` keyword argument (hooks on a block see its input and output as before). A block
computes its residual branch and shortcut as the source block does, then
`unit(branch, state, identity=shortcut, relu=True)`: the fused epilogue relu(x * a + identity)
when the block ends in a plain ReLU without hooks and has no drop-path; otherwise
y = unit(branch) * a, then the block's own drop-path, add and activation modules.

Blocks run one by one (timm's set_grad_checkpointing, which checkpoints block by block): a block
called without `dia_carry` takes the state from the output of the block before it (an immutable
record attached to that tensor) and attaches its own to its output; block 0 starts from zeros.
Non-reentrant checkpointing (timm's default) recomputes with the same input tensors, so the
gradients are those of the unchecked model; a block whose input lost the record (reentrant
checkpointing detaches its inputs) raises instead of running without the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from ..modules import DIALSTM
from .base import fused_mixin, original_class, swap_class, unswap_class

UNIT_NAME = "dia"  # the stage's DIALSTM: child `dia` of the first block that uses it


@dataclass(frozen=True)
class StagePlan:
    name: str  # the stage's name in the model
    uses_dia: Tuple[bool, ...]  # per block
    owner: int  # index of the block holding the unit


@dataclass(frozen=True)
class BlockPlan:
    stage: str
    index: int
    uses_dia: bool
    owner: bool


@dataclass(frozen=True)
class _Record:
    """The LSTM state after block `index - 1` of `stage`, attached to that block's output."""

    stage: str
    index: int
    unit: Optional[nn.Module]
    state: Optional[Tuple[torch.Tensor, torch.Tensor]]


class BlockRules:
    """What a source adapter says about one block class (subclassed per source)."""

    def branch(self, block, x):
        """(residual branch output after its last norm and attention module, shortcut)."""
        raise NotImplementedError

    def drop_path(self, block) -> Optional[nn.Module]:
        return None

    def activation(self, block) -> nn.Module:
        raise NotImplementedError

    def channels(self, block) -> int:
        raise NotImplementedError


def rules_by_class(block: nn.Module, module_name: str, blocks: dict) -> Optional[BlockRules]:
    """`block`'s rules when its class is `module_name`.<a name in `blocks`> itself (a subclass may
    have its own forward: not recognised) and it has every attribute that `blocks` lists for it,
    else None. `blocks`: class name -> (rules, attributes). By name, so the source need not be
    importable here."""
    cls = type(block)
    if cls.__module__ != module_name or cls.__qualname__ not in blocks:
        return None
    rules, attributes = blocks[cls.__qualname__]
    return rules if all(hasattr(block, a) for a in attributes) else None


def _record_of(x) -> Optional[_Record]:
    return x.__dict__.get("_dia_record") if isinstance(x, torch.Tensor) else None


def _fusable_ending(act: nn.Module, drop_path: Optional[nn.Module]) -> bool:
    """relu(x * a + identity) in the fused epilogue: a plain ReLU nobody observes, no drop-path
    that would scale x * a before the add."""
    return (
        type(act) is nn.ReLU
        and not act._forward_hooks
        and not act._forward_pre_hooks
        and not module_globals._global_forward_hooks
        and not module_globals._global_forward_pre_hooks
        and (drop_path is None or not drop_path.training or getattr(drop_path, "drop_prob", 1) == 0)
    )


class DIABlock:
    """A residual block of a DIA stage (mixin over the source block; `_rules` per source)."""

    _rules: BlockRules

    def forward(self, x, dia_carry: Optional[List] = None):
        plan = self.__dict__["_dia_block"]
        alone = dia_carry is None
        if alone:  # run block by block: the state comes with x
            record = _record_of(x)
            if plan.index == 0:
                dia_carry = [None, None]
            elif record is None or record.stage != plan.stage or record.index != plan.index:
                raise RuntimeError(
                    f"{plan.stage}.{plan.index}: this block of a DIA stage ran without the LSTM "
                    f"state of block {plan.index - 1} (its input is not that block's output, or "
                    f"lost it: reentrant checkpointing detaches inputs); run the stage "
                    f"{plan.stage} as a whole, or checkpoint without reentrance "
                    f"(use_reentrant=False, timm's default)"
                )
            else:
                dia_carry = [record.unit, record.state]
        if plan.owner:
            dia_carry[0] = self._modules[UNIT_NAME]
        if plan.uses_dia:
            x = self._dia_forward(x, dia_carry)
        else:
            x = original_class(self).forward(self, x)
        if alone:
            x.__dict__["_dia_record"] = _Record(plan.stage, plan.index + 1, *dia_carry)
        return x

    def _dia_forward(self, x, carry):
        rules = self._rules
        branch, shortcut = rules.branch(self, x)
        unit, state = carry
        act, drop_path = rules.activation(self), rules.drop_path(self)
        if _fusable_ending(act, drop_path):
            out, carry[1] = unit(branch, state, identity=shortcut, relu=True)
            return out
        y, carry[1] = unit(branch, state)
        if drop_path is not None:
            y = drop_path(y)
        return act(y + shortcut)


@fused_mixin
class DIASequential:
    """A stage of add_dia: its blocks in order with the shared unit and state."""

    def forward(self, x):
        plan = self.__dict__["_dia_stage"]
        carry = [self[plan.owner]._modules[UNIT_NAME], None]
        for block in self:
            x = block(x, dia_carry=carry)
        return x


def check_mask(blocks, stages: Sequence[Tuple[str, nn.Module]]) -> List[Tuple[bool, ...]]:
    """The per-stage mask `blocks=` as tuples of bools, or raises naming what is wrong."""
    sizes = [len(stage) for _, stage in stages]
    if blocks is None:
        return [(True,) * n for n in sizes]
    if not isinstance(blocks, (list, tuple)) or len(blocks) != len(stages):
        raise ValueError(
            f"blocks: expected None or one mask per stage ({len(stages)} stages: "
            f"{[name for name, _ in stages]}, blocks per stage {sizes}), got {blocks!r}"
        )
    masks = []
    for (name, _), size, mask in zip(stages, sizes, blocks):
        if (
            not isinstance(mask, (list, tuple))
            or len(mask) != size
            or not all(isinstance(v, bool) or v in (0, 1) for v in mask)
        ):
            raise ValueError(
                f"blocks: the mask of {name} must be {size} bools (or 0/1), one per block, got "
                f"{mask!r}"
            )
        masks.append(tuple(bool(v) for v in mask))
    return masks


def plan_stages(stages, rules_of, masks, reduction: int, cells: int, backend: str):
    """Builds every unit first (raises before anything changes): [(stage name, stage, mask,
    owner index, unit)]; a stage whose mask is all False is left out."""
    planned = []
    for (name, stage), mask in zip(stages, masks):
        if not any(mask):
            continue
        owner = mask.index(True)
        block = stage[owner]
        if UNIT_NAME in block._modules or hasattr(block, UNIT_NAME):
            raise ValueError(
                f"model.{name}.{owner}: already has an attribute `{UNIT_NAME}` (add_dia twice? "
                f"call remove_dia first)"
            )
        channels = {rules_of(b).channels(b) for b, use in zip(stage, mask) if use}
        if len(channels) != 1:
            raise ValueError(
                f"model.{name}: its blocks output {sorted(channels)} channels; one DIA unit "
                f"needs one width per stage"
            )
        try:
            unit = DIALSTM(channels.pop(), reduction=reduction, num_cells=cells, backend=backend)
        except ValueError as error:
            raise ValueError(f"{error} (stage model.{name})") from None
        planned.append((name, stage, mask, owner, unit))
    return planned


def apply(planned, rules_of, mixin_of) -> None:
    for name, stage, mask, owner, unit in planned:
        first = next(stage.parameters(), None)
        if first is not None:
            unit.to(device=first.device, dtype=first.dtype if first.is_floating_point() else None)
        stage[owner].add_module(UNIT_NAME, unit)
        for index, block in enumerate(stage):
            swap_class(block, mixin_of(rules_of(block)))
            block.__dict__["_dia_block"] = BlockPlan(name, index, mask[index], index == owner)
        swap_class(stage, DIASequential)
        stage.__dict__["_dia_stage"] = StagePlan(name, mask, owner)


def remove(model: nn.Module) -> List[str]:
    """Undoes add_dia; the names of the stages it removed DIA from."""
    removed = []
    for name, module in model.named_modules():
        plan = module.__dict__.get("_dia_stage")
        if plan is None:
            continue
        for block in module:
            if block.__dict__.pop("_dia_block", None) is not None:
                unswap_class(block)
            if UNIT_NAME in block._modules:
                del block._modules[UNIT_NAME]
        unswap_class(module)
        del module.__dict__["_dia_stage"]
        removed.append(name)
    return removed


def dia_stage_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if "_dia_stage" in m.__dict__]


_BLOCK_MIXINS = {}


def block_mixin(rules: BlockRules) -> type:
    """The block mixin for one source's rules (registered for pickling by its rules' name)."""
    key = type(rules).__name__
    if key not in _BLOCK_MIXINS:
        _BLOCK_MIXINS[key] = fused_mixin(type(f"DIABlock_{key}", (DIABlock,), {"_rules": rules}))
    return _BLOCK_MIXINS[key]
