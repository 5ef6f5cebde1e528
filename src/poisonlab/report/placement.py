"""The report's ordering-and-density section: what placement does to a fixed number of poisons.

The study varied how its poisons were spread: poisons per poisoned batch (density), one poisoned batch
every k steps (frequency), and the part of training that received them; higher density needed MORE
poisons for the same success. A sweep's runs of one size, data budget and N that differ only in
placement (`placement.describe`: `window`, `per_batch`, `every`) form a placement cell. Per cell:

- a table row per placement: final and peak ASR over seeds (peak minus final shows a backdoor that
  faded during the clean training after its window), the gap, and the poisons each run needed for
  sustained success (`count_fraction.poisons_needed`);
- the density fit: a censored (Tobit) regression of log(poisons needed) on log(poisons per batch), one
  intercept per window, over the `clustered` runs (poisoned batches uniform over the window: only the
  density differs; `every` also fixes when they come). Its slope d is
  the elasticity of the poisons needed in density: d > 0 is the study's "denser needs more", d = 0 no
  effect; 95% interval by Student t on the uncensored runs, as for the count-vs-fraction slope;
- figures: ASR against poisons seen and against training progress, one panel per window, one colour
  per density, mean over seeds with a min-max (or +-1 std) band.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.report.figures import EXACT_COUNT, LINESTYLES, _draw, _new_figure, aggregate
from poisonlab.report.html import html_table, interval, save_figure
from poisonlab.results.count_fraction import _tobit, poisons_needed
from poisonlab.results.summary import Runs, experiment_keys, settings_label, settings_of, short_names

Placement = tuple[str, Any, Any, str]  # (window, per_batch, every, schedule)
Cell = tuple[str, float, int, str]  # (model, data_mult, n_poison, the other settings that differ)
DENSITY_COLOURS = {None: "0.45"}  # random boundaries (uniform insertion): grey; densities: C0, C1, ...


def placement_of(row: dict[str, Any]) -> Placement:
    pb, ev = row.get("per_batch"), row.get("every")
    return (str(row.get("window") or "all"), None if pb is None else int(pb), None if ev is None else int(ev),
            str(row.get("schedule") or "uniform"))


def placement_label(p: Placement) -> str:
    window, per_batch, every, _ = p
    what = ("random boundaries" if per_batch is None else f"{per_batch} per batch"
            + (f", every {_steps(every)}" if every is not None else ""))
    return what if window == "all" else f"{what}, window {window}"


def _window_order(window: str) -> tuple[float, str]:
    """all first, then by where the window starts (beginning, spans, middle, end)."""
    if window == "all":
        return (-1.0, window)
    name = window.split()[0]
    start = {"beginning": 0.0, "middle": 0.5, "end": 1.0}.get(name)
    if start is None:
        try:
            start = float(window.split("-")[0])
        except ValueError:
            start = 2.0
    return (start, window)


def placement_cells(runs: Runs) -> dict[Cell, dict[Placement, list[list[dict[str, Any]]]]]:
    """Poisoned runs by (size, budget, N), then by placement; only cells with two placements or more."""
    others = [k for k in experiment_keys(runs) if not k.startswith("placement.")]
    names = short_names(others)
    cells: dict[Cell, dict[Placement, list]] = defaultdict(lambda: defaultdict(list))
    for rows in runs.values():
        last = rows[-1]
        if not last.get("n_poison"):
            continue
        settings = settings_of(rows)
        extra = settings_label(tuple((k, settings.get(k)) for k in others), names) if others else ""
        cell = (str(last.get("model")), float(last.get("data_mult") or 1.0), int(last["n_poison"]), extra)
        cells[cell][placement_of(last)].append(rows)
    return {c: dict(v) for c, v in cells.items() if len(v) > 1}


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None]:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    return (float(np.mean(v)), min(v), max(v)) if v else (None, None, None)


def placement_rows(cells: dict[Cell, dict[Placement, list]], threshold: float) -> list[dict[str, Any]]:
    """One row per placement of each cell: seeds, final and peak ASR, gap, poisons needed."""
    out = []
    for (model, mult, n, extra), by_p in sorted(cells.items()):
        for p in sorted(by_p, key=lambda p: (_window_order(p[0]), p[1] or 0, p[2] or 0, p[3])):
            members = by_p[p]
            finals = [r[-1] for r in members]
            needed = [poisons_needed(r, threshold) for r in members]
            got = [x for x in needed if x is not None]
            final = _stats([f.get("asr") for f in finals])
            peak = _stats([max((x.get("asr") or 0.0) for x in r) for r in members])
            out.append({
                "model": model, "data_mult": mult, "n_poison": n, "settings": extra,
                "placement": placement_label(p),
                "window": p[0], "per_batch": p[1], "every": p[2], "runs": len(members),
                "asr_mean": final[0], "asr_min": final[1], "asr_max": final[2], "peak_asr_mean": peak[0],
                "gap_mean": _stats([f.get("gap") for f in finals])[0],
                "needed_median": float(np.median([v for v, _ in got])) if got else None,
                "needed_min": min((v for v, _ in got), default=None),
                "needed_max": max((v for v, _ in got), default=None),
                "needed_censored": sum(c for _, c in got),
            })
    return out


def density_fit(members: dict[Placement, list[list[dict[str, Any]]]], threshold: float) -> dict[str, Any]:
    """log(poisons needed) = d log(per_batch) + an intercept per window, right-censored (see module)."""
    pts = []  # (per_batch, window, log needed, censored)
    for p, runs in members.items():
        if p[1] is None or p[3] != "clustered":  # uniform has no set density; `every` also sets timing
            continue
        for rows in runs:
            got = poisons_needed(rows, threshold)
            if got is not None:
                pts.append((p[1], p[0], math.log(got[0]), got[1]))
    out: dict[str, Any] = {"runs": len(pts), "censored": sum(c for *_, c in pts),
                           "densities": sorted({d for d, *_ in pts})}
    if len(out["densities"]) < 2:
        out["note"] = "fewer than two densities: no density effect to fit"
        return out
    windows = sorted({w for _, w, *_ in pts}, key=_window_order)
    X = np.array([[math.log(d)] + [float(w == v) for v in windows] for d, w, *_ in pts])
    y = np.array([v for *_, v, _ in pts])
    cens = np.array([c for *_, c in pts], dtype=bool)
    n_ok = int((~cens).sum())
    if n_ok < X.shape[1] + 2:
        out["note"] = (f"too few runs reached sustained success ({n_ok}; at least {X.shape[1] + 2} are "
                       "needed to estimate their spread)")
        return out
    try:
        beta, se, sigma, _ = _tobit(y, X, cens)
    except (OverflowError, np.linalg.LinAlgError):
        out["note"] = "the censored regression did not converge: the density effect is not identified"
        return out
    from scipy.stats import t as student_t

    df = n_ok - X.shape[1] - 1
    q = float(student_t.ppf(0.975, df))
    out.update(slope=float(beta[0]), se=float(se[0]), sigma=float(sigma), df=df, windows=windows,
               ci=[float(beta[0] - q * se[0]), float(beta[0] + q * se[0])])
    return out


def density_reading(fit: dict[str, Any]) -> str:
    if "ci" not in fit:
        return fit.get("note", "")
    lo, hi = fit["ci"]
    if lo > 0:
        return "denser batches needed more poisons (as the study found)"
    if hi < 0:
        return "denser batches needed fewer poisons (unlike the study)"
    return "no density effect resolved: the interval holds 0"


def fig_placement(members: dict[Placement, list[list[dict[str, Any]]]], xcol: str, xlabel: str,
                  title: str, spread: str, threshold: float) -> Any | None:
    """One panel per window, one colour per density (grey: random boundaries), a line style per period
    of the `every` schedule (solid: not periodic)."""
    by_window: dict[str, list[Placement]] = defaultdict(list)
    for p in members:
        by_window[p[0]].append(p)
    if not by_window:
        return None
    densities = sorted({p[1] for p in members if p[1] is not None})
    colours = {**DENSITY_COLOURS, **{d: f"C{i % 10}" for i, d in enumerate(densities)}}
    periods = sorted({p[2] for p in members if p[2] is not None})
    styles = {None: "-", **{k: LINESTYLES[1 + i % (len(LINESTYLES) - 1)] for i, k in enumerate(periods)}}
    windows = sorted(by_window, key=_window_order)
    fig, axes = _new_figure(len(windows))
    seen: dict[str, Any] = {}
    for ax, w in zip(axes, windows, strict=True):
        for p in sorted(by_window[w], key=lambda p: (p[1] or 0, p[2] or 0)):
            c = aggregate(members[p], xcol, "asr", spread)
            if c is None:
                continue
            label = placement_label(("all", *p[1:]))  # the panel names the window
            _draw(ax, c, colours[p[1]], styles[p[2]], label)
        ax.axhline(threshold, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title("whole run" if w == "all" else f"window {w}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    axes[0].set_ylabel("attack success rate")
    axes[-1].legend(list(seen.values()), list(seen), fontsize=7, loc="best")
    fig.suptitle(title)
    return fig


def placement_figures(cells: dict[Cell, dict[Placement, list]], spread: str,
                      threshold: float) -> list[tuple[str, str, Any]]:
    """(name, caption, figure) for each cell, against poisons seen and against training progress."""
    band = "min-max" if spread == "minmax" else "mean ± 1 std"
    out = []
    for i, ((model, mult, n, extra), members) in enumerate(sorted(cells.items())):
        tag = f"{model}, {mult:g}x data, N = {n}" + (f", {extra}" if extra else "")
        suffix = "" if len(cells) == 1 else f"_{i}"
        cap = (f"{tag}: ASR per placement, one panel per window of training, colour per density "
               f"(poisons per poisoned batch; grey: each poison at its own random document boundary), "
               f"dashed / dotted: one poisoned batch every k steps. Mean over seeds, band {band}.")
        out.append((f"placement_vs_poisons_seen{suffix}", f"Against {EXACT_COUNT}. " + cap,
                    fig_placement(members, "poisons_seen", EXACT_COUNT, f"Placement: {tag}", spread,
                                  threshold)))
        out.append((f"placement_vs_progress{suffix}", "Against training progress (a fall after a window "
                    "ends is the backdoor fading under clean training). " + cap,
                    fig_placement(members, "progress", "training progress", f"Placement: {tag}", spread,
                                  threshold)))
    return out


def placement_json(cells: dict, threshold: float) -> dict[str, Any]:
    """The section's figures as data (the report's placement.json): a row per placement, the density
    fit per cell."""
    fits = [{"model": c[0], "data_mult": c[1], "n_poison": c[2], "settings": c[3],
             **density_fit(members, threshold)} for c, members in sorted(cells.items())]
    return {"rows": placement_rows(cells, threshold), "density_fits": fits}


def placement_html(out: Path, data: dict[str, Any], cells: dict, threshold: float, spread: str) -> str:
    """The ordering-and-density section from `placement_json`'s data, its figures saved in `out`."""
    rows, fits = data["rows"], data["density_fits"]
    shown = [{"cell": f"{r['model']} {r['data_mult']:g}x N={r['n_poison']}" + (f" {r['settings']}"
                                                                               if r["settings"] else ""),
              "placement": r["placement"], "runs": r["runs"],
              "final ASR": f"{_fmt(r['asr_mean'])} [{_fmt(r['asr_min'])}, {_fmt(r['asr_max'])}]",
              "peak ASR": r["peak_asr_mean"], "gap": r["gap_mean"],
              "poisons needed": ("-" if r["needed_median"] is None else
                                 f"{r['needed_median']:.0f} [{r['needed_min']:.0f}, {r['needed_max']:.0f}]"
                                 + (f" ({r['needed_censored']} censored)" if r["needed_censored"] else ""))}
             for r in rows]
    fit_rows = [{"cell": f"{f['model']} {f['data_mult']:g}x N={f['n_poison']}", "slope d": f.get("slope"),
                 "95% interval": interval(f.get("ci")), "runs": f["runs"], "censored": f["censored"],
                 "densities": ", ".join(map(str, f["densities"])), "reading": density_reading(f)}
                for f in fits]
    figs = placement_figures(cells, spread, threshold)
    imgs = [save_figure(out, name, caption, fig) for name, caption, fig in figs]
    return (
        "<h2>Ordering and density</h2><p>The same number of poisons placed differently: density (poisons "
        "per poisoned batch), frequency (one poisoned batch every k steps) and the window of training "
        "that receives them. Final ASR: mean [min, max] over seeds; peak ASR: the highest during "
        f"training (above the final one when the backdoor faded after its window); poisons needed for "
        f"sustained ASR ≥ {threshold:g}: median [min, max] over seeds, censored runs at the poisons they "
        "saw.</p>" + html_table(shown)
        + "<p>Density effect: a censored regression of log(poisons needed) on log(poisons per batch) "
        "with one intercept per window, over the clustered runs (only the density differs). d > 0: "
        "denser batches need more poisons (the study's finding), d = 0: density does not matter; 95% "
        "interval by Student t.</p>" + html_table(fit_rows) + "".join(imgs))


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def _steps(k: int) -> str:
    return "step" if k == 1 else f"{k} steps"
