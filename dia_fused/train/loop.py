"""One training epoch, one evaluation pass, and the step learning-rate schedule.

Loss and accuracy are accumulated on the device and read once per epoch (plus every
`print_freq` steps for the progress report), so the loop does not synchronise with the host
after every step. The report is tqdm's bar on a terminal; otherwise (a log file, a scheduler's
job, nohup) a line every `print_freq` steps with images/s, loss, accuracy and ETA.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .data import BatchStream

PROGRESS_EVERY = 25  # default print_freq


def learning_rate(epoch: int, base_lr: float, schedule: Sequence[int], gamma: float) -> float:
    """LR of epoch `epoch` (0-based): base_lr * gamma ** (milestones <= epoch). The official script
    multiplies by gamma at the start of every epoch listed in --schedule; this is the same value,
    computed from the epoch alone so that a resumed run needs no schedule state."""
    return base_lr * gamma ** sum(1 for m in schedule if m <= epoch)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# the first steps of a run compile kernels (Triton, the CUDA extension's lazy loading) and warm the
# allocator: throughput is measured after them when the epoch is long enough
THROUGHPUT_WARMUP_STEPS = 3


@dataclass
class EpochResult:
    loss: float
    acc: float  # top-1, percent
    images: int  # over all processes
    seconds: float
    steady_images: int = 0  # over all processes, after the warm-up steps (0: epoch too short)
    steady_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Throughput after the warm-up steps, or over the whole epoch when it is too short."""
        if self.steady_images and self.steady_seconds > 0:
            return self.steady_images / self.steady_seconds
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(ctx: distributed.Context, totals: torch.Tensor, seconds: float) -> EpochResult:
    loss_sum, correct, count = distributed.all_reduce_sum(ctx, totals).tolist()
    count = max(count, 1.0)
    return EpochResult(loss_sum / count, 100.0 * correct / count, int(count), seconds)


class _Progress:
    """The progress report of one pass on the main process: tqdm's bar on a terminal (tqdm decides),
    else a printed line every `print_freq` steps. `totals` is this process's [loss sum, correct,
    samples] (see _add_batch); images/s counts all processes."""

    def __init__(self, stream: BatchStream, ctx: distributed.Context, desc: str, print_freq: int):
        self.total, self.desc, self.print_freq = len(stream), desc, print_freq
        self.world_size = ctx.world_size
        self.bar = tqdm(
            total=self.total,
            desc=desc,
            disable=None if ctx.is_main else True,
            leave=False,
            dynamic_ncols=True,
        )
        self.lines = ctx.is_main and self.bar.disable
        self.reporting = self.lines or not self.bar.disable
        self.last_time = time.perf_counter()
        self.last_step = 0

    def update(self, step: int, totals: torch.Tensor) -> None:
        """After step `step` (1-based) of the pass."""
        self.bar.update(1)
        if not self.reporting or step % self.print_freq:
            return
        loss_sum, correct, count = totals.tolist()  # waits for the device: every print_freq steps
        count = max(count, 1.0)
        loss, top1 = loss_sum / count, 100 * correct / count
        if not self.lines:
            self.bar.set_postfix(loss=f"{loss:.4f}", top1=f"{top1:.2f}")
            return
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)  # steps/s since last line
        images_per_s = rate * count / step * self.world_size
        eta = datetime.timedelta(seconds=round((self.total - step) / rate))
        print(
            f"{self.desc}: [{step}/{self.total}] {images_per_s:.1f} images/s | "
            f"loss {loss:.4f} top1 {top1:.2f} | ETA {eta}",
            flush=True,
        )
        self.last_step, self.last_time = step, now

    def close(self) -> None:
        self.bar.close()


def _add_batch(
    totals: torch.Tensor, mean_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> None:
    """Adds a batch to totals = [sum of per-sample losses, correct predictions, samples], on the
    device (no host sync per step)."""
    n = targets.shape[0]
    totals[0] += mean_loss.detach().double() * n
    totals[1] += (logits.argmax(dim=1) == targets).sum()
    totals[2] += n


def train_epoch(
    model: nn.Module,
    stream: BatchStream,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    ctx: distributed.Context,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    desc: str = "",
    print_freq: int = PROGRESS_EVERY,
) -> EpochResult:
    """One pass over `stream.epoch(epoch)`; returns the mean loss/accuracy over all processes."""
    model.train()
    device = ctx.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # this process's, see _add_batch
    progress = _Progress(stream, ctx, desc, print_freq)
    _sync(device)
    start = time.perf_counter()
    steady_start, steady_images = None, 0
    measure_steady = len(stream) >= 2 * THROUGHPUT_WARMUP_STEPS
    for step, (inputs, targets) in enumerate(stream.epoch(epoch)):
        if measure_steady and step == THROUGHPUT_WARMUP_STEPS:
            _sync(device)
            steady_start = time.perf_counter()
        if steady_start is not None:
            steady_images += targets.shape[0]
        with _autocast(device, amp_dtype):
            logits = model(inputs)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            _add_batch(totals, loss, logits, targets)
        progress.update(step + 1, totals)
    _sync(device)
    end = time.perf_counter()
    progress.close()
    result = _result(ctx, totals, end - start)
    if steady_start is not None:  # equal shards: every process ran as many steady images
        result.steady_images, result.steady_seconds = (
            steady_images * ctx.world_size,
            end - steady_start,
        )
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: BatchStream,
    criterion: nn.Module,
    ctx: distributed.Context,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    desc: str = "",
    print_freq: int = PROGRESS_EVERY,
) -> EpochResult:
    """Loss and top-1 accuracy over the (sharded) split, reduced over all processes. `model` must
    be the bare module, not the DDP wrapper (evaluation runs no collective per step)."""
    model.eval()
    device = ctx.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    progress = _Progress(stream, ctx, desc, print_freq)
    _sync(device)
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(stream.epoch(0)):
        if targets.shape[0]:
            with _autocast(device, amp_dtype):
                logits = model(inputs)
            _add_batch(totals, criterion(logits.float(), targets), logits, targets)
        progress.update(step + 1, totals)
    _sync(device)
    seconds = time.perf_counter() - start
    progress.close()
    return _result(ctx, totals, seconds)
