"""Per-kernel profile of one fused DIA step under Nsight Compute: time, DRAM bytes, L2 hit rate.

    METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct
    ncu --profile-from-start off --print-units base --csv --page raw --metrics $METRICS \\
        python bench/profile_step.py run --backend triton > ncu_triton.csv
    python bench/profile_step.py summarize ncu_triton.csv    # one table: kernel, us, MB, GB/s, L2 %

`run` compiles and warms up outside the profiled range (cudaProfilerStart/Stop), then profiles one
forward and one backward of the step. The summary compares each kernel's DRAM traffic with what the
step must move at least (its feature maps: forward x and identity read, out written; backward
grad_out, x read, grad_x and grad_identity written), which is what bounds a memory-bound step.
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Dict, List

METRICS = {
    "gpu__time_duration.sum": "ns",
    "dram__bytes_read.sum": "read",
    "dram__bytes_write.sum": "write",
    "lts__t_sector_hit_rate.pct": "l2_hit",
}


def run(args) -> int:
    import torch

    from dia_fused import ops
    from dia_fused.testing import random_step_inputs

    reason = ops.backend_unavailable_reason(args.backend, "cuda")
    if reason is not None:
        print(f"{args.backend}: {reason}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    inputs = random_step_inputs(
        *args.shape, dtype=dtype, device="cuda", seed=0, channels_last=args.channels_last
    ).requires_grad_()

    def step():
        out, h, c = ops.dia_step(
            *inputs.args(), inputs.identity, True, "sigmoid", None, args.backend
        )
        torch.autograd.backward((out, h, c), (out.detach(), h.detach(), c.detach()))

    for _ in range(3):  # Triton compilation, the CUDA extension's first use, the allocator
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    n, c, h, w = args.shape
    print(f"profiled {args.backend} N={n} C={c} {h}x{w} {args.dtype}", file=sys.stderr)
    return 0


def read_ncu_csv(path: str) -> List[Dict[str, float]]:
    """Rows of `ncu --csv --page raw --print-units base`: kernel name and the METRICS, in launch
    order."""
    with open(path, newline="") as f:
        lines = [
            line for line in f if line.startswith('"')
        ]  # ncu's own log lines ("==PROF==") are not CSV
    table = list(csv.reader(lines))
    if not table or "Kernel Name" not in table[0]:
        raise ValueError(
            f"{path}: expected ncu --csv --page raw output with a 'Kernel Name' column"
        )
    header = table[0]
    missing = [m for m in METRICS if m not in header]
    if missing:
        raise ValueError(f"{path}: metrics {missing} missing (ncu --metrics {','.join(METRICS)})")
    rows = []
    for record in table[1:]:
        if len(record) != len(header) or not record[header.index("ID")].strip().isdigit():
            continue  # the units row
        row = {"kernel": record[header.index("Kernel Name")]}
        for metric, key in METRICS.items():
            row[key] = float(record[header.index(metric)].replace(",", "") or "nan")
        rows.append(row)
    return rows


def summarize(rows: List[Dict[str, float]]) -> str:
    lines = [
        "| kernel | time (us) | DRAM read (MB) | DRAM write (MB) | GB/s | L2 hit % |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = row["ns"] * 1e-9
        moved = row["read"] + row["write"]
        name = row["kernel"].split("(")[0][:48]
        lines.append(
            f"| {name} | {row['ns'] / 1e3:.1f} | {row['read'] / 1e6:.2f} | "
            f"{row['write'] / 1e6:.2f} | "
            f"{moved / seconds / 1e9 if seconds else 0:.0f} | {row['l2_hit']:.1f} |"
        )
    total_ns = sum(r["ns"] for r in rows)
    total = sum(r["read"] + r["write"] for r in rows)
    lines.append(
        f"| all {len(rows)} kernels | {total_ns / 1e3:.1f} | "
        f"{sum(r['read'] for r in rows) / 1e6:.2f} | "
        f"{sum(r['write'] for r in rows) / 1e6:.2f} | "
        f"{total / (total_ns * 1e-9) / 1e9 if total_ns else 0:.0f} | |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser(
        "run", help="one warmed-up step forward + backward inside the profiled range"
    )
    p_run.add_argument("--backend", choices=("triton", "cuda"), required=True)
    p_run.add_argument(
        "--shape", type=int, nargs=4, default=[128, 64, 32, 32], metavar=("N", "C", "H", "W")
    )
    p_run.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p_run.add_argument("--channels-last", action="store_true")
    p_sum = sub.add_parser("summarize", help="a table from ncu's CSV")
    p_sum.add_argument("csv")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    try:
        print(summarize(read_ncu_csv(args.csv)))
    except (OSError, ValueError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
