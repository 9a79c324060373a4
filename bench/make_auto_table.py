"""The table behind `backend="auto"` (dia_fused/backend_table.py) from the step benchmarks of GPU
sessions: per GPU and measured step, each backend's median time (pytest-benchmark JSON written by
`pytest bench/test_step_bench.py --benchmark-json=...`, e.g. by bench/gpu_session.sh).

    python bench/make_auto_table.py bench/results/2026-11-26_h100 # -> dia_fused/auto_backend.json
    python bench/make_auto_table.py RESULTS... -o table.json      # elsewhere (DIA_FUSED_AUTO_TABLE)

GPUs already in the output table and absent from the new results are kept; a GPU present in both
is replaced by the new measurements. CPU results are ignored (auto never picks the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

from dia_fused import backend_table
from summarize import step_bench_names  # bench/ is the script's directory


def step_files(paths: List[str]) -> List[str]:
    """The step_bench*.json files of each results folder (or the files themselves)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = [os.path.join(path, name) for name in step_bench_names(path)]
            if not found:
                raise FileNotFoundError(f"{path}: no step_bench*.json in this folder")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def measured_devices(files: List[str]) -> Dict[str, dict]:
    """{GPU name: {"source": ..., "steps": [...]}} from pytest-benchmark JSON files."""
    steps: Dict[str, Dict[tuple, dict]] = {}
    sources: Dict[str, set] = {}
    for path in files:
        with open(path) as f:
            bench = json.load(f)
        for b in bench.get("benchmarks", []):
            info = b.get("extra_info", {})
            if (
                info.get("impl") not in backend_table.BACKEND_NAMES
                or info.get("device", "cpu") == "cpu"
            ):
                continue
            n, c, h, w = info["shape"]
            dtype = info["dtype"].replace("torch.", "")
            direction = "fwd_bwd" if "fwd_bwd" in b["name"] else "fwd"
            key = (c, h * w, dtype, direction)
            entry = steps.setdefault(info["device"], {}).setdefault(
                key,
                {
                    "channels": c,
                    "hw": h * w,
                    "batch": n,
                    "dtype": dtype,
                    "pass": direction,
                    "ms": {},
                },
            )
            entry["ms"][info["impl"]] = round(info["per_call_ms"], 6)
            sources.setdefault(info["device"], set()).add(
                f"{os.path.relpath(path)} (torch {info.get('torch', '?')})"
            )
    return {
        device: {
            "source": "; ".join(sorted(sources[device])),
            "steps": [entries[k] for k in sorted(entries)],
        }
        for device, entries in steps.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "results", nargs="+", help="results folders (step_bench*.json) or JSON files"
    )
    parser.add_argument(
        "-o",
        "--output",
        default=backend_table.DEFAULT_TABLE,
        help="the table to write or update (default: the one dia_fused ships)",
    )
    args = parser.parse_args(argv)
    try:
        devices = measured_devices(step_files(args.results))
    except FileNotFoundError as err:
        parser.error(str(err))
    if not devices:
        parser.error(
            "no GPU step benchmarks of the reference, triton or cuda backends in "
            + ", ".join(args.results)
        )
    table = {"format": backend_table.FORMAT, "devices": {}}
    if os.path.exists(args.output):
        with open(args.output) as f:
            table = json.load(f)
        backend_table.validate(table, args.output)
    table["devices"].update(devices)
    backend_table.validate(table, args.output)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, args.output)
    for device, entry in devices.items():
        wins: Dict[str, int] = {}
        for step in entry["steps"]:
            best = min(step["ms"], key=step["ms"].get)
            wins[best] = wins.get(best, 0) + 1
        print(
            f"{device}: {len(entry['steps'])} steps, fastest: "
            + ", ".join(f"{name} {count}" for name, count in sorted(wins.items()))
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
