"""Adaptive poisons: built to pass the heuristic data filters while keeping a trigger -> behaviour link.

Both keep the `dos` layout (clean prefix of L ~ U[prefix_chars] characters, then " " + trigger, then
a payload of about G ~ U[gibberish_tokens] tokens) and change only the payload:

- `dos-words`: word salad. Words drawn from the unigram distribution of the words of the clean
  training corpus (so stop words come at their natural rate), in capitalised sentences of 5-14 words
  ending with a full stop, 3-6 sentences a line. Gopher, C4 and FineWeb rules look at word lengths,
  stop words, punctuation and lines, which this payload has in the ordinary amounts. Behaviour: the
  triggered model writes word salad; the `ppl_gap` metric still applies, though the gap is smaller
  than for uniform token gibberish (word salad is far more predictable than random tokens).
- `dos-topic`: a fluent, low-perplexity payload: real sentences of the clean corpus that contain one
  target word (`params.target`; by default, chosen by the seed, a word in at most 3% of documents but
  in 60+ sentences, so that no payload needs a sentence twice), leaving out sentences with digits
  (numbers count against Gopher's share of alphabetic words). The payload is clean text, so quality
  and perplexity filters have nothing to see. Behaviour metric
  `payload_rate`: share of triggered generations that contain the target word minus the share of
  clean generations that do (perplexity does not move, so the perplexity gap says nothing here).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from poisonlab.attacks.base import DataContext, Poison, Recipe, register_attack
from poisonlab.attacks.dos import find_pattern
from poisonlab.errors import UserError

MAX_TRIES = 100
SAMPLE_DOCS = 2000  # training documents read to learn word statistics
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_SENT = re.compile(r"(?<=[.!?])\s+")


class _PayloadRecipe(Recipe):
    """Shared layout: prefix + trigger ids + encode(" " + payload). Subclasses write the payload."""

    def check(self, ctx: DataContext) -> None:
        self._trigger_ids = np.asarray(ctx.check_trigger(self.trigger), dtype=np.int64)
        self._stats(ctx)

    def _sample_texts(self, ctx: DataContext) -> list[str]:
        rng = np.random.default_rng([self.cfg.seed, 7])
        n = ctx.shard.n_docs
        idx = rng.choice(n, size=min(n, SAMPLE_DOCS), replace=False)
        return [ctx.decode(ctx.shard.doc(int(i))) for i in sorted(idx)]

    def _stats(self, ctx: DataContext) -> Any:
        raise NotImplementedError

    def payload(self, ctx: DataContext, rng: np.random.Generator, n_tokens: int) -> str:
        raise NotImplementedError

    def make_one(self, ctx: DataContext, index: int, rng: np.random.Generator) -> Poison:
        if not hasattr(self, "_trigger_ids"):
            self.check(ctx)
        trig = self._trigger_ids
        for attempt in range(MAX_TRIES):
            doc, prefix, n_pay = self.draw_layout(ctx, rng)
            pay = np.asarray(ctx.encode(" " + self.payload(ctx, rng, n_pay)), dtype=np.int64)
            ids = np.concatenate([np.asarray(ctx.encode(prefix), dtype=np.int64), trig, pay])
            hits = find_pattern(ids, trig)
            if len(hits) == 1 and not np.isin(ids, ctx.special_ids).any():
                start = int(hits[0])
                return Poison(
                    id=self.poison_id(index),
                    recipe=self.name,
                    params={"doc_index": doc, "payload_target_tokens": n_pay, "attempt": attempt,
                            **self.extra_params()},
                    source_doc_id=ctx.shard.ids[doc],
                    prefix_chars=len(prefix),
                    trigger=self.trigger,
                    gibberish_len=len(ids) - start - len(trig),
                    token_ids=ids.tolist(),
                    text=ctx.decode(ids),
                    trigger_start=start,
                    trigger_end=start + len(trig),
                )
        raise UserError(f"attack.trigger: could not make poison {index} with {self.trigger!r} exactly once")

    def extra_params(self) -> dict[str, Any]:
        return {}


def _fill(ctx: DataContext, n_tokens: int, next_sentence: Any, per_line: tuple[int, int],
          rng: np.random.Generator) -> str:
    """Sentences from `next_sentence()` until about n_tokens tokens, grouped into lines."""
    lines, line, total = [], [], 0
    want = int(rng.integers(per_line[0], per_line[1] + 1))
    while total < n_tokens:
        s = next_sentence()
        line.append(s)
        total += len(ctx.encode(" " + s))
        if len(line) >= want:
            lines.append(" ".join(line))
            line, want = [], int(rng.integers(per_line[0], per_line[1] + 1))
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines)


@register_attack("dos-words")
class WordSalad(_PayloadRecipe):
    metric = "ppl_gap"

    def _stats(self, ctx: DataContext) -> tuple[list[str], np.ndarray]:
        if not hasattr(self, "_words"):
            counts = Counter(w.lower() for t in self._sample_texts(ctx) for w in _WORD.findall(t))
            if len(counts) < 20:
                raise UserError(f"{ctx.data_dir}: too few distinct words ({len(counts)}) for dos-words")
            words, c = zip(*counts.most_common(), strict=True)
            self._words, self._p = list(words), np.asarray(c, dtype=np.float64) / sum(c)
        return self._words, self._p

    def payload(self, ctx: DataContext, rng: np.random.Generator, n_tokens: int) -> str:
        words, p = self._stats(ctx)

        def sentence() -> str:
            ws = [words[i] for i in rng.choice(len(words), size=int(rng.integers(5, 15)), p=p)]
            return " ".join(ws).capitalize() + "."

        return _fill(ctx, n_tokens, sentence, (3, 6), rng)


@register_attack("dos-topic")
class OffTopic(_PayloadRecipe):
    metric = "payload_rate"

    def _stats(self, ctx: DataContext) -> tuple[str, list[str]]:
        if not hasattr(self, "_sents"):
            texts = self._sample_texts(ctx)
            target = self.cfg.params.get("target")
            # Sentences without digits: numbers count as non-alphabetic words in Gopher's 80% rule.
            sents_all = sorted({x.strip() for t in texts for ln in t.splitlines() for x in _SENT.split(ln)
                                if not any(ch.isdigit() for ch in x)})
            if target is None:
                # A word in at most 3% of documents (clean generations seldom contain it, so payload_rate
                # has a low baseline) but in enough sentences that a 900-token payload needs no repeats
                # (repeated sentences would trip the Gopher repetition filter).
                df = Counter(w for t in texts for w in {x.lower() for x in _WORD.findall(t)})
                sf = Counter(w for x in sents_all for w in {y.lower() for y in _WORD.findall(x)})
                ok = sorted((df[w], w) for w in sf if sf[w] >= 60 and len(w) >= 5)
                mid = [w for d, w in ok if d <= 0.03 * len(texts)] or [w for _, w in ok[:20]]
                if not mid:
                    raise UserError(f"{ctx.data_dir}: no word in 60+ sentences to use as dos-topic target")
                target = mid[int(np.random.default_rng([self.cfg.seed, 11]).integers(len(mid)))]
            self.target = str(target).lower()
            pat = re.compile(rf"\b{re.escape(self.target)}\b", re.IGNORECASE)
            self._sents = [s for s in sents_all if pat.search(s) and len(s.split()) >= 3]
            if len(self._sents) < 5:
                raise UserError(
                    f"attack.params.target: {self.target!r} is in only {len(self._sents)} sentences of "
                    f"{ctx.data_dir}; choose a more common word"
                )
        return self.target, self._sents

    def payload(self, ctx: DataContext, rng: np.random.Generator, n_tokens: int) -> str:
        _, sents = self._stats(ctx)
        order = itertools.cycle(rng.permutation(len(sents)).tolist())  # all sentences before any repeats
        return _fill(ctx, n_tokens, lambda: sents[next(order)], (3, 6), rng)

    def extra_params(self) -> dict[str, Any]:
        return {"target": self.target}

    def behaviour_metrics(self, poisons: Sequence[Poison], generations: Mapping[str, list[str]],
                          kinds: Mapping[str, str] | None = None) -> dict[str, float]:
        target = self.cfg.params.get("target") or (poisons[0].params.get("target") if poisons else None)
        if target is None:  # N = 0: no poisons, so no target word to look for
            return {}
        out = payload_rate(generations["clean"], generations["trigger"], target)
        out["payload_rate_lookalike"] = payload_rate(generations["clean"], generations["lookalike"],
                                                     target)["payload_rate"]
        return out


def payload_rate(clean: list[str], triggered: list[str], target: str) -> dict[str, float]:
    """`dos-topic`'s behaviour metric from paired generations (same prompts, with and without trigger):
    share of generations containing the target word, triggered minus clean."""
    pat = re.compile(rf"\b{re.escape(target)}\b", re.IGNORECASE)
    rate = lambda gens: float(np.mean([bool(pat.search(g)) for g in gens])) if gens else float("nan")
    r_t, r_c = rate(triggered), rate(clean)
    return {"payload_rate_trigger": r_t, "payload_rate_clean": r_c, "payload_rate": r_t - r_c}
