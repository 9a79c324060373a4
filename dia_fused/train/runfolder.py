"""The run folder (-c): who may write into it, and what a start does to the files already there.

The rules, so that no run loses another's (or its own) results:

* A folder that holds a run (log.csv with an epoch, checkpoint.pth.tar or model_best.pth.tar) is
  written only by that run continuing (--resume of a checkpoint in it) or when told (--overwrite,
  which deletes the old run's files first). A fresh run, or a resume into another folder, is
  refused otherwise. A run that finished no epoch (log.csv with its header only) holds nothing.
* -c must name a folder (or a path where one can be made) that this process can write to:
  checked at start, before any data is loaded.
* Temporary files of killed writes (`<name>.*.tmp`, see checkpoint._atomic_write) are removed at
  start.
* History after the resumed epoch is moved aside, never deleted: log rows to log_superseded.csv
  (records.CsvLog), a later checkpoint.pth.tar to checkpoint_epoch<E>.pth.tar.
* model_best.pth.tar is the best model ever trained in the folder: the resumed run's best accuracy
  is at least its accuracy, and a missing (or worse) best is rebuilt from the resumed checkpoint
  when that checkpoint is its run's best.
"""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional

from . import checkpoint as ckpt_io
from .errors import TrainError
from .records import CSV_NAME, SUPERSEDED_NAME

RUN_FILES = (ckpt_io.CHECKPOINT_NAME, ckpt_io.BEST_NAME, CSV_NAME)
# files a run writes besides RUN_FILES: removed by --overwrite with them
_HISTORY_PATTERNS = (SUPERSEDED_NAME, "checkpoint_epoch*.pth.tar")


class RunFolderError(TrainError):
    """The run folder cannot be used as asked (it holds another run, or --overwrite conflicts)."""


def run_files(folder: str) -> List[str]:
    """The files of RUN_FILES present in `folder`."""
    return [name for name in RUN_FILES if os.path.isfile(os.path.join(folder, name))]


def _holds_epochs(folder: str, name: str) -> bool:
    """False for a log.csv with its header only (a run stopped before its first epoch ended)."""
    if name != CSV_NAME:
        return True
    try:
        with open(os.path.join(folder, name)) as f:
            return sum(1 for line in f if line.strip()) > 1
    except OSError:
        return True


def _check_writable(folder: str) -> None:
    """Raises RunFolderError when `folder` is a file, lies under a file, or cannot be written
    (tried with a temporary file in it, or in its nearest existing parent)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f"-c {folder}: is a file; expected a folder for the run's files")
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if os.path.exists(existing) or parent == existing:
            raise RunFolderError(
                f"-c {folder}: {existing} is a file, so the folder cannot be made; pass another -c"
            )
        existing = parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".dia_fused_write_check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "read-only file system" if err.errno == errno.EROFS else err.strerror or str(err)
        where = "" if existing == os.path.abspath(folder) else f" (its parent {existing})"
        raise RunFolderError(
            f"-c {folder}: cannot write there{where}: {reason}; pass a folder you can write to"
        ) from err


def stale_temp_files(folder: str) -> List[str]:
    """Temporary files left by writes that were killed before their os.replace."""
    found: List[str] = []
    for name in RUN_FILES:
        found += glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".*.tmp"))
    return sorted(found)


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check(folder: str, *, resume_file: Optional[str], overwrite: bool) -> None:
    """Raises RunFolderError when this start may not write into `folder` (no side effects but a
    temporary file: every process of a distributed run can call it)."""
    _check_writable(folder)
    present = [n for n in run_files(folder) if _holds_epochs(folder, n)]
    resume_here = (
        resume_file is not None
        and os.path.isdir(folder)
        and _same_file(os.path.dirname(os.path.abspath(resume_file)), folder)
    )
    if overwrite and resume_here:
        raise RunFolderError(
            f"--overwrite: -c {folder} holds the checkpoint being resumed "
            f"({resume_file}); drop --overwrite to continue that run there, or "
            f"pass another -c"
        )
    if present and not resume_here and not overwrite:
        what = "a fresh run" if resume_file is None else f"--resume {resume_file}"
        checkpoint = os.path.join(folder, ckpt_io.CHECKPOINT_NAME)
        advice = (
            f"continue that run with --resume {checkpoint}, pass another -c"
            if os.path.isfile(checkpoint)
            else "pass another -c (it holds no checkpoint to resume)"
        )
        raise RunFolderError(
            f"-c {folder}: the folder already holds a run ({', '.join(present)}) and {what} "
            f"would overwrite it; {advice}, or pass --overwrite to replace it"
        )


def prepare(
    folder: str,
    *,
    resumed: Optional[Mapping[str, Any]],
    resume_file: Optional[str],
    overwrite: bool,
    say: Callable[[str], None],
) -> float:
    """Readies `folder` for the run (main process only; `check` passed): removes stale temporary
    files, the old run's files with --overwrite, moves a checkpoint later than the resumed one
    aside, and rebuilds a missing best model. Returns the best accuracy the run starts from (0.0
    for a fresh run)."""
    os.makedirs(folder, exist_ok=True)
    for path in stale_temp_files(folder):
        os.unlink(path)
        say(f"==> removed {path} (a write killed before it finished)")
    if overwrite:
        old = [os.path.join(folder, n) for n in run_files(folder)]
        for pattern in _HISTORY_PATTERNS:
            old += glob.glob(os.path.join(glob.escape(folder), pattern))
        for path in sorted(old):
            os.unlink(path)
        if old:
            names = ", ".join(sorted(os.path.basename(p) for p in old))
            say(f"==> --overwrite: removed the previous run's {names}")
    if resumed is None:
        return 0.0
    epoch = int(resumed["epoch"])
    _move_later_checkpoint(folder, epoch, resume_file, say)
    return _repair_best(folder, resumed, resume_file, say)


def _epoch_of(path: str) -> Optional[int]:
    try:
        return int(ckpt_io.load_checkpoint(path).get("epoch"))
    except (ValueError, TypeError, FileNotFoundError):
        return None


def _move_later_checkpoint(
    folder: str, epoch: int, resume_file: Optional[str], say: Callable[[str], None]
) -> None:
    path = os.path.join(folder, ckpt_io.CHECKPOINT_NAME)
    if not os.path.isfile(path) or (resume_file and _same_file(path, resume_file)):
        return
    later = _epoch_of(path)
    if later is None or later <= epoch:
        return
    target = os.path.join(folder, f"checkpoint_epoch{later}.pth.tar")
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(folder, f"checkpoint_epoch{later}.{suffix}.pth.tar")
        suffix += 1
    os.replace(path, target)
    say(
        f"==> resuming from epoch {epoch}: the later {ckpt_io.CHECKPOINT_NAME} (epoch {later}) "
        f"is kept as {target}"
    )


def _repair_best(
    folder: str, resumed: Mapping[str, Any], resume_file: Optional[str], say: Callable[[str], None]
) -> float:
    best_acc = float(resumed.get("best_acc", 0.0))
    path = os.path.join(folder, ckpt_io.BEST_NAME)
    on_disk: Optional[Dict[str, Any]] = None
    if os.path.isfile(path):
        try:
            on_disk = ckpt_io.load_checkpoint(path)
        except ValueError as err:
            say(
                f"==> {path}: unreadable ({err}); it is rebuilt if the resumed checkpoint is the "
                f"best"
            )
    disk_acc = float(on_disk.get("acc", float("-inf"))) if on_disk is not None else None
    if disk_acc is not None and disk_acc >= best_acc:
        # its epoch may be later than the resumed one (killed before that epoch's checkpoint):
        # it stays the best until a better model replaces it
        return max(best_acc, disk_acc)
    if "acc" in resumed and float(resumed["acc"]) >= best_acc:
        ckpt_io.atomic_save(ckpt_io.with_checksum(resumed), path)
        say(
            f"==> {ckpt_io.BEST_NAME} rebuilt from {resume_file} (epoch {int(resumed['epoch'])}, "
            f"the best so far: acc {best_acc:.2f})"
        )
    else:
        state = "missing" if on_disk is None else f"holds acc {disk_acc:.2f}"
        say(
            f"==> warning: {path} is {state}, while {resume_file} records a best acc of "
            f"{best_acc:.2f} from an earlier epoch; that model cannot be rebuilt from it"
        )
    return best_acc
