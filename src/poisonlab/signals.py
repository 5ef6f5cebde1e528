"""Signals, and what each one leaves behind.

A run (the trainer):
- SIGINT (Ctrl-C): stop at once; `Interrupted` names the step, and the run resumes from its last
  checkpoint with the same command (exit 130);
- SIGTERM (what Slurm, Kubernetes and `kill` send before they kill) and SIGUSR2 (Slurm's warning
  before a time limit, with submitit's requeue): checkpoint at the next step boundary, then `Stopped`
  (exit 128 + the signal: 143, 140), after handing the signal to a handler installed before
  (submitit's: requeue the job);
- SIGKILL: nothing can run; the last checkpoint is the state (atomic writes: nothing half-written).

A sweep (the local executor) runs its children in its own process group, so that a signal to the
group (Ctrl-C in a terminal, Slurm's and Kubernetes' stop) reaches every run at once; a signal to the
sweep alone is passed on to its children (SIGINT as SIGINT, the rest as SIGTERM), and each child asks
the kernel for SIGTERM when the sweep dies (`die_with_parent`: kill -9 of the sweep too), so no run
goes on as an orphan. The sweep ends with `SweepStopped` (exit 128 + the signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

PARENT_ENV = "POISONLAB_PARENT_PID"  # a sweep's child: the pid whose death must end it too


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(BaseException):  # noqa: N818 - not an error: the run stopped on request, checkpointed
    """The run stopped at a step boundary on SIGTERM or SIGUSR2, after writing a checkpoint there."""

    def __init__(self, step: int, signum: int = signal.SIGUSR2):
        self.step, self.signum = step, signum
        super().__init__(f"stopped on {name(signum)} at step {step}: checkpoint written; resume with the "
                         "same command")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupted(BaseException):  # noqa: N818 - the user's Ctrl-C, as KeyboardInterrupt is
    """SIGINT during training: the run stops where it is; its last checkpoint is where it resumes."""

    exit_code = 130

    def __init__(self, step: int, checkpoint_step: int | None):
        self.step, self.checkpoint_step = step, checkpoint_step
        since = ("from the start" if checkpoint_step is None
                 else f"from its checkpoint at step {checkpoint_step}")
        super().__init__(f"interrupted at step {step}, resume with the same command (it goes on {since})")


class SweepStopped(BaseException):  # noqa: N818 - a signal, not an error
    """A sweep stopped by a signal, after it stopped its runs."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = signum, detail
        super().__init__(f"sweep stopped on {name(signum)}{detail}; resume with the same command")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopOnSignal:
    """During training: SIGTERM and SIGUSR2 set a flag that the trainer asks for after every step
    (`requested`; ranks agree, so all stop at the same step); the first SIGINT raises KeyboardInterrupt
    (the trainer turns it into Interrupted) and later ones are ignored, so that a second Ctrl-C, or the
    SIGINT a sweep passes on after the terminal's, cannot cut the clean-up short. `close` puts the
    handlers found at the start back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interrupted = False
        self.previous: dict[int, Any] = {}
        if _main_thread():
            for s in (*self.SIGNALS, signal.SIGINT):
                prev = signal.getsignal(s)
                if s == signal.SIGINT and prev == signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (a background job): keep it so
                self.previous[s] = signal.signal(s, self._on_int if s == signal.SIGINT else self._set)

    def _set(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def _on_int(self, signum: int, frame: Any) -> None:
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt

    def requested(self, d: Any) -> int:
        """The signal that asks the run to stop (0: none); under torchrun the ranks agree on it (the
        highest any rank got), so every rank stops at the same step and says the same."""
        if not d.enabled:
            return self.signum or 0
        import torch
        import torch.distributed as tdist

        t = torch.tensor(float(self.signum or 0), device=d.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def close(self) -> None:
        # a sweep's child that was stopped keeps ignoring the signal: the sweep passes on what the
        # terminal or Slurm also sent to its whole group, and a second copy must not cut the exit short
        fired = {signal.SIGINT} if self.interrupted else set()
        fired |= {self.signum} if self.signum is not None else set()
        child = bool(os.environ.get(PARENT_ENV))
        for s, prev in self.previous.items():
            signal.signal(s, signal.SIG_IGN if child and s in fired else prev)

    def forward(self, stopped: Stopped) -> None:
        """After close: hand the signal that stopped the run to the handler installed before, when there
        is one (submitit's requeues the job and exits); otherwise the caller reports `Stopped`."""
        prev = self.previous.get(stopped.signum)
        if callable(prev) and prev not in (signal.default_int_handler,):
            prev(stopped.signum, None)


# --- a sweep and its children ----------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While a sweep runs its children: SIGTERM and SIGHUP raise SweepStopped in the main thread (as
    SIGINT raises KeyboardInterrupt), so that the executor's clean-up stops the children first."""
    if not _main_thread():
        yield
        return

    def raise_stop(signum: int, frame: Any) -> None:
        for s in (signal.SIGTERM, signal.SIGHUP):  # once: a second signal must not cut the clean-up
            signal.signal(s, signal.SIG_IGN)
        raise SweepStopped(signum)

    previous = {s: signal.signal(s, raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev)


def die_with_parent() -> None:
    """In a sweep's child: ask for SIGTERM when the sweep dies (Linux prctl PR_SET_PDEATHSIG; elsewhere
    a thread that watches the parent pid), and end now if the sweep died before we could ask."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    parent_pid = int(parent)
    armed = False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(1, signal.SIGTERM, 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the sweep died before the request: do as it would have asked
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not armed:
        def watch() -> None:
            import time

            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
