"""Live curves of a run in the trackers researchers already watch (`train.log_to`): TensorBoard event
files in `<run_dir>/tb/` (so `tensorboard --logdir SWEEP` shows a sweep's grid, one run per
directory) and trackio's local store (project: `trackio_project`, e.g. a sweep's name; run: the run's).

What is logged, as the trainer writes its records (only the main rank logs):

    train/<field>        every log line: loss, lr, tokens_per_s, mfu, poisons_seen(_effective),
                         tokens_seen; x = step
    eval/<column>        every evaluation: each numeric column of the metrics row but the run's
                         settings (constant columns); x = step
    by_poisons/<column>  the key columns (ASR, gap, look-alike ASR per kind, specificity, val_loss, ...),
                         x = poisons seen (TensorBoard; in trackio pick eval/poisons_seen as x axis)

Resume: the trackers hold exactly what log.jsonl and metrics.parquet hold. When a run starts or
resumes, its curves are written afresh from those records (already cut back to the checkpoint): a
new `tb/` and a replaced trackio run, so no point past the checkpoint survives in any file (a
TensorBoard purge_step would only hide stale points from one reader, and cannot cover the second x
axis, whose steps are poisons seen). Nothing is sent anywhere: trackio is refused a remote target.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from poisonlab.errors import UserError
from poisonlab.fsutil import remove_tree

TB_DIR = "tb"
LOG_FIELDS = ("loss", "lr", "tokens_per_s", "mfu", "poisons_seen", "poisons_seen_effective", "tokens_seen")
# the columns also drawn against poisons seen: the backdoor's success, its specificity, clean loss
KEY = re.compile(r"^(asr|gap|val_loss|specificity|ca|nta)$|^asr_|_asr$|^gap_lookalike$")
# environment settings that would send trackio's data off this machine
TRACKIO_REMOTE = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_DATASET_ID", "TRACKIO_BUCKET_ID",
                  "TRACKIO_WEBHOOK_URL")
# (no square brackets: the command line prints errors as rich markup)
INSTALL = {"tensorboard": "pip install tensorboard (poisonlab's track extra)",
           "trackio": "pip install trackio (poisonlab's trackio extra)"}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def log_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The curves of one log.jsonl line (an event line, such as a stop, has none)."""
    return {f"train/{k}": float(entry[k]) for k in LOG_FIELDS if _number(entry.get(k))}


def eval_scalars(row: Mapping[str, Any], settings: Collection[str]) -> dict[str, float]:
    """The curves of one metrics row: every numeric column but the step and the settings."""
    return {f"eval/{k}": float(v) for k, v in row.items()
            if k != "step" and k not in settings and _number(v)}


def poison_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The key columns of one metrics row, to be drawn against poisons seen."""
    return {f"by_poisons/{k}": float(v) for k, v in row.items() if KEY.search(k) and _number(v)}


def _clear(path: Path) -> None:
    if path.is_dir():
        remove_tree(path)


def trackio_project(run_dir: Path) -> str:
    """A sweep's name for its runs (`SWEEP/runs/NAME`), else the name of the directory the run is in."""
    parent = run_dir.absolute().parent
    return parent.parent.name if parent.name == "runs" and parent.parent.name else parent.name


def check(log_to: Iterable[str], run_dir: Path | None = None) -> None:
    """Refuse, in one line, a tracker that is not installed, would reach the network or cannot take
    the run's name; called before a run writes anything."""
    for name in log_to:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs `tensorboard`)
            elif name == "trackio":
                import trackio  # noqa: F401
        except ImportError as e:
            raise UserError(f"train.log_to: {name} is not installed ({e}); {INSTALL[name]}, or remove "
                            f"{name} from train.log_to") from None
        if name == "trackio" and (remote := [k for k in TRACKIO_REMOTE if os.environ.get(k)]):
            raise UserError(f"train.log_to: trackio logs locally only, but {', '.join(remote)} is set "
                            "(it would send the run off this machine); unset it")
        if name == "trackio" and run_dir is not None:
            from trackio.sqlite_storage import SQLiteStorage

            try:
                SQLiteStorage.validate_project_name(trackio_project(run_dir))
            except ValueError as e:
                raise UserError(f"train.log_to: {run_dir}: {e}") from None


class Sink(Protocol):
    def scalars(self, values: Mapping[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """Event files in `<run_dir>/tb/`, written afresh (see the module doc); flushed every 10 s."""

    def __init__(self, run_dir: Path, config_text: str):
        from torch.utils.tensorboard import SummaryWriter

        _clear(run_dir / TB_DIR)
        self.w = SummaryWriter(log_dir=str(run_dir / TB_DIR), flush_secs=10)
        self.w.add_text("config", "```\n" + config_text + "\n```", 0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, v in values.items():
            self.w.add_scalar(tag, v, step)

    def close(self) -> None:
        self.w.close()


class TrackioSink:
    """The run in trackio's local store (TRACKIO_DIR, by default ~/.cache/huggingface/trackio), replaced
    when the run starts again; its chatter on stdout is kept off the run's output."""

    def __init__(self, project: str, name: str, config: dict):
        check(["trackio"])
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        with contextlib.redirect_stdout(io.StringIO()):
            SQLiteStorage.delete_run(project, name)
            self.run = trackio.init(project=project, name=name, config=config, resume="never", embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        # trackio draws against any logged column: eval/poisons_seen is the second x axis
        values = {k: v for k, v in values.items() if not k.startswith("by_poisons/")}
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()
        if trackio.context_vars.current_run.get() is self.run:  # else trackio finishes it again at exit
            trackio.context_vars.current_run.set(None)


class Tracker:
    """The run's trackers; with none named (or off the main rank) every call does nothing."""

    def __init__(self, run_dir: Path, log_to: Iterable[str], *, settings: Collection[str] = (),
                 config: dict | None = None, config_text: str = "", main: bool = True):
        self.settings = frozenset(settings) | {"step"}
        self.sinks: list[Sink] = []
        log_to = list(dict.fromkeys(log_to)) if main else []
        if main and "tensorboard" not in log_to:
            _clear(run_dir / TB_DIR)  # curves of an earlier start: they may run past the checkpoint
        try:
            for name in log_to:
                if name == "tensorboard":
                    self.sinks.append(TensorBoardSink(run_dir, config_text))
                elif name == "trackio":
                    self.sinks.append(TrackioSink(trackio_project(run_dir), run_dir.name, config or {}))
        except BaseException:
            self.close()
            raise

    def log_line(self, entry: Mapping[str, Any]) -> None:
        if self.sinks and "step" in entry:
            self._write(log_scalars(entry), int(entry["step"]))

    def evaluation(self, row: Mapping[str, Any]) -> None:
        if not self.sinks:
            return
        self._write(eval_scalars(row, self.settings), int(row["step"]))
        seen = row.get("poisons_seen")
        if _number(seen) and not math.isnan(seen):
            self._write(poison_scalars(row), int(seen))

    def replay(self, log_entries: Iterable[Mapping[str, Any]], rows: Iterable[Mapping[str, Any]]) -> None:
        """The records a (re)started run keeps, in the order a run writes them: per step, the log line
        before the evaluation."""
        if not self.sinks:
            return
        events = [(int(e["step"]), 0, e) for e in log_entries if "step" in e]
        events += [(int(r["step"]), 1, r) for r in rows]
        for _, kind, rec in sorted(events, key=lambda x: x[:2]):
            self.log_line(rec) if kind == 0 else self.evaluation(rec)

    def _write(self, values: dict[str, float], step: int) -> None:
        if values:
            for s in self.sinks:
                s.scalars(values, step)

    def close(self) -> None:
        """Flush and close every tracker (before the run's manifest lists the event files)."""
        sinks, self.sinks = self.sinks, []
        for s in sinks:
            s.close()
