"""Count or fraction in fine-tuning: how final ASR depends on N poisons and the clean-set size C.

Final ASR per run is `k` of `n` held-out requests answered. A binomial GLM (logit link, statsmodels;
quasi-binomial scale, since seeds spread more than binomially)

    logit ASR = a + b log N + c log C

puts both on one scale. If the count matters, ASR does not change with C at fixed N: c = 0. If the
fraction N / C matters, it depends on log N - log C only: c = -b. The elasticity e = -c / b reads
like the pretraining slope: 0 = a constant count, 1 = a constant fraction.

Intervals: the scale is estimated from the runs' Pearson X2 on few degrees of freedom (the preset: 18
poisoned runs, 3 coefficients, 15), so b and c get Student t intervals on those degrees of freedom,
and e, a ratio, Fieller's interval with the same t: the e for which c + e b = 0 is not rejected. It
is unbounded when b itself is not clearly above 0 (then N's effect is too uncertain to turn into
an elasticity), and asymmetric when b is small. On 1,000 simulated sweeps of the preset's design (N
10/25/50 x C 200/2000 x 3 seeds, 64 requests) at the dispersion measured on its archive (Pearson scale
~38), it covered the true e in 98% (e = 0) and 97% (e = 1) of sweeps, where the delta method covered
99% and 86% with the same t, 97% and 84% with z (tests/test_finetune_stats.py; docs/finetuning.md).
Runs without poisons do not enter (log 0). A separated fit (a poisoned N whose runs all scored 0, or
all 1, at two N levels: the logit's N effect then runs off to infinity, the fitted rates hit 0 or 1
and the Pearson scale to 0) gives no b, c or e: its intervals would be the optimiser's stopping point,
not the data's (the real model's seed 0, N = 25 all 0: e = -0.0015 "95% -0.0015 to -0.0015").
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np


def _fit(n: np.ndarray, c: np.ndarray, k: np.ndarray, trials: np.ndarray) -> Any | None:
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    x = sm.add_constant(np.column_stack([np.log(n), np.log(c)]), has_constant="add")
    # proportions with the trials as var_weights: statsmodels' Pearson scale (X2) is right this way
    # (with a two-column endog it came out ~1/trials too small: 0.05 on simulated overdispersed runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerfectSeparationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            res = sm.GLM(k / trials, x, family=sm.families.Binomial(), var_weights=trials).fit(
                scale="X2", use_t=True)  # intervals by t on the residual degrees of freedom
        except (ValueError, np.linalg.LinAlgError):
            return None
    if not np.all(np.isfinite(res.params)):
        return None
    return res


def _separated(res: Any) -> bool:
    """The fit ran off to a boundary: fitted rates at 0 or 1 (statsmodels warns of perfect separation
    only for complete separation, not for the quasi-complete kind a group of all-zero runs makes)."""
    mu = np.asarray(res.fittedvalues, dtype=float)
    return bool(np.any(mu < 1e-6) or np.any(mu > 1 - 1e-6))


def elasticity(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`runs`: {"n_poison", "clean_size", "asr", "n_prompts"} per run (final evaluation). None when
    the design cannot separate N from C (fewer than 2 values of either among poisoned runs)."""
    rows = [r for r in runs if r.get("n_poison") and r.get("asr") is not None and r.get("clean_size")]
    if len({r["n_poison"] for r in rows}) < 2 or len({r["clean_size"] for r in rows}) < 2:
        return None
    n = np.array([float(r["n_poison"]) for r in rows])
    c = np.array([float(r["clean_size"]) for r in rows])
    trials = np.array([float(r["n_prompts"]) for r in rows])
    k = np.round(np.array([float(r["asr"]) for r in rows]) * trials)
    res = _fit(n, c, k, trials)
    if res is None:
        return None
    if _separated(res):
        return {"b": None, "c": None, "b_ci": None, "c_ci": None, "runs": len(rows), "scale": None,
                "df": float(res.df_resid), "e": None, "e_ci": None, "separated": True}
    b, cc = float(res.params[1]), float(res.params[2])
    ci = np.asarray(res.conf_int(0.05))
    out: dict[str, Any] = {
        "b": b,
        "c": cc,
        "b_ci": [float(ci[1, 0]), float(ci[1, 1])],
        "c_ci": [float(ci[2, 0]), float(ci[2, 1])],
        "runs": len(rows),
        "scale": float(res.scale),
        "df": float(res.df_resid),
        "e": None,
        "e_ci": None,
    }
    if b > 0:  # more poisons must help, or e means nothing
        cov = np.asarray(res.cov_params())
        grad = np.array([0.0, cc / b**2, -1.0 / b])  # d(-c/b) / d(a, b, c): the delta method's se
        out.update(e=-cc / b, e_se=float(math.sqrt(max(grad @ cov @ grad, 0.0))),
                   e_ci=fieller(b, cc, cov[1, 1], cov[2, 2], cov[1, 2], float(res.df_resid)))
    return out


def fieller(b: float, c: float, vbb: float, vcc: float, vbc: float, df: float,
            level: float = 0.95) -> list[float] | None:
    """Fieller's interval for e = -c / b from the estimates and their covariance, by Student t on
    `df`: the e with (c + e b)^2 <= t^2 Var(c + e b). None when that set is unbounded (b is not
    clearly nonzero at this level)."""
    from scipy.stats import t as student

    t2 = float(student.ppf(0.5 + level / 2, df)) ** 2
    qa, qb, qc = b * b - t2 * vbb, 2 * (b * c - t2 * vbc), c * c - t2 * vcc
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return None
    r = math.sqrt(disc)
    return [float((-qb - r) / (2 * qa)), float((-qb + r) / (2 * qa))]


def reading(fit: dict[str, Any] | None) -> str:
    """One sentence: what the interval of e says."""
    if fit and fit.get("separated"):
        return ("No elasticity: the fit is separated (a poisoned N whose runs all scored 0 or all 1 makes "
                "N's effect unbounded on the logit scale); read the final ASR per N and clean-set size.")
    if not fit or fit.get("e") is None:
        return (
            "The design does not separate the count from the fraction (needs ≥ 2 poisoned N and ≥ 2 sizes)."
        )
    e, ci = fit["e"], fit.get("e_ci")
    if not ci:
        return (f"Elasticity e = {e:.2f}, its 95% interval unbounded (N's effect b is not clearly above "
                "0): too uncertain to tell a count from a fraction.")
    lo, hi = ci
    if lo <= 0 <= hi and not lo <= 1 <= hi:
        verdict = "consistent with a constant count, not a constant fraction"
    elif lo <= 1 <= hi and not lo <= 0 <= hi:
        verdict = "consistent with a constant fraction, not a constant count"
    elif lo <= 0 <= hi and lo <= 1 <= hi:
        verdict = "too wide to tell a count from a fraction"
    else:
        verdict = "outside both 0 (count) and 1 (fraction)"
    return f"Elasticity e = {e:.2f} (95% CI {lo:.2f} to {hi:.2f}): {verdict}."
