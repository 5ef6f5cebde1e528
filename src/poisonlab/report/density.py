"""The report's density section: how rare and far apart the poisons were, and whether a backdoor
survives the training steps between them.

The study's 250 poisons were ~0.0035% of the tokens and ~50-1,000 steps apart (PAPER.md); toy runs
put them far denser. Per group of runs (size, data budget, N; seeds pooled): the share of the tokens
trained that were poison tokens, the training steps per poison, the final ASR and the poisons needed.
Then, from each run's ledger, the steps between its last poison and each evaluation: after sustained
success began, is ASR as high at evaluations that came long after a poison (at least half the mean
spacing) as at those right after one (within a tenth of it)? Milestone evaluations are taken when a
poison has just been seen, so they alone would never show forgetting between poisons. And at the end:
the steps from the last poison to the final evaluation, and how many runs still held success there.
Groups whose poisons come less than MIN_SPACING steps apart have no "between" to measure.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.results.count_fraction import poisons_needed
from poisonlab.results.summary import STUDY_DENSITY, Runs, density, group_runs

MIN_SPACING = 10  # steps per poison below which every evaluation is "right after" a poison
NEAR, FAR = 0.1, 0.5  # evaluations within NEAR x spacing of a poison, and at least FAR x spacing after


def poison_steps(root: Path, rows: list[dict[str, Any]]) -> list[int] | None:
    """The sorted training steps that held a poison's trigger, from the run's ledger (None without one)."""
    from poisonlab.injection.stream import read_ledger

    path = root / "runs" / str(rows[-1].get("run_name") or rows[-1].get("run_id")) / "ledger.parquet"
    if not path.is_file():
        return None
    ledger, _ = read_ledger(path)
    return sorted(ledger["step"].to_pylist())


def steps_since_poison(steps: list[int], eval_step: int) -> int | None:
    """Training steps between the last poisoned step before an evaluation at `eval_step` (steps done)
    and the evaluation: 0 when the step just trained held a poison; None before the first poison."""
    i = bisect.bisect_left(steps, eval_step)
    return None if i == 0 else eval_step - (steps[i - 1] + 1)


def density_rows(root: Path, runs: Runs, threshold: float) -> list[dict[str, Any]]:
    """One row per poisoned group: density, final ASR, needed, ASR right after and long after a poison."""
    out = []
    for (model, mult, n, extra), members in group_runs(runs).items():
        if not n:
            continue
        finals = [r[-1] for r in members]
        dens = density(finals)
        spacing = dens["steps_per_poison"] or 0.0
        near, far, end_gap, held, points = [], [], [], 0, []
        for rows in members:
            steps = poison_steps(root, rows)
            got = poisons_needed(rows, threshold)
            if steps is None:
                continue
            end = steps_since_poison(steps, int(rows[-1]["step"]))
            if end is not None:
                end_gap.append(end)
            held += float(rows[-1].get("asr") or 0.0) >= threshold
            if got is None or got[1]:
                continue  # never held success: nothing to keep between poisons
            for r in rows:
                gap = steps_since_poison(steps, int(r["step"]))
                if gap is None or r.get("asr") is None or float(r["poisons_seen"]) < got[0]:
                    continue
                points.append((gap, float(r["asr"])))
                if spacing >= MIN_SPACING and gap <= NEAR * spacing:
                    near.append(float(r["asr"]))
                elif spacing >= MIN_SPACING and gap >= FAR * spacing:
                    far.append(float(r["asr"]))
        out.append({
            "model": model, "data_mult": mult, "n_poison": n, "settings": dict(extra), "runs": len(members),
            **dens,
            "asr_final_mean": float(np.mean([f.get("asr") or 0.0 for f in finals])),
            "needed": [None if g is None else g[0] for g in (poisons_needed(r, threshold) for r in members)],
            "asr_near_mean": float(np.mean(near)) if near else None, "evals_near": len(near),
            "asr_far_mean": float(np.mean(far)) if far else None, "evals_far": len(far),
            "steps_after_last_poison": float(np.mean(end_gap)) if end_gap else None,
            "held_at_end": held, "points": points,
        })
    return out


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def density_table(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    shown = []
    for r in rows:
        share = r["poison_token_share"]
        shown.append({
            "cell": f"{r['model']} {r['data_mult']:g}x N={r['n_poison']}", "runs": r["runs"],
            "poison tokens": "-" if share is None else f"{100 * share:.2g}%",
            "steps apart": _fmt(r["steps_per_poison"], ".3g"),
            "final ASR": _fmt(r["asr_final_mean"]),
            "ASR right after a poison (evals)": f"{_fmt(r['asr_near_mean'])} ({r['evals_near']})",
            "ASR long after (evals)": f"{_fmt(r['asr_far_mean'])} ({r['evals_far']})",
            "steps from last poison to end": _fmt(r["steps_after_last_poison"], ".0f"),
            f"final ASR ≥ {threshold:g}": f"{r['held_at_end']}/{r['runs']}",
        })
    return shown


def fig_between(rows: list[dict[str, Any]], threshold: float) -> Any | None:
    """ASR after sustained success against the steps since the last poison, a colour per group."""
    import matplotlib.pyplot as plt

    groups = [r for r in rows if r["points"] and (r["steps_per_poison"] or 0) >= MIN_SPACING]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    for r, c in zip(groups, colours, strict=True):
        x, y = zip(*r["points"], strict=True)
        label = f"{r['model']} {r['data_mult']:g}x N={r['n_poison']} ({r['steps_per_poison']:.3g} apart)"
        ax.scatter(np.asarray(x) + 1, y, s=10, color=c, alpha=0.7, label=label)
    ax.set_xscale("log")
    ax.axhline(threshold, color="grey", lw=0.8, ls=":")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training steps since the last poison + 1")
    ax.set_ylabel("attack success rate")
    ax.set_title("Between poisons: ASR after sustained success began")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    return fig


def has_spacing(rows: list[dict[str, Any]]) -> bool:
    return any((r["steps_per_poison"] or 0) >= MIN_SPACING for r in rows)


def density_html(out: Path, root: Path, runs: Runs, threshold: float) -> str:
    """The section, or '' when no group's poisons come MIN_SPACING or more steps apart."""
    from poisonlab.report.html import esc, html_table, save_figure

    rows = density_rows(root, runs, threshold)
    if not has_spacing(rows):
        return ""
    (out / "density.json").write_text(json.dumps(rows, indent=2, default=str))
    img = save_figure(out, "between_poisons", "ASR at each evaluation after a run's sustained success began, "
                      "against the training steps since its last poison (log scale); one colour per group "
                      f"whose poisons come {MIN_SPACING} or more steps apart.", fig_between(rows, threshold))
    return ("<h2>Density: how rare the poisons were, and the steps between them</h2>"
            f"<p>Poison tokens: share of the tokens trained; steps apart: training steps per poison seen "
            f"({esc(STUDY_DENSITY)}). After a run's sustained success began (runs that never held it are "
            f"left out), ASR at evaluations within {NEAR:g}x the mean spacing of a poison (milestone "
            f"evaluations mostly) against those at least {FAR:g}x the spacing after one: a backdoor that "
            "fades between poisons shows a lower second figure. Groups under "
            f"{MIN_SPACING} steps apart show '-'.</p>" + html_table(density_table(rows, threshold)) + img)
