"""Checkpoints: atomic writes, random-number-generator states, loading.

A checkpoint is written after every epoch (`checkpoint.pth.tar`, the official script's name, plus
`model_best.pth.tar` when the test accuracy is the best so far). It holds the official keys
(`epoch`, `state_dict`, `acc`, `best_acc`, `optimizer`) and what an exact resume needs: the seed
(the data stream of epoch e is a function of it), the AMP grad scaler, the model description and
the RNG states of every process (torch CPU and CUDA, numpy, python `random`), which drive dropout,
and the run's arguments (the defaults of a `--resume`). Everything is stored as tensors and plain
Python values, so it loads with `weights_only=True`.

torch.load checks no integrity: a checkpoint also holds a SHA-256 of its tensors (`tensor_sha256`),
which loading verifies (a checkpoint without one, such as an official file, loads unverified).
Files are created with the permissions of the user's umask, like any file a program writes.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from typing import IO, Any, Callable, Dict, Mapping

import numpy as np
import torch

from .errors import TrainError, WriteError

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
FORMAT = "dia_fused.train/1"
CHECKSUM_KEY = "tensor_sha256"


class CheckpointError(TrainError):
    """A checkpoint that cannot be used: unreadable, not a training checkpoint, or corrupted."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the checkpoint's path."""


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def _write_failure(path: str, err: BaseException) -> WriteError:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free on its file system"
    except OSError:
        free = "free space unknown"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return WriteError(f"could not write {path} ({reason}; {free})")


def _atomic_write(path: str, mode: str, write: Callable[[IO], None]) -> None:
    """Writes through `write` to a temporary file in the same folder, fsyncs, then os.replace: a
    reader (or a run killed at any instant) sees the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the os.replace
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        # a full disk shows as torch's "[enforce fail at inline_container.cc] unexpected pos"
        if isinstance(err, (OSError, RuntimeError)):
            raise _write_failure(path, err) from err
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def tensor_checksum(ckpt: Mapping[str, Any]) -> str:
    """SHA-256 of every tensor of a checkpoint (its bytes, dtype, shape and place in the nested
    dicts and lists), the checksum entry itself left out."""
    digest = hashlib.sha256()

    def add(path: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=repr):  # optimizer states have int keys
                if not (path == "" and key == CHECKSUM_KEY):
                    add(f"{path}/{key!r}", value[key])
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                add(f"{path}/{index}", item)

    add("", ckpt)
    return digest.hexdigest()


def with_checksum(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """`ckpt` with its tensors' checksum added."""
    out = {k: v for k, v in ckpt.items() if k != CHECKSUM_KEY}
    out[CHECKSUM_KEY] = tensor_checksum(out)
    return out


def save_epoch(folder: str, state: Mapping[str, Any], is_best: bool) -> None:
    """Writes an epoch's checkpoint (with its checksum), and first its best model when it is the
    best so far: the checkpoint records the new best accuracy only once model_best holds that
    model, so a run killed between the two writes loses nothing (it resumes from the previous
    checkpoint, and the resume keeps the newer best, see runfolder)."""
    state = with_checksum(state)
    if is_best:
        atomic_save(state, os.path.join(folder, BEST_NAME))
    atomic_save(state, os.path.join(folder, CHECKPOINT_NAME))


def atomic_write_text(path: str, text: str) -> None:
    """A small text file, atomically."""
    _atomic_write(path, "w", lambda f: f.write(text))


def rng_state(device: torch.device) -> Dict[str, Any]:
    """The RNG states of this process, as tensors and plain values: CPU, numpy, python, and the
    CUDA generator of `device` when it is a GPU (only that one: touching the others would create
    a context on every GPU from every process)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Loads a checkpoint onto the CPU (`weights_only=True`: no code runs) and verifies its
    tensors against their checksum when it has one."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint: no file at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path!r}: could not load it ({type(err).__name__}: {first})"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint {path!r}: expected a dict with a 'state_dict', got "
            f"{type(ckpt).__name__}"
            + (f" with keys {sorted(ckpt)}" if isinstance(ckpt, dict) else "")
        )
    if CHECKSUM_KEY in ckpt and tensor_checksum(ckpt) != ckpt[CHECKSUM_KEY]:
        raise CheckpointError(
            f"checkpoint {path!r}: its tensors do not match the checksum written with them: the "
            f"file is corrupted; use another checkpoint (model_best.pth.tar, a copy)"
        )
    return ckpt


def model_state_dict(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights, without the `module.` prefix of DataParallel/DDP checkpoints (the
    official script saves a DataParallel model)."""
    state = ckpt["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)
