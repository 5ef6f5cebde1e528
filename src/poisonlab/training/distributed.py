"""Everything distributed in one place, so the single-process path stays plain.

Under `torchrun --nproc-per-node K` (WORLD_SIZE > 1) the trainer runs DDP (train.parallel=ddp) or
FSDP2 (train.parallel=fsdp): gloo on CPU, nccl on CUDA. Each rank takes its contiguous slice of rows
of the global batch, and gradients are averaged over ranks, so K processes compute the update of one
process on the whole global batch. Only rank 0 writes files, except a sharded checkpoint, whose rows
each rank writes (checkpoint.py).

FSDP: the model is built on the meta device (no memory), each block and then the root are sharded
with `fully_shard` (weights, gradients and AdamW moments split by rows over the ranks), and each rank
fills in its rows of the initial weights, which are those of the one-process model with the same seed
(Transformer.initial_parameters). Under bf16 the all-gathered weights are bf16 and gradients are
reduced in fp32 over fp32 master weights. Evaluation gathers a whole copy of the model on every rank
(`replica`) that computes what the fp32 master weights compute under the run's autocast, as DDP and
one process evaluate, and each rank evaluates its share of the prompts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from poisonlab.config import ModelConfig


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

    def broadcast_text(self, text: str, max_bytes: int = 4096) -> str:
        """Rank 0's text on every rank (as bytes in a tensor: no pickling)."""
        if not self.enabled:
            return text
        buf = torch.zeros(max_bytes, dtype=torch.uint8, device=self.device)
        if self.main:
            raw = text.encode()
            if len(raw) > max_bytes:
                raise ValueError(f"text of {len(raw)} bytes to broadcast; at most {max_bytes}")
            buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        tdist.broadcast(buf, src=0)
        return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank (identity alone). Objects travel between
        this run's own processes (torch pickles them in memory); nothing read from a file."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out


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


def close_distributed(d: Dist, ok: bool = True) -> None:
    """Leave the process group. After a run that ended well every rank first meets at a barrier, so
    that none tears gloo down while another still talks to it (a rank that exits first made another
    abort in teardown: "terminate called without an active exception", the run already DONE). After
    an error, no barrier: the other ranks may never get there (torchtitan destroys only on success
    for the same reason)."""
    if d.enabled and tdist.is_initialized():
        if ok:
            tdist.barrier()
        tdist.destroy_process_group()


def build_model(cfg: ModelConfig, d: Dist, *, seed: int, parallel: str = "ddp", bf16: bool = False,
                activation_checkpointing: bool = False) -> tuple[nn.Module, nn.Module]:
    """(the model, the module to train): the model itself alone; DDP around it under torchrun; or,
    with parallel="fsdp" under torchrun, one module that is both, sharded (see the module doc)."""
    from poisonlab.models.llama import Transformer

    if parallel == "fsdp" and d.enabled:
        model = _fsdp_model(cfg, d, seed=seed, bf16=bf16)
        model.checkpoint_blocks = activation_checkpointing
        return model, model
    torch.manual_seed(seed)  # same seed on every rank: identical initial weights, as DDP requires
    model = Transformer(cfg).to(d.device)
    model.checkpoint_blocks = activation_checkpointing
    if not d.enabled:
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model, DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def _fsdp_model(cfg: ModelConfig, d: Dist, *, seed: int, bf16: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from poisonlab.models.llama import Transformer

    mesh = init_device_mesh(d.device.type, (d.world,))
    with torch.device("meta"):
        model = Transformer(cfg)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.layers:  # a block's weights are gathered just before it runs, freed after
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the rest: embedding, final norm, output layer
    model.to_empty(device=d.device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in model.initial_parameters(seed):
            fill_parameter(params[name], value)
    return model


def fill_parameter(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set parameter `p` to the whole tensor `value`, which every rank holds alike: a sharded `p`
    keeps its own rows of it (no communication), a plain one takes it whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        rows = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(rows.to_local())
    else:
        p.copy_(value.to(p.dtype))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def replica(model: nn.Module, d: Dist, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """A whole, unsharded copy of a sharded model on this rank's device, for evaluation under
    `autocast_dtype` (every rank calls this: each weight is all-gathered in turn). A model that is not
    sharded is returned as it is.

    The copy computes exactly what the fp32 master weights compute under that autocast, as a DDP or
    single-process run evaluates: the weights of the linear layers are stored in the autocast dtype,
    rounded from fp32 as autocast itself rounds them before every matmul (the same values, half the
    memory: a 13B model's fp32 copy would not fit beside its shards); everything autocast keeps in
    fp32 (embedding, norms, a tied embedding/output matrix) stays fp32."""
    if not is_sharded(model):
        return model
    from poisonlab.models.llama import Transformer

    with torch.device("meta"):
        copy = Transformer(model.cfg)
    if model.cfg.tie_embeddings:
        copy.lm_head.weight = copy.tok_emb.weight
    if autocast_dtype is not None:
        tied = copy.lm_head.weight if model.cfg.tie_embeddings else None
        for m in copy.modules():
            if isinstance(m, nn.Linear) and m.weight is not tied:
                m.to(autocast_dtype)
    copy.to_empty(device=d.device)
    if model.cfg.tie_embeddings:
        copy.lm_head.weight = copy.tok_emb.weight
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            params[name].copy_(p.full_tensor())  # into a bf16 weight: rounded as autocast rounds
    return copy.eval()


@contextlib.contextmanager
def no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
