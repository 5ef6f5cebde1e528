"""Everything distributed in one place, so the single-process path stays plain.

Under `torchrun --nproc-per-node K` (WORLD_SIZE > 1) the trainer runs DDP: gloo on CPU, nccl on CUDA.
Each rank takes its contiguous slice of rows of the global batch, and DDP averages gradients, so K
processes compute the same update as one process on the whole global batch. Only rank 0 writes files.
A sharded wrapper (FSDP) would replace `wrap` and the state-dict helpers in checkpoint.py; the
trainer only talks to `Dist`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the global batch size must divide by world)."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (identity when alone)."""
        if self.enabled:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t /= self.world
        return t

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun; otherwise a one-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def close_distributed(d: Dist) -> None:
    if d.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """The module to train: DDP under torchrun, the model itself otherwise."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


@contextlib.contextmanager
def no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
