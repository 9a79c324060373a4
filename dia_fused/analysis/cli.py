"""`python -m dia_fused.analysis`: the paper's analysis figures.

    # Figure 5: Gini importance between the layers of each stage of a trained DIANet
    python -m dia_fused.analysis gini runs/dia164/model_best.pth.tar --images 2000 -o gini.png
    # Figure 6: |gradient| at each stage output of a skip-free ResNet-56, with and without DIA
    python -m dia_fused.analysis gradients -d cifar100 --data-dir ~/data -o figures/gradients.png
    python -m dia_fused.analysis gradients --dia-checkpoint a.pth.tar --plain-checkpoint b.pth.tar

Each command writes the PNG and, next to it, the numbers behind it (.npz) and prints a summary.
By default the PNG goes next to the checkpoint (gini.png, gradients.png next to --dia-checkpoint,
else --plain-checkpoint); without a checkpoint, -o names it. Both need the `analysis` extra
(pip install "dia_fused[analysis]": matplotlib, scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import command_line
from ..modules import DIAStage
from ..ops import BACKEND_CHOICES, BackendUnavailableError
from ..train import checkpoint as ckpt_io
from ..train.data import DATASETS, BatchStream, DatasetError, load_datasets
from ..train.distributed import pick_device
from ..train.modelspec import build_model, resolved_options
from . import gini as gini_mod
from . import gradients as grad_mod


class AnalysisError(ValueError):
    """A command line the analysis cannot run with; `python -m dia_fused.analysis` prints it in
    one line."""


def check_output(path: str) -> None:
    """Makes sure the figure (and the .npz next to it) can be written, before any computation:
    creates a missing folder, refuses a folder, an unwritable folder or an unwritable file."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise AnalysisError(
            f"-o {path}: is a folder; expected a file path such as "
            f"{os.path.join(path, 'figure.png')}"
        )
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # the permission bits do not tell for root
            pass
    except OSError as err:
        raise AnalysisError(
            f"-o {path}: cannot write into the folder {folder} ({err.strerror or err})"
        ) from err
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise AnalysisError(f"-o {path}: the file exists and is read-only")


def _add_data_args(p: argparse.ArgumentParser, dataset_default: Optional[str]) -> None:
    p.add_argument(
        "-d",
        "--dataset",
        choices=DATASETS,
        default=dataset_default,
        help="data to run the model on"
        + (" (default: the checkpoint's)" if dataset_default is None else ""),
    )
    p.add_argument("--data-dir", default=None, help="folder holding the CIFAR python-pickle files")
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=None,
        help="--dataset synthetic: train images (test: a fifth)",
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if any)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="DIA unit backend")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = command_line.ArgumentParser(
        prog="python -m dia_fused.analysis",
        description="DIANet analysis figures (paper Figures 5, 6)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "gini",
        help="Figure 5: random-forest Gini importance between layers",
        description=gini_mod.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("checkpoint", help="a checkpoint written by python -m dia_fused.train")
    _add_data_args(g, None)
    g.add_argument(
        "--images",
        type=int,
        default=1000,
        help="test images whose attention vectors are the samples",
    )
    g.add_argument(
        "--mode",
        choices=gini_mod.FEATURE_MODES,
        default="vector",
        help="how samples and features are formed (see the description above)",
    )
    g.add_argument("--trees", type=int, default=100, help="trees per forest")
    g.add_argument(
        "--max-features",
        type=float,
        default=1 / 3,
        help="fraction of input columns tried per split (1/3: R randomForest's "
        "regression default; 1.0: all)",
    )
    g.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="subsample rows per forest (bounds the cost of --mode channel)",
    )
    g.add_argument("--jobs", type=int, default=None, help="scikit-learn n_jobs")
    g.add_argument(
        "-o", "--out", default=None, help="PNG path (default: gini.png next to the checkpoint)"
    )

    r = sub.add_parser(
        "gradients",
        help="Figure 6: |gradient| at stage outputs, skip-free nets",
        description=grad_mod.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_args(r, "synthetic")
    r.add_argument(
        "--arch",
        default="resnet56",
        help="zoo name of the backbone (built with skip=False, attention none / dia)",
    )
    r.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the classifier (default: the dataset's)",
    )
    r.add_argument("--batches", type=int, default=4, help="batches whose gradients are counted")
    r.add_argument(
        "--dia-checkpoint",
        default=None,
        help="weights of the DIA model (default: fresh initialisation from --seed)",
    )
    r.add_argument("--plain-checkpoint", default=None, help="weights of the model without DIA")
    r.add_argument(
        "--max-values", type=int, default=200_000, help="|gradient| values kept per stage and model"
    )
    r.add_argument(
        "-o",
        "--out",
        default=None,
        help="PNG path (default: gradients.png next to --dia-checkpoint, else "
        "--plain-checkpoint; without a checkpoint it must be given)",
    )
    return parser


def _batches(stream: BatchStream, limit: int):
    for index, batch in enumerate(stream.epoch(0)):
        if index >= limit:
            break
        yield batch


def _data(dataset: str, data_dir: Optional[str], synthetic_size: Optional[int], device):
    train, test = load_datasets(dataset, data_dir, synthetic_size or 5000)
    return train.to(device), test.to(device)


def _device(name: Optional[str]):
    try:
        return pick_device(name, 0)
    except (ValueError, RuntimeError) as err:  # RuntimeError: torch.device's parse
        raise AnalysisError(f"--device {name}: {err}") from err


def _stage_titles(model) -> List[str]:
    """'stage k' for the stages that return attention (those with a shared unit), in order."""
    return [f"stage {k + 1}" for k, stage in enumerate(model.stages) if isinstance(stage, DIAStage)]


# the packages each command needs beyond the install's own: (module, distribution)
NEEDS = {
    "gini": (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")),
    "gradients": (("matplotlib", "matplotlib"),),
}


def _beside(path: str, name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), name)


def run_gini(args: argparse.Namespace) -> Dict[str, Any]:
    out = args.out or _beside(args.checkpoint, "gini.png")
    check_output(out)
    try:
        ckpt = ckpt_io.load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise AnalysisError(str(err)) from err
    if "model" not in ckpt:
        raise AnalysisError(
            f"{args.checkpoint}: no model description ('model' key): expected a "
            f"checkpoint written by python -m dia_fused.train"
        )
    saved_args = ckpt.get("args", {})
    dataset = args.dataset or saved_args.get("dataset", "cifar10")
    data_dir = args.data_dir or saved_args.get("data_dir")
    synthetic_size = args.synthetic_size or saved_args.get("synthetic_size")
    device = _device(args.device)
    spec = ckpt["model"]
    model = build_model(spec, backend=args.backend)
    try:
        model.load_state_dict(ckpt_io.model_state_dict(ckpt))
    except RuntimeError as err:  # load_state_dict's report of missing or reshaped keys
        raise AnalysisError(
            f"{args.checkpoint}: its weights do not fit its model description "
            f"({spec.get('name')}): {str(err).splitlines()[0]}"
        ) from err
    model.to(device)
    _, test = _data(dataset, data_dir, synthetic_size, device)
    stream = BatchStream(test, args.batch_size, train=False, augment=False, seed=args.seed)
    attention = gini_mod.collect_attention(
        model, (x for x, _ in stream.epoch(0)), max_images=args.images
    )
    matrices = [
        gini_mod.gini_importance(
            a,
            mode=args.mode,
            n_estimators=args.trees,
            max_features=args.max_features,
            max_samples=args.max_samples,
            seed=args.seed,
            n_jobs=args.jobs,
        )
        for a in attention
    ]
    titles = _stage_titles(model)
    gini_mod.plot_gini(
        matrices,
        out,
        titles=titles,
        suptitle=f"Gini importance of h_1..h_(t-1) for h_t: {spec['name']} "
        f"{spec.get('options', {})}, "
        f"{attention[0].shape[0]} {dataset} test images, {args.mode} mode",
    )
    gini_mod.save_matrices(
        matrices,
        os.path.splitext(out)[0] + ".npz",
        titles=np.array(titles),
        mode=args.mode,
        images=attention[0].shape[0],
    )
    print(f"wrote {out} ({len(matrices)} stages, {attention[0].shape[0]} images, mode {args.mode})")
    for title, matrix in zip(titles, matrices):
        constant = [t + 1 for t in range(1, matrix.shape[0]) if np.isnan(matrix[t, 0])]
        if constant:
            print(f"  {title}: h_t constant over the images for t = {constant} (rows left blank)")
    return {"png": out, "matrices": matrices, "titles": titles, "attention": attention}


# what a checkpoint's description must agree on with the network of the figure
_ARCHITECTURE = ("family", "depth", "cardinality", "width", "widen", "cifar")


def _architecture(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a model description that make the network of Figure 6: the backbone (from
    the name, whose attention prefix the options override), the attention, the skips, the
    classes."""
    from ..models import parse_name

    parsed = parse_name(spec["name"])
    options = resolved_options(spec)
    out = {key: parsed[key] for key in _ARCHITECTURE}
    out.update(
        attention=options.get("attention"),
        skip=options.get("skip"),
        num_classes=spec.get("num_classes"),
    )
    return out


def _gradient_model(
    arch: str,
    attention: str,
    num_classes: int,
    backend: str,
    seed: int,
    weights: Optional[str],
    flag: str,
    device,
):
    """(model, label): the skip-free network of the figure, with the weights of `weights` (given
    as --`flag`) when given; a checkpoint of another network is refused."""
    spec = {
        "name": arch,
        "num_classes": num_classes,
        "options": {"attention": attention, "skip": False},
    }
    ckpt = None
    if weights:
        try:
            ckpt = ckpt_io.load_checkpoint(weights)
        except (FileNotFoundError, ValueError) as err:
            raise AnalysisError(f"--{flag} {weights}: {err}") from err
        saved = ckpt.get("model")
        if isinstance(saved, dict) and "name" in saved:
            want, got = _architecture(spec), _architecture(saved)
            diffs = [
                f"{key} {got[key]!r} (expected {want[key]!r})"
                for key in want
                if got[key] != want[key]
            ]
            if diffs:
                raise AnalysisError(
                    f"--{flag} {weights}: a checkpoint of another network ({saved['name']}, "
                    f"{'; '.join(diffs)}); this figure needs {arch} with attention {attention}, "
                    f"without skip connections (--arch, -a dia_resnet/resnet --no-skip in training)"
                    f", {num_classes} classes (--num-classes)"
                )
            spec = dict(saved)  # its other options (reduction, ...) shape the weights
    ckpt_io.seed_everything(seed)
    model = build_model(spec, backend=backend if attention != "none" else None)
    if ckpt is None:
        return model.to(device), f"untrained (initialised from --seed {seed})"
    state, own = ckpt_io.model_state_dict(ckpt), model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise AnalysisError(
            f"--{flag} {weights}: its weights are not those of {spec['name']} without skips "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
            f"{unexpected[:2]}; {len(reshaped)} of another shape, e.g. {reshaped[:2]})"
        )
    model.load_state_dict(state)
    epoch = f", epoch {ckpt['epoch']}" if "epoch" in ckpt else ""
    return model.to(device), f"trained ({os.path.basename(weights)}{epoch})"


def run_gradients(args: argparse.Namespace) -> Dict[str, Any]:
    checkpoint = args.dia_checkpoint or args.plain_checkpoint
    if args.out is None and checkpoint is None:
        raise AnalysisError(
            "-o: without --dia-checkpoint or --plain-checkpoint (next to which the figure goes), "
            "name the PNG to write, e.g. -o figures/gradients.png"
        )
    args.out = args.out or _beside(checkpoint, "gradients.png")
    check_output(args.out)
    device = _device(args.device)
    train, _ = _data(args.dataset, args.data_dir, args.synthetic_size, device)
    num_classes = args.num_classes or train.num_classes
    stream = BatchStream(train, args.batch_size, train=False, augment=False, seed=args.seed)
    models = {
        label: _gradient_model(
            args.arch, attention, num_classes, args.backend, args.seed, weights, flag, device
        )
        for label, attention, weights, flag in (
            ("DIANet", "dia", args.dia_checkpoint, "dia-checkpoint"),
            ("ResNet", "none", args.plain_checkpoint, "plain-checkpoint"),
        )
    }
    series = {
        label: grad_mod.stage_output_gradients(
            model, _batches(stream, args.batches), args.max_values, seed=args.seed
        )
        for label, (model, _) in models.items()
    }
    states = {label: state for label, (_, state) in models.items()}
    title = (
        f"|gradient| at the stage outputs of {args.arch} without skip connections: "
        + ", ".join(f"{label} {state}" for label, state in states.items())
    )
    grad_mod.plot_gradients(
        series, args.out, colors={"DIANet": "tab:blue", "ResNet": "tab:orange"}, title=title
    )
    stats = {label: [grad_mod.summarize(v) for v in values] for label, values in series.items()}
    np.savez(
        os.path.splitext(args.out)[0] + ".npz",
        **{
            f"{label}_stage{k + 1}": v
            for label, values in series.items()
            for k, v in enumerate(values)
        },
    )
    print(
        f"wrote {args.out}: {args.arch} without skip connections, {args.batches} batches of "
        f"{args.batch_size} {args.dataset} images; "
        + ", ".join(f"{label} {state}" for label, state in states.items())
    )
    untrained = [label for label, state in states.items() if state.startswith("untrained")]
    if untrained:
        print(
            f"note: {' and '.join(untrained)} untrained: the paper's Figure 6 compares trained "
            f"networks; pass --dia-checkpoint and --plain-checkpoint (python -m dia_fused.train "
            f"-a dia_resnet / -a resnet --depth 56 --no-skip)"
        )
    print(json.dumps(stats, indent=1))
    return {"png": args.out, "stats": stats, "title": title, "states": states}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs the command of `argv`. A bad command line exits (status 2, one line); a missing
    package raises command_line.MissingPackageError and other bad input AnalysisError, each
    before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "images", "trees", "batches", "max_values"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {value}")
    for module, package in NEEDS[args.command]:
        command_line.require(module, package, "analysis", f"{parser.prog} {args.command}")
    if args.command == "gini":
        return run_gini(args)
    return run_gradients(args)


def console_main(argv: Optional[Sequence[str]] = None) -> None:
    """main, with the user errors in one line (exit status 2) and no traceback."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (
        AnalysisError,
        DatasetError,
        BackendUnavailableError,
        command_line.MissingPackageError,
    ) as err:
        command_line.fail(str(err))


if __name__ == "__main__":
    console_main()
