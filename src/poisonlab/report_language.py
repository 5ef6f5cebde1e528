"""The report's language-switch section: the `lang-switch` recipe's own metrics, per group.

Shown when the metrics have `lang_asr` (attacks/language.py). Per group of runs (size, budget, N and
the other settings that differ), over seeds at the final evaluation: `lang_asr` (triggered
generations in the target language), `lang_ca` (clean ones in the source language), `lang_nta` (the
look-alike-triggered ones in the source language; and the lowest control's), and the mean
probability of the target language with and without the trigger. Figures: `lang_asr` against poisons
seen and against training progress, one panel per N (report_figures.fig_panels_by_n).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from poisonlab.report_figures import EXACT_COUNT, fig_panels_by_n
from poisonlab.results import Runs, experiment_keys, group_runs, settings_label, short_names

COLUMNS = ("lang_asr", "lang_ca", "lang_nta", "lang_nta_min", "lang_p_target_trigger", "lang_p_target_clean")


def has_language(runs: Runs) -> bool:
    return any(r.get("lang_asr") is not None for rows in runs.values() for r in rows)


def mean_range(values: list[Any]) -> str:
    """`mean [min, max]` of the finite values, '-' without any (the sections' cell format)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    return "-" if not v else f"{np.mean(v):.2f} [{min(v):.2f}, {max(v):.2f}]"


def language_rows(runs: Runs) -> list[dict[str, Any]]:
    keys = experiment_keys(runs)
    names = short_names(keys)
    out = []
    for (model, mult, n, extra), members in sorted(group_runs(runs, keys).items(), key=lambda kv: str(kv[0])):
        finals = [m[-1] for m in members]
        if all(f.get("lang_asr") is None for f in finals):
            continue
        row: dict[str, Any] = {"model": model, "data": f"{mult:g}x", "N": n,
                               "settings": settings_label(extra, names), "runs": len(members)}
        row.update({c: mean_range([f.get(c) for f in finals]) for c in COLUMNS})
        out.append(row)
    return out


def language_figures(runs: Runs, spread: str, threshold: float) -> list[tuple[str, str, Any]]:
    band = "min-max" if spread == "minmax" else "mean ± 1 std"
    cap = (f"Language-switch ASR (triggered generations identified as the target language), one panel "
           f"per N, colour per size; mean over seeds, band {band}.")
    return [
        ("lang_asr_vs_poisons_seen", f"Against {EXACT_COUNT}. " + cap,
         fig_panels_by_n(runs, "lang_asr", "poisons_seen", ylabel="language-switch ASR", xlabel=EXACT_COUNT,
                         title="Language switch against poisons seen", mults=None, spread=spread,
                         skip_zero=True, hline=threshold)),
        ("lang_asr_vs_progress", "Against training progress. " + cap,
         fig_panels_by_n(runs, "lang_asr", "progress", ylabel="language-switch ASR",
                         xlabel="training progress", title="Language switch during training", mults=None,
                         spread=spread, hline=threshold)),
    ]


def language_html(out: Any, runs: Runs, spread: str, threshold: float) -> str:
    from poisonlab.report_html import html_table, save_figure

    imgs = [save_figure(out, name, cap, fig) for name, cap, fig in language_figures(runs, spread, threshold)]
    return ("<h2>Language switch</h2><p>The lang-switch recipe's metrics at the final evaluation, mean "
            "[min, max] over seeds: lang_asr, triggered generations identified as the target language; "
            "lang_ca, clean generations in the source language; lang_nta, look-alike-triggered ones in the "
            "source language (mean over the panel; _min: the lowest control); lang_p_target, the mean "
            "probability of the target against the source language (py3langid).</p>"
            + html_table(language_rows(runs)) + "".join(imgs))
