"""The fine-tuning count-vs-fraction elasticity on simulated sweeps whose answer is known: the
finetune preset's own design, at the overdispersion measured on its archive."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from poisonlab.finetune.stats import _fit, elasticity, reading
from poisonlab.results.count_fraction import poisons_needed
from poisonlab.study.spec import PRESETS_DIR

PRESET = yaml.safe_load((PRESETS_DIR / "finetune.yaml").read_text())
N_LEVELS = [n for n in PRESET["grid"]["n_poison"] if n]  # 10, 25, 50
SIZES = PRESET["grid"]["clean_size"]  # 200, 2000
SEEDS = len(PRESET["grid"]["seed"])
PROMPTS = PRESET["base"]["eval"]["n_prompts"]
# the uniform schedule's fit on docs/findings/finetune (b, and a and c at e = -0.07) and its Pearson
# scale 37.9: run-level noise of sd 3.1 on the logit scale gives sweeps of that dispersion
A, B, C = -6.26, 1.83, 0.13
SIGMA = 3.1


def simulate(e_true: float, rng: np.random.Generator, sigma: float = SIGMA) -> list[dict]:
    """One sweep of the preset's design: logit ASR = a + B log N - e B log C + run noise, binomial
    over the held-out requests; a keeps the design's mean logit at the archive's."""
    c = -e_true * B
    a = A + (C - c) * float(np.mean(np.log(SIZES)))
    runs = []
    for n in N_LEVELS:
        for size in SIZES:
            for _ in range(SEEDS):
                p = 1 / (1 + math.exp(-(a + B * math.log(n) + c * math.log(size) + rng.normal(0, sigma))))
                runs.append({"n_poison": n, "clean_size": size, "asr": rng.binomial(PROMPTS, p) / PROMPTS,
                             "n_prompts": PROMPTS})
    return runs


def test_the_simulation_has_the_preset_design_and_the_measured_dispersion():
    rng = np.random.default_rng(3)
    runs = simulate(0.0, rng)
    assert len(runs) == 18 and (N_LEVELS, SIZES, SEEDS, PROMPTS) == ([10, 25, 50], [200, 2000], 3, 64)
    scales = [elasticity(simulate(0.0, rng))["scale"] for _ in range(200)]
    assert 30 <= float(np.median(scales)) <= 46  # the archive's uniform fit: 37.9
    assert elasticity(runs)["df"] == 15  # 18 runs, 3 coefficients: what t is taken on


@pytest.mark.parametrize("e_true", [0.0, 1.0])
def test_the_interval_covers_the_true_elasticity_at_the_measured_dispersion(e_true):
    """Fieller's interval with t on 15 degrees of freedom covered the truth in 98% (e = 0) and 97%
    (e = 1) of 1,000 sweeps (an unbounded interval covers it: 76% of them were, b being unclear at
    this dispersion); the delta method's symmetric interval with the same t in 99% and 86%: at e = 1
    its normal approximation to a ratio fails, which is why the ratio gets Fieller's. Here 400."""
    rng = np.random.default_rng(11)
    covered = delta = unbounded = 0
    fits = [f for f in (elasticity(simulate(e_true, rng)) for _ in range(400)) if f and f["e"] is not None]
    for f in fits:
        ci = f["e_ci"]
        unbounded += ci is None
        covered += ci is None or ci[0] <= e_true <= ci[1]
        half = _t975(f["df"]) * f["e_se"]
        delta += f["e"] - half <= e_true <= f["e"] + half
    assert len(fits) >= 360  # a fit with b > 0 in ~93% of sweeps
    assert covered / len(fits) >= 0.93, covered / len(fits)
    assert 0.5 <= unbounded / len(fits) <= 0.9  # the honest price of 18 runs this dispersed
    if e_true == 1.0:
        assert delta / len(fits) < 0.91  # the delta method undercovers here


def _t975(df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def test_with_little_overdispersion_the_interval_separates_count_from_fraction():
    """At run noise sd 0.5 the same design tells the two hypotheses apart: each interval excludes the
    other one in most sweeps, and covers its own."""
    for e_true in (0.0, 1.0):
        rng = np.random.default_rng(7)
        fits = [elasticity(simulate(e_true, rng, sigma=0.5)) for _ in range(100)]
        cis = [f["e_ci"] for f in fits]
        assert np.mean([ci is not None and ci[0] <= e_true <= ci[1] for ci in cis]) >= 0.9
        other = 1.0 - e_true
        assert np.mean([ci is not None and not ci[0] <= other <= ci[1] for ci in cis]) > 0.85


def test_fieller_against_the_definition():
    """Every e inside the interval is not rejected by the t test of c + e b = 0, those outside are."""
    from scipy.stats import t

    rng = np.random.default_rng(0)
    runs = simulate(0.0, rng, sigma=0.5)
    f = elasticity(runs)
    n = np.array([r["n_poison"] for r in runs], float)
    size = np.array([r["clean_size"] for r in runs], float)
    trials = np.array([r["n_prompts"] for r in runs], float)
    res = _fit(n, size, np.round(np.array([r["asr"] for r in runs]) * trials), trials)
    cov, (b, c) = np.asarray(res.cov_params()), res.params[1:]
    crit = t.ppf(0.975, f["df"])
    stat = lambda e: abs(c + e * b) / math.sqrt(cov[2, 2] + 2 * e * cov[1, 2] + e * e * cov[1, 1])
    lo, hi = f["e_ci"]
    assert stat(lo) == pytest.approx(crit) and stat(hi) == pytest.approx(crit)
    assert stat((lo + hi) / 2) < crit and stat(lo - 0.1) > crit and stat(hi + 0.1) > crit


def test_reading_names_the_hypothesis():
    rng = np.random.default_rng(0)
    assert "constant count, not a constant fraction" in reading(elasticity(simulate(0.0, rng, 0.5)))
    assert "constant fraction, not a constant count" in reading(elasticity(simulate(1.0, rng, 0.5)))
    assert "unbounded" in reading({"e": 0.3, "e_ci": None})
    one_size = [r for r in simulate(0.0, rng) if r["clean_size"] == 200]
    assert elasticity(one_size) is None and "does not separate" in reading(None)


def test_zero_poison_runs_do_not_enter_and_sustained_success_needs_to_last():
    rng = np.random.default_rng(1)
    runs = simulate(0.0, rng) + [{"n_poison": 0, "clean_size": 200, "asr": 0.0, "n_prompts": 64}] * 5
    assert elasticity(runs)["runs"] == 18
    rows = [
        {"step": s, "asr": a, "poisons_seen": p}
        for s, a, p in [(0, 0.0, 0), (1, 0.6, 5), (2, 0.2, 10), (3, 0.7, 15), (4, 0.9, 20)]
    ]
    # the pretraining rule: crossing interpolated in log poisons seen between the last dip and the next
    assert poisons_needed(rows, 0.5) == (pytest.approx(10 * 1.5 ** 0.6), False)
    assert poisons_needed(rows[:3], 0.5) == (10, True)


def test_a_separated_fit_gives_no_elasticity():
    """Two poisoned N, the smaller scoring 0 in every run (the real model's seed 0: N = 25 among 200
    and 1,000 at 0/64, N = 100 at 22/64 and 23/64): the logit MLE of N's effect is infinite, so the
    fit stops anywhere with a Pearson scale of ~0 and a needle-thin interval. It must say so, not
    print that interval; the same design with a few successes at N = 25 still fits."""
    runs = [{"n_poison": n, "clean_size": c, "asr": k / 64, "n_prompts": 64}
            for n, c, k in [(25, 200, 0), (25, 1000, 0), (100, 200, 22), (100, 1000, 23)]]
    fit = elasticity(runs)
    assert fit is not None and fit["separated"] and fit["e"] is None and fit["e_ci"] is None
    assert fit["b_ci"] is None and "separated" in reading(fit)
    runs[0]["asr"], runs[1]["asr"] = 3 / 64, 2 / 64
    fit = elasticity(runs)
    assert not fit.get("separated") and fit["b"] > 0 and fit["scale"] > 0.01

