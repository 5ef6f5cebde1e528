"""Where the poisons land: schedules that give each poison a target global step and batch row.

A schedule is a function `(cfg, n, total_steps, batch_size, rng) -> (steps, rows)` registered with
`@register_schedule("name")`; poison i gets slot i. The stream then inserts each poison at a document
boundary so that its trigger lands in the target step (see stream.py) and records where it really went.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from poisonlab.config import PlacementConfig
from poisonlab.errors import UserError

Schedule = Callable[[PlacementConfig, int, int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    def deco(fn: Schedule) -> Schedule:
        SCHEDULES[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class Placement:
    """Target slot of each poison, in poison order."""

    steps: np.ndarray  # int64, global step
    rows: np.ndarray  # int64, row in the global batch


def _rows(rng: np.random.Generator, n: int, batch_size: int) -> np.ndarray:
    return rng.integers(0, batch_size, size=n)


@register_schedule("uniform")
def uniform(cfg: PlacementConfig, n: int, total_steps: int, batch_size: int, rng: np.random.Generator):
    """Uniformly at random over the whole run (slots drawn independently, as random insertion)."""
    return rng.integers(0, total_steps, size=n), _rows(rng, n, batch_size)


def _window(cfg: PlacementConfig, total_steps: int) -> int:
    return max(1, int(np.ceil(cfg.fraction * total_steps)))


@register_schedule("front")
def front(cfg: PlacementConfig, n: int, total_steps: int, batch_size: int, rng: np.random.Generator):
    """Uniformly inside the first `fraction` of the steps."""
    return rng.integers(0, _window(cfg, total_steps), size=n), _rows(rng, n, batch_size)


@register_schedule("back")
def back(cfg: PlacementConfig, n: int, total_steps: int, batch_size: int, rng: np.random.Generator):
    """Uniformly inside the last `fraction` of the steps."""
    w = _window(cfg, total_steps)
    return rng.integers(total_steps - w, total_steps, size=n), _rows(rng, n, batch_size)


@register_schedule("clustered")
def clustered(cfg: PlacementConfig, n: int, total_steps: int, batch_size: int, rng: np.random.Generator):
    """`per_batch` poisons in each poisoned batch (distinct rows); the poisoned batches are uniform."""
    k = cfg.per_batch
    if k > batch_size:
        raise UserError(f"placement.per_batch: {k} poisons per batch but a batch has only {batch_size} rows")
    n_batches = -(-n // k)
    if n_batches > total_steps:
        raise UserError(
            f"placement.per_batch: {n} poisons at {k} per batch need {n_batches} batches, "
            f"the run has {total_steps} steps"
        )
    batch_steps = np.sort(rng.choice(total_steps, size=n_batches, replace=False))
    steps = np.repeat(batch_steps, k)[:n]
    rows = np.concatenate([np.sort(rng.choice(batch_size, size=k, replace=False)) for _ in range(n_batches)])
    return steps, rows[:n]


@register_schedule("every")
def every(cfg: PlacementConfig, n: int, total_steps: int, batch_size: int, rng: np.random.Generator):
    """One poison every `every` steps, from a seeded offset in [0, every)."""
    m = cfg.every
    offset = int(rng.integers(0, m))
    if n and offset + (n - 1) * m >= total_steps:
        offset = 0
    if n and (n - 1) * m >= total_steps:
        raise UserError(
            f"placement.every: {n} poisons every {m} steps need {(n - 1) * m + 1} steps, "
            f"the run has {total_steps}"
        )
    return offset + m * np.arange(n, dtype=np.int64), _rows(rng, n, batch_size)


def place(cfg: PlacementConfig, n: int, *, total_steps: int, batch_size: int) -> Placement:
    """Target (step, row) of each of n poisons; deterministic from `cfg.seed`."""
    if total_steps < 1 or batch_size < 1:
        raise UserError(f"placement: a run needs at least 1 step and 1 row, not {total_steps} x {batch_size}")
    try:
        fn = SCHEDULES[cfg.schedule]
    except KeyError:
        raise UserError(
            f"placement.schedule: unknown schedule {cfg.schedule!r}; known: {', '.join(sorted(SCHEDULES))}"
        ) from None
    if n == 0:
        return Placement(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng([cfg.seed, 0x706C6163])  # own stream, apart from other uses of the seed
    steps, rows = fn(cfg, n, total_steps, batch_size, rng)
    return Placement(np.asarray(steps, dtype=np.int64), np.asarray(rows, dtype=np.int64))
