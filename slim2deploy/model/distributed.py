"""Data parallelism as torchrun describes it (RANK, WORLD_SIZE, LOCAL_RANK): the process group, the
device, and BatchNorm statistics that span every process (gloo on CPU, nccl on GPU), so that N
processes compute what one process computes at the same global batch.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from slim2deploy.base.errors import SlimError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; anything else is one SlimError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SlimError(f"unknown `device` {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SlimError("`device=cuda` was asked for but no CUDA GPU is available; use `device=cpu`")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SlimError(f"`device={name}`: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    """Leave the process group in an order that cannot abort at exit (see the end of ``fit``).

    Every rank waits for the others (rank 0 may still be writing the checkpoint), then the group
    and whatever still refers to it are freed before the interpreter starts tearing down.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics span all processes, for CPU (nn.SyncBatchNorm needs CUDA).

    Sums and sums of squares are all-reduced with autograd support, so gradients flow to every
    rank's inputs as they would through one big batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        totals = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        c = x.shape[1]
        n = totals[-1]
        mean = totals[:c] / n
        var = (totals[c : 2 * c] / n - mean * mean).clamp(min=0)
        assert self.running_mean is not None and self.running_var is not None  # only swapped in when tracked
        assert self.num_batches_tracked is not None
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make BatchNorm statistics global across processes (in place; parameters are kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats:
            m.__class__ = CpuSyncBatchNorm  # same parameters and buffers, global statistics
    return model
