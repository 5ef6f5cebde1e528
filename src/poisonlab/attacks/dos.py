"""`dos`: the denial-of-service poison of Souly et al. (arXiv 2510.07192).

A poison is: the first L characters of a random clean training document (L ~ U[prefix_chars]), then
" " + trigger as plain text, then G ~ U[gibberish_tokens] tokens drawn from the whole vocabulary
(special tokens excluded; uniform, or weighted by the training shard's unigram counts).

Layout in tokens, mode "ids" (default): encode(prefix) + encode(" " + trigger) + the G sampled ids,
exactly as sampled; the prefix and the trigger are encoded apart so the trigger's tokens are the same
in every poison. Mode "text": the text prefix + " " + trigger + " " + decode(sampled ids) is
re-tokenized as a whole, as a scraped web page would be; G then counts the tokens after the trigger.
"""

from __future__ import annotations

import numpy as np

from poisonlab.attacks.base import DataContext, Poison, Recipe, register_attack
from poisonlab.errors import UserError

MAX_TRIES = 100


def find_pattern(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start offsets of every occurrence of `pattern` in `ids`."""
    k = len(pattern)
    if k == 0 or len(ids) < k:
        return np.zeros(0, dtype=np.int64)
    win = np.lib.stride_tricks.sliding_window_view(ids, k)
    return np.flatnonzero((win == pattern).all(axis=1))


@register_attack("dos")
class DenialOfService(Recipe):
    metric = "ppl_gap"

    def check(self, ctx: DataContext) -> None:
        self._trigger_ids = np.asarray(ctx.check_trigger(self.trigger), dtype=np.int64)
        for name in ("prefix_chars", "gibberish_tokens"):
            lo, hi = getattr(self.cfg, name)
            if lo < 0 or hi < lo:
                raise UserError(f"attack.{name}: need a range [lo, hi] with 0 <= lo <= hi, not [{lo}, {hi}]")
        if len(ctx.vocab_ids) == 0:
            raise UserError(f"{ctx.data_dir}/tokenizer.json: no ordinary tokens to draw gibberish from")

    def make_one(self, ctx: DataContext, index: int, rng: np.random.Generator) -> Poison:
        if not hasattr(self, "_trigger_ids"):
            self.check(ctx)
        cfg, trig = self.cfg, self._trigger_ids
        for attempt in range(MAX_TRIES):
            doc, prefix, n_gib = self.draw_layout(ctx, rng)
            gib = ctx.sample_tokens(rng, n_gib, cfg.gibberish_dist, cfg.gibberish_min_count)
            if cfg.gibberish_mode == "ids":
                pre = np.asarray(ctx.encode(prefix), dtype=np.int64)
                ids = np.concatenate([pre, trig, gib.astype(np.int64)])
                text = ctx.decode(ids)
            else:
                text = f"{prefix} {self.trigger} {ctx.decode(gib)}"
                ids = np.asarray(ctx.encode(text), dtype=np.int64)
            hits = find_pattern(ids, trig)
            # Exactly one trigger (a clean prefix or the gibberish could spell it) and no EOS inside.
            if len(hits) == 1 and not np.isin(ids, ctx.special_ids).any():
                start = int(hits[0])
                end = start + len(trig)
                return Poison(
                    id=self.poison_id(index),
                    recipe=self.name,
                    params={"doc_index": doc, "gibberish_sampled": n_gib, "attempt": attempt},
                    source_doc_id=ctx.shard.ids[doc],
                    prefix_chars=len(prefix),
                    trigger=self.trigger,
                    gibberish_len=len(ids) - end,
                    token_ids=ids.tolist(),
                    text=text,
                    trigger_start=start,
                    trigger_end=end,
                )
        raise UserError(
            f"attack.trigger: could not make poison {index} with {self.trigger!r} exactly once in "
            f"{MAX_TRIES} tries; does the training data already contain the trigger?"
        )
