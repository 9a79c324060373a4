"""Model-level benchmark, all in one run: DIA-ResNet-164 (dia_fused, reference eager, reference
compiled), SE-ResNet-164 and plain ResNet-164 on CIFAR-100 shapes: one SGD train step (forward,
backward, update) and inference, fp32 and bf16 autocast, median over timed steps after warm-up.

    python bench/model_bench.py --json model_bench.json    # on a GPU: minutes (inductor compiles)
    python bench/model_bench.py --quick --json quick.json   # quick CPU check: under a minute

With torchvision importable, also its resnet50 plain and after `dia_fused.add_dia` (reduction 16,
backend auto): torchvision_resnet50 / torchvision_resnet50_dia, on the same 32x32 inputs.
--quick: depth 20, batch 4, 3 timed steps after 1 warm-up, fp32 only, without dia_compiled (the
inductor compile of a whole model takes minutes on a CPU); an option given with it wins.
With pytorchcv installed, also its DIA model of the same depth (--pytorchcv-model, default
pytorchcv's CIFAR-100 DIA-ResNet of --depth: diaresnet164bn_cifar100, diaresnet20_cifar100, ...)
as shipped and after `dia_fused.accelerate` (in place, backend auto): pytorchcv_dia /
pytorchcv_dia_accelerated, and pytorchcv_dia_accelerated_{train,infer}_speedup; a depth pytorchcv
has no model of leaves them out of the default variants.

Keys: {plain,se,dia_fused,dia_triton,dia_cuda,dia_reference,dia_compiled}_{train,infer}_ms for fp32
(dia_fused = backend "auto"; dia_triton / dia_cuda where that backend runs), the same with a `bf16_`
prefix for autocast, ratios to plain, auto's backend per DIA unit
({,bf16_}dia_fused_{train,infer}_backends), plus device, versions and the settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

import dia_fused
from dia_fused import DIALSTM
from dia_fused.models import create_model

PYTORCHCV = "pytorchcv"  # a pytorchcv model (--pytorchcv-model) instead of a dia_fused name
TORCHVISION = "torchvision"  # torchvision's resnet50 (100 classes), plain or after add_dia
VARIANTS = {  # key -> (model name prefix, options, compiled)
    "plain": ("resnet", {}, False),
    "se": ("se_resnet", {}, False),
    "dia_fused": ("dia_resnet", {"backend": "auto"}, False),
    "dia_triton": ("dia_resnet", {"backend": "triton"}, False),
    "dia_cuda": ("dia_resnet", {"backend": "cuda"}, False),
    "dia_reference": ("dia_resnet", {"backend": "reference"}, False),
    "dia_compiled": ("dia_resnet", {"backend": "reference"}, True),
    "pytorchcv_dia": (PYTORCHCV, {}, False),
    "pytorchcv_dia_accelerated": (PYTORCHCV, {"accelerate": "auto"}, False),
    "torchvision_resnet50": (TORCHVISION, {}, False),
    "torchvision_resnet50_dia": (TORCHVISION, {"add_dia": 16}, False),
}
EXPLICIT_FUSED = {"dia_triton": "triton", "dia_cuda": "cuda"}  # run by default where available
# --quick: the settings it stands for (options given with it win) and the variants it leaves out
QUICK = {"depth": 20, "batch": 4, "steps": 3, "warmup": 1, "bf16": False}
QUICK_LEFT_OUT = ("dia_compiled",)


def pytorchcv_installed() -> bool:
    try:
        import pytorchcv  # noqa: F401
    except ImportError:
        return False
    return True


def torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 (beside a CPU build of torch its C++ ops fail to load)
        return False
    return True


def default_variants(device, pytorchcv_model_name) -> list:
    return [
        key
        for key in VARIANTS
        if (
            key not in EXPLICIT_FUSED
            or dia_fused.backend_unavailable_reason(EXPLICIT_FUSED[key], device) is None
            and torch.device(device).type == "cuda"
        )
        and (VARIANTS[key][0] != PYTORCHCV or pytorchcv_model_name is not None)
        and (VARIANTS[key][0] != TORCHVISION or torchvision_importable())
    ]


def _pytorchcv_factory(name: str):
    """pytorchcv's constructor of DIA model `name`, or None; from the model's own module
    (pytorchcv's model_provider imports every family, some of which need packages that are not
    installed)."""
    import importlib

    if not name.startswith("dia"):
        return None
    family = "diapreresnet" if name.startswith("diapreresnet") else "diaresnet"
    module = family + ("_cifar" if name.endswith(("_cifar10", "_cifar100", "_svhn")) else "")
    return getattr(importlib.import_module(f"pytorchcv.models.{module}"), name, None)


def default_pytorchcv_model(depth: int):
    """pytorchcv's CIFAR-100 DIA-ResNet of `depth` (bottleneck models carry `bn` in the name), or
    None where pytorchcv is not installed or has no DIA-ResNet of that depth."""
    if not pytorchcv_installed():
        return None
    for name in (f"diaresnet{depth}bn_cifar100", f"diaresnet{depth}_cifar100"):
        if _pytorchcv_factory(name) is not None:
            return name
    return None


def pytorchcv_model(name: str) -> nn.Module:
    """A pytorchcv DIA model by name."""
    factory = _pytorchcv_factory(name)
    if factory is None:
        raise ValueError(
            f"--pytorchcv-model: expected a pytorchcv DIA model name (diaresnet*, "
            f"diapreresnet*), got {name!r}"
        )
    return factory()


def build_model(key, args):
    prefix, options, _ = VARIANTS[key]
    if prefix == TORCHVISION:
        import torchvision

        model = torchvision.models.resnet50(num_classes=100)
        if "add_dia" in options:  # in place, reduction 16, backend auto
            dia_fused.add_dia(model, reduction=options["add_dia"])
        return model
    if prefix != PYTORCHCV:
        return create_model(f"{prefix}{args.depth}", num_classes=100, **options)
    model = pytorchcv_model(args.pytorchcv_model)
    if "accelerate" in options:  # in place: the same model object
        dia_fused.accelerate(model, backend=options["accelerate"])
        if not dia_fused.fused_stages(model):
            raise RuntimeError(f"{args.pytorchcv_model}: accelerate fused no stage")
    return model


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> float:
    """Median wall time of `step` in ms, each step synchronised, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_variant(key, args, device, amp_dtype):
    compiled = VARIANTS[key][2]
    torch.manual_seed(0)
    model = build_model(key, args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)  # valid for 10 and 100 classes
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def train_step():
        with autocast:
            loss = nn.functional.cross_entropy(runner(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.no_grad(), autocast:
            runner(x)

    model.train()
    backends = {"train": unit_backends(model, train_step)}
    train_ms = time_steps(train_step, device, args.warmup, args.steps)
    model.eval()
    backends["infer"] = unit_backends(model, infer_step)
    infer_ms = time_steps(infer_step, device, args.warmup, args.steps)
    return train_ms, infer_ms, backends


def unit_backends(model, step) -> str:
    """The backend each DIA unit of `model` runs with in one call of `step` (auto decides per step
    shape), as 'cuda/cuda/triton' in stage order; '' without DIA units."""
    chosen = {}

    def record(unit, args):
        chosen.setdefault(unit, unit.resolved_backend(args[0]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, DIALSTM)]
    try:
        step()
    finally:
        for hook in hooks:
            hook.remove()
    return "/".join(chosen.values())


def run(args) -> dict:
    device = torch.device(args.device)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dia_fused": dia_fused.__version__,
        "depth": args.depth,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "channels_last": args.channels_last,
        "pytorchcv_model": (
            args.pytorchcv_model
            if any(VARIANTS[k][0] == PYTORCHCV for k in args.variants)
            else None
        ),
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    precisions = [("", None)] + ([("bf16_", torch.bfloat16)] if args.bf16 else [])
    for label, amp_dtype in precisions:
        for key in args.variants:
            train_ms, infer_ms, backends = bench_variant(key, args, device, amp_dtype)
            result[f"{label}{key}_train_ms"] = train_ms
            result[f"{label}{key}_infer_ms"] = infer_ms
            if key == "dia_fused":  # auto's choice per unit, e.g. "cuda/cuda/triton"
                result.update(
                    {f"{label}dia_fused_{phase}_backends": b for phase, b in backends.items()}
                )
            print(
                f"{label or 'fp32_'}{key:<14} train {train_ms:9.2f} ms   infer {infer_ms:9.2f} ms",
                file=sys.stderr,
                flush=True,
            )
        if {"pytorchcv_dia", "pytorchcv_dia_accelerated"} <= set(args.variants):
            for phase in ("train", "infer"):
                before = result[f"{label}pytorchcv_dia_{phase}_ms"]
                after = result[f"{label}pytorchcv_dia_accelerated_{phase}_ms"]
                result[f"{label}pytorchcv_dia_accelerated_{phase}_speedup"] = before / after
        for key in args.variants:
            if key != "plain" and "plain" in args.variants:
                for phase in ("train", "infer"):
                    result[f"{label}{key}_{phase}_ratio_to_plain"] = (
                        result[f"{label}{key}_{phase}_ms"] / result[f"{label}plain_{phase}_ms"]
                    )
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a CPU check in under a minute: "
        + ", ".join(f"--{k} {v}" for k, v in QUICK.items())
        + f", without {', '.join(QUICK_LEFT_OUT)} (options given with it win)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--depth", type=int, default=None, help="ResNet depth (bottleneck: 9n+2; default 164)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default 128")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (median reported; default 20)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 5")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        help="default: all, dia_triton / dia_cuda where that backend runs on the device",
    )
    parser.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        default=None,
        help="skip the bf16 autocast runs",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--pytorchcv-model",
        default=None,
        help="the pytorchcv DIA model of the pytorchcv_dia variants (default: pytorchcv's "
        "CIFAR-100 DIA-ResNet of --depth)",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"depth": 164, "batch": 128, "steps": 20, "warmup": 5}
    for name, value in {"bf16": True, **defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "steps", "depth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected >= 0, got {args.warmup}")
    if args.pytorchcv_model is None:
        args.pytorchcv_model = default_pytorchcv_model(args.depth)
    elif not pytorchcv_installed():
        parser.error(
            "--pytorchcv-model: pytorchcv is not installed "
            "(pip install --no-deps pytorchcv==0.0.74)"
        )
    elif _pytorchcv_factory(args.pytorchcv_model) is None:
        parser.error(
            f"--pytorchcv-model: expected a pytorchcv DIA model name (diaresnet*, "
            f"diapreresnet*), got {args.pytorchcv_model!r}"
        )
    if args.variants is None:
        args.variants = default_variants(args.device, args.pytorchcv_model)
        if args.quick:
            args.variants = [key for key in args.variants if key not in QUICK_LEFT_OUT]
    elif args.pytorchcv_model is None and any(VARIANTS[k][0] == PYTORCHCV for k in args.variants):
        parser.error(
            f"--variants pytorchcv_dia*: pytorchcv is not installed or has no DIA-ResNet of "
            f"depth {args.depth}; name one with --pytorchcv-model"
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
