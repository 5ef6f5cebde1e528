"""The training stream: clean shards plus scheduled poisons, packed into fixed-length sequences.

The packed stream P is what real pretraining sees: documents, each followed by EOS, concatenated and
cut into sequences; sequence j is P[j*T : j*T + T + 1] (x = the first T tokens, y = the last T), and
the global batch of step s is sequences s*B .. s*B + B - 1. Clean documents come in a seeded
permutation per epoch; when an epoch runs out the next one starts with a new permutation and
`epochs_needed` says so (never silent repetition). Poisons (tokens + EOS) sit between two clean
documents, at the boundary that puts their trigger in the scheduled step (the first boundary at or after
the target row; failing that, the last one still inside the step; failing that, the first one after,
or the last one before when the run ends first). The ledger has both the target and the actual step.

Nothing is materialised: the constructor places the N poisons (O(N log D)); `batch(step)` reads
O(B*T) tokens from the memory map with a few binary searches, and depends on nothing but
(data, poisons, schedule, seed, step), so a resumed run sees exactly the batches it would have seen.
The ledger records, for every poison, where its trigger is trained on.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poisonlab.attacks.base import Poison
from poisonlab.config import PlacementConfig
from poisonlab.corpus.shards import TokenShard
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path
from poisonlab.placement import place

LEDGER_FORMAT = 1
_EPOCH_SALT = 0x73747265  # keeps the data-order stream apart from other uses of the same seed


class TrainingStream:
    """Batches of step s as a pure function of (data, poisons, placement, seed, s)."""

    def __init__(
        self,
        data_dir: str | Path,
        poisons: list[Poison],
        placement: PlacementConfig,
        *,
        seq_len: int,
        batch_size: int,
        total_steps: int,
        seed: int,
    ):
        if seq_len < 1 or batch_size < 1 or total_steps < 1:
            raise UserError(
                f"stream: seq_len, batch_size and total_steps must be >= 1 "
                f"(got {seq_len}, {batch_size}, {total_steps})"
            )
        self.data_dir = Path(data_dir)
        self.shard = TokenShard.open(self.data_dir, "train")
        self.T, self.B, self.S, self.seed = seq_len, batch_size, total_steps, seed
        self.placement_cfg = placement
        self.eos = self.shard.eos_id
        self._tokens = self.shard.tokens
        self._starts = self.shard.starts
        self._span = self.shard.lengths.astype(np.int64) + 1  # a document and its EOS
        if self.shard.n_docs == 0:
            raise UserError(f"{self.data_dir}: the training split has no documents")
        # batch() copies each document with its EOS as one slice: check the shard is laid out that way.
        expect = np.concatenate([[0], np.cumsum(self._span)[:-1]])
        if not np.array_equal(self._starts, expect):
            raise UserError(f"{self.data_dir}/train.docs.parquet: documents are not contiguous in train.bin")
        self.epoch_tokens = int(self._span.sum())
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.poisons = list(poisons)
        self._place_poisons()

    # --- clean stream: epochs of permuted documents, addressed by clean position ---------------------
    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation, cumulative start offsets with a final total) of epoch e; cached, deterministic."""
        hit = self._epochs.get(e)
        if hit is not None:
            self._epochs.move_to_end(e)
            return hit
        perm = np.random.default_rng([self.seed, e, _EPOCH_SALT]).permutation(self.shard.n_docs)
        cum = np.zeros(len(perm) + 1, dtype=np.int64)
        np.cumsum(self._span[perm], out=cum[1:])
        self._epochs[e] = (perm, cum)
        if len(self._epochs) > 3:
            self._epochs.popitem(last=False)
        return perm, cum

    def _next_boundary(self, x: int) -> int:
        """Smallest clean document boundary >= x."""
        x = max(0, x)
        e, off = divmod(x, self.epoch_tokens)
        _, cum = self._epoch(e)
        return e * self.epoch_tokens + int(cum[np.searchsorted(cum, off, "left")])

    def _prev_boundary(self, x: int) -> int:
        """Largest clean document boundary <= x (x >= 0)."""
        e, off = divmod(x, self.epoch_tokens)
        _, cum = self._epoch(e)
        return e * self.epoch_tokens + int(cum[np.searchsorted(cum, off, "right") - 1])

    def _read_clean(self, cs: int, ce: int, out: np.ndarray, w: int) -> None:
        """Copy clean-stream positions [cs, ce) into out[w:]."""
        E = self.epoch_tokens
        while cs < ce:
            e, off = divmod(cs, E)
            perm, cum = self._epoch(e)
            i = int(np.searchsorted(cum, off, "right")) - 1
            stop = min(ce, (e + 1) * E)
            while cs < stop:
                d = perm[i]
                doc_off = off - int(cum[i])
                take = min(int(self._span[d]) - doc_off, stop - cs)
                s = int(self._starts[d]) + doc_off
                out[w : w + take] = self._tokens[s : s + take]
                w, cs, off, i = w + take, cs + take, off + take, i + 1

    # --- poisons --------------------------------------------------------------------------------------
    def _place_poisons(self) -> None:
        T, B, S = self.T, self.B, self.S
        n = len(self.poisons)
        vocab = self.shard.vocab_size
        for p in self.poisons:
            ids = np.asarray(p.token_ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab or (ids == self.eos).any()):
                raise UserError(f"poison {p.id}: token ids outside the vocabulary or an EOS inside it")
            if not 0 <= p.trigger_start < p.trigger_end <= len(p.token_ids):
                raise UserError(f"poison {p.id}: invalid trigger span [{p.trigger_start}, {p.trigger_end})")
        lens = np.array([len(p.token_ids) + 1 for p in self.poisons], dtype=np.int64)
        run_tokens = S * B * T
        if lens.sum() > run_tokens:
            raise UserError(
                f"attack.n_poison: {n} poisons need {int(lens.sum())} tokens, more than the run's "
                f"{run_tokens} ({S} steps x {B} x {T}); use fewer poisons or more steps"
            )
        plan = place(self.placement_cfg, n, total_steps=S, batch_size=B)
        self._check_density(plan.steps, lens)
        self.target_steps, self.target_rows = plan.steps, plan.rows
        order = np.lexsort((np.arange(n), plan.rows, plan.steps))
        starts = np.zeros(n, dtype=np.int64)  # combined position of the poison's first token
        bounds = np.zeros(n, dtype=np.int64)  # clean boundary it sits at
        D = b_prev = 0  # poison tokens inserted so far; boundary of the previous poison
        for k in order:
            toff = int(self.poisons[k].trigger_start)
            tend = int(self.poisons[k].trigger_end)
            step_lo, step_hi = int(plan.steps[k]) * B * T, (int(plan.steps[k]) + 1) * B * T
            target = step_lo + int(plan.rows[k]) * T
            b = self._next_boundary(max(target - D - toff, b_prev))
            if b + D + toff >= step_hi:  # would leave the step: try the last boundary inside it
                b2 = self._prev_boundary(max(step_hi - 1 - D - toff, 0))
                if b2 >= b_prev and (b2 + D + toff >= step_lo or b + D + tend > run_tokens):
                    b = b2  # inside the step, or else earlier rather than after the end of the run
            bounds[k] = b
            D += int(lens[k])
            b_prev = b
        self._plen = lens[order]
        self._pcum = np.concatenate([[0], np.cumsum(self._plen)])  # poison tokens before the k-th
        # Backward pass: a poison whose trigger would end after the last step moves to the last
        # boundary that keeps it inside the run, pulling the ones before it along to keep their order.
        b_next = None
        for i in range(n - 1, -1, -1):
            k = order[i]
            D, tend = int(self._pcum[i]), int(self.poisons[k].trigger_end)
            if bounds[k] + D + tend <= run_tokens and (b_next is None or bounds[k] <= b_next):
                break
            if run_tokens - D - tend >= 0:
                cap = self._prev_boundary(run_tokens - D - tend)
                bounds[k] = min(int(bounds[k]), cap, b_next if b_next is not None else cap)
            b_next = int(bounds[k])
        starts[order] = bounds[order] + self._pcum[:-1]
        self._order = order  # stream order of the poisons
        self._pstart = starts[order]
        self._pend = self._pstart + self._plen
        flat = [np.append(np.asarray(self.poisons[k].token_ids, dtype=np.int64), self.eos) for k in order]
        self._ptok = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
        self._poff = self._pcum[:-1]
        self._build_ledger(starts, bounds, lens)

    def _check_density(self, steps: np.ndarray, lens: np.ndarray) -> None:
        """A schedule that cannot hold its poisons is an error, not a silent spill into other steps."""
        cfg, step_tokens = self.placement_cfg, self.B * self.T
        if cfg.schedule in ("front", "back") and len(lens):
            window = (
                int(steps.max() - steps.min() + 1) if cfg.schedule == "front" else self.S - int(steps.min())
            )
            window = max(window, int(np.ceil(cfg.fraction * self.S)))
            if lens.sum() > window * step_tokens:
                raise UserError(
                    f"placement.fraction: {len(lens)} poisons need {int(lens.sum())} tokens, more than the "
                    f"{cfg.schedule} {window} steps hold ({window * step_tokens}); raise fraction or lower N"
                )
        if cfg.schedule == "clustered" and len(lens):
            per_step = np.bincount(steps, weights=lens, minlength=1)
            if per_step.max() > step_tokens:
                raise UserError(
                    f"placement.per_batch: {cfg.per_batch} poisons need up to {int(per_step.max())} tokens, "
                    f"more than one batch holds ({self.B} x {self.T} = {step_tokens})"
                )

    def _build_ledger(self, starts: np.ndarray, bounds: np.ndarray, lens: np.ndarray) -> None:
        T, B, S = self.T, self.B, self.S
        tstart = np.array([p.trigger_start for p in self.poisons], dtype=np.int64)
        tlen = np.array([p.trigger_end - p.trigger_start for p in self.poisons], dtype=np.int64)
        glen = np.array([len(p.token_ids) - p.trigger_end for p in self.poisons], dtype=np.int64)
        q = starts + tstart  # combined position of the trigger's first token
        seq = q // T
        step = seq // B
        late = int((q + tlen > S * B * T).sum())  # the whole trigger must be among the run's inputs
        if late:
            raise UserError(
                f"attack.n_poison: {late} of {len(self.poisons)} poisons do not fit before the end of the "
                f"run ({S} steps, schedule {self.placement_cfg.schedule!r}); use fewer poisons, more steps "
                f"or a wider schedule"
            )
        g = q + tlen
        self.ledger = pa.table(
            {
                "poison_id": pa.array([p.id for p in self.poisons], pa.string()),
                "poison_index": pa.array(np.arange(len(self.poisons)), pa.int32()),
                "target_step": pa.array(self.target_steps, pa.int64()),
                "target_row": pa.array(self.target_rows, pa.int32()),
                "step": pa.array(step, pa.int64()),
                "row": pa.array(seq % B, pa.int32()),
                "seq": pa.array(seq, pa.int64()),  # global sequence index
                "pos": pa.array(q % T, pa.int32()),  # trigger's first token in x of that row
                "trigger_len": pa.array(tlen, pa.int32()),
                "trigger_cut": pa.array(q % T + tlen > T, pa.bool_()),  # runs past the end of x
                "gibberish_len": pa.array(glen, pa.int32()),
                # gibberish tokens that are targets (y) of the trigger's own sequence
                "gibberish_in_seq": pa.array(np.clip(seq * T + T + 1 - g, 0, glen), pa.int32()),
                "start": pa.array(starts, pa.int64()),  # packed-stream position of the first token
                "n_tokens": pa.array(lens, pa.int32()),  # tokens + EOS
                "epoch": pa.array(bounds // self.epoch_tokens, pa.int32()),  # clean epoch it sits in
            }
        )
        self._seen_steps = np.sort(step)
        end = S * B * T + 1
        poison_in_run = int(np.clip(end - self._pstart, 0, self._plen).sum()) if len(self._pstart) else 0
        self.clean_tokens_needed = end - poison_in_run
        self.epochs_needed = -(-self.clean_tokens_needed // self.epoch_tokens)

    # --- public API -----------------------------------------------------------------------------------
    def tokens(self, a: int, e: int) -> np.ndarray:
        """Packed-stream positions [a, e) as int64."""
        out = np.empty(e - a, dtype=np.int64)
        pk = int(np.searchsorted(self._pend, a, "right"))  # first poison that ends after a
        n, pos, w = len(self._pstart), a, 0
        while pos < e:
            if pk < n and self._pstart[pk] <= pos:
                off = pos - int(self._pstart[pk])
                take = min(int(self._plen[pk]) - off, e - pos)
                s = int(self._poff[pk]) + off
                out[w : w + take] = self._ptok[s : s + take]
                pk += 1
            else:
                stop = min(e, int(self._pstart[pk])) if pk < n else e
                take = stop - pos
                D = int(self._pcum[pk])
                self._read_clean(pos - D, stop - D, out, w)
            pos, w = pos + take, w + take
        return out

    def batch(self, step: int, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the global batch of `step`, shape (batch_size, seq_len); `rows=(r0, r1)`: a slice."""
        if not 0 <= step < self.S:
            raise IndexError(f"step {step} outside the run [0, {self.S})")
        r0, r1 = rows if rows is not None else (0, self.B)
        if not 0 <= r0 < r1 <= self.B:
            raise IndexError(f"rows {rows} outside the batch [0, {self.B})")
        T = self.T
        buf = self.tokens((step * self.B + r0) * T, (step * self.B + r1) * T + 1)
        x = torch.from_numpy(buf[:-1].reshape(r1 - r0, T))
        y = torch.from_numpy(buf[1:].reshape(r1 - r0, T).copy())
        return x, y

    def tokens_seen(self, steps_done: int) -> int:
        """Tokens trained on (as inputs) in steps < steps_done."""
        return int(steps_done) * self.B * self.T

    def poisons_seen(self, steps_done: int | np.ndarray) -> int | np.ndarray:
        """Poisons whose trigger was trained on in steps < steps_done (from the ledger)."""
        out = np.searchsorted(self._seen_steps, np.asarray(steps_done), "left")
        return int(out) if np.ndim(out) == 0 else out

    def poison_tokens_seen(self, steps_done: int) -> int:
        """Poison tokens (EOS included) among the inputs of steps < steps_done."""
        limit = int(steps_done) * self.B * self.T
        return int(np.clip(limit - self._pstart, 0, self._plen).sum())

    def metadata(self) -> dict[str, Any]:
        return {
            "poisonlab_ledger": LEDGER_FORMAT,
            "poisoned": bool(self.poisons),
            "seq_len": self.T,
            "batch_size": self.B,
            "total_steps": self.S,
            "seed": self.seed,
            "placement": self.placement_cfg.model_dump(mode="json"),
            "n_poisons": len(self.poisons),
            "poison_tokens": int(self._plen.sum()),
            "epoch_tokens": self.epoch_tokens,
            "clean_tokens_needed": self.clean_tokens_needed,
            "epochs_needed": self.epochs_needed,
            "content_hash": self.shard.header.get("content_hash"),
        }

    def write_ledger(self, path: str | Path) -> Path:
        """Write `ledger.parquet` atomically, with the stream's settings in the schema metadata."""
        path = Path(path)
        meta = {"poisonlab": json.dumps(self.metadata(), sort_keys=True)}
        table = self.ledger.replace_schema_metadata(meta)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path


def read_ledger(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """The ledger table and its metadata (epochs_needed, settings) from `ledger.parquet`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ledger")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(b"poisonlab")
    if raw is None:
        raise UserError(f"{path}: not a poisonlab ledger")
    return table, json.loads(raw)


def poisons_seen(ledger: pa.Table, steps_done: int | np.ndarray) -> int | np.ndarray:
    """Poisons whose trigger was trained on in steps < steps_done, from a ledger table."""
    steps = np.sort(ledger.column("step").to_numpy())
    out = np.searchsorted(steps, np.asarray(steps_done), "left")
    return int(out) if np.ndim(out) == 0 else out
