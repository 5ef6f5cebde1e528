"""What a run needs before it is launched: memory per GPU, a layout that fits, tokens and GPU-hours.

`plan_run(cfg, gpu, gpus_per_node, nodes)` answers, for one resolved run config:

- memory per GPU, part by part: fp32 master weights, fp32 gradients, AdamW's two fp32 moments, the
  buffers of the layout (DDP's gradient buckets and autocast's bf16 copy of the weights; FSDP's
  unsharded blocks in flight), the activations autograd keeps for one micro-batch, the fused loss's
  buffers, and the evaluation's weights + KV cache + logits;
- the layout: DDP when the whole state fits on each GPU, else FSDP (states sharded over every GPU of
  the run), else how many nodes FSDP needs; the largest micro-batch that fits and the gradient
  accumulation that makes the global batch from it;
- tokens, training FLOPs (model.flops_per_token) and GPU-hours at a stated MFU, and the evaluation's
  generated tokens at a stated (lower: decoding is memory-bound) utilisation.

The activation figures are bytes per token per layer of *this* model (poisonlab.models.llama): fp32
38 d + 17 d_ff, bf16 autocast 26 d + 12 d_ff, plus 12 d (fp32) / 10 d (bf16) per token outside the
layers. They were counted with autograd's saved-tensor hooks over d_model 64-256 (within 5%), and
tests/test_plan.py checks the whole training-step estimate against the peak of the CPU allocator's
own events (torch.profiler) on tiny models, within 20%. Attention is counted as a fused kernel
(SDPA: no T x T scores kept), which is what the trainer uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from poisonlab.config import ModelConfig, RunConfig
from poisonlab.errors import UserError
from poisonlab.models.llama import _shape, count_params, flops_per_token, resolve_model_config

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str  # as torch.cuda.get_device_name reports it, so the peak comes from hardware.GPU_PEAKS
    memory_gib: float  # what the device reports as total memory

    @property
    def bf16_flops(self) -> float:
        """Dense bf16 peak, FLOP/s: the datasheet row poisonlab.hardware matches this name to."""
        from poisonlab.hardware import gpu_peak_flops

        peak, _ = gpu_peak_flops(self.name, "bf16")
        assert peak is not None, self.name  # every GPUS entry has a row (tests/test_plan.py)
        return peak


# Memory as torch.cuda.get_device_properties reports it (80 GB of HBM is 79.6 GiB).
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("NVIDIA H100 80GB HBM3", 79.6),
    "h100-pcie": GPU("NVIDIA H100 PCIe", 79.6),
    "h200": GPU("NVIDIA H200", 139.8),
    "a100-80gb": GPU("NVIDIA A100-SXM4-80GB", 79.2),
    "a100-40gb": GPU("NVIDIA A100-SXM4-40GB", 39.4),
    "l40s": GPU("NVIDIA L40S", 44.4),
    "rtx-4090": GPU("NVIDIA GeForce RTX 4090", 23.6),
}
# kept free on every GPU: the CUDA context, NCCL buffers and the caching allocator's fragmentation
RESERVE_GIB = 2.0
RESERVE_FRAC = 0.05


def usable_bytes(gpu: GPU) -> float:
    return gpu.memory_gib * GIB * (1 - RESERVE_FRAC) - RESERVE_GIB * GIB


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise UserError(f"--gpu {name!r}: unknown; known: {', '.join(GPUS)}")
    return GPUS[name]


# --- the memory model ----------------------------------------------------------------------------------

def activation_bytes_per_token(cfg: ModelConfig, bf16: bool, checkpointed: bool = False) -> float:
    """Bytes autograd keeps per token of a micro-batch (every layer + embedding, final norm, loss).
    With activation checkpointing each block keeps only its fp32 input (4 d) until the backward pass
    recomputes it (recompute_bytes_per_token)."""
    d, L = cfg.d_model, cfg.n_layers
    _, _, d_ff, _ = _shape(cfg)
    per_layer = 4 * d if checkpointed else 26 * d + 12 * d_ff if bf16 else 38 * d + 17 * d_ff
    return L * per_layer + (10 if bf16 else 12) * d


def recompute_bytes_per_token(cfg: ModelConfig, bf16: bool) -> float:
    """Bytes per token of one checkpointed block in the backward pass: its recomputed activations and
    the gradients flowing through it. Measured as the profiler's autograd-detail bytes at the step's
    peak over d_model 64-256 (fp32 38 d + 25 d_ff within 0.1%; bf16 ~0.66 of that, within 5%; d_ff
    is ~8/3 d in every shape measured, so only the sum is identified, not the split)."""
    d = cfg.d_model
    _, _, d_ff, _ = _shape(cfg)
    return 25 * d + 16 * d_ff if bf16 else 38 * d + 25 * d_ff


@dataclass
class Memory:
    """Bytes per GPU at the peak of a training step, by part, and at an evaluation."""

    weights: float
    grads: float
    optimizer: float
    step_temp: float  # foreach AdamW's parameter-sized temporary (CPU), alive only in the step
    buffers: float  # layout buffers: DDP buckets + autocast weight copies, or FSDP's unsharded blocks
    activations: float
    loss: float  # the fused loss: its fp32 output-layer gradient and one chunk of logits
    eval: float  # bf16/fp32 weights, the KV cache and last-position logits of one evaluation batch
    recompute: float = 0.0  # activation checkpointing: one block recomputed in the backward pass

    @property
    def train(self) -> float:
        # the backward pass (activations alive, gradients filling up: counted whole; with
        # checkpointing, a recomputed block on top of the block inputs) or the optimizer step
        # (activations freed, its temporary alive), whichever is higher
        state = self.weights + self.grads + self.optimizer + self.buffers
        return state + max(self.activations + max(self.loss, self.recompute), self.step_temp)

    @property
    def peak(self) -> float:
        # evaluation happens between steps: activations and the loss's buffers are gone by then
        return max(self.train, self.weights + self.grads + self.optimizer + self.eval)


def training_memory(cfg: ModelConfig, *, micro_batch: int, world: int = 1, strategy: str = "single",
                    bf16: bool = True, fused_adam: bool = True, eval_batch: int = 0,
                    eval_len: int = 0, chunk_rows: int = 4096, checkpointed: bool = False) -> Memory:
    """Per-GPU bytes of one training step (and of an evaluation batch) under a layout:
    single (one process), ddp (every rank holds everything) or fsdp (states sharded over `world`);
    `checkpointed`: train.activation_checkpointing."""
    cfg = resolve_model_config(cfg)
    total, _ = count_params(cfg)
    hd, kv, d_ff, _ = _shape(cfg)
    d, V = cfg.d_model, cfg.vocab_size
    shard = world if strategy == "fsdp" else 1
    weights, grads, adam = 4 * total / shard, 4 * total / shard, 8 * total / shard
    step_temp = 0.0 if fused_adam else 4 * total / shard  # foreach AdamW's denominators
    block = 4 * d * d + 2 * d * (kv * hd) - 2 * d * d + 3 * d * d_ff  # wq wo + wk wv + SwiGLU (GQA-aware)
    buffers = 0.0
    if strategy == "ddp":
        buffers += 4 * total  # gradient buckets (a second copy of the gradients)
    if strategy == "fsdp":
        # two blocks unsharded at once (the current one and the prefetched next), in the compute dtype,
        # and the fp32 gradients of one block before their reduce-scatter; embedding/output alike
        buffers += (2 if bf16 else 4) * 2 * max(block, V * d) + 4 * max(block, V * d)
    elif bf16 and not checkpointed:
        # autocast's bf16 copies of the weights, kept for the backward (checkpointed: recast per
        # block in the recompute, which recompute_bytes_per_token counts)
        buffers += 2 * total
    tokens = micro_batch * cfg.seq_len
    activations = tokens * activation_bytes_per_token(cfg, bf16, checkpointed)
    recompute = tokens * recompute_bytes_per_token(cfg, bf16) if checkpointed else 0.0
    loss = 4 * V * d + 2 * 4 * min(chunk_rows, tokens) * V  # grad of the output layer; logits + softmax
    eval_mem = eval_memory(cfg, eval_batch, eval_len, bf16) if eval_batch else 0.0
    return Memory(weights, grads, adam, step_temp, buffers, activations, loss, eval_mem, recompute)


def eval_memory(cfg: ModelConfig, batch: int, length: int, bf16: bool) -> float:
    """Bytes of an evaluation batch: the weights as evaluated (under bf16 autocast the matmul weights
    in bf16, the embedding in fp32: autocast's copies, or FSDP's evaluation replica), the model's KV
    cache for `length` positions, and the last position's logits and sampling buffer."""
    cfg = resolve_model_config(cfg)
    total, _ = count_params(cfg)
    hd, kv, _, _ = _shape(cfg)
    wbytes = 2 if bf16 else 4
    weights = wbytes * total + (4 - wbytes) * cfg.vocab_size * cfg.d_model
    cache = 2 * cfg.n_layers * batch * kv * length * hd * wbytes
    return weights + cache + 2 * 4 * batch * cfg.vocab_size


# --- a layout that fits -------------------------------------------------------------------------------

@dataclass
class RunPlan:
    name: str
    model: str
    vocab_size: int
    params: int
    tokens: int
    steps: int
    batch_size: int
    strategy: str  # single (one GPU) | ddp | fsdp | none (does not fit on any number of nodes tried)
    nodes: int
    gpus: int
    micro_batch: int
    grad_accum: int
    eval_batch: int
    activation_checkpointing: bool = False
    memory: dict[str, float] = field(default_factory=dict)  # GiB per GPU by part, and peak
    usable_gib: float = 0.0
    train_flops: float = 0.0
    eval_tokens: int = 0
    gpu_hours: float = 0.0
    hours: float = 0.0  # wall clock on `gpus` GPUs
    fits: bool = True
    note: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _divisors_desc(n: int) -> list[int]:
    return sorted((k for k in range(1, n + 1) if n % k == 0), reverse=True)


def eval_conditions(cfg: RunConfig) -> int:
    """Conditions each prompt is generated in: clean, the trigger and every control of the panel."""
    from poisonlab.evaluation.panel import resolve_panel

    return 2 + len(resolve_panel(cfg.eval.trigger or cfg.attack.trigger, cfg.eval.lookalikes))


def _eval_sizes(cfg: RunConfig, n_conditions: int, steps: int) -> tuple[int, int]:
    """(sequence length of an evaluation batch, tokens through a forward pass of this model's size
    over the whole run): every generated sequence once (prompt and new tokens; the model scores its
    own generations from their logits, no second pass), and once more for a reference scorer
    (`eval.scorer`: counted at this model's size, as the clean run of the same size is)."""
    e = cfg.eval
    length = e.prompt_tokens + 8 + e.new_tokens  # + the trigger or a control (a few tokens)
    n_points = steps // e.every_steps + 1 if e.every_steps else e.n_evals + 1
    passes = 1 if e.scorer == "self" else 2
    return length, passes * n_points * e.n_prompts * n_conditions * length


def plan_run(cfg: RunConfig, gpu: GPU, *, gpus_per_node: int = 8, nodes: int | None = None,
             mfu: float = 0.4, eval_mfu: float = 0.05, max_nodes: int = 64,
             n_conditions: int | None = None) -> RunPlan:
    """The cheapest layout of one run on `gpu`s: DDP on the fewest nodes that hold it, else FSDP (only
    FSDP for a run set to train.parallel=fsdp); `nodes` fixes the node count. The micro-batch is the
    largest divisor of the per-rank batch that fits and is no larger than the configured one
    (train.grad_accum); a different accumulation is a note. Activation checkpointing as configured;
    when it is off and not even one sequence per GPU fits, the plan turns it on (a note) before it
    moves to more GPUs, since recomputing the blocks' forward (+1/3 of their FLOPs, counted in the
    GPU-hours) is cheaper than sharding over nodes."""
    from poisonlab.training.resolve import resolve_run

    run = resolve_run(cfg)
    cfg, m, t = run.cfg, run.cfg.model, run.cfg.train
    bf16 = t.dtype != "fp32"
    total, steps = run.params_total, run.n_steps
    tokens = steps * run.tokens_per_step
    eval_len, eval_tokens = _eval_sizes(cfg, n_conditions or eval_conditions(cfg), steps)
    usable = usable_bytes(gpu)
    train_flops = flops_per_token(m) * tokens
    base = dict(name=cfg.name, model=m.preset or f"d{m.d_model}-l{m.n_layers}", vocab_size=m.vocab_size,
                params=total, tokens=tokens,
                steps=steps, batch_size=t.batch_size, usable_gib=usable / GIB, train_flops=train_flops,
                eval_tokens=eval_tokens)
    # the blocks' forward again in the backward pass, when checkpointed: the body's third of the FLOPs
    recompute = (flops_per_token(m) - 6 * m.d_model * m.vocab_size) / 3 * tokens
    tries = [nodes] if nodes else range(1, max_nodes + 1)
    for strategy in ("fsdp",) if t.parallel == "fsdp" else ("ddp", "fsdp"):
        for k in tries:
            world = k * gpus_per_node
            if t.batch_size % world or (strategy == "fsdp" and world == 1):
                continue
            layout = "single" if world == 1 else strategy  # one GPU: no DDP buckets, nothing to shard
            per_rank = t.batch_size // world
            for ckpt in (True,) if t.activation_checkpointing else (False, True):
                # no larger micro-batch than the config asks for (batch / world / grad_accum): a plan
                # for the run as configured, or the accumulation that makes it fit
                for micro in (k for k in _divisors_desc(per_rank) if k <= max(1, per_rank // t.grad_accum)):
                    mem = training_memory(m, micro_batch=micro, world=world, strategy=layout, bf16=bf16,
                                          checkpointed=ckpt)
                    if mem.train > usable:
                        continue
                    eb = _eval_batch(m, cfg, mem, usable, eval_len, bf16)
                    if eb == 0:
                        continue
                    mem = training_memory(m, micro_batch=micro, world=world, strategy=layout, bf16=bf16,
                                          eval_batch=eb, eval_len=eval_len, checkpointed=ckpt)
                    gpu_s = ((train_flops + ckpt * recompute) / (gpu.bf16_flops * mfu)
                             + 2 * total * eval_tokens / (gpu.bf16_flops * eval_mfu))  # forward only
                    accum = t.batch_size // world // micro
                    return RunPlan(**base, strategy=layout, nodes=k, gpus=world, micro_batch=micro,
                                   grad_accum=accum, eval_batch=eb, activation_checkpointing=ckpt,
                                   memory=_gib(mem), gpu_hours=gpu_s / 3600, hours=gpu_s / 3600 / world,
                                   note=_note(layout, t.parallel, accum, t.grad_accum,
                                              ckpt and not t.activation_checkpointing))
            if strategy == "ddp" and not nodes:
                break  # DDP replicates: more nodes never make a DDP run fit, only FSDP shards
    mem = training_memory(m, micro_batch=1, world=(nodes or max_nodes) * gpus_per_node, strategy="fsdp",
                          bf16=bf16, checkpointed=True)
    why = (f"batch_size {t.batch_size} leaves no whole sequence per GPU" if t.batch_size < gpus_per_node
           else f"micro-batch 1 needs {mem.train / GIB:.1f} GiB per GPU under FSDP with activation "
                f"checkpointing on "
                f"{nodes or max_nodes} node(s); {usable / GIB:.1f} GiB usable")
    return RunPlan(**base, strategy="none", nodes=nodes or 0, gpus=0, micro_batch=0, grad_accum=0,
                   eval_batch=0, memory=_gib(mem), fits=False, note=why)


def _eval_batch(m: ModelConfig, cfg: RunConfig, mem: Memory, usable: float, eval_len: int,
                bf16: bool) -> int:
    """The largest evaluation batch (up to eval.batch_size) whose cache fits beside the training state."""
    room = usable - (mem.weights + mem.grads + mem.optimizer)
    lo, hi = 0, min(cfg.eval.batch_size, cfg.eval.n_prompts)
    while lo < hi:  # the evaluation's memory grows with its batch: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if eval_memory(m, mid, eval_len, bf16) <= room else (lo, mid - 1)
    return lo


def _gib(mem: Memory) -> dict[str, float]:
    parts = {k: v / GIB for k, v in asdict(mem).items()}
    return parts | {"train": mem.train / GIB, "peak": mem.peak / GIB}


def _note(layout: str, parallel: str, accum: int, configured: int, needs_ckpt: bool = False) -> str:
    notes = []
    if layout == "fsdp" and parallel != "fsdp":
        notes.append("needs FSDP: set train.parallel=fsdp")
    if needs_ckpt:
        notes.append("needs activation checkpointing: set train.activation_checkpointing=true")
    if accum != configured:
        notes.append(f"set train.grad_accum={accum}")
    return "; ".join(notes)


def plan_runs(cfgs: list[RunConfig], gpu: GPU, **kw: Any) -> tuple[list[RunPlan], dict[str, Any]]:
    """Plans of many runs and their totals."""
    plans = [plan_run(c, gpu, **kw) for c in cfgs]
    totals = dict(runs=len(plans), fit=sum(p.fits for p in plans),
                  need_fsdp=sum(p.strategy == "fsdp" for p in plans),
                  gpu_hours=sum(p.gpu_hours for p in plans), tokens=sum(p.tokens for p in plans),
                  max_nodes=max((p.nodes for p in plans), default=0), gpu=gpu.name,
                  mfu=kw.get("mfu", 0.4), eval_mfu=kw.get("eval_mfu", 0.05))
    return plans, totals


def fmt_count(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


# --- measuring the real thing --------------------------------------------------------------------------

def measured_peak(cfg: ModelConfig, *, micro_batch: int, bf16: bool, device: str = "cpu",
                  seed: int = 0, checkpointed: bool = False) -> float:
    """Peak bytes allocated during one steady-state training step of poisonlab's model (AdamW as the
    trainer sets it up, after one warm-up step so its moments exist), measured by the allocator:
    torch.cuda.max_memory_allocated on CUDA; on CPU the allocation events torch.profiler records
    (profile_memory), summed into a timeline whose maximum is the peak."""
    import json
    import tempfile
    import warnings
    from pathlib import Path

    import torch

    from poisonlab.models.llama import Transformer

    torch.manual_seed(seed)
    cfg = resolve_model_config(cfg)
    model = Transformer(cfg).to(device)
    model.checkpoint_blocks = checkpointed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.startswith("cuda"))
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len), generator=g).to(device)
            for _ in range(2))
    dev = torch.device(device).type

    def step() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the CPU timeline has no successor API yet
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # per event: bytes alive by category
    return float(max(sum(row) for row in sizes))
