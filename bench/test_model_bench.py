"""bench/model_bench.py end to end on a tiny ResNet (depth 11, batch 2) with every variant (and
pytorchcv's diaresnet20_cifar10 before and after accelerate), so that the script the GPU numbers
come from is exercised in CI."""

import json

import pytest

import model_bench


@pytest.mark.slow  # three ResNet variants trained and timed on CPU
def test_model_bench_writes_every_key(tmp_path, capsys):
    out = tmp_path / "model_bench.json"
    assert (
        model_bench.main(
            [
                "--json",
                str(out),
                "--depth",
                "11",
                "--batch",
                "2",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--no-bf16",
                "--pytorchcv-model",
                "diaresnet20_cifar10",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for key in (
        "plain_train_ms",
        "dia_fused_train_ms",
        "dia_reference_train_ms",
        "dia_compiled_train_ms",
        "se_train_ms",
        "plain_infer_ms",
        "dia_fused_infer_ms",
        "dia_fused_train_ratio_to_plain",
    ):
        assert result[key] > 0, key
    for key in (
        "pytorchcv_dia_train_ms",
        "pytorchcv_dia_accelerated_train_ms",
        "pytorchcv_dia_infer_ms",
        "pytorchcv_dia_accelerated_infer_ms",
        "pytorchcv_dia_accelerated_train_speedup",
    ):
        assert result[key] > 0, key  # pytorchcv's model as shipped and after dia_fused.accelerate
    assert result["pytorchcv_model"] == "diaresnet20_cifar10"
    assert result["device"] and result["torch"] and result["steps"] == 2
    # depth 11: one block per stage, one unit per stage; auto on a CPU runs the reference
    assert (
        result["dia_fused_train_backends"]
        == result["dia_fused_infer_backends"]
        == "reference/reference/reference"
    )
    assert json.loads(capsys.readouterr().out) == result
