"""Checkpoints: atomic writes, random-number-generator states, loading.

A checkpoint is written after every epoch (`checkpoint.pth.tar`, the official script's name, plus
`model_best.pth.tar` when the test accuracy is the best so far). It holds the official keys
(`epoch`, `state_dict`, `acc`, `best_acc`, `optimizer`) and what an exact resume needs: the seed
(the data stream of epoch e is a function of it), the AMP grad scaler, the model description and
the RNG states of every process (torch CPU and CUDA, numpy, python `random`), which drive dropout.
Everything is stored as tensors and plain Python values, so it loads with `weights_only=True`.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import IO, Any, Callable, Dict, Mapping

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
FORMAT = "dia_fused.train/1"


def _atomic_write(path: str, mode: str, write: Callable[[IO], None]) -> None:
    """Writes through `write` to a temporary file in the same folder, fsyncs, then os.replace: a
    reader (or a run killed at any instant) sees the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def save_epoch(folder: str, state: Mapping[str, Any], is_best: bool) -> None:
    """Writes an epoch's checkpoint, and first its best model when it is the best so far: the
    checkpoint records the new best accuracy only once model_best holds that model, so a run
    killed between the two writes loses nothing (it resumes from the previous checkpoint, and
    the resume keeps the newer best, see runfolder)."""
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
    """Loads a checkpoint onto the CPU (`weights_only=True`: no code runs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint {path!r}: could not load it ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"checkpoint {path!r}: expected a dict with a 'state_dict', got "
            f"{type(ckpt).__name__}"
            + (f" with keys {sorted(ckpt)}" if isinstance(ckpt, dict) else "")
        )
    return ckpt


def model_state_dict(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights, without the `module.` prefix of DataParallel/DDP checkpoints (the
    official script saves a DataParallel model)."""
    state = ckpt["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)
