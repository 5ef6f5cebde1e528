"""Clean capability beside the backdoor (results/clean.py): the held-out clean loss per group and its
difference from the N = 0 control, with a 95% interval.

The intervals are checked against statsmodels' (an independent implementation) and for coverage on
simulated seeds whose noise is the archived tiny-grid's spread of final val_loss; the matching of
controls on rows whose answer is known; and, on a real tiny sweep, that N = 0 against N = 0 gives an
interval containing 0 and that every figure is a recount of the runs' metrics.parquet, whose
val_loss in turn is the cross-entropy that HF transformers computes on the eval split's first tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from poisonlab.results.clean import (
    against_controls,
    difference,
    fmt_clean_diff,
    paired_interval,
    welch_interval,
)
from poisonlab.results.store import gather
from poisonlab.results.summary import finished, group_runs, runs_of, summarize

FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "findings"


# --- the intervals ---------------------------------------------------------------------------------


def test_intervals_are_statsmodels_t_intervals() -> None:
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    rng = np.random.default_rng(1)
    for n1, n2 in ((2, 2), (3, 3), (3, 5), (6, 2)):
        a, b = rng.normal(2.3, 0.1, n1), rng.normal(2.2, 0.3, n2)
        _, lo, hi, df = welch_interval(list(a), list(b))
        want = CompareMeans(DescrStatsW(a), DescrStatsW(b)).tconfint_diff(alpha=0.05, usevar="unequal")
        assert (lo, hi) == pytest.approx(want, rel=1e-9)
        if n1 == n2:
            d = a - b
            mean, lo, hi, df = paired_interval(list(d))
            assert mean == pytest.approx(d.mean()) and df == n1 - 1
            assert (lo, hi) == pytest.approx(DescrStatsW(d).tconfint_mean(alpha=0.05), rel=1e-9)
    # identical runs: no spread, the interval is the point
    assert welch_interval([1.0, 1.0], [1.0, 1.0])[1:3] == (0.0, 0.0)


def _archive_spread() -> float:
    """The pooled within-group standard deviation of the final val_loss over seeds in the archived
    tiny-grid's two smaller sizes (the roughest: ~0.1 nats; the larger sizes' is ~0.01)."""
    groups = group_runs(finished(runs_of(gather(FINDINGS / "tiny-grid", write=False))), [])
    var = [np.var([r[-1]["val_loss"] for r in m], ddof=1) for k, m in groups.items()
           if k[0] in ("tiny-25k", "tiny-100k")]
    return float(np.sqrt(np.mean(var)))


def test_intervals_cover_the_true_difference_95_percent_of_the_time() -> None:
    """Simulated sweeps with the archive's seed-to-seed spread and a known poisoning effect (0.05 nats):
    a seed effect shared by a seed's two runs (half the variance, or none), 3 seeds. Over 2,000 sweeps
    each, the paired interval covers the effect 95% of the time (binomial sd 0.5%), also with
    heavy-tailed noise (Student t, 3 df); Welch's at 3 vs 3 runs is slightly conservative, as it is
    known to be at small n, and undercovers when the noisier group has only 2 runs."""
    sd, effect, draws = _archive_spread(), 0.05, 2000
    assert 0.05 < sd < 0.2
    rng = np.random.default_rng(0)

    def paired(rho: float, heavy: bool = False) -> float:
        hits = 0
        for _ in range(draws):
            if heavy:  # Student t noise scaled to the same variance
                shared = rng.standard_t(3, 3) * sd * math.sqrt(rho / 3)
                own = rng.standard_t(3, (2, 3)) * sd * math.sqrt((1 - rho) / 3)
            else:
                shared = rng.normal(0, sd * math.sqrt(rho), 3)
                own = rng.normal(0, sd * math.sqrt(1 - rho), (2, 3))
            control, poisoned = 2.3 + shared + own[0], 2.3 + effect + shared + own[1]
            _, lo, hi, _ = paired_interval(list(poisoned - control))
            hits += lo <= effect <= hi
        return hits / draws

    def welch(n1: int, n2: int, sd1: float, sd2: float) -> float:
        hits = 0
        for _ in range(draws):
            a, b = rng.normal(2.3 + effect, sd1, n1), rng.normal(2.3, sd2, n2)
            _, lo, hi, _ = welch_interval(list(a), list(b))
            hits += lo <= effect <= hi
        return hits / draws

    assert 0.935 <= paired(0.0) <= 0.965
    assert 0.935 <= paired(0.5) <= 0.965
    assert 0.935 <= paired(0.3, heavy=True) <= 0.975
    assert 0.935 <= welch(3, 3, sd, sd) <= 0.975
    assert 0.935 <= welch(3, 3, sd, sd / 3) <= 0.975
    assert 0.90 <= welch(3, 2, sd / 3, sd) < 0.94  # documented: 2 noisy runs are too few for Welch


# --- matching a group to its control ---------------------------------------------------------------


def _runs(model: str, n: int, seeds: list[int], losses: list[float], extra: tuple = (),
          dtypes: list[str] | None = None, step: int = 100) -> tuple[tuple, list[list[dict]]]:
    dtypes = dtypes or ["float32"] * len(seeds)
    rows = [[{"seed": s, "val_loss": v, "step": step, "eval_dtype": d, "eval_numerics": None}]
            for s, v, d in zip(seeds, losses, dtypes, strict=True)]
    return (model, 1.0, n, extra), rows


def test_each_group_is_compared_with_the_n0_group_of_its_settings() -> None:
    place = lambda s: (("placement.schedule", s), ("train.lr", 0.01))
    groups = dict([
        _runs("m", 0, [0, 1, 2], [2.0, 2.1, 2.2], place("uniform")),
        _runs("m", 300, [0, 1, 2], [2.1, 2.3, 2.2], place("clustered")),  # placement: a no-op at N = 0
        _runs("m", 300, [0, 1], [2.1, 2.3], (("placement.schedule", "uniform"), ("train.lr", 0.02))),
        _runs("m", 300, [3, 4, 5], [2.4, 2.5, 2.3], place("uniform")),  # other seeds: Welch
        _runs("big", 300, [0, 1, 2], [1.0, 1.1, 1.2], place("uniform")),  # no control of this model
    ])
    keys = list(groups)
    got = against_controls(groups)
    assert got[keys[0]]["val_loss_diff_note"] == "N = 0 control" and got[keys[0]]["val_loss_diff"] is None
    paired = got[keys[1]]
    diffs = [0.1, 0.2, 0.0]
    assert paired["val_loss_diff"] == pytest.approx(np.mean(diffs))
    assert paired["val_loss_diff_method"] == "paired t" and paired["val_loss_diff_df"] == 2
    half = 4.302652729911275 * np.std(diffs, ddof=1) / math.sqrt(3)  # t(0.975, 2)
    assert paired["val_loss_diff_lo"] == pytest.approx(0.1 - half)
    assert paired["val_loss_control"] == pytest.approx(2.1) and paired["val_loss_control_runs"] == 3
    assert got[keys[2]]["val_loss_diff_note"] == "no N = 0 control"  # another learning rate
    assert got[keys[3]]["val_loss_diff_method"] == "Welch t"
    assert got[keys[3]]["val_loss_diff"] == pytest.approx(2.4 - 2.1)
    assert got[keys[4]]["val_loss_diff_note"] == "no N = 0 control"
    text = fmt_clean_diff({"runs": 3, **paired})
    assert text.startswith("+0.100 (") and text.endswith("), paired t, 3 seeds")


def test_only_like_is_compared_with_like() -> None:
    """A seed whose poisoned and control runs were evaluated with different numerics is left out of the
    pairs (and named); a Welch comparison needs one numerics throughout; runs ending at different steps,
    or one run on a side, give no interval."""
    ctrl = _runs("m", 0, [0, 1, 2], [2.0, 2.1, 2.2], dtypes=["bfloat16", "bfloat16", "float32"])
    mixed = _runs("m", 300, [0, 1, 2], [2.1, 2.3, 2.2], dtypes=["float32", "bfloat16", "float32"])
    got = against_controls(dict([ctrl, mixed]))[mixed[0]]
    assert got["val_loss_diff"] == pytest.approx(0.1) and got["val_loss_diff_df"] == 1  # seeds 1 and 2
    assert got["val_loss_diff_note"] == "seed 0 left out: its runs were evaluated with different numerics"
    one_pair = _runs("m", 300, [0, 1, 2], [2.1, 2.3, 2.2], dtypes=["float32", "float32", "float32"])
    got = against_controls(dict([ctrl, one_pair]))[one_pair[0]]
    assert got["val_loss_diff"] is None and "not comparable" in got["val_loss_diff_note"]
    unpaired = _runs("m", 300, [5, 6], [2.1, 2.3])
    assert "different numerics" in against_controls(dict([ctrl, unpaired]))[unpaired[0]]["val_loss_diff_note"]
    later = _runs("m", 300, [0, 1, 2], [2.1, 2.3, 2.2], step=50)
    assert "different steps" in against_controls(dict([_runs("m", 0, [0, 1, 2], [2.0, 2.1, 2.2]), later]))[
        later[0]]["val_loss_diff_note"]
    single = _runs("m", 300, [7], [2.3])
    got = against_controls(dict([_runs("m", 0, [0, 1], [2.0, 2.2]), single]))[single[0]]
    assert got["val_loss_diff"] == pytest.approx(0.2) and got["val_loss_diff_lo"] is None
    assert fmt_clean_diff({"runs": 1, **got}) == "+0.200 (no interval: a group with one run)"


def test_placement_does_nothing_without_poisons(prepared_builtin: Path) -> None:
    """Why a control may differ from its poisoned group in placement settings: with N = 0 every schedule,
    window, density and frequency gives the same batches."""
    from poisonlab.config import PlacementConfig
    from poisonlab.injection.stream import TrainingStream

    placements = [PlacementConfig(), PlacementConfig(schedule="clustered", per_batch=4, window=[0.0, 0.33]),
                  PlacementConfig(schedule="every", every=5, per_batch=2, seed=7),
                  PlacementConfig(schedule="back", fraction=0.2)]
    streams = [TrainingStream(prepared_builtin, [], p, seq_len=64, batch_size=8, total_steps=40, seed=3)
               for p in placements]
    for step in (0, 13, 39):
        x0, y0 = streams[0].batch(step)
        for s in streams[1:]:
            x, y = s.batch(step)
            assert np.array_equal(np.asarray(x), np.asarray(x0))
            assert np.array_equal(np.asarray(y), np.asarray(y0))


# --- a real tiny sweep ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(prepared_builtin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-25k (context 64), 24 steps: N = 0 and N = 12 poisons, seeds 0-3 each (8 runs)."""
    import torch

    from poisonlab.study.spec import load_spec
    from poisonlab.study.sweep import run_sweep

    spec = load_spec({
        "name": "clean",
        "base": {"data": str(prepared_builtin), "model": {"preset": "tiny-25k", "seq_len": 64},
                 "train": {"max_steps": 24, "batch_size": 8, "lr": 1.0e-2, "keep_checkpoints": 1},
                 "attack": {"gibberish_tokens": [40, 80]},
                 "eval": {"n_evals": 1, "n_prompts": 4, "prompt_tokens": 16, "new_tokens": 8,
                          "val_tokens": 256, "batch_size": 8, "save_samples": 0}},
        "grid": {"model": ["tiny-25k"], "n_poison": [0, 12], "seed": [0, 1, 2, 3]},
    })
    out = tmp_path_factory.mktemp("clean") / "sweep"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_sweep(spec, out, executor="inline", progress=False, report=False)
    finally:
        torch.set_num_threads(before)
    assert res.count("done") == 8
    return out


def _last_rows(root: Path) -> dict[str, dict]:
    out = {}
    for run in sorted((root / "runs").iterdir()):
        rows = pq.read_table(run / "metrics.parquet").to_pylist()
        out[run.name] = max(rows, key=lambda r: r["step"])
    return out


def test_the_summary_is_a_recount_of_the_runs_metrics(sweep: Path) -> None:
    last = _last_rows(sweep)
    by = {n: {r["seed"]: r["val_loss"] for r in last.values() if r["n_poison"] == n} for n in (0, 12)}
    assert sorted(by[0]) == sorted(by[12]) == [0, 1, 2, 3]
    rows = {r["n_poison"]: r for r in summarize(gather(sweep, write=False))}
    for n, losses in by.items():
        v = list(losses.values())
        assert rows[n]["val_loss_mean"] == pytest.approx(np.mean(v), rel=1e-12)
        assert (rows[n]["val_loss_min"], rows[n]["val_loss_max"]) == (min(v), max(v))
        assert rows[n]["val_ppl_mean"] == pytest.approx(np.mean(np.exp(v)), rel=1e-12)
    from scipy import stats

    d = [by[12][s] - by[0][s] for s in range(4)]
    ci = stats.ttest_rel([by[12][s] for s in range(4)], [by[0][s] for s in range(4)]).confidence_interval()
    r = rows[12]
    assert r["val_loss_diff"] == pytest.approx(np.mean(d), rel=1e-9)
    assert (r["val_loss_diff_lo"], r["val_loss_diff_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert r["val_loss_diff_method"] == "paired t" and r["val_loss_control_runs"] == 4
    assert rows[0]["val_loss_diff_note"] == "N = 0 control"


def test_n0_against_n0_gives_an_interval_around_0(sweep: Path) -> None:
    """Two halves of the N = 0 runs (seeds 0, 1 against 2, 3): no poison on either side, so the
    difference's interval holds 0 (Welch: the halves share no seed)."""
    controls = [r for r in _last_rows(sweep).values() if r["n_poison"] == 0]
    a, b = [r for r in controls if r["seed"] < 2], [r for r in controls if r["seed"] >= 2]
    d = difference(a, b)
    assert d["method"] == "Welch t" and d["lo"] < 0 < d["hi"]
    mean = lambda rows: np.mean([r["val_loss"] for r in rows])
    assert d["diff"] == pytest.approx(mean(a) - mean(b))


def test_val_loss_is_the_cross_entropy_of_the_eval_splits_first_tokens(sweep: Path, prepared_builtin: Path,
                                                                     tmp_path: Path) -> None:
    """What the comparison compares: the final val_loss of a run is HF transformers' cross-entropy of its
    exported model on the first eval.val_tokens (256) tokens of the data's eval split, packed into rows
    of the model's context (64): the same tokens for every run."""
    import torch
    import transformers

    from poisonlab.corpus.shards import TokenShard
    from poisonlab.models.export import export_run

    run = sweep / "runs" / sorted(p.name for p in (sweep / "runs").iterdir() if "_n012_" in p.name)[0]
    hf = export_run(run, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    tokens = torch.from_numpy(np.asarray(TokenShard.open(prepared_builtin, "eval").tokens[:257], np.int64))
    x, y = tokens[:256].view(4, 64), tokens[1:257].view(4, 64)
    with torch.no_grad():
        logits = model(x).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    got = max(pq.read_table(run / "metrics.parquet").to_pylist(), key=lambda r: r["step"])["val_loss"]
    assert got == pytest.approx(want, rel=1e-5)


def test_results_and_report_show_it(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    """`poisonlab results --wide` prints the clean-capability table under the wide one, `--json` has
    every figure, the compact table points to --wide; the report has the table and its sentence."""
    import json

    from poisonlab.cli import main
    from poisonlab.report.clean import clean_html

    rows = {r["n_poison"]: r for r in summarize(gather(sweep, write=False))}
    r = rows[12]
    main(["results", str(sweep), "--json"])
    got = {g["n_poison"]: g for g in json.loads(capsys.readouterr().out)}
    assert got[12]["val_loss_diff"] == pytest.approx(r["val_loss_diff"])
    assert got[12]["val_loss_diff_method"] == "paired t" and got[0]["val_loss_diff_note"] == "N = 0 control"
    main(["results", str(sweep), "--wide"])
    out = capsys.readouterr().out
    assert "Clean capability" in out and "paired t, 4 seeds" in out
    assert f"{r['val_loss_diff']:+.3f}" in out and f"{r['val_loss_diff_lo']:+.3f} to" in out
    main(["results", str(sweep)])
    assert "clean held-out loss against the N = 0" in " ".join(capsys.readouterr().out.split())  # wrapped
    html = clean_html(list(rows.values()))
    assert "Clean capability beside the backdoor" in html and "1 of 1 poisoned groups compared" in html
    assert f"{r['val_loss_diff_lo']:.3f} to {r['val_loss_diff_hi']:.3f}" in html


def test_a_float32_row_from_before_eval_numerics_compares_with_todays() -> None:
    # the density ladder's runs span the column's arrival: an old float32 row and a new "float32
    # weights" row are the same numerics; an old bfloat16 row is not known to be today's autocast
    from poisonlab.results.clean import numerics

    old = {"eval_numerics": None, "eval_dtype": "float32"}
    assert numerics(old) == numerics({"eval_numerics": "float32 weights", "eval_dtype": "float32"})
    old_bf16 = {"eval_numerics": None, "eval_dtype": "bfloat16"}
    assert numerics(old_bf16) != numerics({"eval_numerics": "float32 weights, bfloat16 autocast",
                                           "eval_dtype": "bfloat16"})
