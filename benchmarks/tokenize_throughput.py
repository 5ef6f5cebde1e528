"""Tokenization throughput: the parallel batched path of `prepare` vs a single-process encode loop.

Both run in the same process on the same documents (built-in corpus) with the same tokenizer; each
is timed `--repeats` times, alternating, and the best run counts (the machine may be shared).
The last line printed is one JSON object.

    python benchmarks/tokenize_throughput.py [--mb 8] [--vocab-size 2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time

from poisonlab.corpus.builtin import builtin_documents
from poisonlab.corpus.prepare import BATCH_CHARS
from poisonlab.corpus.tokenizer import encode_batch, train_tokenizer


def batched(tok, texts: list[str]) -> int:
    """As `prepare` does: ~256 KiB batches through `encode_batch` (Rust threads)."""
    n, batch, size = 0, [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= BATCH_CHARS:
            n += sum(map(len, encode_batch(tok, batch)))
            batch, size = [], 0
    return n + sum(map(len, encode_batch(tok, batch)))


def loop(tok, texts: list[str]) -> int:
    return sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text to tokenize")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    texts, size = [], 0
    for d in builtin_documents(123):
        texts.append(d["text"])
        size += len(d["text"].encode())
        if size >= args.mb * 1e6:
            break
    tok = train_tokenizer(itertools.islice(texts, 2000), args.vocab_size)
    mb = size / 1e6

    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in (("loop", loop), ("batched", batched)):
            t0 = time.perf_counter()
            tokens[name] = fn(tok, texts)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    assert tokens["loop"] == tokens["batched"], "both paths must produce the same tokens"
    rate = {k: mb / v for k, v in best.items()}
    print(f"text: {mb:.1f} MB, {len(texts):,} documents, {tokens['loop']:,} tokens, vocab {args.vocab_size}")
    print(f"single-process tok.encode loop : {rate['loop']:6.2f} MB/s")
    print(f"parallel batched encode_batch  : {rate['batched']:6.2f} MB/s")
    print(f"speed-up                       : {rate['batched'] / rate['loop']:6.2f}x")
    print(json.dumps({
        "benchmark": "tokenize",
        "mb": round(mb, 2),
        "docs": len(texts),
        "tokens": tokens["loop"],
        "vocab_size": args.vocab_size,
        "loop_mb_s": round(rate["loop"], 3),
        "batched_mb_s": round(rate["batched"], 3),
        "speedup": round(rate["batched"] / rate["loop"], 3),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "default"),
    }))


if __name__ == "__main__":
    main()
