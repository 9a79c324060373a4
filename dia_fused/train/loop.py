"""One training epoch, one evaluation pass, and the step learning-rate schedule.

Loss and accuracy are accumulated on the device and read once per epoch (plus every
`PROGRESS_EVERY` steps for the progress bar), so the loop does not synchronise with the host
after every step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .data import BatchStream

PROGRESS_EVERY = 25


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


def _progress_bar(stream: BatchStream, ctx: distributed.Context, desc: str) -> tqdm:
    """One bar per epoch on the main process (tqdm decides for a non-terminal output)."""
    return tqdm(total=len(stream), desc=desc, disable=None if ctx.is_main else True, leave=False,
                dynamic_ncols=True)


def _add_batch(totals: torch.Tensor, mean_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Adds a batch to totals = [sum of per-sample losses, correct predictions, samples], on the
    device (no host sync per step)."""
    n = targets.shape[0]
    totals[0] += mean_loss.detach().double() * n
    totals[1] += (logits.argmax(dim=1) == targets).sum()
    totals[2] += n


def train_epoch(model: nn.Module, stream: BatchStream, epoch: int, optimizer: torch.optim.Optimizer,
                criterion: nn.Module, ctx: distributed.Context, *,
                amp_dtype: Optional[torch.dtype] = None,
                scaler: Optional[torch.amp.GradScaler] = None, desc: str = "") -> EpochResult:
    """One pass over `stream.epoch(epoch)`; returns the mean loss/accuracy over all processes."""
    model.train()
    device = ctx.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # this process's, see _add_batch
    bar = _progress_bar(stream, ctx, desc)
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
        bar.update(1)
        if not bar.disable and (step + 1) % PROGRESS_EVERY == 0:
            loss_sum, correct, count = totals.tolist()  # host sync, only for the bar
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", top1=f"{100 * correct / count:.2f}")
    _sync(device)
    end = time.perf_counter()
    bar.close()
    result = _result(ctx, totals, end - start)
    if steady_start is not None:  # equal shards: every process ran as many steady images
        result.steady_images, result.steady_seconds = steady_images * ctx.world_size, end - steady_start
    return result


@torch.no_grad()
def evaluate(model: nn.Module, stream: BatchStream, criterion: nn.Module,
             ctx: distributed.Context, *, amp_dtype: Optional[torch.dtype] = None,
             desc: str = "") -> EpochResult:
    """Loss and top-1 accuracy over the (sharded) split, reduced over all processes. `model` must
    be the bare module, not the DDP wrapper (evaluation runs no collective per step)."""
    model.eval()
    device = ctx.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    bar = _progress_bar(stream, ctx, desc)
    _sync(device)
    start = time.perf_counter()
    for inputs, targets in stream.epoch(0):
        if targets.shape[0]:
            with _autocast(device, amp_dtype):
                logits = model(inputs)
            _add_batch(totals, criterion(logits.float(), targets), logits, targets)
        bar.update(1)
    _sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    return _result(ctx, totals, seconds)
