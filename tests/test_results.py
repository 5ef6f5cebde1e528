"""The results store: gathering, the DuckDB views, and the summary on a hand-made sweep."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_sweep_helpers import fake_run, make_fake_sweep, metrics_rows, write_run

from poisonlab.errors import UserError
from poisonlab.results.store import connect, failed_runs, gather
from poisonlab.results.summary import experiment_keys, fmt_needed, fmt_spread, runs_of, summarize, summary
from poisonlab.study.spec import load_spec
from poisonlab.study.sweep import run_sweep


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    return make_fake_sweep(tmp_path / "sw")


def test_gather_writes_dataset_with_derived_columns(sweep: Path) -> None:
    t = gather(sweep)
    assert t.num_rows == 8 * 6 + 3
    stored = pq.read_table(sweep / "results.parquet")
    assert stored.num_rows == t.num_rows
    rows = t.to_pylist()
    r = next(r for r in rows if r["run_name"] == "tiny-100k_n100_x1.0_s0")
    assert r["done"] is True and r["tokens_total"] == pytest.approx(1e6)
    assert r["clean_tokens"] == 1e6  # older metrics: the budget stands in for the clean tokens
    assert r["poison_fraction"] == pytest.approx(100 / 1e6)
    assert {r["done"] for r in rows if r["run_name"] == "tiny-25k_n100_x1.0_s2"} == {False}


def test_duckdb_views(sweep: Path) -> None:
    con = connect(sweep)
    assert con.execute("select count(*) from metrics").fetchone()[0] == 51
    assert con.execute("select count(*) from final").fetchone()[0] == 9
    top = con.execute("select max(asr) from final where model = 'tiny-100k' and n_poison = 25").fetchone()[0]
    assert top == pytest.approx(0.2)


def test_summary_known_answers(sweep: Path) -> None:
    rows = {(r["model"], r["n_poison"]): r for r in summary(sweep).to_pylist()}
    assert list(rows) == [("tiny-25k", 25), ("tiny-25k", 100), ("tiny-100k", 25), ("tiny-100k", 100)]
    a25, a100, b25, b100 = rows.values()
    assert a25["runs"] == 2  # the unfinished seed 2 is left out
    assert a25["asr_mean"] == pytest.approx(0.5) and a25["asr_std"] == pytest.approx(0.141421, abs=1e-5)
    assert a25["gap_mean"] == pytest.approx(200.0)
    assert (a25["success_runs"], a25["first_success_median"]) == (1, 20)
    assert (a100["success_runs"], a100["first_success_median"]) == (2, 30)
    assert (b25["success_runs"], b25["first_success_median"]) == (0, None)
    assert (b100["first_success_min"], b100["first_success_max"]) == (40, 60)
    assert b100["first_success_median"] == 50
    assert b25["asr_mean"] == pytest.approx(0.15)
    # a stricter threshold moves the answer
    strict = {(r["model"], r["n_poison"]): r for r in summarize(gather(sweep), threshold=0.9)}
    assert strict[("tiny-100k", 100)]["first_success_median"] == 80  # both seeds reach 0.9 at 80
    assert strict[("tiny-25k", 100)]["first_success_median"] == 60  # 60 and 60
    with_partial = summarize(gather(sweep), include_unfinished=True)
    mixed = next(r for r in with_partial if (r["model"], r["n_poison"]) == ("tiny-25k", 100))
    assert (mixed["runs"], mixed["unfinished_runs"], mixed["train_seeds"]) == (3, 1, [0, 1, 2])
    assert a100["unfinished_runs"] == 0 and a100["train_seeds"] == [0, 1]
    assert "poisons_seen_effective" not in a100  # the metrics have no effective count


def test_poisons_needed_per_cell(sweep: Path) -> None:
    """Sustained success per seed, by hand from KNOWN_ASR (poisons seen = N x progress): the crossing of
    0.5 after the last evaluation below it, interpolated in log(poisons seen) (linearly from 0); a seed
    that ends below 0.5 is censored at the poisons it saw."""
    rows = {(r["model"], r["n_poison"]): r for r in summarize(gather(sweep))}
    a25, a100, b25, b100 = rows.values()
    # 25k N=100: seed 0 crosses between 20 (0.3) and 40 (0.6), two thirds of the way in log; seed 1
    # reaches 0.5 at 20, its first poisoned evaluation (from 0 poisons: linear)
    assert a100["needed_median"] == pytest.approx((20 * 2 ** (2 / 3) + 20) / 2)
    assert (a100["needed_min"], a100["needed_max"]) == pytest.approx((20, 20 * 2 ** (2 / 3)))
    assert (a100["needed_censored"], a100["needed_median_bound"]) == (0, False)
    # 100k N=100: seed 0 halfway between 40 (0.4) and 60 (0.6) in log; seed 1 at 40 exactly
    assert b100["needed_median"] == pytest.approx((40 * 1.5 ** 0.5 + 40) / 2)
    # 25k N=25: seed 1 at 20, seed 0 never (censored at 25): the median is only a lower bound
    assert (a25["needed_min"], a25["needed_max"]) == pytest.approx((20, 25)) and a25["needed_censored"] == 1
    assert a25["needed_median_bound"] and fmt_needed(a25) == ">22 (20-25), 1 censored"
    assert (b25["needed_runs"], b25["needed_censored"], fmt_needed(b25)) == (2, 2, ">25, 2 censored")
    assert fmt_needed(a100) == "26 (20-32)" and fmt_needed(b100) == "44 (40-49)"
    # the first evaluation at ASR >= 0.5 is kept beside it, and the stricter threshold moves both
    strict = {(r["model"], r["n_poison"]): r for r in summarize(gather(sweep), threshold=0.9)}
    assert strict[("tiny-100k", 100)]["needed_median"] > b100["needed_median"]
    # these metrics predate the evaluator's look-alike panel: no specificity, said as '-'
    assert a100["specificity_mean"] is None and a100["asr_near_mean"] is None
    assert fmt_spread(a100, "specificity") == "-" and fmt_spread(a100, "asr_lookalike") == "0.01"


def test_failed_runs_and_config_fallback(sweep: Path, tmp_path: Path) -> None:
    assert failed_runs(sweep) == [("tiny-100k_n100_x1.0_s2", "RuntimeError: out of memory")]
    # a metrics file without the key columns: they come from the run's config.yaml
    run = tmp_path / "loose" / "r1"
    run.mkdir(parents=True)
    rows = metrics_rows("r1", "x", (10, 5), 7, 2.0, 3, [0.0, 1.0], [0, 7])
    for r in rows:
        for k in ("model", "n_poison", "data_mult", "seed"):
            del r[k]
        r["lookalike"] = "[SUDO]"  # a column the metrics have is kept as it is
    pq.write_table(pa.Table.from_pylist(rows), run / "metrics.parquet")
    tree = {"model": {"preset": "tiny-25k"}, "attack": {"n_poison": 7, "seed": 5, "trigger": "<X>"},
            "placement": {"schedule": "front", "seed": 9}, "train": {"data_mult": 2.0, "seed": 3},
            "eval": {"lookalike": "<Y>"}}
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    (run / "DONE").write_text("")
    r = gather(tmp_path / "loose").to_pylist()[-1]
    assert (r["model"], r["n_poison"], r["data_mult"], r["seed"]) == ("tiny-25k", 7, 2.0, 3)
    # the columns newer trainers write, from the config of an older run (defaults where it is silent)
    assert (r["trigger"], r["schedule"], r["attack_seed"], r["placement_seed"]) == ("<X>", "front", 5, 9)
    assert (r["tokens_per_param"], r["budget_params"], r["max_steps"]) == (20.0, "nonemb", None)
    assert r["lookalike"] == "[SUDO]"
    assert json.loads(r["settings"])["placement.schedule"] == "front"
    assert gather(run).num_rows == 2  # a single run directory works too


def test_errors_and_cli(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run has metrics"):
        gather(tmp_path / "empty")
    from poisonlab.cli import main

    main(["results", str(sweep), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and rows[1]["first_success_median"] == 30
    main(["results", str(sweep), "--wide"])
    captured = capsys.readouterr()
    assert "tiny-100k" in captured.out and "out of memory" in captured.err
    assert "needed for ASR>=0.5" in captured.out and ">25, 2 censored" in captured.out  # per cell, seeds
    assert "specificity" not in captured.out  # old metrics: no look-alike panel, no such column
    assert "val loss" in captured.out and "poison tokens, spacing" in captured.out
    main(["results", str(sweep)])  # the default: compact, 100 columns when piped
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100 and "val loss" not in out
    assert ">25, 2 censored" in out and "look-alike ASR" in out
    assert "1 unfinished run(s) left out" in captured.err  # said, not silently dropped
    main(["results", str(sweep), "--unfinished"])
    assert "1 unfinished run(s) included" in capsys.readouterr().err


def test_sweep_axes_are_groups_and_seeds_are_listed(tmp_path: Path) -> None:
    """A schedule axis makes groups; the training seed and a poison-set seed axis are averaged over."""
    spec = load_spec({"name": "axes", "seed_keys": ["train.seed", "placement.seed"],
                      "grid": {"model": ["tiny-25k"], "n_poison": [25], "seed": [0, 1],
                               "axes": {"attack.seed": [3, 4], "placement.schedule": ["uniform", "front"]}}})
    run_sweep(spec, tmp_path, executor="inline", run_fn=fake_run, progress=False, report=False)
    table = gather(tmp_path)
    assert experiment_keys(runs_of(table)) == ["placement.schedule"]
    rows = summarize(table)
    assert [r["label"] for r in rows] == ["schedule=front", "schedule=uniform"]
    for r in rows:
        assert r["settings"] == {"placement.schedule": r["label"].split("=")[1]}
        seeds = (r["train_seeds"], r["attack_seeds"], r["placement_seeds"])
        assert r["runs"] == 4 and seeds == ([0, 1], [3, 4], [0, 1])
    # the fake trainer writes no attack_seed/schedule columns: they come from each run's config.yaml
    assert {(r["schedule"], r["attack_seed"]) for r in table.to_pylist()} == {
        (s, a) for s in ("uniform", "front") for a in (3, 4)}
    assert json.loads(summary(tmp_path)["settings"][0].as_py()) == {"placement.schedule": "front"}


def test_what_does_not_make_an_experiment(tmp_path: Path) -> None:
    """Where and how fast a run ran is not a setting of the experiment; the data's content is."""
    for name, content in (("a", "h1"), ("a-copy", "h1"), ("c", "h2")):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "train.json").write_text(json.dumps({"content_hash": content}))
    runs = [("r0", "a", 1, 4), ("r1", "a-copy", 2, 4), ("r2", "c", 1, 4), ("r3", "a", 1, 8)]
    for i, (name, data, threads, heads) in enumerate(runs):
        rows = metrics_rows(name, "d64-l2", (10, 5), 10, 1.0, i, [0.0, 1.0], [0, 10])
        tree = {"name": name, "data": str(tmp_path / "data" / data), "out_dir": f"/elsewhere/{name}",
                "model": {"d_model": 64, "n_layers": 2, "n_heads": heads},
                "train": {"threads": threads, "seed": i}}
        write_run(tmp_path / "runs" / name, rows, tree)
    assert experiment_keys(runs_of(gather(tmp_path))) == ["data_id", "model.n_heads"]
    groups = {r["label"]: r["train_seeds"] for r in summarize(gather(tmp_path))}
    assert groups == {"data=sha256:h1, n_heads=4": [0, 1], "data=sha256:h2, n_heads=4": [2],
                      "data=sha256:h1, n_heads=8": [3]}


FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "findings"


@pytest.mark.parametrize("archive", ["tiny-grid", "ordering", "persistence"])
def test_compact_table_fits_100_columns_on_archived_sweeps(archive: str) -> None:
    """The default table of `poisonlab results` on real sweeps: no line over 100 characters, every
    group's figures whole on one line (a folded or cut figure reads as another one), settings that do
    not fit in a legend."""
    from rich.console import Console

    from poisonlab.results.table import compact_table, fmt_gap, fmt_range

    rows = summarize(gather(FINDINGS / archive, write=False))
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(compact_table(rows, title=f"archive {archive}"))
    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 100
    body = [line for line in lines if line.startswith("tiny-")]
    assert len(body) == len(rows)
    for r, line in zip(rows, body, strict=True):
        for cell in (fmt_range(r, "asr"), fmt_gap(r["gap_mean"]), fmt_range(r, "asr_lookalike"),
                     fmt_needed(r).split(", ")[0]):
            assert f" {cell}" in line, (cell, line)
    if archive != "tiny-grid":  # a legend keys the long settings labels
        assert any(line.startswith("a: ") for line in lines)


def test_finetune_results_fit_100_columns(capsys: pytest.CaptureFixture) -> None:
    """`poisonlab results` on the archived fine-tuning sweep: compact by default (under 100 columns,
    every cell whole), every column with --wide."""
    from poisonlab.cli import main

    main(["results", str(FINDINGS / "finetune")])
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100
    body = [line.split() for line in lines if line.startswith(("beginning", "end", "uniform"))]
    assert len(body) >= 12 and all(len(cells) >= 12 for cells in body)  # 8 columns, none folded
    assert "nta_shape" not in "\n".join(lines)
    main(["results", str(FINDINGS / "finetune"), "--wide"])
    assert "nta_shape" in capsys.readouterr().out
