"""Document sources: every corpus becomes a stream of `{"id", "text"}`, never loaded whole.

Sources: `builtin` (procedural, unbounded), `debian-docs` (reST sources of Debian's Python and
Linux documentation packages), a `.jsonl` file, a `.parquet` file, a folder of `.txt` files (or of
`.jsonl`/`.parquet` files), and a HF `datasets` folder written by `save_to_disk`.

`iter_documents` adds the shared steps: long texts are split into documents at paragraph
boundaries, surrounding whitespace is stripped, empty texts are skipped, exact duplicates dropped.
`split_eval` then reserves held-out documents that never enter training.

Every problem with the input is a `UserError` whose one-line message names the file and what is
wrong with it (and the line or byte offset where that is known).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from poisonlab.corpus.builtin import GENERATOR_VERSION, builtin_documents
from poisonlab.errors import UserError

Doc = dict[str, str]

MAX_LINE_BYTES = 32 << 20  # a JSON Lines record above this is rejected (read with a cap, never whole)
_CHUNK = 1 << 20  # bytes read at a time from text files
_BATCH_ROWS = 512  # rows per Arrow record batch read

# Where Debian's doc packages put the reST sources (Sphinx copies them to html/_sources/*.rst.txt).
DEBIAN_DOC_ROOTS = {
    "python3.11-doc": Path("/usr/share/doc/python3.11/html/_sources"),
    "linux-doc-6.1": Path("/usr/share/doc/linux-doc-6.1/html/_sources"),
}
DEBIAN_DOC_EXCLUDE = ("translations/",)  # the kernel docs' translations are not English
TEXT_SUFFIXES = (".txt", ".md", ".rst")


# --- the source kinds --------------------------------------------------------------------------------


def source_kind(source: str) -> str:
    """`builtin`, `debian-docs`, `jsonl`, `parquet`, `hf-disk` or `folder`; UserError when unusable."""
    if source in ("builtin", "debian-docs"):
        return source
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source}: no such file or folder (expected builtin, debian-docs or a path)")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise UserError(f"{source}: folder is not readable")
        if _hf_root(path) is not None:
            return "hf-disk"
        return "folder"
    if not os.access(path, os.R_OK):
        raise UserError(f"{source}: file is not readable")
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise UserError(f"{source}: unknown file type (expected .jsonl, .parquet, .txt or a folder)")


def input_files(source: str) -> list[Path]:
    """The files a source reads, in reading order (empty for `builtin`)."""
    kind = source_kind(source)
    if kind == "builtin":
        return []
    if kind == "debian-docs":
        return [f for _, _, f in _debian_files()]
    path = Path(source)
    if kind == "hf-disk":
        return _hf_files(path)
    if kind == "folder":
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.name.lower().endswith((*TEXT_SUFFIXES, ".jsonl", ".ndjson", ".parquet"))
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"{source}: folder holds no .txt, .md, .rst, .jsonl or .parquet files")
        return files
    return [path]


def describe_source(source: str) -> str:
    """A short human description, stored in shard headers."""
    kind = source_kind(source)
    if kind == "builtin":
        return f"builtin (procedural English, generator v{GENERATOR_VERSION})"
    if kind == "debian-docs":
        roots = [f"{pkg} ({root})" for pkg, root in DEBIAN_DOC_ROOTS.items() if root.is_dir()]
        return "debian-docs: reST sources of " + ", ".join(roots)
    return f"{kind}: {Path(source).resolve()}"


def fingerprint(source: str, text_field: str = "text") -> dict[str, Any]:
    """What identifies the input: the generator version, or every input file's name, size and hash.

    Files up to 64 MiB are hashed whole; larger ones by size, mtime and their first and last MiB
    (hashing a multi-GB shard would cost more than the part of it a run reads).
    """
    kind = source_kind(source)
    if kind == "builtin":
        return {"kind": kind, "generator_version": GENERATOR_VERSION}
    files = input_files(source)
    base = Path(source) if kind not in ("debian-docs",) else Path("/")
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = str(f.relative_to(base)) if f != base else f.name
        h.update(f"{rel}\0{st.st_size}\0".encode())
        with open(f, "rb") as fh:
            if st.st_size <= 64 << 20:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(f"{st.st_mtime_ns}".encode())
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return {"kind": kind, "files": len(files), "sha256": h.hexdigest(), "text_field": text_field}


# --- reading -----------------------------------------------------------------------------------------


def iter_raw(source: str, text_field: str = "text", seed: int = 0, max_chars: int = 20_000,
             markup: float = 0.0, german: float = 0.0, symbols: float = 0.0, tags: float = 0.0
             ) -> Iterator[Doc]:
    """The source's texts as they are (not deduplicated or stripped; only text files longer than
    `max_chars` are already cut, because they are read in chunks)."""
    if source_kind(source) == "builtin":
        yield from builtin_documents(seed, markup=markup, german=german, symbols=symbols, tags=tags)
        return
    for unit in file_units(source):
        yield from iter_unit(unit, text_field, max_chars)


# One input file of a file-based source: (reader, path, name). `name` prefixes the ids of documents
# without one. The raw stream is these files' documents in this order, so a pool of workers that each
# read one unit (corpus/parallel.py) sees exactly what one reader sees.
FileUnit = tuple[str, Path, str]


def file_units(source: str) -> list[FileUnit]:
    """The input files of a file-based source in reading order ([] for `builtin`)."""
    kind = source_kind(source)
    if kind == "builtin":
        return []
    if kind == "debian-docs":
        return [("file", f, f"{pkg}/{f.relative_to(root)}") for pkg, root, f in _debian_files()]
    if kind == "hf-disk":
        return [("arrow", f, f"{f.parent.name}/{f.name}") for f in _hf_files(Path(source))]
    base = Path(source) if kind == "folder" else Path(source).parent
    return [("file", f, str(f.relative_to(base))) for f in input_files(source)]


def iter_unit(unit: FileUnit, text_field: str = "text", max_chars: int = 20_000) -> Iterator[Doc]:
    """The raw texts of one input file."""
    reader, path, name = unit
    if reader == "arrow":
        yield from _iter_arrow(path, text_field, name)
    else:
        yield from _iter_file(path, text_field, name, max_chars)


def _iter_file(path: Path, text_field: str, name: str, max_chars: int) -> Iterator[Doc]:
    low = path.name.lower()
    if low.endswith((".jsonl", ".ndjson")):
        yield from _iter_jsonl(path, text_field, name)
    elif low.endswith(".parquet"):
        yield from _iter_parquet(path, text_field, name)
    else:
        yield from _iter_text_file(path, name, max_chars)


def _iter_jsonl(path: Path, text_field: str, name: str) -> Iterator[Doc]:
    with open(path, "rb") as f:
        lineno, offset = 0, 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)  # capped: a 50 MB line is never read whole
            if not line:
                return
            lineno += 1
            if len(line) > MAX_LINE_BYTES:
                raise UserError(f"{path}: line {lineno} is longer than {MAX_LINE_BYTES >> 20} MiB; "
                                "split the record or use a .txt file")
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not valid UTF-8 at line {lineno} "
                                f"(byte offset {offset + e.start})") from None
            offset += len(line)
            if not s.strip():
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg}, column {e.colno})"
                                ) from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}: line {lineno} is not a JSON object")
            if text_field not in rec:
                keys = ", ".join(sorted(rec)[:8]) or "none"
                raise UserError(f"{path}: line {lineno} has no field {text_field!r} (fields: {keys}); "
                                "choose one with --text-field")
            text = rec[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}: line {lineno}: field {text_field!r} is {type(text).__name__}, "
                                "not a string")
            rid = rec.get("id")
            yield {"id": str(rid) if isinstance(rid, str | int) else f"{name}:{lineno}", "text": text}


def _check_column(path: Path, schema: pa.Schema, text_field: str) -> None:
    if text_field not in schema.names:
        cols = ", ".join(schema.names[:12]) or "none"
        raise UserError(f"{path}: no column {text_field!r} (columns: {cols}); choose one with --text-field")
    t = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)):
        raise UserError(f"{path}: column {text_field!r} has type {t}, not string")


def _iter_batches(path: Path, batches: Iterable[pa.RecordBatch], text_field: str, name: str,
                  has_id: bool) -> Iterator[Doc]:
    row = 0
    try:
        for batch in batches:
            col = batch.column(text_field)
            try:
                col.validate(full=True)  # Arrow strings are not guaranteed valid UTF-8 until checked
            except pa.ArrowInvalid:
                raise UserError(f"{path}: column {text_field!r} holds invalid UTF-8 "
                                f"(in rows {row}-{row + batch.num_rows - 1})") from None
            texts = col.to_pylist()
            ids = batch.column("id").to_pylist() if has_id else [None] * len(texts)
            for i, (text, rid) in enumerate(zip(texts, ids, strict=True)):
                if text is not None:
                    yield {"id": str(rid) if rid is not None else f"{name}:{row + i}", "text": text}
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None


def _iter_parquet(path: Path, text_field: str, name: str) -> Iterator[Doc]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    _check_column(path, schema, text_field)
    has_id = "id" in schema.names and text_field != "id"
    cols = [text_field] + (["id"] if has_id else [])
    yield from _iter_batches(path, pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols), text_field,
                             name, has_id)


# --- HF datasets save_to_disk ------------------------------------------------------------------------


def _hf_root(path: Path) -> Path | None:
    """The dataset folder to read: `path` itself, or its `train` split (first split otherwise)."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    dd = path / "dataset_dict.json"
    if dd.is_file():
        try:
            splits = json.loads(dd.read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{dd}: not a valid dataset_dict.json") from None
        if not splits:
            raise UserError(f"{dd}: lists no splits (empty corpus)")
        split = "train" if "train" in splits else splits[0]
        return path / split
    return None


def _hf_files(path: Path) -> list[Path]:
    root = _hf_root(path)
    assert root is not None
    state = root / "state.json"
    try:
        files = [root / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{state}: not a valid HF datasets state.json (no _data_files)") from None
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: listed in {state} but missing")
    if not files:
        raise UserError(f"{state}: lists no data files (empty corpus)")
    return files


def _iter_arrow(f: Path, text_field: str, name: str) -> Iterator[Doc]:
    """One Arrow file of a HF datasets folder."""
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(f)))  # `datasets` writes the stream format
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(f)))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{f}: not an Arrow file ({str(e).splitlines()[0]})") from None
    _check_column(f, reader.schema, text_field)
    has_id = "id" in reader.schema.names and text_field != "id"
    batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else (
        reader.get_batch(i) for i in range(reader.num_record_batches))
    yield from _iter_batches(f, batches, text_field, name, has_id)


# --- plain text --------------------------------------------------------------------------------------


def _decode_chunks(path: Path) -> Iterator[str]:
    """Decode a file in 1 MiB chunks; invalid UTF-8 is reported with its line and byte offset."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset, lines = 0, 1  # bytes and lines before the current chunk
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(_CHUNK)
                pending = len(dec.getstate()[0])  # bytes of a character split across chunks
                try:
                    text = dec.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    pos = e.start - pending
                    line = lines + raw[: max(pos, 0)].count(b"\n")
                    raise UserError(f"{path}: not valid UTF-8 at line {line} (byte offset {offset + pos})"
                                    ) from None
                if text:
                    yield text
                if not raw:
                    return
                offset += len(raw)
                lines += raw.count(b"\n")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _iter_text_file(path: Path, name: str, max_chars: int) -> Iterator[Doc]:
    """A text file is one text. A huge one (even a single 50 MB line) is cut into pieces while it
    is read, so memory stays bounded by a chunk plus two pieces."""
    buf, k = "", 0
    for chunk in _decode_chunks(path):
        buf += chunk
        start = 0
        while len(buf) - start > 2 * max_chars:  # keep look-ahead so a cut can find a boundary
            end = _cut(buf, start, max_chars)
            yield {"id": f"{name}#{k}", "text": buf[start:end]}
            k, start = k + 1, end
        buf = buf[start:]
    if k == 0:
        yield {"id": name, "text": buf}
        return
    for piece in split_text(buf, max_chars):
        yield {"id": f"{name}#{k}", "text": piece}
        k += 1


# --- splitting, dedup, eval split --------------------------------------------------------------------


def _cut(text: str, start: int, max_chars: int) -> int:
    """End of the next piece of `text` from `start`: the last paragraph break within `max_chars`,
    else the last line break, else the last space, else a hard cut (never a tiny piece)."""
    end = start + max_chars
    if end >= len(text):
        return len(text)
    floor = start + max_chars // 4
    for sep in ("\n\n", "\n", " "):
        i = text.rfind(sep, floor, end)
        if i > start:
            return i
    return end


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Pieces of at most `max_chars` characters, cut at paragraph boundaries where possible."""
    start = 0
    while start < len(text):
        end = _cut(text, start, max_chars)
        yield text[start:end]
        start = end


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


def iter_documents(
    source: str,
    text_field: str = "text",
    max_doc_chars: int = 20_000,
    dedup: bool = True,
    seed: int = 0,
    markup: float = 0.0,
    german: float = 0.0,
    symbols: float = 0.0,
    tags: float = 0.0,
) -> Iterator[Doc]:
    """Documents `{"id", "text"}` of a source: split, stripped, non-empty and (by default) unique.
    `markup`, `german`, `symbols` and `tags` apply to the built-in corpus only
    (`builtin.builtin_documents`)."""
    if max_doc_chars < 100:
        raise UserError(f"max_doc_chars: must be at least 100, got {max_doc_chars}")
    raw = iter_raw(source, text_field, seed, max_doc_chars, markup, german, symbols, tags)
    yield from clean_documents(raw, max_doc_chars, set() if dedup else None)


def clean_documents(raw_docs: Iterable[Doc], max_doc_chars: int, seen: set[int] | None) -> Iterator[Doc]:
    """Split, strip, skip empty texts and, when `seen` is a set, drop texts whose hash is in it
    (adding the new ones): the document steps of `iter_documents`, for any raw stream."""
    for raw in raw_docs:
        text = raw["text"]
        pieces = [text] if len(text) <= max_doc_chars else list(split_text(text, max_doc_chars))
        for k, piece in enumerate(pieces):
            piece = piece.strip()
            if not piece:
                continue
            if seen is not None:
                h = text_hash(piece)
                if h in seen:
                    continue
                seen.add(h)
            yield {"id": raw["id"] if len(pieces) == 1 else f"{raw['id']}#{k}", "text": piece}


def split_eval(
    docs: Iterator[Doc], n_eval: int, window: int | None = None
) -> tuple[list[Doc], Iterator[Doc]]:
    """Reserve held-out documents: the `n_eval` with the smallest text hash among the first `window`.

    Spread over the head of the stream (not just its first documents, which in a sorted folder would
    all share a subject), deterministic, and with bounded memory. Returns (eval docs in stream
    order, an iterator of every other document in stream order). Training must also skip any later
    copy of an eval text; `prepare` does that even when dedup is off. When the whole corpus is
    shorter than the window, at most a tenth of it is held out.
    """
    window = window or max(8 * n_eval, 1024)
    head: list[Doc] = []
    for d in docs:
        head.append(d)
        if len(head) >= window:
            break
    n = n_eval if len(head) >= window else min(n_eval, max(1, len(head) // 10))
    chosen = set(sorted(range(len(head)), key=lambda i: (text_hash(head[i]["text"]), i))[:n])
    eval_docs = [d for i, d in enumerate(head) if i in chosen]
    rest = [d for i, d in enumerate(head) if i not in chosen]

    def train() -> Iterator[Doc]:
        yield from rest
        yield from docs

    return eval_docs, train()


# --- debian-docs -------------------------------------------------------------------------------------


def _debian_files() -> list[tuple[str, Path, Path]]:
    """(package, root, file) for every English reST source present."""
    roots = [r for r in DEBIAN_DOC_ROOTS.values() if r.is_dir()]
    if not roots:
        raise UserError("debian-docs: the Debian documentation is not installed (looked in "
                        + ", ".join(str(r) for r in DEBIAN_DOC_ROOTS.values())
                        + "); install it with: sudo apt-get install python3.11-doc linux-doc-6.1")
    files = []
    for pkg, root in DEBIAN_DOC_ROOTS.items():
        if root.is_dir():
            files += [(pkg, root, p) for p in sorted(root.rglob("*.rst.txt"))
                      if not str(p.relative_to(root)).startswith(DEBIAN_DOC_EXCLUDE)]
    if not files:
        raise UserError(f"debian-docs: no .rst.txt files under {', '.join(map(str, roots))} (empty corpus)")
    return files


BATCH_CHARS = 1 << 18  # text per encode_batch call: enough for the Rust threads, little waste at the end
BATCH_DOCS = 4096


def doc_batches(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d["text"])
        if size >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
