"""A run directory's housekeeping: the config check on resume, the lock, clearing or recovering what a
killed run left, and the three record files (metrics.parquet, samples.jsonl, log.jsonl), which a
resume cuts back to the checkpoint's step so that they read as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poisonlab import distributed, runlock
from poisonlab.checkpoint import CKPT_DIR
from poisonlab.config import RunConfig, dump_yaml
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path, recover_all, remove_staging, remove_tree, write_text


def check_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run dir may only be resumed with the config it was started with (threads may change)."""
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        old, new = yaml.safe_load(path.read_text()), yaml.safe_load(dump_yaml(cfg))
        with contextlib.suppress(ValueError, TypeError):  # defaults filled: a newer setting is no change
            old = yaml.safe_load(dump_yaml(RunConfig.model_validate(old)))
        for c in (old, new):
            c.get("train", {}).pop("threads", None)
        if old != new:
            diff = sorted(f"{sec}.{k}" for sec in new if isinstance(new[sec], dict)
                          for k in new[sec] if old.get(sec, {}).get(k) != new[sec][k])
            raise UserError(f"{run_dir}: exists with a different config ({', '.join(diff) or 'top level'}); "
                            "use another name or --no-resume")


@contextlib.contextmanager
def run_lock(run_dir: Path, dist: distributed.Dist) -> Iterator[None]:
    """Rank 0 holds the run's lock for the block; every rank learns whether it got it, so that under
    torchrun all ranks stop together when the run is busy (none is left waiting at a barrier)."""
    with contextlib.ExitStack() as stack:
        busy: runlock.RunBusy | None = None
        if dist.main:
            try:
                stack.enter_context(runlock.hold(run_dir))
            except runlock.RunBusy as e:
                busy = e
        if dist.mean(torch.tensor(float(busy is not None), device=dist.device)).item() > 0:
            raise busy or runlock.RunBusy(run_dir, runlock.read_holder(run_dir))
        yield


def open_run_dir(cfg: RunConfig, run_dir: Path, dist: distributed.Dist, *, resume: bool) -> bool:
    """Under the lock: False if the run was finished meanwhile; else clear it (no resume), finish or
    remove what killed writes left, and write config.yaml."""
    if resume:  # again: another process may have finished it (or started it differently) meanwhile
        check_config(run_dir, cfg)
        if (run_dir / "DONE").is_file():
            return False
    dist.barrier()  # every rank has looked before rank 0 changes anything
    if dist.main:
        if not resume:  # DONE first: a reset cut short must not pass as a finished run
            for name in ("DONE", CKPT_DIR, "metrics.parquet", "samples.jsonl", "log.jsonl", "ledger.parquet",
                         "config.yaml"):
                p = run_dir / name
                remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)
        recover_all(run_dir)
        recover_all(run_dir / CKPT_DIR)
        remove_staging(run_dir / CKPT_DIR)  # half-written checkpoints of a killed run; we hold the lock
        write_text(run_dir / "config.yaml", dump_yaml(cfg))
    dist.barrier()
    return True


class RunRecords:
    """metrics.parquet (one row per evaluation), samples.jsonl and log.jsonl of a run; only the main
    rank writes (the others hold no rows and write nothing)."""

    def __init__(self, run_dir: Path, *, main: bool):
        self.metrics, self.samples, self.log = (run_dir / "metrics.parquet", run_dir / "samples.jsonl",
                                                run_dir / "log.jsonl")
        self.ledger = run_dir / "ledger.parquet"
        self.main = main
        self.rows: list[dict] = []

    def resume(self, through_step: int) -> None:
        """Keep only records of steps <= through_step (what a killed run wrote after its checkpoint is
        written again)."""
        if not self.main:
            return
        if self.metrics.is_file():
            self.rows = [r for r in pq.read_table(self.metrics).to_pylist() if r["step"] <= through_step]
        for p in (self.samples, self.log):
            _truncate_jsonl(p, through_step)

    def write_ledger(self, stream) -> None:
        if self.main:
            with atomic_path(self.ledger) as tmp:
                stream.write_ledger(tmp)

    def add_evaluation(self, row: dict, samples: list[dict]) -> None:
        if self.main:
            self.rows.append(row)
            with atomic_path(self.metrics) as tmp:
                pq.write_table(pa.Table.from_pylist(self.rows), tmp)
            _append_jsonl(self.samples, samples)

    def add_log(self, entry: dict) -> None:
        if self.main:
            _append_jsonl(self.log, [entry])


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep complete lines with step <= max_step (a killed run may leave a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", -1) <= max_step:
                keep.append(line + "\n")
    write_text(path, "".join(keep))


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r, default=float) + "\n" for r in rows))
