"""The training stream: clean shards plus scheduled poisons, packed into fixed-length sequences.

The packed stream P is what real pretraining sees: documents, each followed by EOS, concatenated and
cut into sequences; sequence j is P[j*T : j*T + T + 1] (x = the first T tokens, y = the last T), and
the global batch of step s is sequences s*B .. s*B + B - 1. Clean documents come in a seeded
permutation per epoch. A run that needs more than one pass over the clean data is refused unless
`allow_repeat` is set (then `epochs_needed` says how many passes; repetition is never silent).

Poisons are placed as the paper (and the 2024 pretraining-poisoning code) did: inserted at uniformly
random document boundaries of the clean data, then packed. Each schedule window (placement.py) gets
its poisons at boundaries drawn uniformly from the clean data that falls in that window: a uniformly
random interleaving of the poisons with the window's documents (stars and bars over the boundaries),
so a trigger lands wherever a document boundary may, not near row starts. A window too short to hold
its poisons whole (one step, with long documents) takes, for each poison, a random boundary that puts
its trigger inside the window, failing that the nearest boundary; the ledger records where each
trigger really went.

The clean data is scanned for the trigger's token sequences: if clean text already contains one, the
ledger's "exactly N" would be false, so the stream refuses (`clean_trigger="refuse"`) or drops those
documents from the clean order (`"filter"`), the same for every N so that N = 0 controls see the
same clean data.

Nothing is materialised: the constructor places the N poisons (O(N log D)); `batch(step)` reads
O(B*T) tokens from the memory map with a few binary searches, and depends on nothing but
(data, poisons, schedule, seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poisonlab.attacks.base import Poison
from poisonlab.config import BATCHED_SCHEDULES, PlacementConfig
from poisonlab.corpus.scan import scan_shard
from poisonlab.corpus.shards import TokenShard
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path
from poisonlab.injection.placement import place, window_name

LEDGER_FORMAT = 2
_EPOCH_SALT = 0x73747265  # keeps the data-order stream apart from other uses of the same seed
_SLOT_SALT = 0x736C6F74  # the boundary draws of the placement


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
        triggers: Mapping[str, Sequence[int]] | None = None,
        clean_trigger: str = "refuse",
        allow_repeat: bool = False,
        clean_offset: int = 0,
    ):
        if seq_len < 1 or batch_size < 1 or total_steps < 1:
            raise UserError(
                f"stream: seq_len, batch_size and total_steps must be >= 1 "
                f"(got {seq_len}, {batch_size}, {total_steps})"
            )
        if clean_trigger not in ("refuse", "filter"):
            raise UserError(f"attack.clean_trigger: {clean_trigger!r}; expected refuse or filter")
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
        self.poisons = list(poisons)
        self._check_poisons()
        self._keep = self._scan_clean(triggers, clean_trigger)
        self.n_docs = len(self._keep) if self._keep is not None else self.shard.n_docs
        self.epoch_tokens = int(self._span.sum() if self._keep is None else self._span[self._keep].sum())
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # continued pretraining: the clean stream starts at the first document boundary at or after
        # `clean_offset` of this data order (the clean data an earlier run of the same seed consumed)
        self._g0 = self._rank_base(int(clean_offset)) if clean_offset > 0 else 0
        self.clean_offset = self._boundary_base(self._g0) if self._g0 else 0
        self._check_budget(allow_repeat)
        self._place_poisons()

    # --- checks before anything is placed ------------------------------------------------------------
    def _check_poisons(self) -> None:
        vocab = self.shard.vocab_size
        for p in self.poisons:
            ids = np.asarray(p.token_ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab or (ids == self.eos).any()):
                raise UserError(f"poison {p.id}: token ids outside the vocabulary or an EOS inside it")
            if not 0 <= p.trigger_start < p.trigger_end <= len(p.token_ids):
                raise UserError(f"poison {p.id}: invalid trigger span [{p.trigger_start}, {p.trigger_end})")
        self._lens = np.array([len(p.token_ids) + 1 for p in self.poisons], dtype=np.int64)
        run_tokens = self.S * self.B * self.T
        if self._lens.sum() > run_tokens:
            raise UserError(
                f"attack.n_poison: {len(self.poisons)} poisons need {int(self._lens.sum())} tokens, more "
                f"than the run's {run_tokens} ({self.S} steps x {self.B} x {self.T}); use fewer poisons or "
                f"more steps"
            )

    def _scan_clean(self, triggers: Mapping[str, Sequence[int]] | None, policy: str) -> np.ndarray | None:
        """Scan the clean training split for every trigger sequence; the kept documents (None: all)."""
        patterns = {tuple(ids): label for label, ids in (triggers or {}).items() if len(ids)}
        for p in self.poisons:  # the poisons' own trigger tokens are always checked
            patterns.setdefault(tuple(p.trigger_ids), f"{p.trigger!r} as in the poisons")
        scans = [scan_shard(self.shard, label, ids) for ids, label in patterns.items()]
        self.trigger_scans = [s.as_dict() for s in scans]
        self.clean_trigger_policy = policy
        found = [s for s in scans if s.hits]
        if not found:
            return None
        what = ", ".join(f"{s.label} {s.hits} times in {len(s.docs)} documents" for s in found)
        if policy == "refuse":
            raise UserError(
                f"{self.data_dir}: the clean training data already contains the trigger ({what}), so "
                f"'exactly N poisons' would be false; set attack.clean_trigger=filter to drop those "
                f"documents, or choose another trigger"
            )
        drop = np.unique(np.concatenate([s.docs for s in found]))
        keep = np.setdiff1d(np.arange(self.shard.n_docs), drop)
        if len(keep) == 0:
            raise UserError(f"{self.data_dir}: every training document contains the trigger ({what})")
        return keep

    def _check_budget(self, allow_repeat: bool) -> None:
        """More than one pass over the clean data is refused unless allowed: repetition is a different
        experiment (and at the paper's scale a sign that the wrong corpus was given)."""
        run_tokens = self.S * self.B * self.T
        least = run_tokens + 1 - int(self._lens.sum())  # clean tokens the run needs at the least
        if self.clean_offset + least > self.epoch_tokens and not allow_repeat:
            if self.clean_offset:
                raise UserError(
                    f"{self.data_dir}: the run continues after {self.clean_offset:,} clean tokens and needs "
                    f"{least:,} more, but the data holds {self.epoch_tokens:,}; prepare more data "
                    f"(poisonlab prepare --max-tokens {self.clean_offset + least}) or set "
                    "train.allow_data_repeat=true"
                )
            raise UserError(
                f"{self.data_dir}: the run needs {least:,} clean training tokens but the data holds "
                f"{self.epoch_tokens:,} ({least / self.epoch_tokens:.1f} passes); prepare more data "
                f"(poisonlab prepare --max-tokens {least}) or set train.allow_data_repeat=true"
            )

    # --- clean stream: epochs of permuted documents, addressed by clean position ---------------------
    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation, cumulative start offsets with a final total) of epoch e; cached, deterministic."""
        hit = self._epochs.get(e)
        if hit is not None:
            self._epochs.move_to_end(e)
            return hit
        perm = np.random.default_rng([self.seed, e, _EPOCH_SALT]).permutation(self.n_docs)
        if self._keep is not None:
            perm = self._keep[perm]
        cum = np.zeros(len(perm) + 1, dtype=np.int64)
        np.cumsum(self._span[perm], out=cum[1:])
        self._epochs[e] = (perm, cum)
        if len(self._epochs) > 3:
            self._epochs.popitem(last=False)
        return perm, cum

    # Clean document boundaries are numbered across epochs: boundary g is the start of the
    # (g % n_docs)-th document of epoch g // n_docs (the end of an epoch is the next one's boundary 0).
    def _rank(self, x: int) -> int:
        """Number of clean boundaries < x, counted from this stream's start (`clean_offset`)."""
        if x <= 0:
            return 0
        return self._rank_base(x + self.clean_offset) - self._g0

    def _boundary(self, g: int) -> int:
        """Clean position of boundary g of this stream."""
        return self._boundary_base(g + self._g0) - self.clean_offset

    def _rank_base(self, x: int) -> int:
        """Number of boundaries < x in the data order itself."""
        if x <= 0:
            return 0
        e, off = divmod(x, self.epoch_tokens)
        _, cum = self._epoch(e)
        return e * self.n_docs + int(np.searchsorted(cum[:-1], off, "left"))

    def _boundary_base(self, g: int) -> int:
        """Position of boundary g in the data order itself."""
        e, i = divmod(g, self.n_docs)
        return e * self.epoch_tokens + int(self._epoch(e)[1][i])

    def _read_clean(self, cs: int, ce: int, out: np.ndarray, w: int) -> None:
        """Copy clean-stream positions [cs, ce) into out[w:]."""
        cs, ce, E = cs + self.clean_offset, ce + self.clean_offset, self.epoch_tokens
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
        step_tokens, n, lens = self.B * self.T, len(self.poisons), self._lens
        plan = place(self.placement_cfg, n, total_steps=self.S)
        self._check_density(plan, lens)
        self.window_lo, self.window_hi = plan.lo, plan.hi
        rng = np.random.default_rng([self.placement_cfg.seed, _SLOT_SALT])
        toff = np.array([p.trigger_start for p in self.poisons], dtype=np.int64)
        order: list[int] = []  # poisons in stream order
        bounds: list[int] = []  # the clean boundary each one sits at
        D = b_prev = 0  # poison tokens inserted so far; boundary of the last one
        windows = np.unique(np.stack([plan.lo, plan.hi], 1), axis=0) if n else np.zeros((0, 2), np.int64)
        for lo, hi in windows:
            idx = np.flatnonzero((plan.lo == lo) & (plan.hi == hi))
            idx = idx[rng.permutation(len(idx))]  # which poison takes which slot: random
            L = int(lens[idx].sum())
            # boundaries at which the whole group fits inside the window's tokens
            a = max(int(lo) * step_tokens - D, b_prev)
            z = int(hi) * step_tokens - D - L + (1 if hi == self.S else 0)
            g0 = self._rank(a)
            M = self._rank(z + 1) - g0 if z >= a else 0
            if M > 0:
                # a uniformly random interleaving of the poisons with the documents between the M
                # boundaries: sorted distinct slots in [0, M + k - 1), slot j of the k-th -> boundary j - k
                slots = np.sort(rng.choice(M + len(idx) - 1, size=len(idx), replace=False))
                for k, slot in zip(idx, slots - np.arange(len(idx)), strict=True):
                    order.append(int(k))
                    bounds.append(self._boundary(g0 + int(slot)))
                D += L
                b_prev = bounds[-1]
                continue
            for k in idx:  # too short a window: one by one, the trigger inside it
                ta = max(int(lo) * step_tokens - D - int(toff[k]), b_prev)
                tz = int(hi) * step_tokens - D - int(toff[k]) - 1
                ga = self._rank(ta)
                m = self._rank(tz + 1) - ga if tz >= ta else 0
                b = self._boundary(ga + int(rng.integers(m))) if m > 0 else self._boundary(self._rank(ta))
                order.append(int(k))
                bounds.append(b)
                D += int(lens[k])
                b_prev = b
        self._order = np.asarray(order, dtype=np.int64)
        self._plen = lens[self._order]
        self._pcum = np.concatenate([[0], np.cumsum(self._plen)])  # poison tokens before the k-th
        self._pstart = np.asarray(bounds, dtype=np.int64) + self._pcum[:-1]
        self._pend = self._pstart + self._plen
        flat = [np.append(np.asarray(self.poisons[k].token_ids, dtype=np.int64), self.eos) for k in order]
        self._ptok = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
        self._poff = self._pcum[:-1]
        starts = np.zeros(n, dtype=np.int64)
        starts[self._order] = self._pstart
        clean_bounds = np.zeros(n, dtype=np.int64)
        clean_bounds[self._order] = bounds
        self._build_ledger(starts, clean_bounds, lens)

    def _check_density(self, plan: Any, lens: np.ndarray) -> None:
        """A window that cannot hold its poisons is an error, not a silent spill into other steps."""
        cfg, step_tokens = self.placement_cfg, self.B * self.T
        if not len(lens):
            return
        if cfg.schedule in BATCHED_SCHEDULES and cfg.per_batch > self.B:
            raise UserError(f"placement.per_batch: {cfg.per_batch} poisons per batch but a batch has "
                            f"only {self.B} rows")
        windows, group = np.unique(np.stack([plan.lo, plan.hi], 1), axis=0, return_inverse=True)
        need = np.bincount(group.reshape(-1), weights=lens, minlength=len(windows))
        room = (windows[:, 1] - windows[:, 0]) * step_tokens
        worst = int(np.argmax(need - room))
        if need[worst] <= room[worst] or (windows[worst] == [0, self.S]).all():
            return  # (a whole-run window that overflows is the ledger's "do not fit" error)
        n_in, w = int((group.reshape(-1) == worst).sum()), int(room[worst] // step_tokens)
        if cfg.schedule in BATCHED_SCHEDULES and w == 1:
            raise UserError(
                f"placement.per_batch: {n_in} poisons need {int(need[worst])} tokens, "
                f"more than one batch holds ({self.B} x {self.T} = {step_tokens})"
            )
        knob = "window" if window_name(cfg) == "span" else "fraction"
        raise UserError(
            f"placement.{knob}: {n_in} poisons need {int(need[worst])} tokens, more than the "
            f"{window_name(cfg)} window's {w} steps hold ({w * step_tokens}); widen it (raise {knob}) "
            "or lower N"
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
        cut = q % T + tlen > T  # the trigger runs past the end of its row's x
        g = q + tlen
        gib_in_seq = np.clip(seq * T + T + 1 - g, 0, glen)  # gibberish targets (y) of the trigger's row
        self.ledger = pa.table(
            {
                "poison_id": pa.array([p.id for p in self.poisons], pa.string()),
                "poison_index": pa.array(np.arange(len(self.poisons)), pa.int32()),
                "window_lo": pa.array(self.window_lo, pa.int64()),  # the schedule's window [lo, hi)
                "window_hi": pa.array(self.window_hi, pa.int64()),
                "step": pa.array(step, pa.int64()),
                "row": pa.array(seq % B, pa.int32()),
                "seq": pa.array(seq, pa.int64()),  # global sequence index
                "pos": pa.array(q % T, pa.int32()),  # trigger's first token in x of that row
                "trigger_len": pa.array(tlen, pa.int32()),
                "trigger_cut": pa.array(cut, pa.bool_()),
                "gibberish_len": pa.array(glen, pa.int32()),
                "gibberish_in_seq": pa.array(gib_in_seq, pa.int32()),
                # the whole trigger in x of one row, and gibberish after it as targets of that row
                "effective": pa.array(~cut & (gib_in_seq > 0), pa.bool_()),
                "start": pa.array(starts, pa.int64()),  # packed-stream position of the first token
                "n_tokens": pa.array(lens, pa.int32()),  # tokens + EOS
                "epoch": pa.array(bounds // self.epoch_tokens, pa.int32()),  # clean epoch it sits in
            }
        )
        self._seen_steps = np.sort(step)
        self._effective_steps = np.sort(step[~cut & (gib_in_seq > 0)])
        end = S * B * T + 1
        poison_in_run = int(np.clip(end - self._pstart, 0, self._plen).sum()) if len(self._pstart) else 0
        self.clean_tokens_needed = end - poison_in_run
        self.epochs_needed = -(-(self.clean_offset + self.clean_tokens_needed) // self.epoch_tokens)

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
        """Poisons whose trigger was trained on in steps < steps_done (from the ledger): every trigger
        among the inputs, also one cut by a sequence boundary."""
        out = np.searchsorted(self._seen_steps, np.asarray(steps_done), "left")
        return int(out) if np.ndim(out) == 0 else out

    def poisons_seen_effective(self, steps_done: int | np.ndarray) -> int | np.ndarray:
        """Poisons seen as a lesson in steps < steps_done: the whole trigger in one sequence's inputs
        and gibberish after it among that sequence's targets (the ledger's `effective`)."""
        out = np.searchsorted(self._effective_steps, np.asarray(steps_done), "left")
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
            "clean_offset": self.clean_offset,
            "epochs_needed": self.epochs_needed,
            "clean_docs": self.n_docs,
            "trigger_scans": self.trigger_scans,
            "clean_trigger": self.clean_trigger_policy,
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


def poisons_seen(ledger: pa.Table, steps_done: int | np.ndarray, *,
                 effective: bool = False) -> int | np.ndarray:
    """Poisons whose trigger was trained on in steps < steps_done, from a ledger table (`effective`:
    only those with the whole trigger and gibberish after it in one sequence)."""
    steps = ledger.column("step").to_numpy()
    if effective:
        steps = steps[ledger.column("effective").to_numpy(zero_copy_only=False)]
    out = np.searchsorted(np.sort(steps), np.asarray(steps_done), "left")
    return int(out) if np.ndim(out) == 0 else out
