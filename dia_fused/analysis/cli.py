"""`python -m dia_fused.analysis`: the paper's analysis figures.

    # Figure 5: Gini importance between the layers of each stage of a trained DIANet
    python -m dia_fused.analysis gini runs/dia164/model_best.pth.tar --images 2000 -o gini.png
    # Figure 6: |gradient| at each stage output of a skip-free ResNet-56, with and without DIA
    python -m dia_fused.analysis gradients -d cifar100 --data-dir ~/data -o gradients.png
    python -m dia_fused.analysis gradients --dia-checkpoint a.pth.tar --plain-checkpoint b.pth.tar

Each command writes the PNG and, next to it, the numbers behind it (.npz) and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..modules import DIAStage
from ..ops import BACKEND_CHOICES
from ..train import checkpoint as ckpt_io
from ..train.data import DATASETS, BatchStream, load_datasets
from ..train.distributed import pick_device
from ..train.modelspec import build_model
from . import gini as gini_mod
from . import gradients as grad_mod


def _add_data_args(p: argparse.ArgumentParser, dataset_default: Optional[str]) -> None:
    p.add_argument("-d", "--dataset", choices=DATASETS, default=dataset_default,
                   help="data to run the model on" + (" (default: the checkpoint's)"
                                                      if dataset_default is None else ""))
    p.add_argument("--data-dir", default=None, help="folder holding the CIFAR python-pickle files")
    p.add_argument("--synthetic-size", type=int, default=None,
                   help="--dataset synthetic: train images (test: a fifth)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if any)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="DIA unit backend")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dia_fused.analysis",
                                     description="DIANet analysis figures (paper Figures 5, 6)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gini", help="Figure 5: random-forest Gini importance between layers",
                       description=gini_mod.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("checkpoint", help="a checkpoint written by python -m dia_fused.train")
    _add_data_args(g, None)
    g.add_argument("--images", type=int, default=1000,
                   help="test images whose attention vectors are the samples")
    g.add_argument("--mode", choices=gini_mod.FEATURE_MODES, default="vector",
                   help="how samples and features are formed (see the description above)")
    g.add_argument("--trees", type=int, default=100, help="trees per forest")
    g.add_argument("--max-features", type=float, default=1 / 3,
                   help="fraction of input columns tried per split (1/3: R randomForest's "
                        "regression default; 1.0: all)")
    g.add_argument("--max-samples", type=int, default=None,
                   help="subsample rows per forest (bounds the cost of --mode channel)")
    g.add_argument("--jobs", type=int, default=None, help="scikit-learn n_jobs")
    g.add_argument("-o", "--out", default=None,
                   help="PNG path (default: gini.png next to the checkpoint)")

    r = sub.add_parser("gradients", help="Figure 6: |gradient| at stage outputs, skip-free nets",
                       description=grad_mod.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(r, "synthetic")
    r.add_argument("--arch", default="resnet56",
                   help="zoo name of the backbone (built with skip=False, attention none / dia)")
    r.add_argument("--num-classes", type=int, default=None,
                   help="classes of the classifier (default: the dataset's)")
    r.add_argument("--batches", type=int, default=4, help="batches whose gradients are counted")
    r.add_argument("--dia-checkpoint", default=None,
                   help="weights of the DIA model (default: fresh initialisation from --seed)")
    r.add_argument("--plain-checkpoint", default=None, help="weights of the model without DIA")
    r.add_argument("--max-values", type=int, default=200_000,
                   help="|gradient| values kept per stage and model")
    r.add_argument("-o", "--out", default="gradients.png", help="PNG path")
    return parser


def _batches(stream: BatchStream, limit: int):
    for index, batch in enumerate(stream.epoch(0)):
        if index >= limit:
            break
        yield batch


def _data(dataset: str, data_dir: Optional[str], synthetic_size: Optional[int], device):
    train, test = load_datasets(dataset, data_dir, synthetic_size or 5000)
    return train.to(device), test.to(device)


def _stage_titles(model) -> List[str]:
    """'stage k' for the stages that return attention (those with a shared unit), in order."""
    return [f"stage {k + 1}" for k, stage in enumerate(model.stages) if isinstance(stage, DIAStage)]


def run_gini(args: argparse.Namespace) -> Dict[str, Any]:
    ckpt = ckpt_io.load_checkpoint(args.checkpoint)
    if "model" not in ckpt:
        raise ValueError(f"{args.checkpoint}: no model description ('model' key): expected a "
                         f"checkpoint written by python -m dia_fused.train")
    saved_args = ckpt.get("args", {})
    dataset = args.dataset or saved_args.get("dataset", "cifar10")
    data_dir = args.data_dir or saved_args.get("data_dir")
    synthetic_size = args.synthetic_size or saved_args.get("synthetic_size")
    device = pick_device(args.device, 0)
    spec = ckpt["model"]
    model = build_model(spec, backend=args.backend)
    model.load_state_dict(ckpt_io.model_state_dict(ckpt))
    model.to(device)
    _, test = _data(dataset, data_dir, synthetic_size, device)
    stream = BatchStream(test, args.batch_size, train=False, augment=False, seed=args.seed)
    attention = gini_mod.collect_attention(model, (x for x, _ in stream.epoch(0)),
                                           max_images=args.images)
    matrices = [gini_mod.gini_importance(a, mode=args.mode, n_estimators=args.trees,
                                         max_features=args.max_features,
                                         max_samples=args.max_samples, seed=args.seed,
                                         n_jobs=args.jobs) for a in attention]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "gini.png")
    titles = _stage_titles(model)
    gini_mod.plot_gini(matrices, out, titles=titles,
                       suptitle=f"Gini importance of h_1..h_(t-1) for h_t: {spec['name']} "
                                f"{spec.get('options', {})}, "
                                f"{attention[0].shape[0]} {dataset} test images, {args.mode} mode")
    gini_mod.save_matrices(matrices, os.path.splitext(out)[0] + ".npz", titles=np.array(titles),
                           mode=args.mode, images=attention[0].shape[0])
    print(f"wrote {out} ({len(matrices)} stages, {attention[0].shape[0]} images, "
          f"mode {args.mode})")
    for title, matrix in zip(titles, matrices):
        constant = [t + 1 for t in range(1, matrix.shape[0]) if np.isnan(matrix[t, 0])]
        if constant:
            print(f"  {title}: h_t constant over the images for t = {constant} (rows left blank)")
    return {"png": out, "matrices": matrices, "titles": titles, "attention": attention}


def _gradient_model(arch: str, attention: str, num_classes: int, backend: str, seed: int,
                    weights: Optional[str], device):
    spec = {"name": arch, "num_classes": num_classes,
            "options": {"attention": attention, "skip": False}}
    ckpt_io.seed_everything(seed)
    model = build_model(spec, backend=backend if attention != "none" else None)
    if weights:
        model.load_state_dict(ckpt_io.model_state_dict(ckpt_io.load_checkpoint(weights)))
    return model.to(device)


def run_gradients(args: argparse.Namespace) -> Dict[str, Any]:
    device = pick_device(args.device, 0)
    train, _ = _data(args.dataset, args.data_dir, args.synthetic_size, device)
    num_classes = args.num_classes or train.num_classes
    stream = BatchStream(train, args.batch_size, train=False, augment=False, seed=args.seed)
    series = {}
    for label, attention, weights in (("DIANet", "dia", args.dia_checkpoint),
                                      ("ResNet", "none", args.plain_checkpoint)):
        model = _gradient_model(args.arch, attention, num_classes, args.backend, args.seed,
                                weights, device)
        series[label] = grad_mod.stage_output_gradients(model, _batches(stream, args.batches),
                                                        args.max_values, seed=args.seed)
    grad_mod.plot_gradients(series, args.out, colors={"DIANet": "tab:blue", "ResNet": "tab:orange"})
    stats = {label: [grad_mod.summarize(v) for v in values] for label, values in series.items()}
    np.savez(os.path.splitext(args.out)[0] + ".npz",
             **{f"{label}_stage{k + 1}": v for label, values in series.items()
                for k, v in enumerate(values)})
    print(f"wrote {args.out}: {args.arch} without skip connections, {args.batches} batches of "
          f"{args.batch_size} {args.dataset} images")
    print(json.dumps(stats, indent=1))
    return {"png": args.out, "stats": stats}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "images", "trees", "batches", "max_values"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1, got {value}")
    if args.command == "gini":
        return run_gini(args)
    return run_gradients(args)


if __name__ == "__main__":
    main(sys.argv[1:])
