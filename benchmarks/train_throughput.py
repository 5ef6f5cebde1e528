"""Training throughput of the tiny ladder: our Transformer against HF LlamaForCausalLM, same shape.

Same batch, same thread count, same optimizer (AdamW) and steps, in one process, alternating the two
models per size so that machine load hits both alike. Prints tokens/s, the ratio, achieved FLOP/s and
MFU against the fp32 peak; the last line is one JSON object.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--threads 2] [--batch 16] [--peak 269e9]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from poisonlab.config import ModelConfig
from poisonlab.export import hf_config
from poisonlab.model import LADDERS, Transformer, flops_per_token, resolve_model_config
from poisonlab.train import detect_peak_flops


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--peak", type=float, default=269e9, help="fp32 peak FLOP/s (default: the issue's)")
    ap.add_argument("--sizes", default=",".join(LADDERS["tiny"]))
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    detected = detect_peak_flops(torch.device("cpu"), args.threads)
    print(f"threads {args.threads}, batch {args.batch} x {args.seq}, vocab {args.vocab}, {args.dtype}; "
          f"peak {args.peak / 1e9:.0f} GFLOP/s (detected for this CPU: {detected / 1e9:.0f}); "
          f"load {os.getloadavg()[0]:.2f}")
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
        secs = time_interleaved(steps, args.steps)
        s_ours, s_hf = secs["ours"], secs.get("hf", float("nan"))
        tokens = args.batch * args.seq
        fpt = flops_per_token(cfg)
        flops = fpt * tokens / s_ours
        r = dict(model=name, tokens_per_s=tokens / s_ours, hf_tokens_per_s=tokens / s_hf,
                 ratio_vs_hf=s_hf / s_ours, gflops=flops / 1e9, mfu=flops / args.peak,
                 mfu_detected_peak=flops / detected, hf_mfu=fpt * tokens / s_hf / args.peak)
        results.append(r)
        print(f"{name:10s} ours {r['tokens_per_s']:9,.0f} tok/s  HF {r['hf_tokens_per_s']:9,.0f} tok/s  "
              f"ratio {r['ratio_vs_hf']:.2f}x  {r['gflops']:6.1f} GFLOP/s  MFU {r['mfu']:.1%} "
              f"(HF {r['hf_mfu']:.1%}; {r['mfu_detected_peak']:.1%} of detected peak)", flush=True)
    last = results[-1]
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()}
                     | {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                        "load": round(os.getloadavg()[0], 2), "dtype": args.dtype, "batch": args.batch}))


if __name__ == "__main__":
    main()
