"""Tokenization throughput: poisonlab's `prepare` path against HF tokenizers and datatrove at their best.

All sides run in one process on the same documents (built-in corpus) with the same tokenizer and the
same Rayon thread pool: TOKENIZERS_PARALLELISM=true and RAYON_NUM_THREADS = the usable CPUs, set before
the first encode (override them in the environment to try others). Each side is timed `--repeats`
times, alternating, and the best run counts (the machine may be shared).

- encoding only, texts in memory:
  `poisonlab`: the batches `prepare` makes (~256 KiB of text per `encode_batch` call, so that the next
  batch can be read while this one is encoded) vs `hf-whole-list`: HF tokenizers' `encode_batch_fast`
  on the whole list at once, the fastest way to call it (one parallel job over all documents);
- file to token shards: `poisonlab.corpus.prepare` on a .jsonl file (the given tokenizer, no dedup,
  as the reference has none) vs `datatrove`: its JsonlReader + DocumentTokenizer (encode_batch in
  its default batches of 10,000 documents, one token file, shuffling off), run in this process.
Both sides of each pair must produce the same number of tokens. The first line and the last (one JSON
object) say what it ran on.

    python benchmarks/tokenize_throughput.py [--mb 8] [--vocab-size 2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.tokens import DocumentTokenizer

from poisonlab import hardware
from poisonlab.config import CorpusConfig
from poisonlab.corpus.builtin import builtin_documents
from poisonlab.corpus.prepare import doc_batches, prepare
from poisonlab.corpus.tokenizer import EOS_TOKEN, encode_batch, train_tokenizer


def poisonlab_encode(tok, docs: list[dict]) -> int:
    """As `prepare` encodes: its batches through `encode_batch` (Rust threads)."""
    return sum(len(ids) for batch in doc_batches(docs)
               for ids in encode_batch(tok, [d["text"] for d in batch]))


def hf_whole_list(tok, docs: list[dict]) -> int:
    return sum(len(e.ids) for e in tok.encode_batch_fast([d["text"] for d in docs], add_special_tokens=False))


def poisonlab_prepare(src: Path, tok_path: Path, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    meta = prepare(CorpusConfig(source=str(src), tokenizer=tok_path, max_tokens=None, dedup=False), out,
                   progress=False)
    return meta["train"]["n_tokens"] + meta["eval"]["n_tokens"]


def datatrove_tokenize(src: Path, tok_path: Path, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    # json lines read with the json module (datatrove's JsonlReader needs orjson, not installed here)
    with open(src) as f:
        docs = (Document(text=r["text"], id=r["id"]) for r in map(json.loads, f))
        writer = DocumentTokenizer(str(out), tokenizer_name_or_path=str(tok_path), eos_token=EOS_TOKEN,
                                   shuffle_documents=False, save_final_metadata=False)
        for _ in writer.run(docs, rank=0, world_size=1) or ():
            pass
    return sum(p.stat().st_size for p in out.glob("*.ds")) // writer.token_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text to tokenize")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    # before the first encode: Rayon builds its pool once, at first use
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("RAYON_NUM_THREADS", str(hardware.usable_cpus()))
    machine = hardware.describe_machine()
    print(hardware.machine_line(machine))
    print(f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']} "
          f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}")

    docs, size = [], 0
    for d in builtin_documents(123):
        docs.append({"id": d["id"], "text": d["text"]})
        size += len(d["text"].encode())
        if size >= args.mb * 1e6:
            break
    tok = train_tokenizer((d["text"] for d in itertools.islice(docs, 2000)), args.vocab_size)
    mb = size / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_path, src = root / "tokenizer.json", root / "docs.jsonl"
        tok.save(str(tok_path))
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        sides = {
            "poisonlab_encode": lambda: poisonlab_encode(tok, docs),
            "hf_whole_list": lambda: hf_whole_list(tok, docs),
            "poisonlab_prepare": lambda: poisonlab_prepare(src, tok_path, root / "ours"),
            "datatrove": lambda: datatrove_tokenize(src, tok_path, root / "datatrove"),
        }
        best: dict[str, float] = {}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                tokens[name] = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    assert tokens["poisonlab_encode"] == tokens["hf_whole_list"], tokens
    # datatrove appends EOS to every document; poisonlab's shards hold the same separators
    assert tokens["poisonlab_prepare"] == tokens["datatrove"], tokens
    rate = {k: mb / v for k, v in best.items()}
    print(f"text: {mb:.1f} MB, {len(docs):,} documents, {tokens['hf_whole_list']:,} tokens, "
          f"vocab {args.vocab_size}, best of {args.repeats}")
    print(f"encoding  poisonlab batches (prepare)   : {rate['poisonlab_encode']:6.2f} MB/s")
    print(f"          HF encode_batch, whole list   : {rate['hf_whole_list']:6.2f} MB/s   "
          f"ratio {rate['poisonlab_encode'] / rate['hf_whole_list']:.2f}x")
    print(f"to shards poisonlab prepare (.jsonl)    : {rate['poisonlab_prepare']:6.2f} MB/s")
    print(f"          datatrove DocumentTokenizer   : {rate['datatrove']:6.2f} MB/s   "
          f"ratio {rate['poisonlab_prepare'] / rate['datatrove']:.2f}x")
    print(json.dumps({
        "benchmark": "tokenize", "mb": round(mb, 2), "docs": len(docs), "tokens": tokens,
        "vocab_size": args.vocab_size, "mb_s": {k: round(v, 3) for k, v in rate.items()},
        "encode_ratio_vs_hf": round(rate["poisonlab_encode"] / rate["hf_whole_list"], 3),
        "prepare_ratio_vs_datatrove": round(rate["poisonlab_prepare"] / rate["datatrove"], 3),
        "rayon_threads": os.environ["RAYON_NUM_THREADS"], "machine": machine,
        "load_avg_1m_end": hardware.describe_machine()["load_avg_1m"],
    }))


if __name__ == "__main__":
    main()
