"""Where the poisons land: a window of training, and a schedule that places each poison inside it.

`window_steps(cfg, S)` is the span of steps [w0, w1) that receives poisons (`placement.window`: all,
beginning, middle, end or a span of fractions; front/back are the beginning/end). A schedule is a
function `(cfg, n, steps, rng) -> (lo, hi)` registered with `@register_schedule("name")`, given the
window's length: poison i must be trained on in steps [w0 + lo[i], w0 + hi[i]). The stream then
inserts the poisons of each window at uniformly random document boundaries of the clean data that
falls in that window, and packs (see stream.py): `uniform` in the whole run is the paper's "inserted
uniformly at random into the pretraining data"; `clustered` puts `per_batch` poisons in each poisoned
batch (density), `every` one poisoned batch every `every` steps (frequency). Windows of different
poisons are either identical or disjoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonlab.config import BATCHED_SCHEDULES, PlacementConfig
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


def window_name(cfg: PlacementConfig) -> str:
    """all | beginning | middle | end | span (front and back are the beginning and the end)."""
    named = {"front": "beginning", "back": "end"}.get(cfg.schedule)
    if named:
        return named
    return "span" if isinstance(cfg.window, tuple) else cfg.window


def window_steps(cfg: PlacementConfig, total_steps: int) -> tuple[int, int]:
    """The steps [w0, w1) that receive poisons; never empty."""
    name, S = window_name(cfg), total_steps
    if name == "all":
        return 0, S
    if name == "span":
        a, b = cfg.window
        w0 = min(int(math.floor(a * S)), S - 1)
        return w0, max(w0 + 1, min(S, int(math.ceil(b * S))))
    w = min(S, max(1, int(math.ceil(cfg.fraction * S))))
    return {"beginning": (0, w), "end": (S - w, S), "middle": ((S - w) // 2, (S - w) // 2 + w)}[name]


def describe(cfg: PlacementConfig) -> dict[str, Any]:
    """The placement knobs as the metrics rows record them: `window` (a label with its share of the
    steps), `per_batch` (poisons per poisoned batch; None where each poison has its own random
    boundary) and `every` (steps between poisoned batches; None where they are not periodic)."""
    name = window_name(cfg)
    if name == "span":
        label = f"{cfg.window[0]:g}-{cfg.window[1]:g}"
    else:
        label = name if name == "all" else f"{name} {cfg.fraction:g}"
    return {"window": label, "per_batch": cfg.per_batch if cfg.schedule in BATCHED_SCHEDULES else None,
            "every": cfg.every if cfg.schedule == "every" else None}


@register_schedule("uniform")
def uniform(cfg: PlacementConfig, n: int, steps: int, rng: np.random.Generator):
    """Anywhere in the window: uniformly random document boundaries of the data it trains on."""
    return _full(n, 0), _full(n, steps)


# the window does the work: front = uniform in the beginning window, back = in the end window
register_schedule("front")(uniform)
register_schedule("back")(uniform)


@register_schedule("clustered")
def clustered(cfg: PlacementConfig, n: int, steps: int, rng: np.random.Generator):
    """`per_batch` poisons in each poisoned batch; the poisoned batches are uniform over the window."""
    k = cfg.per_batch
    n_batches = -(-n // k)
    if n_batches > steps:
        raise UserError(
            f"placement.per_batch: {n} poisons at {k} per batch need {n_batches} batches, "
            f"the window has {steps} steps"
        )
    at = np.repeat(np.sort(rng.choice(steps, size=n_batches, replace=False)), k)[:n]
    return at, at + 1


@register_schedule("every")
def every(cfg: PlacementConfig, n: int, steps: int, rng: np.random.Generator):
    """`per_batch` poisons in one batch every `every` steps, from a seeded offset in [0, every)."""
    m, k = cfg.every, cfg.per_batch
    n_batches = -(-n // k)
    if n_batches and (n_batches - 1) * m >= steps:
        raise UserError(
            f"placement.every: {n} poisons at {k} per batch, one batch every {m} steps, need "
            f"{(n_batches - 1) * m + 1} steps, the window has {steps}"
        )
    offset = int(rng.integers(0, m))
    if n_batches and offset + (n_batches - 1) * m >= steps:
        offset = 0
    at = np.repeat(offset + m * np.arange(n_batches, dtype=np.int64), k)[:n]
    return at, at + 1


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
    w0, w1 = window_steps(cfg, total_steps)
    rng = np.random.default_rng([cfg.seed, 0x706C6163])  # own stream, apart from other uses of the seed
    lo, hi = (np.asarray(a, dtype=np.int64) + w0 for a in fn(cfg, n, w1 - w0, rng))
    if lo.shape != (n,) or hi.shape != (n,) or (lo < w0).any() or (hi > w1).any() or (hi <= lo).any():
        raise ValueError(f"schedule {cfg.schedule!r} returned windows outside [0, {w1 - w0})")
    windows = np.unique(np.stack([lo, hi], 1), axis=0)  # sorted by lo
    if (windows[1:, 0] < windows[:-1, 1]).any():
        raise ValueError(f"schedule {cfg.schedule!r} returned overlapping windows")
    return Placement(lo, hi)
