"""From the official cifar.py model flags (and the ablation switches) to a model of the zoo.

A model is described by a small dict, stored in every checkpoint so that tools (analysis, resume
checks) rebuild the same network:

    {"name": <dia_fused.models name>, "num_classes": int, "options": {create_model options}}

The DIA backend is not part of the description: it is a runtime choice (--backend).
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..models import (
    IMAGENET_LAYERS,
    cifar_preresnet,
    cifar_resnet,
    cifar_resnext,
    cifar_wrn,
    create_model,
    imagenet_resnet,
    list_models,
    parse_name,
)
from ..ops import BACKEND_CHOICES
from ..reference import CELL_ACTIVATIONS
from .errors import TrainError

ATTENTION_CHOICES = ("none", "se", "dia", "dia_se")
FAMILIES = ("resnet", "preresnet", "wrn", "resnext")
# official prefixes of --arch (dia_resnet, se_resnet, resnet, ...)
_PREFIXES = (("dia_se_", "dia_se"), ("dia_", "dia"), ("se_", "se"), ("", "none"))

ARCH_HELP = (
    "dia_resnet | dia_preresnet | dia_wrn | dia_resnext (official names), the same with "
    "se_ or no prefix for the baselines, or any name of dia_fused.models.list_models() "
    "(then --depth etc. are not used)"
)


def split_arch(arch: str):
    """'dia_resnet' -> ('resnet', 'dia'); None if arch is not an official family name."""
    for prefix, attention in _PREFIXES:
        if arch.startswith(prefix) and arch[len(prefix) :] in FAMILIES:
            return arch[len(prefix) :], attention
    return None


def _block(args: argparse.Namespace) -> str:
    name = args.block_name.lower()
    if name not in ("basicblock", "bottleneck"):
        raise TrainError(
            f"--block-name: expected BasicBlock or Bottleneck, got {args.block_name!r}"
        )
    return "basic" if name == "basicblock" else "bottleneck"


def _zoo_name(arch: str) -> Optional[Dict[str, Any]]:
    """The parsed zoo name, or None when `arch` is not one (create_model's grammar)."""
    try:
        return parse_name(arch)
    except ValueError:
        return None


def model_spec(args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    """The model description for the parsed command line."""
    options: Dict[str, Any] = {}
    parsed = split_arch(args.arch)
    if parsed is not None:
        family, attention = parsed
        # depths that name an ImageNet network in the zoo need the `_cifar` suffix
        cifar = (
            "_cifar"
            if (
                (family == "resnet" and args.depth in IMAGENET_LAYERS)
                or (family == "resnext" and args.depth == 50)
            )
            else ""
        )
        if family == "resnet":
            name = f"resnet{args.depth}{cifar}"
            options["block"] = _block(args)
        elif family == "preresnet":  # bottleneck only, like the official DIA PreResNet
            if _block(args) != "bottleneck":
                raise TrainError(
                    f"--block-name: the PreResNet has Bottleneck blocks only, got "
                    f"{args.block_name!r}"
                )
            name = f"preresnet{args.depth}"
        elif family == "wrn":
            name = f"wrn{args.depth}_{args.widen_factor}"
            options["dropout"] = args.drop
        else:
            # The zoo builds the CIFAR ResNeXt from cardinality and widen_factor (the official
            # code's); its stage-1 groups are 32 channels wide at any widen factor ("8x32").
            name = f"resnext{args.depth}_{args.cardinality}x32{cifar}"
            options["widen_factor"] = args.widen_factor
        options["attention"] = attention
    elif _zoo_name(args.arch) is not None:
        name = args.arch
        if _zoo_name(args.arch)["family"] == "wrn" and args.drop:
            options["dropout"] = args.drop
    else:
        raise TrainError(
            f"--arch: expected {ARCH_HELP}; got {args.arch!r}. The paper's models: "
            f"{', '.join(sorted(list_models()))}"
        )
    if args.attention is not None:
        options["attention"] = args.attention
    for flag, key in (
        ("reduction", "reduction"),
        ("num_cells", "num_cells"),
        ("cell_activation", "cell_activation"),
        ("dia_stages", "dia_stages"),
    ):
        value = getattr(args, flag)
        if value is not None:
            options[key] = list(value) if isinstance(value, (list, tuple)) else value
    if args.no_norm:
        options["norm"] = False
    if args.no_skip:
        options["skip"] = False
    return {"name": name, "num_classes": int(num_classes), "options": options}


def build_model(spec: Mapping[str, Any], backend: Optional[str] = None) -> nn.Module:
    """The network of a description; `backend` (DIA unit backend) when given."""
    options = dict(spec["options"])
    if backend is not None:
        options["backend"] = backend
    return create_model(spec["name"], num_classes=spec["num_classes"], **options)


def _builder(parsed: Mapping[str, Any]) -> Tuple[Callable[..., nn.Module], int]:
    """The zoo function create_model calls for a parsed name, and its number of stages."""
    family, depth = parsed["family"], parsed["depth"]
    imagenet = not parsed["cifar"] and (
        (family == "resnet" and depth in IMAGENET_LAYERS) or (family == "resnext" and depth == 50)
    )
    if imagenet:
        return imagenet_resnet, 4
    return {
        "resnet": cifar_resnet,
        "preresnet": cifar_preresnet,
        "wrn": cifar_wrn,
        "resnext": cifar_resnext,
    }[family], 3


def resolved_options(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """The options of a description with every option left out replaced by the value the zoo
    uses for it (the name's attention, the builder's defaults), so that a description that
    passes a default explicitly equals one that leaves it out. The runtime `backend` is left out;
    `dia_stages` is the sorted list of stages."""
    options = dict(spec.get("options", {}))
    options.pop("backend", None)
    try:
        parsed = parse_name(spec["name"])
    except (KeyError, ValueError):
        return options
    builder, _ = _builder(parsed)
    resolved = {
        name: p.default
        for name, p in inspect.signature(builder).parameters.items()
        if p.default is not p.empty and name not in ("num_classes", "backend")
    }
    resolved.update(options)
    # the attention options the zoo resolves while building (defaults that depend on the
    # attention and the family): read back from the network, built on the meta device
    try:
        with torch.device("meta"):
            built = build_model(spec).attention_options
    except (TypeError, ValueError):
        return resolved
    resolved.update(built)
    if resolved["dia_stages"] is not None:
        resolved["dia_stages"] = sorted(resolved["dia_stages"])
    return resolved


def spec_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[str]:
    """None when both describe the same network, else what differs. Options are compared by
    value (resolved_options): passing a default explicitly describes the same network."""
    diffs = []
    for key in ("name", "num_classes"):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key} {saved.get(key)!r} vs {current.get(key)!r}")
    a, b = resolved_options(saved), resolved_options(current)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs.append(f"{key} {a.get(key)!r} vs {b.get(key)!r}")
    return "; ".join(diffs) or None


__all__ = [
    "ATTENTION_CHOICES",
    "BACKEND_CHOICES",
    "CELL_ACTIVATIONS",
    "ARCH_HELP",
    "model_spec",
    "build_model",
    "resolved_options",
    "spec_mismatch",
    "split_arch",
]
