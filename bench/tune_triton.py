"""Times launch configurations of the Triton backend's kernels on a GPU and checks each one against
the float64 reference (tolerance rule of docs/design.md §4), to choose the defaults of
`dia_fused.kernels.triton.LSTMConfig` (LSTM kernels), `MapConfig` (feature-map kernels) and the
dot precision from measurements.

    python bench/tune_triton.py --json tune.json                      # all candidates, all shapes
    python bench/tune_triton.py --configs "" "block_n=32" --map-configs --precisions ieee tf32x3
    python bench/tune_triton.py --configs --map-configs "tile=8192,num_warps=8"
    python bench/tune_triton.py --smoke                               # CPU: harness check only

Every candidate runs in this process: its KernelSettings are passed to the kernels for its steps
(dia_fused.kernels.triton.use_settings), the environment plays no part. LSTM candidates run with
the default map tiles and map candidates with the default LSTM configuration (the defaults once,
as an LSTM candidate). Reports, per shape,
forward and forward+backward times of each candidate next to the eager reference, and the best
candidate that passed the tolerance rule everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys

CANDIDATES = [
    "",
    "block_n=32",
    "block_c=64,block_r=64",
    "block_k=32",
    "block_k=32,num_warps=4",
    "gate_block_k=64",  # wider gate steps: spill on sm_80 (python_tests/triton_aot.py)
    "split_k=128",
    "split_ctas=264",  # split-K up to two waves
    "split_ctas=66",
    "split_min=1000000000",  # the fused path for one cell too (its backward spread from C*C/r 4352)
    "split_min=1000000000,forward_groups=1",
    "spread_min=1000000000",  # the fused backward as one program per sample tile at C = 144
    "split_min=1000000000,spread_min=1000000000",  # one program per sample tile everywhere
]
# wider tiles, more programs per map, or no H*W split (min_ctas=0)
MAP_CANDIDATES = [
    "min_ctas=0",
    "min_ctas=528",
    "num_warps=8",
    "tile=8192,num_warps=8",
    "hw_block=512,tile=8192,num_warps=8",
    "hw_block=128",
    "c_block=32",
    "c_block=128,tile=8192,num_warps=8",
    "tile=2048",
]
PRECISIONS = ["ieee", "tf32x3"]
# (N, C, H, W, r): CIFAR ResNet-164 stages at batch 128, ImageNet ResNet-50 stages at batch 64
GPU_SHAPES = [
    (128, 64, 32, 32, 4),
    (128, 128, 16, 16, 4),
    (128, 256, 8, 8, 4),
    (64, 256, 56, 56, 16),
    (64, 512, 28, 28, 16),
    (64, 1024, 14, 14, 16),
    (64, 2048, 7, 7, 16),
]
SMOKE_SHAPES = [(3, 24, 2, 2, 4)]


def _time_ms(fn, on_gpu: bool) -> float:
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    import torch
    from model_bench import time_steps  # bench/ is the script's directory

    return time_steps(fn, torch.device("cpu"), warmup=1, steps=3)


def measure(shapes, settings, with_reference: bool):
    """One record per shape for the candidate `settings` (a KernelSettings), in this process."""
    import torch

    from dia_fused.kernels import triton as triton_kernels
    from dia_fused.testing import backend_step, compare_backend, random_step_inputs

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    records = []
    with triton_kernels.use_settings(settings):
        for n, c, hgt, wid, r in shapes:
            record = {"shape": [n, c, hgt, wid], "reduction": r}
            inputs = random_step_inputs(n, c, hgt, wid, reduction=r, device=device)
            try:
                errors = compare_backend(backend_step("triton"), inputs, torch.float32, relu=True)
                record.update(ok=True, max_error=max(errors.values()))
            except AssertionError as err:
                record.update(ok=False, error=str(err)[:500])
            backends = ["triton"] + (["reference"] if with_reference else [])
            for backend in backends:
                x, h, cst = (t.detach().clone() for t in inputs.args()[:3])
                w = [t.detach().clone().requires_grad_() for t in inputs.weights]
                identity = inputs.identity.detach().clone()
                step = backend_step(backend)

                def forward():
                    with torch.no_grad():
                        step(x, h, cst, w, identity, True)

                xg = x.clone().requires_grad_()

                def forward_backward():
                    out, h1, c1 = step(xg, h, cst, w, identity, True)
                    torch.autograd.backward((out, h1, c1), (out.detach(), h1.detach(), c1.detach()))

                record[f"{backend}_forward_ms"] = _time_ms(forward, on_gpu)
                record[f"{backend}_forward_backward_ms"] = _time_ms(forward_backward, on_gpu)
            records.append(record)
    return records


def candidate_settings(config: str, map_config: str, precision: str):
    """The KernelSettings of a candidate: the strings override the defaults (those of the
    interpreter's map tiles where it runs)."""
    from dia_fused.kernels import triton as triton_kernels
    from dia_fused.kernels.triton import config as triton_config

    base_map = triton_config.INTERPRETER_MAP if triton_kernels.INTERPRETED else None
    return triton_kernels.KernelSettings(
        lstm=triton_kernels.LSTMConfig.from_env(config),
        map=triton_kernels.MapConfig.from_env(map_config, base_map),
        dot_precision=precision,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", nargs="*", default=None, help="LSTMConfig strings ('' = defaults)"
    )
    parser.add_argument("--map-configs", nargs="*", default=None, help="MapConfig strings")
    parser.add_argument("--precisions", nargs="*", default=None, choices=PRECISIONS)
    parser.add_argument("--json", help="write every record to this file")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shape, two candidates (CPU harness check)"
    )
    opts = parser.parse_args(argv)
    shapes = SMOKE_SHAPES if opts.smoke else GPU_SHAPES
    configs = (
        opts.configs
        if opts.configs is not None
        else (["", "forward_groups=1"] if opts.smoke else CANDIDATES)
    )
    map_configs = (
        opts.map_configs
        if opts.map_configs is not None
        else (["tile=256"] if opts.smoke else MAP_CANDIDATES)
    )
    candidates = [(config, "") for config in configs] + [("", m) for m in map_configs]
    precisions = opts.precisions or (["ieee"] if opts.smoke else PRECISIONS)
    records = []
    first = True
    for precision in precisions:
        for config, map_config in candidates:
            try:
                settings = candidate_settings(config, map_config, precision)
                lines = measure(shapes, settings, with_reference=first)
            except Exception as err:  # report the candidate and go on with the others
                print(
                    f"candidate {config!r} | map {map_config!r} / {precision}: failed: "
                    f"{type(err).__name__}: {err}",
                    file=sys.stderr,
                )
                lines = []
            for line in lines:
                line.update(
                    config=config or "defaults",
                    map_config=map_config or "defaults",
                    precision=precision,
                )
                records.append(line)
            first = False
    reference = {tuple(r["shape"]): r for r in records if "reference_forward_ms" in r}
    print(
        f"{'shape':>18} {'candidate (lstm | map / precision)':>56} {'ok':>3} "
        f"{'fwd ms':>8} {'x ref':>6} "
        f"{'fwd+bwd ms':>10} {'x ref':>6}"
    )
    for r in records:
        ref = reference.get(tuple(r["shape"]), {})
        speed_f = ref.get("reference_forward_ms", float("nan")) / r["triton_forward_ms"]
        speed_b = (
            ref.get("reference_forward_backward_ms", float("nan")) / r["triton_forward_backward_ms"]
        )
        label = f"{r['config']} | {r['map_config']} / {r['precision']}"
        print(
            f"{'x'.join(map(str, r['shape'])):>18} {label:>56} "
            f"{'yes' if r['ok'] else 'NO':>3} {r['triton_forward_ms']:8.4f} {speed_f:6.2f} "
            f"{r['triton_forward_backward_ms']:10.4f} {speed_b:6.2f}"
        )
    passing = {}
    for r in records:
        passing.setdefault((r["config"], r["map_config"], r["precision"]), []).append(r)
    good = {k: v for k, v in passing.items() if all(r["ok"] for r in v) and len(v) == len(shapes)}
    if good:
        best = min(good, key=lambda k: sum(r["triton_forward_backward_ms"] for r in good[k]))
        print(
            f"best over all shapes (sum of forward+backward times, tolerance rule met): "
            f"lstm {best[0]} | "
            f"map {best[1]} / {best[2]}"
        )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
