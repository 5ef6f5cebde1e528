"""The count-vs-fraction statistics on simulated sweeps whose answer is known.

A simulated run needs P* poisons: P* = 60 (D / 1M)^b exp(0.25 z), z ~ N(0, 1), so b = 0 is the study's
constant count and b = 1 a constant fraction. Its ASR at each milestone evaluation is binomial over 128
prompts around a logistic curve in log(poisons seen) centred on P*; runs whose N is below P* never
succeed and must enter as censored. The design is the study's: three sizes at 1x, the two smallest also
at 0.5x and 2x, four poison counts, two seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from poisonlab.results.count_fraction import (
    Needed,
    _tobit,
    count_vs_fraction,
    needed_per_run,
    poisons_needed,
    reading,
    slope_fit,
)

DESIGN = [(1e6, m) for m in (0.5, 1.0, 2.0)] + [(4e6, m) for m in (0.5, 1.0, 2.0)] + [(16e6, 1.0)]


def simulate(b_true: float, seed: int = 0, p0: float = 60.0, sigma: float = 0.25, prompts: int = 128,
             counts: tuple[int, ...] = (50, 200, 800, 3200), n_exp: float = 0.0,
             dips: tuple[float, float] = (0.0, 0.0), width: float = 0.15,
             milestones: bool = False) -> dict[str, list[dict]]:
    """`dips` = (sd, rho): real curves level off below 1 and dip (0.81, 0.47, 0.84 at three consecutive
    evaluations of one tiny-grid run: 1.6 logits down and back, where 128 prompts' binomial noise is
    ~0.3 logits). With sd > 0 the curve is multiplied by a plateau whose logit is 2 (ASR 0.88) plus a
    run-level AR(1) over the run's evaluations with that stationary sd and lag-1 correlation rho.
    `width`: of the rise in log(poisons seen) (real tiny-grid curves: ~0.4, 0.2 to 0.8 over 3x).
    `milestones`: evaluate as the presets do, each time poisons seen grows 1.25x from 5, and at N (the
    same grid for every N); otherwise at 25 points from 1 to N."""
    rng = np.random.default_rng(seed)
    runs = {}
    for base, mult in DESIGN:
        for n in counts:
            for s in range(2):
                clean = base * mult
                need = (p0 * (clean / 1e6) ** b_true * (n / 200) ** n_exp
                        * math.exp(sigma * rng.standard_normal()))
                seen = (np.unique(np.r_[np.round(5 * 1.25 ** np.arange(int(math.log(n / 5, 1.25)) + 1)), n])
                        if milestones else np.unique(np.r_[np.round(np.geomspace(1, n, 25)), n]))
                run_id = f"m{int(base)}_x{mult}_n{n}_s{s}"
                rows = []
                sd, rho = dips
                u = sd * rng.standard_normal()
                for k, m in enumerate(seen):
                    if k:
                        u = rho * u + sd * math.sqrt(1 - rho**2) * rng.standard_normal()
                    p = 1 / (1 + math.exp(-(math.log(m) - math.log(need)) / width))
                    if sd:
                        p /= 1 + math.exp(-2.0 - u)
                    rows.append({"run_id": run_id, "model": f"m{int(base)}", "params_nonemb": base / 20,
                                 "data_mult": mult, "n_poison": n, "clean_tokens": clean,
                                 "n_prompts": prompts, "step": k, "poisons_seen": float(m),
                                 "asr": rng.binomial(prompts, p) / prompts})
                runs[run_id] = rows
    return runs


def test_poisons_needed_interpolates_and_censors() -> None:
    rows = [{"poisons_seen": x, "asr": y} for x, y in [(0, 0.0), (10, 0.2), (40, 0.7), (80, 0.9)]]
    value, censored = poisons_needed(rows)
    assert not censored and value == pytest.approx(math.exp(math.log(10) + 0.6 * math.log(4)))
    flicker = rows + [{"poisons_seen": 100, "asr": 0.4}, {"poisons_seen": 120, "asr": 0.8}]
    assert poisons_needed(flicker)[0] == pytest.approx(100 * 1.2 ** 0.25)  # sustained: after the last dip
    never = [{"poisons_seen": x, "asr": 0.1} for x in (0, 20, 50)]
    assert poisons_needed(never) == (50, True)  # needed more than the 50 it saw
    assert poisons_needed([{"poisons_seen": 0, "asr": 0.0}]) is None  # no poisons: says nothing


@pytest.mark.parametrize("b_true", [0.0, 1.0])
def test_slope_interval_recovers_the_known_answer(b_true: float) -> None:
    res = count_vs_fraction(simulate(b_true, seed=1), n_boot=200)
    for name in ("size", "budget", "all"):
        fit = res["fits"][name]
        for lo, hi in (fit["ci"], fit["bootstrap_ci"]):
            assert lo <= b_true <= hi, (name, fit)
            assert not lo <= 1 - b_true <= hi, (name, fit)  # and it tells the other hypothesis apart
    assert res["fits"]["per_n"]["censored"] > 0  # the design straddles the threshold
    assert reading(res["fits"]["all"]) == ("a constant count, not a constant fraction" if b_true == 0
                                           else "a constant fraction, not a constant count")
    lo, hi = res["binomial"]["ci"]
    assert lo <= b_true <= hi and not lo <= 1 - b_true <= hi
    assert res["sentence"].startswith("Poisons needed for sustained ASR >= 0.5")


def test_dropping_censored_runs_would_bias_the_slope() -> None:
    """Why censored runs stay in: when poison counts stop short and runs vary (sigma 0.6), the runs that
    succeed at the largest data sizes are the lucky ones; leaving the others out flattens the slope
    towards 'count'. Averaged over 20 simulated sweeps under a constant fraction, pooled at one
    horizon: the censored model stays at b = 1, dropping the censored runs does not (measured: 1.04
    vs 0.91; over 40 sweeps the censored model read 1.03 +- 0.03)."""
    kept, dropped = [], []
    for seed in range(20):
        runs = simulate(1.0, seed=seed, sigma=0.6, counts=(50, 200, 800))
        res = count_vs_fraction(runs, n_boot=0)
        kept.append(res["fits"]["all"]["slope"])
        needed = needed_per_run(runs, horizon=res["fits"]["all"]["horizon"])
        dropped.append(slope_fit([n for n in needed if not n.censored], n_boot=0)["slope"])
    assert abs(np.mean(kept) - 1) < 0.08
    assert np.mean(dropped) < np.mean(kept) - 0.05


@pytest.mark.parametrize("b_true", [0.0, 1.0])
def test_interval_coverage(b_true: float) -> None:
    """Across 40 independent simulated sweeps, the 95% interval of the size axis (the smallest design,
    24 runs) and of all runs covers the true slope in at least 34 (a miscalibrated interval, such as
    the plain percentile bootstrap at ~80%, fails this)."""
    covered = {"size": 0, "all": 0}
    for seed in range(40):
        res = count_vs_fraction(simulate(b_true, seed=500 + seed), n_boot=0)
        needed = [Needed(**n) for n in res["needed"]]
        for name, runs in (("size", [n for n in needed if n.data_mult == 1.0]), ("all", needed)):
            lo, hi = slope_fit(runs, n_boot=0)["ci"]
            covered[name] += lo <= b_true <= hi
    assert min(covered.values()) >= 34, covered


def test_no_answer_is_said_as_such() -> None:
    runs = {f"r{i}": [{"run_id": f"r{i}", "model": "m", "n_poison": 10, "clean_tokens": 1e6 * (i + 1),
                       "data_mult": 1.0, "poisons_seen": float(x), "asr": 0.0, "n_prompts": 8}
                      for x in (0, 5, 10)] for i in range(5)}
    res = count_vs_fraction(runs, n_boot=20)
    assert "slope" not in res["fits"]["all"] and res["sentence"].startswith("No answer yet")


def test_an_exact_fit_stays_finite_and_quiet() -> None:
    """Four runs on a line (as a bootstrap resample of a small sweep can be): the likelihood alone would
    run sigma to 0; the fit stops at the floor, with no overflow, and still finds the line."""
    import warnings

    from poisonlab.results.count_fraction import SIGMA_FLOOR

    needed = [Needed(f"r{i}", 200.0 * (c / 1e6) ** 0.5, False, c, "m", c / 20, 1.0, 1000)
              for i, c in enumerate((1e6, 1e6, 4e6, 4e6))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from numpy fails the test
        fit = slope_fit(needed, n_boot=50)
    assert fit["slope"] == pytest.approx(0.5, abs=1e-3)
    assert fit["sigma"] == pytest.approx(SIGMA_FLOOR, rel=1e-3)
    assert all(math.isfinite(v) for v in fit["ci"])


def test_two_successes_are_not_an_answer() -> None:
    """Two sizes, one seed each, that needed 165 and 167 poisons, and two runs censored at 100 (as the
    first tiny-grid runs were): the line goes through two points, nothing measures the spread, and the
    fit must say so rather than give b = 0.01 +- 0.2."""
    needed = [Needed("a", 165.0, False, 8e6, "m4", 4e5, 1.0, 300),
              Needed("b", 100.0, True, 8e6, "m4", 4e5, 1.0, 100),
              Needed("c", 167.0, False, 16e6, "m8", 8e5, 1.0, 300),
              Needed("d", 100.0, True, 16e6, "m8", 8e5, 1.0, 100)]
    fit = slope_fit(needed, n_boot=20)
    assert "slope" not in fit and "too few runs reached sustained success (2" in fit["note"]


@pytest.mark.parametrize("case", range(6))
def test_newton_tobit_finds_the_likelihoods_maximum(case: int) -> None:
    """The fast solver (Newton in Olsen's parameters) against a general-purpose optimiser on the plain
    censored likelihood in (beta, log sigma): same optimum, on data with few to most runs censored, an
    intercept per size, and a near-exact fit that puts sigma at its floor."""
    from scipy.optimize import minimize

    from poisonlab.results.count_fraction import SIGMA_FLOOR, _tobit, _tobit_nll

    rng = np.random.default_rng(case)
    n = 12 + 8 * case
    x = rng.uniform(12, 17, n)
    size = rng.integers(0, 2, n)
    noise = 1e-4 if case == 5 else rng.uniform(0.1, 0.6)
    y = 3 + 0.3 * x + 0.5 * size + noise * rng.standard_normal(n)
    cap = np.quantile(y, [0.95, 0.8, 0.6, 0.4, 0.3, 1.0][case])
    cens = y >= cap
    y = np.minimum(y, cap)
    X = np.column_stack([x, size, 1 - size]) if case % 2 else np.column_stack([x, np.ones(n)])
    beta, se, sigma, _ = _tobit(y, X, cens)
    start = np.append(np.linalg.lstsq(X, y, rcond=None)[0], 0.0)
    ref = minimize(_tobit_nll, start, args=(y, X, cens), jac=True, method="L-BFGS-B",
                   bounds=[(None, None)] * X.shape[1] + [(math.log(SIGMA_FLOOR), None)],
                   options={"gtol": 1e-11, "ftol": 1e-15, "maxiter": 20000})
    ours = _tobit_nll(np.append(beta, math.log(sigma)), y, X, cens)[0]
    assert ours <= ref.fun + 1e-7
    assert beta[0] == pytest.approx(ref.x[0], abs=1e-3)
    assert sigma >= SIGMA_FLOOR * (1 - 1e-9) and np.all(np.isfinite(se))


def test_the_within_n_fit_is_calibrated_when_n_matters() -> None:
    """Poisons needed that grow with N at a fixed data size: compared within each N the interval still
    covers the true slope. (Pooled over N and judging each run to its own end, it covered b = 1 in at
    most half of these sweeps: the smallest N succeeds only at the smallest data sizes; at one common
    horizon the runs of smaller N are left out of the pooled fit.)"""
    for b_true in (0.0, 1.0):
        covered = 0
        for seed in range(12):
            res = count_vs_fraction(simulate(b_true, seed=seed, n_exp=0.3, counts=(20, 200, 800, 3200)),
                                    n_boot=0)
            lo, hi = res["fits"]["per_n"]["ci"]
            covered += lo < b_true < hi
            assert "compared within each N" in res["sentence"]
        assert covered >= 10, (b_true, covered)


def test_an_n_where_nothing_succeeded_is_left_out_and_named() -> None:
    res = count_vs_fraction(simulate(0.0, seed=0, n_exp=0.3, counts=(8, 200, 800, 3200)), n_boot=0)
    assert all(n["censored"] for n in res["needed"] if n["n_poison"] == 8)
    fit = res["fits"]["per_n"]
    assert fit["n_left_out"] == [8] and fit["runs"] == 42 and "N = 8 left out" in res["sentence"]


def test_a_horizon_cuts_the_evaluations_after_it() -> None:
    pts = [(10, 0.2), (40, 0.7), (80, 0.9), (100, 0.3), (120, 0.8)]
    rows = [{"poisons_seen": x, "asr": y} for x, y in pts]
    assert poisons_needed(rows)[0] == pytest.approx(100 * 1.2 ** 0.4)  # watched to its end: the late dip
    value, censored = poisons_needed(rows, horizon=80)  # judged up to 80 poisons: the dip is after it
    assert not censored and value == pytest.approx(math.exp(math.log(10) + 0.6 * math.log(4)))
    assert poisons_needed(rows, horizon=200) is None  # never watched that far: not judged
    # evaluations after the last poison measure persistence, not "needed": a decay there is not a dip
    after = rows[:3] + [{"poisons_seen": 80, "asr": 0.1}]
    assert poisons_needed(after) == poisons_needed(rows[:3])


def test_a_common_horizon_removes_the_longer_watch_bias() -> None:
    """Curves that dip as real ones do (run-level AR(1), 1 logit, rho 0.5, on a plateau of 0.88),
    evaluated on the presets' milestone grid, and poisons needed that do NOT depend on N. The N effect,
    log(needed) of N = 1000 over N = 300 in a censored fit: judged each to its own end, the N = 1000
    runs look as if they needed ~16% more (watched 3.3x longer, a late dip pushes them up); judged at
    one horizon (300) the effect is gone (measured over 20 sweeps: +0.148 +- 0.030 vs +0.010 +- 0.026)."""
    effect: dict[float | None, list[float]] = {None: [], 300: []}
    for seed in range(20):
        runs = simulate(0.0, seed=seed, dips=(1.0, 0.5), counts=(300, 1000), width=0.4, p0=150,
                        milestones=True)
        for horizon, acc in effect.items():
            needed = needed_per_run(runs, horizon=horizon)
            y = np.log([n.value for n in needed])
            X = np.column_stack([np.ones(len(y)), [n.n_poison == 1000 for n in needed],
                                 np.log([n.clean_tokens for n in needed])])
            acc.append(_tobit(y, X, np.array([n.censored for n in needed]))[0][1])
    assert np.mean(effect[None]) > 0.08, np.mean(effect[None])
    assert abs(np.mean(effect[300])) < 0.06, np.mean(effect[300])


@pytest.mark.parametrize("b_true", [0.0, 1.0])
def test_coverage_and_bias_with_real_dips(b_true: float) -> None:
    """The within-N fit (the sentence's) and the pooled fit on curves that rise as slowly as the
    tiny-grid's (width 0.4 in log poisons) and dip as theirs do: the 95% interval covers the true slope
    in >= 25 of 30 sweeps (measured 27-29), and the mean slope is within 0.1 of it (measured within
    0.04 for within N, 0.07 pooled; the budget-axis fit, not asserted, read 0.90 at b = 1)."""
    covered = {"per_n": 0, "all": 0}
    slopes: dict[str, list[float]] = {"per_n": [], "all": []}
    for seed in range(30):
        res = count_vs_fraction(simulate(b_true, seed=300 + seed, dips=(1.0, 0.5), width=0.4), n_boot=0)
        for name in covered:
            lo, hi = res["fits"][name]["ci"]
            covered[name] += lo <= b_true <= hi
            slopes[name].append(res["fits"][name]["slope"])
    assert min(covered.values()) >= 25, covered
    assert all(abs(np.mean(v) - b_true) < 0.1 for v in slopes.values()), slopes
