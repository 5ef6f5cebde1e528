"""The sweep report: the count-vs-fraction answer first, then the study's figures, one HTML file.

`build_report(sweep_dir)` writes `<sweep_dir>/report/`: `report.html` (self-contained: figures as
base64 PNG), every figure as PNG and SVG, `samples.json`, and the report's figures as data
(`report_json`): `summary.json`, `fits.json` and, where the runs have them, `placement.json`,
`persistence.json` and `language.json`. An archive under docs/findings keeps that JSON beside its runs
(`archive_json=True`, `poisonlab report DIR --write-archive-json`, `make findings`), and a test checks
that it is what the runs give.

The report opens with the answer to "count or fraction?" (answer.py: `count_fraction.count_vs_fraction`,
once per group of settings other than size, budget and N): one sentence, the table of the three designs
(size axis, budget axis, all runs) with the slope b of log(poisons needed) on log(clean tokens), its 95%
and bootstrap intervals and a reading, the binomial model beside them, and `poisons_needed` against
clean tokens (log-log, censored runs as lower bounds, the fit and the b = 0 / b = 1 references).
`fits.json` holds that output per group (`effective`: the same on the effective count).

Figures (drawn in figures.py), after the study:

- `asr_vs_progress`, `gap_vs_progress` (its Figures 2a/2b): one panel per n_poison, one colour per size,
  mean over training and poison-set seeds and a shaded band over them (min-max, or +-1 std), runs at
  the 1x data budget (all runs when each size has one budget);
- `asr_by_kind`: ASR of the trigger and of each kind of look-alike control (near, shape, ordinary)
  during training, when the evaluator wrote them;
- `asr_vs_poisons_seen` (its Figure 4): all budgets, against poisons seen as the ledger counts them
  (every trigger among the training inputs); `asr_vs_poisons_seen_effective` beside it when the
  metrics have `poisons_seen_effective`;
- `val_loss`: clean validation loss per size against tokens seen;
- the clean capability beside the backdoor (clean.py): each group's final held-out clean loss and its
  difference from the N = 0 control, with a 95% interval;
- a table of generations with and without the trigger (its Figure 3), HTML-escaped.

Runs are grouped by size, data budget, N and every other setting that differs across them
(`results.experiment_keys`: a schedule, trigger or recipe axis), and averaged over seeds only.

`<sweep_dir>/defenses.json`, when present, is rendered as a table: a list of rows, or
`{"title": ..., "rows": [...], "notes": ..., "figures": [paths relative to the sweep dir]}`.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from poisonlab.fsutil import atomic_path, write_text
from poisonlab.report.answer import answer_html, fit_groups
from poisonlab.report.clean import clean_html
from poisonlab.report.density import density_html
from poisonlab.report.figures import (
    EFFECTIVE_COUNT,
    EXACT_COUNT,
    fig_asr_kinds,
    fig_needed,
    fig_panels_by_n,
    fig_val_loss,
    fmt_params,
    has_column,
    main_mult,
)
from poisonlab.report.html import (
    CSS,
    VIEWPORT,
    cell,
    esc,
    html_table,
    img,
    save_figure,
    scroll,
    spec_for_display,
)
from poisonlab.report.language import has_language, language_html, language_rows
from poisonlab.report.persistence import continuations, persistence_cells, persistence_html, persistence_rows
from poisonlab.report.placement import placement_cells, placement_html, placement_json
from poisonlab.report.samples import sample_rows
from poisonlab.results.store import Gathered, failed_runs, gathered
from poisonlab.results.summary import (
    DEFAULT_THRESHOLD,
    Runs,
    experiment_keys,
    finished,
    fmt_needed,
    fmt_seeds,
    fmt_spread,
    has_specificity,
    runs_of,
    settings_of,
    summarize,
    unfinished_note,
)
from poisonlab.rundir.check import older_note

# --- HTML ------------------------------------------------------------------------------------------


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


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    digits = 0 if abs(mean) >= 100 else 1
    return f"{mean:,.{digits}f}" + ("" if std is None else f" ± {std:,.{digits}f}")


def _summary_html(summary: list[dict[str, Any]], threshold: float) -> str:
    """Two tables that fit the page: the figures a reader needs first, then the rest per group."""
    with_settings = any(r["label"] for r in summary)
    with_effective = any(r.get("poisons_seen_effective") is not None for r in summary)
    with_panel = has_specificity(summary)
    main, detail = [], []
    for r in summary:
        key: dict[str, Any] = {"model": r["model"], "data": _data(r), "N inserted": r["n_poison"]}
        if with_settings:
            key["settings"] = r["label"]
        unfinished = f" ({r['unfinished_runs']} unfinished)" if r["unfinished_runs"] else ""
        row = {**key, "params (non-emb.)": fmt_params(r["params_nonemb"]), "runs": f"{r['runs']}{unfinished}",
               "final ASR, mean (min to max)": fmt_spread(r, "asr"),
               "final gap, mean ± std": _mean_std(r["gap_mean"], r["gap_std"])}
        if with_panel:  # mean (min to max) over seeds
            row["specificity (ASR - look-alike)"] = fmt_spread(r, "specificity")
            row["near look-alike ASR"] = fmt_spread(r, "asr_near")
        row["look-alike ASR"] = fmt_spread(r, "asr_lookalike")
        row[f"poisons needed, sustained ASR≥{threshold:g}"] = fmt_needed(r)
        main.append(row)
        more = {**key, "seeds: train / poison set": fmt_seeds(r), "poisons per token": r["poison_fraction"],
                "val loss": r["val_loss_mean"], "poisons seen at end (all triggers)": r["poisons_seen"]}
        if with_effective:
            more["effective poisons seen at end"] = r.get("poisons_seen_effective")
            more["effective poisons needed"] = fmt_needed(r, "needed_effective")
        more[f"seeds reaching ASR≥{threshold:g}"] = f"{r['success_runs']}/{r['runs']}"
        more["then poisons seen (all triggers), median"] = r["first_success_median"]
        if with_effective:
            more["then effective poisons seen, median"] = r.get("first_success_effective_median")
        detail.append(more)
    return (html_table(main) + '<p class="note">The same groups: seeds, poison share, validation loss, '
            "poisons seen, and when ASR first reached the threshold.</p>" + html_table(detail))


def _needed_html(summary: list[dict[str, Any]], threshold: float) -> str:
    """Per poisoned group: the poisons each seed needed for sustained success (the count question)."""
    with_settings = any(r["label"] for r in summary)
    with_effective = any(r.get("needed_effective_runs") for r in summary)
    rows = []
    for r in summary:
        if not r["n_poison"]:
            continue
        row: dict[str, Any] = {"model": r["model"], "data": _data(r), "N inserted": r["n_poison"]}
        if with_settings:
            row["settings"] = r["label"]
        row.update({"clean tokens": r.get("clean_tokens"), "poisons per token": r["poison_fraction"],
                    "runs": r["runs"], f"poisons needed, sustained ASR≥{threshold:g}": fmt_needed(r)})
        if with_effective:
            row["same, effective count"] = fmt_needed(r, "needed_effective")
        row[f"first ASR≥{threshold:g}: poisons seen, median"] = r["first_success_median"]
        row[f"seeds reaching ASR≥{threshold:g}"] = f"{r['success_runs']}/{r['runs']}"
        rows.append(row)
    return html_table(rows)


def _defenses_html(root: Path) -> str:
    path = root / "defenses.json"
    if not path.exists():
        return ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return f'<h2>Defenses</h2><p class="note">defenses.json could not be read: {esc(e)}</p>'
    if isinstance(data, list):
        data = {"rows": data}
    parts = [f"<h2>{esc(data.get('title', 'Defenses'))}</h2>"]
    if data.get("notes"):
        parts.append(f'<p class="note">{esc(data["notes"])}</p>')
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    parts.append(html_table(rows))
    for fig in data.get("figures", []):
        p = root / fig
        if p.suffix.lower() == ".png" and p.exists():
            parts.append(img(p.read_bytes(), p.stem))
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


@dataclass
class _Data:
    """What the report shows, computed from the runs; `outputs` is its JSON, {file name: content}."""

    table: Any
    runs: Runs
    summary: list[dict[str, Any]]
    fits: dict[str, Any]
    persist: dict[Any, list] | None
    cells: dict[Any, list]
    threshold: float
    spread: str
    include_unfinished: bool
    spec_text: str
    gathered: Gathered
    outputs: dict[str, Any] = field(default_factory=dict)


def _compute(root: Path, threshold: float | None, spread: str | None, include_unfinished: bool | None,
             n_boot: int | None, write: bool = True, skip_broken: bool = False) -> _Data:
    """Everything the report shows, from the runs that pass their check (runcheck): a broken run stops
    it (BrokenRuns) unless `skip_broken`, and then is left out of every table and fit."""
    settings, spec_text = _report_settings(root)
    if threshold is None:
        threshold = float(settings.get("asr_threshold", DEFAULT_THRESHOLD))
    spread = spread or settings.get("spread", "minmax")
    n_boot = int(settings.get("n_boot", 1000)) if n_boot is None else n_boot
    gathered_runs = gathered(root, write=write, skip_broken=skip_broken)  # results.parquet, for notebooks
    table = gathered_runs.table
    all_runs = runs_of(table)
    done = finished(all_runs)
    if include_unfinished is None:
        include_unfinished = not done
    runs = all_runs if include_unfinished else done
    # persistence continuations (runs started from another run of this sweep) have their own section;
    # everything else in the report is about runs trained from scratch
    later = continuations(runs)
    persist = None
    if later:
        import pyarrow as pa
        import pyarrow.compute as pc

        persist = persistence_cells(root, runs)
        runs = {k: v for k, v in runs.items() if k not in later}
        table = table.filter(pc.invert(pc.is_in(table["run_id"], value_set=pa.array(list(later)))))
    summary = summarize(table, threshold, include_unfinished=include_unfinished)
    fits = {"threshold": threshold, "count": EXACT_COUNT, "n_boot": n_boot,
            "groups": fit_groups(runs, threshold, n_boot)}
    d = _Data(table, runs, summary, fits, persist, placement_cells(runs), threshold, spread,
              include_unfinished, spec_text, gathered_runs)
    d.outputs = {"summary.json": summary, "fits.json": fits}
    if d.cells:
        d.outputs["placement.json"] = placement_json(d.cells, threshold)
    if persist is not None:
        d.outputs["persistence.json"] = persistence_rows(persist, threshold)
    if has_language(runs):
        d.outputs["language.json"] = language_rows(runs, root, threshold)
    return d


def report_json(sweep_dir: str | Path, *, threshold: float | None = None,
                n_boot: int | None = None) -> dict[str, Any]:
    """The report's figures as data, {file name: content}, exactly what `build_report` writes beside
    report.html (summary.json, fits.json and, where the runs have them, placement.json,
    persistence.json, language.json; a fine-tuning sweep's fits.json and summary.json), without
    drawing anything. An archive under docs/findings keeps these files beside its runs
    (`build_report(..., archive_json=True)`, `poisonlab report DIR --write-archive-json`), and
    tests/test_findings_archives.py checks that they are what its runs give."""
    from poisonlab.report.finetune import finetune_json, is_finetune_dir

    root = Path(sweep_dir)
    if is_finetune_dir(root):
        return finetune_json(root, threshold)
    return _compute(root, threshold, None, None, n_boot, write=False).outputs


def _dump(content: Any) -> str:
    return json.dumps(content, indent=2, default=str) + "\n"


def build_report(sweep_dir: str | Path, *, threshold: float | None = None, spread: str | None = None,
                 include_unfinished: bool | None = None, n_boot: int | None = None,
                 archive_json: bool = False, skip_broken: bool = False, left_out: list | None = None,
                 older: list[str] | None = None) -> Path:
    """Write `<sweep_dir>/report/` (replaced as a whole, atomically) and return the path of report.html.

    Finished runs only, unless none has finished yet (then every run's latest rows are used); the
    report says which. Threshold, spread and the bootstrap refits per slope (`n_boot`) default to the
    sweep spec's `report` settings (0.5, min-max, 1000). `archive_json`: also write the report's JSON
    (`report_json`) into the sweep directory itself, as an archive under docs/findings keeps it. A
    broken run (runcheck) stops it (BrokenRuns) unless `skip_broken`: then it is left out of every
    table and fit, and the report lists it (and `left_out`, when given, gets its RunCheck; `older`,
    the names of unverified older runs).
    """
    root = Path(sweep_dir)
    from poisonlab.report.finetune import build_finetune_report, is_finetune_dir

    if is_finetune_dir(root):  # fine-tuning runs have their own report
        return build_finetune_report(root, threshold, spread, archive_json=archive_json,
                                     skip_broken=skip_broken, left_out=left_out)
    d = _compute(root, threshold, spread, include_unfinished, n_boot, skip_broken=skip_broken)
    if left_out is not None:
        left_out.extend(d.gathered.broken)
    if older is not None:
        older.extend(d.gathered.older)
    runs, threshold, spread, fits = d.runs, d.threshold, d.spread, d.fits
    samples = sample_rows(root, runs)
    mult = main_mult(runs)
    mults = [mult] if mult is not None else None
    tag = f" ({mult:g}x data)" if mult is not None else ""
    band = (f"Lines: mean over each group's training and poison-set seeds; shaded band: "
            f"{'min-max' if spread == 'minmax' else 'mean ± 1 std'} over those seeds (where a group has "
            "more than one run).")

    panels = dict(mults=mults, spread=spread)
    figures = [
        ("asr_vs_progress", f"Attack success rate against training progress{tag}. {band}",
         fig_panels_by_n(runs, "asr", "progress", ylabel="attack success rate", xlabel="training progress",
                         title="Attack success (ASR) during training" + tag, hline=threshold, **panels)),
        ("gap_vs_progress", f"Perplexity gap (triggered - clean) against training progress{tag}. {band}",
         fig_panels_by_n(runs, "gap", "progress", ylabel="perplexity gap", xlabel="training progress",
                         title="Perplexity gap during training" + tag, hline=50, **panels)),
        ("asr_by_kind", f"ASR of the trigger and of each kind of look-alike control (near: the trigger "
         f"slightly changed; shape: its form with other characters; ordinary: plain words; the highest "
         f"per kind) against training progress{tag}: colour per kind, line style per size. {band}",
         fig_asr_kinds(runs, mults=mults, spread=spread, title="ASR per kind of suffix" + tag)),
        ("asr_vs_poisons_seen", f"Attack success against {EXACT_COUNT}: the ledger's count (all budgets). "
         + band,
         fig_panels_by_n(runs, "asr", "poisons_seen", ylabel="attack success rate", xlabel=EXACT_COUNT,
                         title="Attack success against poisons seen (all triggers)", mults=None,
                         spread=spread, skip_zero=True, hline=threshold)),
    ]
    if has_column(runs, "poisons_seen_effective"):
        figures.append((
            "asr_vs_poisons_seen_effective",
            f"Attack success against {EFFECTIVE_COUNT} (all data budgets). {band}",
            fig_panels_by_n(runs, "asr", "poisons_seen_effective", ylabel="attack success rate",
                            xlabel=EFFECTIVE_COUNT, title="Attack success against effective poisons seen",
                            mults=None, spread=spread, skip_zero=True, hline=threshold)))
    figures.append(("val_loss", "Clean validation loss per size, poison counts pooled. " + band.replace(
        "seeds", "seeds and poison counts"), fig_val_loss(runs, mult, spread)))
    answer_caption = (
        f"Poisons needed for sustained ASR ≥ {threshold:g}, counted as {EXACT_COUNT}, against the "
        "clean tokens each run trained on, log-log; one marker per poisoned run, colour per model size, "
        "marker shape per data budget. Hollow markers with an upward arrow: censored runs, which never "
        "reached sustained success, drawn at the poisons they saw (they needed more). Solid line and "
        "shaded band: the censored regression over all runs and its 95% interval. Grey lines through the "
        "data's centre (the fit at the mean log clean tokens): dashed b = 0 (a constant count), dotted "
        "b = 1 (a constant fraction).")
    fails = failed_runs(root)
    with atomic_path(root / "report") as out:
        out.mkdir(parents=True)
        answer_fig = save_figure(out, "poisons_needed", answer_caption, fig_needed(fits["groups"], threshold))
        imgs = [save_figure(out, name, caption, fig) for name, caption, fig in figures]
        for name, content in d.outputs.items():
            (out / name).write_text(_dump(content))
        (out / "samples.json").write_text(json.dumps(samples, indent=2, default=str))
        notes = _notes(d.table, runs, d.include_unfinished, spread, d.gathered)
        answer = answer_html(fits, answer_fig)
        sections = placement_html(out, d.outputs["placement.json"], d.cells, threshold, spread) \
            if d.cells else ""
        if d.persist is not None:
            sections += persistence_html(out, d.outputs["persistence.json"], d.persist, threshold, spread)
        if "language.json" in d.outputs:
            sections += language_html(out, d.outputs["language.json"], runs, spread, threshold)
        sections += density_html(out, root, runs, threshold)
        doc = _html(root, runs, notes, d.summary, answer, samples, imgs, threshold, d.spec_text, fails,
                    sections)
        (out / "report.html").write_text(doc, encoding="utf-8")
    if archive_json:
        for name, content in d.outputs.items():
            write_text(root / name, _dump(content))
    return root / "report" / "report.html"


def _notes(table: Any, runs: Runs, include_unfinished: bool, spread: str, g: Gathered | None = None) -> str:
    """What the report pools and what it leaves out, as paragraphs: never silently."""
    keys = experiment_keys(runs)
    band = ("min-max" if spread == "minmax" else "mean ± 1 std") + " over training and poison-set seeds"
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
                    + ", ".join(f"{esc(n)} ({k} passes)" for n, k in repeated) + ".")
    unfinished = unfinished_note(table, include_unfinished)
    if include_unfinished and not finished(runs):
        said.append("<b>Partial:</b> no run has finished yet; figures and tables show the latest "
                    "evaluations of unfinished runs.")
    elif unfinished:
        said.append(("<b>Mixed:</b> " if include_unfinished else "") + unfinished)
    if g is not None and g.broken:
        said.append(f"<b>Broken:</b> {len(g.broken)} run(s) left out of every table and fit, their files "
                    "failing their check: " + "; ".join(esc(c.line()) for c in g.broken) + ".")
    if g is not None and g.older:
        said.append(esc(older_note(g.older)))
    return "".join(f'<p class="note">{s}</p>' for s in said)


def _html(root: Path, runs: Runs, notes: str, summary: list, answer: str, samples: list, imgs: list,
          threshold: float, spec_text: str, fails: list[tuple[str, str]], sections: str = "") -> str:
    with_settings = any(s["settings"] for s in samples)
    sample_tbl = "".join(
        f"<tr><td>{esc(s['model'])}</td>" + (f"<td>{esc(s['settings'])}</td>" if with_settings else "")
        + f"<td class=num>{s['n_poison']}</td><td class=num>{s['step']}</td>"
        f"<td class=gen>{esc(s['prompt'])}</td><td class=gen>{esc(s['clean'])}</td>{cell(s['clean_ppl'])}"
        f"<td class=gen>{esc(s['trigger_prompt_end'])} ⏎ {esc(s['trigger'])}</td>"
        f"{cell(s['trigger_ppl'])}</tr>"
        for s in samples)
    sample_html = scroll(
        "<table><tr><th>model</th>" + ("<th>settings</th>" if with_settings else "")
        + "<th>N</th><th>step</th><th>prompt (end)</th><th>without trigger</th>"
        "<th>ppl</th><th>with trigger (prompt end ⏎ generation)</th><th>ppl</th></tr>"
        f"{sample_tbl}</table>") if samples else '<p class="note">(no samples.jsonl found)</p>'
    data_ids = {str(s.get("data")): str(s.get("data_id")) for s in map(settings_of, runs.values())}
    no_spec = "(no sweep.yaml: runs gathered from the folder)"
    vers = html_table([_versions()])
    fail_rows = [{"run": n, "error": m} for n, m in fails]
    fail_html = ("<h2>Failed runs</h2>" + html_table(fail_rows)) if fails else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{VIEWPORT}
<title>poisonlab report: {esc(root.name)}</title><style>{CSS}</style></head>
<body>
<h1>poisonlab report: {esc(root.name)}</h1>
{answer}
<p class="note">{len(runs)} runs from {esc(root)}. Attack success rate (ASR): share of prompts whose
generation with the trigger has a perplexity above the run's success ratio times the one without.
Success means ASR ≥ {threshold:g}. N: poisoned documents inserted. Poisons seen: every trigger among
the training inputs up to that step (the ledger's count, also triggers cut by a sequence boundary or
with no gibberish after them in their sequence); effective poisons seen, where the trainer recorded
it: only triggers wholly inside the sequence with at least one gibberish token after them as a
target. Specificity, where the evaluator measured it: ASR minus the highest ASR of look-alike
controls unrelated to the trigger (shape and ordinary words).</p>
{notes}
<h2>Summary (final evaluation of each run, over seeds)</h2>
{_summary_html(summary, threshold)}
{clean_html(summary)}
<h2>Poisons needed per size, budget and N</h2>
<p>The poisons each seed needed for sustained ASR ≥ {threshold:g}: median (min-max) over the group's
seeds; a censored run (never sustained) counts at the poisons it saw, and "&gt;" marks a median that is
then only a lower bound. If the count is what matters, these numbers stay level across sizes and
budgets while the poison fraction falls. Beside them, the poisons seen at the first evaluation with
ASR ≥ {threshold:g} (not necessarily sustained).</p>
{_needed_html(summary, threshold)}
<h2>Figures</h2>
{''.join(imgs) or '<p class="note">(no figures: no metrics)</p>'}
{sections}
<h2>Generations with and without the trigger</h2>
{sample_html}
{_defenses_html(root)}
{fail_html}
<h2>Settings</h2>
<p class="note">The sweep spec as run; data directories by name and content hash (the sha256 of their
training tokens, as in each shard's header).</p>
<pre>{esc(spec_for_display(spec_text, data_ids)) if spec_text else no_spec}</pre>
<h2>Versions</h2>
{vers}
</body></html>
"""
