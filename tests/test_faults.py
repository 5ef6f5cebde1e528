"""Faults in the files of finished runs, as a cluster's disks and people make them: each reproduced on
the output of a real sweep (the trainer and the evaluator, a few seconds), and its outcome asserted.
A run whose files fail their check is never averaged, grouped or dropped in silence: it is listed
(file, what is wrong), left out of every table and fit, and the command exits 2 unless --skip-broken;
a run finished by an older version (DONE without a manifest) is read back and said unverified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from poisonlab.cli import main
from poisonlab.report.finetune import load_runs
from poisonlab.results.archive import archive_sweep
from poisonlab.results.store import collect, gather
from poisonlab.results.summary import summarize
from poisonlab.rundir.check import BrokenRuns, check_run
from poisonlab.rundir.manifest import read_done
from poisonlab.study.spec import load_spec
from poisonlab.study.sweep import run_sweep

FINDINGS = Path(__file__).parents[1] / "docs" / "findings"


@pytest.fixture(scope="module")
def finished(prepared_builtin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sweep of two seeds of one cell (one group of 2 runs), finished, with its report."""
    import torch

    spec = load_spec({
        "name": "faults",
        "base": {"data": str(prepared_builtin), "model": {"preset": "tiny-25k", "seq_len": 64},
                 "train": {"max_steps": 12, "batch_size": 8, "lr": 1.0e-2},
                 "attack": {"gibberish_tokens": [40, 80]},
                 "eval": {"n_evals": 2, "n_prompts": 4, "prompt_tokens": 16, "new_tokens": 8,
                          "val_tokens": 256, "batch_size": 8, "save_samples": 2}},
        "grid": {"n_poison": [8], "seed": [0, 1]},
        "report": {"n_boot": 0},
    })
    out = tmp_path_factory.mktemp("finished") / "sweep"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_sweep(spec, out, executor="inline", progress=False)
    finally:
        torch.set_num_threads(before)
    assert res.ok and res.count("done") == 2
    return out


@pytest.fixture
def sweep(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished sweep to damage."""
    return Path(shutil.copytree(finished, tmp_path / "sweep"))


def runs(root: Path) -> list[Path]:
    return sorted((root / "runs").iterdir())


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    assert e.value.code == code, captured.err
    assert "Traceback" not in captured.out + captured.err
    return captured.err


def test_a_finished_run_is_verified_by_its_manifest(finished: Path) -> None:
    for run in runs(finished):
        done = read_done(run)
        assert done["steps"] == 12 and "config.yaml" in done["files"] and "metrics.parquet" in done["files"]
        assert any(f.startswith("checkpoints/step_0000012/") for f in done["files"])
        assert check_run(run).status == "verified"
        assert (run / "checkpoints" / "step_0000012" / "manifest.json").is_file()  # its own hashes
    rows = summarize(gather(finished, write=False))
    assert len(rows) == 1 and rows[0]["runs"] == 2  # one cell, two seeds


def test_a_garbled_config_is_a_broken_run_not_a_regrouped_table(sweep: Path, capsys) -> None:
    """The fault as found: the run's settings came out as None and a 2-seed group became two 1-seed
    groups, with exit 0. Now: listed by name and file, exit 2, and with --skip-broken one group of the
    one readable run."""
    bad = runs(sweep)[1]
    (bad / "config.yaml").write_text("name: [unclosed\n")
    err = one_line_error(capsys, ["results", str(sweep), "--json"])
    assert f"broken {bad.name}: config.yaml: " in err and "the manifest says" in err
    main(["results", str(sweep), "--json", "--skip-broken"])
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 1 and rows[0]["runs"] == 1 and rows[0]["train_seeds"] == [0]
    assert "1 broken run(s) left out" in captured.err and bad.name in captured.err
    err = one_line_error(capsys, ["report", str(sweep), "--n-boot", "0"])
    assert f"broken {bad.name}: config.yaml" in err
    main(["report", str(sweep), "--n-boot", "0", "--skip-broken"])
    html = (sweep / "report" / "report.html").read_text()
    assert "Broken:" in html and bad.name in html
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    assert [r["runs"] for r in summary] == [1]
    # the same garbage in a run without a manifest (an older version's): not valid YAML, said so
    (bad / "DONE").write_text(json.dumps({"steps": 12, "time": 0}))
    err = one_line_error(capsys, ["results", str(sweep)])
    assert f"broken {bad.name}: config.yaml: not valid YAML at line 2" in err


def test_a_truncated_metrics_file_is_named_not_a_traceback(sweep: Path, capsys) -> None:
    bad = runs(sweep)[0]
    data = (bad / "metrics.parquet").read_bytes()
    (bad / "metrics.parquet").write_bytes(data[:100])
    err = one_line_error(capsys, ["results", str(sweep)])
    assert f"{bad.name}: metrics.parquet: 100 bytes where the manifest says {len(data):,}" in err
    with pytest.raises(BrokenRuns):
        gather(sweep)
    g = collect(sweep)
    assert [c.name for c in g.broken] == [bad.name] and g.table.num_rows == len(
        pq.read_table(runs(sweep)[1] / "metrics.parquet"))
    (bad / "DONE").write_text(json.dumps({"steps": 12, "time": 0}))  # no manifest: read, and unreadable
    err = one_line_error(capsys, ["results", str(sweep)])
    assert f"{bad.name}: metrics.parquet: unreadable" in err
    # a sweep run again does not skip it as finished: broken, listed, exit 1, not trained over
    err = one_line_error(capsys, ["sweep", str(sweep / "sweep.yaml"), "--out", str(sweep), "--executor",
                                  "inline", "--no-report"], code=1)
    assert f"broken {bad.name}: metrics.parquet" in err and "1 broken" in err
    assert (bad / "metrics.parquet").read_bytes() == data[:100]


def test_a_missing_file_breaks_a_verified_run(sweep: Path) -> None:
    bad = runs(sweep)[0]
    (bad / "ledger.parquet").unlink()
    c = check_run(bad)
    assert c.broken and c.problems == [("ledger.parquet", "missing (the manifest lists it)")]
    (bad / "DONE").write_text('{"steps": 12, "files": {"config.y')  # a DONE cut short
    assert check_run(bad).broken and check_run(bad).problems[0][0] == "DONE"


def test_runs_of_an_older_version_are_unverified_then_adopted(sweep: Path, capsys, tmp_path) -> None:
    """DONE without a manifest (what the sweeps running now write): usable, said unverified; `verify
    --adopt` and `archive` give them a manifest after every file read back."""
    for run in runs(sweep):
        (run / "DONE").write_text(json.dumps({"steps": 12, "time": 1.0}) + "\n")
    g = collect(sweep)
    assert not g.broken and sorted(g.older) == [r.name for r in runs(sweep)]
    main(["results", str(sweep)])
    assert "2 run(s) finished by an older version without a manifest" in capsys.readouterr().err
    dest = tmp_path / "archive"
    got = archive_sweep(sweep, dest)
    assert len(got["added"]) == 2
    for run in runs(dest):
        assert check_run(run).status == "verified"
        info = read_done(run)["archived"]
        assert "older version" in info["source"] and info["source_done_sha256"]
    assert archive_sweep(sweep, dest)["kept"] == got["added"]  # the same runs: kept, not copied again
    main(["verify", str(sweep), "--adopt"])
    assert "2 adopted" in capsys.readouterr().err
    assert all(check_run(r).status == "verified" for r in runs(sweep))
    assert read_done(runs(sweep)[0])["steps"] == 12  # what the older DONE said is kept


def test_archive_refuses_a_broken_run_before_writing(sweep: Path, capsys, tmp_path) -> None:
    bad = runs(sweep)[1]
    (bad / "samples.jsonl").write_text("{}\n")
    err = one_line_error(capsys, ["archive", str(sweep), str(tmp_path / "a")])
    assert f"broken {bad.name}: samples.jsonl" in err and not (tmp_path / "a").exists()
    main(["archive", str(sweep), str(tmp_path / "a"), "--skip-broken"])
    assert "1 broken left out" in capsys.readouterr().err
    assert [r.name for r in runs(tmp_path / "a")] == [runs(sweep)[0].name]
    err = one_line_error(capsys, ["verify", str(sweep)])
    assert f"broken {bad.name}: samples.jsonl" in err and "1 verified, 1 broken" in err


def test_eval_refuses_a_damaged_checkpoint_or_config(sweep: Path, capsys) -> None:
    run = runs(sweep)[0]
    model = run / "checkpoints" / "step_0000012" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF  # one bit pattern in the weights: the header still parses
    model.write_bytes(bytes(data))
    err = one_line_error(capsys, ["eval", str(run), "--n-prompts", "2"])
    assert "step_0000012: damaged (model.safetensors: sha256 differs" in err
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "\n# edited\n")
    err = one_line_error(capsys, ["eval", str(run), "--n-prompts", "2"])
    assert "config.yaml: " in err and "the manifest says" in err


def test_the_committed_archives_verify_and_read(tmp_path: Path) -> None:
    """Every archived run under docs/findings (a fine-tuning sweep's base stages too) carries a manifest
    that its files match, and the results
    store reads every archive; the tiny-grid's report builds from a copy of it."""
    archives = sorted(p for p in FINDINGS.iterdir() if (p / "runs").is_dir())
    assert {p.name for p in archives} >= {"tiny-grid", "ordering", "persistence", "language", "finetune"}
    for archive in archives:
        stages = [d.parent for d in (archive / "stages").rglob("DONE")]  # none where there is no stages/
        for run in [*(archive / "runs").iterdir(), *stages]:
            c = check_run(run, deep=True)
            assert c.status == "verified", (run, c.problems)
            assert "archived" in read_done(run) or "adopted" in read_done(run)
        if archive.name == "finetune":
            ft, done = load_runs(archive)
            assert len(ft) == len(done) == 60
        else:
            g = collect(archive)
            assert not g.broken and not g.older and g.table.num_rows > 0, archive
    copy = Path(shutil.copytree(FINDINGS / "tiny-grid", tmp_path / "tiny-grid"))
    main(["report", str(copy), "--n-boot", "0"])
    summary = json.loads((copy / "report" / "summary.json").read_text())
    assert sum(r["runs"] for r in summary) == 81
