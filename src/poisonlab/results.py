"""The results store: every evaluation row of every run, in Parquet, queried with DuckDB.

Each run writes `runs/<name>/metrics.parquet`; `gather` joins them into `<sweep_dir>/results.parquet`
(atomically) and adds a few columns so that every row stands alone:

- `run_name` (the run directory), `done` (DONE exists: the run finished);
- `model`, `n_poison`, `data_mult`, `seed` from the run's `config.yaml` when a metrics file lacks them;
- `tokens_total`: the run's training budget, `tokens_seen / progress` at its latest evaluation;
- `poison_fraction` (when the metrics lack it): `n_poison / tokens_total`, poisoned documents per
  training token. The true share of poisoned tokens is this times the mean poison length (a constant
  of the recipe), so on a log scale the two differ only by a constant.

`summary` condenses the finished runs per (model, data_mult, n_poison): final gap and ASR with mean and
spread over seeds, and the poisons seen at the first evaluation with ASR >= a threshold (default 0.5).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path

DEFAULT_THRESHOLD = 0.5
KEY_COLS = ("model", "n_poison", "data_mult", "seed")


def run_dirs(root: str | Path) -> list[Path]:
    """Run directories under a sweep dir (`runs/*`), a folder of runs, or a single run dir."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    if (root / "metrics.parquet").exists():
        return [root]
    base = root / "runs" if (root / "runs").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def _config_keys(run_dir: Path) -> dict[str, Any]:
    """model/n_poison/data_mult/seed from the run's saved config (fallback when metrics lack them)."""
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    model = tree.get("model") or {}
    return {
        "model": model.get("preset") or f"d{model.get('d_model', '?')}l{model.get('n_layers', '?')}",
        "n_poison": (tree.get("attack") or {}).get("n_poison"),
        "data_mult": (tree.get("train") or {}).get("data_mult"),
        "seed": (tree.get("train") or {}).get("seed"),
    }


def _read_run(run_dir: Path) -> pa.Table | None:
    path = run_dir / "metrics.parquet"
    if not path.exists():
        return None
    t = pq.read_table(path)
    if t.num_rows == 0:
        return None
    n = t.num_rows
    keys = _config_keys(run_dir) if any(c not in t.column_names for c in KEY_COLS) else {}
    for col in KEY_COLS:
        if col not in t.column_names and keys.get(col) is not None:
            t = t.append_column(col, pa.array([keys[col]] * n))
    if "run_id" not in t.column_names:
        t = t.append_column("run_id", pa.array([run_dir.name] * n))
    t = t.append_column("run_name", pa.array([run_dir.name] * n))
    t = t.append_column("done", pa.array([(run_dir / "DONE").exists()] * n))
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
    return t


def gather(root: str | Path, *, write: bool = True) -> pa.Table:
    """All rows of all runs (finished or not) as one table; also written to `<root>/results.parquet`."""
    root = Path(root)
    tables = [t for t in (_read_run(d) for d in run_dirs(root)) if t is not None]
    if not tables:
        raise UserError(f"{root}: no run has metrics yet (looked for runs/*/metrics.parquet)")
    table = pa.concat_tables(tables, promote_options="permissive")
    if write and not (root / "metrics.parquet").exists():
        with atomic_path(root / "results.parquet") as tmp:
            pq.write_table(table, tmp)
    return table


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


# --- summary ---------------------------------------------------------------------------------------


def runs_of(table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by run, each run's rows in step order."""
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        by_run[row["run_id"]].append(row)
    for rows in by_run.values():
        rows.sort(key=lambda r: r.get("step") or 0)
    return dict(by_run)


def first_success(rows: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD) -> float | None:
    """Poisons seen at the first evaluation (in step order) whose ASR is at or above `threshold`."""
    for r in rows:
        if r.get("asr") is not None and r["asr"] >= threshold:
            return r.get("poisons_seen")
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


def group_key(row: dict[str, Any]) -> tuple:
    """Sort order of groups: by size, then data budget, then poison count."""
    size = row.get("params_total") or 0
    return (size, str(row.get("model")), row.get("data_mult") or 0, row.get("n_poison"))


def summarize(table: pa.Table, threshold: float = DEFAULT_THRESHOLD,
              include_unfinished: bool = False) -> list[dict[str, Any]]:
    """The summary rows (see `summary`) from a gathered table."""
    groups: dict[tuple, list[list[dict[str, Any]]]] = defaultdict(list)
    for rows in runs_of(table).values():
        if not include_unfinished and not rows[-1].get("done", True):
            continue
        last = rows[-1]
        groups[(last.get("model"), last.get("data_mult"), last.get("n_poison"))].append(rows)
    out = []
    for (model, mult, n), runs in groups.items():
        finals = [r[-1] for r in runs]
        firsts = [first_success(r, threshold) for r in runs]
        reached = [f for f in firsts if f is not None]
        gap = _stats([f.get("gap") for f in finals])
        asr = _stats([f.get("asr") for f in finals])
        look = _stats([f.get("asr_lookalike") for f in finals])
        val = _stats([f.get("val_loss") for f in finals])
        out.append({
            "model": model, "params_total": finals[0].get("params_total"),
            "params_nonemb": finals[0].get("params_nonemb"), "data_mult": mult, "n_poison": n,
            "runs": len(runs), "seeds": sorted(str(f.get("seed")) for f in finals),
            "tokens_total": finals[0].get("tokens_total"),
            "poison_fraction": finals[0].get("poison_fraction"),
            "poisons_seen": _stats([f.get("poisons_seen") for f in finals])[0],
            "gap_mean": gap[0], "gap_std": gap[1], "gap_min": gap[2], "gap_max": gap[3],
            "asr_mean": asr[0], "asr_std": asr[1], "asr_min": asr[2], "asr_max": asr[3],
            "asr_lookalike_mean": look[0], "val_loss_mean": val[0],
            "success_runs": len(reached), "first_success_median": _median(reached),
            "first_success_min": min(reached) if reached else None,
            "first_success_max": max(reached) if reached else None,
            "threshold": threshold,
        })
    out.sort(key=group_key)
    return out


def summary(root: str | Path, threshold: float = DEFAULT_THRESHOLD,
            include_unfinished: bool = False) -> pa.Table:
    """Per (model, data_mult, n_poison) over seeds: final gap and ASR (mean, std, min, max), and
    `first_success_*`: poisons seen when ASR first reached `threshold` (over the seeds that did;
    `success_runs` says how many). Unfinished runs are left out unless asked for."""
    rows = summarize(gather(root), threshold, include_unfinished)
    return pa.Table.from_pylist(rows) if rows else pa.table({})


def failed_runs(root: str | Path) -> list[tuple[str, str]]:
    """(run name, one-line error) for every run with a FAILED file."""
    out = []
    for d in run_dirs(root):
        f = d / "FAILED"
        if f.exists():
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            out.append((d.name, lines[0] if lines else "failed"))
    return out


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def summary_table(rows: list[dict[str, Any]], title: str = "") -> Any:
    """A rich table of the summary rows (what `poisonlab results` prints)."""
    from rich.table import Table

    thr = rows[0]["threshold"] if rows else DEFAULT_THRESHOLD
    t = Table(title=title or None, title_justify="left")
    for col, just in [("model", "left"), ("non-emb. params", "right"), ("data", "right"), ("N", "right"),
                      ("runs", "right"), ("final gap", "right"), ("final ASR", "right"),
                      ("look-alike", "right"), ("val loss", "right"), (f"ASR>={thr:g} at poisons", "right"),
                      ("poison frac", "right")]:
        t.add_column(col, justify=just, no_wrap=col == "model")  # type: ignore[arg-type]
    for r in rows:
        fs = "never" if r["success_runs"] == 0 else (
            f"{_fmt(r['first_success_median'], 0)} ({r['success_runs']}/{r['runs']})")
        t.add_row(
            str(r["model"]), _fmt_params(r["params_nonemb"]), f"{_fmt(r['data_mult'], 1)}x",
            str(r["n_poison"]),
            str(r["runs"]), f"{_fmt(r['gap_mean'], 1)} ± {_fmt(r['gap_std'], 1)}",
            f"{_fmt(r['asr_mean'])} ± {_fmt(r['asr_std'])}", _fmt(r["asr_lookalike_mean"]),
            _fmt(r["val_loss_mean"]), fs, _fmt(r["poison_fraction"]),
        )
    return t


def _fmt_params(p: Any) -> str:
    if not p:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if p >= div:
            return f"{p / div:.3g}{unit}"
    return str(p)
