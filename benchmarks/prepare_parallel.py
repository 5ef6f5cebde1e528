"""Preparing a many-file corpus: `prepare --workers K` against one process and datatrove's executor.

A FineWeb-like folder (`--files` Parquet files of built-in text with id and url columns) is made once;
then, with the same given tokenizer and no dedup (the reference has none), each side turns it into
token files:
- `one-process`: `prepare` with workers=1, its best one-process configuration (the tokenizer's Rayon
  threads on every usable CPU, the next batch read meanwhile);
- `workers`: `prepare --workers K` (K = usable CPUs): one input file per process, one Rayon thread each;
- `datatrove`: datatrove's `LocalPipelineExecutor` running `ParquetReader` + `DocumentTokenizer` with
  one task per file on K workers, its own way of using K CPUs.
Every side is timed `--repeats` times, alternating; the best run counts (the machine may be shared).
All three must produce the same number of tokens. The first line and the last (JSON) name the machine.

    python benchmarks/prepare_parallel.py [--mb 16] [--files 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from poisonlab import hardware
from poisonlab.config import CorpusConfig
from poisonlab.corpus.builtin import builtin_documents
from poisonlab.corpus.prepare import prepare
from poisonlab.corpus.tokenizer import EOS_TOKEN, train_tokenizer


def make_corpus(root: Path, mb: float, files: int) -> tuple[Path, list[str]]:
    texts, size = [], 0
    for d in builtin_documents(321, markup=0.1):
        texts.append(d["text"])
        size += len(d["text"].encode())
        if size >= mb * 1e6:
            break
    src = root / "corpus"
    src.mkdir()
    per = -(-len(texts) // files)
    for i in range(files):
        chunk = texts[i * per : (i + 1) * per]
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(len(chunk))], "text": chunk,
                                 "url": ["https://example.org/"] * len(chunk)}), src / f"{i:05d}.parquet")
    return src, texts


def ours(src: Path, tok: Path, out: Path, workers: int) -> int:
    shutil.rmtree(out, ignore_errors=True)
    meta = prepare(CorpusConfig(source=str(src), tokenizer=tok, max_tokens=None, dedup=False), out,
                   progress=False, workers=workers)
    return meta["train"]["n_tokens"] + meta["eval"]["n_tokens"]


def datatrove(src: Path, tok: Path, out: Path, workers: int, files: int) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    shutil.rmtree(out, ignore_errors=True)
    pipeline = [ParquetReader(str(src)),
                DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(tok), eos_token=EOS_TOKEN,
                                  shuffle_documents=False, save_final_metadata=False)]
    LocalPipelineExecutor(pipeline, tasks=files, workers=workers, logging_dir=str(out / "logs")).run()
    return sum(p.stat().st_size for p in (out / "tokens").glob("*.ds")) // 2  # uint16 tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=16.0, help="MB of text")
    ap.add_argument("--files", type=int, default=8, help="Parquet files it is split into")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    k = hardware.usable_cpus()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the one-process side's Rayon threads
    machine = hardware.describe_machine()
    print(hardware.machine_line(machine))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, texts = make_corpus(root, args.mb, args.files)
        tok = root / "tokenizer.json"
        train_tokenizer(texts[:2000], args.vocab_size).save(str(tok))
        mb = sum(len(t.encode()) for t in texts) / 1e6
        sides = {
            "one_process": lambda: ours(src, tok, root / "one", 1),
            "workers": lambda: ours(src, tok, root / "many", k),
            "datatrove": lambda: datatrove(src, tok, root / "dt", k, args.files),
        }
        best: dict[str, float] = {}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                tokens[name] = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    assert len(set(tokens.values())) == 1, tokens
    rate = {name: mb / s for name, s in best.items()}
    print(f"text: {mb:.1f} MB in {args.files} Parquet files, {tokens['workers']:,} tokens, "
          f"vocab {args.vocab_size}, {k} workers, best of {args.repeats}")
    print(f"prepare, one process (Rayon x{k})   : {rate['one_process']:6.2f} MB/s")
    print(f"prepare --workers {k}                : {rate['workers']:6.2f} MB/s   "
          f"ratio {rate['workers'] / rate['one_process']:.2f}x one process")
    print(f"datatrove executor, {k} workers      : {rate['datatrove']:6.2f} MB/s   "
          f"ratio {rate['workers'] / rate['datatrove']:.2f}x (--workers vs datatrove)")
    print(json.dumps({
        "benchmark": "prepare_parallel", "mb": round(mb, 2), "files": args.files, "workers": k,
        "tokens": tokens["workers"], "mb_s": {n: round(v, 3) for n, v in rate.items()},
        "workers_vs_one_process": round(rate["workers"] / rate["one_process"], 3),
        "workers_vs_datatrove": round(rate["workers"] / rate["datatrove"], 3),
        "machine": machine, "load_avg_1m_end": hardware.describe_machine()["load_avg_1m"],
    }))


if __name__ == "__main__":
    main()
