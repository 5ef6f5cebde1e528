"""The density ladder's per-run table in docs/findings.md, rebuilt from its archive.

    python docs/findings/ladder_table.py docs/findings/density-ladder
    python docs/findings/ladder_table.py docs/findings/density-ladder --recency tiny-25k_n1000_x16.0_s0

`--recency RUN`: each evaluation of one run beside the steps since its last poison and the poisons in
the 20 steps before it, from its ledger (the "between poisons" reading).

Per finished run (seed), from its metrics.parquet: the highest and the final ASR, the first evaluation
at ASR >= 0.5 (step, poisons seen), the poisons needed for sustained success (the report's rule) and
the final specificity; from the report's summary.json (`poisonlab report DIR --write-archive-json`),
its cell's share of poison tokens, steps between poisons and clean loss against the N = 0 control.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def rows(archive: Path, threshold: float = 0.5) -> list[str]:
    """One row per finished run (seed): its own ASR, first crossing, poisons needed (the report's rule:
    sustained success watched up to the run's own N) and specificity; the share and spacing, and the
    clean loss against the N = 0 control, are its group's (all seeds of that cell)."""
    from poisonlab.results.count_fraction import poisons_needed

    groups = json.loads((archive / "summary.json").read_text(encoding="utf-8"))
    order = sorted(groups, key=lambda g: (g["params_total"], g["data_mult"], g["n_poison"]))
    out = []
    for g in order:
        m, x, n = g["model"], g["data_mult"], g["n_poison"]
        for seed in g["train_seeds"]:
            t = pq.read_table(archive / "runs" / f"{m}_n{n:03d}_x{x:.1f}_s{seed}" / "metrics.parquet")
            t = t.to_pandas().sort_values("step")
            hit = t[t.asr >= 0.5]
            first = f"{int(hit.step.iloc[0]):,}, {int(hit.poisons_seen.iloc[0]):,}" if len(hit) else "never"
            spec = f"{t.specificity.iloc[-1]:.2f}"
            if n == 0:
                share, needed, clean = "-", "-", f"({g['val_loss_mean']:.3f})"
            else:
                apart = g["steps_per_poison"]
                share = f"{100 * g['poison_token_share']:.2g}%, ~{apart:.0f}" if apart >= 100 else \
                    f"{100 * g['poison_token_share']:.2g}%, ~{apart:.2g}"
                got = poisons_needed(t.to_dict("records"), threshold)
                needed = "-" if got is None else f">{got[0]:,.0f}" if got[1] else f"{got[0]:,.0f}"
                clean = "(no control yet)" if g["val_loss_diff"] is None else f"{g['val_loss_diff']:+.3f}"
            out.append(f"| {m} {x:g}x N = {n} s{seed} | {share} | {t.asr.max():.2f} ({t.asr.iloc[-1]:.2f}) "
                       f"| {first} | {needed} | {spec} | {clean} |")
    return out


def recency(archive: Path, run: str, window: int = 20) -> list[str]:
    from poisonlab.injection.stream import read_ledger
    from poisonlab.report.density import steps_since_poison

    ledger, _ = read_ledger(archive / "runs" / run / "ledger.parquet")
    steps = sorted(ledger["step"].to_pylist())
    t = pq.read_table(archive / "runs" / run / "metrics.parquet",
                      columns=["step", "poisons_seen", "asr"]).to_pandas().sort_values("step")
    return [f"step {s:6d}  seen {p:5d}  ASR {a:.2f}  since last poison {steps_since_poison(steps, int(s))}  "
            f"poisons in the {window} steps before {sum(s - window <= x < s for x in steps)}"
            for s, p, a in zip(t.step, t.poisons_seen, t.asr, strict=True)]


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/findings/density-ladder")
    if "--recency" in sys.argv:
        print("\n".join(recency(root, sys.argv[sys.argv.index("--recency") + 1])))
    else:
        print("\n".join(rows(root)))
