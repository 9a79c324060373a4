"""BENCHMARKS.md from the files a GPU session leaves in one results folder (bench/gpu_session.sh):
env.txt, model_bench.json (bench/model_bench.py) and step_bench*.json (pytest
bench/test_step_bench.py --benchmark-json, possibly in several parts). Ratios first: the
model-level ratios to plain ResNet-164 against the targets, then one DIA step per shape: the
speed-up of each implementation over the eager reference and the share of the device's peak memory
bandwidth.

    python bench/summarize.py bench/results/2026-11-25_h100 > BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

MODEL_ROWS = ["dia_fused", "dia_triton", "dia_cuda", "dia_compiled", "dia_reference", "se", "plain"]
TARGET_RATIO = (
    1.10  # DIA-ResNet-164 with dia_fused vs plain ResNet-164, train and inference (issue 6)
)


def _load(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f) if name.endswith(".json") else f.read()


def model_table(result: dict) -> List[str]:
    columns = [
        (prefix, phase)
        for prefix in ("", "bf16_")
        for phase in ("train", "infer")
        if f"{prefix}plain_{phase}_ms" in result
    ]
    header = " | ".join(f"{'bf16' if p else 'fp32'} {phase}" for p, phase in columns)
    lines = [
        f"| DIA-ResNet-{result.get('depth', '?')}, batch {result.get('batch', '?')} | {header} |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for key in MODEL_ROWS:
        cells = []
        for prefix, phase in columns:
            ms = result.get(f"{prefix}{key}_{phase}_ms")
            if ms is None:
                cells.append("-")
                continue
            ratio = ms / result[f"{prefix}plain_{phase}_ms"]
            mark = " ✓" if key == "dia_fused" and ratio <= TARGET_RATIO else ""
            cells.append(f"{ratio:.2f}x ({ms:.1f} ms){mark}")
        if any(c != "-" for c in cells):
            label = f"{key} (auto: {_auto_choice(result)})" if key == "dia_fused" else key
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _auto_choice(result: dict) -> str:
    """auto's backend per DIA unit as model_bench recorded it, e.g. 'train cuda/cuda/triton, infer
    ...'."""
    phases = [
        f"{phase} {result[f'dia_fused_{phase}_backends']}"
        for phase in ("train", "infer")
        if result.get(f"dia_fused_{phase}_backends")
    ]
    return ", ".join(phases) or result.get("dia_fused_backend", "?")


def step_table(bench: dict) -> List[str]:
    """One row per (shape, dtype, layout, direction): time of each implementation and its speed-up
    over the eager reference; for the fastest fused backend its achieved bandwidth (the step's
    minimum bytes over its time, bench/roofline.py), its share of peak, and its time over the
    traffic model's prediction (above 1: slower than the model says, so the model or the kernel is
    wrong there)."""
    cells: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for b in bench.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "impl" not in info:
            continue
        direction = "fwd+bwd" if "fwd_bwd" in b.get("name", "") else "fwd"
        key = (
            "x".join(map(str, info["shape"])),
            info["dtype"].replace("torch.", ""),
            info.get("layout", "nchw"),
            direction,
        )
        cells[key][info["impl"]] = info
    order = ["reference", "compiled_reference", "triton", "cuda", "triton_graph", "cuda_graph"]
    impls = sorted(
        {impl for row in cells.values() for impl in row},
        key=lambda i: order.index(i) if i in order else len(order),
    )
    lines = [
        "| step | dtype | layout | pass | "
        + " | ".join(impls)
        + " | best fused: GB/s, % of peak BW | measured / model |",
        "|---" * (len(impls) + 6) + "|",
    ]
    for (shape, dtype, layout, direction), row in sorted(cells.items()):
        ref = row.get("reference", {}).get("per_call_ms")
        out = []
        for impl in impls:
            ms = row.get(impl, {}).get("per_call_ms")
            if ms is None:
                out.append("-")
            elif impl == "reference" or ref is None:
                out.append(f"{ms:.3f} ms")
            else:
                out.append(f"{ref / ms:.1f}x ({ms:.3f} ms)")
        fused = [row[i] for i in ("triton", "cuda", "triton_graph", "cuda_graph") if i in row]
        best = min(fused, key=lambda i: i["per_call_ms"]) if fused else None
        peak = (
            f"{best['GB_per_s']:.0f} GB/s, {best['pct_peak_bandwidth']:.0f}% ({best['impl']})"
            if best and "pct_peak_bandwidth" in best
            else "-"
        )
        ratio = (
            f"{best['measured_over_predicted']:.2f} ({best['predicted_ms'] * 1e3:.0f} us)"
            if best and "measured_over_predicted" in best
            else "-"
        )
        lines.append(
            f"| {shape} | {dtype} | {layout} | {direction} | "
            + " | ".join(out)
            + f" | {peak} | {ratio} |"
        )
    return lines


def step_bench_names(folder: str) -> List[str]:
    """step_bench.json, step_bench_compiled.json, ...: the parts of one folder's step benchmarks."""
    return sorted(
        f for f in os.listdir(folder) if f.startswith("step_bench") and f.endswith(".json")
    )


def summarize(folder: str) -> str:
    env: Optional[str] = _load(folder, "env.txt")
    model: Optional[dict] = _load(folder, "model_bench.json")
    steps: Optional[dict] = None
    for name in step_bench_names(folder):  # one table
        part = _load(folder, name)
        steps = (
            part
            if steps is None
            else {**steps, "benchmarks": steps["benchmarks"] + part["benchmarks"]}
        )
    if model is None and steps is None:
        raise FileNotFoundError(f"{folder}: neither model_bench.json nor step_bench*.json is there")
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `bench/gpu_session.sh`; raw files in `{folder}`.",
        "",
    ]
    if env:
        lines += ["```", env.strip(), "```", ""]
    if model is not None:
        lines += [
            f"## DIA-ResNet-{model.get('depth')}: time per step, as a ratio to plain "
            f"ResNet-{model.get('depth')}",
            "",
            f"Device {model.get('device')}, torch {model.get('torch')}, "
            f"triton {model.get('triton')}, "
            f"median of {model.get('steps')} steps after {model.get('warmup')} warm-up; target for "
            f"dia_fused: <= {TARGET_RATIO:.2f}x (✓ where met).",
            "",
        ]
        lines += model_table(model) + [""]
    if steps is not None:
        lines += ["## One DIA step: speed-up over the eager reference", ""]
        lines += step_table(steps) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folder", help="a results folder (env.txt, model_bench.json, step_bench.json)"
    )
    parser.add_argument("-o", "--output", help="write here instead of standard output")
    args = parser.parse_args(argv)
    try:
        text = summarize(args.folder)
    except FileNotFoundError as err:
        parser.error(str(err))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
