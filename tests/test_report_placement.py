"""The ordering-and-density section: the density fit on simulated sweeps whose answer is known, and the
section and its columns on a real sweep (trainer, ledger, evaluator) with two windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_report import real_sweep  # noqa: F401  (the module-scoped fixture)

from poisonlab.report.placement import density_fit, density_reading, placement_cells, placement_rows
from poisonlab.results.store import gather
from poisonlab.results.summary import runs_of

N = 300
GRID = [5 * 1.25**k for k in range(int(math.log(N / 5, 1.25)) + 1)] + [N]  # milestone evaluations


def _run(need: float, per_batch: int, window: str) -> list[dict]:
    """One run's evaluation rows: ASR 0 before `need` poisons seen, 1 from there (censored at N)."""
    return [{"poisons_seen": x, "asr": float(x >= need), "per_batch": per_batch, "window": window,
             "every": None, "schedule": "clustered", "n_poison": N, "model": "m", "data_mult": 1.0}
            for x in GRID]


def simulate(d: float, seed: int, seeds: int = 3, sigma: float = 0.3) -> dict:
    """Poisons needed = 100 * per_batch^d, x1.5 in the end window, lognormal noise; 3 densities x 2
    windows x `seeds` runs."""
    rng = np.random.default_rng(seed)
    members: dict = {}
    for w, factor in (("all", 1.0), ("0.6667-1", 1.5)):
        for pb in (1, 2, 4):
            members[(w, pb, None, "clustered")] = [
                _run(100 * pb**d * factor * math.exp(sigma * rng.standard_normal()), pb, w)
                for _ in range(seeds)]
    return members


@pytest.mark.parametrize("d", [0.0, 0.5])
def test_density_fit_covers_the_true_effect(d: float) -> None:
    fits = [density_fit(simulate(d, seed), 0.5) for seed in range(30)]
    assert all("ci" in f for f in fits)
    covered = sum(f["ci"][0] <= d <= f["ci"][1] for f in fits)
    assert covered >= 26  # 95% nominal: at least 26 of 30
    assert abs(np.mean([f["slope"] for f in fits]) - d) < 0.1


def test_density_fit_finds_the_studys_direction_with_enough_runs() -> None:
    fit = density_fit(simulate(0.5, seed=1, seeds=8), 0.5)
    assert fit["ci"][0] > 0 and density_reading(fit).startswith("denser batches needed more")
    none = density_fit(simulate(0.0, seed=1, seeds=8), 0.5)
    assert none["ci"][0] < 0 < none["ci"][1] and density_reading(none).startswith("no density effect")


def test_density_fit_counts_censored_runs_and_says_when_it_cannot_fit() -> None:
    members = simulate(1.5, seed=0)  # at 4 per batch, ~800 needed: more than the 300 inserted
    fit = density_fit(members, 0.5)
    assert fit["censored"] >= 4 and fit["runs"] == 18 and fit["ci"][0] > 0
    one = {k: v for k, v in members.items() if k[1] == 1}
    assert "fewer than two densities" in density_fit(one, 0.5)["note"]


def test_placement_section_on_a_real_sweep(real_sweep: Path) -> None:  # noqa: F811
    """front (seeds 0, 1) and back (seed 0) of tiny-25k N = 12: one cell, two placements, the knobs
    recorded by the trainer in every metrics row and the rows' figures taken from the runs' metrics."""
    for d in (real_sweep / "runs").iterdir():
        t = pq.read_table(d / "metrics.parquet")
        want = "beginning 0.5" if d.name.endswith("front") else "end 0.5"
        assert set(t["window"].to_pylist()) == {want}
        assert set(t["per_batch"].to_pylist()) == {None} and set(t["every"].to_pylist()) == {None}
    runs = runs_of(gather(real_sweep, write=False))
    cells = placement_cells(runs)
    assert list(cells) == [("tiny-25k", 1.0, 12, "")]
    rows = {r["placement"]: r for r in placement_rows(cells, 0.5)}
    assert set(rows) == {"random boundaries, window beginning 0.5", "random boundaries, window end 0.5"}
    front = rows["random boundaries, window beginning 0.5"]
    assert front["runs"] == 2 and rows["random boundaries, window end 0.5"]["runs"] == 1
    asr = {d.name: pq.read_table(d / "metrics.parquet")["asr"].to_pylist()
           for d in (real_sweep / "runs").iterdir() if d.name.endswith("front")}
    assert front["peak_asr_mean"] == pytest.approx(np.mean([max(v) for v in asr.values()]))
    assert front["asr_mean"] == pytest.approx(np.mean([v[-1] for v in asr.values()]))
    # the report has the section, its table, its figures and placement.json
    out = real_sweep / "report"
    html = (out / "report.html").read_text()
    assert "<h2>Ordering and density</h2>" in html and "window end 0.5" in html
    for name in ("placement_vs_poisons_seen", "placement_vs_progress"):
        assert (out / f"{name}.png").stat().st_size > 1000
    saved = json.loads((out / "placement.json").read_text())
    assert len(saved["rows"]) == 2 and "fewer than two densities" in saved["density_fits"][0]["note"]
