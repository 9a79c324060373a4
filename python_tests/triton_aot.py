"""Compiles every Triton kernel of the triton backend for a GPU target on a machine without a GPU
(Triton's own compiler and ptxas; no driver needed), with the arguments the host wrappers really
pass: the interpreter accepts programs a GPU compile rejects (dot shapes, dtypes, layouts), so this
is the CPU-side check that the GPU build will work. Prints one JSON line per kernel
specialisation: name, target, constexprs, and registers / stack / local (spill) bytes from
cuobjdump.

Run in a process WITHOUT TRITON_INTERPRET (the interpreter replaces the kernels at import):
    python python_tests/triton_aot.py [--arch 90] [--arch 80]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}


def captured_launches():
    """(kernel, args, constexprs) of every launch of one forward + backward, over the cases that
    select different specialisations (dtypes, identity/relu, stacked cells with masks, grads)."""
    from dia_fused.kernels.triton import host as T
    from dia_fused.testing import random_step_inputs

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **constexprs: launches.append((self.kernel, args, constexprs))

    kernels = {name: getattr(T, name) for name in dir(T) if name.endswith("_kernel")}
    for name, kernel in kernels.items():
        setattr(T, name, Recorder(kernel))
    try:
        # the one-cell fused path (taken by stacked cells, and by one cell only where
        # split_min says), the default split path, and the split path with every phase split
        # over K (PARTIAL and FINISH launches)
        fused = T.KernelSettings(lstm=T.LSTMConfig(split_min=1 << 30))
        split = T.KernelSettings(lstm=T.LSTMConfig(split_min=0))
        default = T.KernelSettings()
        # (and the 64x64 weight-gradient tiles that large units take)
        split_k = T.KernelSettings(lstm=T.LSTMConfig(split_min=0, split_k=16, weight_grad_ctas=0))
        f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

        def case(dtype, config, num_cells=1, identity=True, relu=True, grads=True, **shape):
            return dict(
                dtype=dtype,
                config=config,
                num_cells=num_cells,
                identity=identity,
                relu=relu,
                grads=grads,
                **shape,
            )

        cases = [
            case(f32, fused, grads=False),
            case(bf16, fused, identity=False, relu=False, grads=False, channels_last=True),
            case(f16, fused, num_cells=2),
            # stacked cells take the fused path at the defaults: bf16 with 2, fp32 with 3 cells
            case(bf16, default, num_cells=2),
            case(f32, default, num_cells=3),
            case(f32, split),
            # the default fused path with its backward spread over column parts (C = 144: C * C/r
            # = 5184 >= spread_min; BLOCK_R 32 as at the benchmark shapes), fp32 and bf16
            case(bf16, default, channels=144),
            case(f32, default, grads=False, channels=144),
            # the default split path with the benchmarks' LSTM tiles (C = 256)
            case(bf16, default, channels=256),
            # C = 72 > 64: every phase splits (R = C with reduction 1); 2 tiles of H*W for 4
            # samples: pool and grad attention split it
            case(bf16, split_k, channels=72, reduction=1, hw=(20, 20)),
        ]
        for case in cases:
            inputs = random_step_inputs(
                4,
                case.get("channels", 40),
                *case.get("hw", (3, 3)),
                reduction=case.get("reduction", 4),
                num_cells=case["num_cells"],
                dropout_p=0.5 if case["num_cells"] > 1 else 0.0,
                identity=case["identity"],
                channels_last=case.get("channels_last", False),
            ).to(case["dtype"])
            out, h_new, c_new, saved = T.forward(
                *inputs.args(),
                inputs.identity,
                case["relu"],
                "tanh",
                inputs.dropout_masks,
                case["config"],
            )
            grad_h = torch.zeros_like(h_new) if case["grads"] else None
            T.backward(
                torch.zeros_like(out),
                grad_h,
                grad_h,
                inputs.x,
                out,
                saved,
                inputs.h,
                inputs.c,
                inputs.weights,
                case["identity"],
                case["relu"],
                "tanh",
                inputs.dropout_masks,
                case["config"],
            )
    finally:
        for name, kernel in kernels.items():
            setattr(T, name, kernel)
    return launches


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def signature_of(kernel, args, constexprs):
    constexprs = {k: v for k, v in constexprs.items() if k not in LAUNCH_OPTIONS}
    names = kernel.arg_names
    signature, consts = {}, {}
    runtime = [n for n in names if n not in constexprs]
    if len(runtime) != len(args):
        raise AssertionError(f"{kernel.__name__}: {len(args)} positional arguments for {runtime}")
    for name, value in zip(runtime, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{name}: unexpected argument {value!r}")
    for name, value in constexprs.items():
        signature[name] = "constexpr"
        consts[(names.index(name),)] = value
    return signature, consts


def resource_usage(cubin: bytes):
    """Registers, local memory (spills) and shared memory of a cubin, from the cuobjdump that
    Triton ships (None where it is missing)."""
    import triton

    cuobjdump = os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
    )
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump")
    if not cuobjdump:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        run = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", run.stdout)
    if usage is None:
        return {"cuobjdump_error": (run.stdout + run.stderr)[-400:]}
    regs, stack, shared, local = map(int, usage.groups())
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, action="append", help="compute capability x10 (default 90)"
    )
    parser.add_argument(
        "--no-usage", action="store_true", help="skip the cuobjdump resource report"
    )
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error(
            "run without TRITON_INTERPRET=1: the interpreter replaces the kernels at import"
        )
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = set()
    failures = 0
    for kernel, args, constexprs in captured_launches():
        signature, consts = signature_of(kernel, args, constexprs)
        key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())))  # noqa
        if key in seen:
            continue
        seen.add(key)
        for arch in opts.arch or [90]:
            record = {
                "kernel": kernel.__name__,
                "arch": arch,
                "constexprs": {k: v for k, v in constexprs.items() if k not in LAUNCH_OPTIONS},
            }
            try:
                options = {k: v for k, v in constexprs.items() if k in LAUNCH_OPTIONS}
                record["options"] = options
                compiled = triton.compile(
                    ASTSource(fn=kernel, signature=signature, constexprs=consts),
                    target=GPUTarget("cuda", arch, 32),
                    options=options,
                )
                record["ok"] = True
                # dynamic shared memory (pipelining buffers, layout conversions): not in cuobjdump
                record["dynamic_shared_bytes"] = getattr(compiled.metadata, "shared", None)
                if not opts.no_usage:
                    record.update(resource_usage(compiled.asm["cubin"]) or {})
            except Exception as err:  # report every failing specialisation, not only the first
                failures += 1
                record.update(ok=False, error=f"{type(err).__name__}: {str(err)[-1500:]}")
            print(json.dumps(record, default=str), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
