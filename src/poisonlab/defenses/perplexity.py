"""Perplexity filter: drop documents whose perplexity under a reference model is too high (or too low).

Reference models (`ref=`):
- `ngram` (default): a smoothed token bigram model fitted on the clean calibration documents. Needs no
  trained model, so the filter works on any prepared data dir; it is the weakest reference.
- a poisonlab run directory (`runs/<name>`: its `config.yaml` and latest `checkpoints/step_*/`), e.g. a
  clean run of the same size: the study's own setting of a reference model trained on clean data.
- a local HF causal LM directory (safetensors weights; its own `tokenizer.json` when it has one).

Threshold: `pct` = a percentile of the perplexities of the clean calibration documents (clean
*training* documents, never the ones the false-positive rate is measured on), or `max_ppl` = an
absolute value. `low_pct` / `min_ppl` add a lower cut for unusually predictable (repetitive) text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.defenses.base import DefenseContext, Detector, Verdict, register_detector
from poisonlab.errors import UserError


def doc_batches(docs: Sequence[np.ndarray], max_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive document ranges [i, j) of about `max_tokens` tokens each: corpus passes in bounded
    memory (a range always holds at least one document)."""
    i, n = 0, len(docs)
    while i < n:
        j, tot = i, 0
        while j < n and (j == i or tot + len(docs[j]) <= max_tokens):
            tot += len(docs[j])
            j += 1
        yield i, j
        i = j


def _add_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge (sorted keys, counts) tables into one."""
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uk, inv = np.unique(keys, return_inverse=True)
    return uk, np.bincount(inv, weights=counts, minlength=len(uk)).astype(np.int64)


class BigramLM:
    """Token bigram model with interpolated absolute discounting (a Kneser-Ney-style backoff).

    p(w|v) = max(c(v,w) - D, 0) / c(v) + D * N1+(v.) / c(v) * p1(w),   p1 = add-one unigram.
    The first token of a document is scored by p1. Vectorised with numpy and fitted in passes of
    `chunk_tokens`, so corpora of hundreds of millions of tokens fit in bounded memory.
    """

    def __init__(self, vocab_size: int, discount: float = 0.75):
        self.V, self.D = int(vocab_size), float(discount)

    def fit(self, docs: Sequence[np.ndarray], chunk_tokens: int = 1 << 24) -> BigramLM:
        V = self.V
        uni = np.zeros(V, dtype=np.float64)
        first = np.zeros(V, dtype=np.float64)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for i, j in doc_batches(docs, chunk_tokens):
            toks = [np.asarray(d, dtype=np.int64) for d in docs[i:j] if len(d)]
            if not toks:
                continue
            uni += np.bincount(np.concatenate(toks), minlength=V)
            first += np.bincount([int(d[0]) for d in toks], minlength=V)
            keys = np.concatenate([d[:-1] * V + d[1:] for d in toks])
            parts.append(np.unique(keys, return_counts=True))
            if len(parts) > 8:
                parts = [_add_counts(parts)]
        self.p1 = (uni + 1.0) / (uni.sum() + V)
        self.keys, self.counts = _add_counts(parts) if parts else (np.zeros(0, np.int64),) * 2
        self.ctx = np.bincount(self.keys // V, weights=self.counts, minlength=V)
        self.n_succ = np.bincount(self.keys // V, minlength=V).astype(np.float64)
        self._table = None  # -log p of every bigram, when the vocabulary is small enough (<= 32 MB)
        if V * V <= 1 << 22:
            c = np.zeros(V * V)
            c[self.keys] = self.counts
            grid = np.arange(V * V)
            self._table = -np.log(self._p(grid // V, grid % V, c))
        # Mean surprisal of the fitted corpus, from the counts alone (no second pass).
        n = uni.sum()
        tot = float(first @ -np.log(self.p1))
        if len(self.keys):
            tot += float(self.counts @ -np.log(self._p(self.keys // V, self.keys % V, self.counts)))
        self.mean_surprisal = tot / n if n else 0.0
        return self

    def _p(self, prev: np.ndarray, cur: np.ndarray, c: np.ndarray) -> np.ndarray:
        cv = self.ctx[prev]
        safe = np.maximum(cv, 1.0)
        return np.where(
            cv > 0,
            np.maximum(c - self.D, 0.0) / safe + self.D * self.n_succ[prev] / safe * self.p1[cur],
            self.p1[cur],
        )

    def surprisal(self, tokens: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        """-log p of every token (nats). The first token, and those at the document `starts` of a
        flat array of several documents, are scored by the unigram model."""
        t = np.asarray(tokens, dtype=np.int64)
        out = np.empty(len(t), dtype=np.float64)
        if not len(t):
            return out
        out[0] = -math.log(self.p1[t[0]])
        if len(t) > 1:
            prev, cur = t[:-1], t[1:]
            k = prev * self.V + cur
            if self._table is not None:
                out[1:] = self._table[k]
            elif len(self.keys):
                idx = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
                c = np.where(self.keys[idx] == k, self.counts[idx], 0).astype(np.float64)
                out[1:] = -np.log(self._p(prev, cur, c))
            else:
                out[1:] = -np.log(self._p(prev, cur, np.zeros(len(k))))
        if starts is not None and len(starts):
            out[starts] = -np.log(self.p1[t[starts]])
        return out


class _Scorer:
    """Per-document mean negative log-likelihood (nats/token) under a reference model."""

    def nll(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class _NgramScorer(_Scorer):
    def __init__(self, tokenizer: Any, calib: Sequence[str]):
        self.tok = tokenizer
        docs = [np.array(e.ids) for e in tokenizer.encode_batch(list(calib))]
        self.lm = BigramLM(tokenizer.get_vocab_size()).fit(docs)

    def nll(self, texts: Sequence[str]) -> np.ndarray:
        encs = self.tok.encode_batch(list(texts))
        return np.array([self.lm.surprisal(np.array(e.ids)).mean() if e.ids else 0.0 for e in encs])


class _TorchScorer(_Scorer):
    """Scores with a causal LM `fn(idx) -> logits`, in chunks of `seq_len` tokens."""

    def __init__(self, fn: Any, tokenizer: Any, seq_len: int, batch_size: int = 16):
        self.fn, self.tok, self.seq_len, self.bs = fn, tokenizer, seq_len, batch_size

    def nll(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        encs = self.tok.encode_batch(list(texts))
        chunks: list[tuple[int, list[int]]] = []  # (doc index, seq_len+1 tokens overlapping by one)
        for i, e in enumerate(encs):
            ids = e.ids
            for s in range(0, max(len(ids) - 1, 0), self.seq_len):
                chunks.append((i, ids[s : s + self.seq_len + 1]))
        tot = np.zeros(len(texts))
        cnt = np.zeros(len(texts))
        with torch.inference_mode():
            for b in range(0, len(chunks), self.bs):
                batch = chunks[b : b + self.bs]
                L = max(len(c) for _, c in batch)
                x = torch.zeros((len(batch), L - 1), dtype=torch.long)
                y = torch.full((len(batch), L - 1), -1, dtype=torch.long)
                for j, (_, c) in enumerate(batch):
                    x[j, : len(c) - 1] = torch.tensor(c[:-1])
                    y[j, : len(c) - 1] = torch.tensor(c[1:])
                logits = self.fn(x).float()
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), y.clamp(min=0), reduction="none"
                ) * (y >= 0)
                for j, (i, c) in enumerate(batch):
                    tot[i] += float(nll[j].sum())
                    cnt[i] += len(c) - 1
        return tot / np.maximum(cnt, 1)


def _model_scorer(path: Path, data_dir: Path, tokenizer: Any) -> _Scorer:
    """A poisonlab run directory (scored with the data's tokenizer, which must match its vocabulary)
    or a local HF causal LM directory (scored with its own tokenizer.json when it has one)."""
    from poisonlab.evaluation.generation import LMAdapter
    from poisonlab.evaluation.loading import load_model

    loaded = load_model(path, data_dir=data_dir if (path / "config.yaml").is_file() else None)
    lm = LMAdapter(loaded.model)
    tok = loaded.tokenizer if loaded.kind == "hf" and loaded.tokenizer is not None else tokenizer
    return _TorchScorer(lm.logits, tok, min(lm.context or 1024, 1024))


@register_detector("perplexity")
class PerplexityFilter(Detector):
    description = "document perplexity under a reference model above a percentile of clean documents"

    def __init__(
        self,
        ref: str = "ngram",
        pct: float | None = 99.0,
        max_ppl: float | None = None,
        low_pct: float | None = None,
        min_ppl: float | None = None,
    ):
        if max_ppl is None and pct is None and low_pct is None and min_ppl is None:
            raise UserError("perplexity: give a threshold: pct, max_ppl, low_pct or min_ppl")
        for name, v in (("pct", pct), ("low_pct", low_pct)):
            if v is not None and not 0 < float(v) < 100:
                raise UserError(f"perplexity: {name} must be a percentile in (0, 100), got {v}")
        self.ref, self.pct, self.max_ppl = str(ref), pct, max_ppl
        self.low_pct, self.min_ppl = low_pct, min_ppl
        self._scorer: _Scorer | None = None
        self.hi = self.lo = None

    def fit(self, ctx: DefenseContext) -> None:
        calib = list(ctx.calib_texts)
        if self.ref == "ngram":
            if len(calib) < 2:
                raise UserError("perplexity (ref=ngram): needs clean calibration documents to fit on")
            # Fit on one half, set the threshold on the other: documents a bigram model was fitted on
            # look far more predictable than new ones, and the threshold must hold for new ones.
            half = len(calib) // 2
            self._scorer = _NgramScorer(ctx.tokenizer, calib[:half])
            calib = calib[half:]
        else:
            path = Path(self.ref)
            if not ((path / "config.yaml").is_file() or (path / "config.json").is_file()):
                raise UserError(
                    f"perplexity: ref {self.ref!r} is neither a poisonlab run dir nor an HF model dir"
                )
            self._scorer = _model_scorer(path, Path(ctx.data_dir), ctx.tokenizer)
        need_calib = self.max_ppl is None and self.pct is not None or self.min_ppl is None and self.low_pct
        calib_ppl = np.exp(self._scorer.nll(calib)) if need_calib else np.zeros(0)
        if need_calib and not len(calib_ppl):
            raise UserError("perplexity: percentile thresholds need clean calibration documents")
        self.hi = self.max_ppl if self.max_ppl is not None else (
            float(np.percentile(calib_ppl, self.pct)) if self.pct is not None else None
        )
        self.lo = self.min_ppl if self.min_ppl is not None else (
            float(np.percentile(calib_ppl, self.low_pct)) if self.low_pct is not None else None
        )

    def perplexities(self, texts: Sequence[str]) -> np.ndarray:
        if self._scorer is None:
            raise RuntimeError("perplexity filter: call fit() first")
        return np.exp(self._scorer.nll(texts))

    def detect(self, texts: Sequence[str]) -> list[Verdict]:
        out = []
        for p in self.perplexities(texts):
            if self.hi is not None and p > self.hi:
                out.append(Verdict(True, float(p), f"ppl>{self.hi:.4g}"))
            elif self.lo is not None and p < self.lo:
                out.append(Verdict(True, float(p), f"ppl<{self.lo:.4g}"))
            else:
                out.append(Verdict(False, float(p)))
        return out

    def info(self) -> dict[str, Any]:
        return {"ref": self.ref, "pct": self.pct, "low_pct": self.low_pct,
                "max_ppl": self.hi, "min_ppl": self.lo}
