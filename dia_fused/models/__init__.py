"""DIANet model zoo: `create_model(name, num_classes=..., **options)` and `list_models()`.

Names follow one grammar, each part used by its family and nothing else:

    [se_|dia_|dia_se_]resnet{depth}[_cifar]          CIFAR ResNet (basic 6n+2 / bottleneck 9n+2);
                                                     depths 18/34/50/101/152: ImageNet ResNet,
                                                     `_cifar` forces the CIFAR one
    [se_|dia_|dia_se_]preresnet{depth}               CIFAR PreResNet
    [se_|dia_|dia_se_]wrn{depth}_{k}                 CIFAR Wide ResNet of widen factor k
    [se_|dia_|dia_se_]resnext{depth}_{card}x{width}[d][_cifar]
                                                     ResNeXt: `card` groups of `width` channels in
                                                     the first stage (doubling per stage); depth
                                                     50: ImageNet, else CIFAR (9n+2, widen factor
                                                     option 4: 128/256/512 output channels)

The prefix is the attention (none: plain). Numbers have no leading zeros. E.g. `resnet164`,
`se_resnet164`, `dia_resnet164`, `dia_preresnet164`, `dia_wrn52_4`, `dia_resnext101_8x32`,
`dia_resnet50`, `dia_resnext50_32x4d`. A name the grammar does not allow is an error that lists
the closest names. Options: attention (overrides the prefix), reduction (of the attention module:
DIA-LSTM, DIA-SE or per-block SE), num_cells, cell_activation and backend (DIA-LSTM), dia_stages
(stages with the shared unit), dia_blocks (ImageNet: EAN's per-stage masks of the blocks that
use the stage's unit), norm (False: no BatchNorm), skip (False: no skip connections), and the
family's own (block, dropout, widen_factor, ...); one the model would not use is an error.
"""

from __future__ import annotations

import difflib
import inspect
import re

from .blocks import ATTENTIONS, DIANet, PlainStage
from .networks import (
    IMAGENET_LAYERS,
    cifar_preresnet,
    cifar_resnet,
    cifar_resnext,
    cifar_wrn,
    imagenet_resnet,
)

_NUMBER = r"[1-9][0-9]*"
_NAME = re.compile(
    rf"(?:(?P<attention>dia_se|dia|se)_)?(?P<family>preresnet|resnext|resnet|wrn)"
    rf"(?P<depth>{_NUMBER})(?:_(?P<card>{_NUMBER})x(?P<width>{_NUMBER})d?"
    rf"|_(?P<widen>{_NUMBER}))?(?P<cifar>_cifar)?"
)
# the parts after the depth each family takes: (required suffix or None, `_cifar` allowed)
_FAMILY_PARTS = {
    "resnet": (None, True),
    "preresnet": (None, False),
    "wrn": ("widen", False),
    "resnext": ("group", True),
}
_PART_TEXT = {
    "widen": "widen factor '_{k}'",
    "group": "cardinality x width '_{card}x{width}'",
    "cifar": "'_cifar' suffix",
}
# options that a family's name sets (a ResNet: one group of the standard width); passing them
# too would be a second, conflicting value
_NAME_OPTIONS = {
    "resnet": ("depth", "cardinality", "base_width"),
    "preresnet": ("depth",),
    "wrn": ("depth", "widen_factor"),
    "resnext": ("depth", "cardinality", "base_width"),
}

# the paper's models (Tables 3-8, Figure 6); any name of the grammar works
PAPER_MODELS = tuple(
    f"{prefix}{body}"
    for prefix in ("", "se_", "dia_", "dia_se_")
    for body in (
        "resnet20",
        "resnet56",
        "resnet83",
        "resnet164",
        "resnet245",
        "resnet326",
        "resnet407",
        "preresnet164",
        "wrn52_4",
        "resnext101_8x32",
        "resnet34",
        "resnet50",
        "resnet152",
        "resnext50_32x4d",
    )
)


def list_models():
    """Names of the paper's models (the grammar of create_model accepts more)."""
    return list(PAPER_MODELS)


def _name_error(name, problem: str, repairs=()) -> ValueError:
    """ValueError for a name outside the grammar with the closest names (difflib): the paper's
    models and the name repaired (a part dropped or added, whitespace or capitals removed),
    which is always among them."""
    text = name.strip().lower()
    if text != name and _NAME.fullmatch(text):
        repairs = (text, *repairs)
    candidates = list(dict.fromkeys([*repairs, *PAPER_MODELS]))
    close = difflib.get_close_matches(text, candidates, n=3, cutoff=0.6) if text else []
    kept = [r for r in dict.fromkeys(repairs) if r not in close]
    suggestions = close[: 3 - len(kept)] + kept
    hint = f"; did you mean {' or '.join(map(repr, suggestions))}?" if suggestions else ""
    return ValueError(f"name: {problem}, got {name!r}{hint}")


def _repaired(g: dict) -> str:
    """The name of parts `g` with the parts its family does not use dropped and a missing one
    added (the paper's: WRN-52-4's widen factor 4, ResNeXt 8x32 on CIFAR, 32x4d on ImageNet)."""
    family = g["family"]
    required, cifar_allowed = _FAMILY_PARTS[family]
    suffix = ""
    if required == "widen":
        suffix = f"_{g['widen'] or 4}"
    elif required == "group":
        paper = "_32x4d" if g["depth"] == "50" and not g["cifar"] else "_8x32"
        suffix = f"_{g['card']}x{g['width']}" if g["card"] else paper
    attention = f"{g['attention']}_" if g["attention"] else ""
    cifar = g["cifar"] if cifar_allowed and g["cifar"] else ""
    return f"{attention}{family}{g['depth']}{suffix}{cifar}"


def parse_name(name: str) -> dict:
    """The parts of a model name: attention, family, depth, cardinality, width, widen, cifar."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    match = _NAME.fullmatch(name)
    if match is None:
        raise _name_error(
            name,
            "expected [se_|dia_|dia_se_]family{depth}[_widen|_CxW] (numbers "
            ">= 1 without leading zeros), e.g. 'dia_resnet164', "
            "'dia_wrn52_4', 'dia_resnext101_8x32'",
        )
    g = match.groupdict()
    family = g["family"]
    required, cifar_allowed = _FAMILY_PARTS[family]
    given = ["widen"] if g["widen"] else ["group"] if g["card"] else []
    unused = [part for part in given if part != required]
    if g["cifar"] and not cifar_allowed:
        unused.append("cifar")
    missing = required is not None and required not in given
    if unused or missing:
        problem = (
            f"a {family} name takes no {' and no '.join(_PART_TEXT[p] for p in unused)}"
            if unused
            else f"a {family} name needs its {_PART_TEXT[required]}"
        )
        raise _name_error(name, problem, [_repaired(g)])
    return {
        "attention": g["attention"] or "none",
        "family": family,
        "depth": int(g["depth"]),
        "cardinality": int(g["card"]) if g["card"] else None,
        "width": int(g["width"]) if g["width"] else None,
        "widen": int(g["widen"]) if g["widen"] else None,
        "cifar": bool(g["cifar"]),
    }


def create_model(name: str, num_classes: int = None, **options) -> DIANet:
    """Builds the network `name`; `options` override the name's attention and the defaults."""
    spec = parse_name(name)
    fixed = [key for key in _NAME_OPTIONS[spec["family"]] if key in options]
    if fixed:
        raise ValueError(
            f"{fixed[0]}: set by the name {name!r} (change the name instead), got "
            f"{fixed[0]}={options[fixed[0]]!r}"
        )
    options.setdefault("attention", spec["attention"])
    family, depth = spec["family"], spec["depth"]
    imagenet = not spec["cifar"] and (
        (family == "resnet" and depth in IMAGENET_LAYERS) or (family == "resnext" and depth == 50)
    )
    if num_classes is None:
        num_classes = 1000 if imagenet else 10
    if family == "resnet":
        build, args = (imagenet_resnet if imagenet else cifar_resnet), (depth, num_classes)
    elif family == "preresnet":
        build, args = cifar_preresnet, (depth, num_classes)
    elif family == "wrn":
        build, args = cifar_wrn, (depth, spec["widen"], num_classes)
    elif imagenet:
        build, args = imagenet_resnet, (depth, num_classes)
        options.update(cardinality=spec["cardinality"], base_width=spec["width"])
    else:
        build, args = cifar_resnext, (depth, spec["cardinality"])
        options.update(num_classes=num_classes, base_width=spec["width"])
    _check_option_names(name, build, len(args), options)
    return build(*args, **options)


def _check_option_names(name: str, build, given_positionally: int, options: dict) -> None:
    """TypeError naming an option the model `name` does not take (with the closest ones), rather
    than the builder's own unexpected-keyword error."""
    parameters = list(inspect.signature(build).parameters)[given_positionally:]
    fixed = (*_NAME_OPTIONS[parse_name(name)["family"]], "num_classes")
    takes = [p for p in parameters if p not in fixed]
    for key in options:
        if key not in parameters:
            close = difflib.get_close_matches(key, takes, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise TypeError(
                f"create_model({name!r}): unknown option {key!r}{hint} "
                f"(the options of {name}: {', '.join(takes)})"
            )


__all__ = [
    "create_model",
    "list_models",
    "parse_name",
    "DIANet",
    "PlainStage",
    "ATTENTIONS",
    "PAPER_MODELS",
    "cifar_resnet",
    "cifar_preresnet",
    "cifar_wrn",
    "cifar_resnext",
    "imagenet_resnet",
]
