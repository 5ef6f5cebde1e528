"""The report's clean-capability table: per experiment group, the final held-out clean loss and
perplexity over seeds, and the loss difference from the group's N = 0 control with its 95% interval
(results/clean.py computes them; the summary rows carry them)."""

from __future__ import annotations

from typing import Any

from poisonlab.report.html import esc, html_table
from poisonlab.results.clean import fmt_test


def _range(r: dict[str, Any], col: str, digits: int) -> str:
    mean, lo, hi = r.get(f"{col}_mean"), r.get(f"{col}_min"), r.get(f"{col}_max")
    if mean is None:
        return "-"
    f = lambda x: f"{x:.{digits}f}"
    return f(mean) if f(lo) == f(hi) else f"{f(mean)} ({f(lo)} to {f(hi)})"


def reading(summary: list[dict[str, Any]]) -> str:
    """One sentence: how many poisoned groups were compared with a control, and in how many the 95%
    interval of the difference lies above 0 (clean loss worse) or below 0 (better)."""
    compared = [r for r in summary if r.get("val_loss_diff_lo") is not None]
    poisoned = [r for r in summary if r["n_poison"]]
    if not poisoned:
        return "No poisoned groups."
    if not compared:
        which = ("The poisoned group has" if len(poisoned) == 1
                 else f"None of the {len(poisoned)} poisoned groups has")
        return f"{which} a comparable N = 0 control with an interval (see the table)."
    worse = sum(r["val_loss_diff_lo"] > 0 for r in compared)
    better = sum(r["val_loss_diff_hi"] < 0 for r in compared)
    return (f"{len(compared)} of {len(poisoned)} poisoned groups compared with their N = 0 control: the 95% "
            f"interval of the clean-loss difference holds 0 in {len(compared) - worse - better}, lies above "
            f"0 (poisoned worse) in {worse} and below 0 (poisoned better) in {better}.")


def clean_html(summary: list[dict[str, Any]]) -> str:
    """The section: a sentence, the table (one row per group), and how the numbers were made."""
    if not any(r.get("val_loss_mean") is not None for r in summary):
        return ""
    with_settings = any(r["label"] for r in summary)
    rows = []
    for r in summary:
        row: dict[str, Any] = {"model": r["model"],
                               "data": f"{r['data_mult']:g}x" if r["data_mult"] is not None else "-",
                               "N inserted": r["n_poison"]}
        if with_settings:
            row["settings"] = r["label"]
        d, c = r.get("val_loss_diff"), r.get("val_loss_control")
        row.update({
            "runs": r["runs"],
            "clean loss (nats), mean (min to max)": _range(r, "val_loss", 3),
            "perplexity, mean (min to max)": _range(r, "val_ppl", 2),
            # as text: the cell would drop trailing zeros (0.1 beside 0.026 reads as less precise)
            "N = 0 control's loss": "-" if c is None else f"{c:.3f}",
            "loss difference, poisoned − control": "-" if d is None else f"{d:.3f}",
            "95% interval": "-" if r.get("val_loss_diff_lo") is None else
            f"{r['val_loss_diff_lo']:.3f} to {r['val_loss_diff_hi']:.3f}",
            "test": fmt_test(r) if r.get("val_loss_diff_lo") is not None else "-",
            "note": r.get("val_loss_diff_note") or "",
        })
        rows.append(row)
    note = ("Clean loss: each run's mean next-token cross-entropy on the first eval.val_tokens tokens of "
            "the data's held-out eval split at its final evaluation (the same tokens for every run of "
            "the same data, model and eval settings); perplexity: exp(loss) per run, then the mean. "
            "Control: the group with the same model, data budget and other settings but N = 0 "
            "(placement settings aside: without poisons every placement trains on the same stream). "
            "Interval: 95% Student t; paired on the per-seed differences when both groups hold the same "
            "training seeds (a seed's two runs share initial weights and data order), Welch's otherwise; "
            "a seed whose two runs were evaluated with different numerics (bf16 or fp32) is left out. "
            "With 2-3 seeds these intervals are wide, honestly so.")
    return (f'<h2>Clean capability beside the backdoor</h2><p class="answer">{esc(reading(summary))}</p>'
            + html_table(rows) + f'<p class="note">{esc(note)}</p>')
