"""The summary rows (`results.summarize`) as terminal tables: what `poisonlab results` and the demo print.

`compact_table` is the default: the figures a reader needs first (model, data budget, N, runs, final
ASR with its spread over seeds, gap, the highest unrelated look-alike's ASR, the poisons needed), in
under 100 columns for the archived sweeps (which leaves no room for the clean loss). `wide_table` is
every column (`--wide`), and `clean_table` beside it the clean capability: each group's held-out clean
loss and its difference from the N = 0 control with the 95% interval; `--json` every figure of every
row.
"""

from __future__ import annotations

from typing import Any

from poisonlab.results.clean import fmt_test
from poisonlab.results.summary import (
    DEFAULT_THRESHOLD,
    fmt_density,
    fmt_needed,
    fmt_seeds,
    fmt_spread,
    has_specificity,
)

COMPACT_WIDTH = 100  # the terminal width the default table is made for (tested on the archived sweeps)


CLEAN_TITLE = ("Clean capability: final held-out clean loss (nats) and perplexity, mean (min-max) over "
               "seeds; difference = poisoned minus the N = 0 control of the same model, budget and "
               "settings, with its 95% t interval (paired over seeds, or Welch)")

INLINE_SETTINGS = 24  # longer settings labels go to a legend under the table, keyed a, b, c, ...


def compact_table(rows: list[dict[str, Any]], title: str = "") -> Any:
    """A rich table of the summary rows in under 100 columns (the default of `poisonlab results`).

    Figures never wrap and are never cut (each column is at least as wide as its widest cell); only the
    poisons-needed cell may break before its censored count. Settings labels longer than
    INLINE_SETTINGS characters become keys with a legend in the caption."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    thr = rows[0]["threshold"] if rows else DEFAULT_THRESHOLD
    labels = list(dict.fromkeys(r["label"] for r in rows if r["label"]))
    inline = all(len(s) <= INLINE_SETTINGS for s in labels)
    keys = {s: (s if inline else _key(i)) for i, s in enumerate(labels)}
    counts = {(r["runs"], r["unfinished_runs"]) for r in rows}
    with_runs = len(counts) > 1 or any(u for _, u in counts)
    unrelated = "unrelated ASR" if has_specificity(rows) else "look-alike ASR"
    header = ["model", "data", "N"] + (["settings"] if labels else []) + (["runs"] if with_runs else [])
    header += ["final ASR", "gap", unrelated, f"needed, ASR>={thr:g}", "poisons"]
    body = []
    for r in rows:
        mult = "-" if r["data_mult"] is None else f"{r['data_mult']:g}x"
        cells = [str(r["model"]), mult, str(r["n_poison"])]
        cells += [keys.get(r["label"], "")] if labels else []
        cells += [str(r["runs"]) + (f" ({r['unfinished_runs']} unfinished)" if r["unfinished_runs"] else "")
                  ] if with_runs else []
        cells += [fmt_range(r, "asr"), fmt_gap(r["gap_mean"]), fmt_range(r, "asr_lookalike"), fmt_needed(r),
                  fmt_share(r)]
        body.append(cells)
    legend = [] if inline else [f"{k}: {s}" for s, k in keys.items()]
    runs_note = "" if with_runs or not rows else f"{rows[0]['runs']} runs per row; "
    t = Table(title=escape(title) if title else None, title_justify="left",
              caption=escape(compact_caption(rows, runs_note, legend)), caption_justify="left",
              box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for i, col in enumerate(header):
        widest = max((len(c[i]) for c in body), default=0)
        if col.startswith("needed"):  # may break before ", k censored", never inside a figure
            widest = max((len(c[i].split(", ")[0]) for c in body), default=0)
        wraps = col == "settings" or col.startswith("needed")
        t.add_column(col, justify="left" if i == 0 or col == "settings" else "right",  # type: ignore[arg-type]
                     no_wrap=not wraps, min_width=None if col == "settings" else widest,
                     overflow="fold")
    for cells in body:
        t.add_row(*(escape(c) for c in cells))
    return t


def fmt_share(r: dict[str, Any]) -> str:
    """'0.035% /270': the poison tokens' share of the tokens trained and the steps per poison."""
    share, apart = r.get("poison_token_share"), r.get("steps_per_poison")
    if share is None:
        return "-"
    return f"{100 * share:.2g}%" + ("" if apart is None else f" /{apart:.2g}")


def _key(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[i] if i < 26 else letters[i // 26 - 1] + letters[i % 26]


def compact_caption(rows: list[dict[str, Any]], runs_note: str = "", legend: list[str] | None = None) -> str:
    """What the compact table's cells mean, where the rest is, and the settings legend."""
    thr = rows[0]["threshold"] if rows else DEFAULT_THRESHOLD
    unrelated = ("Unrelated: the highest ASR among the look-alikes in the trigger's shape with other "
                 "letters and ordinary words" if has_specificity(rows)
                 else "Look-alike: ASR with the look-alike trigger")
    text = (f"Final evaluation; {runs_note}mean (min-max) over seeds. Gap: mean triggered minus mean clean "
            f"perplexity. {unrelated}. Needed: poisons seen when ASR >= {thr:g} became sustained, median "
            "(min-max); '>' a lower bound where seeds never got there (censored). Poisons: their share of "
            "the tokens trained / training steps per poison (the study's: 0.0035% / ~50 at 600M, at an "
            "assumed 1M-token batch). Every column, and the clean held-out loss against the N = 0 "
            "control: --wide; every figure: --json.")
    return "\n".join([*(legend or []), text])


def fmt_range(r: dict[str, Any], col: str) -> str:
    """`0.86 (0.84-0.89)`: a share's mean (min-max) over a group's seeds; the mean alone when they agree
    to 2 decimals; '-' when absent. For shares (0..1) only: a minus sign would read as the dash."""
    mean, lo, hi = r.get(f"{col}_mean"), r.get(f"{col}_min"), r.get(f"{col}_max")
    if mean is None:
        return "-"
    return f"{mean:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{mean:.2f} ({lo:.2f}-{hi:.2f})"


def fmt_gap(x: float | None) -> str:
    """`1,286` or `8.1`: a perplexity gap, whole above 100."""
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"


def wide_table(rows: list[dict[str, Any]], title: str = "") -> Any:
    """A rich table of the summary rows with every column (`poisonlab results --wide`)."""
    from rich.table import Table

    thr = rows[0]["threshold"] if rows else DEFAULT_THRESHOLD
    with_settings = any(r["label"] for r in rows)
    with_effective = any(r.get("poisons_seen_effective") is not None for r in rows)
    with_panel = has_specificity(rows)
    t = Table(title=title or None, title_justify="left")
    cols = [("model", "left"), ("non-emb. params", "right"), ("data", "right"), ("N", "right")]
    cols += [("settings", "left")] if with_settings else []
    cols += [("runs", "right"), ("seeds train / poison", "right"), ("final gap", "right"),
             ("final ASR", "right")]
    cols += [("specificity", "right"), ("near ASR", "right")] if with_panel else []
    cols += [("look-alike", "right"), ("val loss", "right"), (f"needed for ASR>={thr:g}", "right")]
    cols += [("needed, effective", "right")] if with_effective else []
    cols += [(f"first ASR>={thr:g} at", "right"), ("poison tokens, spacing", "right")]
    for col, just in cols:
        # numbers wrap, never end in an ellipsis: a cut figure reads as a different one
        t.add_column(col, justify=just, no_wrap=col == "model", overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        fs = "never" if r["success_runs"] == 0 else (
            f"{_fmt(r['first_success_median'], 0)} ({r['success_runs']}/{r['runs']})")
        runs = str(r["runs"]) + (f" ({r['unfinished_runs']} unfinished)" if r["unfinished_runs"] else "")
        cells = [str(r["model"]), _fmt_params(r["params_nonemb"]), f"{_fmt(r['data_mult'], 1)}x",
                 str(r["n_poison"])]
        cells += [r["label"]] if with_settings else []
        cells += [runs, fmt_seeds(r), f"{_fmt(r['gap_mean'], 1)} ± {_fmt(r['gap_std'], 1)}",
                  f"{_fmt(r['asr_mean'])} ± {_fmt(r['asr_std'])}"]
        cells += [fmt_spread(r, "specificity"), fmt_spread(r, "asr_near")] if with_panel else []
        cells += [fmt_spread(r, "asr_lookalike"), _fmt(r["val_loss_mean"]), fmt_needed(r)]
        cells += [fmt_needed(r, "needed_effective")] if with_effective else []
        cells += [fs, fmt_density(r)]
        t.add_row(*cells)
    return t


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_params(p: Any) -> str:
    if not p:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if p >= div:
            return f"{p / div:.3g}{unit}"
    return str(p)


def clean_table(rows: list[dict[str, Any]], title: str = "") -> Any:
    """A rich table of each group's clean capability (`poisonlab results --wide` prints it under the wide
    table): the final held-out clean loss and perplexity, mean (min-max) over seeds, the N = 0
    control's loss, and the difference (poisoned minus control) with its 95% interval and test, or why
    there is none (results/clean.py)."""
    from rich.markup import escape
    from rich.table import Table

    with_settings = any(r["label"] for r in rows)
    t = Table(title=escape(title) if title else None, title_justify="left")
    cols = ["model", "data", "N"] + (["settings"] if with_settings else []) + [
        "runs", "clean loss", "ppl", "N = 0 loss", "difference", "95% interval", "test"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "settings", "test") else "right",
                     no_wrap=col not in ("settings", "test"))
    for r in rows:
        mult = "-" if r["data_mult"] is None else f"{r['data_mult']:g}x"
        cells = [str(r["model"]), mult, str(r["n_poison"])] + ([r["label"]] if with_settings else [])
        d, lo = r.get("val_loss_diff"), r.get("val_loss_diff_lo")
        note = r.get("val_loss_diff_note") or ""
        cells += [str(r["runs"]), _fmt_range(r, "val_loss", _loss), _fmt_range(r, "val_ppl", _ppl),
                  _fmt(r.get("val_loss_control"), 3), "-" if d is None else f"{d:+.3f}",
                  "-" if lo is None else f"{lo:+.3f} to {r['val_loss_diff_hi']:+.3f}",
                  (fmt_test(r) + (f"; {note}" if note else "")) if lo is not None else note]
        t.add_row(*(escape(c) for c in cells))
    return t


def _loss(x: float) -> str:
    return f"{x:.3f}"


def _ppl(x: float) -> str:
    """Three significant figures, trailing zeros kept: 121, 52.7, 4.60."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _fmt_range(r: dict[str, Any], col: str, f: Any) -> str:
    """`2.351 (2.321-2.613)`: mean (min-max) over a group's seeds, each by `f`; the mean alone when they
    agree."""
    mean, lo, hi = r.get(f"{col}_mean"), r.get(f"{col}_min"), r.get(f"{col}_max")
    if mean is None:
        return "-"
    return f(mean) if f(lo) == f(hi) else f"{f(mean)} ({f(lo)}-{f(hi)})"
