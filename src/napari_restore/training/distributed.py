"""Multi-process training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N -m napari_restore.training ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous variables; :func:`setup` then starts the process group (NCCL on
CUDA, gloo on CPU). Logging and saving happen on rank 0 only (:attr:`DistInfo.is_main`).

Batch norm: on CUDA the network's batch norms become :class:`torch.nn.SyncBatchNorm`; on CPU
(gloo, where SyncBatchNorm is not available) DDP broadcasts rank 0's buffers before every forward
pass and :func:`sync_buffers` broadcasts them once more after the last step, so every rank ends
with identical parameters AND buffers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Rank, world size and compute device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); pick the device."""
    from ..inference import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        here = True
    return DistInfo(rank, world, local, dev, here)


def wrap(net: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP-wrap ``net`` (already on ``info.device``) when distributed; SyncBatchNorm on CUDA."""
    if not info.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    if info.device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return DDP(net, device_ids=[info.device.index])  # buffers are broadcast from rank 0 (default)
    return DDP(net)  # default: rank 0 buffers are broadcast before every forward


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or ``net`` itself)."""
    return net.module if hasattr(net, "module") else net


def sync_buffers(net: torch.nn.Module, info: DistInfo) -> None:
    """Broadcast rank 0's buffers (batch-norm running statistics) to every rank."""
    if info.distributed:
        for b in unwrap(net).buffers():
            dist.broadcast(b.data, 0)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_flag(value: bool, info: DistInfo) -> bool:
    """Rank 0's boolean, on every rank."""
    if not info.distributed:
        return value
    t = torch.tensor([1 if value else 0], dtype=torch.int32)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.broadcast(t, 0)
    return bool(t.item())


def all_mean(value: float, info: DistInfo) -> float:
    """The mean of ``value`` over all ranks."""
    if not info.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def teardown(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistInfo", "setup", "wrap", "unwrap", "sync_buffers", "barrier", "broadcast_flag", "all_mean", "teardown"]
