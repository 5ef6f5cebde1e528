"""Where a token sequence occurs in a token shard: a chunked scan of the memory map (memory stays flat).

Used to check that clean training data does not already contain the trigger: the ledger's "exactly N
poisons" is only true when the trigger's tokens occur nowhere else in the stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from poisonlab.corpus.shards import TokenShard

CHUNK = 1 << 24  # tokens per scanned chunk


def find_sequence(tokens: np.ndarray, pattern: Sequence[int], chunk: int = CHUNK) -> np.ndarray:
    """Start positions (int64, ascending) of every occurrence of `pattern` in `tokens`."""
    pat = np.asarray(pattern, dtype=np.int64)
    k, n = len(pat), len(tokens)
    if k == 0 or n < k:
        return np.zeros(0, dtype=np.int64)
    out = []
    for s in range(0, n - k + 1, chunk):
        e = min(n, s + chunk + k - 1)  # overlap by k-1 so that no occurrence straddles two chunks unseen
        block = np.asarray(tokens[s:e])
        cand = np.flatnonzero(block[: len(block) - k + 1] == pat[0])
        for j in range(1, k):
            cand = cand[block[cand + j] == pat[j]]
        out.append(cand + s)
    return np.concatenate(out)


@dataclass(frozen=True)
class SequenceScan:
    """Occurrences of one token sequence in a shard: how many, and in which documents."""

    label: str
    ids: tuple[int, ...]
    hits: int
    docs: np.ndarray  # distinct document indices that contain it

    def as_dict(self) -> dict:
        return {"label": self.label, "ids": list(self.ids), "hits": self.hits, "docs": int(len(self.docs))}


def scan_shard(shard: TokenShard, label: str, ids: Sequence[int]) -> SequenceScan:
    """Count `ids` in the shard; an occurrence belongs to the document its first token is in."""
    pos = find_sequence(shard.tokens, ids)
    docs = np.unique(np.searchsorted(np.asarray(shard.starts), pos, "right") - 1) if len(pos) else pos
    return SequenceScan(label, tuple(int(i) for i in ids), int(len(pos)), docs.astype(np.int64))
