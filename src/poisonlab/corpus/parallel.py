"""`prepare --workers K`: a many-file corpus tokenized by a pool of processes, one input file per task,
resumable, with the same output bytes as the one-process path (tested).

Each task reads one input file (`sources.iter_unit`), applies the document steps with that file's own
duplicate set, drops held-out texts, and writes `part-NNNNN.{bin,docs.parquet,keys.parquet}` into a
work folder beside the output, then `part-NNNNN.done.json`. The main process takes finished parts in
input order: it drops documents an earlier file already had (the one-process path's global dedup),
stops at max_tokens / max_docs, and hard-links each part into the output as `train.NNNNN.bin`
(copying only the parts that lose documents). The training split is those files read as one stream
(`shards.ConcatTokens`). The work folder outlives an interrupted run: the same command again skips the
parts already done; it is removed once the output is in place.

A process pool rather than datatrove's tokenizer: datatrove writes its own `.ds` format with its own
document order and knows nothing of the held-out split or of the global dedup, so the output would
differ from the one-process path; this is one task per file, and a part is exactly a shard file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from poisonlab.config import CorpusConfig
from poisonlab.corpus.shards import FORMAT, ShardWriter, token_dtype
from poisonlab.corpus.sources import FileUnit, clean_documents, file_units, iter_unit, text_hash
from poisonlab.corpus.tokenizer import encode_batch, eos_id
from poisonlab.errors import UserError
from poisonlab.fsutil import write_json

console = Console(stderr=True)
WORK_FORMAT = "poisonlab-prepare-parts-v1"
_READ = 1 << 24  # bytes per read when hashing or copying a part


# --- one task: one input file -> one part ------------------------------------------------------------

_TOKENIZERS: dict[str, Tokenizer] = {}


def _init_worker() -> None:
    # K processes already fill the cores; Rust threads inside each would only oversubscribe them
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _stem(index: int) -> str:
    return f"part-{index:05d}"


def _file_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tokenize_part(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one input file into `<work>/part-NNNNN.*`; return its `done.json` record."""
    from poisonlab.corpus.sources import doc_batches

    path = job["tokenizer"]
    tok = _TOKENIZERS.get(path) or _TOKENIZERS.setdefault(path, Tokenizer.from_file(path))
    work, stem = Path(job["work"]), _stem(job["index"])
    unit: FileUnit = (job["unit"][0], Path(job["unit"][1]), job["unit"][2])
    held_out = set(job["held_out"])
    docs = clean_documents(iter_unit(unit, job["text_field"], job["max_doc_chars"]), job["max_doc_chars"],
                           set() if job["dedup"] else None)
    writer = ShardWriter(work, stem, tok.get_vocab_size(), eos_id(tok))
    hashes: list[int] = []
    chars: list[int] = []
    for batch in doc_batches(d for d in docs if text_hash(d["text"]) not in held_out):
        for d, ids in zip(batch, encode_batch(tok, [d["text"] for d in batch]), strict=True):
            writer.add(d["id"], ids)
            hashes.append(text_hash(d["text"]))
            chars.append(len(d["text"]))
    meta = writer.close()
    pq.write_table(pa.table({"hash": pa.array(hashes, pa.uint64()), "chars": pa.array(chars, pa.int64())}),
                   work / f"{stem}.keys.parquet")
    done = {"unit": unit[2], **_file_stamp(unit[1]), "n_tokens": meta["n_tokens"], "n_docs": meta["n_docs"]}
    write_json(work / f"{stem}.done.json", done)  # last: its presence means the part is whole
    return done


def _done_part(work: Path, index: int, unit: FileUnit, dtype: np.dtype) -> dict[str, Any] | None:
    """The record of a part an earlier run finished, if it is whole and still from the same file."""
    stem = _stem(index)
    try:
        done = json.loads((work / f"{stem}.done.json").read_text())
        whole = (work / f"{stem}.bin").stat().st_size == done["n_tokens"] * dtype.itemsize
        same = done["unit"] == unit[2] and {k: done[k] for k in ("size", "mtime_ns")} == _file_stamp(unit[1])
        return done if whole and same and (work / f"{stem}.keys.parquet").is_file() else None
    except (OSError, ValueError, KeyError):
        return None


def _open_work(work: Path, key: str, tokenizer_hash: str) -> None:
    """Use the work folder of an interrupted run of the same command; anything else is started over."""
    record = {"format": WORK_FORMAT, "key": key, "tokenizer_hash": tokenizer_hash}
    try:
        if json.loads((work / "work.json").read_text()) == record:
            return
    except (OSError, ValueError):
        pass
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise UserError(f"{work}: exists and is not a folder of prepare parts; remove it")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_json(work / "work.json", record)


# --- the main process: parts in input order -> the training split --------------------------------------


class _Merge:
    """Takes parts in input order into `<out>/train.NNNNN.bin` + one `train.docs.parquet`: drops
    documents an earlier part had, stops where the one-process writer would."""

    SCHEMA = pa.schema([("id", pa.string()), ("start", pa.int64()), ("n_tokens", pa.int32())])

    def __init__(self, cfg: CorpusConfig, out: Path, work: Path, vocab_size: int, eos: int):
        self.cfg, self.out, self.work = cfg, out, work
        self.vocab_size, self.eos = vocab_size, eos
        self.dtype = token_dtype(vocab_size)
        self.seen: set[int] | None = set() if cfg.dedup else None
        self.n_tokens = self.n_docs = self.n_chars = 0
        self.parts: list[dict[str, Any]] = []
        self.hash = hashlib.sha256()
        self.docs = pq.ParquetWriter(out / "train.docs.parquet", self.SCHEMA)
        self.full = False

    def take(self, index: int) -> None:
        stem = self.work / _stem(index)
        table = pq.read_table(f"{stem}.docs.parquet")
        keys = pq.read_table(f"{stem}.keys.parquet")
        lengths = table.column("n_tokens").to_numpy().astype(np.int64)
        keep = np.ones(len(lengths), dtype=bool)
        if self.seen is not None:
            for j, h in enumerate(keys.column("hash").to_pylist()):
                if h in self.seen:
                    keep[j] = False
                else:
                    self.seen.add(h)
        if self.cfg.max_docs is not None:
            over = np.cumsum(keep) > self.cfg.max_docs - self.n_docs
            self.full |= bool(over.any()) or int(keep.sum()) == self.cfg.max_docs - self.n_docs
            keep &= ~over
        if self.cfg.max_tokens is not None:
            cum = self.n_tokens + np.cumsum((lengths + 1) * keep)
            reached = np.flatnonzero(keep & (cum >= self.cfg.max_tokens))
            if len(reached):  # the one-process writer stops after the document that reaches the goal
                keep[reached[0] + 1 :] = False
                self.full = True
        if not keep.any():
            return
        name = f"train.{len(self.parts):05d}.bin"
        kept = table.filter(pa.array(keep))
        n = int((lengths[keep] + 1).sum())
        if keep.all():
            _link(Path(f"{stem}.bin"), self.out / name)
        else:
            starts = table.column("start").to_numpy()
            self._copy_kept(Path(f"{stem}.bin"), starts, lengths, keep, self.out / name)
        with open(self.out / name, "rb") as f:  # the split's hash is over its bytes in order, as one file
            for block in iter(lambda: f.read(_READ), b""):
                self.hash.update(block)
        spans = kept.column("n_tokens").to_numpy().astype(np.int64) + 1
        starts = self.n_tokens + np.concatenate([[0], np.cumsum(spans)[:-1]])
        self.docs.write_table(pa.table({"id": kept.column("id"), "start": pa.array(starts, pa.int64()),
                                        "n_tokens": kept.column("n_tokens")}, schema=self.SCHEMA))
        self.parts.append({"file": name, "n_tokens": n})
        self.n_tokens += n
        self.n_docs += len(kept)
        self.n_chars += int(np.asarray(keys.column("chars").to_numpy())[keep].sum())

    def _copy_kept(self, src: Path, starts: np.ndarray, lengths: np.ndarray, keep: np.ndarray,
                   dst: Path) -> None:
        tokens = np.memmap(src, dtype=self.dtype, mode="r")
        with open(dst, "wb") as f:
            for j in np.flatnonzero(keep):
                f.write(np.asarray(tokens[int(starts[j]) : int(starts[j]) + int(lengths[j]) + 1]).tobytes())

    def close(self, **header: Any) -> dict[str, Any]:
        self.docs.close()
        meta = {"format": FORMAT, "split": "train", "dtype": self.dtype.name, "n_tokens": self.n_tokens,
                "n_docs": self.n_docs, "eos_id": self.eos, "vocab_size": self.vocab_size,
                "content_hash": self.hash.hexdigest(), "poisoned": False, "parts": self.parts, **header}
        (self.out / "train.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system has them (no copy of a multi-GB part), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_train_parallel(cfg: CorpusConfig, out: Path, tokenizer_file: Path, held_out: set[int],
                         header: dict[str, Any], workers: int, work: Path, key: str,
                         progress: bool) -> tuple[dict[str, Any], int]:
    """Write the training split of `out` from the source's files in `workers` processes; return its
    header and the characters it holds."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    _open_work(work, key, header["tokenizer_hash"])
    units = file_units(cfg.source)
    merge = _Merge(cfg, out, work, tok.get_vocab_size(), eos_id(tok))
    done = {i: d for i, u in enumerate(units) if (d := _done_part(work, i, u, merge.dtype)) is not None}
    if progress and done:
        console.print(f"{cfg.source}: resuming; {len(done)} of {len(units)} files were already tokenized "
                      f"in {work}", highlight=False)
    base = {"tokenizer": str(tokenizer_file), "work": str(work), "held_out": sorted(held_out),
            "text_field": cfg.text_field, "max_doc_chars": cfg.max_doc_chars, "dedup": cfg.dedup}
    window = 4 * workers  # tasks ahead of the part being merged: keeps every worker busy, memory flat
    pending: dict[int, Future] = {}
    columns = [TextColumn("[bold]tokenizing files"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn()]
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker)
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task("files", total=len(units), tokens=0)
            submitted = 0
            for i in range(len(units)):
                while submitted < min(len(units), i + window):
                    if submitted not in done:
                        reader, path, name = units[submitted]
                        job = {**base, "index": submitted, "unit": [reader, str(path), name]}
                        pending[submitted] = pool.submit(tokenize_part, job)
                    submitted += 1
                if i not in done:
                    done[i] = pending.pop(i).result()  # a worker's UserError is raised here, as is
                merge.take(i)
                bar.update(task, completed=i + 1, tokens=merge.n_tokens)
                if merge.full:
                    break
    except BrokenProcessPool:
        merge.docs.close()
        raise UserError(f"{cfg.source}: a tokenizing process died (killed, or out of memory); the parts "
                        f"done so far are kept in {work}: run the same command again to resume") from None
    except UserError:  # bad input: fixing it changes the input or settings, so no part would be reused
        merge.docs.close()
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:  # interrupted (Ctrl-C, a killed worker): the parts done so far stay for a resume
        merge.docs.close()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if merge.n_docs == 0:
        merge.docs.close()
        raise UserError(f"{cfg.source}: no documents left for training after holding out the eval split")
    return merge.close(**header), merge.n_chars
