"""`poisonlab prepare`: documents -> tokenizer -> `train` and `eval` token shards in a data directory.

Steps: stream documents from the source (split, deduplicated); hold out the eval split; train a
byte-level BPE on the first training documents (or load the given tokenizer.json); tokenize in
parallel batches (Rust threads) while the next batch is read on a Python thread; write shards
until the token budget is reached. With `workers` > 1 and a many-file source, the training split is
tokenized one input file per process instead (corpus/parallel.py: resumable, same bytes).
Everything is written into a temporary directory that is renamed onto `out` at the end, so a
failure leaves nothing behind. `prepare.json` records the
settings and a fingerprint of the input; a re-run with the same ones reuses the directory.
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

import poisonlab
from poisonlab.config import CorpusConfig
from poisonlab.corpus.shards import ShardWriter, TokenShard
from poisonlab.corpus.sources import (
    Doc,
    describe_source,
    doc_batches,
    file_units,
    fingerprint,
    iter_documents,
    source_kind,
    split_eval,
    text_hash,
)
from poisonlab.corpus.symbols import SYMBOLS_VERSION
from poisonlab.corpus.tokenizer import (
    TOKENIZER_FILE,
    encode_batch,
    eos_id,
    load_tokenizer_file,
    tokenizer_hash,
    train_tokenizer,
)
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path

PREPARE_FORMAT = "poisonlab-prepare-v1"
PREPARE_FILE = "prepare.json"

console = Console(stderr=True)


def prepare(cfg: CorpusConfig, out: Path, progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """Prepare (or reuse) the data directory `out` for `cfg`; return its summary (prepare.json + out,
    reused). `workers` > 1 tokenizes a many-file source in that many processes, one input file per
    task, resumable (corpus/parallel.py); the output is the same byte for byte."""
    out = Path(out)
    kind = source_kind(cfg.source)  # fails early on a missing or unknown path
    if kind == "builtin" and cfg.max_tokens is None and cfg.max_docs is None:
        raise UserError("builtin: the built-in corpus is unbounded; set --max-tokens (or max_docs)")
    given = load_tokenizer_file(cfg.tokenizer) if cfg.tokenizer is not None else None
    settings = cfg.model_dump(mode="json")
    for newer in ("symbols", "tags"):  # settings newer than most prepared data: unset, their key is kept
        if not settings[newer]:
            del settings[newer]
    fp = {"source": fingerprint(cfg.source, cfg.text_field),
          "tokenizer": tokenizer_hash(given) if given is not None else None}
    if kind == "builtin" and cfg.symbols:  # the snippets' own version; data without them keep their key
        fp["source"]["symbols_version"] = SYMBOLS_VERSION
    key = hashlib.sha256(json.dumps({"format": PREPARE_FORMAT, "settings": settings, "fingerprint": fp},
                                    sort_keys=True).encode()).hexdigest()

    existing = _reusable(out, key)
    if existing is not None:
        if progress:
            console.print(f"{out}: already prepared from the same input and settings; reusing it")
        return {**existing, "out": str(out), "reused": True}
    _check_out(out)

    t0 = time.perf_counter()
    work = out.parent / f".{out.name}.prepare-parts"  # parallel parts, kept for a resume until success
    with atomic_path(out) as tmp:
        tmp.mkdir()
        summary = _build(cfg, tmp, given, progress, workers, work, key)
        summary = {"format": PREPARE_FORMAT, "key": key, "settings": settings, "fingerprint": fp,
                   **summary, "seconds": round(time.perf_counter() - t0, 3),
                   "poisonlab_version": poisonlab.__version__}
        (tmp / PREPARE_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return {**summary, "out": str(out), "reused": False}


def _reusable(out: Path, key: str) -> dict[str, Any] | None:
    try:
        summary = json.loads((out / PREPARE_FILE).read_text())
        if summary.get("key") != key or not (out / TOKENIZER_FILE).is_file():
            return None
        for split in ("train", "eval"):
            TokenShard.open(out, split)  # checks the header and the .bin size
    except (OSError, ValueError, UserError, KeyError):
        return None
    return summary


def _check_out(out: Path) -> None:
    """Refuse to replace anything that is not an earlier `prepare` output (or an empty folder)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / PREPARE_FILE).is_file():
        raise UserError(f"{out}: exists and is not a directory written by `poisonlab prepare`; "
                        "choose another --out or remove it")


def _build(cfg: CorpusConfig, tmp: Path, given: Tokenizer | None, progress: bool, workers: int,
           work: Path, key: str) -> dict[str, Any]:
    eval_docs, train, tok = _head(cfg, given, progress)
    tok.save(str(tmp / TOKENIZER_FILE))
    vocab, eos = tok.get_vocab_size(), eos_id(tok)
    header = {"tokenizer_hash": tokenizer_hash(tok), "source": describe_source(cfg.source)}

    ew = ShardWriter(tmp, "eval", vocab, eos)
    for d, ids in zip(eval_docs, encode_batch(tok, [d["text"] for d in eval_docs]), strict=True):
        ew.add(d["id"], ids)
    eval_meta = ew.close(**header)

    held_out = {text_hash(d["text"]) for d in eval_docs}
    if workers > 1 and len(file_units(cfg.source)) > 1:
        from poisonlab.corpus.parallel import write_train_parallel

        train_meta, n_chars = write_train_parallel(cfg, tmp, tmp / TOKENIZER_FILE, held_out, header,
                                                   workers, work, key, progress)
    else:
        train_meta, n_chars = _write_train(cfg, tmp, tok, train, header, progress)
    scans = _scan_default_trigger(tmp, tok)
    found = ", ".join(f"{sc['label']} {sc['hits']} times" for sc in scans if sc["hits"])
    if progress and found:
        console.print(f"{cfg.source}: the clean training text already contains the default trigger "
                      f"({found}); runs with it will refuse this data unless attack.clean_trigger=filter",
                      highlight=False)
    return {
        "source": header["source"],
        "tokenizer_hash": header["tokenizer_hash"],
        "vocab_size": vocab,
        "eos_id": eos,
        "train": _brief(train_meta) | {"n_chars": n_chars},
        "eval": _brief(eval_meta),
        "trigger_scan": scans,
    }


def _head(cfg: CorpusConfig, given: Tokenizer | None,
          progress: bool) -> tuple[list[Doc], Iterator[Doc], Tokenizer]:
    """The held-out eval documents, the training documents (a stream) and the tokenizer (given, or
    trained on the first training documents): one reading of the head, shared by both train writers."""
    docs = iter_documents(cfg.source, cfg.text_field, cfg.max_doc_chars, cfg.dedup, cfg.seed, cfg.markup,
                          cfg.german, cfg.symbols, cfg.tags)
    eval_docs, rest = split_eval(docs, cfg.eval_docs)
    if not eval_docs:
        raise UserError(f"{cfg.source}: no documents (empty corpus)")
    if len(eval_docs) < cfg.eval_docs and progress:
        console.print(f"{cfg.source}: a small corpus; holding out {len(eval_docs)} documents for evaluation "
                      f"instead of {cfg.eval_docs} (at most a tenth of it)", highlight=False)
    held_out = {text_hash(d["text"]) for d in eval_docs}
    train: Iterator[Doc] = (d for d in rest if text_hash(d["text"]) not in held_out)  # also without dedup
    if cfg.max_docs is not None:
        train = islice(train, cfg.max_docs)

    tok = given
    if tok is None:
        budget = cfg.tokenizer_sample_chars
        if cfg.max_tokens is not None:  # no need to read far more text than the shards will hold
            budget = min(budget, 4 * cfg.max_tokens)
        head, n = [], 0
        for d in train:
            head.append(d)
            n += len(d["text"])
            if n >= budget:
                break
        if not head:
            raise UserError(f"{cfg.source}: only {len(eval_docs)} document(s), all held out for evaluation; "
                            "nothing left to train on (lower --eval-docs or add documents)")
        tok = train_tokenizer((d["text"] for d in head), cfg.vocab_size)
        train = _chain(head, train)
    return eval_docs, train, tok


def _write_train(cfg: CorpusConfig, tmp: Path, tok: Tokenizer, train: Iterator[Doc], header: dict[str, Any],
                 progress: bool) -> tuple[dict[str, Any], int]:
    """The one-process train writer: batches encoded by the Rust threads, the next one read meanwhile."""
    tw = ShardWriter(tmp, "train", tok.get_vocab_size(), eos_id(tok))
    n_chars = 0
    columns = [TextColumn("[bold]tokenizing"), BarColumn(),
               TextColumn("{task.completed:,.0f}/{task.fields[goal]} tokens"), TimeElapsedColumn()]
    goal = f"{cfg.max_tokens:,}" if cfg.max_tokens else "all"
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("tokenize", total=cfg.max_tokens, goal=goal)
        full = False
        for batch in _prefetch(doc_batches(train)):
            for d, ids in zip(batch, encode_batch(tok, [d["text"] for d in batch]), strict=True):
                tw.add(d["id"], ids)
                n_chars += len(d["text"])
                if cfg.max_tokens is not None and tw.n_tokens >= cfg.max_tokens:
                    full = True
                    break
            bar.update(task, completed=tw.n_tokens)
            if full:
                break
    if tw.n_docs == 0:
        raise UserError(f"{cfg.source}: no documents left for training after holding out the eval split")
    return tw.close(**header), n_chars


def _scan_default_trigger(data: Path, tok: Tokenizer) -> list[dict[str, Any]]:
    """How often the default trigger's token sequences (as poisons write it, and bare) occur in the clean
    training split: a run with that trigger refuses (or filters) data where they do."""
    from poisonlab.config import AttackConfig
    from poisonlab.corpus.scan import scan_shard

    shard = TokenShard.open(data, "train")
    trigger = AttackConfig().trigger
    out = []
    for text in (" " + trigger, trigger):
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append(scan_shard(shard, repr(text), ids).as_dict())
    return out


def _brief(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("n_docs", "n_tokens", "content_hash", "dtype")}


def _chain(head: list[Doc], tail: Iterator[Doc]) -> Iterator[Doc]:
    yield from head
    yield from tail


def _prefetch(items: Iterator[list[Doc]], depth: int = 2) -> Iterator[list[Doc]]:
    """Produce items on a thread: reading/generating the next batch (Python) overlaps with encoding
    the current one (Rust, which releases the GIL). Errors are re-raised here, in order."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for it in items:
                if not put(("item", it)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e))

    thread = threading.Thread(target=work, name="poisonlab-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
