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

Grouping runs into experiments and summarising them is summary.py.
"""

from __future__ import annotations

import json
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


def _hf_start(settings: dict[str, Any]) -> str | None:
    """The name of the model directory a run without a preset started from, None otherwise: `init.from`
    falls back to the directory's name where no run's config.yaml was found (an archive keeps the runs,
    never the model), as the trainer names such a run."""
    run = settings.get("init.run")
    if not run or settings.get("model.preset") or settings.get("init.from") != Path(str(run)).name:
        return None
    return Path(str(run)).name


def _config_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """Metrics columns from the run's settings (the fallback when a metrics file lacks them)."""
    if not settings:
        return {}
    shape = f"d{settings.get('model.d_model')}-l{settings.get('model.n_layers')}"
    keys = {"model": settings.get("model.preset") or _hf_start(settings) or shape}
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
    if _hf_start(settings) and "model" in t.column_names:  # rows written before the trainer named it
        t = t.set_column(t.column_names.index("model"), "model", pa.array([keys["model"]] * n))
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


def failed_runs(root: str | Path) -> list[tuple[str, str]]:
    """(run name, one-line error) for every run with a FAILED file."""
    out = []
    for d in run_dirs(root):
        f = d / "FAILED"
        if f.exists():
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            out.append((d.name, lines[0] if lines else "failed"))
    return out
