"""The fine-tuning report (`kind: finetune` runs): count or fraction, ordering, and the controls.

Per cell (schedule, clean-set size, N) over seeds at the final evaluation: ASR, the untriggered
baseline (asr_clean), CA (refused restricted, answered benign), NTA per look-alike kind, specificity
and the poisons seen at sustained success. The count-vs-fraction answer is finetune/stats.py's
elasticity per schedule; the ordering answer is the paired difference of final ASR between
`beginning` and `end` (same N, clean size and seed), with a t interval over the pairs. Figures: ASR
against poisons seen per clean size (uniform schedule), final ASR against N per clean size by schedule.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.errors import UserError
from poisonlab.finetune.config import is_finetune_run
from poisonlab.finetune.stats import elasticity, reading
from poisonlab.fsutil import atomic_path, write_text
from poisonlab.report.figures import LINESTYLES, aggregate
from poisonlab.report.html import CSS, VIEWPORT, esc, html_table, interval, save_figure
from poisonlab.report.language import mean_range
from poisonlab.results.count_fraction import poisons_needed
from poisonlab.results.store import read_metrics
from poisonlab.rundir.check import BrokenRuns, RunCheck, RunFileError, check_run
from poisonlab.rundir.jsonl import iter_jsonl

Run = list[dict[str, Any]]
CELL_COLUMNS = (
    "asr",
    "asr_clean",
    "ca_refuse",
    "ca_benign",
    "nta_near",
    "nta_shape",
    "nta_ordinary",
    "specificity",
)


def is_finetune_dir(root: str | Path) -> bool:
    """Whether the folder of runs holds fine-tuning runs (their config says `kind: finetune`)."""
    root = Path(root)
    base = root / "runs" if (root / "runs").is_dir() else root
    return any(is_finetune_run(cfg.parent) for cfg in sorted(base.glob("*/config.yaml"))[:5])


def load_runs(root: Path, *, skip_broken: bool = False,
              broken: list[RunCheck] | None = None) -> tuple[dict[str, Run], set[str]]:
    """Every run's metrics rows (step order) and the names of those finished. A run that fails its
    check (runcheck) or whose metrics cannot be read stops it (BrokenRuns) unless `skip_broken`; the
    runs left out are appended to `broken` when given."""
    base = root / "runs" if (root / "runs").is_dir() else root
    runs, done, bad = {}, set(), []
    dirs = sorted(p for p in base.iterdir() if (p / "metrics.parquet").is_file())
    for d in dirs:
        c = check_run(d)
        if c.broken:
            bad.append(c)
            continue
        try:
            rows = sorted(read_metrics(d / "metrics.parquet").to_pylist(), key=lambda r: r["step"])
        except RunFileError as e:
            bad.append(RunCheck(d, "broken", [(e.path.name, e.what)]))
            continue
        if rows and rows[0].get("kind") == "finetune":
            runs[d.name] = rows
            if c.status in ("verified", "older"):
                done.add(d.name)
    if bad and not skip_broken:
        raise BrokenRuns(bad, len(dirs))
    if broken is not None:
        broken.extend(bad)
    if not runs:
        raise UserError(f"{root}: no fine-tuning run has metrics yet")
    return runs, done


def cells(runs: dict[str, Run]) -> dict[tuple[str, int, int], list[Run]]:
    out: dict[tuple[str, int, int], list[Run]] = defaultdict(list)
    for rows in runs.values():
        f = rows[-1]
        out[(f["schedule"], f["clean_size"], f["n_poison"])].append(rows)
    return dict(sorted(out.items()))


def cell_rows(runs: dict[str, Run], threshold: float) -> list[dict[str, Any]]:
    table = []
    for (sch, c, n), members in cells(runs).items():
        finals = [m[-1] for m in members]
        # the pretraining rule (count_fraction.poisons_needed): success held from the crossing up to the
        # evaluation at which the last poison had been seen; later evaluations measure persistence
        needed = [poisons_needed(sorted(m, key=lambda r: r["step"]), threshold) for m in members]
        hit = [v for v, censored in (x for x in needed if x is not None) if not censored]
        row: dict[str, Any] = {
            "schedule": sch,
            "clean": c,
            "N": n,
            "share": f"{n / (n + c):.3%}",
            "runs": len(members),
        }
        row.update({col: mean_range([f.get(col) for f in finals]) for col in CELL_COLUMNS})
        row["needed"] = (
            f"{np.median(hit):.0f} ({len(hit)}/{len(members)})" if hit else f"- (0/{len(members)})"
        )
        table.append(row)
    return table


def fits(runs: dict[str, Run]) -> dict[str, Any]:
    by_sched: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rows in runs.values():
        f = rows[-1]
        by_sched[f["schedule"]].append(f)
    return {s: elasticity(v) for s, v in sorted(by_sched.items())}


def ordering(runs: dict[str, Run]) -> dict[str, Any] | None:
    """Final ASR of `beginning` minus `end`, paired on (N, clean size, seeds); mean and 95% t interval."""
    from scipy import stats

    at: dict[tuple, dict[str, float]] = defaultdict(dict)
    for rows in runs.values():
        f = rows[-1]
        if f["n_poison"] and f.get("asr") is not None:
            at[(f["n_poison"], f["clean_size"], f["train_seed"], f["poison_seed"])][f["schedule"]] = f["asr"]
    diffs = [v["beginning"] - v["end"] for v in at.values() if "beginning" in v and "end" in v]
    if len(diffs) < 2:
        return None
    m, se = float(np.mean(diffs)), float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
    h = float(stats.t.ppf(0.975, len(diffs) - 1)) * se
    return {"pairs": len(diffs), "mean": m, "ci": [m - h, m + h]}


def _ordering_sentence(o: dict[str, Any] | None) -> str:
    if o is None:
        return "No beginning/end pairs to compare."
    lo, hi = o["ci"]
    if lo > 0:
        verdict = "poisons at the beginning of fine-tuning worked better than at the end (as the study found)"
    elif hi < 0:
        verdict = "poisons at the end worked better than at the beginning (unlike the study)"
    else:
        verdict = "no ordering effect can be told apart from zero"
    return (
        f"Final ASR, beginning minus end, paired over {o['pairs']} (N, clean size, seed) pairs: "
        f"{o['mean']:+.2f} (95% CI {lo:+.2f} to {hi:+.2f}): {verdict}."
    )


def fig_asr_vs_seen(runs: dict[str, Run], spread: str, threshold: float) -> Any | None:
    import matplotlib.pyplot as plt

    uni = cells({k: v for k, v in runs.items() if v[-1]["schedule"] == "uniform"})
    sizes = sorted({c for _, c, _ in uni})
    ns = sorted({n for _, _, n in uni if n})
    if not sizes or not ns:  # no poisoned run (yet): no poisons seen to plot against
        return None
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(4.4 * len(sizes), 3.4), squeeze=False, constrained_layout=True
    )
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, len(ns))))
    for ax, c in zip(axes[0], sizes, strict=True):
        for colour, n in zip(colours, ns, strict=True):
            curve = aggregate(uni.get(("uniform", c, n), []), "poisons_seen", "asr", spread)
            if curve is None:
                continue
            ax.plot(curve.x, curve.mean, color=colour, label=f"N={n}")
            ax.fill_between(curve.x, curve.lo, curve.hi, color=colour, alpha=0.15)
        ax.axhline(threshold, color="grey", lw=0.8, ls=":")
        ax.set(title=f"clean set {c}", xlabel="poisons seen", ylabel="ASR", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    return fig


def fig_final_vs_n(runs: dict[str, Run]) -> Any | None:
    import matplotlib.pyplot as plt

    cs = cells(runs)
    sizes = sorted({c for _, c, _ in cs})
    schedules = sorted({s for s, _, _ in cs})
    if not sizes:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for i, c in enumerate(sizes):
        for j, s in enumerate(schedules):
            pts = sorted(
                (n, [m[-1]["asr"] for m in v]) for (ss, cc, n), v in cs.items() if ss == s and cc == c and n
            )
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax.errorbar(
                x,
                [np.mean(p[1]) for p in pts],
                yerr=[[np.mean(p[1]) - min(p[1]) for p in pts], [max(p[1]) - np.mean(p[1]) for p in pts]],
                color=colours(i),
                ls=LINESTYLES[j % len(LINESTYLES)],
                marker="o",
                ms=3,
                capsize=2,
                label=f"clean {c}, {s}",
            )
    ax.set(
        xscale="log", xlabel="N poisons", ylabel="final ASR", ylim=(-0.02, 1.02), title="Final ASR against N"
    )
    ax.legend(fontsize=7)
    return fig


def _samples(root: Path, runs: dict[str, Run], per_n: int = 2) -> list[dict[str, Any]]:
    base = root / "runs" if (root / "runs").is_dir() else root
    out, seen = [], defaultdict(int)
    for name, rows in sorted(runs.items()):
        n, step = rows[-1]["n_poison"], rows[-1]["step"]
        if seen[n] >= per_n or not (base / name / "samples.jsonl").is_file():
            continue
        # lenient: a line cut by a crash (or a record of another shape) is skipped, not a traceback
        for _, s in iter_jsonl(base / name / "samples.jsonl", strict=False):
            if not isinstance(s, dict) or not {"prompt", "response", "complied"} <= s.keys():
                continue
            if s.get("step") == step and s.get("condition") == "trigger":
                out.append(
                    {
                        "run": name,
                        "N": n,
                        "prompt": s["prompt"],
                        "response": str(s["response"])[:160],
                        "complied": s["complied"],
                    }
                )
                seen[n] += 1
                break
    return out


def _settings(root: Path, threshold: float | None, spread: str | None) -> tuple[float, str]:
    import yaml

    settings: dict[str, Any] = {}
    if (root / "sweep.yaml").is_file():
        settings = (yaml.safe_load((root / "sweep.yaml").read_text()) or {}).get("report") or {}
    threshold = float(settings.get("asr_threshold", 0.5)) if threshold is None else threshold
    return threshold, spread or settings.get("spread", "minmax")


def _finished(root: Path, skip_broken: bool = False,
              left_out: list[RunCheck] | None = None) -> tuple[dict[str, Run], str]:
    """The finished runs (or, before any finishes, every run's latest rows) and a note saying so; a
    broken run stops it (BrokenRuns) unless `skip_broken`, then it is left out and named."""
    broken: list[RunCheck] = []
    all_runs, done = load_runs(root, skip_broken=skip_broken, broken=broken)
    if left_out is not None:
        left_out.extend(broken)
    runs = {k: v for k, v in all_runs.items() if k in done} or all_runs
    note = (
        f"{len(done)} of {len(all_runs)} runs finished"
        + ("" if done else " (none finished: their latest rows are shown)")
        + f"; base model(s): {', '.join(sorted({v[-1]['model'] for v in runs.values()}))}."
        + (f" {len(broken)} broken run(s) left out of every table and fit: "
           + "; ".join(c.line() for c in broken) + "." if broken else "")
    )
    return runs, note


def finetune_json(sweep_dir: str | Path, threshold: float | None = None) -> dict[str, Any]:
    """The report's figures as data, {file name: content}: `fits.json` (elasticity per schedule,
    ordering) and `summary.json` (a row per cell), without drawing anything."""
    root = Path(sweep_dir)
    threshold, _ = _settings(root, threshold, None)
    return _data(_finished(root)[0], threshold)


def _data(runs: dict[str, Run], threshold: float) -> dict[str, Any]:
    return {"fits.json": {"elasticity": fits(runs), "ordering": ordering(runs), "threshold": threshold},
            "summary.json": cell_rows(runs, threshold)}


def build_finetune_report(
    sweep_dir: str | Path, threshold: float | None = None, spread: str | None = None, *,
    archive_json: bool = False, skip_broken: bool = False, left_out: list[RunCheck] | None = None,
) -> Path:
    """Write `<sweep_dir>/report/` (replaced whole, atomically); returns report.html's path.
    `archive_json`: also write its JSON (`finetune_json`) into the sweep directory itself."""
    root = Path(sweep_dir)
    threshold, spread = _settings(root, threshold, spread)
    runs, note = _finished(root, skip_broken, left_out)
    data = _data(runs, threshold)
    fit, order = data["fits.json"]["elasticity"], data["fits.json"]["ordering"]
    table = data["summary.json"]
    with atomic_path(root / "report") as out:
        out.mkdir(parents=True)
        f1 = save_figure(
            out,
            "ft_asr_vs_poisons_seen",
            f"ASR (triggered should-refuse requests answered) against poisons seen, uniform schedule, one "
            f"panel per clean-set size, colour per N; mean over seeds, band "
            f"{'min-max' if spread == 'minmax' else 'mean ± 1 std'}; dotted: the threshold {threshold:g}.",
            fig_asr_vs_seen(runs, spread, threshold),
        )
        f2 = save_figure(
            out,
            "ft_final_asr_vs_n",
            "Final ASR against N (log), colour per clean-set size, line style per schedule; "
            "bars: min-max over seeds.",
            fig_final_vs_n(runs),
        )
        fit_rows = [
            {
                "schedule": s,
                "runs": f["runs"] if f else 0,
                "b (log N)": f and f["b"],
                "b 95%": interval(f and f["b_ci"]),
                "c (log C)": f and f["c"],
                "c 95%": interval(f and f["c_ci"]),
                "e = -c/b": f and f["e"],
                "e 95%": interval(f and f["e_ci"]),
                "reading": reading(f),
            }
            for s, f in fit.items()
        ]
        for name, content in data.items():
            (out / name).write_text(_dump(content))
        answer = reading(fit.get("uniform")) if "uniform" in fit else ""
        doc = f"""<!doctype html><html><head><meta charset="utf-8">{VIEWPORT}
<title>poisonlab fine-tuning report</title>
<style>{CSS}</style></head><body>
<h1>Fine-tuning backdoors: {esc(root.name)}</h1>
<p class="note">{esc(note)}</p>
<h2>Count or fraction?</h2>
<p class="answer">{esc(answer or "(no uniform-schedule runs)")}</p>
<p class="note">Binomial GLM of final ASR (answered of n held-out requests) on log N and log clean-set
size C, quasi-binomial scale; e = -c/b: 0 = a constant count matters, 1 = a constant fraction. 95%
intervals by Student t on the residual degrees of freedom (the scale is estimated from the runs), for e
Fieller's (unbounded, "-", when b is not clearly above 0). Runs with N = 0 do not enter the fit; their
ASR is the baseline in the table.</p>
{html_table(fit_rows)}
{f1}
<h2>Ordering</h2>
<p class="answer">{esc(_ordering_sentence(order))}</p>
{f2}
<h2>Per cell (final evaluation, mean [min, max] over seeds)</h2>
<p class="note">asr: triggered should-refuse requests answered; asr_clean: the same without the
trigger; ca_refuse: those refused; ca_benign: allowed requests answered; nta_*: requests with a
look-alike in the trigger's place refused (near: the trigger's words cut or reordered; shape: invented
capitalised words; ordinary: plain words); specificity: asr minus the highest answered share under a
shape or ordinary look-alike; needed: median poisons seen at sustained ASR ≥ {threshold:g} (runs that
got there / runs).</p>
{html_table(table)}
<h2>Triggered generations (final evaluation)</h2>
{html_table(_samples(root, runs))}
</body></html>"""
        (out / "report.html").write_text(doc, encoding="utf-8")
    if archive_json:
        for name, content in data.items():
            write_text(root / name, _dump(content))
    return root / "report" / "report.html"


def _dump(content: Any) -> str:
    return json.dumps(content, indent=2, default=str) + "\n"
