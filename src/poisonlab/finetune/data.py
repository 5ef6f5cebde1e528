"""The fine-tuning stream: clean set + poisons in a seeded order, its ledger, and loss-masked batches.

Each epoch is a fresh permutation of the clean set (training seed) with the N poisons in slots drawn
by the schedule (placement seed): `uniform` over the whole epoch, `beginning` / `end` within the first /
last `window` share of it (at least N slots). Batches are consecutive runs of `batch_size` examples of
the concatenated epochs, so step s trains on examples [s*B, (s+1)*B). The ledger records every poison
exposure (epoch, position, step, poison id, prompt); `poisons_seen(k)` counts those with step < k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonlab.finetune.instructions import Example

IGNORE = -100  # label of prompt and padding tokens: no loss


def poison_slots(schedule: str, n: int, total: int, window: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions (of `total`) that hold the `n` poisons."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    span = total if schedule == "uniform" else max(n, math.ceil(window * total))
    picked = rng.choice(span, size=n, replace=False)
    if schedule == "end":
        picked = total - span + picked
    return np.sort(picked).astype(np.int64)


@dataclass
class FinetuneStream:
    order: list[int]  # example ids (into `examples`) in training order, all epochs
    examples: list[Example]  # the clean set, then the poisons
    n_clean: int
    batch_size: int
    ledger: list[dict[str, Any]]

    @property
    def steps(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def batch_ids(self, step: int) -> list[int]:
        return self.order[step * self.batch_size : (step + 1) * self.batch_size]

    def poisons_seen(self, steps_done: int) -> int:
        return sum(1 for r in self.ledger if r["step"] < steps_done)

    def write_ledger(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from poisonlab.fsutil import atomic_path

        cols = ("epoch", "position", "step", "poison_id", "prompt")
        table = pa.table(
            {c: [r[c] for r in self.ledger] for c in cols},
            schema=pa.schema(
                [
                    ("epoch", pa.int32()),
                    ("position", pa.int64()),
                    ("step", pa.int64()),
                    ("poison_id", pa.int32()),
                    ("prompt", pa.string()),
                ]
            ),
        )
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)


def build_stream(
    clean: Sequence[Example],
    poisons: Sequence[Example],
    *,
    epochs: int,
    batch_size: int,
    schedule: str,
    window: float,
    train_seed: int,
    placement_seed: int,
) -> FinetuneStream:
    examples = list(clean) + list(poisons)
    c, n = len(clean), len(poisons)
    order: list[int] = []
    ledger: list[dict[str, Any]] = []
    for epoch in range(epochs):
        clean_order = np.random.default_rng([train_seed, epoch]).permutation(c)
        rng = np.random.default_rng([placement_seed, epoch, 1])
        slots = set(poison_slots(schedule, n, c + n, window, rng).tolist())
        poison_order = iter(rng.permutation(n).tolist())
        clean_iter = iter(clean_order.tolist())
        for pos in range(c + n):
            at = len(order)
            if pos in slots:
                pid = next(poison_order)
                order.append(c + pid)
                ledger.append(
                    {
                        "epoch": epoch,
                        "position": at,
                        "step": at // batch_size,
                        "poison_id": pid,
                        "prompt": poisons[pid].prompt,
                    }
                )
            else:
                order.append(next(clean_iter))
    return FinetuneStream(order, examples, c, batch_size, ledger)


def encode_all(examples: Sequence[Example], template: Any, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: labels copy the response tokens, IGNORE elsewhere; cut at max_len."""
    out = []
    for ex in examples:
        p, r = template.example(ex.prompt, ex.response)
        ids = (p + r)[:max_len]
        labels = ([IGNORE] * len(p) + r)[:max_len]
        out.append((ids, labels))
    return out


def collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (IGNORE on padding)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
