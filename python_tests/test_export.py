"""Export gives a portable graph: under torch.export, torch.onnx.export and torch.jit.trace the DIA
step decomposes into the reference math, whatever backend the model asks for. Checked with the
Triton backend forced (the interpreter on CPU): the exported DIA-ResNet-20 runs without any
dia_fused op (in onnxruntime for ONNX) and gives the eager outputs within the tolerance rule."""

import copy
import importlib.util
import os

import pytest
import torch

from dia_fused import ops
from dia_fused.models import create_model
from dia_fused.modules import DIALSTM
from dia_fused.testing import assert_within_tolerance

_ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
_MISSING_ONNX = [m for m in _ONNX_MODULES if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def exported_case():
    """A DIA-ResNet-20 forcing backend="triton", its input, its eager triton logits, and the
    float32 / float64 reference logits of the same weights (the tolerance rule's inputs)."""
    reason = ops.backend_unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"the triton backend cannot run here: {reason}")
    torch.manual_seed(0)
    model = create_model("dia_resnet20", num_classes=10, backend="triton").eval()
    x = torch.randn(2, 3, 8, 8)  # tiny maps: the Triton interpreter runs the eager model
    assert [u.backend for u in _units(model)] == ["triton"] * 3
    with torch.no_grad():
        eager = model(x)
        reference = copy.deepcopy(model)
        for unit in _units(reference):
            unit.backend = "reference"
        same = reference(x)
        ref64 = reference.double()(x.double())
    return model, x, eager, same, ref64


def _units(model) -> list:
    return [m for m in model.modules() if isinstance(m, DIALSTM)]


def _dia_ops(graph) -> list:
    return [str(n.target) for n in graph.nodes if "dia_fused" in str(n.target)]


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # the model names its backend; DIA_FUSED_BACKEND from the environment would override it
    monkeypatch.delenv("DIA_FUSED_BACKEND", raising=False)


def test_eager_model_runs_the_triton_kernels(exported_case):
    model, x, eager, same, ref64 = exported_case
    assert all(u.resolved_backend(x) == "triton" for u in _units(model))
    assert_within_tolerance("eager triton logits", eager, same, ref64)


def test_torch_export_decomposes_into_reference(exported_case):
    model, x, eager, same, ref64 = exported_case
    program = torch.export.export(model, (x,))
    assert _dia_ops(program.graph) == []
    with torch.no_grad():
        got = program.module()(x)
    assert_within_tolerance("torch.export logits", got, same, ref64)
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)


def test_jit_trace_decomposes_into_reference(exported_case):
    model, x, eager, same, ref64 = exported_case
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        got = traced(x)
    assert "dia_fused::" not in str(traced.inlined_graph)
    assert_within_tolerance("torch.jit.trace logits", got, same, ref64)


@pytest.mark.slow  # the ONNX translation and optimisation passes
@pytest.mark.skipif(
    bool(_MISSING_ONNX),
    reason=f"ONNX export test needs {' '.join(_MISSING_ONNX)}"
    f" (pip install onnx onnxscript onnxruntime, or the test extra)",
)
def test_onnx_export_runs_in_onnxruntime(exported_case, tmp_path):
    import onnx
    import onnxruntime

    model, x, eager, same, ref64 = exported_case
    path = os.fspath(tmp_path / "dia_resnet20.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    proto = onnx.load(path)
    domains = {node.domain for node in proto.graph.node}
    assert not any("dia_fused" in d for d in domains), domains
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    got = torch.from_numpy(out)
    assert_within_tolerance("onnxruntime logits", got, same, ref64)
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
