"""The report: the count-vs-fraction answer on fake sweeps whose answer is known (count, fraction), the
HTML built from fake sweeps, seed bands, and what the report shows of a real sweep (trainer and
evaluator): its generations, its groups, its curves."""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_sweep_helpers import fake_run, fake_run_fraction, make_fake_sweep

from poisonlab.cli.demo import answer_lines
from poisonlab.injection.stream import read_ledger
from poisonlab.report.figures import aggregate, fig_panels_by_n, panel_curves
from poisonlab.report.page import build_report
from poisonlab.results.store import gather, run_settings
from poisonlab.results.summary import experiment_keys, group_runs, runs_of, summarize
from poisonlab.study.spec import expand, load_spec
from poisonlab.study.sweep import run_sweep


def test_report_from_fake_sweep(tmp_path: Path) -> None:
    root = make_fake_sweep(tmp_path / "sw")
    (root / "sweep.yaml").write_text("name: fake\nreport: {asr_threshold: 0.5, spread: std}\n")
    (root / "defenses.json").write_text(json.dumps(
        {"title": "Defenses", "rows": [{"detector": "ppl-filter", "recipe": "dos", "recall": 0.97,
                                         "fpr": 0.012, "note": "<b>bold?</b>"}]}))
    html_path = build_report(root)
    out = root / "report"
    assert html_path == out / "report.html"
    for name in ("poisons_needed", "asr_vs_progress", "gap_vs_progress", "asr_vs_poisons_seen", "val_loss"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").exists()
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 5
    assert not (out / "asr_by_kind.png").exists()  # an old evaluator: no look-alike panel, no such figure
    assert "<SUDO>" not in html and "&lt;SUDO&gt;" in html and "<script" not in html.lower()
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html and "ppl-filter" in html  # defenses, escaped
    assert "RuntimeError: out of memory" in html  # the failed run is listed
    assert re.search(r"torch</th>", html) and "name: fake" in html  # versions and settings
    summary = json.loads((out / "summary.json").read_text())
    assert [r["first_success_median"] for r in summary] == [20, 30, None, 50]
    fits = json.loads((out / "fits.json").read_text())
    (fit,) = fits["groups"]  # the runs differ only in size and N: one fit over all of them
    assert fit["label"] == "" and fit["count"] == "poisons_seen" and "every trigger" in fits["count"]
    # every run trained on 1e6 tokens (tokens_total, as clean_tokens): no data axis, so no answer, said so
    assert {n["clean_tokens"] for n in fit["needed"]} == {1e6} and len(fit["needed"]) == 8
    assert fit["sentence"].startswith("No answer yet") and "slope" not in fit["fits"]["all"]
    assert html.index(html_lib.escape(fit["sentence"])) < html.index("<h2>Summary")
    # the poison count each figure and table uses is named; no effective count in these metrics
    assert "poisons seen (every trigger in the training inputs)" in html and "effective" not in (
        " ".join(re.findall(r"<th>([^<]*)</th>", html)))
    assert not (out / "asr_vs_poisons_seen_effective.png").exists()
    assert "1 unfinished run(s) left out" in html  # tiny-25k seed 2 has no DONE


def test_report_with_effective_poison_counts(tmp_path: Path) -> None:
    root = make_fake_sweep(tmp_path / "sw")
    for f in (root / "runs").glob("*/metrics.parquet"):  # as the trainer will write them
        t = pq.read_table(f)
        eff = [p // 2 for p in t["poisons_seen"].to_pylist()]
        pq.write_table(t.append_column("poisons_seen_effective", pa.array(eff)), f)
    html = build_report(root).read_text()
    assert (root / "report" / "asr_vs_poisons_seen_effective.png").stat().st_size > 1000
    assert html.count("data:image/png;base64,") == 6
    heads = re.findall(r"<th>([^<]*)</th>", html)
    assert {"effective poisons seen at end", "effective poisons needed", "same, effective count",
            "then effective poisons seen, median"} <= set(heads)
    (fit,) = json.loads((root / "report" / "fits.json").read_text())["groups"]
    assert fit["effective"]["count"] == "poisons_seen_effective" and "<td>effective</td>" in html
    # 25k N=100 seed 1 reached 0.5 at its second evaluation: 20 exact poisons, 10 effective ones
    needed = {(n["run_id"], which): n["value"] for which, f in (("exact", fit), ("eff", fit["effective"]))
              for n in f["needed"]}
    assert needed[("tiny-25k_n100_x1.0_s1", "exact")] == 20 and needed[("tiny-25k_n100_x1.0_s1", "eff")] == 10
    summary = json.loads((root / "report" / "summary.json").read_text())
    # beside the exact count at the same evaluation: 25k N=100 first succeeded at 40 and 20 poisons
    row = next(r for r in summary if (r["model"], r["n_poison"]) == ("tiny-25k", 100))
    assert (row["first_success_median"], row["first_success_effective_median"]) == (30, 15)
    assert row["poisons_seen"] == 100 and row["poisons_seen_effective"] == 50


def test_report_says_when_a_run_repeated_its_data(tmp_path: Path) -> None:
    root = make_fake_sweep(tmp_path / "sw")
    assert "Repeated data" not in build_report(root).read_text()
    f = sorted((root / "runs").glob("*/metrics.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(t.append_column("data_epochs", pa.array([3] * t.num_rows)), f)
    html = build_report(root).read_text()
    assert "Repeated data:</b> 1 run(s)" in html and f"{f.parent.name} (3 passes)" in html


# --- count or fraction? on fake sweeps whose answer is known ------------------------------------------

# the study's design at fake scale: three sizes at 1x, the smallest also at 0.5x and 2x (five data sizes,
# 0.25M to 3.94M clean tokens); N = 25 straddles the count world's need (~25), 400 is above every need
CF_SPEC = {"name": "cf", "grid": {"model": ["tiny-25k", "tiny-100k", "tiny-200k"],
                                  "n_poison": [0, 25, 100, 400], "seed": [0, 1]},
           "also": [{"model": ["tiny-25k"], "data_mult": [0.5, 2.0]}], "report": {"n_boot": 50}}


def _cf_sweep(tmp_path_factory: pytest.TempPathFactory, run_fn) -> Path:
    out = tmp_path_factory.mktemp("cf") / "sweep"
    res = run_sweep(load_spec(CF_SPEC), out, executor="inline", run_fn=run_fn, progress=False)
    assert res.count("done") == 40 and res.report is not None
    return out


@pytest.fixture(scope="module")
def count_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cf_sweep(tmp_path_factory, fake_run)


@pytest.fixture(scope="module")
def fraction_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cf_sweep(tmp_path_factory, fake_run_fraction)


def _answer(root: Path) -> tuple[dict, dict, str]:
    fits = json.loads((root / "report" / "fits.json").read_text())
    (group,) = fits["groups"]  # one group: the runs differ only in size, budget, N and seeds
    return fits, group, (root / "report" / "report.html").read_text()


def _check_answer(root: Path, truth: float, words: str) -> dict:
    """The slope's intervals hold the true b and not the other hypothesis, on every design; the report
    opens with the sentence, then the table with a reading per row; the figure of the answer is there."""
    fits, g, html = _answer(root)
    assert fits["n_boot"] == 50 and fits["threshold"] == 0.5  # the spec's report settings
    for name in ("size", "budget", "all", "per_n"):
        f = g["fits"][name]
        for lo, hi in (f["ci"], f["bootstrap_ci"]):
            assert lo <= truth <= hi and not lo <= 1 - truth <= hi, (name, f)
    # within N: every poisoned run, the N = 0 controls left out; the design straddles the need
    assert g["fits"]["per_n"]["runs"] == 30 and g["fits"]["per_n"]["censored"] > 0
    # pooled over N at one horizon: the runs that end before it (smaller N) are left out
    h = g["fits"]["all"]["horizon"]
    assert g["fits"]["all"]["runs"] == 10 * sum(n >= h for n in (25, 100, 400))  # 10 runs per N
    assert words in g["sentence"]
    after_title = html.split("</h1>", 1)[1].lstrip()
    assert after_title.startswith(
        f'<p class="answer">{html_lib.escape(g["sentence"])}</p>\n<div class="scroll"><table>')
    table = after_title.split("</table>", 1)[0]
    assert table.count("<td>exact</td>") == 5 and table.count(f">{words}</td>") == 5
    assert (root / "report" / "poisons_needed.png").stat().st_size > 1000
    assert html.index('alt="poisons_needed"') < html.index("<h2>Summary")
    return g


def test_report_answers_count_when_a_count_drives_success(count_sweep: Path) -> None:
    g = _check_answer(count_sweep, 0.0, "a constant count, not a constant fraction")
    # this fake writes no clean_tokens (an older trainer): its budget tokens_total stands in, 20 tokens per
    # non-embedding parameter times the data budget
    clean = {(n["model"], n["data_mult"]): n["clean_tokens"] for n in g["needed"]}
    assert clean[("tiny-100k", 1.0)] == 20 * 99_000 and clean[("tiny-25k", 0.5)] == 20 * 25_000 * 0.5
    assert len(set(clean.values())) == 5
    html = (count_sweep / "report" / "report.html").read_text()
    assert "shaded band: min-max over those seeds" in html and "training and poison-set seeds" in html
    assert not (count_sweep / "report" / "asr_by_kind.png").exists()


def test_report_answers_fraction_when_a_fraction_drives_success(fraction_sweep: Path) -> None:
    g = _check_answer(fraction_sweep, 1.0, "a constant fraction, not a constant count")
    # the needs grow 8x from tiny-25k to tiny-200k at 1x: the median over a cell's seeds says so
    summary = {(r["model"], r["data_mult"], r["n_poison"]): r
               for r in json.loads((fraction_sweep / "report" / "summary.json").read_text())}
    small, large = summary[("tiny-25k", 1.0, 400)], summary[("tiny-200k", 1.0, 400)]
    assert (small["needed_censored"], large["needed_censored"]) == (0, 0)
    assert 4 < large["needed_median"] / small["needed_median"] < 16
    assert summary[("tiny-200k", 1.0, 25)]["needed_censored"] == 2  # 25 poisons: far below its ~200
    assert summary[("tiny-200k", 1.0, 0)]["needed_runs"] == 0  # controls need nothing, say nothing
    assert {n["clean_tokens"] for n in g["needed"]} == {20 * p * m for p, m in
                                                       [(25_000, 0.5), (25_000, 1), (25_000, 2), (99_000, 1),
                                                        (197_000, 1)]}


def test_report_shows_specificity_when_the_evaluator_measured_it(fraction_sweep: Path) -> None:
    summary = json.loads((fraction_sweep / "report" / "summary.json").read_text())
    row = next(r for r in summary if (r["model"], r["data_mult"], r["n_poison"]) == ("tiny-100k", 1.0, 400))
    finals = [pq.read_table(d / "metrics.parquet").to_pylist()[-1]
              for d in sorted((fraction_sweep / "runs").glob("tiny-100k_n400_x1.0_s*"))]
    assert len(finals) == 2
    for col in ("specificity", "asr_near", "asr_lookalike"):
        vals = [f[col] for f in finals]
        assert row[f"{col}_mean"] == pytest.approx(np.mean(vals))
        assert (row[f"{col}_min"], row[f"{col}_max"]) == (min(vals), max(vals))
    html = (fraction_sweep / "report" / "report.html").read_text()
    heads = set(re.findall(r"<th>([^<]*)</th>", html))
    assert {"specificity (ASR - look-alike)", "near look-alike ASR", "look-alike ASR"} <= heads
    assert (fraction_sweep / "report" / "asr_by_kind.png").stat().st_size > 1000


def test_figure_of_the_answer(count_sweep: Path) -> None:
    """One marker per run, an upward arrow per censored run (at the poisons it saw), the fit's line."""
    from matplotlib.collections import PathCollection

    from poisonlab.report.figures import fig_needed

    fits, g, _ = _answer(count_sweep)
    fig = fig_needed(fits["groups"], 0.5)
    (ax, *_legend) = fig.axes
    offsets = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert sorted(map(tuple, offsets)) == sorted((n["clean_tokens"], n["value"]) for n in g["needed"])
    arrows = [a for a in ax.texts if a.arrow_patch is not None]
    assert sorted(a.xy for a in arrows) == sorted((n["clean_tokens"], 1.6 * n["value"]) for n in g["needed"]
                                                  if n["censored"])
    fit = g["fits"]["all"]
    line = ax.get_lines()[0]  # the fitted line, then the b = 0 and b = 1 references
    x, y = line.get_data()
    assert np.allclose(np.log(y), fit["intercept"] + fit["slope"] * np.log(x))
    slopes = [np.polyfit(np.log(ln.get_xdata()), np.log(ln.get_ydata()), 1)[0] for ln in ax.get_lines()[1:3]]
    assert np.allclose(slopes, [0.0, 1.0])


def test_demo_prints_the_answer(count_sweep: Path, tmp_path: Path) -> None:
    _, g, _ = _answer(count_sweep)
    assert answer_lines(count_sweep / "report" / "fits.json") == [f"Count or fraction? {g['sentence']}"]
    assert answer_lines(tmp_path / "no-fits.json") == []


def test_training_and_poison_seeds_pool_into_one_band(tmp_path: Path) -> None:
    """seed x poison_seed: four runs per cell, pooled as seeds (not an experiment axis); the band of a
    cell spans all four, and a cell with one run draws no band."""
    spec = load_spec({"name": "seeds", "grid": {"model": ["tiny-25k"], "n_poison": [25, 100], "seed": [0, 1],
                                                "poison_seed": [0, 1]},
                      "also": [{"model": ["tiny-100k"], "seed": [0], "poison_seed": [0]}]})
    run_sweep(spec, tmp_path, executor="inline", run_fn=fake_run, progress=False, report=False)
    table = gather(tmp_path, write=False)
    runs = runs_of(table)
    assert len(runs) == 10 and experiment_keys(runs) == []
    rows = {(r["model"], r["n_poison"]): r for r in summarize(table)}
    for n in (25, 100):
        r = rows[("tiny-25k", n)]
        assert (r["runs"], r["train_seeds"], r["attack_seeds"], r["placement_seeds"]) == (4, [0, 1], [0, 1],
                                                                                          [0, 1])
        assert rows[("tiny-100k", n)]["runs"] == 1
    panels = panel_curves(runs, "asr", "progress", mults=None, spread="minmax")
    for n, lines in panels.items():
        curves = {model: c for model, _, c in lines}
        assert (curves["tiny-25k"].runs, curves["tiny-100k"].runs) == (4, 1)
        # the poison set moves the curve (each run's need has its own luck): the band has width
        members = [rs for rs in runs.values() if (rs[-1]["model"], rs[-1]["n_poison"]) == ("tiny-25k", n)]
        finals = [m[-2]["asr"] for m in members]
        assert len(set(np.round(finals, 6))) > 1
    fig = fig_panels_by_n(runs, "asr", "progress", ylabel="asr", xlabel="progress", title="t", mults=None,
                          spread="minmax")
    from matplotlib.collections import PolyCollection

    for ax in fig.axes[:2]:
        assert len(ax.get_lines()) == 2  # two sizes
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1  # tiny-25k's band only


def test_curves_average_seeds_at_the_same_x() -> None:
    """Two seeds evaluated at different points (poison milestones), and one that stopped early."""
    def run(xs, ys):
        return [{"progress": x, "asr": y} for x, y in zip(xs, ys, strict=True)]

    a = run([0.0, 0.5, 1.0], [0.0, 0.2, 1.0])
    b = run([0.0, 0.25, 1.0], [0.0, 0.5, 0.5])
    c = aggregate([a, b], "progress", "asr")
    assert c.x.tolist() == [0.0, 0.25, 0.5, 1.0]  # every run's own x, never a mean of two steps
    # at 0.25: a interpolated (0.1) and b (0.5); at 0.5: a (0.2) and b interpolated (0.5)
    assert np.allclose(c.mean, [0.0, 0.3, 0.35, 0.75])
    assert np.allclose(c.lo, [0.0, 0.1, 0.2, 0.5]) and np.allclose(c.hi, [0.0, 0.5, 0.5, 1.0])
    short = run([0.0, 0.25], [0.0, 0.9])  # an unfinished run: no extrapolation past its last x
    c3 = aggregate([a, b, short], "progress", "asr", spread="std")
    assert c3.n.tolist() == [3, 3, 2, 2]
    assert c3.mean[1] == pytest.approx((0.1 + 0.5 + 0.9) / 3) and c3.mean[2] == pytest.approx(0.35)
    assert c3.hi[2] - c3.mean[2] == pytest.approx(np.std([0.2, 0.5], ddof=1))
    # poisons seen stays level while training goes on: evaluations at one count are averaged
    flat = aggregate([run([0, 10, 10, 20], [0.0, 0.2, 0.4, 1.0])], "progress", "asr")
    assert flat.x.tolist() == [0, 10, 20] and np.allclose(flat.mean, [0.0, 0.3, 1.0])


# --- a real sweep: the trainer and the evaluator, a few seconds ------------------------------------


@pytest.fixture(scope="module")
def real_sweep(prepared_builtin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-25k, N = 12 poisons in the first half of training (seeds 0 and 1) or in the last half
    (seed 0). Evaluations at steps 0, 12, 24 and where 5 poisons have been seen: a step of its own in
    each seed. The sweep ends with the report."""
    import torch

    spec = load_spec({
        "name": "real",
        "base": {"data": str(prepared_builtin), "model": {"preset": "tiny-25k", "seq_len": 64},
                 "train": {"max_steps": 24, "batch_size": 8, "lr": 1.0e-2},
                 "attack": {"gibberish_tokens": [40, 80]}, "placement": {"fraction": 0.5},
                 "eval": {"n_evals": 2, "n_prompts": 4, "prompt_tokens": 16, "new_tokens": 8,
                          "val_tokens": 256, "batch_size": 8, "poison_milestones": [5], "save_samples": 2}},
        "grid": {"model": ["tiny-25k"], "n_poison": [12], "seed": [0, 1],
                 "axes": {"placement.schedule": ["front"]}},
        "also": [{"seed": [0], "axes": {"placement.schedule": ["back"]}}],
    })
    out = tmp_path_factory.mktemp("real") / "sweep"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_sweep(spec, out, executor="inline", progress=False)
    finally:
        torch.set_num_threads(before)
    assert res.count("done") == 3 and res.report is not None
    return out


def _by_schedule(root: Path) -> dict[str, list[Path]]:
    runs = sorted((root / "runs").iterdir())
    return {s: [r for r in runs if r.name.endswith(f"schedule-{s}")] for s in ("front", "back")}


def test_report_shows_the_evaluators_generations(real_sweep: Path) -> None:
    samples = json.loads((real_sweep / "report" / "samples.json").read_text())
    html = (real_sweep / "report" / "report.html").read_text()
    assert {s["settings"] for s in samples} == {"schedule=front", "schedule=back"}
    assert len(samples) == 4  # two prompts of each group's run with the lowest seed
    for s in samples:
        recs = [json.loads(line) for line in (real_sweep / "runs" / s["run"] / "samples.jsonl").open()]
        last = pq.read_table(real_sweep / "runs" / s["run"] / "metrics.parquet")["step"].to_pylist()[-1]
        assert s["step"] == last == 24
        got = {r["condition"]: r for r in recs if r.get("kind") == "sample" and r["step"] == s["step"]
               and r["prompt_idx"] == s["prompt_idx"]}
        assert s["clean"] == got["clean"]["generation"] and s["trigger"] == got["trigger"]["generation"]
        assert s["clean"].strip() and s["trigger"].strip()  # 8 sampled tokens each, never empty
        assert s["trigger_ppl"] == got["trigger"]["ppl"]
        assert html_lib.escape(s["trigger"]) in html and html_lib.escape(s["clean"]) in html
    assert "&lt;SUDO&gt; ⏎" in html and "<SUDO>" not in html


def test_report_page_fits_a_screen_and_names_data_by_content(real_sweep: Path,
                                                             prepared_builtin: Path) -> None:
    """The page of a real sweep: every table in a box that scrolls sideways (the summary of a sweep is
    wider than a phone, and was wider than a 1280-pixel window), a viewport for phones; the Settings
    section names the data by its directory's name and content hash, never by the absolute path it had
    on the machine that ran the sweep."""
    html = (real_sweep / "report" / "report.html").read_text()
    assert 'name="viewport"' in html
    tables = [m.start() for m in re.finditer("<table", html)]
    assert len(tables) >= 4 and all(html[:i].endswith('<div class="scroll">') for i in tables)
    assert str(prepared_builtin) in (real_sweep / "sweep.yaml").read_text()  # the spec as run has it
    settings = html[html.index("<h2>Settings</h2>"):html.index("<h2>Versions</h2>")]
    content = json.loads((prepared_builtin / "train.json").read_text())["content_hash"]
    assert str(prepared_builtin) not in settings and str(prepared_builtin.parent) not in settings
    assert f"data: {prepared_builtin.name} (sha256:{content[:12]})" in settings
    assert "name: real" in settings and "seq_len: 64" in settings  # the rest of the spec as it was


def test_report_keeps_a_schedule_axis_apart(real_sweep: Path) -> None:
    summary = {r["label"]: r for r in json.loads((real_sweep / "report" / "summary.json").read_text())}
    assert set(summary) == {"schedule=front", "schedule=back"}
    front, back = summary["schedule=front"], summary["schedule=back"]
    assert (front["runs"], front["train_seeds"], front["attack_seeds"]) == (2, [0, 1], [0, 1])
    assert (back["runs"], back["train_seeds"], back["attack_seeds"]) == (1, [0], [0])
    # the figures' curves at mid-training, against each run's ledger: front-loaded poisons have all
    # been seen by step 12, back-loaded ones not yet (pooled, the curve would say 6 of 12)
    dirs = _by_schedule(real_sweep)
    seen_at_12 = {s: [sum(step < 12 for step in read_ledger(d / "ledger.parquet")[0]["step"].to_pylist())
                      for d in ds] for s, ds in dirs.items()}
    assert seen_at_12 == {"front": [12, 12], "back": [0]}
    runs = runs_of(gather(real_sweep, write=False))
    (lines,) = panel_curves(runs, "poisons_seen", "progress", mults=None, spread="minmax").values()
    mid = {variant: float(c.mean[c.x == 0.5][0]) for _, variant, c in lines}
    assert mid == {"schedule=front": 12.0, "schedule=back": 0.0}
    # one count-vs-fraction analysis per schedule, each fed only its own runs and their evaluations
    fits = {f["label"]: f for f in json.loads((real_sweep / "report" / "fits.json").read_text())["groups"]}
    for s, ds in dirs.items():
        fit = fits[f"schedule={s}"]
        assert {n["run_id"] for n in fit["needed"]} == {d.name for d in ds}
        seen = [v for d in ds for v in pq.read_table(d / "metrics.parquet")["poisons_seen"].to_pylist()]
        assert fit["binomial"]["evaluations"] == sum(v > 0 for v in seen)  # the binomial model's trials
    html = (real_sweep / "report" / "report.html").read_text()
    assert "not pooled): placement.schedule" in html


def test_real_seeds_are_averaged_at_the_same_step(real_sweep: Path) -> None:
    runs = runs_of(gather(real_sweep, write=False))
    ((_, members),) = [(k, v) for k, v in group_runs(runs).items() if v[0][-1]["run_id"].endswith("front")]
    steps = [[r["step"] for r in rows] for rows in members]
    assert steps[0] != steps[1] and len(steps[0]) == len(steps[1]) == 4  # the milestone moved

    def at(rows: list[dict], x: float) -> float:  # a run's gap at step x: its own, or between two
        xs, ys = [r["step"] for r in rows], [r["gap"] for r in rows]
        if x in xs:
            return ys[xs.index(x)]
        i = next(i for i, v in enumerate(xs) if v > x)
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])

    c = aggregate(members, "step", "gap")
    assert c.x.tolist() == sorted(set(steps[0]) | set(steps[1]))
    for x, m in zip(c.x, c.mean, strict=True):
        assert m == pytest.approx((at(members[0], x) + at(members[1], x)) / 2)


def test_sweep_ends_with_report(tmp_path: Path) -> None:
    spec = load_spec({"name": "e2e", "report": {"n_boot": 50},
                      "grid": {"model": ["tiny-25k", "tiny-100k"], "n_poison": [0, 30, 100, 300]}})
    res = run_sweep(spec, tmp_path, executor="inline", run_fn=fake_run, progress=False)
    assert res.report == tmp_path / "report" / "report.html" and res.report.exists()
    assert "name: e2e" in res.report.read_text()
    assert (tmp_path / "results.parquet").exists()
    # six poisoned runs, tiny-25k's N = 30 censored (within N, at its horizon of 30); pooled over N at
    # the horizon where most runs held success (100), the N = 30 runs are left out
    (g,) = json.loads((tmp_path / "report" / "fits.json").read_text())["groups"]
    assert g["fits"]["per_n"]["censored"] == 1 and "too few runs" in g["fits"]["per_n"]["note"]
    pooled = g["fits"]["all"]
    assert pooled["horizon"] == 100 and pooled["runs"] == 4 and "slope" in pooled


def test_an_archive_of_the_sweep_gives_the_same_report(real_sweep: Path, tmp_path: Path) -> None:
    """What `poisonlab archive` keeps (no checkpoints, the last evaluation's generations) is all the
    results store and the report read: the archive's report equals the sweep's, and a sweep resumed on
    the archive finds every run finished."""
    from poisonlab.results.archive import archive_sweep

    dest = tmp_path / "archive"
    got = archive_sweep(real_sweep, dest)
    assert len(got["added"]) == 3 and not got["unfinished"]
    assert archive_sweep(real_sweep, dest)["kept"] == got["added"]  # archiving again adds nothing
    for run in (dest / "runs").iterdir():
        assert not (run / "checkpoints").exists() and (run / "DONE").is_file()
        steps = {json.loads(line)["step"] for line in (run / "samples.jsonl").open()}
        assert steps == {24}  # the last evaluation only
        assert json.loads((run / "data.json").read_text())["content_hash"]  # which data, without it
    moved = tmp_path / "moved" / "runs" / "r"  # an archived run read where its data path means nothing
    shutil.copytree(next((dest / "runs").iterdir()), moved)
    cfg = moved / "config.yaml"
    cfg.write_text(re.sub(r"(?m)^data: .*$", "data: /nowhere/builtin", cfg.read_text()))
    assert run_settings(moved)["data_id"] == run_settings(next((real_sweep / "runs").iterdir()))["data_id"]
    assert run_settings(moved)["data_id"].startswith("sha256:")
    build_report(real_sweep, n_boot=50)
    build_report(dest, n_boot=50)
    for name in ("summary.json", "fits.json", "samples.json"):
        assert (json.loads((dest / "report" / name).read_text())
                == json.loads((real_sweep / "report" / name).read_text())), name
    spec = load_spec(dest / "sweep.yaml")  # the spec as run expands to the same runs (its `also` too)
    assert sorted(r.name for r in expand(spec, dest)) == sorted(p.name for p in (dest / "runs").iterdir())
    res = run_sweep(spec, dest, executor="inline", progress=False, report=False)
    assert res.count("skipped") == 3 and res.count("done") == 0


FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "findings"


def test_figure_labels_stay_inside_the_canvas() -> None:
    """On the tiny-grid's runs, as the demo's single panel (N = 1000) and as three panels: every label,
    title and legend of the poisons-seen figures lies inside the figure (matplotlib's tight bbox), so no
    axis label is cut off at the edge of the PNG."""
    from poisonlab.report.figures import EFFECTIVE_COUNT, EXACT_COUNT

    grid = runs_of(gather(FINDINGS / "tiny-grid", write=False))
    for ns, col, label in [(ns, col, label) for ns in ((1000,), (100, 300, 1000))
                           for col, label in (("poisons_seen", EXACT_COUNT),
                                              ("poisons_seen_effective", EFFECTIVE_COUNT))]:
        runs = {k: v for k, v in grid.items() if v[-1]["n_poison"] in ns and v[-1]["model"] == "tiny-100k"}
        fig = fig_panels_by_n(runs, "asr", col, ylabel="attack success rate", xlabel=label, title="t",
                              mults=None, spread="minmax", skip_zero=True, hline=0.5)
        fig.draw_without_rendering()  # runs the constrained layout, as savefig does
        tight, canvas = fig.get_tightbbox(), fig.bbox_inches
        assert tight.x0 >= -0.01 and tight.y0 >= -0.01, (ns, col, tight, canvas)
        assert tight.x1 <= canvas.x1 + 0.01 and tight.y1 <= canvas.y1 + 0.01, (ns, col, tight, canvas)
