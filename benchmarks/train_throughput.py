"""Training throughput of the tiny ladder: our Transformer against HF LlamaForCausalLM, same shape.

Same batch, same thread count, same optimizer (AdamW) and steps, in one process, alternating the two
models per size so that machine load hits both alike. The reference for MFU is measured in the same
run: torch.matmul on a 2048 x w @ w x w GEMM at the run's dtype and threads (w = the model's width in
[256, 1024], `poisonlab.hardware.measure_gemm_flops`, the probe the trainer's MFU uses), taken before
and after each size's steps, the better of the two. Prints tokens/s, the ratio ours/HF, GFLOP/s and
both sides as a share of that GEMM; the first line and the last (one JSON object) say what it ran on.

    .venv/bin/python benchmarks/train_throughput.py [--steps 15] [--threads 2] [--batch 16] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from poisonlab import hardware
from poisonlab.config import ModelConfig
from poisonlab.models.export import hf_config
from poisonlab.models.llama import LADDERS, Transformer, flops_per_token, resolve_model_config


def hf_model(ours: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = hf_config(ours)
    conf.pop("architectures")
    conf.pop("model_type")
    return LlamaForCausalLM(LlamaConfig(**conf, attn_implementation="sdpa"))


def make_step(loss_fn, params):
    """One training step (forward, backward, AdamW) as a function."""
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict, n: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per step of each function, run in turn (A B A B ...) so that the load of a
    shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + n):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _autocast(dtype: str, model, x, y, hf: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        return model(input_ids=x, labels=y).loss if hf else model(x, y)


def gemm_peak(dtype: str, d_model: int) -> tuple[float, int]:
    """(FLOP/s, width) of the GEMM probe for this width, measured afresh (1 s budget, not the cache)."""
    w = hardware.probe_width(d_model)
    return hardware.measure_gemm_flops(dtype, w, budget_s=1.0, cached=False), w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--sizes", default=",".join(LADDERS["tiny"]))
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = hardware.describe_machine()
    print(hardware.machine_line(machine))
    print(f"batch {args.batch} x {args.seq}, vocab {args.vocab}, {args.dtype}, {args.steps} steps per side")
    results = []
    for name in args.sizes.split(","):
        cfg = resolve_model_config(ModelConfig(preset=name, vocab_size=args.vocab, seq_len=args.seq))
        torch.manual_seed(0)
        ours = Transformer(cfg)
        x = torch.randint(0, args.vocab, (args.batch, args.seq))
        y = torch.randint(0, args.vocab, (args.batch, args.seq))

        steps = {"ours": make_step(lambda m=ours, x=x, y=y: _autocast(args.dtype, m, x, y),
                                   ours.parameters())}
        if not args.no_hf:
            hf = hf_model(ours)
            # HF shifts the labels itself: the same tokens and the same work
            steps["hf"] = make_step(lambda m=hf, x=x, y=y: _autocast(args.dtype, m, x, y, hf=True),
                                    hf.parameters())
        before, width = gemm_peak(args.dtype, cfg.d_model)
        secs = time_interleaved(steps, args.steps)
        after, _ = gemm_peak(args.dtype, cfg.d_model)
        gemm = max(before, after)
        s_ours, s_hf = secs["ours"], secs.get("hf", float("nan"))
        tokens = args.batch * args.seq
        fpt = flops_per_token(cfg)
        r = dict(model=name, d_model=cfg.d_model, tokens_per_s=tokens / s_ours, hf_tokens_per_s=tokens / s_hf,
                 ratio_vs_hf=s_hf / s_ours, gflops=fpt * tokens / s_ours / 1e9,
                 hf_gflops=fpt * tokens / s_hf / 1e9, gemm_gflops=gemm / 1e9,
                 gemm_shape=f"{hardware.PROBE_ROWS}x{width}x{width}", mfu=fpt * tokens / s_ours / gemm,
                 hf_mfu=fpt * tokens / s_hf / gemm)
        results.append(r)
        hf_text = "" if args.no_hf else (f"  HF {r['hf_tokens_per_s']:9,.0f} tok/s  "
                                         f"ratio {r['ratio_vs_hf']:.2f}x")
        print(f"{name:10s} ours {r['tokens_per_s']:9,.0f} tok/s{hf_text}  {r['gflops']:6.1f} GFLOP/s = "
              f"{r['mfu']:.0%} of the {r['gemm_shape']} GEMM ({r['gemm_gflops']:.0f} GFLOP/s)"
              + ("" if args.no_hf else f"; HF {r['hf_mfu']:.0%}"), flush=True)
    rnd = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results]
    end_load = hardware.describe_machine()["load_avg_1m"]
    print(json.dumps(rnd[-1] | {"per_size": rnd, "threads": args.threads, "dtype": args.dtype,
                                "batch": args.batch, "seq": args.seq, "vocab": args.vocab,
                                "machine": machine, "load_avg_1m_end": end_load}))


if __name__ == "__main__":
    main()
