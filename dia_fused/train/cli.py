"""`python -m dia_fused.train`: CIFAR-10/100 training with the official cifar.py options.

Examples:
    # DIA-ResNet-164 on CIFAR-100 with the paper's recipe (Appendix A)
    python -m dia_fused.train -d cifar100 --data-dir ~/data --preset resnet164 -c runs/dia164
    # the same through the official flags (run_code.py of the official repository)
    python -m dia_fused.train -a dia_resnet -d cifar100 --depth 164 --block-name bottleneck \\
        --epochs 180 --schedule 60 120 --gamma 0.1 --wd 1e-4 -c runs/dia164
    # ablations: no augmentation, reduction 16, DIA only in stage 3
    python -m dia_fused.train --preset resnet164 --no-augment --reduction 16 --dia-stages 3
    # resume (continues exactly: the checkpoint's arguments are the defaults) / evaluate
    python -m dia_fused.train --resume runs/dia164/checkpoint.pth.tar
    python -m dia_fused.train -e --resume runs/dia164/model_best.pth.tar
    # 4 GPUs (--train-batch stays the global batch)
    torchrun --nproc_per_node 4 -m dia_fused.train --preset resnet164 -d cifar100 --data-dir ~/data
    # smoke test / throughput on generated CIFAR-shaped data
    python -m dia_fused.train --preset resnet164 -d synthetic --epochs 1 --max-steps 50 --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import BackendUnavailableError, resolve_backend
from . import checkpoint as ckpt_io
from . import distributed, interrupt, runfolder
from .data import (
    DATASETS,
    BatchStream,
    DatasetError,
    check_global_batch,
    dataset_classes,
    load_datasets,
)
from .errors import NonFiniteError, TrainError, TrainingStopped, WriteError
from .loop import PROGRESS_EVERY, evaluate, learning_rate, set_learning_rate, train_epoch
from .modelspec import (
    ARCH_HELP,
    BACKEND_CHOICES,
    ATTENTION_CHOICES,
    CELL_ACTIVATIONS,
    build_model,
    model_spec,
    spec_mismatch,
)
from .presets import PRESETS
from .records import CsvLog, TensorBoard

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, examples (the module docstring) kept as written."""

    def _get_help_string(self, action):
        # a help text that explains its default itself, and a default of nothing (None, False,
        # ""), get no "(default: ...)" appended
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == ""
        ):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dia_fused.train",
        description="DIANet CIFAR-10/100 training (dia_fused)",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=_HelpFormatter,
    )
    # --- the official cifar.py options (same names, same defaults) ---
    p.add_argument(
        "-d",
        "--dataset",
        default="cifar10",
        choices=DATASETS,
        help="synthetic: generated CIFAR-shaped data (smoke tests, throughput)",
    )
    p.add_argument(
        "-j",
        "--workers",
        default=4,
        type=int,
        metavar="N",
        help="accepted for compatibility; the data lives in memory on the training "
        "device, there are no loader processes",
    )
    p.add_argument(
        "--epochs", default=300, type=int, metavar="N", help="number of total epochs to run"
    )
    p.add_argument(
        "--start-epoch",
        default=0,
        type=int,
        metavar="N",
        help="manual epoch number of a fresh run (a --resume takes the checkpoint's)",
    )
    p.add_argument(
        "--train-batch",
        default=128,
        type=int,
        metavar="N",
        help="global train batch (split over the torchrun processes)",
    )
    p.add_argument(
        "--test-batch",
        default=100,
        type=int,
        metavar="N",
        help="global test batch (split over the torchrun processes)",
    )
    p.add_argument(
        "--lr",
        "--learning-rate",
        default=0.1,
        type=float,
        metavar="LR",
        help="initial learning rate",
    )
    p.add_argument(
        "--drop",
        "--dropout",
        default=0.0,
        type=float,
        metavar="Dropout",
        help="dropout ratio (WRN)",
    )
    p.add_argument(
        "--schedule",
        type=int,
        nargs="+",
        default=[150, 225],
        help="decrease the learning rate at these epochs",
    )
    p.add_argument("--gamma", type=float, default=0.1, help="LR is multiplied by gamma on schedule")
    p.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    p.add_argument(
        "--weight-decay", "--wd", default=5e-4, type=float, metavar="W", help="weight decay"
    )
    p.add_argument(
        "-c",
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="folder for checkpoints and logs (default: 'checkpoint', or the folder of --resume)",
    )
    p.add_argument(
        "--resume",
        default="",
        metavar="PATH",
        help="checkpoint file (or its folder) to continue from",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run that -c already holds (deletes its log and checkpoints); "
        "without it, a folder holding a run is only written by --resume",
    )
    p.add_argument("-a", "--arch", default="dia_resnet", metavar="ARCH", help=ARCH_HELP)
    p.add_argument("--depth", type=int, default=29, help="model depth")
    p.add_argument(
        "--block-name",
        type=str,
        default="BasicBlock",
        help="ResNet/PreResNet block: BasicBlock (depth 6n+2) or Bottleneck (9n+2)",
    )
    p.add_argument("--cardinality", type=int, default=8, help="ResNeXt cardinality (groups)")
    p.add_argument("--widen-factor", type=int, default=4, help="WRN/ResNeXt widen factor")
    p.add_argument("--manualSeed", type=int, default=None, help="seed (default: random, logged)")
    p.add_argument(
        "-e",
        "--evaluate",
        dest="evaluate",
        action="store_true",
        help="evaluate the --resume checkpoint on the test set and exit",
    )
    # --- dia_fused additions ---
    p.add_argument(
        "--data-dir",
        default="datasets",
        help="folder holding cifar-10-batches-py/ or cifar-100-python/",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the paper's hyperparameters (Appendix A) as defaults; explicit flags win",
    )
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="DIA unit backend")
    p.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default=None,
        help="autocast dtype (fp16 adds a gradient scaler)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="no random crop/flip (paper Table 9); normalisation only",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="with torchrun on GPUs: BatchNorm statistics over all processes (default: "
        "per process, like the official DataParallel runs)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    # model ablations (paper Tables 4-8)
    p.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default=None,
        help="override the attention of --arch",
    )
    p.add_argument("--reduction", type=int, default=None, help="reduction ratio r of the DIA unit")
    p.add_argument("--num-cells", type=int, default=None, help="stacked LSTM cells in the DIA unit")
    p.add_argument(
        "--cell-activation",
        choices=CELL_ACTIVATIONS,
        default=None,
        help="act of h = sigmoid(o) * act(c)",
    )
    p.add_argument("--no-norm", action="store_true", help="remove every BatchNorm (Table 8)")
    p.add_argument("--no-skip", action="store_true", help="remove the skip connections (Fig. 6)")
    p.add_argument(
        "--dia-stages",
        type=int,
        nargs="+",
        default=None,
        metavar="STAGE",
        help="1-based stages that keep their attention unit (Table 7)",
    )
    # smoke tests and benchmarks
    p.add_argument(
        "--max-steps", type=int, default=None, help="train at most this many steps per epoch"
    )
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=50000,
        help="--dataset synthetic: train images (test: a fifth)",
    )
    p.add_argument(
        "--synthetic-classes", type=int, default=100, help="--dataset synthetic: number of classes"
    )
    p.add_argument(
        "-p",
        "--print-freq",
        type=int,
        default=PROGRESS_EVERY,
        metavar="N",
        help="progress every N steps: a line with images/s, loss and ETA when the "
        "output is not a terminal (else on tqdm's bar)",
    )
    return p


# flags a --resume does not take from the checkpoint's recorded arguments: where to resume from
# and write to, what to do, and what the checkpoint itself decides (the epoch); the preset's
# values are among the recorded ones
_NOT_RESTORED = frozenset(
    ("resume", "checkpoint", "overwrite", "evaluate", "start_epoch", "preset")
)

_POSITIVE_INTS = (
    "epochs",
    "train_batch",
    "test_batch",
    "synthetic_size",
    "synthetic_classes",
    "print_freq",
    "depth",
    "cardinality",
    "widen_factor",
)
_OPTIONAL_POSITIVE_INTS = ("max_steps", "reduction", "num_cells")
# (name, lowest, lowest allowed, highest, highest allowed) for the float hyperparameters
_FLOAT_RANGES = (
    ("lr", 0.0, False, None, False),
    ("momentum", 0.0, True, 1.0, False),
    ("weight_decay", 0.0, True, None, False),
    ("gamma", 0.0, False, None, False),
    ("drop", 0.0, True, 1.0, False),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _range_text(low, low_ok, high, high_ok) -> str:
    parts = [f"{'>=' if low_ok else '>'} {low:g}"] if low is not None else []
    if high is not None:
        parts.append(f"{'<=' if high_ok else '<'} {high:g}")
    return "a finite number " + " and ".join(parts)


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses out-of-range values (parser.error: exit status 2) before anything is built."""
    for name in _POSITIVE_INTS + tuple(
        n for n in _OPTIONAL_POSITIVE_INTS if getattr(args, n) is not None
    ):
        if getattr(args, name) < 1:
            parser.error(f"{_flag(name)}: expected >= 1, got {getattr(args, name)}")
    for name, low, low_ok, high, high_ok in _FLOAT_RANGES:
        value = getattr(args, name)
        ok = math.isfinite(value) and (value >= low if low_ok else value > low)
        if ok and high is not None:
            ok = value <= high if high_ok else value < high
        if not ok:
            parser.error(
                f"{_flag(name)}: expected {_range_text(low, low_ok, high, high_ok)}, got {value}"
            )
    if any(m < 0 for m in args.schedule):
        parser.error(f"--schedule: expected epochs >= 0, got {args.schedule}")
    if args.workers < 0:
        parser.error(f"--workers: expected >= 0, got {args.workers}")
    if args.start_epoch < 0:
        parser.error(f"--start-epoch: expected >= 0, got {args.start_epoch}")
    if not args.resume and not args.evaluate and args.start_epoch >= args.epochs:
        parser.error(
            f"--start-epoch {args.start_epoch}: expected < --epochs ({args.epochs}); a run from "
            f"epoch {args.start_epoch} to {args.epochs} trains nothing"
        )


def parse_arguments(
    argv: Optional[Sequence[str]] = None,
) -> Tuple[argparse.Namespace, Optional[Dict[str, Any]]]:
    """(arguments, the --resume checkpoint or None). Defaults, lowest first: the parser's, the
    --preset's, the arguments recorded in the --resume checkpoint (so that `--resume CKPT` alone
    continues the run); flags given explicitly win over all of them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)  # usage errors first, and the --preset and --resume given
    if first.preset:
        parser.set_defaults(**PRESETS[first.preset])
    resumed = None
    if first.resume:
        resumed = ckpt_io.load_checkpoint(_resume_file(first.resume))
        saved = resumed.get("args") or {}
        known = {action.dest for action in parser._actions}
        parser.set_defaults(
            **{k: v for k, v in saved.items() if k in known and k not in _NOT_RESTORED}
        )
    args = parser.parse_args(argv)
    _check_values(parser, args)
    # a resume from another working directory finds the data where the run found it
    args.data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    if args.checkpoint is None:
        args.checkpoint = _resume_folder(args.resume) if args.resume else "checkpoint"
    return args, resumed


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The arguments of parse_arguments (--preset sets defaults, explicit flags override them)."""
    return parse_arguments(argv)[0]


def _resume_folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _resume_file(path: str) -> str:
    return os.path.join(path, ckpt_io.CHECKPOINT_NAME) if os.path.isdir(path) else path


class _Printer:
    def __init__(self, ctx: distributed.Context):
        self.ctx = ctx

    def __call__(self, *args) -> None:
        if self.ctx.is_main:
            print(*args, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args, resumed = parse_arguments(argv)
    ctx = distributed.init(args.device)
    try:
        with interrupt.handled():
            return run(args, ctx, resumed)
    except interrupt.Interrupted as err:
        if ctx.is_main and not args.evaluate:
            print(f"\n==> {err}: {_last_epoch_note(args.checkpoint)}", file=sys.stderr, flush=True)
        raise
    finally:
        distributed.shutdown(ctx)


def _last_epoch_note(folder: str) -> str:
    path = os.path.join(folder, ckpt_io.CHECKPOINT_NAME)
    try:
        epoch = int(ckpt_io.load_checkpoint(path)["epoch"])
    except (FileNotFoundError, ValueError, KeyError):
        return f"no epoch had finished ({path} does not hold one)"
    return f"{path} holds the last completed epoch ({epoch}); continue with --resume {path}"


def command(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dia_fused.train`: runs main and returns the exit status; an error the user can
    act on is one `error:` line on stderr (status 2 for bad input, 1 for a run that had to stop),
    without a traceback."""
    try:
        main(argv)
    except (DatasetError, BackendUnavailableError, TrainError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return getattr(err, "exit_status", 2)
    except interrupt.Interrupted as err:  # the run said what it kept
        return err.exit_status
    return 0


# flags that describe the model (compared through the model description) or that do not change
# how a resumed run trains
_NOT_SETTINGS = frozenset(
    (
        "arch",
        "depth",
        "block_name",
        "cardinality",
        "widen_factor",
        "drop",
        "attention",
        "reduction",
        "num_cells",
        "cell_activation",
        "no_norm",
        "no_skip",
        "dia_stages",
        "preset",
        "resume",
        "checkpoint",
        "overwrite",
        "evaluate",
        "start_epoch",
        "manualSeed",
        "workers",
    )
)


def changed_settings(saved: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """'--flag old -> new' for each training setting whose value differs from the checkpoint's
    run (values are compared, so a flag passed with the value of the original run is no
    change)."""
    changes = []
    for key, value in sorted(vars(args).items()):
        if key in _NOT_SETTINGS or key not in saved or saved[key] == value:
            continue
        changes.append(f"--{key.replace('_', '-')} {saved[key]!r} -> {value!r}")
    return changes


def _stop_if_not_finite(
    train_loss: float, model: nn.Module, epoch: int, lr: float, args: argparse.Namespace
) -> None:
    """Raises NonFiniteError, before the epoch's files are written, when its training loss or the
    weights it leaves (parameters and buffers) are NaN or infinite: the files of the last good
    epoch stay as they are."""
    bad = [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if math.isfinite(train_loss) and not bad:
        return
    what = (
        f"the training loss is {train_loss}"
        if not math.isfinite(train_loss)
        else f"the weights are not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    )
    hint = "lower --lr" + (" or train without --amp fp16" if args.amp == "fp16" else "")
    raise NonFiniteError(
        f"epoch {epoch + 1}: {what} (LR {lr:g}); stopped without saving it: "
        f"{_last_epoch_note(args.checkpoint)}; {hint}"
    )


@contextlib.contextmanager
def _saving(folder: str):
    """A failed write of the epoch's files says what the folder still holds."""
    try:
        yield
    except WriteError as err:
        raise WriteError(f"{err}: {_last_epoch_note(folder)}") from err


def _build(spec: Dict[str, Any], args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The model of `spec` on `device` (meta: only checks that the flags describe one)."""
    try:
        if device.type == "meta":
            with torch.device("meta"):
                return build_model(spec, backend=args.backend)
        return build_model(spec, backend=args.backend).to(device)
    except (TypeError, ValueError) as err:
        hint = ""
        if "depth" in str(err) and args.depth == build_parser().get_default("depth"):
            hint = (
                f" (--depth {args.depth} is cifar.py's default, ResNeXt-29's: pass the depth "
                f"of the model you want, e.g. --depth 20, or a --preset)"
            )
        raise TrainError(
            f"the model flags ({spec['name']} {spec['options']}): {err}{hint}"
        ) from err


def run(
    args: argparse.Namespace,
    ctx: distributed.Context,
    resumed: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Trains (or evaluates, -e) as `args` say; `resumed`: the --resume checkpoint when already
    loaded (parse_arguments), else it is loaded here."""
    say = _Printer(ctx)
    device = ctx.device
    resolve_backend(args.backend, device)  # an unusable --backend fails now, saying why
    for flag, batch in (("--train-batch", args.train_batch), ("--test-batch", args.test_batch)):
        try:
            check_global_batch(flag, batch, ctx.world_size)
        except ValueError as err:
            raise TrainError(str(err)) from err
    resume_file = _resume_file(args.resume) if args.resume else None
    if resume_file and resumed is None:
        resumed = ckpt_io.load_checkpoint(resume_file)
    if not args.evaluate:  # before any work: a refused folder costs nothing
        runfolder.check(args.checkpoint, resume_file=resume_file, overwrite=args.overwrite)

    # The seed decides the model initialisation and every epoch's data stream; a resumed run
    # keeps the checkpoint's.
    if resumed is not None and not args.evaluate:
        if "seed" not in resumed:
            raise TrainError(
                f"--resume {args.resume}: the checkpoint has no 'seed' (not written "
                f"by dia_fused.train), so the run cannot continue exactly; evaluate "
                f"it with -e"
            )
        seed = int(resumed["seed"])
        if args.manualSeed is not None and args.manualSeed != seed:
            say(
                f"==> --manualSeed {args.manualSeed} ignored: resuming with the checkpoint's seed "
                f"{seed}"
            )
    else:
        seed = args.manualSeed if args.manualSeed is not None else random.randint(1, 10000)
    seed = distributed.broadcast_object(ctx, seed)

    # the model is described and compared with the checkpoint's before any data is read: a flag
    # that differs from the run's is reported as that, not as a problem with the data
    num_classes = dataset_classes(args.dataset, args.synthetic_classes)
    spec = model_spec(args, num_classes)
    if resumed is not None and "model" in resumed:
        problem = spec_mismatch(resumed["model"], spec)
        if problem:
            raise TrainError(
                f"--resume {args.resume}: the command line describes another model "
                f"than the checkpoint ({problem}); pass the flags of the original run, or "
                f"leave them out (the checkpoint's are the defaults)"
            )
    if resumed is not None and not args.evaluate:
        changes = changed_settings(dict(resumed.get("args") or {}), args)
        if changes:
            say(
                f"==> resuming with settings that differ from the checkpoint's run: "
                f"{', '.join(changes)} (the run no longer continues as the original would have)"
            )

    _build(spec, args, torch.device("meta"))  # bad model flags fail before the data loads

    say(f"==> Preparing dataset {args.dataset}")
    train_set, test_set = load_datasets(
        args.dataset, args.data_dir, args.synthetic_size, args.synthetic_classes
    )
    train_set, test_set = train_set.to(device), test_set.to(device)

    ckpt_io.seed_everything(seed)  # identical initial weights on every process
    say(f"==> creating model {spec['name']} {spec['options']}")
    model = _build(spec, args, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    say(f"    Total params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    amp_dtype = AMP_DTYPES.get(args.amp)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    start_epoch, best_acc = args.start_epoch, 0.0
    if resumed is not None:
        model.load_state_dict(ckpt_io.model_state_dict(resumed))
        if not args.evaluate:
            optimizer.load_state_dict(resumed["optimizer"])
            if scaler is not None and resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
            start_epoch, best_acc = int(resumed["epoch"]), float(resumed.get("best_acc", 0.0))
            rng = resumed.get("rng") or []
            if len(rng) == ctx.world_size:
                ckpt_io.set_rng_state(rng[ctx.rank], device)
            else:
                ckpt_io.seed_everything(seed + 7919 * (start_epoch + 1) + ctx.rank)
                say(
                    f"==> the checkpoint holds RNG states of {len(rng)} processes, this run has "
                    f"{ctx.world_size}: dropout streams are reseeded (data order is unaffected)"
                )
        say(f"==> Resumed from {args.resume} (epoch {int(resumed['epoch'])})")
    else:
        # per-process streams for dropout; rank 0 continues the single-process stream
        if ctx.rank:
            ckpt_io.seed_everything(seed + ctx.rank)

    test_stream = BatchStream(
        test_set,
        args.test_batch,
        train=False,
        augment=False,
        seed=seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        channels_last=args.channels_last,
    )
    if args.evaluate:
        if resumed is None:
            say("==> -e without --resume: evaluating freshly initialised weights")
        result = evaluate(
            model,
            test_stream,
            criterion,
            ctx,
            amp_dtype=amp_dtype,
            desc="Test",
            print_freq=args.print_freq,
        )
        say(f" Test Loss:  {result.loss:.8f}, Test Acc:  {result.acc:.2f}")
        return {"test_loss": result.loss, "test_acc": result.acc, "seed": seed}

    bare_model = model
    if args.sync_bn:
        if not (ctx.enabled and device.type == "cuda"):
            raise TrainError(
                "--sync-bn: needs torchrun with several GPU processes (PyTorch's "
                "SyncBatchNorm runs on GPUs only)"
            )
        model = bare_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    train_stream = BatchStream(
        train_set,
        args.train_batch,
        train=True,
        augment=not args.no_augment,
        seed=seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        channels_last=args.channels_last,
        max_steps=args.max_steps,
    )
    log = board = None
    if ctx.is_main:
        best_acc = runfolder.prepare(
            args.checkpoint,
            resumed=resumed,
            resume_file=resume_file,
            overwrite=args.overwrite,
            say=say,
        )
        log = CsvLog(args.checkpoint, resume_epoch=start_epoch if resumed is not None else None)
        board = TensorBoard(args.checkpoint)
        if not board.available:
            say(f"==> {board.reason}")
    say(
        f"==> seed {seed}, {ctx.world_size} process(es) on {device.type}, "
        f"{len(train_stream)} steps/epoch, checkpoints in {args.checkpoint}"
    )

    history: List[Dict[str, float]] = []
    for epoch in range(start_epoch, args.epochs):
        lr = learning_rate(epoch, args.lr, args.schedule, args.gamma)
        set_learning_rate(optimizer, lr)
        say(f"\nEpoch: [{epoch + 1} | {args.epochs}] LR: {lr:f}")
        begin = time.perf_counter()
        train = train_epoch(
            model,
            train_stream,
            epoch,
            optimizer,
            criterion,
            ctx,
            amp_dtype=amp_dtype,
            scaler=scaler,
            desc=f"Train {epoch + 1}",
            print_freq=args.print_freq,
        )
        _stop_if_not_finite(train.loss, bare_model, epoch, lr, args)
        test = evaluate(
            bare_model,
            test_stream,
            criterion,
            ctx,
            amp_dtype=amp_dtype,
            desc=f"Test {epoch + 1}",
            print_freq=args.print_freq,
        )
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train.loss,
            "train_acc": train.acc,
            "test_loss": test.loss,
            "test_acc": test.acc,
            "epoch_time_s": time.perf_counter() - begin,
            "train_images_per_s": train.images_per_s,
        }
        history.append(row)
        say(
            f"    train loss {train.loss:.4f} acc {train.acc:.2f} | test loss {test.loss:.4f} "
            f"acc {test.acc:.2f} | {row['epoch_time_s']:.1f}s, "
            f"{train.images_per_s:.1f} train images/s"
        )
        # an epoch with no best model on disk yet (0% accuracy, a deleted file) makes one
        is_best = test.acc > best_acc or not os.path.isfile(
            os.path.join(args.checkpoint, ckpt_io.BEST_NAME)
        )
        best_acc = max(best_acc, test.acc)
        rng = distributed.all_gather_object(ctx, ckpt_io.rng_state(device))
        # a signal now waits for the epoch's files: the last completed epoch is kept
        with interrupt.deferred(), _saving(args.checkpoint):
            if ctx.is_main:
                # log row first: if the run dies before the checkpoint, the resume moves the
                # row to log_superseded.csv and runs the epoch again
                log.append(row)
                board.log(row)
                state = {
                    "format": ckpt_io.FORMAT,
                    "epoch": epoch + 1,
                    "state_dict": bare_model.state_dict(),
                    "acc": test.acc,
                    "best_acc": best_acc,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "seed": seed,
                    "model": spec,
                    "args": vars(args),
                    "rng": rng,
                }
                ckpt_io.save_epoch(args.checkpoint, state, is_best)
        distributed.barrier(ctx)
    if board is not None:
        board.close()
    say(f"Best acc:\n{best_acc}")
    return {
        "best_acc": best_acc,
        "history": history,
        "seed": seed,
        "checkpoint": os.path.join(args.checkpoint, ckpt_io.CHECKPOINT_NAME),
    }
