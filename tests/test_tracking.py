"""Live curves (train.log_to): the TensorBoard event files of real runs, read back with TensorBoard's own
reader, hold exactly the numbers of log.jsonl and metrics.parquet; a run that crashed past its
checkpoint and resumed holds the curves of an uninterrupted one; fine-tuning runs log too; a tracker
that is not installed is refused in one line before anything is written; trackio stays local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_finetune import _cfg as ft_cfg
from test_finetune import _tiny_hf
from test_train import FAKE, FakeEvaluator, make_cfg, real_cfg, stream_for, write_cfg

from poisonlab.models.checkpoint import latest_checkpoint
from poisonlab.training.trainer import train

pytest.importorskip("tensorboard")

LOG_FIELDS = ("loss", "lr", "tokens_per_s", "mfu", "poisons_seen", "poisons_seen_effective", "tokens_seen")
# what a researcher watches, each with a curve against step and one against poisons seen
KEY = ("asr", "gap", "val_loss", "asr_near", "asr_shape", "asr_ordinary", "asr_lookalike", "specificity")
# the run's settings: constant, so no curves
SETTINGS = ("params_total", "n_poison", "seed", "data_mult", "max_steps", "n_prompts", "new_tokens", "step")


def curves(tb: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0: every point, no sampling
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def same(points: list[tuple[int, float]], expect: list[tuple[int, float]], tag: str) -> None:
    """Same steps in the same order, same values to float32 (the event files' precision)."""
    assert [s for s, _ in points] == [s for s, _ in expect], tag
    np.testing.assert_array_equal(np.float32([v for _, v in points]), np.float32([v for _, v in expect]),
                                  err_msg=tag)


def assert_curves_hold_the_records(run: Path) -> dict[str, list[tuple[int, float]]]:
    got = curves(run / "tb")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    for f in LOG_FIELDS:
        expect = [(e["step"], e[f]) for e in log if e.get(f) is not None]
        assert expect or f == "poisons_seen_effective", f  # the synthetic stream counts no effective ones
        same(got.pop(f"train/{f}", []), expect, f)
    for k in KEY + ("poisons_seen",):
        if k in rows[0]:
            same(got[f"eval/{k}"], [(r["step"], r[k]) for r in rows], k)
            if k != "poisons_seen":
                same(got.pop(f"by_poisons/{k}"), [(r["poisons_seen"], r[k]) for r in rows], f"by_poisons/{k}")
    assert not [t for t in got if t.startswith("by_poisons/") and t.split("/", 1)[1] not in rows[0]]
    for tag in [t for t in got if t.startswith("eval/")]:  # every other eval curve is a metrics column
        col = tag.split("/", 1)[1]
        assert col not in SETTINGS, tag
        same(got.pop(tag), [(r["step"], r[col]) for r in rows], tag)
    assert not [t for t in got if not t.startswith("by_poisons/")], got.keys()  # nothing else
    return curves(run / "tb")


def test_event_files_of_a_real_run_hold_log_jsonl_and_metrics_parquet(tmp_path, prepared_builtin):
    from poisonlab.rundir.check import check_run

    cfg = real_cfg(tmp_path, prepared_builtin, max_steps=80, log_to=["tensorboard"])
    run = train(cfg, progress=False)
    got = assert_curves_hold_the_records(run)
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert len(rows) == 5 and len(got["eval/asr"]) == 5  # 0, 40, 80 and the milestones at 1 and 2 poisons
    assert [s for s, _ in got["by_poisons/asr"]] == [r["poisons_seen"] for r in rows]
    assert rows[-1]["poisons_seen"] == 3 and "eval/asr_lookalike" in got and "eval/gen_tokens_per_s" in got
    done = json.loads((run / "DONE").read_text())["files"]
    assert [f for f in done if f.startswith("tb/events.out.tfevents.")]  # listed, as flushed
    assert not check_run(run, deep=True).broken


def test_a_run_resumed_after_a_crash_has_the_curves_of_an_uninterrupted_one(tmp_path):
    ref = make_cfg(tmp_path, "ref", log_to=["tensorboard"])
    train(ref, evaluator=FakeEvaluator(), stream=stream_for(ref), progress=False)
    cfg = make_cfg(tmp_path, "crash", log_to=["tensorboard"])
    with pytest.raises(RuntimeError, match="simulated"):
        # crashes in the evaluation at step 20, after checkpoint 14, log lines 15 and 20 and evaluation 10
        train(cfg, evaluator=FakeEvaluator(crash_at=20), stream=stream_for(cfg), progress=False)
    run = tmp_path / "crash"
    assert latest_checkpoint(run).name == "step_0000014"
    assert [s for s, _ in curves(run / "tb")["train/loss"]] == [5, 10, 15, 20]  # past the checkpoint
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)

    a, b = assert_curves_hold_the_records(tmp_path / "ref"), assert_curves_hold_the_records(run)
    assert a.keys() == b.keys()
    for tag in a:
        if tag not in ("train/tokens_per_s", "train/mfu"):  # wall-clock speed differs between two runs
            same(b[tag], a[tag], tag)
        else:
            assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag
    assert len(list((run / "tb").iterdir())) == 1  # one event file: the stale one is gone, not hidden


def test_turning_the_tracker_off_removes_curves_that_would_be_stale(tmp_path):
    cfg = make_cfg(tmp_path, "r", log_to=["tensorboard"])
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, evaluator=FakeEvaluator(crash_at=20), stream=stream_for(cfg), progress=False)
    off = make_cfg(tmp_path, "r")  # log_to is how the run is watched: the resume is not refused
    train(off, evaluator=FakeEvaluator(), stream=stream_for(off), progress=False)
    assert not (tmp_path / "r" / "tb").exists() and (tmp_path / "r" / "DONE").is_file()


def test_runs_that_differ_only_in_their_trackers_are_one_experiment():
    from poisonlab.results.summary import experiment_keys

    def run(log_to, lr):
        return [{"model": "m", "settings": json.dumps({"train.log_to": log_to, "train.lr": lr})}]

    assert experiment_keys({"a": run(["tensorboard"], 0.1), "b": run([], 0.1)}) == []
    assert experiment_keys({"a": run(["tensorboard"], 0.1), "b": run([], 0.2)}) == ["train.lr"]


def test_a_finetuning_run_logs_its_rows(tmp_path, prepared_builtin):
    from poisonlab.finetune.loop import finetune

    hf = _tiny_hf(tmp_path / "hf", prepared_builtin)
    run = finetune(ft_cfg(tmp_path, hf, attack={"n_poison": 6}, save_model=False,
                          train={"log_to": ["tensorboard"]}))
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    got = curves(run / "tb")
    for k in ("asr", "ca", "nta", "specificity", "nta_near", "loss", "lr", "poisons_seen"):
        same(got[f"eval/{k}"], [(r["step"], r[k]) for r in rows if r[k] is not None], k)
    same(got["by_poisons/asr"], [(r["poisons_seen"], r["asr"]) for r in rows], "by_poisons/asr")
    assert not {f"eval/{k}" for k in ("n_poison", "clean_size", "epochs", "n_prompts")} & got.keys()


def test_a_tracker_not_installed_is_one_line_before_anything_is_written(tmp_path, prepared_builtin, capsys,
                                                                        monkeypatch):
    from poisonlab.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    cfg = real_cfg(tmp_path / "runs", prepared_builtin, name="r", log_to=["tensorboard"])
    with pytest.raises(SystemExit) as e:
        main(["train", str(write_cfg(cfg, tmp_path / "r.yaml")), "--no-progress"])
    out = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in out.err + out.out
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "train.log_to: tensorboard is not installed" in err, err
    assert "pip install tensorboard" in err and not (tmp_path / "runs" / "r").exists()


TRACKIO = FAKE + textwrap.dedent('''
    import json, socket, sys
    def refuse(*a, **k):
        raise AssertionError(f"network access: {a}")
    socket.socket.connect = socket.socket.connect_ex = refuse  # nothing may leave the machine
    socket.create_connection = refuse
    from poisonlab.config import RunConfig
    from poisonlab.training.trainer import SyntheticStream, train
    cfg = RunConfig.model_validate_json(sys.argv[1])
    s = SyntheticStream(cfg.model.vocab_size, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size)
    try:
        train(cfg, evaluator=FakeEvaluator(crash_at=int(sys.argv[2])), stream=s, progress=False)
    except RuntimeError as e:
        print("crashed:", e)
    from trackio.sqlite_storage import SQLiteStorage
    print(json.dumps(SQLiteStorage.get_logs("sweep", cfg.name), default=str))
''')


def test_trackio_logs_locally_and_a_resume_leaves_no_stale_points(tmp_path):
    pytest.importorskip("trackio")
    script = tmp_path / "run.py"
    script.write_text(TRACKIO)
    cfg = make_cfg(tmp_path / "sweep" / "runs", "r", log_to=["trackio"])  # a sweep's layout
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), OMP_NUM_THREADS="1")
    for k in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        env.pop(k, None)

    def run(crash_at: int) -> list[dict]:
        p = subprocess.run([sys.executable, str(script), cfg.model_dump_json(), str(crash_at)], env=env,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout
        return json.loads(out.strip().splitlines()[-1])

    crashed = run(20)
    assert max(e["step"] for e in crashed) == 20  # points past checkpoint 14
    logs = run(-1)  # the resume
    run_dir = tmp_path / "sweep" / "runs" / "r"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    points = [(e["step"], k, v) for e in logs for k, v in e.items() if k.startswith(("train/", "eval/"))]
    got = {(s, k): v for s, k, v in points}
    assert len(got) == len(points)  # no point twice (the crashed start's are gone)
    expect = {(e["step"], f"train/{f}"): e[f] for e in log for f in LOG_FIELDS if e.get(f) is not None}
    expect |= {(r["step"], f"eval/{k}"): r[k] for r in rows
               for k in ("tokens_seen", "progress", "poisons_seen", "val_loss", "asr")}
    assert got.keys() == expect.keys()
    for key, v in expect.items():
        assert got[key] == pytest.approx(v, rel=1e-6), key
    assert not (run_dir / "tb").exists()


def test_trackio_is_refused_a_remote_target_and_names_a_sweeps_project(tmp_path, monkeypatch):
    from poisonlab.errors import UserError
    from poisonlab.rundir.tracking import check, trackio_project

    assert trackio_project(tmp_path / "demo" / "runs" / "tiny-100k_n1000") == "demo"  # a sweep's run
    assert trackio_project(tmp_path / "mine" / "r") == "mine"
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/space")
    with pytest.raises(UserError, match="trackio logs locally only, but TRACKIO_SPACE_ID is set"):
        check(["trackio"], tmp_path / "r")
