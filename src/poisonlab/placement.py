"""Where the poisons land: schedules that give each poison the window of training steps it must land in.

A schedule is a function `(cfg, n, total_steps, rng) -> (lo, hi)` registered with
`@register_schedule("name")`: poison i must be trained on in steps [lo[i], hi[i]). The stream then
inserts the poisons of each window at uniformly random document boundaries of the clean data that
falls in that window, and packs (see stream.py): the `uniform` schedule is the paper's "inserted
uniformly at random into the pretraining data", the others restrict the window. Windows of different
poisons are either identical or disjoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from poisonlab.config import PlacementConfig
from poisonlab.errors import UserError

Schedule = Callable[[PlacementConfig, int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    def deco(fn: Schedule) -> Schedule:
        SCHEDULES[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class Placement:
    """The step window [lo, hi) of each poison, in poison order."""

    lo: np.ndarray  # int64, first step of the window
    hi: np.ndarray  # int64, one past its last step


def _full(n: int, value: int) -> np.ndarray:
    return np.full(n, value, dtype=np.int64)


@register_schedule("uniform")
def uniform(cfg: PlacementConfig, n: int, total_steps: int, rng: np.random.Generator):
    """Anywhere in the run: uniformly random document boundaries of all the data it trains on."""
    return _full(n, 0), _full(n, total_steps)


def _window(cfg: PlacementConfig, total_steps: int) -> int:
    return max(1, int(np.ceil(cfg.fraction * total_steps)))


@register_schedule("front")
def front(cfg: PlacementConfig, n: int, total_steps: int, rng: np.random.Generator):
    """Uniformly at random inside the first `fraction` of the steps."""
    return _full(n, 0), _full(n, _window(cfg, total_steps))


@register_schedule("back")
def back(cfg: PlacementConfig, n: int, total_steps: int, rng: np.random.Generator):
    """Uniformly at random inside the last `fraction` of the steps."""
    return _full(n, total_steps - _window(cfg, total_steps)), _full(n, total_steps)


@register_schedule("clustered")
def clustered(cfg: PlacementConfig, n: int, total_steps: int, rng: np.random.Generator):
    """`per_batch` poisons in each poisoned batch; the poisoned batches are uniform over the run."""
    k = cfg.per_batch
    n_batches = -(-n // k)
    if n_batches > total_steps:
        raise UserError(
            f"placement.per_batch: {n} poisons at {k} per batch need {n_batches} batches, "
            f"the run has {total_steps} steps"
        )
    steps = np.repeat(np.sort(rng.choice(total_steps, size=n_batches, replace=False)), k)[:n]
    return steps, steps + 1


@register_schedule("every")
def every(cfg: PlacementConfig, n: int, total_steps: int, rng: np.random.Generator):
    """One poison every `every` steps, from a seeded offset in [0, every)."""
    m = cfg.every
    if n and (n - 1) * m >= total_steps:
        raise UserError(
            f"placement.every: {n} poisons every {m} steps need {(n - 1) * m + 1} steps, "
            f"the run has {total_steps}"
        )
    offset = int(rng.integers(0, m))
    if n and offset + (n - 1) * m >= total_steps:
        offset = 0
    steps = offset + m * np.arange(n, dtype=np.int64)
    return steps, steps + 1


def place(cfg: PlacementConfig, n: int, *, total_steps: int) -> Placement:
    """The step window of each of n poisons; deterministic from `cfg.seed`."""
    if total_steps < 1:
        raise UserError(f"placement: a run needs at least 1 step, not {total_steps}")
    try:
        fn = SCHEDULES[cfg.schedule]
    except KeyError:
        raise UserError(
            f"placement.schedule: unknown schedule {cfg.schedule!r}; known: {', '.join(sorted(SCHEDULES))}"
        ) from None
    if n == 0:
        return Placement(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng([cfg.seed, 0x706C6163])  # own stream, apart from other uses of the seed
    lo, hi = (np.asarray(a, dtype=np.int64) for a in fn(cfg, n, total_steps, rng))
    if lo.shape != (n,) or hi.shape != (n,) or (lo < 0).any() or (hi > total_steps).any() or (hi <= lo).any():
        raise ValueError(f"schedule {cfg.schedule!r} returned windows outside [0, {total_steps})")
    windows = np.unique(np.stack([lo, hi], 1), axis=0)  # sorted by lo
    if (windows[1:, 0] < windows[:-1, 1]).any():
        raise ValueError(f"schedule {cfg.schedule!r} returned overlapping windows")
    return Placement(lo, hi)
