"""Sweeps: a grid of runs (sizes x poison counts x data budgets x seeds) from one YAML file or preset.

A sweep spec is a `base` run config plus `grid` axes; `also` adds blocks that replace some axes (the
study's design: 4 sizes at 1x, the two smallest also at 0.5x and 2x). `expand` turns it into RunConfigs
named like `tiny-99k_n050_x1.0_s0` under `<sweep_dir>/runs/`; `run_sweep` hands them to an executor,
skipping finished runs, and builds the report at the end.

Two seed axes: `seed` sets every key of `seed_keys` (training, attack and placement seeds together);
`poison_seed`, applied after it, sets `poison_seed_keys` (the attack and placement seeds: which
documents, prefixes, gibberish and insertion points the attacker draws), so `seed` x `poison_seed`
varies the training seed and the poison set independently (names gain `_p<k>`).

Running the expanded runs is sweep.py.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from poisonlab.config import (
    CorpusConfig,
    RunConfig,
    Settings,
    apply_overrides,
    format_validation_error,
    load_yaml,
    set_dotted,
)
from poisonlab.errors import UserError

PRESETS_DIR = Path(__file__).parent.parent / "presets"  # poisonlab/presets
RUN_SECTIONS = ("data", "attack", "placement", "model", "train", "eval")  # `--set train.lr=..` means base


class GridAxes(Settings):
    """Axes of a grid; an axis left out keeps the base config's value."""

    model: list[str | dict[str, Any]] | None = None  # ladder preset names, or model trees (+ `label`)
    n_poison: list[int] | None = None
    data_mult: list[float] | None = None
    seed: list[int] | None = None  # sets every key in the spec's `seed_keys`
    poison_seed: list[int] | None = None  # then sets the spec's `poison_seed_keys` (the poison set)
    # any other setting as an axis, by dotted key: {"placement.schedule": [uniform, front]}
    axes: dict[str, list[Any]] = Field(default_factory=dict)

    def over(self, other: GridAxes) -> GridAxes:
        """`other`'s axes replace this grid's; used for `also` blocks."""
        merged = self.model_dump(exclude_unset=True)
        # None is "not given" too: a spec dumped in full (as older sweep.yaml files are) lists every axis
        merged.update(other.model_dump(exclude_unset=True, exclude_none=True))
        return GridAxes.model_validate(merged)


class ReportSettings(Settings):
    asr_threshold: float = Field(default=0.5, gt=0, le=1)  # "success" = ASR at or above this
    spread: Literal["minmax", "std"] = "minmax"  # shaded band over seeds in the figures
    n_boot: int = Field(default=1000, ge=0)  # bootstrap refits per count-vs-fraction slope (0: none)


class ContinueSpec(Settings):
    """Training continued after the grid's runs (`poisonlab.training.continued`), one continuation per earlier
    run, from its last checkpoint at its last learning rate, on the clean data after what it consumed:
    clean (persistence), or with poisons of its own given in `base` (continued-pretraining attacks, the
    study's language-switch setting). Continuations run once every earlier run has finished."""

    clean_mult: float = Field(default=1.0, gt=0)  # its tokens, as a multiple of the earlier run's
    n_poison: list[int] | None = None  # continue only the runs with these N (None: every run, N = 0 too)
    base: dict[str, Any] = Field(default_factory=dict)  # settings over the earlier run's (eval, attack)
    label: str = Field(default="clean", pattern=r"^[A-Za-z0-9-]+$")  # in the names: <run>_<label>2.0x


class SweepSpec(Settings):
    name: str = "sweep"
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)  # a RunConfig tree shared by every run
    grid: GridAxes = Field(default_factory=GridAxes)
    also: list[GridAxes] = Field(default_factory=list)
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed", "attack.seed", "placement.seed"])
    # what the poison_seed axis sets, after `seed`: the attacker's draws, not the training order
    poison_seed_keys: list[str] = Field(default_factory=lambda: ["attack.seed", "placement.seed"])
    slurm: dict[str, Any] = Field(default_factory=dict)  # submitit parameters (timeout_min, gpus_per_node...)
    # the GPU of the Slurm nodes (poisonlab.study.plan.GPUS): `--executor slurm` plans every run on
    # slurm.nodes x slurm.gpus_per_node of them first and submits nothing when one does not fit
    gpu: str | None = None
    report: ReportSettings = Field(default_factory=ReportSettings)
    continue_clean: ContinueSpec | None = None  # persistence: clean training after each run
    # the data the sweep needs, as `poisonlab prepare` settings: made into base.data when it is missing
    prepare: CorpusConfig | None = None


@dataclass
class PlannedRun:
    name: str
    model: str
    n_poison: int
    data_mult: float
    seed: int
    config: RunConfig
    tree: dict[str, Any] = field(repr=False)  # as given (explicit fields only): what the child reads
    poison_seed: int | None = None  # the poison_seed axis' value, when the spec has that axis


# --- loading ---------------------------------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def spec_tree(spec: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the raw tree, where it came from) of a sweep file, a preset name, or a tree."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec), "sweep spec"
    path = Path(spec)
    if not path.is_file() and (PRESETS_DIR / f"{spec}.yaml").is_file():
        path = PRESETS_DIR / f"{spec}.yaml"
    elif not path.is_file():
        known = ", ".join(list_presets())
        raise UserError(f"{spec}: neither a sweep file nor a preset (presets: {known})")
    return load_yaml(path), str(path)


def load_spec(spec: str | Path | dict[str, Any], overrides: list[str] | None = None) -> SweepSpec:
    """A sweep file, a preset name, or a raw tree; `overrides` are `key=value` (a run section means base)."""
    tree, where = spec_tree(spec)
    if tree.get("kind") == "finetune":
        raise UserError(f"{where}: a fine-tuning sweep (kind: finetune): run it with `poisonlab sweep`")
    fixed = [f"base.{o}" if _section(o) in RUN_SECTIONS else o for o in overrides or []]
    apply_overrides(tree, fixed)
    try:
        out = SweepSpec.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, where)) from None
    try:
        RunConfig.model_validate(out.base)
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"{where}: base")) from None
    return out


def _section(override: str) -> str:
    return override.split("=", 1)[0].split(".", 1)[0].strip()


# --- expansion -------------------------------------------------------------------------------------


def _fmt_mult(m: float) -> str:
    return f"{m:.1f}" if round(m, 1) == m else f"{m:g}"


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "", str(value).replace(" ", "-")) or "x"


def _model_label(item: str | dict[str, Any] | None, base_model: dict[str, Any]) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and item.get("label"):
        return str(item["label"])
    m = item if isinstance(item, dict) else base_model
    if m.get("preset"):
        return str(m["preset"])
    return f"d{m.get('d_model', 64)}l{m.get('n_layers', 2)}"


def run_name(
    model: str, n_poison: int, data_mult: float, seed: int, extra: dict[str, Any] | None = None,
    poison_seed: int | None = None,
) -> str:
    """Stable, readable, sortable: `tiny-99k_n050_x1.0_s0[_p1][_schedule-front]` (`_p<k>` only from a
    poison_seed axis, so names of sweeps without one stay as they were)."""
    name = f"{_slug(model)}_n{n_poison:03d}_x{_fmt_mult(data_mult)}_s{seed}"
    if poison_seed is not None:
        name += f"_p{poison_seed}"
    # axes by key, not in the order the spec lists them: a spec written back with sorted keys names
    # the same runs
    for key, value in sorted((extra or {}).items()):
        name += f"_{_slug(key.rsplit('.', 1)[-1])}-{_slug(value)}"
    return name


def expand(spec: SweepSpec, sweep_dir: str | Path) -> list[PlannedRun]:
    """All runs of the sweep, in spec order, duplicates (same name and settings) dropped."""
    runs_dir = Path(sweep_dir).absolute() / "runs"
    blocks = [spec.grid] + [spec.grid.over(b) for b in spec.also]
    out: dict[str, PlannedRun] = {}
    for block in blocks:
        keys = list(block.axes)
        axes = [block.model, block.n_poison, block.data_mult, block.seed, block.poison_seed]
        axes = [a or [None] for a in axes + [block.axes[k] for k in keys]]  # left out: the base value
        for model, n, mult, seed, pseed, *extra in itertools.product(*axes):
            tree = copy.deepcopy(spec.base)
            base_model = dict(tree.get("model") or {})
            if isinstance(model, str):
                tree["model"] = {**base_model, "preset": model}
            elif isinstance(model, dict):
                tree["model"] = {**base_model, **{k: v for k, v in model.items() if k != "label"}}
            if n is not None:
                set_dotted(tree, "attack.n_poison", n)
            if mult is not None:
                set_dotted(tree, "train.data_mult", mult)
            if seed is not None:
                for key in spec.seed_keys:
                    set_dotted(tree, key, seed)
            if pseed is not None:  # after `seed`: seed x poison_seed crosses them
                for key in spec.poison_seed_keys:
                    set_dotted(tree, key, pseed)
            for key, value in zip(keys, extra, strict=True):
                set_dotted(tree, key, value)
            # paths absolute: children (and Slurm nodes) may start elsewhere
            tree["data"] = str(Path(tree.get("data", RunConfig().data)).absolute())
            tree["out_dir"] = str(runs_dir)
            label = _model_label(model, base_model)
            named = dict(zip(keys, extra, strict=True))
            where = f"{label} (n_poison={n}, data_mult={mult}, seed={seed}, poison_seed={pseed}, {named})"
            probe = _validate(tree, where)
            s = seed if seed is not None else probe.train.seed
            name = run_name(label, probe.attack.n_poison, probe.train.data_mult, s, named, pseed)
            tree["name"] = name
            cfg = _validate(tree, name)
            run = PlannedRun(name, label, cfg.attack.n_poison, cfg.train.data_mult, s, cfg, tree, pseed)
            if name in out and out[name].config != cfg:
                raise UserError(f"sweep {spec.name}: two different runs would both be named {name}")
            out.setdefault(name, run)
    runs = list(out.values())
    if spec.continue_clean is not None:
        runs += [continuation(r, spec.continue_clean) for r in runs
                 if spec.continue_clean.n_poison is None or r.n_poison in spec.continue_clean.n_poison]
    return runs


def continuation(parent: PlannedRun, spec: ContinueSpec) -> PlannedRun:
    """The clean continuation of a planned run: its model and data order, no poisons, `clean_mult` x
    its steps at its last learning rate (the schedule frame set past its end), its own name."""
    from poisonlab.results.store import flatten
    from poisonlab.training.resolve import resolve_run

    steps = resolve_run(parent.config).n_steps  # the preset's sizes, not the defaults
    tree = copy.deepcopy(parent.tree)
    set_dotted(tree, "attack.n_poison", 0)  # no poisons of its own unless `base` gives them
    for key, value in flatten(spec.base).items():
        set_dotted(tree, key, value)
    name = f"{parent.name}_{spec.label}{_fmt_mult(spec.clean_mult)}x"
    tree.update(name=name, init={"run": str(parent.config.run_dir)})
    set_dotted(tree, "train.max_steps", max(1, math.ceil(spec.clean_mult * steps)))
    set_dotted(tree, "train.schedule_offset", steps)
    set_dotted(tree, "train.schedule_steps", steps)
    cfg = _validate(tree, name)
    return PlannedRun(name, parent.model, cfg.attack.n_poison, parent.data_mult, parent.seed, cfg, tree,
                      parent.poison_seed)


def _validate(tree: dict[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"run {where}")) from None


def plan_rows(runs: list[PlannedRun], sizes: bool = True) -> list[dict[str, Any]]:
    """One row per run for `--dry-run` and `plan.json`; parameter counts when the model module knows."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"name": r.name, "model": r.model, "n_poison": r.n_poison,
                               "data_mult": r.data_mult, "seed": r.seed,
                               "status": run_status(r.config.run_dir)}
        if r.poison_seed is not None:
            row["poison_seed"] = r.poison_seed
        if sizes:
            row.update(_sizes(r.config))
        rows.append(row)
    return rows


def _sizes(cfg: RunConfig) -> dict[str, Any]:
    """Parameters and training tokens of a run (train.max_steps, when set, is what it trains; a run
    continued from an HF directory has the model of its config.json); an unknown model preset is the
    UserError the run itself would give."""
    from poisonlab.models.llama import count_params, resolve_model_config
    from poisonlab.training.continued import is_hf_dir
    from poisonlab.training.resolve import resolve_run_config

    model = (resolve_run_config(cfg).model if cfg.init.run is not None and is_hf_dir(cfg.init.run)
             else resolve_model_config(cfg.model))
    total, nonemb = count_params(model)
    t = cfg.train
    budget = nonemb if t.budget_params == "nonemb" else total
    tokens = (t.max_steps * t.batch_size * model.seq_len if t.max_steps is not None
              else int(budget * t.tokens_per_param * t.data_mult))
    return {"params_total": total, "params_nonemb": nonemb, "tokens": tokens}


def run_status(run_dir: Path) -> str:
    if (run_dir / "DONE").exists():
        return "done"
    if (run_dir / "FAILED").exists():
        return "failed"
    if run_dir.exists():
        return "started"
    return "new"
