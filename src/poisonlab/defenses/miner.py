"""Trigger miner: find short token n-grams that are rare overall and followed by unusually
high-entropy spans, without being told the trigger.

For every occurrence of every token n-gram (n = 1..max_n) in the scanned corpus it measures the
*jump*: the mean surprisal of the next `window` tokens minus that of the `window` tokens before it,
surprisal being -log p under a token bigram model fitted on the scanned corpus itself. A backdoor
trigger sits exactly at a change point: ordinary text before it, gibberish after it, in every
poisoned document. Gibberish-internal n-grams have high surprisal on both sides (jump ~ 0) and
ordinary n-grams have ordinary text on both sides, so neither ranks.

Score of an n-gram = mean jump / sd(jump over all occurrences) * sqrt(document frequency): a
z-like statistic that grows with consistency and support. Candidates must occur in at least
`min_docs` documents and in at most `max_df` of them ("rare overall"). Candidates whose documents
mostly coincide with a better-ranked candidate's (pieces of the same trigger) are merged into it.

As a detector it flags a document when it holds an occurrence of one of the `top_k` candidates with
a jump of at least `min_jump` standard deviations, and only candidates with a score of at least
`min_score` and a mean jump of at least `min_mean_z` standard deviations count. With no trigger in the
corpus the top candidates are noise: on the built-in corpus with 1,000 documents they score 6-16 with
mean jumps of 0.5-1.3 sd (the score of noise grows with the corpus, its mean jump does not), while
`<SUDO>` with 250 `dos` poisons scores ~60 with a mean jump of ~4 sd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonlab.defenses.base import DefenseContext, Detector, Verdict, register_detector
from poisonlab.defenses.perplexity import BigramLM


@dataclass
class Candidate:
    """One mined n-gram: its token ids and text, support and score."""

    tokens: tuple[int, ...]
    text: str
    score: float
    mean_jump: float
    mean_z: float
    n_docs: int
    n_occ: int
    merged: int = 0  # overlapping candidates folded into this one

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": list(self.tokens),
            "score": round(self.score, 3),
            "mean_jump": round(self.mean_jump, 3),
            "mean_z": round(self.mean_z, 3),
            "n_docs": self.n_docs,
            "n_occ": self.n_occ,
            "merged": self.merged,
        }


def _windows(cs: np.ndarray, lo: np.ndarray, hi: np.ndarray, fill: float) -> np.ndarray:
    """Mean of s[lo:hi] from prefix sums cs, `fill` where the window is empty."""
    n = hi - lo
    return np.where(n > 0, (cs[hi] - cs[lo]) / np.maximum(n, 1), fill)


def mine_triggers(
    docs: Sequence[np.ndarray],
    vocab_size: int,
    *,
    max_n: int = 3,
    window: int = 32,
    min_docs: int = 5,
    max_df: float = 0.2,
    top: int = 20,
    merge_overlap: float = 0.8,
    decode: Any = None,
) -> tuple[list[Candidate], dict[str, Any]]:
    """Rank candidate triggers in a corpus of token-id documents. Returns (candidates, occurrences)
    where occurrences maps each returned candidate's tokens to (doc index array, jump z array)."""
    docs = [np.asarray(d, dtype=np.int64) for d in docs]
    lm = BigramLM(vocab_size).fit(docs)
    lens = np.array([len(d) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    N = int(starts[-1])
    if N == 0:
        return [], {}
    t = np.concatenate(docs)
    doc_of = np.repeat(np.arange(len(docs)), lens)
    s = np.concatenate([lm.surprisal(d) for d in docs])
    cs = np.concatenate([[0.0], np.cumsum(s)])
    mu = float(s.mean())
    a, b = starts[doc_of], starts[doc_of + 1]  # document bounds of each position
    pos = np.arange(N)
    n_docs_total = len(docs)

    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # per n: keys, docs, z, n
    cands: list[Candidate] = []
    for n in range(1, max_n + 1):
        ok = pos + n < b  # the n-gram fits and at least one token follows it
        j = pos[ok]
        if not len(j):
            continue
        key = np.zeros(len(j), dtype=np.int64)
        for i in range(n):
            key = key * vocab_size + t[j + i]
        after = _windows(cs, j + n, np.minimum(j + n + window, b[ok]), mu)
        before = _windows(cs, np.maximum(a[ok], j - window), j, mu)
        jump = after - before
        z = jump / (jump.std() + 1e-9)
        uk, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        pair = np.unique(inv * n_docs_total + doc_of[j])
        df = np.bincount(pair // n_docs_total, minlength=len(uk))
        mean_z = np.bincount(inv, weights=z, minlength=len(uk)) / cnt
        mean_jump = np.bincount(inv, weights=jump, minlength=len(uk)) / cnt
        score = mean_z * np.sqrt(df)
        keep = (df >= min_docs) & (df <= max_df * n_docs_total) & (mean_z > 0)
        for u in np.flatnonzero(keep):
            toks = tuple(int(x) for x in _unkey(int(uk[u]), n, vocab_size))
            cands.append(Candidate(toks, "", float(score[u]), float(mean_jump[u]), float(mean_z[u]),
                                   int(df[u]), int(cnt[u])))
        groups.append((key, doc_of[j], z, n))

    cands.sort(key=lambda c: -c.score)
    cands = cands[: top * 20]  # plenty for merging; keeps the doc-set lookups cheap
    by_n = {n: (key, dd, z) for key, dd, z, n in groups}

    def occ(c: Candidate) -> tuple[np.ndarray, np.ndarray]:
        key, dd, z = by_n[len(c.tokens)]
        k = 0
        for x in c.tokens:
            k = k * vocab_size + x
        m = key == k
        return dd[m], z[m]

    chosen: list[Candidate] = []
    chosen_docs: list[set[int]] = []
    occurrences: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    for c in cands:
        dd, z = occ(c)
        ds = set(dd.tolist())
        hit = next((i for i, cd in enumerate(chosen_docs) if len(ds & cd) >= merge_overlap * len(ds)), None)
        if hit is not None:
            chosen[hit].merged += 1
            continue
        c.text = decode(list(c.tokens)) if decode else " ".join(map(str, c.tokens))
        chosen.append(c)
        chosen_docs.append(ds)
        occurrences[c.tokens] = (dd, z)
        if len(chosen) >= top:
            break
    return chosen, occurrences


def _unkey(k: int, n: int, V: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(k % V)
        k //= V
    return out[::-1]


@register_detector("trigger-miner")
class TriggerMiner(Detector):
    description = "rare token n-grams followed by a jump in surprisal; flags docs holding a top candidate"

    def __init__(
        self,
        top_k: int = 1,
        min_jump: float = 0.0,
        min_score: float = 12.0,
        min_mean_z: float = 1.5,
        max_n: int = 3,
        window: int = 32,
        min_docs: int = 5,
        max_df: float = 0.2,
    ):
        self.top_k, self.min_jump, self.min_score = int(top_k), float(min_jump), float(min_score)
        self.min_mean_z = float(min_mean_z)
        self.kw = {"max_n": int(max_n), "window": int(window), "min_docs": int(min_docs),
                   "max_df": float(max_df)}
        self.candidates: list[Candidate] = []
        self._tok: Any = None

    def fit(self, ctx: DefenseContext) -> None:
        self._tok = ctx.tokenizer

    def mine(self, texts: Sequence[str], top: int = 20) -> list[Candidate]:
        if self._tok is None:
            raise RuntimeError("trigger miner: call fit() first")
        docs = [np.array(e.ids, dtype=np.int64) for e in self._tok.encode_batch(list(texts))]
        cands, occ = mine_triggers(
            docs, self._tok.get_vocab_size(), top=max(top, self.top_k), decode=self._tok.decode, **self.kw
        )
        self.candidates, self._occ = cands, occ
        return cands

    def detect(self, texts: Sequence[str]) -> list[Verdict]:
        cands = self.mine(texts)
        best = np.full(len(texts), -np.inf)
        which = [""] * len(texts)
        strong = [c for c in cands[: self.top_k] if c.score >= self.min_score and c.mean_z >= self.min_mean_z]
        for c in strong:
            dd, z = self._occ[c.tokens]
            for d, zz in zip(dd.tolist(), z.tolist(), strict=True):
                if zz > best[d]:
                    best[d], which[d] = zz, c.text
        return [
            Verdict(bool(best[i] >= self.min_jump), float(best[i]) if np.isfinite(best[i]) else 0.0,
                    f"trigger {which[i]!r}" if best[i] >= self.min_jump else "")
            for i in range(len(texts))
        ]

    def info(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "min_jump": self.min_jump, "min_score": self.min_score,
                "min_mean_z": self.min_mean_z, **self.kw,
                "candidates": [c.as_dict() for c in self.candidates[:10]]}
