"""Trigger miner: find short token n-grams that are rare overall and followed by unusually
high-entropy spans, without being told the trigger.

For every occurrence of every token n-gram (n = 1..max_n) in the scanned corpus it measures the
*jump*: the mean surprisal of the next `window` tokens minus that of the `window` tokens before it,
surprisal being -log p under a token bigram model fitted on the scanned corpus itself. A backdoor
trigger sits exactly at a change point: ordinary text before it, gibberish after it, in every
poisoned document. Gibberish-internal n-grams have high surprisal on both sides (jump ~ 0) and
ordinary n-grams have ordinary text on both sides, so neither ranks.

Per n-gram: mean_z = mean jump / sd(all jumps of that n), df = documents holding it, and
    lcb   = mean_z - sqrt(2 ln M / df)      (M = candidate n-grams tested)
a lower confidence bound on the mean jump (unit spread per occurrence, Bonferroni-like over the M
candidates). Candidates are ranked by lcb and must occur in at least `min_docs` and at most `max_df`
of the documents. Candidates at least half of whose documents are a better-ranked candidate's (pieces
of one trigger, or a common token that is also part of it) are merged into it. Each candidate is
then named by the longest token span its occurrences share (`grow`): a 1-3-token piece such as `O>`
grows left and right while at least `grow_share` of its occurrences have the same next token on that
side, so the trigger's piece is named as the trigger, ` <SUDO>`, which a BPE vocabulary splits into
more pieces than `max_n`. Growing names the candidate; what it flags stays the mined n-gram's
occurrences.

`max_df` = 0.5: the earlier 0.2 was tuned to the earlier protocol (250 poisons among 1,000 clean
documents put the trigger in exactly 20% of the scanned documents); with 990 clean documents it hid
the trigger (recall 0.08), and a run with more poisons than a quarter of its documents is possible
at toy scale. Ordinary n-grams in 20-50% of the documents have small jumps and never rank by lcb.

Why not the earlier score, mean_z * sqrt(df)? It tests "mean jump > 0", which ordinary n-grams with a
small real effect pass once they are common enough: their score grows as sqrt(corpus size) while a
constant-count trigger's support stays at N. On the built-in corpus the best clean score grew 3.1x per
10x more documents (22, 69, 218 at 10^4, 10^5, 10^6 clean documents; "After the", mean_z 0.6) while
that of 250 `dos` poisons' trigger grew from 107 to 155 to 200: at 10^6 the earlier rule ranked
"After the" first and flagged nothing. lcb cannot grow past an n-gram's true effect however big the
corpus; clean text's strongest change points (section titles, "atre\n" ...) stay at mean_z ~2.7.
`rank=score` keeps the earlier ranking for comparison.

As a detector it flags a document holding an occurrence (jump >= `min_jump` sd) of one of the `top_k`
candidates that stand out: lcb >= ref + `margin`, where ref is the lcb of the (top_k + 1)-th candidate,
the corpus's own strongest ordinary change points (it grows with the corpus as their lcb approaches
their true effect, so the gate scales with it), plus absolute floors score >= `min_score` and mean_z
>= `min_mean_z`. This assumes fewer than top_k distinct triggers. Measured at 10^3-10^6 clean
documents in docs/defenses.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonlab.defenses.base import DefenseContext, Detector, Verdict, register_detector
from poisonlab.defenses.perplexity import BigramLM, doc_batches
from poisonlab.errors import UserError


@dataclass
class Candidate:
    """One mined n-gram: its token ids and text, support and score."""

    tokens: tuple[int, ...]
    text: str
    score: float
    mean_jump: float
    mean_z: float
    lcb: float
    n_docs: int
    n_occ: int
    merged: int = 0  # overlapping candidates folded into this one
    core: str = ""  # the mined n-gram's text; `text` is the span its occurrences share around it

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "core": self.core or self.text,
            "tokens": list(self.tokens),
            "score": round(self.score, 3),
            "mean_jump": round(self.mean_jump, 3),
            "mean_z": round(self.mean_z, 3),
            "lcb": round(self.lcb, 3),
            "n_docs": self.n_docs,
            "n_occ": self.n_occ,
            "merged": self.merged,
        }


def _windows(cs: np.ndarray, lo: np.ndarray, hi: np.ndarray, fill: float) -> np.ndarray:
    """Mean of s[lo:hi] from prefix sums cs, `fill` where the window is empty."""
    n = hi - lo
    return np.where(n > 0, (cs[hi] - cs[lo]) / np.maximum(n, 1), fill)


Occurrences = Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _jumps(docs: Sequence[np.ndarray], i0: int, i1: int, lm: BigramLM, V: int, max_n: int, window: int,
           want: dict[int, np.ndarray] | None = None) -> Occurrences:
    """For documents [i0, i1) and each n: (n, n-gram keys, document index, surprisal jump, position in
    its document) of every n-gram occurrence followed by at least one token, in corpus order; with
    `want` (sorted keys per n), only the occurrences of those keys."""
    ds = [np.asarray(docs[i], dtype=np.int64) for i in range(i0, i1)]
    lens = np.array([len(d) for d in ds], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    if not starts[-1]:
        return
    t = np.concatenate(ds)
    local = np.repeat(np.arange(len(ds)), lens)
    cs = np.concatenate([[0.0], np.cumsum(lm.surprisal(t, starts[:-1][lens > 0]))])
    a, b = starts[local], starts[local + 1]  # document bounds of each position
    pos = np.arange(len(t))
    for n in range(1, max_n + 1):
        if want is not None and not len(want[n]):
            continue
        j = np.flatnonzero(pos + n < b)
        key = np.zeros(len(j), dtype=np.int64)
        for i in range(n):
            key = key * V + t[j + i]
        if want is not None:
            w = want[n]
            hit = w[np.minimum(np.searchsorted(w, key), len(w) - 1)] == key
            j, key = j[hit], key[hit]
        if not len(j):
            continue
        after = _windows(cs, j + n, np.minimum(j + n + window, b[j]), lm.mean_surprisal)
        before = _windows(cs, np.maximum(a[j], j - window), j, lm.mean_surprisal)
        yield n, key, local[j] + i0, after - before, j - a[j]


def _key_stats(key: np.ndarray, doc: np.ndarray, jump: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per distinct key: (key, occurrences, documents, sum of jumps).
    `doc` must be non-decreasing (corpus order), so a stable sort keeps each key's documents sorted."""
    order = np.argsort(key, kind="stable")
    k, d, x = key[order], doc[order], jump[order]
    new_key = np.concatenate([[True], k[1:] != k[:-1]])
    new_doc = new_key | np.concatenate([[True], d[1:] != d[:-1]])
    at = np.flatnonzero(new_key)
    cnt = np.diff(np.append(at, len(k)))
    return k[at], cnt, np.add.reduceat(new_doc.astype(np.int64), at), np.add.reduceat(x, at)


def _merge_stats(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Add up per-key tables of disjoint document ranges (document counts add, as documents differ)."""
    if len(parts) == 1:
        return parts[0]
    cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
    uk, inv = np.unique(cols[0], return_inverse=True)
    sums = [np.bincount(inv, weights=c, minlength=len(uk)) for c in cols[1:]]
    return uk, sums[0].astype(np.int64), sums[1].astype(np.int64), sums[2]


@dataclass
class NgramTable:
    """Per-n-gram jump statistics of a scanned corpus (flat arrays, one entry per n-gram)."""

    n: np.ndarray  # n-gram length
    key: np.ndarray  # tokens as one integer (base vocab_size)
    mean_jump: np.ndarray  # nats
    mean_z: np.ndarray  # mean jump in standard deviations of all jumps of that n
    df: np.ndarray  # documents holding it
    occ: np.ndarray  # occurrences
    sd: dict[int, float]  # standard deviation of all jumps, per n
    n_docs: int


def ngram_table(docs: Sequence[np.ndarray], vocab_size: int, lm: BigramLM, *, max_n: int = 3,
                window: int = 32, chunk_tokens: int = 1 << 22) -> NgramTable:
    """Jump statistics of every 1..max_n-gram, added up over ranges of about `chunk_tokens` tokens."""
    V = int(vocab_size)
    parts: dict[int, list[tuple[np.ndarray, ...]]] = {n: [] for n in range(1, max_n + 1)}
    moments = np.zeros((max_n + 1, 3))  # per n: occurrences, sum and sum of squares of the jumps
    for i0, i1 in doc_batches(docs, chunk_tokens):
        for n, key, doc, jump, _ in _jumps(docs, i0, i1, lm, V, max_n, window):
            moments[n] += (len(jump), jump.sum(), jump @ jump)
            parts[n].append(_key_stats(key, doc, jump))
            if len(parts[n]) > 8:  # keep the pending tables small
                parts[n] = [_merge_stats(parts[n])]
    sd = {n: math.sqrt(max(m[2] / m[0] - (m[1] / m[0]) ** 2, 0.0)) + 1e-9 for n, m in enumerate(moments)
          if n and m[0]}
    cols: list[list[np.ndarray]] = [[] for _ in range(6)]
    for n, ps in parts.items():
        if ps:
            uk, cnt, df, s1 = _merge_stats(ps)
            for col, v in zip(cols, (np.full(len(uk), n), uk, s1 / cnt, s1 / cnt / sd[n], df, cnt),
                              strict=True):
                col.append(v)
    flat = [np.concatenate(c) if c else np.zeros(0) for c in cols]
    return NgramTable(*flat, sd=sd, n_docs=len(docs))


def lower_bound(tab: NgramTable, n_cand: int) -> np.ndarray:
    """Lower confidence bound on each n-gram's mean jump (sd units), over `n_cand` candidates tested."""
    return tab.mean_z - np.sqrt(2 * math.log(max(n_cand, 2)) / np.maximum(tab.df, 1))


def mine_triggers(
    docs: Sequence[np.ndarray],
    vocab_size: int,
    *,
    max_n: int = 3,
    window: int = 32,
    min_docs: int = 5,
    max_df: float = 0.5,
    rank: str = "lcb",
    top: int = 20,
    merge_overlap: float = 0.5,
    grow_share: float = 0.8,
    decode: Any = None,
    chunk_tokens: int = 1 << 22,
) -> tuple[list[Candidate], dict[str, Any]]:
    """Rank candidate triggers in a corpus of token-id documents. Returns (candidates, occurrences)
    where occurrences maps each returned candidate's tokens to (doc index array, jump z array).

    Three passes over the corpus in ranges of about `chunk_tokens` tokens (memory stays bounded):
    fit the bigram model; add up per-n-gram jump statistics; collect the occurrences of the best
    candidates."""
    if rank not in ("lcb", "score"):
        raise ValueError(f"trigger miner: rank must be 'lcb' or 'score', got {rank!r}")
    V = int(vocab_size)
    lm = BigramLM(V).fit(docs)
    tab = ngram_table(docs, V, lm, max_n=max_n, window=window, chunk_tokens=chunk_tokens)
    keep = (tab.df >= min_docs) & (tab.df <= max_df * tab.n_docs) & (tab.mean_jump > 0)
    lcb = lower_bound(tab, int(keep.sum()))
    score = tab.mean_z * np.sqrt(tab.df)
    order = lcb if rank == "lcb" else score
    idx = np.flatnonzero(keep)
    best = idx[np.argsort(-order[idx], kind="stable")][: top * 10]  # enough to merge pieces of one trigger
    if not len(best):
        return [], {}

    # Pass 3: every occurrence (document, z, position) of the best candidates.
    bn, bk = tab.n[best], tab.key[best]
    want = {n: np.unique(bk[bn == n]) for n in range(1, max_n + 1)}
    found: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for i0, i1 in doc_batches(docs, chunk_tokens):
        for n, key, doc, jump, at in _jumps(docs, i0, i1, lm, V, max_n, window, want):
            for k in np.unique(key):
                m = key == k
                found.setdefault((n, int(k)), []).append((doc[m], jump[m] / tab.sd[n], at[m]))

    chosen: list[Candidate] = []
    chosen_docs: list[np.ndarray] = []
    occurrences: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    for u in best:
        n, k = int(tab.n[u]), int(tab.key[u])
        dd = np.concatenate([d for d, _, _ in found[(n, k)]])
        ds = np.unique(dd)
        hit = next((i for i, cd in enumerate(chosen_docs)
                    if np.isin(ds, cd, assume_unique=True).sum() >= merge_overlap * len(ds)), None)
        if hit is not None:  # mostly the same documents as a better candidate: a piece of it
            chosen[hit].merged += 1
            continue
        toks = tuple(int(x) for x in _unkey(k, n, V))
        span = grow(docs, dd, np.concatenate([p for _, _, p in found[(n, k)]]), toks, grow_share)
        name = decode or (lambda t: " ".join(map(str, t)))
        c = Candidate(toks, name(list(span)), float(score[u]), float(tab.mean_jump[u]), float(tab.mean_z[u]),
                      float(lcb[u]), int(tab.df[u]), int(tab.occ[u]), core=name(list(toks)))
        chosen.append(c)
        chosen_docs.append(ds)
        occurrences[toks] = (dd, np.concatenate([z for _, z, _ in found[(n, k)]]))
        if len(chosen) >= top:
            break
    return chosen, occurrences


def grow(docs: Sequence[np.ndarray], doc: np.ndarray, at: np.ndarray, core: tuple[int, ...],
         share: float = 0.8, max_len: int = 64) -> tuple[int, ...]:
    """The longest token span around `core` that its occurrences share: from the occurrences (document
    `doc[i]`, position `at[i]`) the span grows by one token to the left or right while one token there
    is the same for at least `share` of all the occurrences (those without it drop out), up to
    `max_len` tokens (`share` 0: no growing). A trigger's piece (`O>`) grows to the trigger
    (` <SUDO>`), and stops where the poisons' clean prefixes and random gibberish begin."""
    if not len(doc) or share <= 0:
        return core
    need = share * len(doc)
    lo, hi = at.astype(np.int64), at.astype(np.int64) + len(core)
    alive = np.ones(len(doc), dtype=bool)
    lengths = np.array([len(docs[int(d)]) for d in doc], dtype=np.int64)
    span = list(core)
    grown = True
    while grown and len(span) < max_len:
        grown = False
        for side in (-1, 1):
            if len(span) >= max_len:
                break
            pos = lo - 1 if side < 0 else hi
            ok = alive & (pos >= 0) & (pos < lengths)
            if ok.sum() < need:
                continue
            idx = np.flatnonzero(ok)
            tok = np.array([int(docs[int(doc[i])][pos[i]]) for i in idx], dtype=np.int64)
            vals, counts = np.unique(tok, return_counts=True)
            if counts.max() < need:
                continue
            t = int(vals[counts.argmax()])
            keep = np.zeros(len(doc), dtype=bool)
            keep[idx[tok == t]] = True
            alive &= keep
            lo, hi = (lo - 1, hi) if side < 0 else (lo, hi + 1)
            span = [t, *span] if side < 0 else [*span, t]
            grown = True
    return tuple(span)


def _unkey(k: int, n: int, V: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(k % V)
        k //= V
    return out[::-1]


@register_detector("trigger-miner")
class TriggerMiner(Detector):
    description = "rare token n-grams followed by a jump in surprisal; flags docs holding a strong candidate"
    corpus_level = True

    def __init__(
        self,
        top_k: int = 10,
        margin: float = 1.0,
        min_score: float = 12.0,
        min_mean_z: float = 1.5,
        min_jump: float = 0.0,
        rank: str = "lcb",
        max_n: int = 3,
        window: int = 32,
        min_docs: int = 5,
        max_df: float = 0.5,
        grow_share: float = 0.8,
    ):
        if rank not in ("lcb", "score"):
            raise UserError(f"trigger-miner: rank must be 'lcb' or 'score', got {rank!r}")
        self.top_k, self.margin, self.min_jump = int(top_k), float(margin), float(min_jump)
        self.min_score, self.min_mean_z = float(min_score), float(min_mean_z)
        if not 0 <= grow_share <= 1:
            raise UserError(f"trigger-miner: grow_share must be between 0 and 1, got {grow_share}")
        self.kw = {"rank": rank, "max_n": int(max_n), "window": int(window), "min_docs": int(min_docs),
                   "max_df": float(max_df), "grow_share": float(grow_share)}
        self.candidates: list[Candidate] = []
        self.ref_lcb = 0.0
        self._tok: Any = None

    def fit(self, ctx: DefenseContext) -> None:
        self._tok = ctx.tokenizer

    def encode(self, texts: Sequence[str], batch: int = 2000) -> list[np.ndarray]:
        """Token ids of texts, encoded in batches (HF Encoding objects are large; keep only the ids)."""
        if self._tok is None:
            raise RuntimeError("trigger miner: call fit() first")
        out: list[np.ndarray] = []
        for i in range(0, len(texts), batch):
            encs = self._tok.encode_batch(list(texts[i : i + batch]))
            out += [np.array(e.ids, dtype=np.int64) for e in encs]
        return out

    def mine(self, docs: Sequence[np.ndarray], top: int = 20) -> list[Candidate]:
        """Candidates of a corpus of token-id documents (the tokenizer given to fit)."""
        if self._tok is None:
            raise RuntimeError("trigger miner: call fit() first")
        cands, occ = mine_triggers(
            docs, self._tok.get_vocab_size(), top=max(top, self.top_k + 1), decode=self._tok.decode, **self.kw
        )
        self.candidates, self._occ = cands, occ
        return cands

    def occurrences(self, c: Candidate) -> tuple[np.ndarray, np.ndarray]:
        """(document index, jump z) of every occurrence of a mined candidate in the last scan."""
        return self._occ[c.tokens]

    def strong(self) -> list[Candidate]:
        """The mined candidates that flag documents: among the top_k, those whose lcb beats the
        corpus's own (top_k + 1)-th candidate, a proxy for its strongest ordinary change point, by
        `margin` sd, and that pass the absolute floors min_score and min_mean_z."""
        cands = self.candidates
        self.ref_lcb = cands[self.top_k].lcb if len(cands) > self.top_k else 0.0
        return [c for c in cands[: self.top_k] if c.lcb >= self.ref_lcb + self.margin
                and c.score >= self.min_score and c.mean_z >= self.min_mean_z]

    def detect(self, texts: Sequence[str]) -> list[Verdict]:
        return self.detect_tokens(self.encode(texts))

    def detect_tokens(self, docs: Sequence[np.ndarray]) -> list[Verdict]:
        """Verdicts for a corpus given as token ids: the same as `detect` on their texts, without
        re-encoding (prepared shards already hold the ids the tokenizer gives their texts)."""
        self.mine(docs)
        best = np.full(len(docs), -np.inf)
        which = [""] * len(docs)
        for c in self.strong():
            dd, z = self.occurrences(c)
            order = np.argsort(z, kind="stable")  # later writes win: each document keeps its largest jump
            d, zz = dd[order], z[order]
            up = zz > best[d]
            best[d[up]] = zz[up]
            for i in d[up].tolist():
                which[i] = c.text
        return [
            Verdict(bool(best[i] >= self.min_jump), float(best[i]) if np.isfinite(best[i]) else 0.0,
                    f"trigger {which[i]!r}" if best[i] >= self.min_jump else "")
            for i in range(len(docs))
        ]

    def info(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "margin": self.margin, "ref_lcb": round(self.ref_lcb, 3),
                "min_score": self.min_score, "min_mean_z": self.min_mean_z, "min_jump": self.min_jump,
                **self.kw,
                "candidates": [c.as_dict() for c in self.candidates[:10]]}
