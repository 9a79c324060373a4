"""The training run folder and the process environment: nothing lost, nothing silently wrong.

Crashes at every checkpoint write and kills at random instants keep model_best; stale temporary
files go at the next start; a folder that holds a run is written only by its resume or with
--overwrite; history after a resumed epoch is moved aside, never dropped; SIGTERM stops like
SIGINT, keeping the last completed epoch; the torchrun variables are checked; resume compares
values. Tiny synthetic data (20 train, 4 test images: one step per epoch) and a DIA-ResNet-8
keep a run short.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from dia_fused.train import checkpoint as ckpt_io
from dia_fused.train.cli import main

# The errors are ValueErrors (RunFolderError, DistributedEnvError) matched by their message, and
# the new modules are imported where used, so that this file also runs against the old code.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT, BEST = ckpt_io.CHECKPOINT_NAME, ckpt_io.BEST_NAME
STALE = ("checkpoint.pth.tar.k1ll3d.tmp", "model_best.pth.tar.k1ll3d.tmp", "log.csv.k1ll3d.tmp")


def args(folder, epochs, *extra):
    return [
        "-d",
        "synthetic",
        "--synthetic-size",
        "20",
        "--synthetic-classes",
        "4",
        "-a",
        "dia_resnet",
        "--depth",
        "8",
        "--train-batch",
        "20",
        "--test-batch",
        "8",
        "--epochs",
        str(epochs),
        "--schedule",
        "5",
        "--lr",
        "0.05",
        "--manualSeed",
        "3",
        "--device",
        "cpu",
        "-c",
        str(folder),
        *extra,
    ]


def resume(folder, epochs, *extra):
    return args(folder, epochs, "--resume", str(folder / CKPT), *extra)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return ckpt_io.load_checkpoint(str(path))


def temp_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


def env(**extra):
    out = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    }
    out["PYTHONPATH"] = ROOT + os.pathsep + out.get("PYTHONPATH", "")
    out.update(extra)
    return out


def assert_best_kept(folder):
    """Once an epoch has finished (checkpoint.pth.tar exists), model_best.pth.tar exists, loads,
    and holds at least the best accuracy the checkpoint records."""
    if not (folder / CKPT).exists():
        return
    ckpt = load(folder / CKPT)
    assert (folder / BEST).exists(), f"{BEST} missing after epoch {ckpt['epoch']}"
    best = load(folder / BEST)
    assert best["acc"] >= ckpt["best_acc"], (best["acc"], ckpt["best_acc"])


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# the best model
# ---------------------------------------------------------------------------------------------


class _Crash(BaseException):
    """A process death at a chosen instant (not an Exception: nothing may catch it)."""


def test_a_crash_after_any_checkpoint_write_keeps_the_best_model(tmp_path, monkeypatch):
    """The run dies right after its n-th checkpoint file write, for every n of a 2-epoch run;
    model_best is there whenever a checkpoint is, and the resumed run ends with the best of all
    epochs in model_best."""
    real_save = ckpt_io.atomic_save
    reference = tmp_path / "whole"
    main(args(reference, 2))
    writes = 3 if load(reference / BEST)["epoch"] == 2 else 2
    for n in range(1, writes + 1):
        folder = tmp_path / f"crash{n}"
        count = [0]

        def crashing_save(obj, path, n=n, count=count):
            real_save(obj, path)
            count[0] += 1
            if count[0] == n:
                raise _Crash(path)

        monkeypatch.setattr(ckpt_io, "atomic_save", crashing_save)
        with pytest.raises(_Crash):
            main(args(folder, 2))
        monkeypatch.setattr(ckpt_io, "atomic_save", real_save)
        assert_best_kept(folder)
        main(resume(folder, 2) if (folder / CKPT).exists() else args(folder, 2, "--overwrite"))
        final, rows = load(folder / CKPT), read_rows(folder / "log.csv")
        assert final["epoch"] == 2 and [r["epoch"] for r in rows] == ["1", "2"]
        best = max(float(r["test_acc"]) for r in rows)
        assert final["best_acc"] == pytest.approx(best)
        assert load(folder / BEST)["acc"] == pytest.approx(best)


def test_resume_rebuilds_a_missing_best_from_the_checkpoint(tmp_path, capsys):
    main(args(tmp_path, 1))
    os.unlink(tmp_path / BEST)  # what the old write order left after a crash between the files
    main(resume(tmp_path, 1))  # nothing left to train: the repair alone
    assert "rebuilt" in capsys.readouterr().out
    assert load(tmp_path / BEST)["epoch"] == 1


@pytest.mark.slow
def test_kill_loop_keeps_model_best_and_the_next_start_removes_stale_temp_files(tmp_path):
    """SIGKILL at many instants (mid-write, between model_best and the checkpoint, in training);
    after each kill model_best is there and loadable, and the next start removes the temporary
    files the kills (and a planted one) left."""
    rng = random.Random(0)
    folder = tmp_path / "run"
    epochs, planted, finished = 6, set(), False
    for round_ in range(8):
        cmd = (
            resume(folder, epochs)
            if (folder / CKPT).exists()
            else args(folder, epochs, *(("--overwrite",) if folder.exists() else ()))
        )
        before = load(folder / CKPT)["epoch"] if (folder / CKPT).exists() else 0
        # temporary files already there (planted, or left by the last kill) are not this start's
        left = set(temp_files(folder)) if folder.exists() else set()
        best_mtime = (folder / BEST).stat().st_mtime_ns if (folder / BEST).exists() else 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "dia_fused.train", *cmd],
            env=env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        mode, started = round_ % 3, False
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            ours = folder.exists() and [f for f in temp_files(folder) if f not in left]
            best_now = (folder / BEST).stat().st_mtime_ns if (folder / BEST).exists() else 0
            epoch_now = load(folder / CKPT)["epoch"] if (folder / CKPT).exists() else 0
            started = started or bool(ours) or best_now != best_mtime or epoch_now > before
            if (
                (mode == 0 and ours)
                or (mode == 1 and best_now != best_mtime)
                or (mode == 2 and epoch_now > before)
            ):
                if mode == 2:
                    time.sleep(rng.uniform(0, 0.3))  # somewhere in the next epoch
                proc.kill()
                break
            time.sleep(0.001)
        proc.wait()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        if proc.returncode == 0:
            finished = True
            break
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
        assert_best_kept(folder)
        if started:  # this start got past its cleanup: the planted files are gone
            assert not planted & set(temp_files(folder)), temp_files(folder)
        planted = {STALE[round_ % len(STALE)]}
        (folder / STALE[round_ % len(STALE)]).write_bytes(b"torn")
    if not finished:
        main(resume(folder, epochs))
    assert not temp_files(folder)
    rows = read_rows(folder / "log.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    best = load(folder / BEST)
    assert best["acc"] == pytest.approx(max(float(r["test_acc"]) for r in rows))


# ---------------------------------------------------------------------------------------------
# the folder
# ---------------------------------------------------------------------------------------------


def test_start_removes_stale_temp_files_only(tmp_path, capsys):
    main(args(tmp_path, 1))
    for name in STALE + ("notes.tmp",):
        (tmp_path / name).write_bytes(b"torn")
    main(resume(tmp_path, 2))
    assert temp_files(tmp_path) == ["notes.tmp"]  # not a file of ours: kept
    assert capsys.readouterr().out.count("a write killed before it finished") == len(STALE)


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    main(args(tmp_path / "a", 1))
    before = {n: (tmp_path / "a" / n).read_bytes() for n in ("log.csv", CKPT, BEST)}
    with pytest.raises(ValueError, match="already holds a run.*--overwrite"):
        main(args(tmp_path / "a", 1))
    assert {n: (tmp_path / "a" / n).read_bytes() for n in before} == before
    # a resume into another folder that holds a run
    main(args(tmp_path / "b", 1, "--manualSeed", "4"))
    with pytest.raises(ValueError, match="already holds a run"):
        main(args(tmp_path / "b", 2, "--resume", str(tmp_path / "a" / CKPT)))
    with pytest.raises(ValueError, match="--overwrite: .*holds the checkpoint being resumed"):
        main(resume(tmp_path / "a", 2, "--overwrite"))
    # told: the old run's files are replaced
    (tmp_path / "a" / "log_superseded.csv").write_text("epoch\n9\n")
    result = main(args(tmp_path / "a", 1, "--manualSeed", "5", "--overwrite"))
    assert load(tmp_path / "a" / CKPT)["seed"] == 5 and result["seed"] == 5
    assert not (tmp_path / "a" / "log_superseded.csv").exists()
    assert len(read_rows(tmp_path / "a" / "log.csv")) == 1


def test_resume_from_an_earlier_checkpoint_keeps_the_later_history(tmp_path, capsys):
    """Resuming from model_best (or any earlier checkpoint) of the folder: the later log rows go
    to log_superseded.csv and the later checkpoint.pth.tar is kept under its epoch."""
    main(args(tmp_path, 1))
    early = tmp_path / "early.pth.tar"
    early.write_bytes((tmp_path / CKPT).read_bytes())  # model_best when epoch 1 stays the best
    main(resume(tmp_path, 3))
    later_rows = read_rows(tmp_path / "log.csv")[1:]
    main(args(tmp_path, 3, "--resume", str(early)))
    superseded = read_rows(tmp_path / "log_superseded.csv")
    assert [r["epoch"] for r in superseded] == ["2", "3"]
    assert all(r["resumed_from_epoch"] == "1" for r in superseded)
    assert [
        {k: v for k, v in r.items() if k != "resumed_from_epoch"} for r in superseded
    ] == later_rows
    assert load(tmp_path / "checkpoint_epoch3.pth.tar")["epoch"] == 3
    assert "kept as" in capsys.readouterr().out
    assert [r["epoch"] for r in read_rows(tmp_path / "log.csv")] == ["1", "2", "3"]


# ---------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------


def test_a_signal_inside_a_deferred_section_waits_for_its_end():
    from dia_fused.train import interrupt

    done = []
    with interrupt.handled():
        with pytest.raises(interrupt.Interrupted) as err:
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                done.append("saved")
        assert err.value.signum == signal.SIGTERM and err.value.exit_status == 143
        with pytest.raises(interrupt.Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert done == ["saved"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_stops_like_sigint_keeping_the_last_completed_epoch(tmp_path):
    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dia_fused.train", *args(folder, 50)],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (folder / CKPT).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted by SIGTERM" in stderr and "holds the last completed epoch" in stderr
    assert "Traceback" not in stderr
    epoch = load(folder / CKPT)["epoch"]
    assert 1 <= epoch < 50 and not temp_files(folder)
    assert_best_kept(folder)
    assert len(read_rows(folder / "log.csv")) in (epoch, epoch + 1)  # + a row before its save


# ---------------------------------------------------------------------------------------------
# environment and resume settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variables, named",
    [
        ({"RANK": "5"}, "RANK=5 without WORLD_SIZE"),
        ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 without WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE: expected >= 1, got 0"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE: expected an int, got 'two'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK: expected 0 <= RANK < WORLD_SIZE \(2\), got 2"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK: expected 0 <= RANK"),
        (
            {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
            r"LOCAL_RANK: expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE \(2\), got 3",
        ),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR and MASTER_PORT: not set"),
    ],
)
def test_distributed_environment_is_checked(tmp_path, monkeypatch, variables, named):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=named):
        main(args(tmp_path, 1))
    assert not (tmp_path / "log.csv").exists()


def test_distributed_environment_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dia_fused.train", *args(tmp_path, 1)],
        env=env(RANK="5"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: environment RANK=5 without WORLD_SIZE: launch with "
        "torchrun, or unset the variable for one process"
    )


def test_distributed_environment_of_one_process_passes(monkeypatch):
    from dia_fused.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert distributed.read_environment() == (1, 0, 0)


def test_resume_compares_values_and_prints_what_changed(tmp_path, capsys):
    main(args(tmp_path, 1))
    capsys.readouterr()
    # explicit defaults (the model's reduction, the run's own --lr) are the same run
    # (--epochs 1: nothing left to train, the checks alone)
    main(
        resume(
            tmp_path,
            1,
            "--reduction",
            "4",
            "--num-cells",
            "1",
            "--dia-stages",
            "3",
            "2",
            "1",
            "--lr",
            "0.05",
        )
    )
    assert "differ from the checkpoint's run" not in capsys.readouterr().out
    main(resume(tmp_path, 2, "--lr", "0.01", "--train-batch", "10"))
    out = capsys.readouterr().out
    assert "--epochs 1 -> 2" in out and "--lr 0.05 -> 0.01" in out
    assert "--train-batch 20 -> 10" in out
    with pytest.raises(ValueError, match="another model .*reduction 4 vs 8"):
        main(resume(tmp_path, 4, "--reduction", "8"))


# ---------------------------------------------------------------------------------------------
# nothing silently wrong (issue 22): hyperparameters, non-finite runs, checksums, write errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--lr", "nan", "--lr: expected a finite number > 0, got nan"),
        ("--lr", "inf", "--lr: expected a finite number > 0, got inf"),
        ("--lr", "-0.1", "--lr: expected a finite number > 0"),
        ("--momentum", "nan", "--momentum: expected a finite number >= 0 and < 1"),
        ("--momentum", "-0.5", "--momentum: expected"),
        ("--momentum", "1.5", "--momentum: expected"),
        ("--wd", "-1e-4", "--weight-decay: expected a finite number >= 0"),
        ("--wd", "inf", "--weight-decay: expected"),
        ("--gamma", "0", "--gamma: expected a finite number > 0"),
        ("--gamma", "nan", "--gamma: expected"),
        ("--drop", "1", "--drop: expected a finite number >= 0 and < 1"),
        ("--schedule", "-1", "--schedule: expected epochs >= 0"),
        ("--reduction", "0", "--reduction: expected >= 1"),
        ("--workers", "-1", "--workers: expected >= 0"),
    ],
)
def test_out_of_range_hyperparameters_are_refused_before_anything(
    tmp_path, capsys, flag, value, expected
):
    """Before: --lr nan trained, logged NaN losses, saved NaN weights as model_best, exit 0."""
    with pytest.raises(SystemExit) as err:
        main(args(tmp_path / "run", 1, f"{flag}={value}"))
    assert err.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_start_epoch_beyond_epochs_is_refused_and_a_run_without_epochs_blocks_nothing(
    tmp_path, capsys
):
    """Before: --start-epoch 5 --epochs 3 trained nothing, exited 0 and left a header-only log.csv
    that made the next fresh run in the folder refused."""
    with pytest.raises(SystemExit) as err:
        main(args(tmp_path / "run", 3, "--start-epoch", "5"))
    assert err.value.code == 2
    assert "--start-epoch 5: expected < --epochs (3)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # what a run stopped in its first epoch leaves: log.csv with its header only
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text("epoch,lr,train_loss\n")
    main(args(tmp_path / "run", 1))
    assert [r["epoch"] for r in read_rows(tmp_path / "run" / "log.csv")] == ["1"]


def _all_finite(ckpt):
    import torch

    return all(
        bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values() if t.is_floating_point()
    )


@pytest.mark.parametrize("poisoned", ["loss", "weights"])
def test_a_non_finite_epoch_stops_the_run_and_keeps_the_last_good_files(
    tmp_path, monkeypatch, capsys, poisoned
):
    """Epoch 2 turns non-finite (its loss, or only the weights its last step leaves): the run
    stops with a one-line error and exit status 1, and checkpoint.pth.tar, model_best.pth.tar and
    log.csv keep epoch 1. Before: NaN weights were saved as both, exit 0."""
    import torch

    from dia_fused.train import cli

    real = cli.train_epoch

    def poisoning(model, stream, epoch, *a, **k):
        fc = model.head.fc.weight
        if epoch == 1 and poisoned == "loss":
            with torch.no_grad():
                fc.fill_(float("nan"))
        result = real(model, stream, epoch, *a, **k)
        if epoch == 1 and poisoned == "weights":
            with torch.no_grad():
                fc[0, 0] = float("inf")
        return result

    monkeypatch.setattr(cli, "train_epoch", poisoning)
    with pytest.raises(
        RuntimeError, match="epoch 2: the (training loss is nan|weights are not fin)"
    ):
        main(args(tmp_path, 2))
    for name in (CKPT, BEST):
        ckpt = load(tmp_path / name)
        assert ckpt["epoch"] == 1 and _all_finite(ckpt), name
    assert [r["epoch"] for r in read_rows(tmp_path / "log.csv")] == ["1"]
    if poisoned == "weights":
        return
    capsys.readouterr()
    assert cli.command(args(tmp_path / "again", 2)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: epoch 2: ")
    assert "lower --lr" in err and "holds the last completed epoch (1)" in err


def _corrupt_a_tensor(path):
    """Flips one byte inside the stored bytes of the checkpoint's largest weight."""
    import torch

    ckpt = torch.load(path, weights_only=True)
    weight = max(ckpt["state_dict"].values(), key=lambda t: t.numel())
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + weight.numel() * 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_checkpoints_carry_a_checksum_that_resume_and_evaluate_verify(tmp_path):
    """Before: a checkpoint with corrupted tensor bytes loaded, and the run resumed from garbage."""
    import torch

    main(args(tmp_path / "run", 1))
    kept = tmp_path / "official.pth.tar"  # a checkpoint without a checksum, as official files are
    ckpt = torch.load(tmp_path / "run" / CKPT, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "tensor_sha256"}, kept)
    _corrupt_a_tensor(tmp_path / "run" / CKPT)
    with pytest.raises(ValueError, match="do not match the checksum .* corrupted"):
        main(resume(tmp_path / "run", 2))
    with pytest.raises(ValueError, match="do not match the checksum"):
        main(args(tmp_path / "eval", 1, "-e", "--resume", str(tmp_path / "run" / CKPT)))
    result = main(args(tmp_path / "eval", 1, "-e", "--resume", str(kept)))
    assert result["test_acc"] == pytest.approx(ckpt["acc"])


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_epoch(
    tmp_path, monkeypatch, capsys
):
    """A full disk during a save (torch's own error). Before: RuntimeError '[enforce fail at
    inline_container.cc:672] . unexpected pos ...' as a traceback."""
    import torch

    from dia_fused.train import cli

    real_save, calls = torch.save, [0]

    def disk_full(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] <= 2:  # epoch 1: model_best and checkpoint
            return real_save(obj, f, *a, **k)
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    assert cli.command(args(tmp_path, 2)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not write ")
    assert str(tmp_path / CKPT) in err or str(tmp_path / BEST) in err
    assert "unexpected pos" in err and "MiB free" in err
    assert "holds the last completed epoch (1)" in err
    monkeypatch.setattr(torch, "save", real_save)
    assert load(tmp_path / CKPT)["epoch"] == 1 and not temp_files(tmp_path)


def test_an_unusable_output_folder_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    """-c naming a file, or a folder that cannot be written: one line naming the path, before the
    dataset is loaded (a missing dataset here). Before: the dataset error, or after the data a
    raw FileExistsError / PermissionError traceback."""
    import errno

    no_data = ("-d", "cifar10", "--data-dir", str(tmp_path / "no-data"))
    (tmp_path / "file").write_text("notes")
    with pytest.raises(ValueError, match=rf"-c {tmp_path / 'file'}: is a file"):
        main(args(tmp_path / "file", 1, *no_data))
    with pytest.raises(ValueError, match=r"is a file, so the folder cannot be made"):
        main(args(tmp_path / "file" / "run", 1, *no_data))
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root: permissions do not stop it; fail as a read-only mount
        real_open = os.open

        def read_only(path, flags, *a, **k):
            if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ValueError, match=rf"-c {folder / 'run'}: cannot write there \(its parent"):
        main(args(folder / "run", 1, *no_data))
    folder.chmod(0o755)


def test_files_are_created_under_the_umask(tmp_path):
    """Before: checkpoints and log.csv were 0600 (mkstemp's mode survived the rename)."""
    old = os.umask(0o027)
    try:
        main(args(tmp_path, 1))
    finally:
        os.umask(old)
    for name in (CKPT, BEST, "log.csv"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o640), name


def test_a_resume_with_another_model_flag_is_not_reported_as_a_missing_dataset(tmp_path):
    """Before: `--resume CKPT --reduction 8` failed on the default dataset folder (cifar10 in
    ./datasets), not on the flag."""
    main(args(tmp_path, 1))
    with pytest.raises(ValueError, match="another model .*reduction 4 vs 8") as err:
        main(["--resume", str(tmp_path / CKPT), "--reduction", "8"])
    assert "data_batch" not in str(err.value)


class _Stop(BaseException):
    """The run's process ends here (after the first epoch's files)."""


def test_resume_alone_continues_the_run_bit_exactly(tmp_path, monkeypatch, capsys):
    """`--resume CKPT` alone: the checkpoint's recorded arguments are the defaults. Before: it
    failed on the default dataset folder. A flag given explicitly still wins, and is reported."""
    main(args(tmp_path / "whole", 2))
    real = ckpt_io.save_epoch

    def stop_after_first(folder, state, is_best):
        real(folder, state, is_best)
        raise _Stop

    monkeypatch.setattr(ckpt_io, "save_epoch", stop_after_first)
    with pytest.raises(_Stop):
        main(args(tmp_path / "run", 2))
    monkeypatch.setattr(ckpt_io, "save_epoch", real)
    capsys.readouterr()
    main(["--resume", str(tmp_path / "run" / CKPT)])
    assert "differ from the checkpoint's run" not in capsys.readouterr().out
    a, b = load(tmp_path / "whole" / CKPT), load(tmp_path / "run" / CKPT)
    assert a["epoch"] == b["epoch"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert a["state_dict"][key].equal(b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa["momentum_buffer"].equal(sb["momentum_buffer"])

    def strip(rows):
        return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]

    assert strip(read_rows(tmp_path / "whole" / "log.csv")) == strip(
        read_rows(tmp_path / "run" / "log.csv")
    )
    main(["--resume", str(tmp_path / "run" / CKPT), "--epochs", "3", "--lr", "0.01"])
    out = capsys.readouterr().out
    assert "--epochs 2 -> 3" in out and "--lr 0.05 -> 0.01" in out
    assert load(tmp_path / "run" / CKPT)["epoch"] == 3


def test_best_model_is_tracked_through_an_accuracy_drop(tmp_path, monkeypatch):
    """Test accuracies 50, 20, 30: model_best stays epoch 1 and every checkpoint records 50 as
    the best (a best accuracy forgotten between epochs lets epoch 3 overwrite model_best)."""
    from dia_fused.train import cli

    real, scripted = cli.evaluate, iter([50.0, 20.0, 30.0])

    def scripted_accuracy(*a, **k):
        result = real(*a, **k)
        result.acc = next(scripted)
        return result

    monkeypatch.setattr(cli, "evaluate", scripted_accuracy)
    main(args(tmp_path, 3))
    best, last = load(tmp_path / BEST), load(tmp_path / CKPT)
    assert (best["epoch"], best["acc"]) == (1, 50.0)
    assert (last["epoch"], last["acc"], last["best_acc"]) == (3, 30.0, 50.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--device", "bogus"), "error: --device: expected cpu, cuda or cuda:N, got 'bogus'"),
        (("--device", "meta"), "error: --device meta: meta tensors hold no data"),
        (("-a", "nope"), "error: --arch: expected "),
        (("--block-name", "Foo"), "error: --block-name: expected BasicBlock or Bottleneck"),
        (("--resume", "missing.pth.tar"), "error: checkpoint: no file at 'missing.pth.tar'"),
    ],
)
def test_command_reports_bad_input_in_one_line_with_status_2(tmp_path, capsys, extra, message):
    """Before: tracebacks (RuntimeError of torch.device, ValueError of the device and model
    checks, FileNotFoundError of the checkpoint)."""
    from dia_fused.train.cli import command

    assert command(args(tmp_path / "run", 1, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
