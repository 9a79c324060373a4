"""Per-epoch records: a CSV log (always) and TensorBoard scalars (when tensorboard is installed)."""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

from .checkpoint import atomic_write_text
from .errors import WriteError

CSV_NAME = "log.csv"
SUPERSEDED_NAME = "log_superseded.csv"
COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "epoch_time_s",
    "train_images_per_s",
)


class CsvLog:
    """log.csv in the checkpoint folder, one row per finished epoch (1-based `epoch`).

    On resume from a checkpoint of epoch k, rows after k leave log.csv, since those epochs run
    again; they are appended to log_superseded.csv (with the epoch resumed from), never dropped:
    they may be a killed epoch whose checkpoint was never written, or a whole later history when
    the run resumes from an earlier checkpoint (model_best)."""

    def __init__(self, folder: str, resume_epoch: Optional[int] = None):
        self.path = os.path.join(folder, CSV_NAME)
        rows: List[Dict[str, str]] = []
        later: List[Dict[str, str]] = []
        if resume_epoch is not None and os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                for r in csv.DictReader(f):
                    (rows if int(r["epoch"]) <= resume_epoch else later).append(r)
        if later:
            _append_superseded(os.path.join(folder, SUPERSEDED_NAME), later, resume_epoch)
        lines = [",".join(COLUMNS)] + [",".join(r.get(c, "") for c in COLUMNS) for r in rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        self.superseded = len(later)

    def append(self, row: Dict[str, float]) -> None:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row: missing columns {missing}")
        try:
            with open(self.path, "a", newline="") as f:
                f.write(",".join(_fmt(row[c]) for c in COLUMNS) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise WriteError(f"could not write {self.path} ({err.strerror or err})") from err


def _append_superseded(path: str, rows: List[Dict[str, str]], resume_epoch: int) -> None:
    """Appends `rows` to the superseded log (created with its header), fsynced before log.csv is
    rewritten without them."""
    columns = ("resumed_from_epoch",) + COLUMNS
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        if new:
            f.write(",".join(columns) + "\n")
        for r in rows:
            f.write(",".join([str(resume_epoch)] + [r.get(c, "") for c in COLUMNS]) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


class TensorBoard:
    """Scalars under <checkpoint>/tensorboard when torch.utils.tensorboard imports; otherwise
    `available` is False and the reason is kept for the one-line notice the CLI prints."""

    def __init__(self, folder: str):
        self.writer = None
        self.reason = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            self.reason = f"tensorboard is not installed ({err}); logging to {CSV_NAME} only"
            return
        self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))

    @property
    def available(self) -> bool:
        return self.writer is not None

    def log(self, row: Dict[str, float]) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
