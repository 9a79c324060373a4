"""The training CLI on CPU: data, augmentation, one epoch, kill-and-resume, evaluate, DDP (gloo).

Tiny networks (DIA-ResNet-14: two blocks per stage, so the DIA state is carried) on a generated
CIFAR-format directory of a few images keep the whole file within a minute on two cores.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dia_fused.train import checkpoint as ckpt_io
from dia_fused.train.cli import main, parse_args
from dia_fused.train.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    BatchStream,
    DatasetError,
    DatasetNotFoundError,
    ImageSet,
    crop_and_flip,
    load_cifar,
    normalize,
    synthetic_dataset,
    write_cifar_directory,
)
from dia_fused.train.loop import THROUGHPUT_WARMUP_STEPS, learning_rate, train_epoch
from dia_fused.train.modelspec import build_model, model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_IMAGES, TEST_IMAGES = 96, 32


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_cifar_directory(
        str(tmp_path_factory.mktemp("cifar")),
        "cifar10",
        train_size=TRAIN_IMAGES,
        test_size=TEST_IMAGES,
        seed=1,
    )


def tiny_args(data_dir, checkpoint, epochs, *extra):
    return [
        "-d",
        "cifar10",
        "--data-dir",
        data_dir,
        "-a",
        "dia_resnet",
        "--depth",
        "14",
        "--train-batch",
        "32",
        "--test-batch",
        "16",
        "--epochs",
        str(epochs),
        "--schedule",
        "1",
        "2",
        "--lr",
        "0.05",
        "--wd",
        "5e-4",
        "--manualSeed",
        "7",
        "--device",
        "cpu",
        "-c",
        str(checkpoint),
        *extra,
    ]


def read_log(folder):
    with open(os.path.join(folder, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def test_cifar_directory_round_trip(cifar_dir, tmp_path):
    train = load_cifar(cifar_dir, "cifar10", train=True)
    test = load_cifar(cifar_dir, "cifar10", train=False)
    assert train.images.shape == (TRAIN_IMAGES, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.shape == (TEST_IMAGES,) and train.num_classes == 10
    assert int(train.labels.max()) < 10
    c100 = write_cifar_directory(str(tmp_path), "cifar100", train_size=10, test_size=5)
    assert load_cifar(c100, "cifar100", train=True).num_classes == 100
    # the folder itself may be given
    assert len(load_cifar(os.path.join(cifar_dir, "cifar-10-batches-py"), "cifar10", False)) == 32


def test_missing_dataset_names_expected_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        main(tiny_args(str(tmp_path), tmp_path / "ck", 1))
    message = str(err.value)
    for name in ("cifar-10-batches-py", "data_batch_1", "data_batch_5", "test_batch"):
        assert name in message
    with pytest.raises(DatasetNotFoundError, match="train, test"):
        load_cifar(str(tmp_path), "cifar100", train=True)


def test_malformed_dataset_errors(tmp_path):
    root = write_cifar_directory(str(tmp_path), "cifar10", train_size=10, test_size=5)
    folder = os.path.join(root, "cifar-10-batches-py")
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3: malformed"):
        load_cifar(root, "cifar10", train=True)
    # a pickle that would run code is refused, not executed
    import pickle

    class RunsCode:
        def __reduce__(self):
            return (os.remove, (os.path.join(folder, "data_batch_1"),))

    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": RunsCode(), b"labels": []}, f)
    with pytest.raises(DatasetError, match="not allowed"):
        load_cifar(root, "cifar10", train=False)
    assert os.path.isfile(os.path.join(folder, "data_batch_1"))
    # wrong shape
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"\(N, 3072\)"):
        load_cifar(root, "cifar10", train=False)
    # the command line reports it without a traceback
    proc = subprocess.run(
        [sys.executable, "-m", "dia_fused.train", "--data-dir", root, "--epochs", "1"]
        + ["--depth", "20"],  # a model the flags describe (29, cifar.py's default, is ResNeXt's)
        capture_output=True,
        text=True,
        env=_env(),
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr and "malformed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_crop_and_flip_matches_pad_slice_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen)
    offsets = torch.randint(0, 9, (6, 2), generator=gen)
    flips = torch.tensor([True, False, True, False, True, False])
    out = crop_and_flip(images, offsets, flips)
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(6):
        top, left = offsets[i].tolist()
        expected = padded[i, :, top : top + 32, left : left + 32]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)
    # normalisation uses the official mean/std; padding is zero in pixel space
    x = normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    assert torch.allclose(x[0, :, 0, 0], -torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD))


def test_batch_stream_is_a_function_of_seed_and_epoch_and_shards_like_distributed_sampler():
    data = ImageSet(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous(),
        torch.arange(10),
        10,
    )
    single = BatchStream(data, 4, train=True, augment=False, seed=3)
    epoch0 = torch.cat([y for _, y in single.epoch(0)])
    assert torch.equal(epoch0, torch.cat([y for _, y in single.epoch(0)]))
    assert sorted(epoch0.tolist()) == list(range(10))
    assert not torch.equal(epoch0, torch.cat([y for _, y in single.epoch(1)]))
    # 3 processes: the order is padded to 12 (DistributedSampler), rank r gets order[r::3]
    order = single.order(0)
    padded = torch.cat([order, order[:2]])
    shards = [
        BatchStream(data, 3, train=True, augment=False, seed=3, rank=r, world_size=3)
        for r in range(3)
    ]
    for r, shard in enumerate(shards):
        assert torch.equal(torch.cat([y for _, y in shard.epoch(0)]), padded[r::3])
    # every rank consumes the augmentation stream of the whole global batch
    aug = [
        BatchStream(data, 6, train=True, augment=True, seed=3, rank=r, world_size=2)
        for r in range(2)
    ]
    full = BatchStream(data, 6, train=True, augment=True, seed=3)
    for (x, _), (x0, _), (x1, _) in zip(full.epoch(2), aug[0].epoch(2), aug[1].epoch(2)):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
    # without augmentation a batch is exactly the normalised images
    x, y = next(iter(single.epoch(0)))
    assert torch.equal(x, normalize(data.images[y]))
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        BatchStream(data, 5, train=True, augment=False, seed=0, world_size=2)


def test_throughput_excludes_the_warm_up_steps():
    from dia_fused.train.distributed import Context

    train, _ = synthetic_dataset(20, 1, num_classes=4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    long = train_epoch(
        model,
        BatchStream(train, 2, train=True, augment=False, seed=0),
        0,
        opt,
        torch.nn.CrossEntropyLoss(),
        ctx,
    )
    assert long.images == 20 and long.steady_images == 20 - 2 * THROUGHPUT_WARMUP_STEPS
    assert 0 < long.steady_seconds <= long.seconds
    assert long.images_per_s == long.steady_images / long.steady_seconds
    short = train_epoch(
        model,
        BatchStream(train, 10, train=True, augment=False, seed=0),
        0,
        opt,
        torch.nn.CrossEntropyLoss(),
        ctx,
    )  # 2 steps: too short to leave warm-up out
    assert short.steady_images == 0 and short.images_per_s == short.images / short.seconds


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------


def test_learning_rate_matches_the_official_step_schedule():
    lr, official = 0.1, []
    for epoch in range(10):
        if epoch in (3, 6):
            lr *= 0.2
        official.append(lr)
    assert [learning_rate(e, 0.1, [3, 6], 0.2) for e in range(10)] == pytest.approx(official)


def test_preset_fills_defaults_and_explicit_flags_win():
    args = parse_args(["--preset", "wrn52_4", "--epochs", "5", "--wd", "1e-3"])
    assert (args.arch, args.depth, args.widen_factor, args.drop) == ("dia_wrn", 52, 4, 0.3)
    assert args.schedule == [80, 120, 160] and args.gamma == 0.2
    assert args.epochs == 5 and args.weight_decay == 1e-3
    args = parse_args(["--preset", "resnet164", "-a", "resnet"])
    assert args.arch == "resnet" and args.block_name == "Bottleneck" and args.epochs == 180
    plain = parse_args([])  # the official defaults
    assert (plain.epochs, plain.schedule, plain.weight_decay, plain.test_batch) == (
        300,
        [150, 225],
        5e-4,
        100,
    )
    with pytest.raises(SystemExit):
        parse_args(["--preset", "nope"])


@pytest.mark.parametrize("preset", ["resnet164", "preresnet164", "wrn52_4"])
def test_presets_build_the_paper_models(preset):
    from dia_fused.models import list_models

    args = parse_args(["--preset", preset])
    spec = model_spec(args, 100)
    assert spec["name"] in list_models()
    model = build_model(spec, backend="reference")
    # the DIA unit is there: the model returns one attention tensor per stage
    assert len(model.stages) == 3
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_ablation_switches_reach_the_model():
    args = parse_args(
        [
            "-a",
            "dia_resnet",
            "--depth",
            "14",
            "--reduction",
            "8",
            "--num-cells",
            "2",
            "--cell-activation",
            "tanh",
            "--no-norm",
            "--no-skip",
            "--dia-stages",
            "2",
            "3",
            "--attention",
            "dia",
        ]
    )
    spec = model_spec(args, 10)
    assert spec["options"]["reduction"] == 8 and spec["options"]["num_cells"] == 2
    assert spec["options"]["norm"] is False and spec["options"]["skip"] is False
    assert spec["options"]["dia_stages"] == [2, 3]
    model = build_model(spec, backend="reference")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    out, attention = model(torch.randn(2, 3, 32, 32), return_attention=True)
    assert out.shape == (2, 10) and len(attention) == 2


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_one_epoch_writes_log_and_checkpoints(cifar_dir, tmp_path):
    result = main(tiny_args(cifar_dir, tmp_path, 1))
    rows = read_log(tmp_path)
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert set(rows[0]) == {
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "epoch_time_s",
        "train_images_per_s",
    }
    assert np.isfinite(float(rows[0]["train_loss"])) and float(rows[0]["lr"]) == 0.05
    ckpt = ckpt_io.load_checkpoint(os.path.join(tmp_path, "checkpoint.pth.tar"))
    assert ckpt["epoch"] == 1 and ckpt["seed"] == 7 and ckpt["format"] == ckpt_io.FORMAT
    assert ckpt["model"]["options"]["attention"] == "dia"
    assert os.path.isfile(os.path.join(tmp_path, "model_best.pth.tar"))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert result["history"][0]["test_acc"] == pytest.approx(ckpt["acc"])


def test_amp_bf16_channels_last_no_augment_smoke(cifar_dir, tmp_path):
    result = main(
        tiny_args(
            cifar_dir,
            tmp_path,
            1,
            "--amp",
            "bf16",
            "--channels-last",
            "--no-augment",
            "--max-steps",
            "1",
        )
    )
    assert np.isfinite(result["history"][0]["train_loss"])


def test_synthetic_dataset_smoke(tmp_path):
    result = main(
        [
            "-d",
            "synthetic",
            "--synthetic-size",
            "40",
            "--synthetic-classes",
            "10",
            "-a",
            "dia_resnet",
            "--depth",
            "8",
            "--epochs",
            "1",
            "--train-batch",
            "20",
            "--device",
            "cpu",
            "-c",
            str(tmp_path),
            "--manualSeed",
            "1",
        ]
    )
    assert result["history"][0]["epoch"] == 1


@pytest.mark.slow  # kill-and-resume: three training processes
def test_killed_run_resumes_to_the_uninterrupted_state(cifar_dir, tmp_path):
    """SIGKILL after the first checkpoint, resume, compare with an uninterrupted run. Two stacked
    cells: the dropout between them draws from the global RNG, whose state must be restored."""
    epochs = 3
    extra = ("--num-cells", "2")
    reference = tmp_path / "uninterrupted"
    main(tiny_args(cifar_dir, reference, epochs, *extra))

    killed = tmp_path / "killed"
    ckpt_path = killed / "checkpoint.pth.tar"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dia_fused.train", *tiny_args(cifar_dir, killed, epochs, *extra)],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not ckpt_path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = ckpt_io.load_checkpoint(str(ckpt_path))["epoch"]
    assert 1 <= saved < epochs

    main(tiny_args(cifar_dir, killed, epochs, *extra, "--resume", str(ckpt_path)))
    a = ckpt_io.load_checkpoint(str(reference / "checkpoint.pth.tar"))
    b = ckpt_io.load_checkpoint(str(ckpt_path))
    assert a["epoch"] == b["epoch"] == epochs
    assert_same_state(a["state_dict"], b["state_dict"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])

    def strip(rows):
        return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]

    assert strip(read_log(reference)) == strip(read_log(killed))


def test_resume_refuses_another_model(cifar_dir, tmp_path):
    main(tiny_args(cifar_dir, tmp_path, 1, "--max-steps", "1"))
    with pytest.raises(ValueError, match="reduction"):
        main(
            tiny_args(
                cifar_dir,
                tmp_path,
                2,
                "--reduction",
                "8",
                "--resume",
                str(tmp_path / "checkpoint.pth.tar"),
            )
        )


def test_evaluate_runs_the_model_in_eval_mode():
    """Batch norm with running statistics unlike a batch's, and dropout: evaluate() called on a
    model left in train mode gives the eval-mode loss and accuracy and leaves the statistics as
    they were (the resume test compares evaluate() with itself, so it cannot tell)."""
    from dia_fused.train.distributed import Context
    from dia_fused.train.loop import evaluate

    torch.manual_seed(0)
    _, test = synthetic_dataset(4, 12, num_classes=3)
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 32 * 32, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(8, 3),
    )
    bn = model[2]
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 4)
    before = bn.running_mean.clone(), bn.running_var.clone()
    stream = BatchStream(test, 4, train=False, augment=False, seed=0)
    ctx = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model.train()
    result = evaluate(model, stream, torch.nn.CrossEntropyLoss(), ctx)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    model.eval()
    with torch.no_grad():
        batches = [(model(x), y) for x, y in stream.epoch(0)]
    loss = sum(F.cross_entropy(out, y, reduction="sum").item() for out, y in batches) / 12
    correct = sum((out.argmax(1) == y).sum().item() for out, y in batches)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.acc == pytest.approx(100.0 * correct / 12)


def test_evaluate_reproduces_the_logged_test_metrics(cifar_dir, tmp_path):
    main(tiny_args(cifar_dir, tmp_path, 1))
    row = read_log(tmp_path)[0]
    result = main(
        tiny_args(
            cifar_dir, tmp_path / "eval", 1, "-e", "--resume", str(tmp_path / "checkpoint.pth.tar")
        )
    )
    assert result["test_acc"] == pytest.approx(float(row["test_acc"]), rel=1e-5)
    assert result["test_loss"] == pytest.approx(float(row["test_loss"]), rel=1e-5)
    assert not os.path.exists(tmp_path / "eval" / "log.csv")


def readme_smoke_command():
    """The README's smoke training command, as its argument list."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"python -m dia_fused\.train (-a dia_resnet .*?-c runs/smoke)", text, re.S)
    assert match, "the README's smoke command (-c runs/smoke) is gone"
    return shlex.split(match.group(1).replace("\\\n", " "))


@pytest.mark.slow  # three runs of the README's smoke model (DIA-ResNet-20, 512 images)
def test_resume_alone_continues_the_readme_smoke_run_bit_exactly(tmp_path, monkeypatch, capsys):
    """The README's smoke command run for 2 epochs stops after the first; `--resume
    runs/smoke/checkpoint.pth.tar` alone finishes it exactly as a run that never stopped."""
    smoke = readme_smoke_command()
    assert smoke[smoke.index("--epochs") + 1] == "1"
    smoke[smoke.index("--epochs") + 1] = "2"
    monkeypatch.chdir(tmp_path)
    real = ckpt_io.save_epoch

    class Stop(BaseException):
        pass

    def stop_after_first(folder, state, is_best):
        real(folder, state, is_best)
        raise Stop

    monkeypatch.setattr(ckpt_io, "save_epoch", stop_after_first)
    with pytest.raises(Stop):
        main(smoke)
    monkeypatch.setattr(ckpt_io, "save_epoch", real)
    main(["--resume", "runs/smoke/checkpoint.pth.tar"])
    assert "differ from the checkpoint's run" not in capsys.readouterr().out
    resumed = ckpt_io.load_checkpoint("runs/smoke/checkpoint.pth.tar")
    whole = smoke[: smoke.index("-c")] + ["-c", "runs/whole", "--manualSeed", str(resumed["seed"])]
    main(whole)
    reference = ckpt_io.load_checkpoint("runs/whole/checkpoint.pth.tar")
    assert resumed["epoch"] == reference["epoch"] == 2
    assert_same_state(reference["state_dict"], resumed["state_dict"])
    for a, b in zip(
        reference["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])

    def strip(rows):
        return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]

    assert strip(read_log("runs/whole")) == strip(read_log("runs/smoke"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # DDP: two torchrun processes
def test_ddp_two_gloo_processes_match_one_process(cifar_dir, tmp_path):
    # BatchNorm statistics are per process under DDP, so compare without BatchNorm
    extra = ("--no-norm", "--lr", "0.01")
    main(tiny_args(cifar_dir, tmp_path / "one", 2, *extra))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "dia_fused.train",
        *tiny_args(cifar_dir, tmp_path / "two", 2, *extra),
    ]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = ckpt_io.load_checkpoint(str(tmp_path / "one" / "checkpoint.pth.tar"))
    b = ckpt_io.load_checkpoint(str(tmp_path / "two" / "checkpoint.pth.tar"))
    assert len(b["rng"]) == 2
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for r1, r2 in zip(one, two):
        assert float(r1["train_loss"]) == pytest.approx(float(r2["train_loss"]), rel=1e-5)
        assert float(r1["test_acc"]) == pytest.approx(float(r2["test_acc"]), abs=1e-9)


def test_unusable_backend_fails_before_any_work(tmp_path):
    from dia_fused.ops import BackendUnavailableError

    # the dataset folder does not exist either: the backend is checked first
    with pytest.raises(BackendUnavailableError, match="cuda backend runs on CUDA devices"):
        main(tiny_args(str(tmp_path / "no-data"), tmp_path / "ck", 1, "--backend", "cuda"))


def test_flag_errors_come_before_the_data_loads(tmp_path, capsys):
    """A model or batch flag the run cannot use is one `error:` line (status 2) before any data
    is read: the data folder here does not exist, so a later check would report that instead."""
    from dia_fused.train.cli import command, parse_arguments, run
    from dia_fused.train.distributed import Context
    from dia_fused.train.errors import TrainError

    missing = str(tmp_path / "no-data")
    base = ["-d", "cifar10", "--data-dir", missing, "--epochs", "1", "-c", str(tmp_path / "run")]
    assert command(base + ["--depth", "30", "--block-name", "bottleneck"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the model flags") and "expected 9n+2" in err
    assert "Traceback" not in err and "cifar.py's default" not in err
    assert command(base) == 2  # cifar.py's defaults: depth 29 with basic blocks
    err = capsys.readouterr().err
    assert "expected 6n+2" in err and "--depth 29 is cifar.py's default" in err
    # two processes: the global batch must split evenly over them
    args, _ = parse_arguments(base + ["--depth", "20", "--train-batch", "5"])
    two = Context(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(TrainError, match=r"--train-batch 5: expected a multiple of .* \(2\)"):
        run(args, two)
    args, _ = parse_arguments(base + ["--depth", "20", "--test-batch", "3"])
    with pytest.raises(TrainError, match=r"--test-batch 3: expected a multiple"):
        run(args, two)
