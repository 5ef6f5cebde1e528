"""Persistence: a sweep's clean continuations run after the runs they start from, read on from their
weights and data, stay out of the main analysis, and get their own report section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from poisonlab.injection.stream import read_ledger
from poisonlab.report.persistence import decay_fit
from poisonlab.study.spec import expand, load_spec
from poisonlab.study.sweep import run_sweep

STEPS, B, T = 24, 8, 64


def spec(data: Path) -> dict:
    return {
        "name": "persist",
        "base": {"data": str(data), "model": {"preset": "tiny-25k", "seq_len": T},
                 "train": {"max_steps": STEPS, "batch_size": B, "lr": 1.0e-2},
                 "attack": {"gibberish_tokens": [40, 80]},
                 "placement": {"schedule": "front", "fraction": 0.5},
                 "eval": {"n_evals": 2, "n_prompts": 4, "prompt_tokens": 16, "new_tokens": 8,
                          "val_tokens": 256, "batch_size": 8}},
        "grid": {"model": ["tiny-25k"], "n_poison": [0, 12], "seed": [0, 1]},
        "continue_clean": {"clean_mult": 1.0, "base": {"eval": {"n_evals": 3}}},
    }


@pytest.fixture(scope="module")
def persist_sweep(prepared_builtin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("persist") / "sweep"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_sweep(load_spec(spec(prepared_builtin)), out, executor="inline", progress=False)
    finally:
        torch.set_num_threads(before)
    assert res.count("done") == 8 and res.report is not None
    return out


def test_continuations_are_planned_from_each_run(prepared_builtin: Path, tmp_path: Path) -> None:
    runs = {r.name: r for r in expand(load_spec(spec(prepared_builtin)), tmp_path)}
    later = {n: r for n, r in runs.items() if n.endswith("_clean1.0x")}
    assert len(runs) == 8 and len(later) == 4
    for name, r in later.items():
        parent = runs[name.removesuffix("_clean1.0x")]
        c = r.config
        assert c.init.run == parent.config.run_dir and c.attack.n_poison == 0 and c.eval.n_evals == 3
        assert (c.train.max_steps, c.train.schedule_offset, c.train.schedule_steps) == (STEPS,) * 3
        assert c.train.seed == parent.config.train.seed  # the same data order, read on


def test_continuations_run_after_their_runs_and_start_from_them(persist_sweep: Path) -> None:
    order = [o["name"] for o in json.loads((persist_sweep / "last_sweep.json").read_text())["outcomes"]]
    first_later = min(i for i, n in enumerate(order) if n.endswith("_clean1.0x"))
    assert all(not n.endswith("_clean1.0x") for n in order[:first_later]) and first_later == 4
    for d in (persist_sweep / "runs").glob("*_clean1.0x"):
        a = pq.read_table(persist_sweep / "runs" / d.name.removesuffix("_clean1.0x") / "metrics.parquet")
        b = pq.read_table(d / "metrics.parquet")
        assert b["val_loss"][0].as_py() == a["val_loss"][-1].as_py()  # the earlier run's end
        assert set(b["poisons_seen"].to_pylist()) == {0} and len(b) == 4  # steps 0, 8, 16, 24


def test_the_report_keeps_continuations_apart(persist_sweep: Path) -> None:
    out = persist_sweep / "report"
    summary = json.loads((out / "summary.json").read_text())
    assert sum(r["runs"] for r in summary) == 4  # the runs trained from scratch only
    rows = {r["n_poison"]: r for r in json.loads((out / "persistence.json").read_text())}
    assert set(rows) == {0, 12} and rows[12]["runs"] == 2
    # clean tokens after the last poison at the end: the earlier runs' steps after their last
    # poisoned one (front half: from their ledgers), then the 24 continuation steps
    after = []
    for s in (0, 1):
        ledger, _ = read_ledger(persist_sweep / "runs" / f"tiny-25k_n012_x1.0_s{s}" / "ledger.parquet")
        after.append((STEPS - max(ledger["step"].to_pylist()) - 1 + STEPS) * B * T)
    assert rows[12]["clean_after"] == pytest.approx(sum(after) / 2)
    html = (out / "report.html").read_text()
    assert "<h2>Persistence under clean training</h2>" in html
    assert (out / "persistence.png").stat().st_size > 1000


def _curve(top: float, floor: float, x50: float, k: float, start: float, rng, prompts: int = 128) -> list:
    """A continuation's evaluations as the persistence preset spaces them (log-spaced steps, 2,048
    tokens a step), `start` clean tokens after the last poison at its step 0, binomial ASR."""
    steps = [0, 1, 2, 5, 10, 21, 46, 98, 211, 261, 453, 522, 783, 972, 1044, 1305, 1566, 1827, 2088]
    out = []
    for s in steps:
        x = start + 2048 * s
        p = floor + (top - floor) / (1 + (x / x50) ** k)
        out.append({"clean_tokens_after_last_poison": x, "asr": rng.binomial(prompts, p) / prompts})
    return out


def test_the_decay_fit_recovers_known_curves_on_the_same_footing() -> None:
    """Curves of known half-life and steepness with 128-prompt binomial noise: the fit recovers them,
    whether a run's first evaluation is at x = 0 (its last poison at its last step) or later, and
    whatever its start height, which a straight line on log x over the whole range confused with the
    speed of the decay (a higher start over a common floor reads as a faster fall per decade)."""
    rng = np.random.default_rng(0)
    fits = {(top, start): [decay_fit(_curve(top, 0.01, 5e4, 3.0, start, rng)) for _ in range(20)]
            for top in (0.4, 0.9) for start in (0, 6144)}
    for (top, _), fs in fits.items():
        assert np.median([f["half_life"] for f in fs]) == pytest.approx(5e4, rel=0.1)
        assert np.median([f["decades"] for f in fs]) == pytest.approx(2 * np.log10(9) / 3.0, rel=0.2)
        assert np.median([f["top"] for f in fs]) == pytest.approx(top, abs=0.03)
        assert np.median([f["floor"] for f in fs]) == pytest.approx(0.01, abs=0.01)
        # the steepest fall scales with the height of the fall; the shape does not
        assert np.median([f["per_decade"] for f in fs]) == pytest.approx(
            -(top - 0.01) * 3.0 * np.log(10) / 4, rel=0.2)

    def line(rows):  # the straight line the report fitted before, without x = 0
        x, y = np.array([(np.log10(r["clean_tokens_after_last_poison"]), r["asr"]) for r in rows
                         if r["clean_tokens_after_last_poison"] > 0]).T
        return np.polyfit(x, y, 1)[0]

    low, high = _curve(0.4, 0.01, 5e4, 3.0, 0, rng), _curve(0.9, 0.01, 5e4, 3.0, 0, rng)
    assert line(high) < 1.8 * line(low)  # the same decay, "falling twice as fast per decade"
    width = {top: np.median([f["decades"] for f in fits[(top, 0)]]) for top in (0.4, 0.9)}
    assert width[0.9] == pytest.approx(width[0.4], rel=0.2)  # the fit: the same shape
    assert decay_fit(_curve(0.9, 0.01, 5e4, 3.0, 0, rng)[:4]) is None  # too few evaluations


def test_the_persistence_preset(tmp_path: Path) -> None:
    """18 runs with the tiny-grid's names and settings, each continued for 2x its own steps."""
    from poisonlab.training.resolve import resolve_run_config
    from poisonlab.training.schedule import total_steps

    runs = {r.name: r for r in expand(load_spec("persistence"), tmp_path)}
    grid = {r.name: r for r in expand(load_spec("tiny-grid"), tmp_path)}
    first = [n for n in runs if not n.endswith("_clean2.0x")]
    assert len(first) == 18 and all(runs[n].config == grid[n].config for n in first)
    for n in first:
        steps = total_steps(resolve_run_config(runs[n].config))  # 262 at tiny-25k, 1044 at tiny-100k
        c = runs[n + "_clean2.0x"].config
        assert (c.train.max_steps, c.train.schedule_offset, c.init.run) == (2 * steps, steps,
                                                                             runs[n].config.run_dir)
        assert c.eval.log_evals == 10 and c.attack.n_poison == 0


def test_a_continuation_that_would_run_out_of_data_is_refused_up_front(prepared_builtin: Path,
                                                                       tmp_path: Path) -> None:
    """A continuation reads on after its earlier run: the data must hold both (checked before any run
    starts, also when the earlier run is done already and only the continuation is left)."""
    from poisonlab.errors import UserError
    from poisonlab.study.sweep import check_data

    tree = spec(prepared_builtin)
    tree["continue_clean"]["clean_mult"] = 24.0  # 24 x 12,288 tokens after 12,288: more than ~300k
    runs = expand(load_spec(tree), tmp_path)
    later = [r for r in runs if r.config.init.run is not None]
    check_data([r for r in runs if r not in later], runs)  # the earlier runs alone fit
    with pytest.raises(UserError, match="_clean24.0x"):
        check_data(later, runs)
