#!/usr/bin/env bash
# The GPU checks and measurements of dia_fused on a machine with an NVIDIA GPU, CUDA build of torch
# and CUDA toolkit, one phase per call, from the root of the clone (phases in order of priority):
#
#   bash bench/gpu_session.sh tests   # build dia_fused._C in place (the later phases use it), GPU test files
#   bash bench/gpu_session.sh suite   # the rest of python_tests on the GPU, compute-sanitizer
#   bash bench/gpu_session.sh bench   # one DIA step per fused backend and the eager reference, every shape
#   bash bench/gpu_session.sh bench-graph      # the fused steps replayed from CUDA graphs (GPU time alone)
#   bash bench/gpu_session.sh bench-compiled   # the same for torch.compile of the reference
#   bash bench/gpu_session.sh model   # bench/model_bench.py: DIA/SE/plain ResNet-164, train + inference
#   bash bench/gpu_session.sh ncu     # Nsight Compute per kernel: time, DRAM bytes, L2 hit rate (profile_step.py)
#   bash bench/gpu_session.sh tune    # Triton LSTM launch configurations and dot precision (tune_triton.py)
#   bash bench/gpu_session.sh tune-map   # Triton feature-map tiles (DIA_FUSED_TRITON_MAP candidates)
#   bash bench/gpu_session.sh train   # JIT build check; DIA-ResNet-164 through the training CLI, each backend
#
# Results go to $OUT (default ./gpu-out): logs, junit XML, step_bench*.json, model_bench.json,
# tune_triton.json and env.txt (device, driver, versions, date). Then
# `python bench/summarize.py gpu-out -o BENCHMARKS.md` writes the summary (ratios first).
# `bench` also leaves auto_backend.json (bench/make_auto_table.py: what backend="auto" picks per
# step shape): copy it to dia_fused/ before the `model` phase, so that dia_fused (auto) runs by it.
# GPU_SESSION_TIMEOUT=<seconds> stops each long command after that long (default: no limit).
# The conversion tests need pytorchcv (pip install --no-deps pytorchcv==0.0.74); on a machine
# without network access, put its wheel in .whl/ and this script installs it from there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LIMIT=${GPU_SESSION_TIMEOUT:-0}  # timeout's 0: no limit
# the builds target this GPU (TORCH_CUDA_ARCH_LIST overrides) with a compile job per core
ARCH=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/gpu: /'
    python3 -c "import torch, triton; print('torch:', torch.__version__, 'cuda:', torch.version.cuda, 'triton:', triton.__version__)"
    nvcc --version | tail -1 | sed 's/^/nvcc: /'
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

GPU_FILES=(python_tests/test_gpu_fused.py python_tests/test_cuda_backend.py python_tests/test_triton_backend.py
           python_tests/test_custom_ops.py python_tests/test_hardening.py)
phase=${1:-tests}
case "$phase" in
tests)  # the ahead-of-time build, then the test files that exercise the fused backends on the GPU
    # a failed build still runs the tests: the Triton results come back with the build log
    DIA_FUSED_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH \
        python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
    build=$?
    [ "$build" -eq 0 ] || { echo "BUILD FAILED (exit $build):"; tail -40 "$OUT/build.log"; }
    python3 -m dia_fused 2>&1 | tee "$OUT/selfcheck.log"
    # -m: the slow marks are for CPU runs; on the GPU these files run whole, as before
    timeout "$LIMIT" python3 -m pytest "${GPU_FILES[@]}" -q -p no:cacheprovider -m "slow or not slow" \
        --junitxml="$OUT/gpu_tests.xml" \
        2>&1 | tee "$OUT/gpu_tests.log" | tail -30
    status=${PIPESTATUS[0]}
    [ "$build" -eq 0 ] || status=1
    exit "$status"
    ;;
suite)  # the rest of python_tests on the GPU machine, then compute-sanitizer over both fused backends
    timeout "$LIMIT" python3 -m pytest python_tests "${GPU_FILES[@]/#/--ignore=}" -q -p no:cacheprovider --junitxml="$OUT/suite.xml" \
        2>&1 | tee "$OUT/suite.log" | tail -30
    status=${PIPESTATUS[0]}
    for tool in memcheck racecheck; do  # one small step of each fused backend, forward and backward
        compute-sanitizer --tool $tool --error-exitcode 3 python3 bench/sanitize_step.py \
            > "$OUT/sanitizer_$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0' "$OUT/sanitizer_$tool.log") clean summaries)"
    done
    exit "$status"
    ;;
bench)  # the fused backends and the eager reference; torch.compile of the reference separately
    timeout "$LIMIT" python3 -m pytest bench/test_step_bench.py -q -p no:cacheprovider -k "not compiled_reference and not _graph" \
        --benchmark-json="$OUT/step_bench.json" 2>&1 | tee "$OUT/step_bench.log" | tail -40
    status=${PIPESTATUS[0]}
    python3 bench/make_auto_table.py "$OUT/step_bench.json" -o "$OUT/auto_backend.json"
    exit "$status"
    ;;
bench-graph)  # separate from bench: a call past its time limit loses the whole JSON
    timeout "$LIMIT" python3 -m pytest bench/test_step_bench.py -q -p no:cacheprovider -k "_graph" \
        --benchmark-json="$OUT/step_bench_graph.json" 2>&1 | tee "$OUT/step_bench_graph.log" | tail -40
    ;;
bench-compiled)  # one inductor compile per shape and dtype
    timeout "$LIMIT" python3 -m pytest bench/test_step_bench.py -q -p no:cacheprovider -k "compiled_reference" \
        --benchmark-json="$OUT/step_bench_compiled.json" 2>&1 | tee "$OUT/step_bench_compiled.log" | tail -40
    ;;
model)  # inductor compiles of whole models take minutes: a phase of its own (docs/design.md §6)
    timeout "$LIMIT" python3 bench/model_bench.py --json "$OUT/model_bench.json" 2>&1 | tee "$OUT/model_bench.log" | tail -30
    ;;
ncu)  # the per-step and large-map bandwidth targets (docs/design.md §6), per fused backend
    for backend in triton cuda; do
        for shape in "128 64 32 32" "256 256 56 56"; do
            name="ncu_${backend}_${shape// /x}"
            timeout "$LIMIT" ncu --profile-from-start off --print-units base --csv --page raw \
                --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
                python3 bench/profile_step.py run --backend "$backend" --shape $shape > "$OUT/$name.csv" 2> "$OUT/$name.log"
            echo "== $backend $shape (exit $?)"
            python3 bench/profile_step.py summarize "$OUT/$name.csv" | tee "$OUT/$name.md"
        done
    done
    ;;
tune)
    timeout "$LIMIT" python3 bench/tune_triton.py --map-configs --json "$OUT/tune_triton.json" 2>&1 \
        | tee "$OUT/tune_triton.log" | tail -60
    ;;
tune-map)
    # the default LSTM configuration, then each of tune_triton.py's MAP_CANDIDATES
    timeout "$LIMIT" python3 bench/tune_triton.py --configs "" --precisions ieee --json "$OUT/tune_map.json" 2>&1 \
        | tee "$OUT/tune_map.log" | tail -60
    ;;
train)
    # the build on first use: a copy of the package without the ahead-of-time dia_fused._C
    rm -rf /tmp/jit && mkdir -p /tmp/jit && cp -r dia_fused csrc /tmp/jit/ && rm -f /tmp/jit/dia_fused/_C*.so
    (cd /tmp/jit && TORCH_CUDA_ARCH_LIST=$ARCH PYTHONPATH=/tmp/jit timeout "$LIMIT" python3 -c \
        "from dia_fused.kernels import cuda_dia_step as m; import torch; r = m.unavailable_reason('cuda'); \
print('JIT build:', 'ok' if r is None else r); print('module:', m._extension.__name__ if m._extension else None)") \
        2>&1 | tee "$OUT/jit_build.log" | tail -3
    for backend in reference triton cuda; do
        timeout "$LIMIT" python3 -m dia_fused.train --preset resnet164 -d synthetic --synthetic-size 12800 --epochs 1 \
            --max-steps 60 --backend "$backend" -c "$OUT/train_$backend" > "$OUT/train_$backend.log" 2>&1
        echo "$backend: exit $? $(grep -o '[0-9.]* train images/s' "$OUT/train_$backend.log" | tail -1)"
    done
    ;;
*)
    echo "usage: $0 tests|suite|bench|bench-graph|bench-compiled|model|ncu|tune|tune-map|train" >&2
    exit 2
    ;;
esac
