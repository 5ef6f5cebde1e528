"""Count or fraction? The poisons each run needed, and how that number scales with the clean data.

Per run, `poisons_needed`: the poisons seen when attack success became sustained (ASR at or above the
threshold at that evaluation and at every later one up to a horizon of poisons seen), interpolated
between the evaluation before and that one. A run that never gets there is right-censored at the
poisons it saw: all we know is that it needed more. Runs compared in one fit are judged at the same
horizon (`common_horizon`): a run watched over more poisons has more chances to dip below the
threshold, so judging each run to its own end made runs with larger N look as if they needed more.

Across runs, `slope_fit`: log(poisons needed) = a + b log(clean tokens trained) + e, e ~ N(0, s^2),
with censored runs entering through P(needed > seen) (a Tobit model, by maximum likelihood). b = 0
means a constant count suffices at every data size (the study's claim); b = 1
means a constant fraction of the data is needed. The 95% interval is the model's (standard error from
the observed information, Student-t quantile), checked for coverage on simulated sweeps; a percentile
bootstrap over runs (resampled within each size and budget) sits beside it.

Three designs are fitted apart, because they vary the clean data in different ways: the size axis
(models of several sizes, each at its Chinchilla budget), the budget axis (one size at several data
budgets; an intercept per size) and both together. Beside them, `binomial_slope`: a logistic model of
per-prompt success on log(poisons seen) and log(clean tokens) over every evaluation of every poisoned
run, with standard errors clustered by run (evaluations of one run are not independent); the ratio of
its two coefficients estimates the same slope (delta-method interval).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Needed:
    """One run's poisons needed for sustained success (or the lower bound it gave, when censored)."""

    run_id: str
    value: float  # poisons seen at sustained success; when censored, the poisons seen at the end
    censored: bool
    clean_tokens: float
    model: str
    params: float
    data_mult: float
    n_poison: int
    first: float | None = None  # poisons seen at the first evaluation at or above the threshold
    horizon: float | None = None  # the poisons seen up to which the run was judged


def _points(rows: Rows, count: str) -> list[tuple[float, float]]:
    return [(float(r[count]), float(r["asr"])) for r in rows
            if r.get(count) is not None and r.get("asr") is not None and not math.isnan(r["asr"])]


def horizon_of(rows: Rows, count: str = "poisons_seen") -> float | None:
    """The poisons a run saw by its last evaluation: how far it can be watched."""
    pts = _points(rows, count)
    return pts[-1][0] if pts else None


def poisons_needed(rows: Rows, threshold: float = 0.5, count: str = "poisons_seen",
                   horizon: float | None = None) -> tuple[float, bool] | None:
    """(poisons needed, censored) from one run's evaluation rows in step order; None without poisons.

    The run is watched up to a horizon in poisons seen: its evaluations up to `horizon`, through the
    first one at it (default: the poisons it saw in all, so evaluations after its last poison, which
    measure persistence, are not looked at); a run still below the threshold there is censored at its
    last evaluation in the window. Sustained success starts after the last evaluation below the
    threshold within that window; the crossing is interpolated between that evaluation and the next
    (in log poisons seen). Needed is at least 1 poison.

    Runs compared with each other must share the horizon: a run watched over 3x more poisons has 3x
    more chances to dip below the threshold and push its "needed" up (the tiny-grid's N = 1000 runs
    against N = 300). A run that ends before the horizon cannot be judged at it: None (leave it out;
    censoring it at its first crossing would censor at the very value sought, which biases a censored
    fit)."""
    pts = _points(rows, count)
    if not pts or pts[-1][0] <= 0:
        return None
    h = pts[-1][0] if horizon is None else float(horizon)
    reach = next((i for i, (x, _) in enumerate(pts) if x >= h), None)
    if reach is None:  # not watched to the horizon
        return None
    # an evaluation at the horizon closes the window (later ones at the same count come after the last
    # poison); one past it is after the horizon: the window ends with the evaluation before
    pts = pts[:reach + 1] if pts[reach][0] == h else pts[:reach]
    if not pts:
        return None
    below = [i for i, (_, y) in enumerate(pts) if y < threshold]
    if below and below[-1] == len(pts) - 1:
        return pts[-1][0], True  # not (or no longer) successful at the horizon: needed more than it saw
    if not below:
        return (max(pts[0][0], 1.0), False) if pts[0][0] > 0 else None  # succeeded from the start
    (x0, y0), (x1, y1) = pts[below[-1]], pts[below[-1] + 1]
    f = (threshold - y0) / (y1 - y0) if y1 > y0 else 1.0
    # in log(poisons seen) where both ends have poisons: success grows with the log of the count,
    # and milestone evaluations are spaced geometrically
    x = math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0))) if x0 > 0 else x0 + f * (x1 - x0)
    return max(x, 1.0), False


def first_crossing(rows: Rows, threshold: float = 0.5, count: str = "poisons_seen") -> float | None:
    """Poisons seen at the first evaluation at or above the threshold (None: never): beside the
    sustained rule, it shows how far a run's success flickered before it held."""
    return next((max(x, 1.0) for x, y in _points(rows, count) if y >= threshold and x > 0), None)


def common_horizon(runs: dict[str, Rows], threshold: float = 0.5,
                   count: str = "poisons_seen") -> float | None:
    """One horizon for runs compared in one fit, chosen among the runs' ends (the poisons each saw) as
    the one at which the most runs show sustained success (ties: the longer). Runs that end before it
    are left out (their success cannot be judged that far), and a shorter horizon cuts the long runs'
    evidence. Within one N every run ends at N, which this picks. None when no run held success."""
    ends = sorted({e for rows in runs.values() if rows and rows[-1].get("n_poison")
                   and (e := horizon_of(rows, count))})
    best, best_ok = None, 0
    for h in ends:
        ok = sum(1 for rows in runs.values() if rows and rows[-1].get("n_poison")
                 and (got := poisons_needed(rows, threshold, count, h)) and not got[1])
        if ok and ok >= best_ok:
            best, best_ok = h, ok
    return best


def needed_per_run(runs: dict[str, Rows], threshold: float = 0.5, count: str = "poisons_seen",
                   horizon: float | None = None) -> list[Needed]:
    """`poisons_needed` of every poisoned run at one horizon (None: each run's own end), with what
    the fits need to know about it."""
    out = []
    for run_id, rows in runs.items():
        last = rows[-1]
        if not last.get("n_poison"):
            continue
        got = poisons_needed(rows, threshold, count, horizon)
        clean = last.get("clean_tokens") or last.get("tokens_total")
        if got is None or not clean:
            continue
        out.append(Needed(str(run_id), got[0], got[1], float(clean), str(last.get("model")),
                          float(last.get("params_nonemb") or last.get("params_total") or 0),
                          float(last.get("data_mult") or 1.0), int(last["n_poison"]),
                          first_crossing(rows, threshold, count), horizon or horizon_of(rows, count)))
    return out


# --- the censored regression -------------------------------------------------------------------------

SIGMA_FLOOR = 0.01  # smallest residual spread of log(poisons needed) the fit may reach


def _tobit_nll(params: np.ndarray, y: np.ndarray, X: np.ndarray,
               censored: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of the right-censored normal regression in (beta, log sigma), and its
    gradient: the reference the fast solver below is tested against."""
    from scipy.special import log_ndtr

    beta, log_s = params[:-1], params[-1]
    s = math.exp(log_s)
    z = (y - X @ beta) / s
    obs = ~censored
    # censored: log P(needed > seen) = log Phi(-z); inverse Mills ratio phi(z) / Phi(-z)
    lsf = log_ndtr(-z[censored])
    mills = np.exp(-0.5 * z[censored] ** 2 - 0.5 * math.log(2 * math.pi) - lsf)
    nll = (0.5 * float(np.sum(z[obs] ** 2)) + obs.sum() * (log_s + 0.5 * math.log(2 * math.pi))
           - float(lsf.sum()))
    dz = np.zeros_like(z)  # d nll / d z
    dz[obs] = z[obs]
    dz[censored] = mills
    grad_beta = -(X.T @ dz) / s
    grad_log_s = -float(np.sum(dz * z)) + obs.sum()
    return nll, np.append(grad_beta, grad_log_s)


def _olsen(theta: np.ndarray, y: np.ndarray, X: np.ndarray,
           censored: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Log-likelihood, gradient and Hessian in Olsen's parameters (gamma = beta / sigma, tau = 1 / sigma),
    in which the Tobit log-likelihood is globally concave (Olsen 1978), so Newton's method is safe."""
    from scipy.special import log_ndtr

    tau = theta[-1]  # theta = (gamma, tau)
    obs = ~censored
    Z = np.column_stack([X, -y])  # u = Z @ theta: (x'gamma - tau y)
    u = Z @ theta
    # observed: log tau - (tau y - x'gamma)^2 / 2 (constant dropped); censored: log Phi(x'gamma - tau y)
    lcdf = log_ndtr(u[censored])
    ll = obs.sum() * math.log(tau) - 0.5 * float(np.sum(u[obs] ** 2)) + float(lcdf.sum())
    lam = np.exp(-0.5 * u[censored] ** 2 - 0.5 * math.log(2 * math.pi) - lcdf)  # phi(u) / Phi(u)
    w = np.where(obs, -u, 0.0)
    w[censored] = lam
    grad = Z.T @ w
    grad[-1] += obs.sum() / tau
    curv = np.where(obs, 1.0, 0.0)
    curv[censored] = lam * (u[censored] + lam)  # -d^2 log Phi(u) / du^2, in (0, 1)
    hess = -(Z * curv[:, None]).T @ Z
    hess[-1, -1] -= obs.sum() / tau**2
    return ll, grad, hess


def _tobit(y: np.ndarray, X: np.ndarray,
           censored: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Right-censored normal regression by maximum likelihood: (coefficients, standard errors, sigma,
    covariance of the coefficients).

    Written here because statsmodels has no Tobit. Damped Newton in Olsen's concave parametrisation
    with the analytic Hessian converges in ~10 iterations (~0.3 ms a fit); L-BFGS-B on (beta, log sigma)
    took ~30 ms and made the report's bootstrap (6,000 refits) take minutes. Standard errors from the
    inverse Hessian, carried to (beta, log sigma) by the delta method. tests/test_count_fraction.py
    checks the optimum against a general-purpose optimiser on the plain likelihood."""
    beta0 = np.linalg.lstsq(X, y, rcond=None)[0]
    s0 = max(float((y - X @ beta0).std()), 0.05)
    theta = np.append(beta0 / s0, 1.0 / s0)
    # sigma is bounded below: a bootstrap resample of a few runs can fit exactly, and the unbounded
    # likelihood then runs sigma to 0 (tau to inf); 0.01 in log poisons is below what the milestone
    # evaluations resolve anyway
    tau_max = 1.0 / SIGMA_FLOOR
    theta[-1] = min(theta[-1], tau_max)
    ll, grad, hess = _olsen(theta, y, X, censored)
    free = slice(None)  # all parameters, or gamma alone once tau sits at its bound
    for _ in range(200):
        g, H = grad[free], hess[free, free]
        try:
            step = -np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            step = g / max(1.0, float(np.abs(np.diag(H)).max()))
        if not np.all(np.isfinite(step)):
            raise OverflowError("Newton step is not finite")
        full = np.zeros_like(theta)
        full[free] = step
        t = 1.0
        if theta[-1] + full[-1] > tau_max:  # stop at the bound, then optimise gamma with tau fixed
            t = (tau_max - theta[-1]) / full[-1] if full[-1] > 0 else 1.0
        while True:  # backtracking: a concave function, so some step along a Newton direction ascends
            cand = theta + t * full
            if cand[-1] > 0:
                ll_c, grad_c, hess_c = _olsen(cand, y, X, censored)
                if np.isfinite(ll_c) and ll_c >= ll - 1e-12:
                    break
            t *= 0.5
            if t < 1e-12:
                raise OverflowError("line search failed")
        gain = ll_c - ll
        theta, ll, grad, hess = cand, ll_c, grad_c, hess_c
        if theta[-1] >= tau_max * (1 - 1e-12):
            theta[-1] = tau_max
            free = slice(0, len(theta) - 1)
        if abs(gain) < 1e-12 and float(np.abs(grad[free]).max()) < 1e-8:
            break
    gamma, tau = theta[:-1], float(theta[-1])
    beta = gamma / tau
    try:
        cov_olsen = np.linalg.inv(-0.5 * (hess + hess.T))
    except np.linalg.LinAlgError:
        cov_olsen = np.full(hess.shape, np.nan)
    k = len(theta)
    J = np.zeros((k, k))  # d(beta, log sigma) / d(gamma, tau)
    J[:-1, :-1] = np.eye(k - 1) / tau
    J[:-1, -1] = -gamma / tau**2
    J[-1, -1] = -1.0 / tau
    cov = J @ cov_olsen @ J.T
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    return beta, se[:-1], 1.0 / tau, cov[:-1, :-1]


def _design(needed: Sequence[Needed], by: str | None) -> np.ndarray:
    """log(clean tokens), then one intercept, or one per value of `by` (a `Needed` field)."""
    x = np.log([n.clean_tokens for n in needed])
    if by is None:
        return np.column_stack([x, np.ones(len(x))])
    levels = sorted({getattr(n, by) for n in needed})
    dummies = [[1.0 if getattr(n, by) == v else 0.0 for n in needed] for v in levels]
    return np.column_stack([x, *dummies])


def slope_fit(needed: Sequence[Needed], *, per_size: bool = False, per_n: bool = False,
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The slope b of log(poisons needed) on log(clean tokens): estimate, 95% bootstrap and Wald
    intervals. `per_size`: an intercept per model size (the budget axis: only within-size variation).
    `per_n`: an intercept per N inserted (runs compared only with runs of the same N); an N at which no
    run succeeded says nothing under its own intercept (it would run to infinity) and is left out."""
    needed = list(needed)
    dropped: list[int] = []
    if per_n:
        ok_n = {n.n_poison for n in needed if not n.censored}
        dropped = sorted({n.n_poison for n in needed} - ok_n)
        needed = [n for n in needed if n.n_poison in ok_n]
    xs = {round(math.log(n.clean_tokens), 6) for n in needed}
    out: dict[str, Any] = {"runs": len(needed), "censored": sum(n.censored for n in needed),
                           "clean_tokens": sorted({n.clean_tokens for n in needed})}
    if dropped:
        out["n_left_out"] = dropped  # every run at these N censored
    if len(xs) < 2 or len(needed) < 4:
        out["note"] = "too few runs or data sizes to fit a slope"
        return out
    if all(n.censored for n in needed):
        out["note"] = "no run reached sustained success: the slope is not identified"
        return out
    from scipy.stats import t as student_t

    y = np.log([n.value for n in needed])
    cens = np.array([n.censored for n in needed])
    X = _design(needed, "model" if per_size else "n_poison" if per_n else None)
    n_ok = int((~cens).sum())  # runs that reached sustained success
    if n_ok < X.shape[1] + 2:
        # the runs that succeeded must leave at least one degree of freedom for the spread of the
        # poisons needed once the line is fitted; with fewer, sigma is whatever the few points happen
        # to be (two sizes that needed 165 and 167 poisons gave b = 0.01 +- 0.2 from one seed each)
        out["note"] = (f"too few runs reached sustained success ({n_ok}; at least "
                       f"{X.shape[1] + 2} are needed to estimate their spread)")
        return out
    try:
        beta, se, sigma, cov = _tobit(y, X, cens)
    except OverflowError:  # the optimiser ran off (e.g. the censored runs alone fix a data size)
        out["note"] = "the censored regression did not converge: the slope is not identified"
        return out
    # Student-t quantile on the uncensored runs left after the parameters: calibrated in simulation
    # (tests/test_count_fraction.py: 92-97% coverage), where the plain percentile bootstrap covered
    # only ~80% at 24 runs; the bootstrap interval is kept beside it as a check of the model
    df = n_ok - X.shape[1] - 1
    q = float(student_t.ppf(0.975, df))
    out.update(slope=float(beta[0]), se=float(se[0]), sigma=sigma, df=df,
               ci=[float(beta[0] - q * se[0]), float(beta[0] + q * se[0])])
    # the fitted line and the covariance of (slope, intercept): the report draws its band
    if not per_size and not per_n:
        out.update(intercept=float(beta[1]), cov=cov.tolist())
    # bootstrap over runs, resampling within each (size, budget) so every data size stays in the design
    # (not within each N as well: with a few seeds per cell that would understate the spread)
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, n in enumerate(needed):
        cells[(n.model, n.data_mult)].append(i)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(v, size=len(v)) for v in cells.values()])
        if cens[idx].all():
            continue
        try:
            b = _tobit(y[idx], X[idx], cens[idx])[0]
        except (np.linalg.LinAlgError, ValueError, OverflowError):  # a degenerate resample: skipped
            continue
        if np.isfinite(b[0]):
            boots.append(float(b[0]))
    if n_boot and len(boots) >= 0.9 * n_boot:
        out["bootstrap_ci"] = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
        out["n_boot"] = len(boots)
    elif n_boot:
        out["note"] = f"only {len(boots)} of {n_boot} bootstrap refits succeeded: no bootstrap interval"
    return out


MIN_CLUSTERS = 10  # runs below which the binomial model's clustered errors are not trusted


def binomial_slope(runs: dict[str, Rows], count: str = "poisons_seen") -> dict[str, Any]:
    """logit P(prompt succeeds) = c + beta log(poisons seen) + gamma log(clean tokens), prompts as trials,
    run-clustered errors; the slope of the poisons needed for any fixed success rate is -gamma / beta."""
    import statsmodels.api as sm

    ys, xs, groups = [], [], []
    for g, (run_id, rows) in enumerate(runs.items()):
        for r in rows:
            seen, k = r.get(count), r.get("n_prompts")
            clean = r.get("clean_tokens") or r.get("tokens_total")
            if not r.get("n_poison") or not seen or not k or not clean or r.get("asr") is None:
                continue
            s = round(float(r["asr"]) * k)
            ys.append([s, k - s])
            xs.append([1.0, math.log(seen), math.log(clean)])
            groups.append(g)
        del run_id
    out: dict[str, Any] = {"evaluations": len(ys), "runs": len(set(groups))}
    if len(set(groups)) < MIN_CLUSTERS or len({round(x[2], 6) for x in xs}) < 2:
        # clustered standard errors need many clusters: with a handful of runs they are far too small
        out["note"] = f"too few runs for run-clustered errors (need {MIN_CLUSTERS}) or data sizes"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sm.GLM(np.array(ys), np.array(xs), family=sm.families.Binomial()).fit(
            cov_type="cluster", cov_kwds={"groups": np.array(groups)})
    _, beta, gamma = (float(v) for v in res.params)
    cov = np.asarray(res.cov_params())[1:, 1:]
    if beta <= 0:
        out.update(beta=beta, gamma=gamma, note="success does not rise with poisons seen: no slope")
        return out
    slope = -gamma / beta
    grad = np.array([gamma / beta**2, -1.0 / beta])  # d slope / d(beta, gamma)
    se = float(math.sqrt(max(grad @ cov @ grad, 0.0)))
    from scipy.stats import t as student_t

    q = float(student_t.ppf(0.975, len(set(groups)) - 1))  # G - 1 degrees of freedom, as for clusters
    out.update(beta=beta, gamma=gamma, slope=slope, se=se, ci=[slope - q * se, slope + q * se])
    return out


# --- the three designs and the sentence ----------------------------------------------------------------


def _main_mult(needed: Sequence[Needed]) -> float:
    mults = [n.data_mult for n in needed]
    return 1.0 if 1.0 in mults else max(set(mults), key=mults.count)


def count_vs_fraction(runs: dict[str, Rows], threshold: float = 0.5, count: str = "poisons_seen",
                      n_boot: int = 1000) -> dict[str, Any]:
    """The slope fits on the size axis, the budget axis and both, the binomial model, and one sentence.

    Each fit judges its runs at one horizon of poisons seen (`common_horizon` of the runs it compares):
    within each N that is N (every run of an N sees the same poisons); pooled over N it is the smallest
    N at which success held, and longer runs are judged only that far."""
    poisoned = {k: v for k, v in runs.items() if v and v[-1].get("n_poison")}

    def judged(subset: dict[str, Rows]) -> list[Needed]:
        return needed_per_run(subset, threshold, count, common_horizon(subset, threshold, count))

    own = needed_per_run(poisoned, threshold, count)  # each run at its own end: for the design only
    main = _main_mult(own) if own else 1.0
    budgets: dict[str, set[float]] = defaultdict(set)
    for n in own:
        budgets[n.model].add(n.data_mult)
    by_n: dict[int, dict[str, Rows]] = defaultdict(dict)
    for k, v in poisoned.items():
        by_n[int(v[-1]["n_poison"])][k] = v
    within_n = [n for group in by_n.values() for n in judged(group)]
    size_axis = judged({k: v for k, v in poisoned.items() if float(v[-1].get("data_mult") or 1.0) == main})
    budget_axis = judged({k: v for k, v in poisoned.items() if len(budgets[str(v[-1].get("model"))]) > 1})
    pooled = judged(poisoned)
    fits = {
        "size": {"design": f"model sizes at {main:g}x data", **_horizon(size_axis),
                 **slope_fit(size_axis, n_boot=n_boot)},
        "budget": {"design": "data budgets within a size (an intercept per size)", **_horizon(budget_axis),
                   **slope_fit(budget_axis, per_size=True, n_boot=n_boot)},
        "all": {"design": "every poisoned run", **_horizon(pooled), **slope_fit(pooled, n_boot=n_boot)},
        # compared only within each N, each N at its own horizon (N): the poisons needed can depend on
        # N too (denser poisons), which biases a pooled fit
        "per_n": {"design": "every poisoned run, an intercept per N inserted",
                  **slope_fit(within_n, per_n=True, n_boot=n_boot)},
    }
    return {"threshold": threshold, "count": count, "needed": [asdict(n) for n in within_n],
            "fits": fits, "binomial": binomial_slope(runs, count), "sentence": verdict(fits, threshold)}


def _horizon(needed: Sequence[Needed]) -> dict[str, Any]:
    hs = {n.horizon for n in needed if n.horizon}
    return {"horizon": min(hs)} if len(hs) == 1 else {}


def reading(fit: dict[str, Any]) -> str:
    """What an interval says: count, fraction, both possible, or neither."""
    lo, hi = fit.get("ci") or (None, None)
    if lo is None:
        return "not identified"
    has0, has1 = lo <= 0 <= hi, lo <= 1 <= hi
    if has0 and not has1:
        return "a constant count, not a constant fraction"
    if has1 and not has0:
        return "a constant fraction, not a constant count"
    if has0 and has1:
        return "too wide to tell a constant count from a constant fraction"
    return "neither a constant count nor a constant fraction" + (" (between them)" if lo > 0 and hi < 1
                                                                 else "")


def verdict(fits: dict[str, dict[str, Any]], threshold: float) -> str:
    """One sentence, from the fit within N (else over every run, else the size axis). Within N leads:
    when the poisons needed depend on N as well, the pooled fit is biased (simulated: 23% coverage of
    b = 1), the within-N fit is not (tests/test_count_fraction.py)."""
    fit = next((fits[k] for k in ("per_n", "all") if "slope" in fits.get(k, {})), fits["size"])
    if "slope" not in fit:
        fit = fits["all"]
        return (f"No answer yet: {fit.get('note', 'no fit')} ({fit.get('runs', 0)} poisoned runs, "
                f"{fit.get('censored', 0)} never reached sustained ASR >= {threshold:g}).")
    lo, hi = fit["ci"]
    within = " compared within each N" if fit is fits.get("per_n") else ""
    left = (f"; N = {', '.join(map(str, fit['n_left_out']))} left out: no run succeeded"
            if fit.get("n_left_out") else "")
    return (f"Poisons needed for sustained ASR >= {threshold:g} scale with the clean tokens trained as "
            f"D^b with b = {fit['slope']:.2f} (95% interval {lo:.2f} to {hi:.2f}; {fit['runs']} runs"
            f"{within}, {fit['censored']} censored{left}): {reading(fit)} (b = 0: count; b = 1: fraction).")
