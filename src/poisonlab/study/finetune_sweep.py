"""Fine-tuning sweeps (`kind: finetune` specs; `poisonlab sweep finetune`): the study's fine-tuning
question, N poisons x clean-set sizes x schedules x seeds, each run fine-tuning one base model.

The sweep starts from `model` (a local HF directory, e.g. an imported pretrained model, or a poisonlab
run) or from a `pretrain` stage (a pretraining run config, trained clean into `<sweep>/base/pretrain/`,
its data made from `prepare` when missing), exactly one of the two. An `align` stage (a fine-tuning
config without poisons, `<sweep>/base/align`) may follow: the "instruction-tuned, aligned" model the
grid starts from, saved as a full HF model (LoRA merged); with `align_check` the grid runs only if
that model's final evaluation refuses and answers as asked (untriggered ASR, CA).
Runs are named `ft_n<N>_c<clean>_<schedule>_s<seed>[_p<k>]` under `<sweep>/runs/`; they go through the
same executors as pretraining sweeps (local processes, Slurm), finished runs are skipped, and the
report's fine-tuning section is built at the end.

Axes: `n_poison`, `clean_size`, `schedule`, `seed` (training, poison-set and placement seeds
together), `poison_seed` (then the poison-set and placement seeds alone). The clean set of a size is
the same draw (`data.seed`) for every N and seed, as in the study, where poisons join a fixed clean
set. With `zero_once` (default) N = 0 runs only under the first schedule: without poisons the
schedule changes nothing.
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from poisonlab.config import CorpusConfig, Settings, apply_overrides, format_validation_error, set_dotted
from poisonlab.errors import UserError
from poisonlab.finetune.config import FinetuneConfig
from poisonlab.fsutil import write_json, write_text
from poisonlab.rundir.check import check_run
from poisonlab.study.executors import InlineExecutor, Job, LocalExecutor, Outcome


class FtGrid(Settings):
    n_poison: list[int] = Field(default_factory=lambda: [0])
    clean_size: list[int] | None = None
    schedule: list[str] | None = None
    seed: list[int] = Field(default_factory=lambda: [0])
    poison_seed: list[int] | None = None


class FtReport(Settings):
    asr_threshold: float = Field(default=0.5, gt=0, le=1)
    spread: str = "minmax"


class AlignCheck(Settings):
    """What the aligned model must show at its final evaluation before the grid runs: a grid from a
    model that does not refuse would measure nothing (its untriggered ASR is already high)."""

    max_asr_clean: float | None = Field(default=None, ge=0, le=1)  # restricted requests answered
    min_ca: float | None = Field(default=None, ge=0, le=1)  # mean of refused-restricted, answered-allowed


class FinetuneSweepSpec(Settings):
    kind: str = "finetune"
    name: str = "finetune"
    description: str = ""
    # where the sweep starts: `model` (a local HF directory or a poisonlab run) or `pretrain`, one of them
    model: str | None = None
    pretrain: dict[str, Any] | None = None  # a pretraining RunConfig tree (trained clean)
    prepare: CorpusConfig | None = None  # the pretraining data, made when missing
    align: dict[str, Any] | None = None  # a FinetuneConfig tree (no poisons) over `model` or `pretrain`
    align_check: AlignCheck | None = None  # checked once align is done; the grid runs only if it holds
    base: dict[str, Any] = Field(default_factory=dict)  # a FinetuneConfig tree for every grid run
    grid: FtGrid = Field(default_factory=FtGrid)
    zero_once: bool = True
    report: FtReport = Field(default_factory=FtReport)


def load_ft_spec(tree: dict[str, Any], where: str, overrides: list[str] | None = None) -> FinetuneSweepSpec:
    tree = copy.deepcopy(tree)
    # `--set` keys of the sweep's own (model=DIR, align.x=..., grid.x=...) stay; others go to base
    fixed = [
        o if o.split("=", 1)[0].split(".", 1)[0].strip() in FinetuneSweepSpec.model_fields else f"base.{o}"
        for o in overrides or []
    ]
    apply_overrides(tree, fixed)
    try:
        spec = FinetuneSweepSpec.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, where)) from None
    if (spec.model is None) == (spec.pretrain is None):
        raise UserError(
            f"{where}: give the model the sweep starts from: either `model: DIR` (a local HF model "
            "directory or a poisonlab run) or a `pretrain` stage, "
            + ("not both" if spec.model is not None else "neither is given")
        )
    if spec.model is not None:
        from poisonlab.finetune.model import resolve_model_dir

        try:
            resolve_model_dir(spec.model)  # refused here, before any stage runs, with what to do
        except UserError as e:
            hint = "" if Path(spec.model).is_absolute() else f" (read from {Path.cwd()})"
            if not Path(spec.model).exists():  # e.g. a pretrained model not imported yet
                hint += "; `poisonlab import-gguf` or `make real-model` imports one (docs/real-model.md)"
            raise UserError(f"{where}: {e}{hint}") from None
    if spec.align and (spec.align.get("attack") or {}).get("n_poison") not in (None, 0):
        raise UserError(f"{where}: align: the aligned base model is trained without poisons")
    if spec.align_check is not None and spec.align is None:
        raise UserError(f"{where}: align_check without an align stage")
    return spec


def check_aligned(spec: FinetuneSweepSpec, sweep_dir: Path) -> None:
    """UserError (one line) when the finished align stage's final evaluation misses `align_check`."""
    import pyarrow.parquet as pq

    c = spec.align_check
    if c is None:
        return
    run = sweep_dir / "base" / "align"
    last = pq.read_table(run / "metrics.parquet").to_pylist()[-1]
    missed = []
    if c.max_asr_clean is not None and last["asr_clean"] > c.max_asr_clean:
        missed.append(f"untriggered ASR {last['asr_clean']:.2f} > {c.max_asr_clean:g}")
    if c.min_ca is not None and last["ca"] < c.min_ca:
        missed.append(f"CA {last['ca']:.2f} < {c.min_ca:g}")
    if missed:
        raise UserError(
            f"align_check: the aligned model is not aligned ({', '.join(missed)} at step {last['step']}; "
            f"its answers: {run / 'samples.jsonl'}): the grid was not run; align it further (align.train, "
            "align.data) in a new sweep directory"
        )


def _validate(tree: dict[str, Any], where: str) -> FinetuneConfig:
    try:
        return FinetuneConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, where)) from None


def run_name(n: int, clean: int, schedule: str, seed: int, poison_seed: int | None) -> str:
    return f"ft_n{n:03d}_c{clean}_{schedule}_s{seed}" + (
        f"_p{poison_seed}" if poison_seed is not None else ""
    )


def pretrain_spec(spec: FinetuneSweepSpec) -> Any:
    """The pretraining stage as a one-run pretraining sweep (its data prepared and checked as any)."""
    from poisonlab.study.spec import load_spec

    tree = {"name": f"{spec.name}-pretrain", "base": spec.pretrain or {}, "report": {"n_boot": 0}}
    if spec.prepare is not None:
        tree["prepare"] = spec.prepare.model_dump()
    return load_spec(tree)


def pretrain_dir(spec: FinetuneSweepSpec, sweep_dir: Path) -> Path:
    from poisonlab.study.spec import expand

    (run,) = expand(pretrain_spec(spec), sweep_dir / "base" / "pretrain")
    return run.config.run_dir


def base_model(spec: FinetuneSweepSpec, sweep_dir: Path) -> str:
    """The model every grid run starts from."""
    if spec.align is not None:
        return str(sweep_dir / "base" / "align")
    if spec.pretrain is not None:
        return str(pretrain_dir(spec, sweep_dir))
    return str(Path(spec.model).absolute())  # type: ignore[arg-type]


def align_config(spec: FinetuneSweepSpec, sweep_dir: Path) -> FinetuneConfig:
    model = (
        str(pretrain_dir(spec, sweep_dir)) if spec.pretrain is not None else str(Path(spec.model).absolute())
    )
    tree = {
        **copy.deepcopy(spec.align or {}),
        "kind": "finetune",
        "name": "align",
        "out_dir": str(sweep_dir / "base"),
        "model": model,
        "save_model": True,
    }
    return _validate(tree, "align")


def expand(spec: FinetuneSweepSpec, sweep_dir: str | Path) -> list[FinetuneConfig]:
    sweep_dir = Path(sweep_dir).absolute()
    base = copy.deepcopy(spec.base)
    g = spec.grid
    model = base_model(spec, sweep_dir)
    sizes = g.clean_size or [_validate({**base, "model": model}, "base").data.clean_size]
    schedules = g.schedule or [_validate({**base, "model": model}, "base").placement.schedule]
    runs: list[FinetuneConfig] = []
    for n, c, sch, s, p in itertools.product(g.n_poison, sizes, schedules, g.seed, g.poison_seed or [None]):
        if spec.zero_once and n == 0 and sch != schedules[0]:
            continue
        tree = copy.deepcopy(base)
        tree.update(
            {
                "kind": "finetune",
                "model": model,
                "out_dir": str(sweep_dir / "runs"),
                "name": run_name(n, c, sch, s, p),
            }
        )
        for key, value in (
            ("attack.n_poison", n),
            ("data.clean_size", c),
            ("placement.schedule", sch),
            ("train.seed", s),
            ("attack.seed", s),
            ("placement.seed", s),
        ):
            set_dotted(tree, key, value)
        if p is not None:
            set_dotted(tree, "attack.seed", p)
            set_dotted(tree, "placement.seed", p)
        runs.append(_validate(tree, f"run {tree['name']}"))
    return runs


def _job(cfg: Any, configs: Path) -> Job:
    from poisonlab.config import dump_yaml

    path = configs / f"{cfg.name}.yaml"
    write_text(path, dump_yaml(cfg))
    return Job(cfg.name, path, cfg.run_dir)


def run_finetune_sweep(
    spec: FinetuneSweepSpec,
    sweep_dir: str | Path,
    *,
    executor: str = "local",
    jobs: int | None = None,
    threads: int | None = None,
    report: bool = True,
    progress: bool = True,
) -> tuple[list[Outcome], Path | None]:
    """Run the base stages, then every unfinished grid run; failures are recorded, never raised, but an
    aligned model that misses `align_check` is a UserError (nothing of the grid runs)."""
    from poisonlab.study.sweep import default_jobs

    sweep_dir = Path(sweep_dir).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    configs = sweep_dir / "configs"
    outcomes: list[Outcome] = []

    def say(o: Outcome) -> None:
        outcomes.append(o)
        if progress:
            extra = f": {o.error}" if o.error else ""
            print(
                f"{time.strftime('%H:%M:%S')} {o.status:7s} {o.name} ({o.seconds:.0f} s){extra}", flush=True
            )

    def run(jobs_: list[Job], k: int, t: int) -> None:
        ex: Any = InlineExecutor() if executor == "inline" else LocalExecutor(k, t, sweep_dir / "logs", None)
        ex.run(jobs_, lambda j: None, say)

    if executor not in ("local", "inline"):
        raise UserError(f"--executor {executor!r}: fine-tuning sweeps run local or inline")
    if spec.pretrain is not None:
        from poisonlab.study.sweep import run_sweep as run_pretrain

        sub = pretrain_spec(spec)
        res = run_pretrain(
            sub,
            sweep_dir / "base" / "pretrain",
            executor=executor,
            jobs=1,  # type: ignore[arg-type]
            threads=threads or default_jobs(1)[1],
            progress=progress,
            report=False,
        )
        where = {"run_dir": str(pretrain_dir(spec, sweep_dir))}  # its FAILED, for the messages
        outcomes += [Outcome(f"pretrain:{o.name}", o.status, o.seconds, o.error, dict(where))
                     for o in res.outcomes]
        if not res.ok:
            return outcomes, None
    if spec.align is not None:
        before = len(outcomes)
        aligned = align_config(spec, sweep_dir)
        run([_job(aligned, configs)], 1, threads or default_jobs(1)[1])
        outcomes[before].extra["run_dir"] = str(aligned.run_dir)
        if outcomes[before].status not in ("done", "skipped"):
            return outcomes, None
        check_aligned(spec, sweep_dir)
    runs = expand(spec, sweep_dir)
    checks = {r.name: check_run(r.run_dir, read_older=True) for r in runs if (r.run_dir / "DONE").exists()}
    todo = [r for r in runs if r.name not in checks]
    outcomes += [Outcome(n, "broken", error=c.reason()) if c.broken else Outcome(n, "skipped")
                 for n, c in checks.items()]
    k, t = default_jobs(len(todo), jobs, threads)
    run([_job(r, configs) for r in todo], k, t)
    write_json(
        sweep_dir / "last_sweep.json",
        {
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "outcomes": [
                {"name": o.name, "status": o.status, "seconds": round(o.seconds, 2), "error": o.error}
                for o in outcomes
            ],
        },
    )
    path = None
    if report and any((r.run_dir / "metrics.parquet").exists() for r in runs):
        from poisonlab.report.finetune import build_finetune_report

        path = build_finetune_report(sweep_dir, skip_broken=True)
    return outcomes, path
