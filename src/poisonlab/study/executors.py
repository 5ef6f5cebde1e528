"""Executors: run a sweep's runs, one config file each, and say how each one ended.

- `inline`: in this process, one after another (debugging, tests with a closure as run function).
- `local`: K child processes side by side, each pinned to T threads. On a 2-core machine two 1-thread
  jobs give more total throughput than one 2-thread job (small models do not scale across threads).
  The children run in the sweep's own process group and end with it (signals.py): a signal to the
  sweep is passed on to them (each stops as the trainer does: SIGINT at once, SIGTERM after a
  checkpoint), and each asks the kernel to be sent SIGTERM if the sweep dies, even by kill -9.
- `slurm`: through submitit (`cluster="local"` or `"debug"` run the same path without a cluster).

Every executor calls `run_one(config_path)`, which skips a finished run (DONE), lets the run function
resume an interrupted one, and records a failure in `FAILED` (message, traceback, log tail) instead of
raising, so one broken run never stops the others. A run that another live process trains (its
`runs/<name>/.lock` is held: a second sweep, a requeued Slurm job) is reported as `busy`, with who
holds it, and its files are left alone. A run stopped by a signal (exit 128 + the signal) is `stopped`:
not a failure, no FAILED; the next sweep resumes it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from poisonlab.config import RunConfig, load_run_config
from poisonlab.errors import UserError
from poisonlab.fsutil import write_text
from poisonlab.rundir import lock as runlock
from poisonlab.signals import PARENT_ENV, SweepStopped, stop_on_signals
from poisonlab.signals import name as signal_name

RunFn = Callable[[RunConfig], Any]
Status = Literal["done", "skipped", "failed", "busy", "stopped", "broken"]
BUSY_EXIT = 75  # exit status of `run-one` for a busy run (EX_TEMPFAIL: try again later)
# a child stopped by a signal: 128 + SIGINT / SIGTERM / SIGUSR2 (its own exit), or killed by one
STOP_EXITS = frozenset({130, 143, 140, -signal.SIGINT, -signal.SIGTERM, -signal.SIGUSR2})
STOP_GRACE_S = 300.0  # how long a stopped sweep waits for its runs to checkpoint before SIGKILL

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
LOG_TAIL_LINES = 40


@dataclass
class Job:
    """One run to execute: its config file (written by the sweep) and where its results go."""

    name: str
    config_path: Path
    run_dir: Path
    model: str = ""
    data_mult: float = 1.0


@dataclass
class Outcome:
    name: str
    status: Status
    seconds: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    def run(
        self, jobs: list[Job], on_start: Callable[[Job], None], on_finish: Callable[[Outcome], None]
    ) -> None: ...


# --- one run -------------------------------------------------------------------------------------


def default_run_fn(cfg: Any) -> Any:
    """The real run: train (which evaluates as it goes and resumes from its last checkpoint), or for a
    fine-tuning config (`kind: finetune`) the fine-tuning run."""
    if getattr(cfg, "kind", None) == "finetune":
        from poisonlab.finetune.loop import finetune

        return finetune(cfg)
    from poisonlab.training.trainer import train  # imported late: torch is heavy and tests never need it

    return train(cfg, resume=True, progress=False)


def load_any_config(path: str | Path) -> Any:
    """A run config file of either kind: pretraining (RunConfig) or fine-tuning (`kind: finetune`)."""
    from poisonlab.config import load_yaml
    from poisonlab.finetune.config import is_finetune_tree, load_finetune_config

    tree = load_yaml(path)
    if is_finetune_tree(tree):
        return load_finetune_config(path, tree=tree)
    return load_run_config(path)


def one_process(config_path: str | Path) -> bool:
    """Whether a run's loop is one process (fine-tuning), not one rank per GPU (pretraining)."""
    from poisonlab.config import load_yaml
    from poisonlab.finetune.config import is_finetune_tree

    return is_finetune_tree(load_yaml(config_path))


def slurm_parameters(params: dict[str, Any], one: bool) -> dict[str, Any]:
    """submitit parameters of one job: one task (rank) per GPU for a distributed run unless told
    otherwise; one task on one node and at most one GPU for a run whose loop is one process (more tasks
    would be copies of the run racing for its lock)."""
    out = dict(params)
    if one:
        out.update(tasks_per_node=1, nodes=1)
        if "gpus_per_node" in out:
            out["gpus_per_node"] = min(1, int(out["gpus_per_node"]))
    elif "gpus_per_node" in out:
        out.setdefault("tasks_per_node", out["gpus_per_node"])
    return out


def resolve_run_fn(fn: RunFn | str | None) -> RunFn:
    """A callable, a `module:function` string (how child processes receive it), or None (train)."""
    if fn is None:
        return default_run_fn
    if callable(fn):
        return fn
    mod, _, attr = fn.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def fn_spec(fn: RunFn | str | None) -> str | None:
    """The `module:function` string that names `fn` in a child process."""
    if fn is None or isinstance(fn, str):
        return fn
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not mod or "<" in qual:
        raise ValueError(f"run function {fn!r} must be a module-level function to run in a child process")
    return f"{mod}:{qual}"


def set_thread_env(threads: int | None) -> None:
    """Pin BLAS/OpenMP pools; must happen before torch is imported in this process."""
    if threads:
        for k in THREAD_ENV:
            os.environ[k] = str(threads)


def tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def record_failure(run_dir: Path, message: str, detail: str = "", logs: tuple[Path, ...] = ()) -> None:
    """Write `FAILED`: the one-line message first (what `poisonlab results` shows), then the details."""
    parts = [message.strip().splitlines()[0] if message.strip() else "failed", ""]
    if detail:
        parts += [detail.rstrip(), ""]
    for log in (run_dir / "log.jsonl", *logs):
        t = tail(log)
        if t:
            parts += [f"--- last lines of {log} ---", t, ""]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "FAILED", "\n".join(parts))


def failure_message(run_dir: Path) -> str | None:
    """The first line of a run's FAILED (its one-line reason), or None if there is none to read."""
    try:
        return (run_dir / "FAILED").read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None


def busy_message(run_dir: Path) -> str:
    return f"busy: held by {runlock.describe(runlock.read_holder(run_dir))}"


def run_one(config_path: str | Path, *, threads: int | None = None, fn: RunFn | str | None = None) -> Status:
    """Run one config unless it is finished or busy; never raises for a failing run (it writes FAILED).

    Under a distributed launch (WORLD_SIZE > 1: one process per GPU) every rank calls this: the
    trainer's own lock check is collective, so no rank looks at the lock here (rank 0 may hold it)
    and only rank 0 writes FAILED."""
    set_thread_env(threads)
    cfg = load_any_config(config_path)
    run_dir = cfg.run_dir
    main = int(os.environ.get("RANK", "0")) == 0
    if (run_dir / "DONE").exists():
        return "skipped"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and runlock.busy(run_dir) is not None:
        return "busy"  # trained by another live process: touch nothing of it
    if main:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / "FAILED").unlink()  # a retry starts clean
    if threads and cfg.train.threads is None:
        cfg.train.threads = threads
    try:
        resolve_run_fn(fn)(cfg)
        if not (run_dir / "DONE").exists():
            raise RuntimeError(f"the run function returned but {run_dir / 'DONE'} was not written")
    except runlock.RunBusy:  # another process took the lock after our look
        return "busy"
    except Exception as e:
        if main:  # a UserError says what is wrong in its own words; anything else names its type
            msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            record_failure(run_dir, msg, traceback.format_exc())
        return "failed"
    return "done"


class SubmititRun:
    """One run as a submitit job: one task per GPU (`tasks_per_node = gpus_per_node`, any number of
    nodes; one task for a fine-tuning run, whose loop is one process), each task a rank of the run
    with the distributed environment taken from submitit (TorchDistributedEnvironment: MASTER_ADDR/PORT,
    RANK, WORLD_SIZE, LOCAL_RANK). Checkpointable: on Slurm's signal before a time limit or preemption
    the trainer checkpoints at the next step and submitit requeues this same job, which resumes there;
    so a run longer than a partition's limit finishes over several jobs (slurm.max_num_timeout of them)."""

    def __init__(self, config_path: str, threads: int | None, fn: str | None, paths: list[str]):
        self.config_path, self.threads, self.fn, self.paths = config_path, threads, fn, paths

    def __call__(self) -> str:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        from poisonlab.signals import Stopped

        # a run function named by string must import on the node as it did here (shared filesystem)
        sys.path.extend(p for p in self.paths if p not in sys.path)
        if submitit.JobEnvironment().num_tasks > 1:
            # each task sees every GPU of its node and takes cuda:LOCAL_RANK (distributed.py).
            # overwrite: a MASTER_PORT set in the job's environment (common in sbatch scripts) is
            # the port submitit takes anyway; without it export refuses to run at all
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            return run_one(self.config_path, threads=self.threads, fn=self.fn)
        except Stopped:  # ranks other than 0 (rank 0 is requeued by submitit's handler and exits)
            return "stopped"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on the signal: requeue this job as it is (the trainer has checkpointed)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


# --- executors -----------------------------------------------------------------------------------


class InlineExecutor:
    """Runs jobs in this process, one after another; `fn` may be any callable (a closure too)."""

    def __init__(self, fn: RunFn | str | None = None) -> None:
        self.fn = fn

    def run(
        self, jobs: list[Job], on_start: Callable[[Job], None], on_finish: Callable[[Outcome], None]
    ) -> None:
        for job in jobs:
            on_start(job)
            t0 = time.monotonic()
            status = run_one(job.config_path, fn=self.fn)
            on_finish(Outcome(job.name, status, time.monotonic() - t0, _error(status, job.run_dir)))


class LocalExecutor:
    """K child processes side by side, each with T threads; output of each goes to `logs/<name>.log`."""

    def __init__(
        self, jobs: int, threads: int, logs_dir: Path, fn: RunFn | str | None = None, poll_s: float = 0.2,
        grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.k, self.threads, self.logs_dir, self.poll_s = max(1, jobs), max(1, threads), logs_dir, poll_s
        self.spec, self.grace_s = fn_spec(fn), grace_s

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[PARENT_ENV] = str(os.getpid())  # the child ends when we do (signals.die_with_parent)
        for k in THREAD_ENV:
            env[k] = str(self.threads)
        if self.spec:  # the child must import the run function the way this process does
            paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env

    def _start(self, job: Job, env: dict[str, str]) -> tuple[subprocess.Popen, Path, float]:
        cmd = [sys.executable, "-m", "poisonlab.study.sweep", "run-one", str(job.config_path)]
        cmd += ["--threads", str(self.threads)]
        if self.spec:
            cmd += ["--fn", self.spec]
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / f"{job.name}.log"
        with open(log, "ab") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            f.flush()
            # in our process group (no new session): a signal to the group reaches every run at once
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        return proc, log, time.monotonic()

    def run(
        self, jobs: list[Job], on_start: Callable[[Job], None], on_finish: Callable[[Outcome], None]
    ) -> None:
        env = self._env()
        pending: deque[Job] = deque(jobs)
        running: dict[str, tuple[Job, subprocess.Popen, Path, float]] = {}
        try:
            with stop_on_signals():
                while pending or running:
                    while pending and len(running) < self.k:
                        job = pending.popleft()
                        on_start(job)
                        proc, log, t0 = self._start(job, env)
                        running[job.name] = (job, proc, log, t0)
                    for name, (job, proc, log, t0) in list(running.items()):
                        rc = proc.poll()
                        if rc is None:
                            continue
                        del running[name]
                        on_finish(self._outcome(job, rc, log, time.monotonic() - t0))
                    if running:
                        time.sleep(self.poll_s)
        except BaseException as e:
            # whatever ends us (a signal, Ctrl-C, an error) ends the runs first: no orphans
            signum = (signal.SIGINT if isinstance(e, KeyboardInterrupt)
                      else e.signum if isinstance(e, SweepStopped) else signal.SIGTERM)
            killed = _stop_all([proc for _j, proc, _l, _t in running.values()], signum, self.grace_s)
            stopped = []
            for job, proc, log, t0 in running.values():
                o = self._outcome(job, proc.returncode, log, time.monotonic() - t0)
                if proc in killed:
                    o = Outcome(job.name, "stopped", o.seconds, f"killed: not stopped {self.grace_s:.0f} s "
                                f"after {signal_name(signum)}; resumes from its last checkpoint")
                if o.status == "stopped":
                    stopped.append(o.name)
                on_finish(o)
            if isinstance(e, KeyboardInterrupt | SweepStopped):
                detail = f": {len(stopped)} run(s) stopped ({', '.join(stopped)})" if stopped else ""
                raise SweepStopped(signum, detail) from None
            raise

    @staticmethod
    def _outcome(job: Job, rc: int, log: Path, seconds: float) -> Outcome:
        if rc == 0:
            return Outcome(job.name, "done", seconds)
        if rc == BUSY_EXIT:  # not a failure, and the other process's run is not ours to mark FAILED
            return Outcome(job.name, "busy", seconds, busy_message(job.run_dir))
        if rc in STOP_EXITS:  # a signal stopped it (after a checkpoint on SIGTERM): it resumes, no FAILED
            last = (tail(log, 1) or f"exit code {rc}").strip()
            return Outcome(job.name, "stopped", seconds, last.removeprefix("run-one: "))
        if not (job.run_dir / "FAILED").exists():  # killed, or crashed before it could say why
            why = f"exit code {rc}" + (f" (signal {-rc})" if rc < 0 else "")
            record_failure(job.run_dir, f"child process ended with {why}", logs=(log,))
        else:
            with open(job.run_dir / "FAILED", "a", encoding="utf-8") as f:
                f.write(f"--- last lines of {log} ---\n{tail(log)}\n")
        return Outcome(job.name, "failed", seconds, failure_message(job.run_dir))


def _error(status: Status, run_dir: Path) -> str | None:
    """The one line an outcome shows: FAILED's first line, or who holds a busy run."""
    if status == "failed":
        return failure_message(run_dir)
    return busy_message(run_dir) if status == "busy" else None


def _stop_all(procs: list[subprocess.Popen], signum: int, grace_s: float) -> list[subprocess.Popen]:
    """Pass `signum` on to every child still running (SIGINT as SIGINT: stop now; anything else as
    SIGTERM: checkpoint at the next step, then stop), wait for all of them together, and SIGKILL those
    still there after `grace_s` or a second signal. Returns the children that had to be killed."""
    sent = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sent)
    hurry: list[int] = []  # a second signal while we wait: kill the rest now
    with _caught(hurry.append):
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline and not hurry:
            time.sleep(0.05)
        killed = [p for p in procs if p.poll() is None]
        for p in killed:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
    return killed


@contextlib.contextmanager
def _caught(record: Callable[[int], None]):
    """SIGINT, SIGTERM and SIGHUP only recorded for the block (the main thread's clean-up must finish)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, frame: record(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev)


class SubmititExecutor:
    """Slurm through submitit; `cluster="local"`/`"debug"` use submitit's local executors (CI)."""

    def __init__(
        self,
        folder: Path,
        threads: int | None = None,
        fn: RunFn | str | None = None,
        cluster: str | None = None,
        parameters: dict[str, Any] | None = None,
        poll_s: float = 5.0,
    ) -> None:
        self.folder, self.threads, self.cluster, self.poll_s = folder, threads, cluster, poll_s
        self.parameters = dict(parameters or {})
        self.spec = fn_spec(fn)

    def run(
        self, jobs: list[Job], on_start: Callable[[Job], None], on_finish: Callable[[Outcome], None]
    ) -> None:
        try:
            import submitit
        except ImportError:
            from poisonlab.errors import UserError

            raise UserError("the slurm executor needs submitit: pip install 'poisonlab[slurm]'") from None
        params = {"name": "poisonlab", **self.parameters}
        if self.threads and "cpus_per_task" not in params:
            params["cpus_per_task"] = self.threads
        paths = [p for p in sys.path if p] if self.spec else []
        handles: list[Any] = [None] * len(jobs)
        kinds = [one_process(j.config_path) for j in jobs]
        ex: Any = None
        for one in sorted(set(kinds)):  # a job array per kind of job: an array shares its parameters
            ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
            ex.update_parameters(**slurm_parameters(params, one))
            mine = [i for i, k in enumerate(kinds) if k == one]
            tasks = [SubmititRun(str(jobs[i].config_path), self.threads, self.spec, paths) for i in mine]
            if ex.cluster == "slurm":  # one job array: one scheduler call however many runs
                with ex.batch():
                    got = [ex.submit(t) for t in tasks]
            else:
                got = [ex.submit(t) for t in tasks]
            for i, h in zip(mine, got, strict=True):
                handles[i] = h
        t0 = time.monotonic()
        for job in jobs:
            on_start(job)
        waiting = dict(zip([j.name for j in jobs], zip(jobs, handles, strict=True), strict=True))
        while waiting:
            for name, (job, h) in list(waiting.items()):
                if ex.cluster != "debug" and not h.done():
                    continue
                del waiting[name]
                try:
                    status = h.results()[0]  # rank 0's (a job of one task per GPU has several)
                    err = _error(status, job.run_dir)
                except Exception as e:  # the job itself died (node failure, timeout, OOM kill)
                    last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                    msg = f"submitit job {h.job_id} failed: {last}"
                    record_failure(job.run_dir, msg, str(e), logs=(Path(str(h.paths.stderr)),))
                    status, err = "failed", msg
                on_finish(Outcome(name, status, time.monotonic() - t0, err, {"job_id": h.job_id}))
            if waiting:
                time.sleep(self.poll_s)
