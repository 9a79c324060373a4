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
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
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
