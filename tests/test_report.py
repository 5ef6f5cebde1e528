"""The report: the logistic fit, the count-vs-fraction reading, the HTML built from fake sweeps, and what
the report shows of a real sweep (trainer and evaluator): its generations, its groups, its curves."""

from __future__ import annotations

import html as html_lib
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_sweep_helpers import fake_run, make_fake_sweep

from poisonlab.report import build_report, chi2_sf, fit_count_vs_fraction, fit_logistic
from poisonlab.report_figures import aggregate, panel_curves
from poisonlab.results import gather, group_runs, runs_of
from poisonlab.stream import read_ledger
from poisonlab.sweep import load_spec, run_sweep


def test_logistic_fit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    X = rng.normal(size=(n, 2))
    true = np.array([-0.5, 1.5, -0.8])
    p = 1 / (1 + np.exp(-(true[0] + X @ true[1:])))
    y = (rng.random(n) < p).astype(float)
    fit = fit_logistic(X, y, ["a", "b"])
    assert fit.converged and not fit.separated
    assert np.allclose(fit.coef, true, atol=4 * fit.se.max())
    assert np.all(fit.se < 0.05)
    assert fit.aic == pytest.approx(2 * 3 - 2 * fit.loglik)
    # proportions with weights (ASR out of 64 prompts) give the same answer as the expanded 0/1 data
    k = rng.binomial(64, p[:500])
    prop = fit_logistic(X[:500], k / 64, ["a", "b"], weights=np.full(500, 64.0))
    expanded_X = np.repeat(X[:500], 64, axis=0)
    expanded_y = np.concatenate([np.r_[np.ones(ki), np.zeros(64 - ki)] for ki in k])
    binary = fit_logistic(expanded_X, expanded_y, ["a", "b"])
    assert np.allclose(prop.coef, binary.coef, atol=1e-6)
    assert prop.loglik == pytest.approx(binary.loglik, rel=1e-9)


def test_separation_is_flagged() -> None:
    x = np.array([-2.0, -1.0, 1.0, 2.0])
    fit = fit_logistic(x, np.array([0.0, 0.0, 1.0, 1.0]), ["x"])
    assert fit.separated


def test_chi2_sf() -> None:
    for x, df in [(3.841459, 1), (5.991465, 2), (7.814728, 3), (9.487729, 4)]:
        assert chi2_sf(x, df) == pytest.approx(0.05, abs=1e-5)
    assert chi2_sf(0.0, 1) == 1.0


def _rows(asr_of) -> list[dict]:
    """Three sizes, two N, data budgets so that fraction and count come apart; ASR from `asr_of`."""
    rows = []
    for params in (1e5, 4e5, 1.6e6):
        for n in (25, 100):
            tokens = 20 * params
            for i in range(11):
                seen = n * i / 10
                frac = n / tokens
                rows.append({"n_poison": n, "params_nonemb": params, "poisons_seen": seen,
                             "poison_fraction": frac, "asr": asr_of(seen, frac)})
    return rows


def test_count_vs_fraction_reading() -> None:
    expit = lambda z: 1 / (1 + math.exp(-z))
    by_count = fit_count_vs_fraction(_rows(lambda seen, frac: expit(-8 + 2.5 * math.log1p(seen))))
    m0, size, fraction, both = by_count["models"]
    assert m0["coef"]["log_poisons_seen"] == pytest.approx(2.5, abs=1e-4)
    assert size["delta_aic"] == pytest.approx(2.0, abs=1e-3)  # one more parameter, no gain
    assert abs(fraction["coef"]["log_poison_fraction"]) < 1e-3
    verdict = by_count["verdict"]
    assert "size does not improve" in verdict and "fraction does not improve" in verdict
    by_frac = fit_count_vs_fraction(_rows(lambda s, f: expit(2 + math.log1p(s) + 1.5 * math.log(f * 1e4))))
    assert by_frac["models"][2]["delta_aic"] < -10
    assert by_frac["models"][2]["coef"]["log_poison_fraction"] == pytest.approx(1.5, abs=1e-3)
    assert "fraction improves" in by_frac["verdict"]
    assert fit_count_vs_fraction([])["models"] == []


def test_report_from_fake_sweep(tmp_path: Path) -> None:
    root = make_fake_sweep(tmp_path / "sw")
    (root / "sweep.yaml").write_text("name: fake\nreport: {asr_threshold: 0.5, spread: std}\n")
    (root / "defenses.json").write_text(json.dumps(
        {"title": "Defenses", "rows": [{"detector": "ppl-filter", "recipe": "dos", "recall": 0.97,
                                         "fpr": 0.012, "note": "<b>bold?</b>"}]}))
    html_path = build_report(root)
    out = root / "report"
    assert html_path == out / "report.html"
    for name in ("asr_vs_progress", "gap_vs_progress", "asr_vs_poisons_seen", "val_loss"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").exists()
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "<SUDO>" not in html and "&lt;SUDO&gt;" in html and "<script" not in html.lower()
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html and "ppl-filter" in html  # defenses, escaped
    assert "RuntimeError: out of memory" in html  # the failed run is listed
    assert re.search(r"torch</th>", html) and "name: fake" in html  # versions and settings
    summary = json.loads((out / "summary.json").read_text())
    assert [r["first_success_median"] for r in summary] == [20, 30, None, 50]
    fits = json.loads((out / "fits.json").read_text())
    (fit,) = fits["groups"]  # the runs differ only in size and N: one fit over all of them
    assert fit["label"] == "" and fit["n"] == 48 and len(fit["models"]) == 4 and fit["verdict"]
    assert fit["count"] == "poisons_seen" and "every trigger" in fits["count"]
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
    assert html.count("data:image/png;base64,") == 5
    heads = re.findall(r"<th>([^<]*)</th>", html)
    assert {"effective poisons seen, median", "effective poisons seen at end",
            "then effective poisons seen, median"} <= set(heads)
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
    # one count-vs-fraction fit per schedule, each fed only its own runs' evaluations
    fits = {f["label"]: f for f in json.loads((real_sweep / "report" / "fits.json").read_text())["groups"]}
    for s, ds in dirs.items():
        assert fits[f"schedule={s}"]["n"] == sum(pq.read_metadata(d / "metrics.parquet").num_rows for d in ds)
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
    spec = load_spec({"name": "e2e", "grid": {"model": ["tiny-25k", "tiny-100k"], "n_poison": [0, 30, 100]}})
    res = run_sweep(spec, tmp_path, executor="inline", run_fn=fake_run, progress=False)
    assert res.report == tmp_path / "report" / "report.html" and res.report.exists()
    assert "name: e2e" in res.report.read_text()
    assert (tmp_path / "results.parquet").exists()
