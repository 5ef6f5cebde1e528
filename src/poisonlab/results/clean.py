"""Clean capability beside the backdoor: each experiment group's final held-out clean loss and
perplexity, and its difference from the N = 0 control of the same experiment, with a 95% interval.

The number is `val_loss`, which the evaluator writes at every evaluation: the mean next-token
cross-entropy (nats) on the first `eval.val_tokens` tokens of the data's eval split (documents held out
of training), packed into rows of the model's context. It depends only on the weights, the data, the
model's context and eval.val_tokens, so every run of the same data, model and eval settings is scored
on the same tokens; perplexity is exp(loss). A group's figures are over its runs' final evaluations.

The control of a group is the group with the same model, data budget and every other setting but
N = 0. Placement settings (`placement.*`) do not count: with no poisons, the training stream is the
same under every placement (tests/test_clean_capability.py checks it), so the ordering sweep's single
N = 0 control serves every schedule. A comparison is made only like for like: every run of both groups
ends at the same step, and the runs compared were evaluated with the same numerics (`eval_numerics`,
`eval_dtype`: on CPUs with bf16 support, train.dtype auto trains and evaluates under bf16 autocast, so
one seed of a sweep may differ from another); otherwise the note says why not.

The interval (95%, Student t, since sweeps have 2-5 seeds, where a normal or bootstrap interval is far
too narrow):

- paired: both groups hold the same training seeds, each once (at least two). A seed's poisoned run and
  its control start from the same weights and clean data order, so the interval is over the per-seed
  differences d_s: mean(d) +- t(0.975, n - 1) sd(d) / sqrt(n). A seed whose two runs were evaluated
  with different numerics is left out (and named);
- Welch: otherwise, with at least two runs in each group: the difference of the means, with the
  Welch-Satterthwaite degrees of freedom (no equal-variance assumption);
- none: a group with a single run gives the difference alone.

Both are tested for coverage on simulated seeds with the spread of the archived sweeps' val_loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# settings that do nothing when no poison is inserted: ignored when looking for a group's N = 0 control
NO_EFFECT_AT_ZERO = ("placement.",)
LEVEL = 0.95


def _values(finals: list[dict[str, Any]], col: str) -> list[float]:
    out = []
    for f in finals:
        v = f.get(col)
        if v is not None and not math.isnan(float(v)):
            out.append(float(v))
    return out


def clean_loss(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """A group's final held-out clean loss and perplexity over its runs: `val_loss_min`, `_max` (the mean
    is the summary's `val_loss_mean`) and `val_ppl_mean`, `_min`, `_max` (perplexity = exp(loss) of each
    run, then the mean over runs)."""
    v = _values(finals, "val_loss")
    if not v:
        return dict.fromkeys(("val_loss_min", "val_loss_max", "val_ppl_mean", "val_ppl_min", "val_ppl_max"))
    ppl = [math.exp(x) for x in v]
    return {"val_loss_min": min(v), "val_loss_max": max(v), "val_ppl_mean": sum(ppl) / len(ppl),
            "val_ppl_min": min(ppl), "val_ppl_max": max(ppl)}


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, lo, hi, df) of the t interval for the mean of paired differences (at least two)."""
    from scipy import stats

    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, float(n - 1)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL
                   ) -> tuple[float, float, float, float]:
    """(mean(a) - mean(b), lo, hi, df) of Welch's t interval (at least two values in each)."""
    from scipy import stats

    n1, n2 = len(a), len(b)
    m1, m2 = sum(a) / n1, sum(b) / n2
    v1 = sum((x - m1) ** 2 for x in a) / (n1 - 1) / n1
    v2 = sum((x - m2) ** 2 for x in b) / (n2 - 1) / n2
    diff = m1 - m2
    if v1 + v2 == 0:  # no spread at all (identical runs): the interval is the point
        return diff, diff, diff, float(n1 + n2 - 2)
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(v1 + v2)
    return diff, diff - half, diff + half, df


def _paired_seeds(poisoned: list[dict[str, Any]], control: list[dict[str, Any]]) -> list[Any] | None:
    """The training seeds the two groups share, when they pair up: the same seeds, each once, two or more."""
    ps, cs = [f.get("seed") for f in poisoned], [f.get("seed") for f in control]
    if None in ps or len(set(ps)) != len(ps) or len(set(cs)) != len(cs) or set(ps) != set(cs) or len(ps) < 2:
        return None
    return sorted(ps, key=lambda s: (str(type(s)), s))


def numerics(final: dict[str, Any]) -> str:
    """How a run was evaluated (and, on CPU, trained: train.dtype auto picks bf16 autocast where the CPU
    has it): its `eval_numerics` and `eval_dtype`. A row from before `eval_numerics` was recorded that
    says float32 was evaluated without autocast, on the weights training keeps in float32, which is what
    today's rows call "float32 weights"; an older bfloat16 row stays unknown (autocast over float32
    weights, or a sharded run's bfloat16 copy)."""
    label, dtype = final.get("eval_numerics"), final.get("eval_dtype")
    if not label and dtype == "float32":
        label = "float32 weights"
    return f"{label or 'weights as stored'}, {dtype or '?'}"


def difference(poisoned: list[dict[str, Any]], control: list[dict[str, Any]], col: str = "val_loss",
               level: float = LEVEL) -> dict[str, Any]:
    """The poisoned group's `col` minus its control's, over their runs' final rows (each with `seed`, the
    training seed, and the evaluation's numerics): `diff`, `lo`, `hi`, `df`, `method` ('paired t',
    'Welch t', or None: a group with one run, no interval) and `note` (None, or what was left out), or
    `unlike`: why the groups are not comparable.

    Like for like: paired seeds whose two runs were evaluated with different numerics are left out (the
    pairs left need not share numerics with each other: each difference compares like with like); an
    unpaired comparison needs one numerics for every run."""
    seeds = _paired_seeds(poisoned, control)
    if seeds is not None:
        p = {f["seed"]: f for f in poisoned}
        c = {f["seed"]: f for f in control}
        keep = [s for s in seeds if numerics(p[s]) == numerics(c[s])]
        dropped = [s for s in seeds if s not in keep]
        note = (f"seed{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))} left out: "
                "its runs were evaluated with different numerics") if dropped else None
        if len(keep) >= 2:
            diff, lo, hi, df = paired_interval([float(p[s][col]) - float(c[s][col]) for s in keep], level)
            return {"diff": diff, "lo": lo, "hi": hi, "df": df, "method": "paired t", "note": note}
        return {"unlike": "the runs of fewer than two seeds were evaluated with the same numerics"}
    kinds = sorted({numerics(f) for f in poisoned + control})
    if len(kinds) > 1:
        return {"unlike": "evaluated with different numerics (" + "; ".join(kinds) + ")"}
    a, b = _values(poisoned, col), _values(control, col)
    if len(a) >= 2 and len(b) >= 2:
        diff, lo, hi, df = welch_interval(a, b, level)
        return {"diff": diff, "lo": lo, "hi": hi, "df": df, "method": "Welch t", "note": None}
    diff = sum(a) / len(a) - sum(b) / len(b)
    return {"diff": diff, "lo": None, "hi": None, "df": None, "method": None,
            "note": "no interval: a group with one run"}


def unlike(poisoned: list[dict[str, Any]], control: list[dict[str, Any]]) -> str | None:
    """Why the two groups' clean losses cannot be compared at all (None: they can): a run without
    val_loss, or runs whose final evaluations are at different steps (another budget, or unfinished)."""
    both = poisoned + control
    if len(_values(both, "val_loss")) < len(both):
        return "val_loss missing in some runs"
    steps = sorted({f.get("step") for f in both}, key=str)
    if len(steps) > 1:
        return "final evaluations at different steps (" + ", ".join(map(str, steps)) + ")"
    return None


def _control_key(key: tuple) -> tuple:
    model, mult, _n, extra = key
    return (model, mult, 0, tuple((k, v) for k, v in extra if not k.startswith(NO_EFFECT_AT_ZERO)))


EMPTY = {"val_loss_control": None, "val_loss_control_runs": None, "val_loss_diff": None,
         "val_loss_diff_lo": None, "val_loss_diff_hi": None, "val_loss_diff_df": None,
         "val_loss_diff_method": None, "val_loss_diff_note": None}


def against_controls(groups: dict[tuple, list[list[dict[str, Any]]]]) -> dict[tuple, dict[str, Any]]:
    """Per group key (model, data_mult, n_poison, extra settings; `summary.group_runs`), the clean-loss
    comparison with its N = 0 control: `val_loss_control` (the control's mean) and `_control_runs`,
    `val_loss_diff` (poisoned minus control) with `_lo`, `_hi` (95% interval), `_df`, `_method`,
    and `val_loss_diff_note` where there is no comparison ('N = 0 control' for the controls
    themselves, 'no N = 0 control', or why the control is not comparable)."""
    controls: dict[tuple, list[tuple]] = {}
    for key in groups:
        if key[2] == 0:
            controls.setdefault(_control_key(key), []).append(key)
    out = {}
    for key, members in groups.items():
        row = dict(EMPTY)
        out[key] = row
        if key[2] == 0:
            row["val_loss_diff_note"] = "N = 0 control"
            continue
        found = controls.get(_control_key(key), [])
        if not found:
            row["val_loss_diff_note"] = "no N = 0 control"
            continue
        # an exact match first; else the one with most runs (all differ in placement only, a no-op at N = 0)
        ckey = key[:2] + (0,) + key[3:] if key[:2] + (0,) + key[3:] in found else max(
            found, key=lambda k: (len(groups[k]), str(k)))
        poisoned, control = [r[-1] for r in members], [r[-1] for r in groups[ckey]]
        losses = _values(control, "val_loss")
        row["val_loss_control"] = sum(losses) / len(losses) if losses else None
        row["val_loss_control_runs"] = len(control)
        d = {"unlike": unlike(poisoned, control)}
        if not d["unlike"]:
            d = difference(poisoned, control)
        if d.get("unlike"):
            row["val_loss_diff_note"] = f"N = 0 control not comparable: {d['unlike']}"
            continue
        row.update(val_loss_diff=d["diff"], val_loss_diff_lo=d["lo"], val_loss_diff_hi=d["hi"],
                   val_loss_diff_df=d["df"], val_loss_diff_method=d["method"], val_loss_diff_note=d["note"])
    return out


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("+0.000", "0.000").replace("-0.000", "0.000")


def fmt_test(r: dict[str, Any]) -> str:
    """`paired t, 3 seeds` or `Welch t, 3 vs 2 runs`: how a group's interval was made."""
    if r.get("val_loss_diff_method") == "paired t":
        return f"paired t, {int(r['val_loss_diff_df']) + 1} seeds"
    return f"Welch t, {r['runs']} vs {r['val_loss_control_runs']} runs"


def fmt_clean_diff(r: dict[str, Any]) -> str:
    """`+0.012 (-0.041 to +0.065), paired t, 3 seeds`: the clean-loss difference from the N = 0 control
    with its 95% interval and test; the note where there is none ('N = 0 control', 'no N = 0 control',
    ...) or where a seed was left out."""
    d = r.get("val_loss_diff")
    note = r.get("val_loss_diff_note")
    if d is None:
        return note or "-"
    if r.get("val_loss_diff_lo") is None:
        return f"{_signed(d)} ({note})"
    lo, hi = _signed(r["val_loss_diff_lo"]), _signed(r["val_loss_diff_hi"])
    text = f"{_signed(d)} ({lo} to {hi}), {fmt_test(r)}"
    return text + (f"; {note}" if note else "")


def fmt_clean_loss(r: dict[str, Any]) -> str:
    """`2.351 (2.321 to 2.613), ppl 10.5`: the final clean loss, mean (min to max) over seeds, and the
    mean perplexity; '-' without val_loss."""
    mean, lo, hi = r.get("val_loss_mean"), r.get("val_loss_min"), r.get("val_loss_max")
    if mean is None:
        return "-"
    text = f"{mean:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{mean:.3f} ({lo:.3f} to {hi:.3f})"
    return text + f", ppl {r['val_ppl_mean']:.3g}"
