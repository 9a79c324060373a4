"""DDP against one process, shared by the CPU (gloo) and GPU tests: two processes each run half of a
batch through a small DIA network wrapped in DistributedDataParallel; their averaged gradients
must equal the gradients of one process over the whole batch."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dia_fused import DIALSTM, DIAStage


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.conv(x)), x


class TinyNet(nn.Module):
    """conv -> a DIA stage of two residual blocks -> pooled linear head."""

    def __init__(self, backend="auto"):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        blocks = [ResidualBlock(8) for _ in range(2)]
        self.stage = DIAStage(blocks, DIALSTM(8, reduction=2, num_cells=2, backend=backend))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def _batch(device):
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(4, 3, 4, 4, generator=gen).to(device),
        torch.randint(0, 5, (4,), generator=gen).to(device),
    )


def _worker(rank, world_size, port, backend, device, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # gloo on CPU tensors, and on CUDA tensors for two processes sharing one GPU (NCCL refuses that)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        model = TinyNet(backend).to(device).eval()  # eval: BatchNorm running stats -> deterministic
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _batch(device)
        shard = slice(rank * 2, rank * 2 + 2)
        nn.functional.cross_entropy(ddp(x[shard]), y[shard]).backward()
        if rank == 0:
            torch.save(
                {k: p.grad.cpu() for k, p in model.named_parameters()},
                os.path.join(result_dir, "grads.pt"),
            )
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    # Exit without running the destructors of the DDP reducer and gloo objects: on this CPU torch
    # they sometimes block the worker's exit forever (seen as a hang after the function returned).
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_ddp_matches_single_process(
    backend: str, device: str, tmp_path, timeout_s: float = 180
) -> None:
    context = mp.spawn(
        _worker, args=(2, _free_port(), backend, device, str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish within {timeout_s} s")
    ddp_grads = torch.load(tmp_path / "grads.pt")
    torch.manual_seed(0)
    model = TinyNet(backend).to(device).eval()
    x, y = _batch(device)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad.cpu(), atol=1e-6, rtol=1e-5, msg=name)
