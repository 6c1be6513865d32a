"""Distributed training through torchrun: process-group setup, rank helpers, a CPU-capable
synchronised BatchNorm. No home-made launcher: `torchrun --nproc-per-node N -m training.cli ...`
(multi-node through torchrun's rendezvous: `--nnodes`, `--rdzv-endpoint`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); join the process group with NCCL
    on GPUs and gloo on CPUs. Without torchrun: one process, no process group."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_objects(obj) -> list:
    if is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of every process, on any device
    (torch's SyncBatchNorm runs only on GPUs). Sums and squared sums are all-reduced with a
    differentiable all_reduce, so gradients match one process holding the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as diff_all_reduce

        xf = x.float()
        c = xf.shape[1]
        count = torch.full((1,), float(xf.shape[0]), device=x.device)
        stats = diff_all_reduce(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))  # (2C+1,)
        n = stats[-1].detach()
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=m)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise BatchNorm across processes: torch's SyncBatchNorm on GPUs, AllReduceBatchNorm1d
    on CPUs (same state-dict keys, so checkpoints do not change)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm1d:
            new = AllReduceBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device if child.affine else device)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model
