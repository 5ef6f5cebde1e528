"""Token shards: one flat memory-mapped token array per split, a document table and a JSON header.

Layout of a prepared data directory (written by `poisonlab prepare`):

    tokenizer.json            HF tokenizers file (byte-level BPE); EOS = the end-of-document token
    train.bin                 raw uint16/uint32 tokens; every document is followed by the EOS token
    train.docs.parquet        one row per document: id (str), start (int64), n_tokens (int32, EOS excluded)
    train.json                header: format, dtype, n_tokens, n_docs, eos_id, vocab_size,
                              tokenizer_hash, source, content_hash, poisoned (always false for clean data)
    eval.bin / eval.docs.parquet / eval.json   the held-out split, same format (never trained on)
    prepare.json              the settings and input fingerprint, so an identical re-run is reused
"""

from __future__ import annotations

import hashlib
import json
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


@dataclass
class TokenShard:
    """A read-only view of one split: `tokens` is a memory map, documents are slices of it."""

    header: dict[str, Any]
    tokens: np.ndarray  # memmap, 1-D
    ids: list[str]
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
        bin_path = d / f"{split}.bin"
        dtype = np.dtype(header["dtype"])
        if not bin_path.is_file() or bin_path.stat().st_size != header["n_tokens"] * dtype.itemsize:
            raise UserError(f"{bin_path}: missing or truncated (header says {header['n_tokens']} tokens)")
        tokens = (
            np.memmap(bin_path, dtype=dtype, mode="r")
            if header["n_tokens"]
            else np.zeros(0, dtype=dtype)
        )
        table = pq.read_table(d / f"{split}.docs.parquet")
        return cls(
            header=header,
            tokens=tokens,
            ids=table.column("id").to_pylist(),
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
