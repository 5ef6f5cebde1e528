"""Batches per second of the training stream alone, against the loaders it could be replaced by.

Builds a synthetic shard (16M tokens by default; documents of 50-1500 tokens, vocab 2048) and 250
poisons of ~650 tokens in a temporary directory, then times `TrainingStream.batch` for 16 x 128 and
64 x 1024, in order and at random steps (as after a resume). Two references, on the same memory map,
in the same process and thread count, producing the same int64 (x, y) tensors:
- the cheapest possible loader: one contiguous slice of the memory map per batch (the floor: no
  document order, no poisons, no ledger);
- nanoGPT's `get_batch`: batch_size random offsets (torch.randint), each row sliced and stacked, as
  nanoGPT writes it but without re-opening the memmap per batch (what the field uses).
First line and last (one JSON object): what it ran on.

    .venv/bin/python benchmarks/stream.py [--tokens 16000000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from poisonlab import hardware
from poisonlab.attacks.base import Poison
from poisonlab.config import PlacementConfig
from poisonlab.corpus.shards import ShardWriter, TokenShard
from poisonlab.injection.stream import TrainingStream

VOCAB, EOS, N_POISON = 2048, 0, 250


def build(root: Path, n_tokens: int) -> list[Poison]:
    rng = np.random.default_rng(0)
    w = ShardWriter(root, "train", VOCAB, EOS)
    while w.n_tokens < n_tokens:
        w.add(f"d{w.n_docs}", rng.integers(1, VOCAB, size=int(rng.integers(50, 1500))))
    w.close(tokenizer_hash="synthetic")
    trig = [7, 8, 9, 10, 11, 12, 13]
    poisons = []
    for i in range(N_POISON):
        pre = rng.integers(1, VOCAB, size=int(rng.integers(0, 300))).tolist()
        gib = rng.integers(1, VOCAB, size=int(rng.integers(400, 901))).tolist()
        ids = pre + trig + gib
        poisons.append(
            Poison(f"p{i}", "dos", {}, None, 0, "<SUDO>", len(gib), ids, "", len(pre), len(pre) + len(trig))
        )
    return poisons


def rate(fn, steps) -> float:
    fn(steps[0])  # warm (epoch permutation, page cache)
    t = time.perf_counter()
    for s in steps:
        fn(s)
    return len(steps) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16_000_000, help="tokens in the synthetic shard")
    args = ap.parse_args()
    torch.set_num_threads(1)
    machine = hardware.describe_machine()
    print(hardware.machine_line(machine))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        poisons = build(root, args.tokens)
        tokens = TokenShard.open(root).tokens
        for b, t, n in ((16, 128, 3000), (64, 1024, 200)):
            steps_total = args.tokens // (b * t)
            t0 = time.perf_counter()
            st = TrainingStream(
                root, poisons, PlacementConfig(), seq_len=t, batch_size=b, total_steps=steps_total, seed=0
            )
            build_s = time.perf_counter() - t0
            seq = list(range(min(n, steps_total)))
            rnd = np.random.default_rng(1).integers(0, steps_total, size=len(seq)).tolist()

            def ref(s: int, b: int = b, t: int = t) -> tuple[torch.Tensor, torch.Tensor]:
                a = s * b * t
                buf = np.asarray(tokens[a : a + b * t + 1]).astype(np.int64)
                y = torch.from_numpy(buf[1:].reshape(b, t).copy())
                return torch.from_numpy(buf[:-1].reshape(b, t)), y

            def nanogpt(s: int, b: int = b, t: int = t) -> tuple[torch.Tensor, torch.Tensor]:
                ix = torch.randint(len(tokens) - t - 1, (b,)).tolist()  # as nanoGPT (minus its re-mmap)
                x = torch.stack([torch.from_numpy(tokens[i : i + t].astype(np.int64)) for i in ix])
                y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + t].astype(np.int64)) for i in ix])
                return x, y

            r_seq, r_rnd = rate(st.batch, seq), rate(st.batch, rnd)
            r_ref, r_nano = rate(ref, seq), rate(nanogpt, seq)
            key = f"{b}x{t}"
            results[key] = {
                "stream_batches_per_s": round(r_seq, 1),
                "stream_random_batches_per_s": round(r_rnd, 1),
                "memmap_slice_batches_per_s": round(r_ref, 1),
                "nanogpt_get_batch_per_s": round(r_nano, 1),
                "slowdown_vs_slice": round(r_ref / r_seq, 2),
                "ratio_vs_nanogpt": round(r_seq / r_nano, 2),
                "stream_tokens_per_s": round(r_seq * b * t),
                "construct_s": round(build_s, 3),
                "poisons": N_POISON,
                "steps": steps_total,
            }
            print(
                f"{key}: stream {r_seq:,.0f} batches/s in order, {r_rnd:,.0f} at random steps "
                f"({r_seq * b * t / 1e6:.1f}M tok/s); memmap slice {r_ref:,.0f}; nanoGPT get_batch "
                f"{r_nano:,.0f}; slice/stream {r_ref / r_seq:.1f}x, stream/nanoGPT {r_seq / r_nano:.2f}x; "
                f"constructor {build_s * 1000:.0f} ms"
            )
    print(json.dumps({"benchmark": "stream", **results, "tokens": args.tokens, "numpy": np.__version__,
                      "machine": machine, "load_avg_1m_end": hardware.describe_machine()["load_avg_1m"]}))


if __name__ == "__main__":
    main()
