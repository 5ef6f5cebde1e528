"""Token shards: one flat memory-mapped token array per split, a document table and a JSON header.

Layout of a prepared data directory (written by `poisonlab prepare`):

    tokenizer.json            HF tokenizers file (byte-level BPE); EOS = the end-of-document token
    train.bin                 raw uint16/uint32 tokens; every document is followed by the EOS token
    train.docs.parquet        one row per document: id (str), start (int64), n_tokens (int32, EOS excluded)
    train.json                header: format, dtype, n_tokens, n_docs, eos_id, vocab_size,
                              tokenizer_hash, source, content_hash, poisoned (always false for clean data)
    train.00000.bin ...       instead of train.bin when `prepare --workers` wrote one part per input
                              file: the header's `parts` lists them (file, n_tokens); read as one array
    eval.bin / eval.docs.parquet / eval.json   the held-out split, same format (never trained on)
    prepare.json              the settings and input fingerprint, so an identical re-run is reused
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from poisonlab.errors import UserError
from poisonlab.fsutil import recover

FORMAT = "poisonlab-shard-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Append documents to `<dir>/<split>.bin` as they come; never holds the corpus in memory.

    Writes into `dir` as given; callers write into a temporary directory and rename it when done.
    """

    def __init__(self, directory: Path, split: str, vocab_size: int, eos_id: int):
        self.dir, self.split = Path(directory), split
        self.dtype = token_dtype(vocab_size)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self._f = open(self.dir / f"{split}.bin", "wb")  # noqa: SIM115 (closed in close())
        self._hash = hashlib.sha256()
        self._ids: list[str] = []
        self._starts: list[int] = []
        self._lens: list[int] = []
        self.n_tokens = 0

    def add(self, doc_id: str, tokens: list[int] | np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for vocab {self.vocab_size} in document {doc_id}")
        out = np.empty(arr.size + 1, dtype=self.dtype)
        out[:-1] = arr
        out[-1] = self.eos_id
        data = out.tobytes()
        self._f.write(data)
        self._hash.update(data)
        self._ids.append(str(doc_id))
        self._starts.append(self.n_tokens)
        self._lens.append(int(arr.size))
        self.n_tokens += out.size

    @property
    def n_docs(self) -> int:
        return len(self._ids)

    def close(self, **header: Any) -> dict[str, Any]:
        self._f.close()
        table = pa.table(
            {
                "id": pa.array(self._ids, pa.string()),
                "start": pa.array(self._starts, pa.int64()),
                "n_tokens": pa.array(self._lens, pa.int32()),
            }
        )
        pq.write_table(table, self.dir / f"{self.split}.docs.parquet")
        meta = {
            "format": FORMAT,
            "split": self.split,
            "dtype": self.dtype.name,
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "eos_id": self.eos_id,
            "vocab_size": self.vocab_size,
            "content_hash": self._hash.hexdigest(),
            "poisoned": False,
            **header,
        }
        (self.dir / f"{self.split}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta


class ConcatTokens:
    """Several token files read as one 1-D array: what readers of a shard use (len, slices, dtype).

    A document never crosses a part, so a document's slice is a view of one memory map; a slice that
    crosses parts (chunked scans) is copied together.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: slice | int) -> np.ndarray:
        if not isinstance(key, slice):
            i = int(key) + (len(self) if int(key) < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} out of range for {len(self)} tokens")
            k = int(np.searchsorted(self.offsets, i, "right")) - 1
            return self.parts[k][i - self.offsets[k]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("ConcatTokens: only contiguous slices")
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, "right")) - 1
        last = int(np.searchsorted(self.offsets, stop - 1, "right")) - 1
        off = self.offsets
        pieces = [self.parts[k][max(start - off[k], 0) : min(stop, off[k + 1]) - off[k]]
                  for k in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out


class DocIds:
    """Document ids, kept as Arrow strings (a Python list of 10^8 ids would take many GB)."""

    def __init__(self, column: pa.ChunkedArray):
        self._col = column

    def __len__(self) -> int:
        return len(self._col)

    def __getitem__(self, i: int) -> str:
        return self._col[int(i)].as_py()

    def __iter__(self) -> Iterator[str]:
        for chunk in self._col.chunks:
            yield from chunk.to_pylist()

    def index(self, doc_id: str) -> int:
        import pyarrow.compute as pc

        i = pc.index(self._col, doc_id).as_py()
        if i < 0:
            raise ValueError(f"{doc_id!r} is not a document id of this shard")
        return i


def _open_tokens(d: Path, split: str, header: dict[str, Any]) -> np.ndarray | ConcatTokens:
    dtype = np.dtype(header["dtype"])
    files = header.get("parts") or [{"file": f"{split}.bin", "n_tokens": header["n_tokens"]}]
    if sum(int(f["n_tokens"]) for f in files) != header["n_tokens"]:
        raise UserError(f"{d / f'{split}.json'}: its parts do not add up to n_tokens {header['n_tokens']}")
    maps = []
    for f in files:
        path = d / f["file"]
        if Path(f["file"]).name != f["file"]:
            raise UserError(f"{d / f'{split}.json'}: part {f['file']!r} is not a file name in {d}")
        if not path.is_file() or path.stat().st_size != int(f["n_tokens"]) * dtype.itemsize:
            raise UserError(f"{path}: missing or truncated (header says {f['n_tokens']} tokens)")
        maps.append(np.memmap(path, dtype=dtype, mode="r") if int(f["n_tokens"]) else np.zeros(0, dtype))
    return maps[0] if len(maps) == 1 else ConcatTokens(maps)


@dataclass
class TokenShard:
    """A read-only view of one split: `tokens` is a memory map, documents are slices of it."""

    header: dict[str, Any]
    tokens: np.ndarray | ConcatTokens  # memmap, 1-D (or several read as one)
    ids: DocIds
    starts: np.ndarray  # int64, document start offsets into `tokens`
    lengths: np.ndarray  # int32, tokens per document, EOS excluded

    @classmethod
    def open(cls, directory: str | Path, split: str = "train") -> TokenShard:
        d = Path(directory)
        recover(d)  # a replacement of the directory cut short by a crash (fsutil)
        head_path = d / f"{split}.json"
        if not head_path.is_file():
            raise UserError(f"{d}: no {split}.json; is this a directory written by `poisonlab prepare`?")
        try:
            header = json.loads(head_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{head_path}: not valid JSON ({e.msg})") from None
        if header.get("format") != FORMAT:
            raise UserError(f"{head_path}: unknown shard format {header.get('format')!r}, expected {FORMAT}")
        tokens = _open_tokens(d, split, header)
        table = pq.read_table(d / f"{split}.docs.parquet", columns=["id", "start", "n_tokens"])
        return cls(
            header=header,
            tokens=tokens,
            ids=DocIds(table.column("id")),
            starts=table.column("start").to_numpy().astype(np.int64),
            lengths=table.column("n_tokens").to_numpy().astype(np.int32),
        )

    @property
    def n_docs(self) -> int:
        return len(self.ids)

    @property
    def eos_id(self) -> int:
        return int(self.header["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i, EOS excluded."""
        s = int(self.starts[i])
        return np.asarray(self.tokens[s : s + int(self.lengths[i])])


def data_headers(data: Any, run_dir: Path) -> list[Path]:
    """Where a run's data header may be: the copy an archived run keeps (`poisonlab archive`), then the
    data directory's train.json as written, or relative to the folder of runs, as the evaluator looks."""
    d = str(data)
    dirs = [] if data is None else [Path(d), run_dir.parent.parent / d, run_dir.parent / d]
    return [run_dir / "data.json"] + [d / "train.json" for d in dirs]
