"""Training speed for the log: tokens/s and MFU over the steps since the last log line, leaving out the
time spent evaluating and checkpointing; and the progress bar (off on ranks other than 0)."""

from __future__ import annotations

import os
import time

from poisonlab.hardware import estimate_mfu


class Throughput:
    def __init__(self, tokens_per_step: int, flops_per_token: int, peak_flops: float, start_step: int):
        self.tokens_per_step, self.fpt, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.last_step, self.last_t, self.paused = start_step, time.perf_counter(), 0.0

    def pause(self, seconds: float) -> None:
        """Time that is not training (an evaluation, a checkpoint) since the last log line."""
        self.paused += seconds

    def lap(self, done: int) -> tuple[float, float | None]:
        """(tokens/s, MFU or None) of the steps since the previous lap, which ended at step done."""
        now = time.perf_counter()
        tps = (done - self.last_step) * self.tokens_per_step / max(now - self.last_t - self.paused, 1e-9)
        self.last_step, self.last_t, self.paused = done, now, 0.0
        return tps, estimate_mfu(self.fpt, tps, self.peak)


class ProgressBar:
    """A rich progress bar that can be switched off (and is, on ranks other than 0)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.p = None
        if enabled and os.environ.get("POISONLAB_NO_PROGRESS") is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              TextColumn("{task.description}"), transient=False)
            self.p.start()
            self.task = self.p.add_task("", total=total, completed=start)

    def update(self, done: int, text: str | None) -> None:
        if self.p is not None:
            self.p.update(self.task, completed=done, **({} if text is None else {"description": text}))

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
