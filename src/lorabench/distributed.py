"""The process group a torchrun job trains in: joining it, the rank and world size, barriers, gradient averaging.

Outside torchrun (WORLD_SIZE unset or 1) every helper is a no-op on one process: rank 0 of 1.
"""
from __future__ import annotations

import contextlib
import os

import torch


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU. Returns whether
    it did; each rank then uses cuda:LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


@contextlib.contextmanager
def process_group():
    """Inside: this process in torchrun's process group (joined here, if it is not yet), every rank past its last
    collective on a normal exit before the group that was joined here is torn down."""
    joined = init_distributed()
    try:
        yield
        if joined:
            torch.distributed.barrier()
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def barrier():
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_mean(tensors: list[torch.Tensor], world: int):
    """Average tensors across ranks with one collective on a flat buffer."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))
