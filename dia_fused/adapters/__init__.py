"""One adapter per source codebase, each holding all that dia_fused knows of that codebase.

Sources with DIA (accelerate, restore, convert use them): `official` (gbup-group/DIANet CIFAR
models), `pytorchcv` (pytorchcv 0.0.74 DIA models). Each has `recognises(model)`, `plan(model,
backend, keep_rng_stream)` -> [(module, fused mixin, base.StepPlan)], `lstm_state(lstm)` (its LSTM
under the official keys), `LSTM_LAYOUT` (base.LSTMLayout: where its Linears are),
`convert_target(model, backend)`, `layer_order(layers)` (its layers as they ran, reordered to
dia_fused's order) and its `LSTM_TYPES`; `official.load_checkpoint` reads the official checkpoints
by key name.

Sources without DIA (add_dia, remove_dia use them): `torchvision` and `timm` ResNets. Each has
`block_rules(block)` -> residual.BlockRules or None: how to split a block into (branch, identity)
and how it ends. Adding a source means adding one module here and listing it below.
"""

from __future__ import annotations

from typing import List

from torch import nn

from .._checks import check_choice, check_positive_int
from .. import ops
from . import official, pytorchcv, residual, timm, torchvision
from .base import check_not_compiled

WITH_DIA = (official, pytorchcv)
WITHOUT_DIA = (torchvision, timm)
WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside nn.DataParallel / DistributedDataParallel (nested too), else `model`."""
    while isinstance(model, WRAPPERS):
        model = model.module
    return model


def source_with_dia(model: nn.Module):
    """The adapter of a model that has DIA (official, pytorchcv), or None."""
    return next((source for source in WITH_DIA if source.recognises(model)), None)


def _block_rules(block: nn.Module):
    for source in WITHOUT_DIA:
        rules = source.block_rules(block)
        if rules is not None:
            return rules
    return None


def _stages(model: nn.Module):
    """[(name, stage)]: the nn.Sequentials of `model` whose children are all residual blocks of
    a source without DIA, in module order."""
    found = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Sequential)
            and len(module) > 0
            and all(_block_rules(block) is not None for block in module)
        ):
            found.append((name, module))
    return found


SUPPORTED_ADD_DIA = f"{torchvision.SUPPORTED}, or {timm.SUPPORTED}"


def add_dia(
    model: nn.Module,
    reduction: int = 16,
    cells: int = 1,
    blocks=None,
    backend: str = "auto",
) -> nn.Module:
    """Adds one shared DIA-LSTM unit per stage of a torchvision or timm ResNet, in place; returns
    `model`.

    Each stage (`layer1`..`layer4`) gets a DIALSTM(C, reduction, num_cells=cells) that scales the
    residual branch of each of its blocks (after its last norm and the block's own attention
    module, before drop-path and the residual add), with the state carried from block to block
    as in the paper. The model's class, its Parameter objects, buffers and state_dict keys stay;
    the only new keys are each unit's, `layerN.<first block>.dia.w_ih.0.seq.0.weight` and so on,
    so a plain (pretrained) state_dict loads with strict=False, missing only those.

    Args:
        reduction: r of the unit's Linear(C, C // r) (the paper: 4 on CIFAR; EAN: 20 on
            ImageNet); a positive int <= the stage's channels.
        cells: stacked LSTM cells of each unit.
        blocks: None (every block) or a per-stage mask (one sequence of bools per stage, one
            per block) of the blocks that use the unit (EAN's option); a stage with no block
            gets no unit.
        backend: the DIALSTM backend ("auto", "reference", "triton", "cuda").

    Raises TypeError for a model without supported stages (listing what is supported) and
    ValueError for bad options or a model that already has DIA; nothing is changed then.
    `remove_dia(model)` undoes it."""
    check_not_compiled(model, "add_dia")
    check_positive_int("reduction", reduction)
    check_positive_int("cells", cells)
    check_choice("backend", backend, ops.BACKEND_CHOICES)
    inner = unwrap(model)
    done = residual.dia_stage_names(inner)
    if done:
        raise ValueError(f"model: already has DIA in {done}; call remove_dia(model) first")
    stages = _stages(inner)
    if not stages:
        raise TypeError(
            f"model: expected {SUPPORTED_ADD_DIA} (stages of BasicBlock / Bottleneck blocks); "
            f"got {type(inner).__module__}.{type(inner).__qualname__} without such stages"
            + (
                " (it already has DIA: use dia_fused.accelerate)"
                if source_with_dia(inner) is not None
                else ""
            )
        )
    masks = residual.check_mask(blocks, stages)
    planned = residual.plan_stages(stages, _block_rules, masks, reduction, cells, backend)
    residual.apply(planned, _block_rules, residual.block_mixin)
    return model


def remove_dia(model: nn.Module) -> nn.Module:
    """Undoes add_dia in place: the plain model (its classes, modules and keys) again."""
    check_not_compiled(model, "remove_dia")
    residual.remove(unwrap(model))
    return model


def dia_stages(model: nn.Module) -> List[str]:
    """Names of the stages that add_dia gave a DIA unit."""
    return residual.dia_stage_names(unwrap(model))
