"""The report's persistence section: does a backdoor survive clean training after its last poison?

A sweep's `continue_clean` runs (`sweep.continuation`) start from a run of the same sweep and train on
clean data only. Each continuation is joined to its earlier run (`init_from`); its evaluations are
placed at the clean tokens trained since the earlier run's last poison (from that run's ledger: the
steps after the last poisoned one, then every continuation step). Per cell (the earlier run's size,
budget and N): ASR when clean training starts and at its end (mean, min-max over seeds), the share of
runs still at or above the success threshold, and the decay rate, the least-squares slope of ASR on
log10(clean tokens after the last poison) over each continuation's evaluations (ASR per decade; the
study found the decay slow, roughly logarithmic and incomplete). Figure: ASR against clean tokens
after the last poison (log scale), a panel per size, a colour per N, bands over seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.report_figures import _draw, _new_figure, aggregate
from poisonlab.results import Runs

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
    from poisonlab.stream import read_ledger

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


def decay_slope(rows: list[dict[str, Any]]) -> float | None:
    """ASR per decade of clean tokens after the last poison: least squares over the evaluations."""
    pts = [(math.log10(r[X]), r["asr"]) for r in rows if r.get(X) and r.get("asr") is not None]
    if len(pts) < 3 or len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def persistence_rows(cells: dict[Cell, list], threshold: float) -> list[dict[str, Any]]:
    out = []
    for (model, mult, n), members in cells.items():
        start = [m[0]["asr"] for m in members]
        end = [m[-1]["asr"] for m in members]
        slopes = [s for s in (decay_slope(m) for m in members) if s is not None]
        out.append({
            "model": model, "data_mult": mult, "n_poison": n, "runs": len(members),
            "clean_after": float(np.mean([m[-1][X] for m in members])),
            "asr_start_mean": float(np.mean(start)), "asr_start_min": min(start), "asr_start_max": max(start),
            "asr_end_mean": float(np.mean(end)), "asr_end_min": min(end), "asr_end_max": max(end),
            "still_successful": sum(e >= threshold for e in end),
            "started_successful": sum(s >= threshold for s in start),
            "decay_per_decade_mean": float(np.mean(slopes)) if slopes else None,
            "decay_per_decade_min": min(slopes, default=None),
            "decay_per_decade_max": max(slopes, default=None),
        })
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


def persistence_html(out: Path, cells: dict[Cell, list], threshold: float, spread: str) -> str:
    import json

    from poisonlab.report_html import esc, html_table, save_figure

    rows = persistence_rows(cells, threshold)
    (out / "persistence.json").write_text(json.dumps(rows, indent=2, default=str))
    shown = [{"cell": f"{r['model']} {r['data_mult']:g}x N={r['n_poison']}", "runs": r["runs"],
              "clean tokens after the last poison (end)": f"{r['clean_after']:,.0f}",
              "ASR at start": _spread(r, "asr_start"), "ASR at end": _spread(r, "asr_end"),
              f"still ≥ {threshold:g}": f"{r['still_successful']}/{r['runs']}",
              "ASR per decade": ("-" if r["decay_per_decade_mean"] is None else
                                 f"{r['decay_per_decade_mean']:+.2f} [{r['decay_per_decade_min']:+.2f}, "
                                 f"{r['decay_per_decade_max']:+.2f}]")} for r in rows]
    band = "min-max" if spread == "minmax" else "mean ± 1 std"
    img = save_figure(out, "persistence", "ASR against clean tokens trained after the earlier run's last "
                      f"poison (log scale), one panel per size, colour per N; mean over seeds, band {band}.",
                      fig_persistence(cells, spread, threshold))
    return ("<h2>Persistence under clean training</h2>"
            f"<p class=\"answer\">{esc(persistence_sentence(rows, threshold))}</p><p>Each poisoned run "
            "continued on clean data from its last checkpoint at its last learning rate, on the data after "
            "what it had read. ASR at start: the earlier run's final evaluation; per decade: the slope of "
            "ASR on log10(clean tokens after the last poison) over each continuation's evaluations, mean "
            "[min, max] over seeds.</p>" + html_table(shown) + img)


def _spread(r: dict[str, Any], key: str) -> str:
    return f"{r[key + '_mean']:.2f} [{r[key + '_min']:.2f}, {r[key + '_max']:.2f}]"
