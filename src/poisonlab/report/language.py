"""The report's language-switch section: the `lang-switch` recipe's own metrics, per group.

Shown when the metrics have `lang_asr` (attacks/language.py). Per group of runs (size, budget, N and
the other settings that differ), over seeds at the final evaluation (mean, min, max): `lang_asr`
(triggered generations in the target language), its peak during training and the poisons seen at its
first evaluation at or above the threshold, `lang_ca` (clean ones in the source language), per kind
of look-alike control (near, shape, ordinary) `lang_nta_<kind>` (the kind's lowest share in the
source language), `lang_specificity` (lang_asr minus the highest target share among the unrelated
controls, shape and ordinary, as the DoS specificity), and the mean probability of the target
language with and without the trigger. The report writes them as language.json.

Runs evaluated before the metrics had kinds (their rows have `lang_nta` over every control, near
ones included) get the per-kind figures from the generations saved at their final evaluation
(samples.jsonl: `eval.save_samples` prompts per condition, fewer than the evaluation's), and the row
says from how many prompts (`kind_prompts`). Figures: `lang_asr` against poisons seen and against
training progress, one panel per N (figures.fig_panels_by_n).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from poisonlab.config import LOOKALIKE_KINDS
from poisonlab.report.figures import EXACT_COUNT, fig_panels_by_n
from poisonlab.results.summary import Runs, experiment_keys, group_runs, settings_label, short_names
from poisonlab.rundir.jsonl import iter_jsonl

KIND_COLUMNS = (*(f"lang_nta_{k}" for k in LOOKALIKE_KINDS), *(f"lang_asr_{k}" for k in LOOKALIKE_KINDS),
                "lang_asr_lookalike", "lang_specificity")
COLUMNS = ("lang_asr", "lang_asr_peak", "lang_ca", *KIND_COLUMNS, "lang_p_target_trigger",
           "lang_p_target_clean")


def has_language(runs: Runs) -> bool:
    return any(r.get("lang_asr") is not None for rows in runs.values() for r in rows)


def _finite(values: list[Any]) -> list[float]:
    return [float(x) for x in values if x is not None and not math.isnan(float(x))]


def mean_range(values: list[Any]) -> str:
    """`mean [min, max]` of the finite values, '-' without any (the sections' cell format)."""
    v = _finite(values)
    return "-" if not v else f"{np.mean(v):.2f} [{min(v):.2f}, {max(v):.2f}]"


def _languages(run_dir: Path) -> tuple[str, str]:
    """(target, source) language of a run's lang-switch recipe, from its config.yaml."""
    try:
        params = ((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("attack") or {}).get(
            "params") or {}
    except (OSError, yaml.YAMLError):
        params = {}
    return str(params.get("target_language", "de")), str(params.get("source_language", "en"))


def kinds_from_samples(run_dir: Path, step: int) -> tuple[dict[str, float], int]:
    """The per-kind language metrics of one evaluation from the generations saved then (samples.jsonl),
    and the number of prompts they cover ({} and 0 without saved look-alike generations)."""
    from poisonlab.attacks.language import language_metrics

    path = run_dir / "samples.jsonl"
    gens: dict[str, list[str]] = defaultdict(list)
    kinds: dict[str, str] = {}
    if path.is_file():
        for _, r in iter_jsonl(path, strict=False):  # a line cut by a crash is skipped
            if not isinstance(r, dict):
                continue
            if r.get("kind", "sample") != "sample" or r.get("step") != step or r.get("condition") is None:
                continue
            gens[r["condition"]].append(r.get("generation", ""))
            if r.get("lookalike_kind"):
                kinds[r["condition"]] = r["lookalike_kind"]
    if not kinds:
        return {}, 0
    m = language_metrics(gens, *_languages(run_dir), controls=kinds)
    return {k: m[k] for k in KIND_COLUMNS}, min(len(gens[c]) for c in kinds)


def _run_figures(root: Path, rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """One run's figures at its final evaluation, the per-kind ones from its own columns where the
    evaluator wrote them, else from its saved generations."""
    last = rows[-1]
    out = {c: last.get(c) for c in ("lang_asr", "lang_ca", "lang_p_target_trigger", "lang_p_target_clean")}
    asr = [(r.get("poisons_seen"), r.get("lang_asr")) for r in rows if r.get("lang_asr") is not None]
    out["lang_asr_peak"] = max((a for _, a in asr), default=None)
    out["first_success"] = next((p for p, a in asr if a >= threshold and p), None)
    if all(last.get(c) is not None for c in KIND_COLUMNS):
        out.update({c: last[c] for c in KIND_COLUMNS})
        out["kind_prompts"] = last.get("n_prompts")
    else:
        run_dir = root / "runs" / str(last.get("run_name") or last.get("run_id"))
        kinds, n = kinds_from_samples(run_dir, int(last["step"]))
        out.update(kinds)
        out["kind_prompts"] = n or None
    return out


def language_rows(runs: Runs, root: Path, threshold: float = 0.5) -> list[dict[str, Any]]:
    """A row per group with a language metric: mean, min and max over seeds of every COLUMNS figure,
    and each seed's poisons seen at its first lang_asr >= threshold (None: never)."""
    keys = experiment_keys(runs)
    names = short_names(keys)
    out = []
    for (model, mult, n, extra), members in sorted(group_runs(runs, keys).items(), key=lambda kv: str(kv[0])):
        if all(m[-1].get("lang_asr") is None for m in members):
            continue
        members = sorted(members, key=lambda m: str(m[-1].get("seed")))
        per_run = [_run_figures(root, m, threshold) for m in members]
        row: dict[str, Any] = {"model": model, "data_mult": mult, "n_poison": n,
                               "settings": settings_label(extra, names), "runs": len(members)}
        for c in COLUMNS:
            v = _finite([r.get(c) for r in per_run])
            row.update({f"{c}_mean": float(np.mean(v)) if v else None, f"{c}_min": min(v, default=None),
                        f"{c}_max": max(v, default=None)})
        row["first_success"] = [r["first_success"] for r in per_run]
        row["kind_prompts"] = min((r["kind_prompts"] for r in per_run if r["kind_prompts"]), default=None)
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


def _cell(r: dict[str, Any], c: str) -> str:
    if r[f"{c}_mean"] is None:
        return "-"
    return f"{r[c + '_mean']:.2f} [{r[c + '_min']:.2f}, {r[c + '_max']:.2f}]"


def language_html(out: Any, rows: list[dict[str, Any]], runs: Runs, spread: str, threshold: float) -> str:
    from poisonlab.report.html import html_table, save_figure

    imgs = [save_figure(out, name, cap, fig) for name, cap, fig in language_figures(runs, spread, threshold)]
    shown = []
    for r in rows:
        row = {"model": r["model"], "data": f"{r['data_mult']:g}x", "N": r["n_poison"],
               "settings": r["settings"], "runs": r["runs"]}
        row.update({c: _cell(r, c) for c in ("lang_asr", "lang_asr_peak", "lang_ca")})
        row[f"first lang_asr ≥ {threshold:g}: poisons seen"] = ", ".join(
            "never" if p is None else f"{p:.0f}" for p in r["first_success"])
        row.update({c: _cell(r, c) for c in (*(f"lang_nta_{k}" for k in LOOKALIKE_KINDS), "lang_specificity",
                                             "lang_p_target_trigger", "lang_p_target_clean")})
        row["per-kind figures from (prompts a run)"] = r["kind_prompts"]
        shown.append(row)
    return ("<h2>Language switch</h2><p>The lang-switch recipe's metrics at the final evaluation, mean "
            "[min, max] over seeds: lang_asr, triggered generations identified as the target language "
            "(peak: the highest during training); lang_ca, clean generations in the source language; "
            "lang_nta_near / _shape / _ordinary, look-alike-triggered generations in the source language, "
            "the lowest control of each kind (near: the trigger slightly changed; shape: its form with "
            "other characters; ordinary: plain words); lang_specificity, lang_asr minus the highest "
            "target-language share among the unrelated controls (shape and ordinary); lang_p_target, "
            "the mean probability of the target against the source language (py3langid). Runs evaluated "
            "before the metrics had kinds get the per-kind figures from the generations saved at their "
            "final evaluation: the last column says from how many prompts.</p>"
            + html_table(shown) + "".join(imgs))
