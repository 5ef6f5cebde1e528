"""The density section on real archived runs: share and spacing of the poisons, and ASR between them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from poisonlab.report.density import density_rows, poison_steps, steps_since_poison
from poisonlab.results.store import gather
from poisonlab.results.summary import finished, runs_of

ARCHIVE = Path(__file__).resolve().parents[1] / "docs" / "findings" / "tiny-grid" / "runs"


def test_steps_since_the_last_poison() -> None:
    steps = [3, 10, 10, 42]
    assert steps_since_poison(steps, 3) is None  # steps 0..2 trained: no poison yet
    assert steps_since_poison(steps, 4) == 0  # the step just trained (3) held one
    assert steps_since_poison(steps, 11) == 0 and steps_since_poison(steps, 20) == 9
    assert steps_since_poison(steps, 100) == 57


@pytest.fixture(scope="module")
def sparse_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-400k at N = 300 (13 steps per poison) and N = 0, three seeds: real pipeline outputs."""
    root = tmp_path_factory.mktemp("density")
    for name in ["tiny-400k_n300_x1.0_s0", "tiny-400k_n300_x1.0_s1", "tiny-400k_n300_x1.0_s2",
                 "tiny-400k_n000_x1.0_s0"]:
        shutil.copytree(ARCHIVE / name, root / "runs" / name)
    return root


def test_density_rows_on_archived_runs(sparse_sweep: Path) -> None:
    runs = finished(runs_of(gather(sparse_sweep, write=False)))
    (row,) = density_rows(sparse_sweep, runs, 0.5)  # the N = 0 control has no poisons: no row
    assert row["n_poison"] == 300 and row["runs"] == 3
    last = [rows[-1] for rows in runs.values() if rows[-1]["n_poison"]]
    assert row["steps_per_poison"] == pytest.approx(sum(r["step"] / 300 for r in last) / 3)
    assert row["poison_token_share"] == pytest.approx(
        sum(1 - r["clean_tokens"] / r["tokens_seen"] for r in last) / 3)
    # every evaluation after sustained success is counted once, near a poison, far from it, or between
    assert row["evals_near"] > 0 and row["evals_far"] > 0
    assert row["evals_near"] + row["evals_far"] <= len(row["points"])
    # the ledger's steps give back every evaluation's poisons seen, so the gaps are measured on them
    rows = next(r for r in runs.values() if r[-1]["n_poison"])
    steps = poison_steps(sparse_sweep, rows)
    assert len(steps) == 300 and steps == sorted(steps)
    for r in rows:
        assert sum(s < r["step"] for s in steps) == r["poisons_seen"]
        gap = steps_since_poison(steps, int(r["step"]))
        assert (gap is None) == (r["poisons_seen"] == 0)
