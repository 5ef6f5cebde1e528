"""The results store: every evaluation row of every run, in Parquet, queried with DuckDB.

Each run writes `runs/<name>/metrics.parquet`; `gather` joins them into `<sweep_dir>/results.parquet`
(atomically) and adds a few columns so that every row stands alone:

- `run_name` (the run directory), `done` (DONE exists: the run finished);
- from the run's `config.yaml` when a metrics file lacks them (runs of older versions): `model`,
  `n_poison`, `data_mult`, `seed` (the training seed) and the columns of `CONFIG_COLUMNS`;
- `settings`: the run's whole config as JSON, flattened to dotted keys (`placement.schedule`), with
  `data_id` naming the training data by content (its shards' content hash), not by location;
- `tokens_total`: the run's training budget, `tokens_seen / progress` at its latest evaluation;
- `poison_fraction` (when the metrics lack it): `n_poison / tokens_total`, poisoned documents per
  training token. The true share of poisoned tokens is this times the mean poison length (a constant
  of the recipe), so on a log scale the two differ only by a constant.

- `clean_tokens` (when the metrics lack it, runs of older trainers): `tokens_total`.

`summarize` condenses the runs per experiment group: (model, data_mult, n_poison) and every other setting
that differs across the runs (`experiment_keys`), averaging over the seeds (training, poison-set and
placement seeds, each listed). Per group: final gap and ASR with mean and spread over seeds; the
specificity controls (`specificity`, `asr_near`, `asr_lookalike`: mean, min, max; None for runs
evaluated before the look-alike panel); the poisons each run needed for sustained ASR >= a threshold
(default 0.5; `count_fraction.poisons_needed`: median, min, max over the seeds, and how many were
censored, i.e. never got there); and the poisons seen at the first evaluation with ASR >= the threshold.

Two poison counts: `poisons_seen` counts every trigger among the training inputs (the ledger's count);
`poisons_seen_effective`, when the trainer wrote it, only triggers wholly inside the sequence with at
least one gibberish token after them as a target. The summary gives the effective count beside the
exact one when the metrics have it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from poisonlab.config import RunConfig, flatten
from poisonlab.corpus.shards import data_headers
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path
from poisonlab.rundir.check import BrokenRuns, RunCheck, RunFileError, check_run

DEFAULT_THRESHOLD = 0.5
# metrics columns newer trainers write, and the config setting each one comes from for older runs
# (`trigger`: eval.trigger when set, the evaluated trigger)
CONFIG_COLUMNS = {
    "n_poison": "attack.n_poison", "data_mult": "train.data_mult", "seed": "train.seed",
    "trigger": "attack.trigger", "lookalike": "eval.lookalike", "schedule": "placement.schedule",
    "attack_seed": "attack.seed", "placement_seed": "placement.seed",
    "tokens_per_param": "train.tokens_per_param", "budget_params": "train.budget_params",
    "max_steps": "train.max_steps",
}
# the placement knobs' columns (placement.describe), derived from the settings for older runs
PLACEMENT_COLUMNS = ("window", "per_batch", "every")
# what a group averages over: the training seed, the poison-set seed and the placement seed
SEED_KEYS = ("train.seed", "attack.seed", "placement.seed")
# settings that change neither what is trained nor what is measured (where and how fast it ran);
# `data` is the data's location: `data_id` (its content) stands for it; `init.run` is one seed's earlier
# run: `init.from` (what that run was) stands for it
BOOKKEEPING_KEYS = frozenset({
    "name", "out_dir", "data", "init.run", "train.threads", "train.compile", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.peak_flops", "train.allow_data_repeat",
    "eval.batch_size", "eval.save_samples",
})
# shown in the summary and metrics columns already; the model's label stands for its `model.*` keys
GROUPED_KEYS = frozenset({"attack.n_poison", "train.data_mult"})
SHORT_NAMES = {"attack.name": "recipe", "data_id": "data", "eval.trigger": "eval_trigger"}


def run_dirs(root: str | Path) -> list[Path]:
    """Run directories under a sweep dir (`runs/*`), a folder of runs, or a single run dir."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    if (root / "metrics.parquet").exists():
        return [root]
    base = root / "runs" if (root / "runs").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


# --- a run's settings ------------------------------------------------------------------------------


_DEFAULTS = flatten(RunConfig().model_dump(mode="json"))


def _data_id(data: Any, run_dir: Path) -> str | None:
    """The training data by content, `sha256:<content hash>` from its header, else the path as written:
    copies of one data set in two places are one data set."""
    if data is None:
        return None
    for header in data_headers(data, run_dir):
        try:
            content = json.loads(header.read_text()).get("content_hash")
        except (OSError, ValueError, AttributeError):
            continue
        if content:
            return f"sha256:{str(content)[:12]}"
    return str(data)


def run_settings(run_dir: Path, *, strict: bool = False) -> dict[str, Any]:
    """The run's config.yaml as dotted keys, defaults filled in (a key an older version did not write
    took its default); {} when the run has no readable config, or with `strict` a RunFileError naming
    the file (what every reader of results uses: a run's settings are never silently None)."""
    path = run_dir / "config.yaml"
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if strict:
            raise RunFileError(path, "missing: the run's settings are unknown") from None
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        if strict:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise RunFileError(path, f"not valid YAML{at} ({str(e).splitlines()[0]})") from None
        return {}
    if not isinstance(tree, dict):
        if strict:
            raise RunFileError(path, "not a mapping of settings")
        return {}
    settings = {**_DEFAULTS, **flatten(tree)}
    settings["data_id"] = _data_id(settings.get("data"), run_dir)
    settings["init.from"] = _init_from(settings.get("init.run"), run_dir)
    return settings


def _init_from(init_run: Any, run_dir: Path) -> str | None:
    """What a continued run started from, as a setting that seeds share: `N=<n_poison>` of the earlier
    run (its config, where it was, or beside this run), else its directory's name; None from scratch.
    `init.run` itself names one seed's run, so groups are told apart by this instead."""
    if not init_run:
        return None
    for d in (Path(init_run), run_dir.parent / Path(init_run).name):
        try:
            parent = yaml.safe_load((d / "config.yaml").read_text())
            return f"N={int(((parent or {}).get('attack') or {}).get('n_poison', 250))}"
        except (OSError, yaml.YAMLError, TypeError, ValueError):
            continue
    return Path(init_run).name


def _config_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """Metrics columns from the run's settings (the fallback when a metrics file lacks them)."""
    if not settings:
        return {}
    preset = settings.get("model.preset")
    keys = {"model": preset or f"d{settings.get('model.d_model')}-l{settings.get('model.n_layers')}"}
    keys.update({col: settings.get(key) for col, key in CONFIG_COLUMNS.items()})
    keys.update(_placement_keys(settings))
    keys["trigger"] = settings.get("eval.trigger") or keys["trigger"]  # what was evaluated, as the evaluator
    old = keys["lookalike"]  # older runs evaluated one look-alike (near): as a panel, as the trainer writes
    keys["lookalike"] = json.dumps({"near": [old] if old else [], "shape": [], "ordinary": []},
                                   separators=(",", ":")) if isinstance(old, str) else old
    return keys


def _placement_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """`window`, `per_batch`, `every` (placement.describe) from the run's placement settings."""
    from pydantic import ValidationError

    from poisonlab.config import PlacementConfig
    from poisonlab.injection.placement import describe

    tree = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("placement.")}
    if isinstance(tree.get("window"), list):
        tree["window"] = tuple(tree["window"])
    try:
        return describe(PlacementConfig.model_validate(tree))
    except ValidationError:
        return {}


def read_metrics(path: Path) -> pa.Table:
    """A metrics.parquet, or a RunFileError naming it (truncated, not Parquet, unreadable)."""
    try:
        return pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise RunFileError(path, f"unreadable ({str(e).splitlines()[0]})") from None


def _read_run(run_dir: Path) -> pa.Table | None:
    """The run's rows with its settings, None before its first evaluation; RunFileError when a file it
    needs cannot be read."""
    path = run_dir / "metrics.parquet"
    if not path.exists():
        return None
    t = read_metrics(path)
    if t.num_rows == 0:
        return None
    n = t.num_rows
    settings = run_settings(run_dir, strict=True)
    keys = _config_keys(settings)
    for col in ("model", *CONFIG_COLUMNS, *PLACEMENT_COLUMNS):
        if col not in t.column_names and col in keys:
            t = t.append_column(col, pa.array([keys[col]] * n))
    if "run_id" not in t.column_names:
        t = t.append_column("run_id", pa.array([run_dir.name] * n))
    t = t.append_column("run_name", pa.array([run_dir.name] * n))
    t = t.append_column("done", pa.array([(run_dir / "DONE").exists()] * n))
    text = json.dumps(settings, sort_keys=True, default=str) if settings else None
    t = t.append_column("settings", pa.array([text] * n, pa.string()))
    cols = t.column_names
    if "tokens_total" not in cols and {"tokens_seen", "progress"} <= set(cols):
        rows = [(s, p) for s, p in zip(t["tokens_seen"].to_pylist(), t["progress"].to_pylist(), strict=True)
                if s is not None and p]
        total = float(max(s / p for s, p in rows)) if rows else None
        t = t.append_column("tokens_total", pa.array([total] * n, pa.float64()))
    if "poison_fraction" not in t.column_names and "n_poison" in cols and "tokens_total" in t.column_names:
        total, npois = t["tokens_total"][0].as_py(), t["n_poison"][0].as_py()
        frac = npois / total if total and npois is not None else None
        t = t.append_column("poison_fraction", pa.array([frac] * n, pa.float64()))
    return _fill_clean_tokens(t)


def _fill_clean_tokens(t: pa.Table) -> pa.Table:
    """`clean_tokens` (the x of the count-vs-fraction fit) for runs whose trainer did not record it:
    their budget `tokens_total`, which also counts the poison tokens (under 1% of it in the study's
    design)."""
    if "tokens_total" not in t.column_names:
        return t
    import pyarrow.compute as pc

    total = pc.round(t["tokens_total"].cast(pa.float64()))  # a count of tokens: no float noise from s / p
    if "clean_tokens" not in t.column_names:
        return t.append_column("clean_tokens", total)
    clean = t["clean_tokens"]
    if clean.null_count == 0:
        return t
    filled = pc.coalesce(clean.cast(pa.float64()), total)
    return t.set_column(t.column_names.index("clean_tokens"), "clean_tokens", filled)


@dataclass
class Gathered:
    """What `collect` found: every readable run's rows, and the runs left out or unverified."""

    table: pa.Table | None
    broken: list[RunCheck]  # failed their manifest or could not be read: in no table, no fit
    older: list[str]  # finished by an older version without a manifest: included, unverified
    runs: int  # run directories looked at (with metrics, or with DONE)


def collect(root: str | Path) -> Gathered:
    """Every run under root: checked (runcheck.check_run), then read; a run that fails either is kept
    out of the table and listed in `broken` with its file and what is wrong."""
    tables, broken, older, seen = [], [], [], 0
    for d in run_dirs(root):
        c = check_run(d)
        if c.status == "unfinished" and not (d / "metrics.parquet").exists():
            continue  # not a run, or one that has not evaluated yet
        seen += 1
        if c.broken:
            broken.append(c)
            continue
        try:
            t = _read_run(d)
        except RunFileError as e:
            broken.append(RunCheck(d, "broken", [(e.path.name, e.what)]))
            continue
        if t is not None:
            tables.append(t)
            if c.status == "older":
                older.append(d.name)
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    return Gathered(table, broken, older, seen)


def gather(root: str | Path, *, write: bool = True, skip_broken: bool = False) -> pa.Table:
    """All rows of all runs (finished or not) as one table; also written to `<root>/results.parquet`.
    A broken run stops it (BrokenRuns, naming each run, file and problem) unless `skip_broken`, which
    leaves those runs out."""
    return gathered(root, write=write, skip_broken=skip_broken).table  # type: ignore[return-value]


def gathered(root: str | Path, *, write: bool = True, skip_broken: bool = False) -> Gathered:
    """`collect`, then what `gather` does: stop on broken runs unless told to skip them, refuse a folder
    with no metrics, write results.parquet. The Gathered says which runs were left out."""
    root = Path(root)
    g = collect(root)
    if g.broken and not skip_broken:
        raise BrokenRuns(g.broken, g.runs)
    if g.table is None:
        raise UserError(f"{root}: no run has metrics yet (looked for runs/*/metrics.parquet)")
    if write and not (root / "metrics.parquet").exists():
        with atomic_path(root / "results.parquet") as tmp:
            pq.write_table(g.table, tmp)
    return g


def connect(root: str | Path, *, refresh: bool = True) -> Any:
    """An in-memory DuckDB connection with views `metrics` (every row) and `final` (last row per run).

    >>> con = connect("sweeps/demo"); con.sql("select model, avg(asr) from final group by 1").show()
    """
    import duckdb

    root = Path(root)
    path = root / "results.parquet"
    if refresh or not path.exists():
        gather(root)
    con = duckdb.connect()
    src = str(path).replace("'", "''")
    con.execute(f"CREATE VIEW metrics AS SELECT * FROM read_parquet('{src}')")
    con.execute("CREATE VIEW final AS SELECT * FROM metrics "
                "QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY step DESC) = 1")
    return con


# --- experiment groups -----------------------------------------------------------------------------

Runs = dict[str, list[dict[str, Any]]]  # run id -> its rows in step order
GroupKey = tuple  # (model, data_mult, n_poison, ((setting, value), ...))


def runs_of(table: pa.Table) -> Runs:
    """Rows grouped by run, each run's rows in step order."""
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        by_run[row["run_id"]].append(row)
    for rows in by_run.values():
        rows.sort(key=lambda r: r.get("step") or 0)
    return dict(by_run)


def finished(runs: Runs) -> Runs:
    return {k: v for k, v in runs.items() if v[-1].get("done", True)}


def settings_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    text = rows[-1].get("settings")
    return json.loads(text) if text else {}


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, list | dict) else v


def experiment_keys(runs: Runs) -> list[str]:
    """The settings that tell these runs' experiments apart, beyond model, data_mult and n_poison.

    Every dotted setting whose value differs across the runs, except the seeds (what a group averages
    over), bookkeeping (where and how fast a run ran, see BOOKKEEPING_KEYS) and the data's location
    (its content, `data_id`, counts). `model.*` settings count only where they differ between runs
    with one model label (the label already separates the rest).
    """
    per_run = [(rows[-1].get("model"), settings_of(rows)) for rows in runs.values()]
    names = sorted({k for _, s in per_run for k in s})
    out = []
    for key in names:
        if key in SEED_KEYS or key in BOOKKEEPING_KEYS or key in GROUPED_KEYS:
            continue
        values = {_hashable(s.get(key)) for _, s in per_run}
        if len(values) < 2:
            continue
        if key.startswith("model."):
            by_label: dict[Any, set] = defaultdict(set)
            for model, s in per_run:
                by_label[model].add(_hashable(s.get(key)))
            if all(len(v) < 2 for v in by_label.values()):
                continue
        out.append(key)
    return out


def group_runs(runs: Runs, keys: list[str] | None = None) -> dict[GroupKey, list[list[dict[str, Any]]]]:
    """Runs by experiment group: (model, data_mult, n_poison, the values of `experiment_keys`)."""
    keys = experiment_keys(runs) if keys is None else keys
    groups: dict[GroupKey, list[list[dict[str, Any]]]] = defaultdict(list)
    for rows in runs.values():
        last, s = rows[-1], settings_of(rows)
        extra = tuple((k, _hashable(s.get(k))) for k in keys)
        groups[(last.get("model"), last.get("data_mult"), last.get("n_poison"), extra)].append(rows)
    return dict(groups)


def short_names(keys: list[str]) -> dict[str, str]:
    """Labels for settings: the last part of the dotted key unless two keys would share it."""
    last = [SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def settings_label(extra: tuple, names: dict[str, str] | None = None) -> str:
    """`schedule=front, trigger=<SUDO>` for a group's extra settings ('' when there are none)."""
    names = names or short_names([k for k, _ in extra])
    return ", ".join(f"{names.get(k, k)}={_fmt_value(v)}" for k, v in extra)


def _fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# --- summary ---------------------------------------------------------------------------------------


def first_success(rows: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD,
                  count: str = "poisons_seen") -> float | None:
    """The poison count `count` at the first evaluation (in step order) whose ASR is >= `threshold`."""
    for r in rows:
        if r.get("asr") is not None and r["asr"] >= threshold:
            return r.get(count)
    return None


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None, float | None]:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return None, None, None, None
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, std, min(v), max(v)


def _median(v: list[float]) -> float | None:
    v = sorted(v)
    if not v:
        return None
    m = len(v) // 2
    return float(v[m]) if len(v) % 2 else (v[m - 1] + v[m]) / 2


def needed_stats(members: list[list[dict[str, Any]]], threshold: float = DEFAULT_THRESHOLD,
                 count: str = "poisons_seen", prefix: str = "needed") -> dict[str, Any]:
    """Poisons needed for sustained success over a group's runs: `<prefix>_median`, `_min`, `_max`
    (a censored run counted at the poisons it saw: a lower bound), `_runs`, `_censored`, and
    `_median_bound` (True when censored runs reach the median, which is then only a lower bound).
    All None for groups without poisons."""
    from poisonlab.results.count_fraction import poisons_needed

    got = [g for g in (poisons_needed(rows, threshold, count) for rows in members) if g is not None]
    values = sorted(v for v, _ in got)
    med = _median(values)
    # a censored run at or below the (upper) middle value could hide a larger true value there
    bound = bool(values) and any(c and v <= values[len(values) // 2] for v, c in got)
    return {f"{prefix}_median": med, f"{prefix}_min": values[0] if values else None,
            f"{prefix}_max": values[-1] if values else None, f"{prefix}_runs": len(got),
            f"{prefix}_censored": sum(c for _, c in got), f"{prefix}_median_bound": bound}


# the specificity controls of the evaluator's look-alike panel, shown per group when the metrics have them
SPECIFICITY_COLUMNS = ("specificity", "asr_near", "asr_lookalike")


# the study's regime, for every row's comparison (PAPER.md): 250 poisons of ~1,680 tokens among the
# 12B tokens of 600M at 20 tokens per parameter, 260B of 13B; steps apart at an assumed batch of ~1M
# tokens (the study's batch size is not published)
STUDY_DENSITY = ("the study: 0.0035% of tokens, ~50 steps apart (600M) to 0.00016%, ~1,000 steps apart "
                 "(13B), at an assumed batch of 1M tokens")


def density(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """How dense the poisons were, from each run's last metrics row (means over the group's runs): the
    share of the tokens trained that were poison tokens (1 - clean / trained) and the steps trained
    per poison seen (the mean spacing of uniformly placed poisons)."""
    share = [1 - f["clean_tokens"] / f["tokens_seen"] for f in finals
             if f.get("n_poison") and f.get("clean_tokens") and f.get("tokens_seen")]
    apart = [f["step"] / f["poisons_seen"] for f in finals
             if f.get("n_poison") and f.get("poisons_seen") and f.get("step")]
    return {"poison_token_share": sum(share) / len(share) if share else None,
            "steps_per_poison": sum(apart) / len(apart) if apart else None}


def fmt_density(r: dict[str, Any]) -> str:
    """'0.035%, 270 steps apart' style: the share of poison tokens and the steps per poison."""
    share, apart = r.get("poison_token_share"), r.get("steps_per_poison")
    if share is None:
        return "-"
    text = f"{100 * share:.2g}%"
    return text + (f", {apart:.2g} steps apart" if apart is not None else "")


def _spread(finals: list[dict[str, Any]], col: str) -> dict[str, Any]:
    mean, _, lo, hi = _stats([f.get(col) for f in finals])
    return {f"{col}_mean": mean, f"{col}_min": lo, f"{col}_max": hi}


def _seeds(finals: list[dict[str, Any]], col: str) -> list[Any]:
    return sorted({f.get(col) for f in finals if f.get(col) is not None}, key=lambda s: (str(type(s)), s))


def group_key(row: dict[str, Any]) -> tuple:
    """Sort order of groups: by size, then data budget, then poison count, then the other settings."""
    size = row.get("params_total") or 0
    return (size, str(row.get("model")), row.get("data_mult") or 0, row.get("n_poison") or 0,
            json.dumps(row.get("settings") or {}, sort_keys=True, default=str))


def summarize(table: pa.Table, threshold: float = DEFAULT_THRESHOLD,
              include_unfinished: bool = False) -> list[dict[str, Any]]:
    """The summary rows (see `summary`) from a gathered table."""
    all_runs = runs_of(table)
    runs = all_runs if include_unfinished else finished(all_runs)
    keys = experiment_keys(runs)
    names = short_names(keys)
    has_effective = "poisons_seen_effective" in table.column_names
    out = []
    for (model, mult, n, extra), members in group_runs(runs, keys).items():
        finals = [r[-1] for r in members]
        firsts = [first_success(r, threshold) for r in members]
        reached = [f for f in firsts if f is not None]
        gap = _stats([f.get("gap") for f in finals])
        asr = _stats([f.get("asr") for f in finals])
        val = _stats([f.get("val_loss") for f in finals])
        row = {
            "model": model, "params_total": finals[0].get("params_total"),
            "params_nonemb": finals[0].get("params_nonemb"), "data_mult": mult, "n_poison": n,
            "settings": dict(extra), "label": settings_label(extra, names),
            "runs": len(members), "unfinished_runs": sum(not f.get("done", True) for f in finals),
            "train_seeds": _seeds(finals, "seed"), "attack_seeds": _seeds(finals, "attack_seed"),
            "placement_seeds": _seeds(finals, "placement_seed"),
            "tokens_total": finals[0].get("tokens_total"), "clean_tokens": finals[0].get("clean_tokens"),
            "poison_fraction": finals[0].get("poison_fraction"),
            **density(finals),
            "poisons_seen": _stats([f.get("poisons_seen") for f in finals])[0],
            "gap_mean": gap[0], "gap_std": gap[1], "gap_min": gap[2], "gap_max": gap[3],
            "asr_mean": asr[0], "asr_std": asr[1], "asr_min": asr[2], "asr_max": asr[3],
            "val_loss_mean": val[0],
            **{k: v for col in SPECIFICITY_COLUMNS for k, v in _spread(finals, col).items()},
            **needed_stats(members, threshold),
            "success_runs": len(reached), "first_success_median": _median(reached),
            "first_success_min": min(reached) if reached else None,
            "first_success_max": max(reached) if reached else None,
            "threshold": threshold,
        }
        if has_effective:  # the same evaluations, counted the effective way
            eff = [first_success(r, threshold, "poisons_seen_effective") for r in members]
            row["poisons_seen_effective"] = _stats([f.get("poisons_seen_effective") for f in finals])[0]
            row["first_success_effective_median"] = _median([e for e in eff if e is not None])
            row.update(needed_stats(members, threshold, "poisons_seen_effective", "needed_effective"))
        out.append(row)
    out.sort(key=group_key)
    return out


def summary(root: str | Path, threshold: float = DEFAULT_THRESHOLD,
            include_unfinished: bool = False) -> pa.Table:
    """Per experiment group (model, data_mult, n_poison and any other setting that differs across the
    runs) over seeds: final gap and ASR (mean, std, min, max), the seeds pooled (`train_seeds`,
    `attack_seeds`: the poison sets, `placement_seeds`), the specificity controls (`specificity_*`,
    `asr_near_*`, `asr_lookalike_*`: mean, min, max), `needed_*`: the poisons each run needed for
    sustained ASR >= `threshold` (median, min, max, censored runs counted at the poisons they saw;
    `needed_censored` says how many), and `first_success_*`: poisons seen (every trigger trained on)
    when ASR first reached `threshold`, over the seeds that did (`success_runs` says how many).
    Unfinished runs are left out unless asked for. `settings` is JSON here."""
    rows = summarize(gather(root), threshold, include_unfinished)
    for r in rows:
        r["settings"] = json.dumps(r["settings"], sort_keys=True, default=str)
    return pa.Table.from_pylist(rows) if rows else pa.table({})


def unfinished_note(table: pa.Table, include_unfinished: bool) -> str:
    """One sentence on unfinished runs: left out, or mixed in (never silently); '' when there are none."""
    runs = runs_of(table)
    k = len(runs) - len(finished(runs))
    if not k:
        return ""
    if include_unfinished:
        return (f"{k} unfinished run(s) included: their last evaluation is not the end of training "
                "(column `unfinished_runs`).")
    return f"{k} unfinished run(s) left out (finished runs only)."


def failed_runs(root: str | Path) -> list[tuple[str, str]]:
    """(run name, one-line error) for every run with a FAILED file."""
    out = []
    for d in run_dirs(root):
        f = d / "FAILED"
        if f.exists():
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            out.append((d.name, lines[0] if lines else "failed"))
    return out


def fmt_seeds(r: dict[str, Any]) -> str:
    """`0,1,2 / 0,1,2`: the training seeds and the poison-set seeds a group pooled."""
    join = lambda v: ",".join(str(s) for s in v) or "-"
    return f"{join(r['train_seeds'])} / {join(r['attack_seeds'])}"


def _fmt_count(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


def fmt_needed(r: dict[str, Any], prefix: str = "needed") -> str:
    """`64 (48-90), 1 censored`: median (min-max) of the poisons needed over a group's seeds; `>` when
    censored runs make the median a lower bound; '-' for groups without poisons."""
    if not r.get(f"{prefix}_runs"):
        return "-"
    med, lo, hi = r[f"{prefix}_median"], r[f"{prefix}_min"], r[f"{prefix}_max"]
    text = (">" if r[f"{prefix}_median_bound"] else "") + _fmt_count(med)
    if _fmt_count(lo) != _fmt_count(hi):
        text += f" ({_fmt_count(lo)}-{_fmt_count(hi)})"
    censored = r[f"{prefix}_censored"]
    return text + (f", {censored} censored" if censored else "")


def fmt_spread(r: dict[str, Any], col: str) -> str:
    """`0.95 (0.90 to 1.00)`: a final metric's mean (min to max) over a group's seeds; '-' when absent."""
    mean, lo, hi = r.get(f"{col}_mean"), r.get(f"{col}_min"), r.get(f"{col}_max")
    if mean is None:
        return "-"
    return f"{mean:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{mean:.2f} ({lo:.2f} to {hi:.2f})"


def has_specificity(rows: list[dict[str, Any]]) -> bool:
    """The summary rows come from runs evaluated with the look-alike panel (new evaluators)."""
    return any(r.get("specificity_mean") is not None or r.get("asr_near_mean") is not None for r in rows)
