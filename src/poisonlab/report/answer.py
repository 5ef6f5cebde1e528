"""The report's opening section: the answer to "count or fraction?".

`fit_groups` runs `count_fraction.count_vs_fraction` once per group of the settings a fit does not span
(size, budget and N are what it fits across); `answer_html` renders the sentence per group, the table
of the designs (size axis, budget axis, all runs, within N) and the binomial model, and how the
figures were computed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from poisonlab.report.figures import EFFECTIVE_COUNT, EXACT_COUNT, has_column
from poisonlab.report.html import esc, html_table, interval
from poisonlab.results.summary import (
    DEFAULT_THRESHOLD,
    Runs,
    experiment_keys,
    group_runs,
    settings_label,
    short_names,
)

# settings the count-vs-fraction fits span along with size and N (the data budget is their x); runs that
# differ in any other setting (a schedule, a trigger) are fitted apart
FIT_SPANS = frozenset({"train.tokens_per_param", "train.max_steps", "train.budget_params"})
DESIGNS = {"size": "size axis", "budget": "budget axis", "all": "all runs", "per_n": "within N"}


def fit_groups(runs: Runs, threshold: float = DEFAULT_THRESHOLD, n_boot: int = 1000) -> list[dict[str, Any]]:
    """`count_fraction.count_vs_fraction` once per group of the settings a fit does not span, with its
    `label` and `settings` (one group, label '', when the runs differ only in size, budget and N); the
    same on the effective count under `effective` when every run has that count."""
    from poisonlab.results.count_fraction import count_vs_fraction

    keys = [k for k in experiment_keys(runs) if k not in FIT_SPANS and not k.startswith("model.")]
    names = short_names(keys)
    pooled: dict[tuple, Runs] = defaultdict(dict)
    for (_model, _mult, _n, extra), members in group_runs(runs, keys).items():
        pooled[extra].update({str(rows[-1].get("run_id")): rows for rows in members})
    effective = has_column(runs, "poisons_seen_effective")
    out = []
    for extra in sorted(pooled, key=str):
        group = {"label": settings_label(extra, names), "settings": dict(extra),
                 **count_vs_fraction(pooled[extra], threshold, "poisons_seen", n_boot)}
        if effective:
            group["effective"] = count_vs_fraction(pooled[extra], threshold, "poisons_seen_effective", n_boot)
        out.append(group)
    return out


def _reading(fit: dict[str, Any]) -> str:
    from poisonlab.results.count_fraction import reading

    if "slope" not in fit:
        return fit.get("note", "not identified")
    return reading(fit) + (f" ({fit['note']})" if fit.get("note") else "")


def design_rows(res: dict[str, Any], count: str) -> list[dict[str, Any]]:
    """The answer table's rows for one count: the three designs, then the binomial model."""
    rows = []
    for key, name in DESIGNS.items():
        f = res["fits"][key]
        rows.append({"count": count, "design": f"{name}: {f['design']}", "slope b": f.get("slope"),
                     "95% interval": interval(f.get("ci")),
                     "bootstrap 95%": interval(f.get("bootstrap_ci")),
                     "runs": f["runs"], "censored": f["censored"], "sigma": f.get("sigma"),
                     "horizon": "N" if key == "per_n" else f.get("horizon"),
                     "reading": _reading(f) + (f"; N = {', '.join(map(str, f['n_left_out']))} left out "
                                               "(no run succeeded)" if f.get("n_left_out") else "")})
    b = res["binomial"]
    rows.append({"count": count, "design": "binomial model: per-prompt success, every evaluation of every "
                 "poisoned run, errors clustered by run", "slope b": b.get("slope"),
                 "95% interval": interval(b.get("ci")), "bootstrap 95%": "-", "runs": b["runs"],
                 "censored": "-", "sigma": "-", "horizon": "-", "reading": _reading(b)})
    return rows


def answer_html(fits: dict[str, Any], fig: str) -> str:
    """The report's opening: the sentence per group, the table of designs, how it was computed, the figure."""
    thr, groups = fits["threshold"], fits["groups"]
    parts = []
    for g in groups:
        head = f"<b>{esc(g['label'])}:</b> " if g["label"] else ""
        parts.append(f'<p class="answer">{head}{esc(g["sentence"])}</p>')
    for g in groups:
        rows = design_rows(g, "exact")
        if g.get("effective"):
            rows += design_rows(g["effective"], "effective")
        title = f"<h3>{esc(g['label'])}</h3>" if g["label"] else ""
        parts.append(title + html_table(rows))
    effective = any(g.get("effective") for g in groups)
    boot = (f"percentile bootstrap over runs resampled within each size and budget ({fits['n_boot']} refits)"
            if fits["n_boot"] else "no bootstrap (n_boot = 0)")
    parts.append(
        f'<p class="note">Poisons needed: the poisons seen when ASR became sustained (≥ {thr:g} at that '
        "evaluation and at every later one up to a horizon of poisons seen), interpolated in log(poisons "
        "seen) between the evaluation before and that one; a run that never got there is censored at the "
        "horizon (it needed more). The runs of one fit share the horizon, since a run watched over more "
        "poisons has more chances to dip below the threshold: within N it is N (evaluations after the "
        "last poison measure persistence, not this); pooled over N it is the run end at which most runs "
        "held success (column <i>horizon</i>), and runs that end before it are left out. "
        f"Count: {EXACT_COUNT}, exact from the ledger (rows <i>exact</i>)"
        + (f"; rows <i>effective</i>: the same on the {EFFECTIVE_COUNT}" if effective else "")
        + ". b: slope of log(poisons needed) on log(clean tokens trained), a censored (Tobit) regression; "
        "b = 0 is a constant count, b = 1 a constant fraction. 95% interval: the model's (Student t; "
        f"checked for coverage on simulated sweeps); bootstrap: {boot}. Size axis: sizes at one data "
        "budget; budget axis: several budgets within a size (an intercept per size); all runs: every "
        "poisoned run; within N: all runs with an intercept per N inserted (runs compared only with runs "
        "of the same N; an N at which no run succeeded is left out). The binomial model (logit of "
        "per-prompt success on log poisons seen and log clean "
        "tokens) gives the same slope from every evaluation; N = 0 runs are left out.</p>")
    return "\n".join(parts) + fig
