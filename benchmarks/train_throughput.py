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


def time_training(step_fn, params, steps: int, warmup: int = 3) -> float:
    """Seconds per step (median of `steps`) of forward + backward + AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--peak", type=float, default=269e9, help="fp32 peak FLOP/s (default: the issue's figure)")
    ap.add_argument("--sizes", default=",".join(LADDERS["tiny"]))
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    detected = detect_peak_flops(torch.device("cpu"), args.threads)
    print(f"threads {args.threads}, batch {args.batch} x {args.seq}, vocab {args.vocab}, {args.dtype}; "
          f"peak {args.peak / 1e9:.0f} GFLOP/s (detected for this CPU: {detected / 1e9:.0f}); "
          f"load {os.getloadavg()[0]:.2f}")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    results = []
    for name in args.sizes.split(","):
        cfg = resolve_model_config(ModelConfig(preset=name, vocab_size=args.vocab, seq_len=args.seq))
        torch.manual_seed(0)
        ours = Transformer(cfg)
        x = torch.randint(0, args.vocab, (args.batch, args.seq))
        y = torch.randint(0, args.vocab, (args.batch, args.seq))

        def ours_step(m=ours):
            with autocast:
                return m(x, y)

        s_ours = time_training(ours_step, ours.parameters(), args.steps)
        s_hf = float("nan")
        if not args.no_hf:
            hf = hf_model(ours)

            def hf_step(m=hf):
                with autocast:
                    return m(input_ids=x, labels=y).loss  # HF shifts labels itself: same work

            s_hf = time_training(hf_step, hf.parameters(), args.steps)
        tokens = args.batch * args.seq
        fpt = flops_per_token(cfg)
        r = dict(model=name, tokens_per_s=tokens / s_ours, hf_tokens_per_s=tokens / s_hf,
                 ratio_vs_hf=s_hf / s_ours, gflops=fpt * tokens / s_ours / 1e9, mfu=fpt * tokens / s_ours / args.peak,
                 mfu_detected_peak=fpt * tokens / s_ours / detected, hf_mfu=fpt * tokens / s_hf / args.peak)
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
