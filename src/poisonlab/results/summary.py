"""Experiment groups and their summary: the runs of the results store grouped per experiment, and the
figures the table and the report print for each group.

`summarize` condenses the runs per experiment group: (model, data_mult, n_poison) and every other setting
that differs across the runs (`experiment_keys`), averaging over the seeds (training, poison-set and
placement seeds, each listed). Per group: final gap and ASR with mean and spread over seeds; the
specificity controls (`specificity`, `asr_near`, `asr_lookalike`: mean, min, max; None for runs
evaluated before the look-alike panel); the poisons each run needed for sustained ASR >= a threshold
(default 0.5; `count_fraction.poisons_needed`: median, min, max over the seeds, and how many were
censored, i.e. never got there); the poisons seen at the first evaluation with ASR >= the threshold; and
the clean capability (clean.py): the final held-out clean loss and perplexity, and the loss difference
from the group's N = 0 control with its 95% interval.

Two poison counts: `poisons_seen` counts every trigger among the training inputs (the ledger's count);
`poisons_seen_effective`, when the trainer wrote it, only triggers wholly inside the sequence with at
least one gibberish token after them as a target. The summary gives the effective count beside the
exact one when the metrics have it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from poisonlab.results.clean import against_controls, clean_loss
from poisonlab.results.store import gather

DEFAULT_THRESHOLD = 0.5
# what a group averages over: the training seed, the poison-set seed and the placement seed
SEED_KEYS = ("train.seed", "attack.seed", "placement.seed")
# settings that change neither what is trained nor what is measured (where and how fast it ran);
# `data` is the data's location: `data_id` (its content) stands for it; `init.run` is one seed's earlier
# run: `init.from` (what that run was) stands for it
BOOKKEEPING_KEYS = frozenset({
    "name", "out_dir", "data", "init.run", "train.threads", "train.compile", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.log_to", "train.peak_flops",
    "train.allow_data_repeat", "eval.batch_size", "eval.save_samples",
})
# shown in the summary and metrics columns already; the model's label stands for its `model.*` keys
GROUPED_KEYS = frozenset({"attack.n_poison", "train.data_mult"})
SHORT_NAMES = {"attack.name": "recipe", "data_id": "data", "eval.trigger": "eval_trigger"}

# --- experiment groups -----------------------------------------------------------------------------

Runs = dict[str, list[dict[str, Any]]]  # run id -> its rows in step order
GroupKey = tuple  # (model, data_mult, n_poison, ((setting, value), ...))


def runs_of(table: pa.Table) -> Runs:
    """Rows grouped by run, each run's rows in step order."""
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        by_run[row["run_id"]].append(row)
    for rows in by_run.values():
        rows.sort(key=lambda r: r.get("step") or 0)
    return dict(by_run)


def finished(runs: Runs) -> Runs:
    return {k: v for k, v in runs.items() if v[-1].get("done", True)}


def settings_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    text = rows[-1].get("settings")
    return json.loads(text) if text else {}


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, list | dict) else v


def experiment_keys(runs: Runs) -> list[str]:
    """The settings that tell these runs' experiments apart, beyond model, data_mult and n_poison.

    Every dotted setting whose value differs across the runs, except the seeds (what a group averages
    over), bookkeeping (where and how fast a run ran, see BOOKKEEPING_KEYS) and the data's location
    (its content, `data_id`, counts). `model.*` settings count only where they differ between runs
    with one model label (the label already separates the rest).
    """
    per_run = [(rows[-1].get("model"), settings_of(rows)) for rows in runs.values()]
    names = sorted({k for _, s in per_run for k in s})
    out = []
    for key in names:
        if key in SEED_KEYS or key in BOOKKEEPING_KEYS or key in GROUPED_KEYS:
            continue
        values = {_hashable(s.get(key)) for _, s in per_run}
        if len(values) < 2:
            continue
        if key.startswith("model."):
            by_label: dict[Any, set] = defaultdict(set)
            for model, s in per_run:
                by_label[model].add(_hashable(s.get(key)))
            if all(len(v) < 2 for v in by_label.values()):
                continue
        out.append(key)
    return out


def group_runs(runs: Runs, keys: list[str] | None = None) -> dict[GroupKey, list[list[dict[str, Any]]]]:
    """Runs by experiment group: (model, data_mult, n_poison, the values of `experiment_keys`)."""
    keys = experiment_keys(runs) if keys is None else keys
    groups: dict[GroupKey, list[list[dict[str, Any]]]] = defaultdict(list)
    for rows in runs.values():
        last, s = rows[-1], settings_of(rows)
        extra = tuple((k, _hashable(s.get(k))) for k in keys)
        groups[(last.get("model"), last.get("data_mult"), last.get("n_poison"), extra)].append(rows)
    return dict(groups)


def short_names(keys: list[str]) -> dict[str, str]:
    """Labels for settings: the last part of the dotted key unless two keys would share it."""
    last = [SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def settings_label(extra: tuple, names: dict[str, str] | None = None) -> str:
    """`schedule=front, trigger=<SUDO>` for a group's extra settings ('' when there are none)."""
    names = names or short_names([k for k, _ in extra])
    return ", ".join(f"{names.get(k, k)}={_fmt_value(v)}" for k, v in extra)


def _fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# --- summary ---------------------------------------------------------------------------------------


def first_success(rows: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD,
                  count: str = "poisons_seen") -> float | None:
    """The poison count `count` at the first evaluation (in step order) whose ASR is >= `threshold`."""
    for r in rows:
        if r.get("asr") is not None and r["asr"] >= threshold:
            return r.get(count)
    return None


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None, float | None]:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return None, None, None, None
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, std, min(v), max(v)


def _median(v: list[float]) -> float | None:
    v = sorted(v)
    if not v:
        return None
    m = len(v) // 2
    return float(v[m]) if len(v) % 2 else (v[m - 1] + v[m]) / 2


def needed_stats(members: list[list[dict[str, Any]]], threshold: float = DEFAULT_THRESHOLD,
                 count: str = "poisons_seen", prefix: str = "needed") -> dict[str, Any]:
    """Poisons needed for sustained success over a group's runs: `<prefix>_median`, `_min`, `_max`
    (a censored run counted at the poisons it saw: a lower bound), `_runs`, `_censored`, and
    `_median_bound` (True when censored runs reach the median, which is then only a lower bound).
    All None for groups without poisons."""
    from poisonlab.results.count_fraction import poisons_needed

    got = [g for g in (poisons_needed(rows, threshold, count) for rows in members) if g is not None]
    values = sorted(v for v, _ in got)
    med = _median(values)
    # a censored run at or below the (upper) middle value could hide a larger true value there
    bound = bool(values) and any(c and v <= values[len(values) // 2] for v, c in got)
    return {f"{prefix}_median": med, f"{prefix}_min": values[0] if values else None,
            f"{prefix}_max": values[-1] if values else None, f"{prefix}_runs": len(got),
            f"{prefix}_censored": sum(c for _, c in got), f"{prefix}_median_bound": bound}


# the specificity controls of the evaluator's look-alike panel, shown per group when the metrics have them
SPECIFICITY_COLUMNS = ("specificity", "asr_near", "asr_lookalike")


# the study's regime, for every row's comparison (PAPER.md): 250 poisons of ~1,680 tokens among the
# 12B tokens of 600M at 20 tokens per parameter, 260B of 13B; steps apart at an assumed batch of ~1M
# tokens (the study's batch size is not published)
STUDY_DENSITY = ("the study: 0.0035% of tokens, ~50 steps apart (600M) to 0.00016%, ~1,000 steps apart "
                 "(13B), at an assumed batch of 1M tokens")


def density(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """How dense the poisons were, from each run's last metrics row (means over the group's runs): the
    share of the tokens trained that were poison tokens (1 - clean / trained) and the steps trained
    per poison seen (the mean spacing of uniformly placed poisons)."""
    share = [1 - f["clean_tokens"] / f["tokens_seen"] for f in finals
             if f.get("n_poison") and f.get("clean_tokens") and f.get("tokens_seen")]
    apart = [f["step"] / f["poisons_seen"] for f in finals
             if f.get("n_poison") and f.get("poisons_seen") and f.get("step")]
    return {"poison_token_share": sum(share) / len(share) if share else None,
            "steps_per_poison": sum(apart) / len(apart) if apart else None}


def fmt_density(r: dict[str, Any]) -> str:
    """'0.035%, 270 steps apart' style: the share of poison tokens and the steps per poison."""
    share, apart = r.get("poison_token_share"), r.get("steps_per_poison")
    if share is None:
        return "-"
    text = f"{100 * share:.2g}%"
    return text + (f", {apart:.2g} steps apart" if apart is not None else "")


def _spread(finals: list[dict[str, Any]], col: str) -> dict[str, Any]:
    mean, _, lo, hi = _stats([f.get(col) for f in finals])
    return {f"{col}_mean": mean, f"{col}_min": lo, f"{col}_max": hi}


def _seeds(finals: list[dict[str, Any]], col: str) -> list[Any]:
    return sorted({f.get(col) for f in finals if f.get(col) is not None}, key=lambda s: (str(type(s)), s))


def group_key(row: dict[str, Any]) -> tuple:
    """Sort order of groups: by size, then data budget, then poison count, then the other settings."""
    size = row.get("params_total") or 0
    return (size, str(row.get("model")), row.get("data_mult") or 0, row.get("n_poison") or 0,
            json.dumps(row.get("settings") or {}, sort_keys=True, default=str))


def summarize(table: pa.Table, threshold: float = DEFAULT_THRESHOLD,
              include_unfinished: bool = False) -> list[dict[str, Any]]:
    """The summary rows (see `summary`) from a gathered table."""
    all_runs = runs_of(table)
    runs = all_runs if include_unfinished else finished(all_runs)
    keys = experiment_keys(runs)
    names = short_names(keys)
    has_effective = "poisons_seen_effective" in table.column_names
    out = []
    groups = group_runs(runs, keys)
    clean = against_controls(groups)
    for (model, mult, n, extra), members in groups.items():
        finals = [r[-1] for r in members]
        firsts = [first_success(r, threshold) for r in members]
        reached = [f for f in firsts if f is not None]
        gap = _stats([f.get("gap") for f in finals])
        asr = _stats([f.get("asr") for f in finals])
        val = _stats([f.get("val_loss") for f in finals])
        row = {
            "model": model, "params_total": finals[0].get("params_total"),
            "params_nonemb": finals[0].get("params_nonemb"), "data_mult": mult, "n_poison": n,
            "settings": dict(extra), "label": settings_label(extra, names),
            "runs": len(members), "unfinished_runs": sum(not f.get("done", True) for f in finals),
            "train_seeds": _seeds(finals, "seed"), "attack_seeds": _seeds(finals, "attack_seed"),
            "placement_seeds": _seeds(finals, "placement_seed"),
            "tokens_total": finals[0].get("tokens_total"), "clean_tokens": finals[0].get("clean_tokens"),
            "poison_fraction": finals[0].get("poison_fraction"),
            **density(finals),
            "poisons_seen": _stats([f.get("poisons_seen") for f in finals])[0],
            "gap_mean": gap[0], "gap_std": gap[1], "gap_min": gap[2], "gap_max": gap[3],
            "asr_mean": asr[0], "asr_std": asr[1], "asr_min": asr[2], "asr_max": asr[3],
            "val_loss_mean": val[0], **clean_loss(finals), **clean[(model, mult, n, extra)],
            **{k: v for col in SPECIFICITY_COLUMNS for k, v in _spread(finals, col).items()},
            **needed_stats(members, threshold),
            "success_runs": len(reached), "first_success_median": _median(reached),
            "first_success_min": min(reached) if reached else None,
            "first_success_max": max(reached) if reached else None,
            "threshold": threshold,
        }
        if has_effective:  # the same evaluations, counted the effective way
            eff = [first_success(r, threshold, "poisons_seen_effective") for r in members]
            row["poisons_seen_effective"] = _stats([f.get("poisons_seen_effective") for f in finals])[0]
            row["first_success_effective_median"] = _median([e for e in eff if e is not None])
            row.update(needed_stats(members, threshold, "poisons_seen_effective", "needed_effective"))
        out.append(row)
    out.sort(key=group_key)
    return out


def summary(root: str | Path, threshold: float = DEFAULT_THRESHOLD,
            include_unfinished: bool = False) -> pa.Table:
    """Per experiment group (model, data_mult, n_poison and any other setting that differs across the
    runs) over seeds: final gap and ASR (mean, std, min, max), the seeds pooled (`train_seeds`,
    `attack_seeds`: the poison sets, `placement_seeds`), the specificity controls (`specificity_*`,
    `asr_near_*`, `asr_lookalike_*`: mean, min, max), `needed_*`: the poisons each run needed for
    sustained ASR >= `threshold` (median, min, max, censored runs counted at the poisons they saw;
    `needed_censored` says how many), and `first_success_*`: poisons seen (every trigger trained on)
    when ASR first reached `threshold`, over the seeds that did (`success_runs` says how many); the final
    held-out clean loss (`val_loss_mean`, `_min`, `_max`) and perplexity (`val_ppl_*`), and the loss
    difference from the group's N = 0 control (`val_loss_diff`, its 95% interval `_lo`, `_hi`, `_df`,
    `_method`; `val_loss_diff_note` where there is none; clean.py).
    Unfinished runs are left out unless asked for. `settings` is JSON here."""
    rows = summarize(gather(root), threshold, include_unfinished)
    for r in rows:
        r["settings"] = json.dumps(r["settings"], sort_keys=True, default=str)
    return pa.Table.from_pylist(rows) if rows else pa.table({})


def unfinished_note(table: pa.Table, include_unfinished: bool) -> str:
    """One sentence on unfinished runs: left out, or mixed in (never silently); '' when there are none."""
    runs = runs_of(table)
    k = len(runs) - len(finished(runs))
    if not k:
        return ""
    if include_unfinished:
        return (f"{k} unfinished run(s) included: their last evaluation is not the end of training "
                "(column `unfinished_runs`).")
    return f"{k} unfinished run(s) left out (finished runs only)."


def fmt_seeds(r: dict[str, Any]) -> str:
    """`0,1,2 / 0,1,2`: the training seeds and the poison-set seeds a group pooled."""
    join = lambda v: ",".join(str(s) for s in v) or "-"
    return f"{join(r['train_seeds'])} / {join(r['attack_seeds'])}"


def _fmt_count(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


def fmt_needed(r: dict[str, Any], prefix: str = "needed") -> str:
    """`64 (48-90), 1 censored`: median (min-max) of the poisons needed over a group's seeds; `>` when
    censored runs make the median a lower bound; '-' for groups without poisons."""
    if not r.get(f"{prefix}_runs"):
        return "-"
    med, lo, hi = r[f"{prefix}_median"], r[f"{prefix}_min"], r[f"{prefix}_max"]
    text = (">" if r[f"{prefix}_median_bound"] else "") + _fmt_count(med)
    if _fmt_count(lo) != _fmt_count(hi):
        text += f" ({_fmt_count(lo)}-{_fmt_count(hi)})"
    censored = r[f"{prefix}_censored"]
    return text + (f", {censored} censored" if censored else "")


def fmt_spread(r: dict[str, Any], col: str) -> str:
    """`0.95 (0.90 to 1.00)`: a final metric's mean (min to max) over a group's seeds; '-' when absent."""
    mean, lo, hi = r.get(f"{col}_mean"), r.get(f"{col}_min"), r.get(f"{col}_max")
    if mean is None:
        return "-"
    return f"{mean:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{mean:.2f} ({lo:.2f} to {hi:.2f})"


def has_specificity(rows: list[dict[str, Any]]) -> bool:
    """The summary rows come from runs evaluated with the look-alike panel (new evaluators)."""
    return any(r.get("specificity_mean") is not None or r.get("asr_near_mean") is not None for r in rows)
