"""The sweep report: the study's figures, the count-vs-fraction answer in numbers, one HTML file.

`build_report(sweep_dir)` writes `<sweep_dir>/report/`: `report.html` (self-contained: figures as
base64 PNG), every figure as PNG and SVG, `summary.json`, `fits.json` and `samples.json`. Figures
(drawn in report_figures.py), after the study:

- `asr_vs_progress`, `gap_vs_progress` (its Figures 2a/2b): one panel per n_poison, one colour per size,
  mean over seeds and a shaded band (min-max, or +-1 std), runs at the 1x data budget (all runs
  when each size has one budget);
- `asr_vs_poisons_seen` (its Figure 4): all budgets, against poisons seen as the ledger counts them
  (every trigger among the training inputs); `asr_vs_poisons_seen_effective` beside it when the
  metrics have `poisons_seen_effective`;
- `val_loss`: clean validation loss per size against tokens seen;
- a table of generations with and without the trigger (its Figure 3), HTML-escaped.

Runs are grouped by size, data budget, N and every other setting that differs across them
(`results.experiment_keys`: a schedule, trigger or recipe axis), and averaged over seeds only.

The count-vs-fraction question: a logistic model of per-evaluation ASR (a proportion, one weight per
evaluation) on log(1 + poisons seen), then with log(non-embedding params), log(poison fraction), and
both. If size or fraction mattered beyond the count, adding them would lower the AIC clearly
(by more than ~2 per parameter). Evaluations of one run are not independent, so treat p-values as
optimistic. N = 0 runs are left out of the fits (their fraction is 0). One fit per group of settings
other than size, budget and N.

`<sweep_dir>/defenses.json`, when present, is rendered as a table: a list of rows, or
`{"title": ..., "rows": [...], "notes": ..., "figures": [paths relative to the sweep dir]}`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from poisonlab.fsutil import atomic_path
from poisonlab.report_figures import (
    EFFECTIVE_COUNT,
    EXACT_COUNT,
    fig_panels_by_n,
    fig_val_loss,
    fmt_params,
    has_column,
    main_mult,
    model_order,
)
from poisonlab.results import (
    DEFAULT_THRESHOLD,
    Runs,
    experiment_keys,
    failed_runs,
    finished,
    fmt_seeds,
    gather,
    group_runs,
    runs_of,
    settings_label,
    short_names,
    summarize,
    unfinished_note,
)

# --- logistic regression (IRLS) in numpy ------------------------------------------------------------
# The response may be 0/1 or a proportion in [0, 1] (an ASR), each row with a weight. With proportions
# the log-likelihood is the binomial one, which makes AIC and likelihood-ratio tests between nested
# models meaningful.



@dataclass
class LogitFit:
    names: list[str]
    coef: np.ndarray
    se: np.ndarray
    loglik: float
    n: int
    converged: bool
    iterations: int
    separated: bool  # a coefficient ran off to infinity: some predictor splits success perfectly

    @property
    def k(self) -> int:
        return len(self.coef)

    @property
    def aic(self) -> float:
        return 2 * self.k - 2 * self.loglik

    def as_dict(self) -> dict:
        return {
            "coef": {n: float(c) for n, c in zip(self.names, self.coef, strict=True)},
            "se": {n: float(s) for n, s in zip(self.names, self.se, strict=True)},
            "loglik": self.loglik, "aic": self.aic, "n": self.n, "k": self.k,
            "converged": self.converged, "separated": self.separated,
        }


def _expit(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def _loglik(X: np.ndarray, y: np.ndarray, w: np.ndarray, beta: np.ndarray) -> float:
    eta = X @ beta
    # log p = -log(1 + e^-eta), log(1-p) = -log(1 + e^eta), both via logaddexp (no overflow)
    return float(np.sum(w * (-y * np.logaddexp(0.0, -eta) - (1 - y) * np.logaddexp(0.0, eta))))


def fit_logistic(
    X: np.ndarray,
    y: np.ndarray,
    names: list[str],
    weights: np.ndarray | None = None,
    *,
    intercept: bool = True,
    max_iter: int = 100,
    tol: float = 1e-9,
) -> LogitFit:
    """Maximum-likelihood logistic fit of y (0/1 or proportions) on the columns of X."""
    X = np.asarray(X, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    if intercept:
        X = np.column_stack([np.ones(len(y)), X])
        names = ["intercept", *names]
    beta = np.zeros(X.shape[1])
    ll = _loglik(X, y, w, beta)
    converged, it = False, 0
    for it in range(1, max_iter + 1):  # noqa: B007  (`it` is reported)
        p = _expit(X @ beta)
        grad = X.T @ (w * (y - p))
        hess = X.T @ (X * (w * p * (1 - p))[:, None])
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        # step halving: Newton can overshoot when the fit is near separation
        t = 1.0
        while t > 1e-6:
            new = beta + t * step
            new_ll = _loglik(X, y, w, new)
            if new_ll >= ll - 1e-12:
                break
            t /= 2
        beta, improvement, ll = new, new_ll - ll, new_ll
        if np.max(np.abs(t * step)) < tol or abs(improvement) < tol * (1 + abs(ll)):
            converged = True
            break
    p = _expit(X @ beta)
    hess = X.T @ (X * (w * p * (1 - p))[:, None])
    try:
        se = np.sqrt(np.clip(np.diag(np.linalg.inv(hess)), 0, None))
    except np.linalg.LinAlgError:
        se = np.full(len(beta), np.nan)
    separated = bool(np.max(np.abs(X @ beta)) > 30 or not converged)
    return LogitFit(names, beta, se, ll, len(y), converged, it, separated)


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x) for integer df, in closed form (no scipy)."""
    if x <= 0:
        return 1.0
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= (x / 2) / i
            total += term
        return math.exp(-x / 2) * total
    total = math.erfc(math.sqrt(x / 2))
    term = math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
    for k in range(1, (df + 1) // 2):
        total += term
        term *= x / (2 * k + 1)
    return min(1.0, total)


FIT_MODELS: list[tuple[str, list[str]]] = [
    ("poisons seen", ["log_poisons_seen"]),
    ("+ size", ["log_poisons_seen", "log_params"]),
    ("+ fraction", ["log_poisons_seen", "log_poison_fraction"]),
    ("+ size + fraction", ["log_poisons_seen", "log_params", "log_poison_fraction"]),
]


def fit_count_vs_fraction(rows: list[dict[str, Any]], weights: str = "eval") -> dict[str, Any]:
    """Fit the four nested logistic models of ASR to the evaluation rows of poisoned runs.

    Predictors: log(1 + poisons_seen), log(params_nonemb or params_total), log(poison_fraction).
    `weights`: "eval" (each evaluation counts once) or "prompts" (by its n_prompts, if present).
    """
    data = []
    for r in rows:
        n, asr, seen, frac = r.get("n_poison"), r.get("asr"), r.get("poisons_seen"), r.get("poison_fraction")
        params = r.get("params_nonemb") or r.get("params_total")
        if not n or asr is None or seen is None or not frac or not params or math.isnan(asr):
            continue
        w = float(r.get("n_prompts") or 1) if weights == "prompts" else 1.0
        data.append((math.log1p(seen), math.log(params), math.log(frac), min(max(asr, 0.0), 1.0), w))
    out: dict[str, Any] = {"n": len(data), "weights": weights, "models": []}
    if len(data) < 5:
        out["note"] = "too few evaluations of poisoned runs to fit"
        return out
    arr = np.array(data)
    cols = {"log_poisons_seen": arr[:, 0], "log_params": arr[:, 1], "log_poison_fraction": arr[:, 2]}
    y, w = arr[:, 3], arr[:, 4]
    base = None
    for label, names in FIT_MODELS:
        X = np.column_stack([cols[c] for c in names])
        entry: dict[str, Any] = {"model": label, "terms": names}
        Xc = np.column_stack([np.ones(len(y)), X])
        if np.linalg.matrix_rank(Xc - 0.0, tol=1e-8 * max(1.0, float(np.abs(Xc).max()))) < Xc.shape[1]:
            entry["note"] = "not identifiable: a term is constant or collinear with the others in this design"
            out["models"].append(entry)
            continue
        fit = fit_logistic(X, y, names, w)
        entry.update(fit.as_dict())
        if base is None:
            base = fit
        else:
            lr = max(0.0, 2 * (fit.loglik - base.loglik))
            entry.update({"delta_aic": fit.aic - base.aic, "lr_stat": lr,
                          "lr_df": fit.k - base.k, "lr_p": chi2_sf(lr, fit.k - base.k)})
        out["models"].append(entry)
    out["verdict"] = _verdict(out["models"])
    return out


def _verdict(models: list[dict[str, Any]]) -> str:
    """One sentence per added term: does it lower the AIC by more than 2?"""
    said = []
    for m in models[1:3]:
        term = "model size" if "log_params" in m["terms"] else "poison fraction"
        if "delta_aic" not in m:
            said.append(f"{term}: cannot be separated from the count in this design")
            continue
        key = "log_params" if term == "model size" else "log_poison_fraction"
        d, c, s = m["delta_aic"], m["coef"][key], m["se"][key]
        if d > -2:
            said.append(f"adding {term} does not improve the fit (delta AIC {d:+.1f}; coefficient "
                        f"{c:+.2f} ± {s:.2f})")
        else:
            said.append(f"adding {term} improves the fit (delta AIC {d:+.1f}; coefficient {c:+.2f} ± {s:.2f} "
                        "per log unit)")
    return "; ".join(said) + "."


# --- samples (Figure 3) ----------------------------------------------------------------------------


def _run_file(root: Path, run_name: Any, name: str) -> Path:
    """A file of a run gathered from a sweep dir (runs/NAME), a folder of runs, or the run dir itself."""
    for d in (root / "runs" / str(run_name), root / str(run_name), root):
        if (d / name).exists():
            return d / name
    return root / "runs" / str(run_name) / name


def sample_rows(root: Path, runs: Runs, per_model: int = 2, chars: int = 240) -> list[dict[str, Any]]:
    """For each size and group of other settings, the run with the most poisons (lowest seed): its last
    evaluation's generations with and without the trigger (the evaluator's samples.jsonl), by prompt."""
    keys = experiment_keys(runs)
    names = short_names(keys)
    mult = main_mult(runs)
    rank = lambda rows: (rows[-1].get("n_poison") or 0, -_num(rows[-1].get("seed")))
    best: dict[tuple, list[dict[str, Any]]] = {}
    for (model, m, _n, extra), members in group_runs(runs, keys).items():
        if mult is not None and m != mult:
            continue
        for rows in members:
            if (model, extra) not in best or rank(rows) > rank(best[(model, extra)]):
                best[(model, extra)] = rows
    order = model_order(runs)
    out = []
    for model, extra in sorted(best, key=lambda k: (order.index(k[0]), str(k[1]))):
        last = best[(model, extra)][-1]
        recs = [r for r in _read_jsonl(_run_file(root, last.get("run_name"), "samples.jsonl"))
                if r.get("kind", "sample") == "sample" and r.get("condition") is not None]
        if not recs:
            continue
        step = max(r.get("step") or 0 for r in recs)
        by_prompt: dict[Any, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in recs:
            if (r.get("step") or 0) == step:
                by_prompt[r.get("prompt_idx")][r["condition"]] = r
        shown = 0
        for idx in sorted(by_prompt, key=lambda v: (str(type(v)), v)):
            cond = by_prompt[idx]
            if "clean" not in cond or "trigger" not in cond:
                continue
            out.append({
                "run": last.get("run_name"), "model": model, "settings": settings_label(extra, names),
                "n_poison": last.get("n_poison"), "step": step, "prompt_idx": idx,
                "prompt": _clip(cond["clean"].get("prompt", ""), chars, tail=True),
                "clean": _clip(cond["clean"].get("generation", ""), chars),
                "clean_ppl": cond["clean"].get("ppl"),
                "trigger": _clip(cond["trigger"].get("generation", ""), chars),
                "trigger_ppl": cond["trigger"].get("ppl"),
                "trigger_prompt_end": _clip(cond["trigger"].get("prompt", ""), 40, tail=True),
            })
            shown += 1
            if shown >= per_model:
                break
    return out


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return 0.0


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash must not break the report
    return out


def _clip(s: str, n: int, tail: bool = False) -> str:
    s = str(s)
    if len(s) <= n:
        return s
    return "…" + s[-n:] if tail else s[:n] + "…"


# --- HTML ------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.gen{font-family:monospace;font-size:.9em;max-width:380px;white-space:pre-wrap;word-break:break-all}
img{max-width:100%} pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _cell(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return f"<td>{_e('-' if x is None else x)}</td>"
    if isinstance(x, int):
        return f'<td class="num">{x}</td>'
    if isinstance(x, float):
        if math.isnan(x):
            return '<td class="num">-</td>'
        tiny_or_huge = x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5)
        txt = f"{x:.3g}" if tiny_or_huge else f"{x:.3f}".rstrip("0").rstrip(".")
        return f'<td class="num">{txt}</td>'
    return f"<td>{_e(x)}</td>"


def html_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain table of dict rows; columns in order of first appearance unless given."""
    if not rows:
        return '<p class="note">(nothing)</p>'
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("poisonlab", "torch", "numpy", "pyarrow", "duckdb", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:  # the source tree's version wins over stale install metadata
        import poisonlab

        out["poisonlab"] = poisonlab.__version__
    except Exception:
        pass
    return out


def _data(r: dict[str, Any]) -> str:
    return f"{r['data_mult']:g}x" if r["data_mult"] is not None else "-"


def _summary_html(summary: list[dict[str, Any]], threshold: float) -> str:
    with_settings = any(r["label"] for r in summary)
    with_effective = any(r.get("poisons_seen_effective") is not None for r in summary)
    rows = []
    for r in summary:
        row: dict[str, Any] = {"model": r["model"], "params (non-emb.)": fmt_params(r["params_nonemb"]),
                               "data": _data(r), "N inserted": r["n_poison"]}
        if with_settings:
            row["settings"] = r["label"]
        unfinished = f" ({r['unfinished_runs']} unfinished)" if r["unfinished_runs"] else ""
        row.update({
            "runs": f"{r['runs']}{unfinished}",
            "seeds: train / poison set": fmt_seeds(r), "poison fraction": r["poison_fraction"],
            "final gap (mean)": r["gap_mean"], "gap std": r["gap_std"],
            "final ASR (mean)": r["asr_mean"], "ASR min": r["asr_min"], "ASR max": r["asr_max"],
            "look-alike ASR": r["asr_lookalike_mean"], "val loss": r["val_loss_mean"],
            "poisons seen at end (all triggers)": r["poisons_seen"],
        })
        if with_effective:
            row["effective poisons seen at end"] = r.get("poisons_seen_effective")
        row[f"seeds reaching ASR≥{threshold:g}"] = f"{r['success_runs']}/{r['runs']}"
        row["then poisons seen (all triggers), median"] = r["first_success_median"]
        if with_effective:
            row["then effective poisons seen, median"] = r.get("first_success_effective_median")
        rows.append(row)
    return html_table(rows)


def _first_html(summary: list[dict[str, Any]], threshold: float) -> str:
    """Poisons seen when ASR first reached the threshold, per poisoned group (the count question)."""
    with_settings = any(r["label"] for r in summary)
    with_effective = any(r.get("first_success_effective_median") is not None for r in summary)
    rows = []
    for r in summary:
        if not r["n_poison"]:
            continue
        row: dict[str, Any] = {"model": r["model"], "data": _data(r), "N inserted": r["n_poison"]}
        if with_settings:
            row["settings"] = r["label"]
        row.update({"poison fraction": r["poison_fraction"],
                    f"seeds reaching ASR≥{threshold:g}": f"{r['success_runs']}/{r['runs']}",
                    "poisons seen (all triggers), median": r["first_success_median"],
                    "min": r["first_success_min"], "max": r["first_success_max"]})
        if with_effective:
            row["effective poisons seen, median"] = r.get("first_success_effective_median")
        rows.append(row)
    return html_table(rows)


def _fit_html(fit: dict[str, Any]) -> str:
    head = f"<h3>{_e(fit['label'])}</h3>" if fit.get("label") else ""
    if not fit.get("models"):
        return head + f'<p class="note">{_e(fit.get("note", "no fit"))}</p>'
    rows = []
    for m in fit["models"]:
        row: dict[str, Any] = {"model of ASR": m["model"]}
        if "coef" not in m:
            row["note"] = m.get("note", "")
            rows.append(row)
            continue
        for term in ("intercept", "log_poisons_seen", "log_params", "log_poison_fraction"):
            if term in m["coef"]:
                row[term] = f"{m['coef'][term]:+.3f} ± {m['se'][term]:.3f}"
            else:
                row[term] = ""
        row.update({"log-lik": m["loglik"], "AIC": m["aic"], "ΔAIC": m.get("delta_aic"),
                    "LR p (vs count only)": m.get("lr_p"), "k": m["k"],
                    "note": "separation: coefficients unreliable" if m.get("separated") else ""})
        rows.append(row)
    return (head + f'<p class="note">{fit["n"]} evaluations of poisoned runs.</p>' + html_table(rows)
            + f'<p><b>Reading:</b> {_e(fit.get("verdict", ""))}</p>')


# settings the fits span along with size and N (their predictors: size, and the budget through the
# poison fraction); runs that differ in any other setting (a schedule, a trigger) are fitted apart
FIT_SPANS = frozenset({"train.tokens_per_param", "train.max_steps", "train.budget_params"})


def fit_groups(runs: Runs) -> list[dict[str, Any]]:
    """`fit_count_vs_fraction` once per group of the settings a fit does not span, each with its
    `label` and `settings` (one group, label '', when the runs differ only in size, budget and N)."""
    keys = [k for k in experiment_keys(runs) if k not in FIT_SPANS and not k.startswith("model.")]
    names = short_names(keys)
    pooled: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for (_model, _mult, _n, extra), members in group_runs(runs, keys).items():
        pooled[extra] += [r for rows in members for r in rows]
    return [{"label": settings_label(extra, names), "settings": dict(extra), "count": "poisons_seen",
             **fit_count_vs_fraction(pooled[extra])} for extra in sorted(pooled, key=str)]


def _defenses_html(root: Path) -> str:
    path = root / "defenses.json"
    if not path.exists():
        return ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return f'<h2>Defenses</h2><p class="note">defenses.json could not be read: {_e(e)}</p>'
    if isinstance(data, list):
        data = {"rows": data}
    parts = [f"<h2>{_e(data.get('title', 'Defenses'))}</h2>"]
    if data.get("notes"):
        parts.append(f'<p class="note">{_e(data["notes"])}</p>')
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    parts.append(html_table(rows))
    for fig in data.get("figures", []):
        p = root / fig
        if p.suffix.lower() == ".png" and p.exists():
            parts.append(_img(p.read_bytes(), p.stem))
    return "\n".join(parts)


def _report_settings(root: Path) -> tuple[dict[str, Any], str]:
    path = root / "sweep.yaml"
    if not path.exists():
        return {}, ""
    text = path.read_text(encoding="utf-8")
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        tree = {}
    return (tree.get("report") or {}) if isinstance(tree, dict) else {}, text


def build_report(sweep_dir: str | Path, *, threshold: float | None = None, spread: str | None = None,
                 include_unfinished: bool | None = None) -> Path:
    """Write `<sweep_dir>/report/` (replaced as a whole, atomically) and return the path of report.html.

    Finished runs only, unless none has finished yet (then every run's latest rows are used); the
    report says which. Threshold and spread default to the sweep spec's `report` settings (0.5, min-max).
    """
    root = Path(sweep_dir)
    settings, spec_text = _report_settings(root)
    if threshold is None:
        threshold = float(settings.get("asr_threshold", DEFAULT_THRESHOLD))
    spread = spread or settings.get("spread", "minmax")
    table = gather(root)
    all_runs = runs_of(table)
    done = finished(all_runs)
    if include_unfinished is None:
        include_unfinished = not done
    runs = all_runs if include_unfinished else done
    summary = summarize(table, threshold, include_unfinished=include_unfinished)
    fits = {"count": EXACT_COUNT, "groups": fit_groups(runs)}
    samples = sample_rows(root, runs)
    mult = main_mult(runs)
    mults = [mult] if mult is not None else None
    tag = f" ({mult:g}x data)" if mult is not None else ""

    panels = dict(mults=mults, spread=spread)
    figures = [
        ("asr_vs_progress", "Attack success rate against training progress" + tag,
         fig_panels_by_n(runs, "asr", "progress", ylabel="attack success rate", xlabel="training progress",
                         title="Attack success (ASR) during training" + tag, hline=threshold, **panels)),
        ("gap_vs_progress", "Perplexity gap (triggered - clean) against training progress" + tag,
         fig_panels_by_n(runs, "gap", "progress", ylabel="perplexity gap", xlabel="training progress",
                         title="Perplexity gap during training" + tag, hline=50, **panels)),
        ("asr_vs_poisons_seen", f"Attack success against {EXACT_COUNT}: the ledger's count (all budgets)",
         fig_panels_by_n(runs, "asr", "poisons_seen", ylabel="attack success rate", xlabel=EXACT_COUNT,
                         title="Attack success against poisons seen (all triggers)", mults=None,
                         spread=spread, skip_zero=True, hline=threshold)),
    ]
    if has_column(runs, "poisons_seen_effective"):
        figures.append((
            "asr_vs_poisons_seen_effective", f"Attack success against {EFFECTIVE_COUNT} (all data budgets)",
            fig_panels_by_n(runs, "asr", "poisons_seen_effective", ylabel="attack success rate",
                            xlabel=EFFECTIVE_COUNT, title="Attack success against effective poisons seen",
                            mults=None, spread=spread, skip_zero=True, hline=threshold)))
    figures.append(("val_loss", "Clean validation loss per size", fig_val_loss(runs, mult, spread)))
    fails = failed_runs(root)
    with atomic_path(root / "report") as out:
        out.mkdir(parents=True)
        imgs = []
        for name, caption, fig in figures:
            if fig is None:
                continue
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            (out / f"{name}.png").write_bytes(buf.getvalue())
            fig.savefig(out / f"{name}.svg", format="svg")
            cap = f"<figcaption>{_e(caption)}</figcaption>"
            imgs.append(f"<figure>{_img(buf.getvalue(), name)}{cap}</figure>")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "fits.json").write_text(json.dumps(fits, indent=2, default=str))
        (out / "samples.json").write_text(json.dumps(samples, indent=2, default=str))
        notes = _notes(table, runs, include_unfinished, spread)
        doc = _html(root, runs, notes, summary, fits, samples, imgs, threshold, spec_text, fails)
        (out / "report.html").write_text(doc, encoding="utf-8")
    return root / "report" / "report.html"


def _notes(table: Any, runs: Runs, include_unfinished: bool, spread: str) -> str:
    """What the report pools and what it leaves out, as paragraphs: never silently."""
    keys = experiment_keys(runs)
    band = "min-max over seeds" if spread == "minmax" else "mean ± 1 std over seeds"
    said = [f"Each group (size, data budget, N{', ' + ', '.join(keys) if keys else ''}) is averaged over "
            "its training seeds and poison-set seeds (listed per group in the summary); curves are "
            "interpolated between evaluations and averaged at the same x, where at each x the mean is "
            f"over the runs evaluated that far. Bands: {band}."]
    if keys:
        said.append("Settings that differ across these runs, each drawn and fitted apart (not pooled): "
                    + ", ".join(keys) + ".")
    repeated = sorted({(str(rows[-1].get("run_name") or name), int(rows[-1]["data_epochs"]))
                       for name, rows in runs.items() if (rows[-1].get("data_epochs") or 1) > 1})
    if repeated:
        said.append(f"<b>Repeated data:</b> {len(repeated)} run(s) trained on more than one pass over their "
                    "clean data (train.allow_data_repeat), a different experiment from the study's: "
                    + ", ".join(f"{_e(n)} ({k} passes)" for n, k in repeated) + ".")
    unfinished = unfinished_note(table, include_unfinished)
    if include_unfinished and not finished(runs):
        said.append("<b>Partial:</b> no run has finished yet; figures and tables show the latest "
                    "evaluations of unfinished runs.")
    elif unfinished:
        said.append(("<b>Mixed:</b> " if include_unfinished else "") + unfinished)
    return "".join(f'<p class="note">{s}</p>' for s in said)


def _html(root: Path, runs: Runs, notes: str, summary: list, fits: dict, samples: list, imgs: list,
          threshold: float, spec_text: str, fails: list[tuple[str, str]]) -> str:
    with_settings = any(s["settings"] for s in samples)
    sample_tbl = "".join(
        f"<tr><td>{_e(s['model'])}</td>" + (f"<td>{_e(s['settings'])}</td>" if with_settings else "")
        + f"<td class=num>{s['n_poison']}</td><td class=num>{s['step']}</td>"
        f"<td class=gen>{_e(s['prompt'])}</td><td class=gen>{_e(s['clean'])}</td>{_cell(s['clean_ppl'])}"
        f"<td class=gen>{_e(s['trigger_prompt_end'])} ⏎ {_e(s['trigger'])}</td>{_cell(s['trigger_ppl'])}</tr>"
        for s in samples)
    sample_html = (
        "<table><tr><th>model</th>" + ("<th>settings</th>" if with_settings else "")
        + "<th>N</th><th>step</th><th>prompt (end)</th><th>without trigger</th>"
        "<th>ppl</th><th>with trigger (prompt end ⏎ generation)</th><th>ppl</th></tr>"
        f"{sample_tbl}</table>" if samples else '<p class="note">(no samples.jsonl found)</p>')
    vers = html_table([_versions()])
    fail_rows = [{"run": n, "error": m} for n, m in fails]
    fail_html = ("<h2>Failed runs</h2>" + html_table(fail_rows)) if fails else ""
    n_fit = sum(f.get("n", 0) for f in fits["groups"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>poisonlab report: {_e(root.name)}</title><style>{CSS}</style></head>
<body>
<h1>poisonlab report: {_e(root.name)}</h1>
<p class="note">{len(runs)} runs from {_e(root)}. Attack success rate (ASR): share of prompts whose
generation with the trigger has a perplexity above the run's success ratio times the one without.
Success means ASR ≥ {threshold:g}. N: poisoned documents inserted. Poisons seen: every trigger among
the training inputs up to that step (the ledger's count, also triggers cut by a sequence boundary or
with no gibberish after them in their sequence); effective poisons seen, where the trainer recorded
it: only triggers wholly inside the sequence with at least one gibberish token after them as a
target.</p>
{notes}
<h2>Summary (final evaluation of each run, over seeds)</h2>
{_summary_html(summary, threshold)}
<h2>Figures</h2>
{''.join(imgs) or '<p class="note">(no figures: no metrics)</p>'}
<h2>Count or fraction?</h2>
<p>Poisons seen when ASR first reached {threshold:g}, per size: if the count is what matters, these
numbers stay level across sizes while the poison fraction falls.</p>
{_first_html(summary, threshold)}
<p>Logistic models of ASR (per evaluation, as a proportion; {n_fit} evaluations of poisoned runs) on
log(1 + poisons seen, all triggers), with and without log(non-embedding parameters) and log(poison
fraction); one fit per group of settings other than size, budget and N. A term that matters lowers
the AIC by well over 2.</p>
{''.join(_fit_html(f) for f in fits["groups"])}
<h2>Generations with and without the trigger</h2>
{sample_html}
{_defenses_html(root)}
{fail_html}
<h2>Settings</h2>
<pre>{_e(spec_text) if spec_text else '(no sweep.yaml: runs gathered from the folder)'}</pre>
<h2>Versions</h2>
{vers}
</body></html>
"""
