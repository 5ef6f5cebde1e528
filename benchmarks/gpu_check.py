"""One script for a CUDA machine: training speed, MFU and memory of the small ladder, and evaluation speed.

Per model size, for a fixed number of steps on synthetic tokens (the speed does not depend on the
data): poisonlab's Transformer, AdamW as the trainer sets it up (fused on CUDA), bf16 autocast;
with and without `torch.compile`. Prints tokens/s, MFU against the device's dense bf16 peak
(`hardware.gpu_peak_flops`, the datasheet table; on CPU the GEMM probe measured in this run), peak
memory (`torch.cuda.max_memory_allocated`) against `poisonlab.study.plan`'s estimate, and generated
tokens/s of batched evaluation (`generation.generate`, KV cache, 64-token prompts + 100 new tokens).
The first line names the machine; the last line is one JSON object.

Several GPUs: after the one-GPU rows the script runs itself under torchrun on every GPU, once with
DDP and once with FSDP2 (the trainer's own `distributed.build_model`), for the largest preset, `--batch`
sequences per GPU; those rows give tokens/s over all GPUs, MFU per GPU and rank 0's peak memory
against the plan's estimate for that layout.

    python benchmarks/gpu_check.py [--presets small-10m,small-25m,small-50m,small-85m] [--steps 30]
        [--batch 16] [--no-compile]          # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --presets tiny-25k --steps 2 --eval-batch 4   # smoke
    torchrun --nproc-per-node 2 benchmarks/gpu_check.py --parallel fsdp --presets tiny-25k --steps 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from poisonlab import hardware
from poisonlab.config import ModelConfig
from poisonlab.evaluation.generation import generate
from poisonlab.models.llama import Transformer, _chunk_rows, flops_per_token, resolve_model_config
from poisonlab.study.plan import training_memory


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def train_speed(cfg: ModelConfig, dev: torch.device, batch: int, steps: int, compile_: bool,
                bf16: bool, parallel: str | None = None) -> dict:
    """Tokens/s of `steps` training steps of `batch` sequences (per rank under torchrun, where
    `parallel` is ddp or fsdp and the figure is over all ranks) and this rank's peak memory."""
    torch.manual_seed(0)
    world = 1
    if parallel:
        from poisonlab.training import distributed

        d = distributed.init_distributed()
        dev, world = d.device, d.world
        model, fwd_model = distributed.build_model(cfg, d, seed=0, parallel=parallel, bf16=bf16)
    else:
        model = fwd_model = Transformer(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=dev.type == "cuda")
    fwd = torch.compile(fwd_model) if compile_ else fwd_model
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g).to(dev) for _ in range(2))

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    if parallel:  # the slowest rank's time is the step's
        t = torch.tensor([dt], device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        dt = float(t)
    return {"tokens_per_s": world * steps * batch * cfg.seq_len / dt, "peak_bytes": peak, "world": world}


def speed_row(preset: str, r: dict, est: float, fpt: float, peak: float | None, bf16: bool,
              **extra) -> dict:
    """One training row: tokens/s, MFU per device (r["world"] devices), peak memory against the plan."""
    mfu = fpt * r["tokens_per_s"] / (peak * r["world"]) if peak else None
    measured = r["peak_bytes"]
    return dict(preset=preset, **extra, dtype="bf16" if bf16 else "fp32",
                tokens_per_s=round(r["tokens_per_s"], 1), mfu=None if mfu is None else round(mfu, 4),
                peak_gib=None if measured is None else round(measured / 2**30, 3),
                plan_gib=round(est / 2**30, 3),
                plan_ratio=None if measured is None else round(est / measured, 3))


def row_line(row: dict, what: str) -> str:
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    mem = (f"peak {row['peak_gib']} GiB, plan {row['plan_gib']} GiB (x{row['plan_ratio']})"
           if row["peak_gib"] is not None else f"plan {row['plan_gib']} GiB")
    return f"{row['preset']:10s} {what} {row['tokens_per_s']:>12,.0f} tok/s  MFU {mfu}  {mem}"


def distributed_main(args: argparse.Namespace) -> None:
    """One row per preset under torchrun (--parallel ddp|fsdp); rank 0 prints it as JSON, last line."""
    from poisonlab.training import distributed

    d = distributed.init_distributed()  # train_speed finds the group joined
    cuda = d.device.type == "cuda"
    peak = hardware.gpu_peak_flops(torch.cuda.get_device_name(d.device), "bf16")[0] if cuda else None
    rows = []
    for preset in args.presets.split(","):
        cfg = resolve_model_config(ModelConfig(preset=preset, vocab_size=args.vocab))
        bf16 = hardware.use_bf16("auto", d.device, cfg.d_model)
        r = train_speed(cfg, d.device, args.batch, args.steps, False, bf16, parallel=args.parallel)
        est = training_memory(cfg, micro_batch=args.batch, world=d.world, strategy=args.parallel,
                              bf16=bf16, fused_adam=cuda,
                              chunk_rows=_chunk_rows(d.device, cfg.vocab_size)).train
        rows.append(speed_row(preset, r, est, flops_per_token(cfg), peak, bf16, parallel=args.parallel,
                              gpus=d.world))
    if d.main:
        print(json.dumps({"rows": rows}))
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
    torch.distributed.destroy_process_group()


def multi_gpu_rows(args: argparse.Namespace) -> list[dict]:
    """This script under torchrun on every GPU, DDP then FSDP, for the largest preset."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    rows = []
    for parallel in ("ddp", "fsdp"):
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(torch.cuda.device_count()), __file__,
               "--parallel", parallel, "--presets", args.presets.split(",")[-1], "--steps", str(args.steps),
               "--batch", str(args.batch), "--vocab", str(args.vocab)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{parallel}: failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
            rows.append(dict(parallel=parallel, failed=True))
            continue
        for row in json.loads(r.stdout.strip().splitlines()[-1])["rows"]:
            rows.append(row)
            print(row_line(row, f"{parallel} x{row['gpus']}"))
    return rows


def eval_speed(cfg: ModelConfig, dev: torch.device, batch: int, bf16: bool) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev).eval()
    prompt = torch.randint(0, cfg.vocab_size, (batch, 64))
    noise = torch.rand(batch, 100)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        generate(model, prompt[:, :8], 4, noise[:, :4])  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        generate(model, prompt, 100, noise)
        sync(dev)
    return batch * 100 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="small-10m,small-25m,small-50m,small-85m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary (the gpu-small preset's)")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], help="(under torchrun) one distributed row")
    args = ap.parse_args()
    if args.parallel:
        distributed_main(args)
        return
    dev = torch.device(args.device)
    info = hardware.describe_machine()
    print(hardware.machine_line(info))
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak, row = hardware.gpu_peak_flops(name, "bf16")
        print(f"device: {name}, {torch.cuda.device_count()} GPU(s); bf16 dense peak "
              f"{(peak or 0) / 1e12:.0f} TFLOP/s ({row})")
    else:
        probe = "bf16" if hardware.cpu_has_amx() else "fp32"
        peak = hardware.measure_gemm_flops(probe, 256)
        print(f"device: CPU; reference: the GEMM probe, {peak / 1e9:.1f} GFLOP/s ({probe}, width 256, "
              "measured now)")
    variants = [False] if args.no_compile or dev.type != "cuda" else [False, True]
    rows = []
    for preset in args.presets.split(","):
        cfg = resolve_model_config(ModelConfig(preset=preset, vocab_size=args.vocab))
        bf16 = hardware.use_bf16("auto", dev, cfg.d_model)  # the trainer's own choice
        fpt = flops_per_token(cfg)
        est = training_memory(cfg, micro_batch=args.batch, bf16=bf16, fused_adam=dev.type == "cuda",
                              chunk_rows=_chunk_rows(dev, cfg.vocab_size)).train
        for comp in variants:
            r = train_speed(cfg, dev, args.batch, args.steps, comp, bf16)
            rows.append(speed_row(preset, r, est, fpt, peak, bf16, compile=comp))
            print(row_line(rows[-1], f"compile={comp!s:5s}"))
        ev = eval_speed(cfg, dev, args.eval_batch, bf16)
        rows.append(dict(preset=preset, eval_tokens_per_s=round(ev, 1), eval_batch=args.eval_batch))
        print(f"{preset:10s} evaluation {ev:>12,.0f} generated tok/s (batch {args.eval_batch})")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cuda" and torch.cuda.device_count() > 1:
        rows += multi_gpu_rows(args)
    print(json.dumps({"machine": info, "device": str(dev), "peak_flops": peak, "rows": rows}))


if __name__ == "__main__":
    main()
