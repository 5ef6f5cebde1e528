"""Running a sweep: the data it needs, the disk it will use, the order of its runs, the executor that
trains them (skipping finished runs), its progress, and the report at the end. The spec and its
expansion into runs are spec.py.

`python -m poisonlab.study.sweep run-one CONFIG.yaml [--threads T] [--fn module:function]` runs one
config: that is what the local and Slurm executors start.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from poisonlab.config import (
    CorpusConfig,
    RunConfig,
)
from poisonlab.errors import UserError
from poisonlab.fsutil import write_json, write_text
from poisonlab.signals import SweepStopped
from poisonlab.study.executors import (
    BUSY_EXIT,
    InlineExecutor,
    Job,
    LocalExecutor,
    Outcome,
    RunFn,
    SubmititExecutor,
    run_one,
)
from poisonlab.study.spec import (
    PlannedRun,
    SweepSpec,
    _sizes,
    expand,
    plan_rows,
)


def data_needs(runs: list[PlannedRun], parents: list[PlannedRun] | None = None) -> list[dict[str, Any]]:
    """Per run: the clean training tokens its budget consumes and the tokens its data holds (None when
    the data is not prepared yet). Poison tokens are not subtracted: an upper bound, within ~1% here."""
    import json

    from poisonlab.training.resolve import resolve_run

    held: dict[Path, int | None] = {}
    by_dir = {r.config.run_dir: r for r in (parents or runs)}  # the runs continuations start from
    rows = []
    for r in runs:
        cfg = r.config
        header = Path(cfg.data) / "train.json"
        if cfg.data not in held:
            held[cfg.data] = int(json.loads(header.read_text())["n_tokens"]) if header.is_file() else None
        resolved = resolve_run(cfg)  # the preset's context length, not the default
        need = resolved.n_steps * resolved.tokens_per_step
        parent = by_dir.get(cfg.init.run) if cfg.init.continue_data else None
        if parent is not None:  # a continuation reads on after its earlier run's data
            p = resolve_run(parent.config)
            need += p.n_steps * p.tokens_per_step
        rows.append({"name": r.name, "data": str(cfg.data), "needs": need, "holds": held[cfg.data],
                     "repeat_allowed": cfg.train.allow_data_repeat})
    return rows


def check_data(runs: list[PlannedRun], parents: list[PlannedRun] | None = None) -> None:
    """Refuse, before anything starts, runs whose budget needs more than one pass over their data (each
    would otherwise fail on its own, minutes later); name the largest need so `prepare` can make it."""
    short = [d for d in data_needs(runs, parents) if d["holds"] is not None and not d["repeat_allowed"]
             and d["needs"] > d["holds"]]
    if short:
        worst = max(short, key=lambda d: d["needs"])
        raise UserError(
            f"{worst['data']}: holds {worst['holds']:,} training tokens, but {len(short)} run(s) need more "
            f"(up to {worst['needs']:,} for {worst['name']}); prepare it with --max-tokens "
            f"{worst['needs']} or more (the spec's `prepare` section), or set train.allow_data_repeat=true"
        )


def _trained_on(run_dir: Path) -> str | None:
    """The content hash of the data a run trained on, as its ledger recorded it (None: not recorded)."""
    import pyarrow as pa

    from poisonlab.injection.stream import read_ledger

    try:
        return read_ledger(run_dir / "ledger.parquet")[1].get("content_hash")
    except (UserError, OSError, ValueError, pa.ArrowException):
        return None


def check_runs_data(runs: list[PlannedRun]) -> None:
    """Refuse a started or finished run whose data directory now holds other data than it trained on
    (prepared again, e.g. by a newer corpus version): a finished one would be reported beside runs on
    the new data, under the new data's name, and a started one would resume on data it never saw."""
    for r in runs:
        trained = _trained_on(r.config.run_dir)
        try:
            now = json.loads((Path(r.config.data) / "train.json").read_text()).get("content_hash")
        except (OSError, ValueError):
            continue
        if trained and now and trained != now:
            raise UserError(
                f"{r.config.run_dir}: trained on data {trained[:12]}, but {r.config.data} now holds "
                f"{now[:12]} (prepared again since, e.g. by a newer corpus version); move the finished runs "
                "away or choose another output directory, so old and new runs are not mixed")


def prepare_data(spec: SweepSpec, runs: list[PlannedRun], progress: bool = True) -> None:
    """Make the sweep's data from its `prepare` section when it is not there yet."""
    from poisonlab.corpus.prepare import prepare

    for data in sorted({r.config.data for r in runs if Path(r.config.data).exists()}):
        if not (Path(data) / "train.json").is_file():  # every run would fail on it, one by one
            raise UserError(f"{data}: not a prepared data directory (no train.json); give base.data the "
                            "directory `poisonlab prepare` wrote")
    for data in sorted({r.config.data for r in runs if not Path(r.config.data).exists()}):
        if spec.prepare is None:
            raise UserError(f"data not prepared: {data} (run `poisonlab prepare` first, set base.data, "
                            "or give the spec a `prepare` section)")
        if progress:
            from rich.console import Console

            size = f"{spec.prepare.max_tokens:,} tokens" if spec.prepare.max_tokens else "all of it"
            Console(stderr=True).print(f"preparing {data} from the spec's `prepare` section "
                                       f"({spec.prepare.source}, {size})", highlight=False)
        prepare(spec.prepare, Path(data), progress=progress)


def run_order(runs: list[PlannedRun]) -> list[PlannedRun]:
    """Seed by seed, and within a seed the longest runs first: a sweep stopped part-way has whole seeds
    of every cell (not all seeds of the small sizes only), and side-by-side jobs finish together."""
    def cost(r: PlannedRun) -> float:
        return -(_sizes(r.config).get("tokens") or 0) * max(_sizes(r.config).get("params_total") or 1, 1)

    return sorted(runs, key=lambda r: (r.seed, cost(r)))


def check_disk(prepare: CorpusConfig | None, todo: list[RunConfig], sweep_dir: Path,
               jobs: int = 1) -> dict[str, Any]:
    """The bytes the runs still to do will write (checkpoints, samples, records: diskspace.run_bytes,
    less what their directories hold already; the checkpoint being written counted once per job) and
    the data `prepare` will make, per filesystem, against the space free there. Returns {path: {"need",
    "free", parts...}}; `refuse_short` turns a shortfall into one line."""
    from poisonlab.diskspace import data_bytes, free_bytes, used_bytes
    from poisonlab.training.resolve import resolve_run_config
    from poisonlab.training.schedule import run_bytes

    by_fs: dict[Any, dict[str, Any]] = {}

    def add(path: Path, part: str, n: int) -> None:
        p = Path(path).absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        e = by_fs.setdefault(p.stat().st_dev, {"path": str(path), "free": free_bytes(p), "need": 0})
        e["need"] += n
        e[part] = e.get(part, 0) + n

    biggest = 0
    for cfg in todo:
        need = run_bytes(resolve_run_config(cfg))
        ckpt_one = need["checkpoints"] // (cfg.train.keep_checkpoints + 1)
        biggest = max(biggest, ckpt_one)
        need["checkpoints"] -= ckpt_one  # the one being written: counted once per job below
        have = used_bytes(cfg.run_dir) if cfg.run_dir.exists() else 0
        for part, n in need.items():
            add(sweep_dir, part, n)
        add(sweep_dir, "checkpoints", -min(have, need["checkpoints"]))
    if todo:
        add(sweep_dir, "checkpoints", biggest * max(1, min(jobs, len(todo))))
    if prepare is not None:
        for data in sorted({cfg.data for cfg in todo if not Path(cfg.data).exists()}):
            add(data, "data", data_bytes(prepare) or 0)
    return {e["path"]: e for e in by_fs.values()}


def disk_line(e: dict[str, Any], n_runs: int) -> str:
    from poisonlab.diskspace import fmt_bytes

    parts = ", ".join(f"{k} {fmt_bytes(e[k])}" for k in ("checkpoints", "samples", "records", "data")
                      if e.get(k))
    free = fmt_bytes(e["free"]) if e["free"] is not None else "unknown"
    return f"{e['path']}: {n_runs} run(s) to do need ~{fmt_bytes(e['need'])} ({parts}); {free} free there"


def refuse_short(disk: dict[str, Any], n_runs: int) -> None:
    from poisonlab.diskspace import DiskFull

    for e in disk.values():
        if e["free"] is not None and e["need"] > e["free"]:
            raise DiskFull(e["path"], e["need"], e["free"],
                           what=f"not enough disk for the {n_runs} run(s) to do ({disk_line(e, n_runs)}); "
                                "lower train.keep_checkpoints or eval.save_samples, or put the sweep "
                                "elsewhere (--out)")


# --- running ---------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    sweep_dir: Path
    outcomes: list[Outcome]
    report: Path | None = None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def not_done(self) -> list[Outcome]:
        """Runs that did not end finished and verified: failed, broken, stopped or busy."""
        return [o for o in self.outcomes if o.status not in ("done", "skipped")]

    @property
    def ok(self) -> bool:
        """Every run of the sweep is finished (what exit status 0 of `poisonlab sweep` says)."""
        return not self.not_done

    def summary_line(self) -> str:
        extra = {"broken": "broken (finished, files failing their check)", "stopped": "stopped by a signal",
                 "busy": "busy (trained by another process)"}
        more = "".join(f", {self.count(k)} {v}" for k, v in extra.items() if self.count(k))
        return (f"{len(self.outcomes)} runs: {self.count('done')} done, {self.count('skipped')} skipped "
                f"(finished before), {self.count('failed')} failed{more}")


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_jobs(n_runs: int, jobs: int | None = None, threads: int | None = None,
                 cpus: int | None = None) -> tuple[int, int]:
    """(jobs, threads per job). By default one 1-thread job per core: on CPU, tiny models gain more
    from running side by side than from more threads each; the cores are shared out evenly."""
    cpus = cpus or available_cpus()
    k = jobs or max(1, min(n_runs, cpus))
    return k, threads or max(1, cpus // k)


def write_plan(spec: SweepSpec, runs: list[PlannedRun], sweep_dir: Path) -> None:
    """`sweep.yaml` (the spec as run), `configs/<name>.yaml` (what each child reads), `plan.json`."""
    # as given (explicit fields only), so that loading it expands to the same runs
    write_text(sweep_dir / "sweep.yaml",
               yaml.safe_dump(spec.model_dump(mode="json", exclude_unset=True), sort_keys=False))
    for r in runs:
        # explicit fields only: a model preset must not be shadowed by dumped default widths
        write_text(sweep_dir / "configs" / f"{r.name}.yaml", yaml.safe_dump(r.tree, sort_keys=False))
    write_json(sweep_dir / "plan.json", [{k: v for k, v in row.items() if k != "status"}
                                         for row in plan_rows(runs, sizes=False)])


def check_fit(spec: SweepSpec, runs: list[PlannedRun]) -> None:
    """Refuse (UserError) runs that cannot train on the spec's Slurm allocation: no layout fits in
    memory, or only FSDP (or activation checkpointing) would and the run is not set to use it."""
    from poisonlab.study.plan import get_gpu, plan_run

    gpu, per_node = get_gpu(spec.gpu or ""), int(spec.slurm.get("gpus_per_node", 1))
    nodes = int(spec.slurm.get("nodes", 1))
    bad = []
    for r in runs:
        p = plan_run(r.config, gpu, gpus_per_node=per_node, nodes=nodes)
        t = r.config.train
        if not p.fits:
            bad.append(f"{r.name}: {p.note}")
        elif p.strategy == "fsdp" and t.parallel != "fsdp":
            bad.append(f"{r.name}: fits only under FSDP: set train.parallel=fsdp")
        elif p.activation_checkpointing and not t.activation_checkpointing:
            bad.append(f"{r.name}: fits only with activation checkpointing: "
                       "set train.activation_checkpointing=true")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise UserError(f"sweep {spec.name}: {len(bad)} run(s) do not fit on {nodes} node(s) x {per_node} "
                        f"{gpu.name} (poisonlab plan): " + "; ".join(bad[:5]) + more)


def run_sweep(
    spec: SweepSpec,
    sweep_dir: str | Path,
    *,
    executor: Literal["local", "slurm", "inline"] = "local",
    jobs: int | None = None,
    threads: int | None = None,
    run_fn: RunFn | str | None = None,
    progress: bool = True,
    report: bool = True,
    slurm_cluster: str | None = None,
    poll_s: float | None = None,
) -> SweepResult:
    """Run every unfinished run of the sweep; failures are recorded, never raised. Then the report.

    `run_fn(cfg)` replaces `poisonlab.training.trainer.train` (tests); for `local`/`slurm` it must be a
    module-level function (the children import it by name).
    """
    from poisonlab.rundir.check import check_run

    sweep_dir = Path(sweep_dir).absolute()
    runs = expand(spec, sweep_dir)
    write_plan(spec, runs, sweep_dir)
    # a finished run counts only when its files pass their check; a broken one is reported, not
    # trained again over (its name, its file and what is wrong)
    # (an older version's run: its files read back)
    checks = {r.name: check_run(r.config.run_dir, read_older=True) for r in runs
              if (r.config.run_dir / "DONE").exists()}
    todo = [r for r in runs if r.name not in checks]
    k, t = default_jobs(len(todo), jobs, threads)
    if run_fn is None:  # fail once, up front, rather than once per run
        refuse_short(check_disk(spec.prepare, [r.config for r in todo], sweep_dir, k), len(todo))
        prepare_data(spec, todo, progress)
        check_data(todo, runs)
    check_runs_data([r for r in runs if r.name not in checks or not checks[r.name].broken])
    if executor == "slurm" and spec.gpu:
        check_fit(spec, todo)
    outcomes = [Outcome(n, "broken", error=c.reason()) if c.broken else Outcome(n, "skipped")
                for n, c in checks.items()]
    # continuations (persistence) start from runs of this sweep: they go second, once those are done
    later = [r for r in todo if r.config.init.run is not None]
    job_list = [Job(r.name, sweep_dir / "configs" / f"{r.name}.yaml", r.config.run_dir, r.model, r.data_mult)
                for r in run_order([r for r in todo if r not in later])]
    then = [Job(r.name, sweep_dir / "configs" / f"{r.name}.yaml", r.config.run_dir, r.model, r.data_mult)
            for r in run_order(later)]
    if executor == "inline":
        ex: Any = InlineExecutor(run_fn)
    elif executor == "local":
        ex = LocalExecutor(k, t, sweep_dir / "logs", run_fn, **({"poll_s": poll_s} if poll_s else {}))
    elif executor == "slurm":
        params = {"slurm_array_parallelism": jobs, **spec.slurm} if jobs else spec.slurm
        ex = SubmititExecutor(sweep_dir / "slurm", threads=threads, fn=run_fn, cluster=slurm_cluster,
                              parameters=params, **({"poll_s": poll_s} if poll_s else {}))
    else:
        raise UserError(f"unknown executor {executor!r}: use local, slurm or inline")

    display = SweepProgress(len(runs), len(outcomes), k if executor == "local" else 1)
    live = None
    if progress and job_list:
        from rich.console import Console
        from rich.live import Live

        live = Live(get_renderable=display.render, refresh_per_second=2, console=Console(stderr=True))
        live.start()
    result = SweepResult(sweep_dir, outcomes)
    try:
        for phase in (job_list, then):
            ex.run(phase, display.start, lambda o: (outcomes.append(o), display.finish(o)))
    except SweepStopped:  # the executor stopped its runs first; say where the sweep got to
        _write_last(sweep_dir, result)
        raise
    finally:
        if live is not None:
            live.stop()
            if not live.console.is_terminal:
                live.console.line()  # a redirected log: end the last status line
    _write_last(sweep_dir, result)
    if report and any((r.config.run_dir / "metrics.parquet").exists() for r in runs):
        from poisonlab.report.page import build_report

        result.report = build_report(sweep_dir, skip_broken=True)  # broken runs: listed in it, and above
    return result


def _write_last(sweep_dir: Path, result: SweepResult) -> None:
    write_json(sweep_dir / "last_sweep.json", {
        "summary": result.summary_line(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "outcomes": [{"name": o.name, "status": o.status, "seconds": round(o.seconds, 2), "error": o.error}
                     for o in result.outcomes]})


class SweepProgress:
    """What the live display shows: runs done/total, the ones running now, and an ETA.

    The ETA uses this session's per-run wall times, per model label and scaled by the data budget
    (cost grows with tokens), falling back to the mean over all finished runs.
    """

    def __init__(self, total: int, skipped: int, slots: int) -> None:
        self.total, self.skipped, self.slots = total, skipped, max(1, slots)
        self.running: dict[str, tuple[Job, float]] = {}
        self.timings: list[tuple[Job, float]] = []
        self.done = self.failed = 0
        self.t0 = time.monotonic()

    def start(self, job: Job) -> None:
        self.running[job.name] = (job, time.monotonic())

    def finish(self, o: Outcome) -> None:
        job, _ = self.running.pop(o.name, (None, 0.0))
        if o.status in ("failed", "stopped", "busy"):
            self.failed += 1
        else:
            self.done += 1
            if job is not None and o.status == "done":
                self.timings.append((job, o.seconds))

    def _guess(self, job: Job) -> float | None:
        same = [s * job.data_mult / j.data_mult for j, s in self.timings if j.model == job.model]
        pool = same or [s for _, s in self.timings]
        return sum(pool) / len(pool) if pool else None

    def eta(self, remaining_queued: int) -> float | None:
        if not self.timings:
            return None
        now = time.monotonic()
        left = 0.0
        for job, t0 in self.running.values():
            g = self._guess(job) or 0.0
            left += max(0.0, g - (now - t0))
        mean = sum(s for _, s in self.timings) / len(self.timings)
        left += remaining_queued * mean
        return left / self.slots

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        finished = self.skipped + self.done + self.failed
        queued = self.total - finished - len(self.running)
        eta = self.eta(queued)
        head = (f"[bold]{finished}/{self.total}[/] runs finished ({self.skipped} before this session, "
                f"{self.failed} failed, stopped or busy) · {len(self.running)} running · {queued} queued · "
                f"elapsed {_hms(time.monotonic() - self.t0)} · ETA {_hms(eta) if eta is not None else '?'}")
        table = Table(show_edge=False, box=None, padding=(0, 2))
        table.add_column("running now", no_wrap=True)
        table.add_column("for", justify="right")
        for name, (_job, t0) in self.running.items():
            table.add_row(name, _hms(time.monotonic() - t0))
        return Group(Text.from_markup(head), table) if self.running else Text.from_markup(head)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# --- child entry point -----------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m poisonlab.study.sweep")
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("run-one", help="run one config file (what the executors start)")
    one.add_argument("config")
    one.add_argument("--threads", type=int, default=None)
    one.add_argument("--fn", default=None, help="module:function to call instead of training.trainer.train")
    args = p.parse_args(argv)
    from poisonlab.signals import Interrupted, Stopped, die_with_parent

    die_with_parent()  # started by a sweep: end with it, even when it is killed with -9
    try:
        status = run_one(args.config, threads=args.threads, fn=args.fn)
    except UserError as e:  # the config itself is broken: say so in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Stopped, Interrupted) as e:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep may pass the terminal's Ctrl-C on too
        print(f"run-one: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(f"run-one: {status}", flush=True)
    return {"failed": 1, "busy": BUSY_EXIT}.get(status, 0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
