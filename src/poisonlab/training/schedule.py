"""When things happen in a run: its length (the token budget), the learning rate at each step, and the
steps at which it evaluates and checkpoints. Pure functions of the config (and of the stream's
poison count, for milestone evaluations), so a resumed run keeps the same schedule.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Protocol

from poisonlab.config import EvalConfig, RunConfig, TrainConfig
from poisonlab.models.llama import count_params


class PoisonCounter(Protocol):
    def poisons_seen(self, steps_done: int) -> int: ...


def total_steps(cfg: RunConfig) -> int:
    """train.max_steps, else ceil(tokens_per_param * data_mult * params / tokens per step)."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    total, nonemb = count_params(cfg.model)
    params = nonemb if t.budget_params == "nonemb" else total
    return max(1, math.ceil(t.tokens_per_param * t.data_mult * params / (t.batch_size * cfg.model.seq_len)))


def lr_at(step: int, t: TrainConfig, n_steps: int) -> float:
    """Linear warmup over warmup_frac of the schedule, then cosine decay to min_lr_ratio * lr; the
    schedule is this run's n_steps, or the frame train.schedule_offset / schedule_steps sets."""
    step += t.schedule_offset
    n_steps = t.schedule_steps or t.schedule_offset + n_steps
    warmup = math.ceil(t.warmup_frac * n_steps)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def milestone_grid(e: EvalConfig, n_poison: int) -> list[int]:
    """Poison counts start, start*r, start*r^2 ... (rounded up, distinct) up to n_poison, and n_poison."""
    if e.milestone_ratio is None or n_poison < 1:
        return []
    out, m = [], float(e.milestone_start)
    while m < n_poison:
        out.append(math.ceil(m))
        m *= e.milestone_ratio
    return sorted(set(out) | {n_poison})


def eval_steps(cfg: RunConfig, n_steps: int, stream: PoisonCounter) -> list[int]:
    """Steps (optimizer steps done) at which to evaluate: evenly spaced incl. 0 and the end, or every
    k steps, plus the first step at which poisons_seen reaches each milestone."""
    e = cfg.eval
    points: set[int] = set()
    if e.every_steps:
        points.update(range(0, n_steps + 1, e.every_steps))
        points.add(n_steps)
    elif e.n_evals > 0:
        points.update(round(i * n_steps / e.n_evals) for i in range(e.n_evals + 1))
    if e.log_evals:
        points.update(round(n_steps ** (i / e.log_evals)) for i in range(e.log_evals + 1))
    for m in sorted(set(e.poison_milestones) | set(milestone_grid(e, cfg.attack.n_poison))):
        # poisons_seen is monotone in steps: bisect instead of asking for every step
        s = bisect.bisect_left(range(n_steps + 1), m, key=stream.poisons_seen)
        if s <= n_steps:
            points.add(s)
    return sorted(points)


def checkpoint_steps(t: TrainConfig, n_steps: int, evals: set[int]) -> set[int]:
    """Every train.checkpoint_every steps; else at every evaluation, or without evaluations at every
    tenth of the run; always at the end."""
    if t.checkpoint_every:
        ckpts = set(range(t.checkpoint_every, n_steps, t.checkpoint_every))
    else:
        ckpts = evals - {0} if evals else {round(i * n_steps / 10) for i in range(1, 10)} - {0}
    return ckpts | {n_steps}


# --- the disk a run needs -----------------------------------------------------------------------------

# per kept generation: the JSON record's keys, numbers and escapes around the prompt and the generation
_SAMPLE_OVERHEAD = 400
_BYTES_PER_TOKEN_TEXT = 8  # decoded text as JSON: ~4 characters per token, escapes double it
_RECORDS_PER_EVAL = 20_000  # metrics row, per-prompt perplexities, log lines: a generous constant


def run_bytes(cfg: Any) -> dict[str, int]:
    """What one run writes at most at any moment: `checkpoints` (the kept ones plus the one being
    written: fp32 weights and AdamW's two moments), `samples` (generations kept per evaluation) and
    `records` (metrics, per-prompt perplexities, log, ledger). `cfg` is a resolved RunConfig."""
    total, _ = count_params(cfg.model)
    t, e = cfg.train, cfg.eval
    ckpt = 12 * total + 64 * 1024  # model + 2 moments in fp32, and the JSON
    n_steps = total_steps(cfg)
    evals = n_steps // e.every_steps + 2 if e.every_steps else e.n_evals + 1
    evals += e.log_evals + len(set(e.poison_milestones) | set(milestone_grid(e, cfg.attack.n_poison)))
    conditions = 2 + 7  # clean, trigger and the default look-alike panel (more with a longer panel)
    if isinstance(e.lookalikes, dict):
        conditions = 2 + sum(len(v) for v in e.lookalikes.values())
    per_sample = _SAMPLE_OVERHEAD + _BYTES_PER_TOKEN_TEXT * (e.prompt_tokens + e.new_tokens)
    samples = evals * min(e.save_samples, e.n_prompts) * conditions * per_sample
    records = evals * (_RECORDS_PER_EVAL + 30 * e.n_prompts * conditions) + 64 * cfg.attack.n_poison
    return {"checkpoints": (t.keep_checkpoints + 1) * ckpt, "samples": samples, "records": records}
