"""The fine-tuning count-vs-fraction elasticity on simulated sweeps whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from poisonlab.finetune.stats import elasticity, reading, sustained_success


def simulate(e_true: float, rng: np.random.Generator, seeds: int = 3, prompts: int = 64) -> list[dict]:
    """The finetune preset's shape: ASR = logistic(-9 + 2.5 (log N - e log(C/200)) + run noise)."""
    runs = []
    for n in (10, 25, 50, 100):
        for c in (200, 2000):
            for _ in range(seeds):
                z = -9 + 2.5 * (np.log(n) - e_true * np.log(c / 200)) + rng.normal(0, 0.5)
                p = 1 / (1 + np.exp(-z))
                runs.append(
                    {
                        "n_poison": n,
                        "clean_size": c,
                        "asr": rng.binomial(prompts, p) / prompts,
                        "n_prompts": prompts,
                    }
                )
    return runs


@pytest.mark.parametrize("e_true", [0.0, 1.0])
def test_interval_covers_the_true_elasticity(e_true):
    rng = np.random.default_rng(7)
    fits = [elasticity(simulate(e_true, rng)) for _ in range(100)]
    covered = np.mean([f["e_ci"][0] <= e_true <= f["e_ci"][1] for f in fits])
    assert 0.85 <= covered <= 1.0  # nominal 95%; measured 91-93% over 200 sweeps
    other = 1.0 - e_true  # and the other hypothesis is excluded most of the time
    assert np.mean([not f["e_ci"][0] <= other <= f["e_ci"][1] for f in fits]) > 0.9


def test_reading_names_the_hypothesis():
    rng = np.random.default_rng(0)
    assert "constant count, not a constant fraction" in reading(elasticity(simulate(0.0, rng)))
    assert "constant fraction, not a constant count" in reading(elasticity(simulate(1.0, rng)))
    one_size = [r for r in simulate(0.0, rng) if r["clean_size"] == 200]
    assert elasticity(one_size) is None and "does not separate" in reading(None)


def test_zero_poison_runs_do_not_enter_and_sustained_success_needs_to_last():
    rng = np.random.default_rng(1)
    runs = simulate(0.0, rng) + [{"n_poison": 0, "clean_size": 200, "asr": 0.0, "n_prompts": 64}] * 5
    assert elasticity(runs)["runs"] == 24
    rows = [
        {"step": s, "asr": a, "poisons_seen": p}
        for s, a, p in [(0, 0.0, 0), (1, 0.6, 5), (2, 0.2, 10), (3, 0.7, 15), (4, 0.9, 20)]
    ]
    assert sustained_success(rows, 0.5) == 15
    assert sustained_success(rows[:3], 0.5) is None
