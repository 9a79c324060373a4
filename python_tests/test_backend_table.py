"""backend="auto" on a GPU picks the fastest backend measured for the step's shape
(dia_fused/backend_table.py, written by bench/make_auto_table.py). The GPU is simulated: its name
and the backends' availability are patched, the table is a file in tmp_path."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dia_fused import backend_table, backends, ops
from dia_fused.modules import DIALSTM

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)
import make_auto_table  # noqa: E402

GPU = "NVIDIA Test GPU"


def step(channels, hw, dtype="float32", direction="fwd_bwd", **ms):
    return {
        "channels": channels,
        "hw": hw,
        "batch": 128,
        "dtype": dtype,
        "pass": direction,
        "ms": ms,
    }


STEPS = [
    step(64, 1024, triton=0.20, cuda=0.10, reference=1.0),
    step(256, 64, triton=0.05, cuda=0.08, reference=0.6),
    step(64, 1024, "bfloat16", triton=0.09, cuda=0.12, reference=0.9),
    step(64, 1024, direction="fwd", reference=0.3, triton=0.02, cuda=0.03),
]


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Writes {'NVIDIA Test GPU': steps} as the auto table; cuda:0 is that GPU, where the fused
    backends are available unless the test says otherwise."""

    def write(steps=STEPS, available=("reference", "triton", "cuda")):
        path = tmp_path / f"table{len(list(tmp_path.iterdir()))}.json"
        path.write_text(
            json.dumps({"format": 1, "devices": {GPU: {"source": "test", "steps": steps}}})
        )
        monkeypatch.setenv(backend_table.ENV_TABLE, str(path))
        monkeypatch.setattr(backends, "_device_name", lambda device: GPU)
        monkeypatch.setattr(
            backends,
            "backend_unavailable_reason",
            lambda name, device: None if name in available else "not here (test)",
        )
        return path

    return write


@pytest.mark.parametrize(
    "key, expected",
    [
        ((64, 1024, "float32", True), "cuda"),  # measured point
        ((48, 900, "float32", True), "cuda"),  # nearest in log C, log H*W: the 64 x 32x32 step
        ((256, 49, "float32", True), "triton"),  # nearest: 256 x 8x8
        ((64, 1024, "bfloat16", True), "triton"),  # its own dtype
        (
            (64, 1024, "float16", True),
            "triton",
        ),  # float16 stands in with bfloat16 (same element size)
        ((64, 1024, "float32", False), "triton"),  # the forward-only measurement
    ],
)
def test_auto_runs_the_fastest_measured_backend(table, key, expected):
    table()
    assert ops.resolve_backend("auto", "cuda:0", key) == expected
    assert ops.auto_order("cuda:0", key)[0] == expected
    assert set(ops.auto_order("cuda:0", key)) == set(ops.BACKENDS)


def test_auto_skips_the_fastest_where_it_cannot_run(table):
    table(available=("reference", "triton"))
    assert ops.resolve_backend("auto", "cuda:0", (64, 1024, "float32", True)) == "triton"


def test_without_a_measurement_auto_keeps_the_static_order(table, monkeypatch):
    table(steps=[step(64, 1024, direction="fwd", reference=0.3, triton=0.02, cuda=0.03)])
    assert (
        ops.auto_order("cuda:0", (64, 1024, "float32", True)) == ops.AUTO_ORDER
    )  # no fwd_bwd measured
    assert ops.auto_order("cuda:0", None) == ops.AUTO_ORDER  # no step: a device-only question
    assert (
        ops.auto_order("cpu", (64, 1024, "float32", True)) == ops.AUTO_ORDER
    )  # the table is for GPUs
    table()
    monkeypatch.setattr(backends, "_device_name", lambda device: "another GPU")
    assert ops.resolve_backend("auto", "cuda:0", (64, 1024, "float32", True)) == "cuda"


def test_a_named_backend_ignores_the_table(table):
    table()
    assert ops.resolve_backend("cuda", "cuda:0", (256, 64, "float32", True)) == "cuda"


def test_the_unit_reports_the_choice_for_its_input(table, monkeypatch):
    table()
    unit = DIALSTM(256)
    x = torch.randn(2, 256, 8, 8)
    monkeypatch.setattr(
        torch.Tensor, "is_cuda", property(lambda t: True)
    )  # a CPU tensor posing as on cuda:0
    monkeypatch.setattr(
        ops,
        "resolve_backend",
        lambda requested, device, step=None: ops.auto_order("cuda:0", step)[0],
    )
    assert unit.resolved_backend(x) == "triton"  # 256 x 8x8, parameters require grad: fwd_bwd
    with torch.no_grad():
        assert ops.step_key(x, unit.flat_weights()) == (256, 64, "float32", False)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update(format=2), "expected {'format': 1"),
        (lambda t: t["devices"][GPU].pop("steps"), "a 'steps' list"),
        (
            lambda t: t["devices"][GPU]["steps"][0].update(channels=0),
            r"steps\[0\]\.channels: expected a positive int",
        ),
        (lambda t: t["devices"][GPU]["steps"][1].update(dtype="float64"), r"steps\[1\]\.dtype"),
        (lambda t: t["devices"][GPU]["steps"][0].update({"pass": "bwd"}), r"steps\[0\]\.pass"),
        (lambda t: t["devices"][GPU]["steps"][0]["ms"].update(tpu=1.0), r"steps\[0\]\.ms"),
        (lambda t: t["devices"][GPU]["steps"][0]["ms"].update(cuda=-1), r"steps\[0\]\.ms"),
    ],
)
def test_a_malformed_table_raises_naming_the_entry(table, mutate, message):
    path = table()
    content = json.loads(path.read_text())
    mutate(content)
    path.write_text(json.dumps(content))
    backend_table.load_table.cache_clear()
    backend_table._measured_order.cache_clear()
    with pytest.raises(ValueError, match=message):
        ops.resolve_backend("auto", "cuda:0", (64, 1024, "float32", True))


def test_a_missing_named_table_raises(monkeypatch, tmp_path):
    monkeypatch.setenv(backend_table.ENV_TABLE, str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="DIA_FUSED_AUTO_TABLE=.*absent.json"):
        backend_table.measured_order(GPU, 64, 1024, "float32", True)


def benchmark_json(path, device, rows):
    """A pytest-benchmark JSON of test_step_bench.py with the extra_info its run_timed writes."""
    benchmarks = [
        {
            "name": f"test_dia_step[{impl}-{direction}]",
            "extra_info": {
                "impl": impl,
                "shape": list(shape),
                "dtype": f"torch.{dtype}",
                "per_call_ms": ms,
                "device": device,
                "torch": "2.11",
            },
        }
        for impl, shape, dtype, direction, ms in rows
    ]
    path.write_text(json.dumps({"benchmarks": benchmarks}))


def test_make_auto_table_from_step_benchmarks(tmp_path, table, capsys):
    results = tmp_path / "2026-11-26_gpu"
    results.mkdir()
    benchmark_json(
        results / "step_bench.json",
        GPU,
        [
            ("reference", (128, 64, 32, 32), "float32", "fwd_bwd", 0.9),
            ("triton", (128, 64, 32, 32), "float32", "fwd_bwd", 0.2),
            ("cuda", (128, 64, 32, 32), "float32", "fwd_bwd", 0.1),
            (
                "compiled_reference",
                (128, 64, 32, 32),
                "float32",
                "fwd_bwd",
                0.05,
            ),  # not a backend: ignored
            ("triton", (64, 2048, 7, 7), "bfloat16", "fwd", 0.04),
            ("cuda", (64, 2048, 7, 7), "bfloat16", "fwd", 0.05),
        ],
    )
    benchmark_json(
        results / "step_bench_cpu.json",
        "cpu",
        [("reference", (8, 64, 32, 32), "float32", "fwd", 3.0)],
    )
    out = tmp_path / "auto.json"
    out.write_text(
        json.dumps(
            {
                "format": 1,
                "devices": {"Older GPU": {"source": "x", "steps": [step(64, 1024, cuda=1.0)]}},
            }
        )
    )
    assert make_auto_table.main([str(results), "-o", str(out)]) == 0
    assert f"{GPU}: 2 steps, fastest: cuda 1, triton 1" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(written["devices"]) == {GPU, "Older GPU"}  # the other GPU's measurements are kept
    steps = written["devices"][GPU]["steps"]
    assert steps == [
        step(64, 1024, reference=0.9, triton=0.2, cuda=0.1),
        {**step(2048, 49, "bfloat16", "fwd", triton=0.04, cuda=0.05), "batch": 64},
    ]
    table(steps=steps)
    assert ops.resolve_backend("auto", "cuda:0", (2048, 49, "bfloat16", False)) == "triton"


def test_make_auto_table_names_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_auto_table.main([str(tmp_path)])
    assert "no step_bench*.json" in capsys.readouterr().err
    benchmark_json(
        tmp_path / "step_bench.json", "cpu", [("reference", (8, 64, 32, 32), "float32", "fwd", 3.0)]
    )
    with pytest.raises(SystemExit):
        make_auto_table.main([str(tmp_path), "-o", str(tmp_path / "t.json")])
    assert "no GPU step benchmarks" in capsys.readouterr().err


@pytest.mark.slow  # torch.compile, several recompiles
def test_the_step_key_compiles_with_dynamic_shapes(table):
    """Under torch.compile(dynamic=True) the key's C and H*W are specialised into ints (a symbolic
    int cannot reach resolve_backend, an assume_constant_result function): no graph break, and
    each shape resolves by its own measurement."""
    table()
    weights = DIALSTM(64).flat_weights()

    def scale_by_choice(x):
        name = ops.resolve_backend("auto", "cuda:0", ops.shape_key(x, weights))
        return x * (2.0 if name == "triton" else 3.0)

    compiled = torch.compile(scale_by_choice, fullgraph=True, dynamic=True)
    with torch.no_grad():  # fwd: triton is the fastest measured at 64 x 32x32
        assert compiled(torch.ones(2, 64, 32, 32)).max().item() == 2.0
    assert (
        compiled(torch.ones(2, 64, 32, 32)).max().item() == 3.0
    )  # fwd_bwd (weights require grad): cuda
    assert compiled(torch.ones(3, 256, 8, 8)).max().item() == 2.0  # fwd_bwd at 256 x 8x8: triton


def test_auto_takes_the_dtype_into_account_on_a_gpu(monkeypatch):
    """On a (simulated) GPU where both fused backends run: auto sends a float64 step to the
    reference and a float32 one to a fused backend; a fused backend named for float64 refuses,
    saying why, before any kernel runs."""
    from dia_fused.kernels import cuda_dia_step

    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    monkeypatch.setattr(backends, "_device_name", lambda device: "a GPU without measurements")
    monkeypatch.setattr(cuda_dia_step, "unavailable_reason", lambda device: None)
    if ops.triton_host is not None:
        monkeypatch.setattr(ops.triton_host, "unavailable_reason", lambda device: None)
    assert ops.resolve_backend("auto", "cuda:0", (64, 1024, "float64", True)) == "reference"
    assert ops.resolve_backend("auto", "cuda:0", (64, 1024, "float32", True)) == "cuda"
    assert ops.resolve_backend("auto", "cuda:0", dtype=torch.float64) == "reference"
    assert ops.available_backends("cuda:0", torch.float64) == ("reference",)
    for name in ("cuda", "triton"):
        with pytest.raises(
            ops.BackendUnavailableError,
            match=rf"backend='{name}' cannot run a float64 step: the {name} backend "
            r"takes float32, bfloat16, float16 inputs, got float64",
        ):
            ops.resolve_backend(name, "cuda:0", dtype=torch.float64)

    calls = []
    monkeypatch.setattr(
        cuda_dia_step, "forward", lambda *args: calls.append(args[0].dtype) or 1 / 0
    )
    resolve = ops.resolve_backend  # CPU tensors whose steps are resolved as on cuda:0
    monkeypatch.setattr(
        backends,
        "resolve_backend",
        lambda requested, device, step=None, dtype=None: resolve(requested, "cuda:0", step, dtype),
    )
    unit = DIALSTM(8, reduction=2).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    out, _ = unit(x)  # the reference: no kernel called
    assert calls == [] and out.dtype == torch.float64
    with pytest.raises(ZeroDivisionError):  # float32 reaches the cuda kernel module
        unit.float()(x.float())
    assert calls == [torch.float32]
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        DIALSTM(8, reduction=2, backend="cuda").double()(x)
    assert calls == [torch.float32]


def test_import_leaves_triton_until_a_triton_step_needs_it():
    """`import dia_fused` (and a step that auto sends to another backend) does not import triton;
    asking about the triton backend does, and answers as before."""
    code = "\n".join(
        [
            "import sys, torch, dia_fused",
            "assert 'triton' not in sys.modules, 'import dia_fused imported triton'",
            "unit = dia_fused.DIALSTM(8, reduction=2)",
            "with torch.no_grad():",
            "    unit(torch.randn(2, 8, 3, 3))",
            "assert 'triton' not in sys.modules, 'a reference step imported triton'",
            "reason = dia_fused.backend_unavailable_reason('triton', 'cpu')",
            "assert 'TRITON_INTERPRET=1' in reason, reason",
            "assert 'triton' in sys.modules",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ops.ENV_BACKEND)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_without_the_triton_package_the_reason_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    monkeypatch.setattr(backends, "_triton_host", None)
    assert backends.backend_unavailable_reason("triton", "cuda:0") == backends.TRITON_MISSING
    assert "triton" not in ops.available_backends("cpu")
    with pytest.raises(ops.BackendUnavailableError, match="pip install triton"):
        ops.resolve_backend("triton", "cpu")
    unit = DIALSTM(8, reduction=2, backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="pip install triton"):
        unit(torch.randn(2, 8, 3, 3))
