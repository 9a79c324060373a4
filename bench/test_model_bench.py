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


def help_examples():
    """The `python bench/model_bench.py ...` command lines of its --help (the module docstring),
    as argument lists, with their comments."""
    examples = []
    for line in model_bench.__doc__.splitlines():
        command, _, comment = line.strip().partition("#")
        if command.startswith("python bench/model_bench.py"):
            examples.append((command.split()[2:], comment.strip()))
    return examples


def test_help_examples_parse_and_quick_stands_for_a_small_cpu_run():
    examples = help_examples()
    assert any("--quick" in args for args, _ in examples)
    for args, _ in examples:
        model_bench.parse_args(args)  # a bad example exits with its error
    quick = model_bench.parse_args(["--quick", "--device", "cpu"])
    assert (quick.depth, quick.batch, quick.steps, quick.warmup, quick.bf16) == (20, 4, 3, 1, False)
    assert "dia_compiled" not in quick.variants and "dia_fused" in quick.variants
    assert model_bench.parse_args(["--quick", "--steps", "7"]).steps == 7  # a given option wins
    full = model_bench.parse_args(["--device", "cpu"])
    assert (full.depth, full.batch, full.bf16) == (
        164,
        128,
        True,
    ) and "dia_compiled" in full.variants


def test_default_pytorchcv_model_is_the_one_of_the_depth():
    pytest.importorskip("pytorchcv", reason="pip install --no-deps pytorchcv==0.0.74")
    # basic-block depths carry no `bn` in pytorchcv's names (the old default crashed at depth 20)
    assert model_bench.parse_args(["--depth", "20"]).pytorchcv_model == "diaresnet20_cifar100"
    assert model_bench.parse_args([]).pytorchcv_model == "diaresnet164bn_cifar100"
    depth11 = model_bench.parse_args(["--depth", "11", "--device", "cpu"])
    assert depth11.pytorchcv_model is None and "pytorchcv_dia" not in depth11.variants
    with pytest.raises(SystemExit):
        model_bench.parse_args(["--pytorchcv-model", "diaresnet20bn_cifar100"])


@pytest.mark.slow  # the quick CPU mode end to end: six small ResNets trained and timed
def test_quick_help_example_writes_its_json_in_under_a_minute(tmp_path, monkeypatch, capsys):
    import time

    monkeypatch.chdir(tmp_path)
    (args,) = [args for args, _ in help_examples() if "--quick" in args]
    start = time.process_time()  # CPU time: wall time depends on what else the machine runs
    assert model_bench.main(args + ["--device", "cpu"]) == 0
    assert time.process_time() - start < 60  # under a minute even on one core
    json_path = tmp_path / args[args.index("--json") + 1]
    result = json.loads(json_path.read_text())
    assert result["depth"] == 20 and result["steps"] == 3
    for key in ("plain_train_ms", "dia_fused_train_ms", "se_infer_ms", "dia_reference_infer_ms"):
        assert result[key] > 0, key
    assert "dia_compiled_train_ms" not in result and "bf16_plain_train_ms" not in result
    assert json.loads(capsys.readouterr().out) == result
