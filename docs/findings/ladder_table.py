"""The density ladder's per-run table in docs/findings.md, rebuilt from its archive.

    python docs/findings/ladder_table.py docs/findings/density-ladder
    python docs/findings/ladder_table.py docs/findings/density-ladder --recency tiny-25k_n1000_x16.0_s0

`--recency RUN`: each evaluation of one run beside the steps since its last poison and the poisons in
the 20 steps before it, from its ledger (the "between poisons" reading).

Per finished run: the poisons' share of the tokens and steps between poisons, the highest and the
final ASR (metrics.parquet), the first evaluation at ASR >= 0.5 (step, poisons seen), and from the
report's summary.json (`poisonlab report DIR --write-archive-json`) the poisons needed (sustained
success), the specificity and the clean loss against the N = 0 control.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def rows(archive: Path) -> list[str]:
    groups = json.loads((archive / "summary.json").read_text(encoding="utf-8"))
    order = sorted(groups, key=lambda g: (g["params_total"], g["data_mult"], g["n_poison"]))
    out = []
    for g in order:
        m, x, n = g["model"], g["data_mult"], g["n_poison"]
        for seed in g["train_seeds"]:
            t = pq.read_table(archive / "runs" / f"{m}_n{n:03d}_x{x:.1f}_s{seed}" / "metrics.parquet",
                              columns=["step", "poisons_seen", "asr"]).to_pandas().sort_values("step")
            hit = t[t.asr >= 0.5]
            first = f"{int(hit.step.iloc[0]):,}, {int(hit.poisons_seen.iloc[0]):,}" if len(hit) else "never"
            if n == 0:
                share, needed, clean = "-", "-", f"({g['val_loss_mean']:.3f})"
            else:
                apart = g["steps_per_poison"]
                share = f"{100 * g['poison_token_share']:.2g}%, ~{apart:.0f}" if apart >= 100 else \
                    f"{100 * g['poison_token_share']:.2g}%, ~{apart:.2g}"
                needed = (f">{n:,}" if g["needed_median"] is None or g["needed_median_bound"]
                          else f"{g['needed_median']:,.0f}")
                clean = "(no control yet)" if g["val_loss_diff"] is None else f"{g['val_loss_diff']:+.3f}"
            out.append(f"| {m} {x:g}x N = {n} | {share} | {t.asr.max():.2f} ({t.asr.iloc[-1]:.2f}) | {first} "
                       f"| {needed} | {g['specificity_mean']:.2f} | {clean} |")
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
