"""The report's persistence section: does a backdoor survive clean training after its last poison?

A sweep's `continue_clean` runs (`sweep.continuation`) start from a run of the same sweep and train on
clean data only. Each continuation is joined to its earlier run (`init_from`); its evaluations are
placed at the clean tokens trained since the earlier run's last poison (from that run's ledger: the
steps after the last poisoned one, then every continuation step). Per cell (the earlier run's size,
budget and N): ASR when clean training starts and at its end (mean, min-max over seeds), the share of
runs still at or above the success threshold, and the decay as the figure draws it (`decay_fit`, per
poisoned run): ASR against clean tokens after the last poison on a log axis follows a plateau, a fall
and a floor, so each run gets ASR(x) = floor + (top - floor) / (1 + (x / x50)^k) by least squares over
all its evaluations, its start (x = 0 for a run whose last poison came at its last step) included. It
gives the half-life x50 (clean tokens until half the fall), the width of the fall (decades from 90%
to 10% of it, 2 log10(9) / k), the steepest fall (ASR per decade at x50) and the floor (0: the decay
is complete; the study found it slow, roughly logarithmic and incomplete). These compare runs on the
same footing whatever their start: a straight line over the whole range, used before, mostly measured
the start's height over a common floor (and dropped the start point of runs whose last poison was the
final step). Figure: ASR against clean tokens after the last poison (log scale), a panel per size, a
colour per N, bands over seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.report.figures import _draw, _new_figure, aggregate
from poisonlab.results.summary import Runs

Cell = tuple[str, float, int]  # the earlier run's (model, data_mult, n_poison)
X = "clean_tokens_after_last_poison"


def continuations(runs: Runs) -> dict[str, str]:
    """{clean continuation: the earlier run it started from}, for earlier runs in this set (a
    continuation with poisons of its own is a poisoned run like any other: the main analysis has it)."""
    names = {str(rows[-1].get("run_name") or k): k for k, rows in runs.items()}
    out = {}
    for k, rows in runs.items():
        parent = rows[-1].get("init_from")
        if parent and str(parent) in names and not rows[-1].get("n_poison"):  # clean continuations
            out[k] = names[str(parent)]
    return out


def _after_last_poison(root: Path, rows: list[dict[str, Any]]) -> float:
    """Clean tokens the earlier run trained on after its last poisoned step (0 without poisons: all of
    its training is 'after' none, so N = 0 controls start at their own end)."""
    from poisonlab.injection.stream import read_ledger

    last = rows[-1]
    total_steps = round(last["step"] / last["progress"]) if last.get("progress") else last["step"]
    per_step = (last.get("tokens_seen") or 0) / max(last["step"], 1)
    path = root / "runs" / str(last.get("run_name")) / "ledger.parquet"
    if path.is_file():
        ledger, _ = read_ledger(path)
        if ledger.num_rows:
            return (total_steps - (max(ledger["step"].to_pylist()) + 1)) * per_step
    return 0.0


def persistence_cells(root: Path, runs: Runs) -> dict[Cell, list[list[dict[str, Any]]]]:
    """Each continuation's rows with `clean_tokens_after_last_poison`, by its earlier run's cell."""
    cells: dict[Cell, list] = defaultdict(list)
    for child, parent in continuations(runs).items():
        p = runs[parent]
        start = _after_last_poison(root, p)
        last = p[-1]
        cell = (str(last.get("model")), float(last.get("data_mult") or 1.0), int(last.get("n_poison") or 0))
        cells[cell].append([{**r, X: start + (r.get("tokens_seen") or 0)} for r in runs[child]])
    return dict(sorted(cells.items()))


def decay_fit(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """The decay curve of one continuation (module doc) fitted to its ASR against clean tokens after
    the last poison: top, floor, half_life (x50, tokens), steepness k, decades (90% -> 10% of the fall)
    and per_decade (ASR per decade at x50, negative when falling). None when it cannot be fitted."""
    from scipy.optimize import curve_fit

    pts = [(float(r[X]), float(r["asr"])) for r in rows if r.get(X) is not None and r.get("asr") is not None]
    if len(pts) < 5:  # four parameters
        return None
    x, y = np.array(pts).T
    if len({v for v in x if v > 0}) < 3:
        return None
    top0, floor0 = float(np.mean(y[:3])), float(np.mean(y[-3:]))
    below = x[(y < (top0 + floor0) / 2) & (x > 0)]
    mid = float(below[0]) if len(below) else float(np.median(x[x > 0]))

    def curve(x: np.ndarray, top: float, floor: float, log_x50: float, k: float) -> np.ndarray:
        return floor + (top - floor) / (1 + (x / 10**log_x50) ** k)

    span = math.log10(max(x.max(), 10.0))
    try:
        (top, floor, log_x50, k), _ = curve_fit(
            curve, x, y, p0=[top0, floor0, math.log10(mid), 2.0],
            bounds=([0.0, 0.0, 0.0, 0.1], [1.0, 1.0, span + 2, 30.0]), maxfev=20_000)
    except (RuntimeError, ValueError):
        return None
    return {"top": float(top), "floor": float(floor), "half_life": float(10**log_x50), "steepness": float(k),
            "decades": 2 * math.log10(9) / float(k),
            "per_decade": -float(top - floor) * float(k) * math.log(10) / 4}


DECAY = ("top", "floor", "half_life", "decades", "per_decade")


def persistence_rows(cells: dict[Cell, list], threshold: float) -> list[dict[str, Any]]:
    out = []
    for (model, mult, n), members in cells.items():
        start = [m[0]["asr"] for m in members]
        end = [m[-1]["asr"] for m in members]
        row = {
            "model": model, "data_mult": mult, "n_poison": n, "runs": len(members),
            "clean_after": float(np.mean([m[-1][X] for m in members])),
            "asr_start_mean": float(np.mean(start)), "asr_start_min": min(start), "asr_start_max": max(start),
            "asr_end_mean": float(np.mean(end)), "asr_end_min": min(end), "asr_end_max": max(end),
            "still_successful": sum(e >= threshold for e in end),
            "started_successful": sum(s >= threshold for s in start),
        }
        # a decay only where there was a backdoor to lose: N = 0 controls get none
        fits = [f for f in (decay_fit(m) for m in members) if f is not None] if n else []
        for key in DECAY:
            v = [f[key] for f in fits]
            row.update({f"decay_{key}_mean": float(np.mean(v)) if v else None,
                        f"decay_{key}_min": min(v, default=None), f"decay_{key}_max": max(v, default=None)})
        row["decay_fitted"] = len(fits)
        out.append(row)
    return out


def persistence_sentence(rows: list[dict[str, Any]], threshold: float) -> str:
    """How the decay compares with the study's (slow, roughly logarithmic, incomplete)."""
    poisoned = [r for r in rows if r["n_poison"] and r["started_successful"]]
    if not poisoned:
        return "No continued run started from a successful backdoor: nothing to say about persistence yet."
    kept = sum(r["still_successful"] for r in poisoned)
    began = sum(r["started_successful"] for r in poisoned)
    drop = float(np.mean([r["asr_start_mean"] - r["asr_end_mean"] for r in poisoned]))
    how = ("incomplete, as in the study" if kept else "complete, unlike the study's incomplete decay")
    return (f"Of {began} backdoored runs continued on clean data, {kept} were still at ASR ≥ {threshold:g} "
            f"at the end; ASR fell by {drop:.2f} on average: the decay was {how}.")


def fig_persistence(cells: dict[Cell, list], spread: str, threshold: float) -> Any | None:
    by_model: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_model[c[0]].append(c)
    if not by_model:
        return None
    ns = sorted({c[2] for c in cells})
    colours = {n: f"C{i % 10}" for i, n in enumerate(ns)}
    fig, axes = _new_figure(len(by_model))
    seen: dict[str, Any] = {}
    for ax, (model, cs) in zip(axes, by_model.items(), strict=True):
        for c in sorted(cs):
            curve = aggregate(cells[c], X, "asr", spread)
            if curve is None:
                continue
            keep = curve.x > 0  # a log axis
            for f in ("x", "mean", "lo", "hi", "n"):
                setattr(curve, f, getattr(curve, f)[keep])
            _draw(ax, curve, colours[c[2]], "-" if c[1] == 1.0 else "--", f"N = {c[2]}, {c[1]:g}x")
        ax.set_xscale("log")
        ax.axhline(threshold, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(model)
        ax.set_xlabel("clean tokens after the last poison")
        ax.grid(alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    axes[0].set_ylabel("attack success rate")
    axes[-1].legend(list(seen.values()), list(seen), fontsize=7, loc="best")
    fig.suptitle("Persistence: ASR under clean training after the last poison")
    return fig


def persistence_html(out: Path, rows: list[dict[str, Any]], cells: dict[Cell, list], threshold: float,
                     spread: str) -> str:
    """The section from `persistence_rows` (the report's persistence.json), its figure saved in `out`."""
    from poisonlab.report.html import esc, html_table, save_figure

    shown = [{"cell": f"{r['model']} {r['data_mult']:g}x N={r['n_poison']}", "runs": r["runs"],
              "clean tokens after the last poison (end)": f"{r['clean_after']:,.0f}",
              "ASR at start": _spread(r, "asr_start"), "ASR at end": _spread(r, "asr_end"),
              f"still ≥ {threshold:g}": f"{r['still_successful']}/{r['runs']}",
              "half-life (clean tokens)": _spread(r, "decay_half_life", "{:,.0f}"),
              "decades, 90% to 10% of the fall": _spread(r, "decay_decades"),
              "steepest, ASR per decade": _spread(r, "decay_per_decade", "{:+.2f}"),
              "floor": _spread(r, "decay_floor")} for r in rows]
    band = "min-max" if spread == "minmax" else "mean ± 1 std"
    img = save_figure(out, "persistence", "ASR against clean tokens trained after the earlier run's last "
                      f"poison (log scale), one panel per size, colour per N; mean over seeds, band {band}.",
                      fig_persistence(cells, spread, threshold))
    return ("<h2>Persistence under clean training</h2>"
            f"<p class=\"answer\">{esc(persistence_sentence(rows, threshold))}</p><p>Each poisoned run "
            "continued on clean data from its last checkpoint at its last learning rate, on the data after "
            "what it had read. ASR at start: the earlier run's final evaluation. The decay, per poisoned "
            "run: ASR(x) = floor + (top - floor) / (1 + (x / x50)^k) fitted over all its evaluations "
            "(x: clean tokens after the last poison), its start included; half-life x50, the width of "
            "the fall in decades of x (from 90% to 10% of it), the steepest fall (ASR per decade at "
            "x50) and the floor; mean [min, max] over seeds.</p>" + html_table(shown) + img)


def _spread(r: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    if r.get(key + "_mean") is None:
        return "-"
    return f"{fmt.format(r[key + '_mean'])} [{fmt.format(r[key + '_min'])}, {fmt.format(r[key + '_max'])}]"
