"""DIANet model zoo: `create_model(name, num_classes=..., **options)` and `list_models()`.

Names are `[attention_]family{depth}[_{widen}|_{cardinality}x{width}]`, attention one of `se_`,
`dia_`, `dia_se_` (none: plain), e.g. `resnet164`, `se_resnet164`, `dia_resnet164`, `dia_preresnet164`,
`dia_wrn52_4`, `dia_resnext101_8x32` (CIFAR; ResNeXt cardinality 8, the official code's widen factor 4),
`dia_resnet50`, `dia_resnext50_32x4d` (ImageNet: ResNet depths 18/34/50/101/152; add `_cifar` to force
a CIFAR ResNet of such a depth). Options: attention, reduction, num_cells, cell_activation, backend,
norm (False: no BatchNorm), skip (False: no skip connections), dia_stages (stages with the unit).
"""
from __future__ import annotations

import re

from .blocks import ATTENTIONS, DIANet, PlainStage
from .networks import IMAGENET_LAYERS, cifar_preresnet, cifar_resnet, cifar_resnext, cifar_wrn, imagenet_resnet

_NAME = re.compile(r"^(?:(?P<attention>dia_se|dia|se)_)?(?P<family>preresnet|resnext|resnet|wrn)(?P<depth>\d+)"
                   r"(?:_(?P<card>\d+)x(?P<width>\d+)d?|_(?P<widen>\d+))?(?P<cifar>_cifar)?$")

# the paper's models (Tables 3-8, Figure 6); any name of the grammar works
PAPER_MODELS = tuple(f"{prefix}{body}" for prefix in ("", "se_", "dia_", "dia_se_")
                     for body in ("resnet20", "resnet56", "resnet83", "resnet164", "resnet245", "resnet326",
                                  "resnet407", "preresnet164", "wrn52_4", "resnext101_8x32", "resnet34",
                                  "resnet50", "resnet152", "resnext50_32x4d"))


def list_models():
    """Names of the paper's models (the grammar of create_model accepts more)."""
    return list(PAPER_MODELS)


def parse_name(name: str) -> dict:
    match = _NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"name: expected [se_|dia_|dia_se_]family{{depth}}[_widen|_CxW], e.g. 'dia_resnet164', "
                         f"'dia_wrn52_4', 'dia_resnext101_8x32', got {name!r}")
    g = match.groupdict()
    return {"attention": g["attention"] or "none", "family": g["family"], "depth": int(g["depth"]),
            "cardinality": int(g["card"]) if g["card"] else None, "width": int(g["width"]) if g["width"] else None,
            "widen": int(g["widen"]) if g["widen"] else None, "cifar": bool(g["cifar"])}


def create_model(name: str, num_classes: int = None, **options) -> DIANet:
    """Builds the network `name`; `options` override the name's attention and the defaults."""
    spec = parse_name(name)
    options.setdefault("attention", spec["attention"])
    family, depth = spec["family"], spec["depth"]
    imagenet = not spec["cifar"] and ((family == "resnet" and depth in IMAGENET_LAYERS)
                                      or (family == "resnext" and depth == 50))
    if num_classes is None:
        num_classes = 1000 if imagenet else 10
    if family == "resnet" and not imagenet:
        return cifar_resnet(depth, num_classes, **options)
    if family == "resnet":
        return imagenet_resnet(depth, num_classes, **options)
    if family == "preresnet":
        return cifar_preresnet(depth, num_classes, **options)
    if family == "wrn":
        if spec["widen"] is None:
            raise ValueError(f"name: a WRN name needs its widen factor, e.g. 'dia_wrn52_4', got {name!r}")
        return cifar_wrn(depth, spec["widen"], num_classes, **options)
    if spec["cardinality"] is None:
        raise ValueError(f"name: a ResNeXt name needs cardinality x width, e.g. 'dia_resnext101_8x32', got {name!r}")
    if imagenet:
        return imagenet_resnet(depth, num_classes, cardinality=spec["cardinality"], base_width=spec["width"], **options)
    # CIFAR ResNeXt: the official code fixes the widen factor at 4 (64-channel base width per group of 8x32)
    options.setdefault("widen_factor", 4)
    return cifar_resnext(depth, spec["cardinality"], num_classes=num_classes, **options)


__all__ = ["create_model", "list_models", "parse_name", "DIANet", "PlainStage", "ATTENTIONS", "PAPER_MODELS",
           "cifar_resnet", "cifar_preresnet", "cifar_wrn", "cifar_resnext", "imagenet_resnet"]
