"""The report's table of generations with and without the trigger (the study's Figure 3): for each size
and group of other settings, the run with the most poisons, its last evaluation's generations by
prompt (the evaluator's samples.jsonl), clipped for the page."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from poisonlab.report.figures import main_mult, model_order
from poisonlab.results.summary import Runs, experiment_keys, group_runs, settings_label, short_names
from poisonlab.rundir.jsonl import iter_jsonl


def _run_file(root: Path, run_name: Any, name: str) -> Path:
    """A file of a run gathered from a sweep dir (runs/NAME), a folder of runs, or the run dir itself."""
    for d in (root / "runs" / str(run_name), root / str(run_name), root):
        if (d / name).exists():
            return d / name
    return root / "runs" / str(run_name) / name


def sample_rows(root: Path, runs: Runs, per_model: int = 2, chars: int = 240) -> list[dict[str, Any]]:
    """For each size and group of other settings, the run with the most poisons (lowest seed): its last
    evaluation's generations with and without the trigger (the evaluator's samples.jsonl), by prompt."""
    keys = experiment_keys(runs)
    names = short_names(keys)
    mult = main_mult(runs)
    rank = lambda rows: (rows[-1].get("n_poison") or 0, -_num(rows[-1].get("seed")))
    best: dict[tuple, list[dict[str, Any]]] = {}
    for (model, m, _n, extra), members in group_runs(runs, keys).items():
        if mult is not None and m != mult:
            continue
        for rows in members:
            if (model, extra) not in best or rank(rows) > rank(best[(model, extra)]):
                best[(model, extra)] = rows
    order = model_order(runs)
    out = []
    for model, extra in sorted(best, key=lambda k: (order.index(k[0]), str(k[1]))):
        last = best[(model, extra)][-1]
        recs = [r for r in _read_jsonl(_run_file(root, last.get("run_name"), "samples.jsonl"))
                if r.get("kind", "sample") == "sample" and r.get("condition") is not None]
        if not recs:
            continue
        step = max(r.get("step") or 0 for r in recs)
        by_prompt: dict[Any, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in recs:
            if (r.get("step") or 0) == step:
                by_prompt[r.get("prompt_idx")][r["condition"]] = r
        shown = 0
        for idx in sorted(by_prompt, key=lambda v: (str(type(v)), v)):
            cond = by_prompt[idx]
            if "clean" not in cond or "trigger" not in cond:
                continue
            out.append({
                "run": last.get("run_name"), "model": model, "settings": settings_label(extra, names),
                "n_poison": last.get("n_poison"), "step": step, "prompt_idx": idx,
                "prompt": _clip(cond["clean"].get("prompt", ""), chars, tail=True),
                "clean": _clip(cond["clean"].get("generation", ""), chars),
                "clean_ppl": cond["clean"].get("ppl"),
                "trigger": _clip(cond["trigger"].get("generation", ""), chars),
                "trigger_ppl": cond["trigger"].get("ppl"),
                "trigger_prompt_end": _clip(cond["trigger"].get("prompt", ""), 40, tail=True),
            })
            shown += 1
            if shown >= per_model:
                break
    return out


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return 0.0


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [r for _, r in iter_jsonl(path, strict=False)]  # a line cut by a crash must not break it


def _clip(s: str, n: int, tail: bool = False) -> str:
    s = str(s)
    if len(s) <= n:
        return s
    return "…" + s[-n:] if tail else s[:n] + "…"
