"""The report: the logistic fit, the count-vs-fraction reading, and the HTML built from fake sweeps."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from test_sweep_helpers import fake_run, make_fake_sweep

from poisonlab.report import build_report, chi2_sf, fit_count_vs_fraction, fit_logistic
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
    assert fits["n"] == 48 and len(fits["models"]) == 4 and fits["verdict"]


def test_sweep_ends_with_report(tmp_path: Path) -> None:
    spec = load_spec({"name": "e2e", "grid": {"model": ["tiny-25k", "tiny-100k"], "n_poison": [0, 30, 100]}})
    res = run_sweep(spec, tmp_path, executor="inline", run_fn=fake_run, progress=False)
    assert res.report == tmp_path / "report" / "report.html" and res.report.exists()
    assert "name: e2e" in res.report.read_text()
    assert (tmp_path / "results.parquet").exists()
