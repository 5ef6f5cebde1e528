"""`poisonlab status SWEEP`: where a sweep stands, read from its files while it runs.

Reading only: nothing is written, nothing is recovered or cleaned, no lock is held (whether a run is
running is a look at its lock, rundir/lock.busy, which never blocks or disturbs the trainer holding
it). Every run of the sweep (configs/, and any run directory beside them) is in one state:

    done         DONE is there (finished; `poisonlab verify` checks its files)
    running      a live process holds the run's lock
    failed       FAILED is there (its first line says why); the next `poisonlab sweep` retries it
    stopped      started, not running, not failed (a signal or a killed sweep): resumes from its last
                 checkpoint when the sweep is started again
    not started  no run directory yet

For a running run: its step of total (the last line of log.jsonl), its latest ASR (metrics.parquet)
and its training speed (tokens/s over the last lines of log.jsonl: their tokens over their time, so
evaluation and checkpoint pauses are not in it).

ETA, what it assumes (said again in the output): a run's time left is its tokens left at its model's
tokens/s, plus its evaluations left at its model's mean seconds per evaluation so far. A model's speed
is measured on the runs training it now (else on its other runs); a model not measured yet gets a
measured model's speed scaled by FLOPs per token (equal MFU). The sweep's ETA places the runs still to
do, in the sweep's order (run_order), on as many slots as runs train side by side now (or --jobs, or
one per core when none does), each starting when a slot frees. Failed runs are not counted (a running
sweep does not retry them), nor is the start-up of each run (imports, data, poisons: seconds).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from poisonlab.errors import UserError
from poisonlab.rundir import lock as runlock
from poisonlab.study.executors import failure_message

STATES = ("done", "running", "failed", "stopped", "not started")
LOG_LINES = 20  # the log lines a speed is measured over
_TAIL_BYTES = 1 << 16


@dataclass
class RunStatus:
    name: str
    state: str  # one of STATES
    kind: str = "pretrain"  # pretrain | finetune
    model: str | None = None
    n_poison: int | None = None
    data_mult: float | None = None
    seed: int | None = None
    step: int | None = None  # running: its last log line; stopped: its last checkpoint; done: the end
    total_steps: int | None = None
    tokens_per_step: int | None = None
    asr: float | None = None  # the latest evaluation's
    asr_step: int | None = None
    tokens_per_s: float | None = None  # measured on this run's last log lines
    eval_seconds: float | None = None  # mean seconds per evaluation so far
    evals_left: int | None = None
    speed_from: str | None = None  # where the speed of the ETA comes from
    eta_s: float | None = None  # running / stopped / not started: time left for this run
    reason: str | None = None  # failed: FAILED's first line; or why a figure is missing
    holder: dict[str, Any] | None = None  # running: who holds the lock (host, pid, since, command)
    flops_per_token: int | None = field(default=None, repr=False)
    order: tuple = field(default=(), repr=False)

    @property
    def tokens_left(self) -> int | None:
        if None in (self.total_steps, self.tokens_per_step):
            return None
        return max(0, self.total_steps - (self.step or 0)) * self.tokens_per_step


@dataclass
class SweepStatus:
    sweep_dir: Path
    name: str
    runs: list[RunStatus]
    jobs: int
    jobs_from: str
    eta_s: float | None
    assumptions: list[str]

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        runs = []
        for r in self.runs:
            d = asdict(r)
            d.pop("flops_per_token")
            d.pop("order")
            d["tokens_left"] = r.tokens_left
            runs.append(d)
        return {"sweep": str(self.sweep_dir), "name": self.name, "runs_total": len(self.runs),
                "counts": {s: self.count(s) for s in STATES}, "jobs": self.jobs, "jobs_from": self.jobs_from,
                "eta_s": self.eta_s, "assumptions": self.assumptions, "runs": runs}


# --- reading one run --------------------------------------------------------------------------------


def log_tail(path: Path, n: int = LOG_LINES) -> list[dict[str, Any]]:
    """The last `n` whole training lines of log.jsonl (a line being written is skipped), read from the
    end of the file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            chunk = f.read()
    except OSError:
        return []
    lines = chunk.split(b"\n")
    if size > _TAIL_BYTES:
        lines = lines[1:]  # the first is cut
    out = []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("tokens_per_s") and "step" in e:
            out.append(e)
    return out[-n:]


def speed(lines: list[dict[str, Any]]) -> float | None:
    """tokens/s over log lines: their tokens over their time (each line's rate is over the tokens
    since the line before it)."""
    pairs = []
    for prev, e in zip([None, *lines], lines, strict=False):
        tokens = (e.get("tokens_seen", 0) - prev.get("tokens_seen", 0)) if prev is not None else None
        pairs.append((tokens, float(e["tokens_per_s"])))
    known = [(t, r) for t, r in pairs if t and t > 0]
    if known:
        return sum(t for t, _ in known) / sum(t / r for t, r in known)
    return len(pairs) / sum(1 / r for _, r in pairs) if pairs else None


def _checkpoint_step(run_dir: Path) -> int | None:
    """The newest complete checkpoint's step (read-only: list_checkpoints would finish cut writes)."""
    root = run_dir / "checkpoints"
    try:
        names = [p.name for p in root.iterdir()
                 if p.name.startswith("step_") and (p / "state.json").is_file()]
    except OSError:
        return None
    steps = [int(n.removeprefix("step_")) for n in names if n.removeprefix("step_").isdigit()]
    return max(steps) if steps else None


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = run_dir / "metrics.parquet"
    if not path.is_file():
        return []
    try:  # written by rename: a reader sees a whole file
        cols = [c for c in ("step", "asr", "eval_seconds", "steps_total") if c in pq.read_schema(path).names]
        return pq.read_table(path, columns=cols).to_pylist()
    except Exception:  # pyarrow raises several kinds for a damaged file; status reports what it can
        return []


def _state(run_dir: Path) -> tuple[str, dict | None, str | None]:
    if (run_dir / "DONE").exists():
        return "done", None, None
    holder = runlock.busy(run_dir) if run_dir.is_dir() else None
    if holder is not None:
        return "running", holder, None
    if (run_dir / "FAILED").exists():
        return "failed", None, failure_message(run_dir) or "failed (FAILED has no reason to read)"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "stopped", None, None
    return "not started", None, None


class _LedgerCounter:
    """poisons_seen from a ledger's steps (as injection.stream.poisons_seen), sorted once."""

    def __init__(self, steps: Any):
        import numpy as np

        self.steps = np.sort(np.asarray(steps))

    def poisons_seen(self, steps_done: int) -> int:
        import numpy as np

        return int(np.searchsorted(self.steps, steps_done, "left"))


def _evals_left(cfg: Any, n_steps: int, after: int, ledger: Path) -> int:
    """Evaluations at steps > `after`: exact from the ledger where the run has one; else the evenly
    spaced ones plus every poison milestone (an upper bound: a milestone may fall on an even step)."""
    from poisonlab.training.schedule import eval_steps, milestone_grid

    if ledger.is_file():
        import pyarrow.parquet as pq

        try:
            steps = pq.read_table(ledger, columns=["step"]).column("step").to_numpy()
            return sum(s > after for s in eval_steps(cfg, n_steps, _LedgerCounter(steps)))
        except Exception:
            pass  # a ledger being rewritten or damaged: the estimate below
    even = eval_steps(cfg, n_steps, _LedgerCounter([]))  # no poisons: no milestone is reached
    milestones = set(cfg.eval.poison_milestones) | set(milestone_grid(cfg.eval, cfg.attack.n_poison))
    return sum(s > after for s in even) + len(milestones)


def run_status(name: str, config: Path | None, run_dir: Path) -> RunStatus:
    """One run's state and figures from its config and its files."""
    from poisonlab.config import load_yaml

    state, holder, reason = _state(run_dir)
    r = RunStatus(name, state, reason=reason, holder=holder)
    source = config if config is not None and config.is_file() else run_dir / "config.yaml"
    try:
        tree = load_yaml(source)
    except UserError as e:
        r.reason = r.reason or f"config unreadable: {e}"
        return r
    rows = _metrics(run_dir)
    if rows:
        last = max(rows, key=lambda x: x["step"])
        r.asr, r.asr_step = last.get("asr"), last["step"]
        secs = [x["eval_seconds"] for x in rows if x.get("eval_seconds") is not None]
        r.eval_seconds = sum(secs) / len(secs) if secs else None
    if (tree or {}).get("kind") == "finetune":
        _finetune(r, tree, rows)
    else:
        _pretrain(r, source, run_dir)
    return r


def _finetune(r: RunStatus, tree: dict, rows: list[dict[str, Any]]) -> None:
    # a fine-tuning run logs no tokens/s and knows its steps once its data is built: what its rows say
    r.kind = "finetune"
    r.n_poison = (tree.get("attack") or {}).get("n_poison")
    r.seed = (tree.get("train") or {}).get("seed")
    r.model = str(tree.get("model"))
    if rows:
        r.step = max(x["step"] for x in rows)
        r.total_steps = rows[-1].get("steps_total")
    if r.state == "done" and r.total_steps is not None:
        r.step = r.total_steps


def _pretrain(r: RunStatus, source: Path, run_dir: Path) -> None:
    from poisonlab.config import load_run_config
    from poisonlab.training.resolve import resolve_run

    try:
        resolved = resolve_run(load_run_config(source))
    except UserError as e:
        r.reason = r.reason or f"config: {e}"
        return
    cfg = resolved.cfg
    r.model = cfg.model.preset or f"d{cfg.model.d_model}-l{cfg.model.n_layers}"
    r.n_poison, r.data_mult, r.seed = cfg.attack.n_poison, cfg.train.data_mult, cfg.train.seed
    r.total_steps, r.tokens_per_step = resolved.n_steps, resolved.tokens_per_step
    r.flops_per_token = resolved.flops_per_token
    # the sweep's order (sweep.run_order): continuations last, then seed by seed, the longest first
    r.order = (cfg.init.run is not None, cfg.train.seed, -resolved.n_steps * r.tokens_per_step
               * max(resolved.params_total, 1))
    lines = log_tail(run_dir / "log.jsonl") if r.state in ("running", "done", "stopped") else []
    r.tokens_per_s = speed(lines)
    if r.state == "done":
        r.step = r.total_steps
    elif r.state == "running":
        r.step = lines[-1]["step"] if lines else _checkpoint_step(run_dir)
    elif r.state in ("stopped", "failed"):
        r.step = _checkpoint_step(run_dir) or 0  # where it resumes
    else:
        r.step = 0
    if r.state != "done":
        r.evals_left = _evals_left(cfg, resolved.n_steps, r.step or 0, run_dir / "ledger.parquet")


# --- the sweep ---------------------------------------------------------------------------------------


def _run_names(sweep_dir: Path) -> list[tuple[str, Path | None, Path]]:
    configs = sweep_dir / "configs"
    out: dict[str, tuple[Path | None, Path]] = {}
    for p in sorted(configs.glob("*.yaml")) if configs.is_dir() else []:
        out[p.stem] = (p, sweep_dir / "runs" / p.stem)
    runs = sweep_dir / "runs"
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        if d.is_dir() and d.name not in out and (d / "config.yaml").is_file():
            out[d.name] = (None, d)
    return [(n, c, d) for n, (c, d) in out.items()]


def sweep_status(sweep_dir: str | Path, *, jobs: int | None = None) -> SweepStatus:
    """Every run's state and figures, and the ETAs (module doc), read from the sweep directory."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such sweep directory")
    found = _run_names(sweep_dir)
    if not found:
        raise UserError(f"{sweep_dir}: not a sweep directory (no configs/*.yaml, no runs/*/config.yaml)")
    name = sweep_dir.name
    try:
        import yaml

        spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text(encoding="utf-8")) or {}
        name = spec.get("name", name)
    except (OSError, ValueError, AttributeError):
        pass
    runs = [run_status(n, c, d) for n, c, d in found]
    assumptions = _estimate(runs)
    running = sum(r.state == "running" for r in runs)
    todo = [r for r in runs if r.state in ("running", "stopped", "not started")]
    if jobs:
        k, jobs_from = jobs, "--jobs"
    elif running:
        k, jobs_from = running, "as many as run now"
    else:
        from poisonlab.study.sweep import default_jobs

        k, jobs_from = default_jobs(max(1, len(todo)))[0], "one per core, as none runs now"
    eta = _schedule(todo, k)
    assumptions.append(f"{k} run(s) side by side ({jobs_from}), each next run starting when one ends, in "
                       "the sweep's order; failed runs and each run's start-up not counted")
    return SweepStatus(sweep_dir, str(name), runs, k, jobs_from, eta, assumptions)


def _estimate(runs: list[RunStatus]) -> list[str]:
    """Each unfinished run's speed (its own, its model's, or a measured model's scaled by FLOPs per
    token) and ETA; returns what was assumed, in words."""
    import statistics

    said: list[str] = []
    by_model: dict[str, list[RunStatus]] = {}
    for r in runs:
        if r.model is not None and r.tokens_per_s:
            by_model.setdefault(r.model, []).append(r)
    speeds, evals, fpt = {}, {}, {}
    for m, rs in by_model.items():
        live = [r for r in rs if r.state == "running"] or rs
        speeds[m] = statistics.median(r.tokens_per_s for r in live)
        secs = [r.eval_seconds for r in rs if r.eval_seconds is not None]
        evals[m] = statistics.mean(secs) if secs else None
        fpt[m] = rs[0].flops_per_token
    scaled: dict[str, str] = {}
    for r in runs:
        if r.state not in ("running", "stopped", "not started") or r.tokens_left is None:
            continue
        tps, eval_s = r.tokens_per_s if r.state == "running" else None, r.eval_seconds
        r.speed_from = "this run's log" if tps else None
        if not tps and r.model in speeds:
            tps, r.speed_from = speeds[r.model], f"runs of {r.model}"
        if not tps and speeds and r.flops_per_token:
            ref = min(speeds, key=lambda m: abs(math.log((fpt[m] or 1) / r.flops_per_token)))
            tps = speeds[ref] * (fpt[ref] or 0) / r.flops_per_token
            r.speed_from = f"{ref} scaled by FLOPs/token"
            scaled[r.model or "?"] = ref
        if eval_s is None and r.model in evals:
            eval_s = evals[r.model]
        if eval_s is None and r.speed_from and r.speed_from.endswith("FLOPs/token"):
            ref = scaled[r.model or "?"]
            eval_s = None if evals.get(ref) is None else evals[ref] * fpt[ref] / r.flops_per_token
        if tps:
            r.eta_s = r.tokens_left / tps + (r.evals_left or 0) * (eval_s or 0.0)
    if speeds:
        said.append("tokens/s per model: " + ", ".join(f"{m} {v:,.0f}" for m, v in sorted(speeds.items()))
                    + " (the runs training now, else its other runs; the last log lines of each)")
    for m, ref in sorted(scaled.items()):
        guessed = [r for r in runs if r.model == m and r.eta_s is not None]
        said.append(f"{m}: not measured yet ({len(guessed)} runs, {hms(sum(r.eta_s for r in guessed))} of "
                    f"run time): {ref}'s speed scaled by FLOPs per token, at equal MFU (larger tiny "
                    "models reach a higher MFU, so this is likely too long)")
    said.append("evaluations left at the mean seconds per evaluation of the run (else of its model)")
    return said


def _schedule(todo: list[RunStatus], k: int) -> float | None:
    """When the last run ends: running runs hold their slots for their time left; the others start in
    the sweep's order on the slot that frees first. None when a run's time is unknown."""
    import heapq

    if any(r.eta_s is None for r in todo):
        return None
    running = [r.eta_s for r in todo if r.state == "running"]
    slots = sorted(running) + [0.0] * max(0, k - len(running))
    heapq.heapify(slots)
    end = max(running, default=0.0)
    for r in sorted((r for r in todo if r.state != "running"), key=lambda r: r.order):
        start = heapq.heappop(slots)
        heapq.heappush(slots, start + r.eta_s)
        end = max(end, start + r.eta_s)
    return end


# --- printing -----------------------------------------------------------------------------------------


def hms(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h{s % 3600 // 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def render(st: SweepStatus) -> Any:
    """What `poisonlab status` prints (rich renderables; fits 80 columns)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [
        Text.from_markup(f"[bold]sweep {escape(st.name)}[/] · {escape(str(st.sweep_dir))} · "
                         f"{len(st.runs)} runs"),
        Text.from_markup(" · ".join(f"{st.count(s)} {s}" for s in STATES)),
    ]
    running = [r for r in st.runs if r.state == "running"]
    if running:
        t = Table(box=None, padding=(0, 1), pad_edge=False)
        t.add_column("running", no_wrap=True, overflow="ellipsis", max_width=30)
        t.add_column("step of total", justify="right", no_wrap=True)
        t.add_column("ASR", justify="right", no_wrap=True)
        t.add_column("tok/s", justify="right", no_wrap=True)
        t.add_column("ETA", justify="right", no_wrap=True)
        for r in running:
            t.add_row(r.name, f"{_n(r.step)}/{_n(r.total_steps)}",
                      "-" if r.asr is None else f"{r.asr:.2f}",
                      "-" if not r.tokens_per_s else f"{r.tokens_per_s:,.0f}", hms(r.eta_s))
        parts += [Text(""), t]
    for state, color in (("failed", "red"), ("stopped", "yellow")):
        rs = [r for r in st.runs if r.state == state]
        if rs:
            parts.append(Text.from_markup(f"\n[{color}]{state}[/]"))
            for r in rs:
                why = r.reason if state == "failed" else (
                    f"resumes from step {_n(r.step)} of {_n(r.total_steps)} when the sweep starts again")
                parts.append(Text(_indent(f"{r.name}: {why}")))
    if any(r.state != "done" for r in st.runs):
        why = ""
        if st.eta_s is None:
            why = (" (no run has logged its speed yet)" if not any(r.tokens_per_s for r in st.runs)
                   else " (a run's size is unknown: see its reason in --json)")
        parts.append(Text.from_markup(f"\n[bold]ETA of the sweep: {hms(st.eta_s)}[/]{why}"))
        parts += [Text(_indent(a)) for a in st.assumptions]
    return Group(*parts)


def _indent(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=78, initial_indent="  ", subsequent_indent="  ")


def _n(x: int | None) -> str:
    return "?" if x is None else f"{x:,}"
