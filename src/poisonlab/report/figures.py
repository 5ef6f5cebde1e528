"""The report's figures: curves averaged over seeds, one line per experiment group.

A group is a model size, a data budget, a poison count and every other setting that differs across the
sweep's runs (`results.group_runs`): a `placement.schedule` or trigger axis gets its own lines, labelled
`schedule=front`, never pooled with the other schedule. Within a group the curves of the seeds
(training and poison-set seeds) are averaged at the same x, not at the same evaluation index: poison
milestones put evaluations at different steps in each seed, and poisons seen differ per seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonlab.results.summary import Runs, experiment_keys, group_runs, settings_label, short_names

LINESTYLES = ["-", "--", ":", "-."]
# the two poison counts, as axis labels and captions say them
EXACT_COUNT = "poisons seen (every trigger in the training inputs)"
EFFECTIVE_COUNT = "effective poisons seen (trigger whole in its sequence, gibberish after it)"


@dataclass
class Curve:
    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: np.ndarray  # how many runs cover each x
    runs: int


def run_curve(rows: list[dict[str, Any]], xcol: str, ycol: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One run's (x, y) in increasing x. Evaluations at the same x are averaged (poisons seen stays
    level while training goes on between poisons)."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        x, y = r.get(xcol), r.get(ycol)
        if x is not None and y is not None and not math.isnan(float(y)):
            by_x[float(x)].append(float(y))
    if not by_x:
        return None
    xs = np.array(sorted(by_x))
    return xs, np.array([np.mean(by_x[x]) for x in xs])


def aggregate(runs: list[list[dict[str, Any]]], xcol: str, ycol: str, spread: str = "minmax") -> Curve | None:
    """Mean over runs at every x any of them was evaluated at: each run's curve is interpolated
    linearly onto those x inside its own range (never extrapolated), so the mean at an x is over the
    runs that reached it (`Curve.n`). Band: min-max, or mean +- 1 std (`spread="std"`)."""
    curves = [c for c in (run_curve(r, xcol, ycol) for r in runs) if c is not None]
    if not curves:
        return None
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    ys = np.full((len(curves), len(grid)), np.nan)
    for i, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        ys[i, inside] = np.interp(grid[inside], x, y)
    n = np.sum(~np.isnan(ys), axis=0)  # >= 1 everywhere: every grid point is some run's own x
    mean = np.nanmean(ys, axis=0)
    if spread == "std":
        s = np.sqrt(np.nansum((ys - mean) ** 2, axis=0) / np.maximum(n - 1, 1))
        lo, hi = mean - s, mean + s
    else:
        lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    return Curve(grid, mean, lo, hi, n, len(curves))


def model_order(runs: Runs) -> list[str]:
    size: dict[str, float] = {}
    for rows in runs.values():
        r = rows[-1]
        size[r.get("model")] = r.get("params_total") or r.get("params_nonemb") or 0
    return sorted(size, key=lambda m: (size[m], str(m)))


def main_mult(runs: Runs) -> float | None:
    """The data budget the per-size figures show; None (all runs) when each size has one budget,
    as in the demo, where the smallest size is trained at 2x."""
    per_model: dict[Any, set] = defaultdict(set)
    for rows in runs.values():
        per_model[rows[-1].get("model")].add(rows[-1].get("data_mult"))
    if all(len(m) == 1 for m in per_model.values()):
        return None
    mults = [rows[-1].get("data_mult") for rows in runs.values()]
    if 1.0 in mults:
        return 1.0
    return max(set(mults), key=mults.count) if mults else None


def has_column(runs: Runs, col: str) -> bool:
    """Every run has `col` in its rows (e.g. poisons_seen_effective, which older trainers lack)."""
    return bool(runs) and all(any(r.get(col) is not None for r in rows) for rows in runs.values())


def model_label(model: str, rows: list[dict[str, Any]]) -> str:
    p = rows[-1].get("params_nonemb")
    return f"{model} ({fmt_params(p)} non-emb.)" if p else str(model)


def fmt_params(p: float | None) -> str:
    if not p:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if p >= div:
            return f"{p / div:.3g}{unit}"
    return f"{p:g}"


def wrap_label(text: str, inches: float, fontsize: float = 10.0) -> str:
    """An axis label broken into lines that fit `inches` of width (about 0.55 em per character): a long
    label is otherwise drawn past the canvas edge and cut off."""
    import textwrap

    return "\n".join(textwrap.wrap(text, max(16, int(inches * 72 / (0.55 * fontsize))))) or text


def _new_figure(n_panels: int, width: float = 4.2, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    fig = Figure(figsize=(max(1, n_panels) * width, height), layout="constrained")
    axes = fig.subplots(1, max(1, n_panels), squeeze=False)[0]
    return fig, list(axes)


def _draw(ax: Any, c: Curve, colour: str, ls: str, label: str) -> None:
    ax.plot(c.x, c.mean, color=colour, ls=ls, lw=1.8, label=label)
    if c.runs > 1:
        ax.fill_between(c.x, c.lo, c.hi, color=colour, alpha=0.18, lw=0)


def panel_curves(runs: Runs, ycol: str, xcol: str, *, mults: list[float] | None, spread: str,
                 skip_zero: bool = False) -> dict[Any, list[tuple[str, str, Curve]]]:
    """What `fig_panels_by_n` draws: per n_poison, (model, variant label, curve) for every group.
    The variant names the data budget (when several are drawn) and the group's other settings."""
    keys = experiment_keys(runs)
    names = short_names(keys)
    groups = group_runs(runs, keys)
    use = {k: v for k, v in groups.items() if (mults is None or k[1] in mults)
           and k[2] is not None and not (skip_zero and k[2] == 0)}
    several_mults = len({k[1] for k in use}) > 1
    order = {m: i for i, m in enumerate(model_order(runs))}
    out: dict[Any, list[tuple[str, str, Curve]]] = defaultdict(list)
    for (model, mult, n, extra), members in sorted(use.items(), key=lambda kv: (order[kv[0][0]], str(kv[0]))):
        c = aggregate(members, xcol, ycol, spread)
        if c is None:
            continue
        parts = ([f"{mult:g}x"] if several_mults and mult is not None else [])
        parts += [settings_label(extra, names)] if extra else []
        out[n].append((model, ", ".join(parts), c))
    return dict(sorted(out.items()))


def fig_panels_by_n(runs: Runs, ycol: str, xcol: str, *, ylabel: str, xlabel: str, title: str,
                    mults: list[float] | None, spread: str, skip_zero: bool = False,
                    hline: float | None = None) -> Any | None:
    """One panel per n_poison, one colour per model size, one line style per variant (data budget and
    other settings) in the same order in every panel."""
    panels = panel_curves(runs, ycol, xcol, mults=mults, spread=spread, skip_zero=skip_zero)
    if not panels:
        return None
    models = model_order(runs)
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    variants = sorted({v for lines in panels.values() for _, v, _ in lines})
    styles = {v: LINESTYLES[i % len(LINESTYLES)] for i, v in enumerate(variants)}
    labels = {rows[-1].get("model"): model_label(rows[-1].get("model"), rows) for rows in runs.values()}
    fig, axes = _new_figure(len(panels))
    seen: dict[str, Any] = {}  # one legend entry per line label, over all panels
    for ax, (n, lines) in zip(axes, panels.items(), strict=True):
        for model, variant, c in lines:
            label = f"{labels[model]}, {variant}" if variant else labels[model]
            _draw(ax, c, colours[model], styles[variant], label)
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.8, ls=":")
        if ycol.startswith("asr"):
            ax.set_ylim(-0.03, 1.03)  # a rate: the same scale in every panel, so panels compare
        ax.set_title(f"N = {n} poisons inserted")
        ax.set_xlabel(wrap_label(xlabel, 0.85 * fig.get_figwidth() / len(axes)))
        ax.grid(alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(list(seen.values()), list(seen), fontsize=7, loc="best")
    fig.suptitle(title)
    return fig


def fig_val_loss(runs: Runs, mult: float | None, spread: str) -> Any | None:
    """Clean validation loss against tokens seen, one line per size and setting group (poison counts
    pooled: they barely move the clean loss)."""
    keys = experiment_keys(runs)
    names = short_names(keys)
    pooled: dict[tuple, list[list[dict[str, Any]]]] = defaultdict(list)
    for (model, m, _n, extra), members in group_runs(runs, keys).items():
        if mult is None or m == mult:
            pooled[(model, extra)] += members
    fig, (ax,) = _new_figure(1, width=5.5)
    models = model_order(runs)
    variants = sorted({extra for _, extra in pooled}, key=str)
    drew = False
    for model, extra in sorted(pooled, key=lambda k: (models.index(k[0]), str(k[1]))):
        members = pooled[(model, extra)]
        c = aggregate(members, "tokens_seen", "val_loss", spread)
        if c is None:
            continue
        label = model_label(model, members[0]) + (f", {settings_label(extra, names)}" if extra else "")
        i = models.index(model)
        _draw(ax, c, f"C{i % 10}", LINESTYLES[variants.index(extra) % len(LINESTYLES)], label)
        drew = True
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Clean validation loss per size" + (f" ({mult:g}x data)" if mult else ""))
    return fig if drew else None


def has_any(runs: Runs, col: str) -> bool:
    """Some run has `col` in its rows (the look-alike panel's columns, which older evaluators lack)."""
    return any(r.get(col) is not None for rows in runs.values() for r in rows)


# the trigger and the kinds of look-alike control the evaluator scores (the highest ASR per kind)
KINDS = [("asr", "trigger"), ("asr_near", "near look-alike"), ("asr_shape", "shape look-alike"),
         ("asr_ordinary", "ordinary words")]


def fig_asr_kinds(runs: Runs, *, mults: list[float] | None, spread: str, title: str) -> Any | None:
    """ASR of the trigger and of each kind of look-alike against training progress: one panel per N,
    one colour per kind, one line style per size (and variant); None when no look-alike kind is there."""
    kinds = [(col, label) for col, label in KINDS if col == "asr" or has_any(runs, col)]
    if len(kinds) < 2:
        return None
    curves = {col: panel_curves(runs, col, "progress", mults=mults, spread=spread) for col, _ in kinds}
    ns = sorted({n for per_n in curves.values() for n in per_n})
    order = {m: i for i, m in enumerate(model_order(runs))}
    lines = sorted({(m, v) for per_n in curves.values() for ls in per_n.values() for m, v, _ in ls},
                   key=lambda mv: (order[mv[0]], mv[1]))
    styles = {mv: LINESTYLES[i % len(LINESTYLES)] for i, mv in enumerate(lines)}
    fig, axes = _new_figure(len(ns))
    seen: dict[str, Any] = {}
    for ax, n in zip(axes, ns, strict=True):
        for i, (col, label) in enumerate(kinds):
            for model, variant, c in curves[col].get(n, []):
                name = f"{label}, {model}" + (f", {variant}" if variant else "")
                _draw(ax, c, f"C{i}", styles[(model, variant)], name)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"N = {n} poisons inserted")
        ax.set_xlabel("training progress")
        ax.grid(alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    axes[0].set_ylabel("attack success rate")
    axes[-1].legend(list(seen.values()), list(seen), fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    return fig


MARKERS = ["o", "s", "D", "P", "X", "h", "*"]  # per data budget; not "^", which reads as a lower bound


def fig_needed(groups: list[dict[str, Any]], threshold: float) -> Any | None:
    """Poisons needed against clean tokens trained, log-log, one panel per fit group (`fit_groups`):
    a marker per run (colour per size, shape per budget), censored runs hollow with an upward arrow
    at the poisons they saw, the "all runs" fit with its 95% band, and b = 0 / b = 1 through the centre."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    from scipy.stats import t as student_t

    groups = [g for g in groups if g.get("needed")]
    if not groups:
        return None
    every = [n for g in groups for n in g["needed"]]
    size = {n["model"]: n["params"] for n in every}
    models = sorted(size, key=lambda m: (size[m], m))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    mults = sorted({n["data_mult"] for n in every})
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(mults)}
    fig, axes = _new_figure(len(groups), width=5.0, height=4.2)
    fig.set_figwidth(fig.get_figwidth() + 1.8)  # room for the legend on the right
    for ax, g in zip(axes, groups, strict=True):
        xs = np.log([n["clean_tokens"] for n in g["needed"]])
        ys = np.log([n["value"] for n in g["needed"]])
        for n in g["needed"]:
            x, v, c, mk = n["clean_tokens"], n["value"], colours[n["model"]], markers[n["data_mult"]]
            if n["censored"]:
                ax.scatter([x], [v], marker=mk, facecolors="none", edgecolors=c, s=36, zorder=3)
                arrow = {"arrowstyle": "-|>", "color": c, "lw": 0.9, "shrinkA": 3, "shrinkB": 0}
                ax.annotate("", xy=(x, v * 1.6), xytext=(x, v), arrowprops=arrow, zorder=3)
            else:
                ax.scatter([x], [v], marker=mk, color=c, s=36, zorder=3)
        pad = 0.1 * max(xs.max() - xs.min(), 1.0)
        grid = np.linspace(xs.min() - pad, xs.max() + pad, 60)
        fit = g["fits"]["all"]
        centre_x = float(xs.mean())
        low, high = [float(ys.min())], [float(ys.max()) + math.log(1.6)]
        if "intercept" in fit:
            line = fit["intercept"] + fit["slope"] * grid
            design = np.column_stack([grid, np.ones_like(grid)])  # the fit's (slope, intercept) order
            se = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", design, np.array(fit["cov"]), design), 0, None))
            q = float(student_t.ppf(0.975, fit["df"]))
            ax.plot(np.exp(grid), np.exp(line), color="k", lw=1.6, zorder=2)
            ax.fill_between(np.exp(grid), np.exp(line - q * se), np.exp(line + q * se), color="k",
                            alpha=0.12, lw=0)
            centre_y = fit["intercept"] + fit["slope"] * centre_x
            low.append(float((line - q * se).min()))
            high.append(float((line + q * se).max()))
        else:  # no fit: the centre of the runs that got there
            got = [y for y, n in zip(ys, g["needed"], strict=True) if not n["censored"]] or list(ys)
            centre_y = float(np.mean(got))
        for b, ls in ((0.0, "--"), (1.0, ":")):
            ax.plot(np.exp(grid), np.exp(centre_y + b * (grid - centre_x)), color="grey", ls=ls, lw=1.2,
                    zorder=2.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(math.exp(min(low) - 0.3), math.exp(max(high) + 0.3))  # the arrows are not autoscaled
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers at 1, 2, 5 x 10^k; no crowded minor labels
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_xlabel("clean tokens trained")
        ax.set_title(g["label"] or "all poisoned runs", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"poisons needed for sustained ASR ≥ {threshold:g}")
    proxy = [Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in models]
    proxy += [Line2D([], [], color="grey", marker=markers[m], ls="", label=f"{m:g}x data") for m in mults]
    proxy += [Line2D([], [], color="grey", marker="o", mfc="none", ls="", label="censored (needed more)"),
              Line2D([], [], color="k", lw=1.6, label="fit, all runs (95% band)"),
              Line2D([], [], color="grey", ls="--", label="b = 0: constant count"),
              Line2D([], [], color="grey", ls=":", label="b = 1: constant fraction")]
    axes[-1].legend(handles=proxy, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Count or fraction? Poisons needed against clean data")
    return fig
