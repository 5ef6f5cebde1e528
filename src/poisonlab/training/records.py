"""A run directory's housekeeping: the config check on resume, the lock, clearing or recovering what a
killed run left, and the three record files (metrics.parquet, samples.jsonl, log.jsonl), which a
resume cuts back to the checkpoint's step so that they read as if the run had never stopped; the live
curves (rundir/tracking.py) follow the records.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poisonlab.config import RunConfig, dump_yaml, flatten
from poisonlab.errors import UserError
from poisonlab.fsutil import append_text, atomic_path, recover_all, remove_staging, remove_tree, write_text
from poisonlab.models.checkpoint import CKPT_DIR
from poisonlab.rundir import lock as runlock
from poisonlab.rundir.jsonl import iter_jsonl
from poisonlab.rundir.tracking import Tracker
from poisonlab.training import distributed


def check_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run dir may only be resumed with the config it was started with (threads may change). A
    config.yaml that cannot be read refuses the resume: nothing says the run is the one asked for."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]}), so the run cannot be checked "
                        "against the config given; restore it, or train again with --no-resume") from None
    if not isinstance(old, dict):
        raise UserError(f"{path}: not a mapping of settings, so the run cannot be checked against the "
                        "config given; restore it, or train again with --no-resume")
    new = yaml.safe_load(dump_yaml(cfg))
    with contextlib.suppress(ValueError, TypeError):  # defaults filled: a newer setting is no change
        old = yaml.safe_load(dump_yaml(RunConfig.model_validate(old)))
    for c in (old, new):  # how it runs and where its curves go, not what it computes
        c.get("train", {}).pop("threads", None)
        c.get("train", {}).pop("log_to", None)
    if old != new:
        a, b = flatten(old), flatten(new)
        missing = object()
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise UserError(f"{run_dir}: exists with a different config ({shown}{more}); "
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
    """metrics.parquet (one row per evaluation), samples.jsonl and log.jsonl of a run, and the live
    curves of what they hold (`track`); only the main rank writes (the others hold no rows and write
    nothing)."""

    def __init__(self, run_dir: Path, *, main: bool):
        self.metrics, self.samples, self.log = (run_dir / "metrics.parquet", run_dir / "samples.jsonl",
                                                run_dir / "log.jsonl")
        self.ledger = run_dir / "ledger.parquet"
        self.main = main
        self.rows: list[dict] = []
        self.tracker = Tracker(run_dir, [], main=False)  # none until `track`

    def resume(self, through_step: int) -> None:
        """Keep only records of steps <= through_step (what a killed run wrote after its checkpoint is
        written again)."""
        if not self.main:
            return
        if self.metrics.is_file():
            try:
                rows = pq.read_table(self.metrics).to_pylist()
            except (OSError, ValueError, pa.ArrowException) as e:
                raise UserError(f"{self.metrics}: unreadable ({str(e).splitlines()[0]}): the run's "
                                "evaluations so far cannot be kept; train it again with --no-resume"
                                ) from None
            self.rows = [r for r in rows if r["step"] <= through_step]
        for p in (self.samples, self.log):
            _truncate_jsonl(p, through_step)

    def track(self, tracker: Tracker) -> None:
        """Send the records to `tracker` from now on, after those kept so far (a resume's, already cut
        back to the checkpoint)."""
        self.tracker = tracker
        if self.main:
            entries = [e for _, e in iter_jsonl(self.log, strict=False)] if self.log.is_file() else []
            tracker.replay(entries, self.rows)

    def close(self) -> None:
        """Flush the trackers (before the run's manifest hashes their files)."""
        self.tracker.close()

    def write_ledger(self, stream) -> None:
        if self.main:
            with atomic_path(self.ledger) as tmp:
                stream.write_ledger(tmp)

    def restore_ledger(self, stream, step: int, seen: int | None, say=print) -> None:
        """On resume: the stream (a pure function of the run's settings) must count the poisons seen
        that the checkpoint at `step` recorded, else the resume is refused; a ledger file that is
        missing, unreadable or not the stream's is written again from the stream, and said so."""
        if not self.main:
            return
        if seen is not None and int(stream.poisons_seen(step)) != int(seen):
            raise UserError(
                f"{self.ledger.parent}: the checkpoint at step {step} saw {seen} poisons, the placement "
                f"rebuilt from the run's settings {stream.poisons_seen(step)}: the data, the poisons or "
                "their placement changed since the run started; resume refused (train again with "
                "--no-resume)")
        why = None
        if not self.ledger.is_file():
            why = "missing"
        else:
            try:
                table = pq.read_table(self.ledger)
            except (OSError, ValueError, pa.ArrowException) as e:
                why = f"unreadable ({str(e).splitlines()[0]})"
            else:
                ours = getattr(stream, "ledger", None)
                if ours is not None and not table.replace_schema_metadata(None).equals(
                        ours.replace_schema_metadata(None)):
                    why = "not the placement of the run's settings"
        if why:
            self.write_ledger(stream)
            say(f"{self.ledger}: {why}; rebuilt from the run's settings (it agrees with the "
                f"checkpoint at step {step}: {seen if seen is not None else '?'} poisons seen)")

    def add_evaluation(self, row: dict, samples: list[dict]) -> None:
        if self.main:
            self.rows.append(row)
            with atomic_path(self.metrics) as tmp:
                pq.write_table(pa.Table.from_pylist(self.rows), tmp)
            _append_jsonl(self.samples, samples)
            self.tracker.evaluation(row)

    def add_log(self, entry: dict) -> None:
        if self.main:
            _append_jsonl(self.log, [entry])
            self.tracker.log_line(entry)


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
        append_text(path, "".join(json.dumps(r, default=float) + "\n" for r in rows))
