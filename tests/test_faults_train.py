"""Faults a resume meets: damaged checkpoints, a missing or wrong ledger, unreadable run files, a
changed config. Each reproduced on a run the trainer wrote, and its outcome asserted: the resume goes
on from the newest intact checkpoint (and ends bitwise equal to an uninterrupted run), or it is
refused in one line naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_train import FakeEvaluator, assert_same_run, make_cfg, real_cfg, stream_for, write_cfg

from poisonlab.errors import UserError
from poisonlab.models.checkpoint import list_checkpoints, verify_checkpoint
from poisonlab.training.trainer import SyntheticStream, train

# 30 steps, checkpoints at 7, 14, 21, 28 and 30 (the last two kept), evaluations at 0, 10, 12, 20, 30


def crashed(tmp: Path, name: str) -> Path:
    """A run stopped by a crash in its evaluation at step 30, after its checkpoints at 21 and 28."""
    cfg = make_cfg(tmp, name, keep_checkpoints=2)
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, evaluator=FakeEvaluator(crash_at=30), stream=stream_for(cfg), progress=False)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_0000021", "step_0000028"]
    return cfg.run_dir


def resume(tmp: Path, name: str, capsys) -> str:
    cfg = make_cfg(tmp, name, keep_checkpoints=2)
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    cfg = make_cfg(tmp, "ref", keep_checkpoints=2)
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    return cfg.run_dir


@pytest.mark.parametrize("damage", ["random bytes in model.safetensors", "torn state.json",
                                    "one flipped byte in the optimizer state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, reference, capsys, damage):
    run = crashed(tmp_path, "r")
    newest = run / "checkpoints" / "step_0000028"
    if damage.startswith("random"):
        (newest / "model.safetensors").write_bytes(os.urandom(4096))
    elif damage.startswith("torn"):
        text = (newest / "state.json").read_text()
        (newest / "state.json").write_text(text[: len(text) // 2])
    else:
        data = bytearray((newest / "state.safetensors").read_bytes())
        data[-3] ^= 0x01
        (newest / "state.safetensors").write_bytes(bytes(data))
    assert verify_checkpoint(newest)
    err = resume(tmp_path, "r", capsys)
    assert "step_0000028: damaged" in err and "goes on from step_0000021" in err
    assert "resuming from step_0000021 (sha256 of every file matches its manifest)" in err
    assert_same_run(reference, run)  # the steps after 21 trained again: the same bits
    assert json.loads((run / "DONE").read_text())["files"]


def test_resume_without_an_intact_checkpoint_is_refused(tmp_path, capsys):
    run = crashed(tmp_path, "r")
    for ckpt in list_checkpoints(run):
        (ckpt / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"no intact checkpoint to resume from \(step_0000028: model"):
        resume(tmp_path, "r", capsys)
    assert len(list_checkpoints(run)) == 2  # nothing deleted: nothing to go on from


def test_an_older_checkpoint_without_a_manifest_resumes(tmp_path, reference, capsys):
    """Checkpoints written by an older version have no manifest: their headers are checked, and a
    truncated one is still told apart from an intact one."""
    run = crashed(tmp_path, "r")
    for ckpt in list_checkpoints(run):
        (ckpt / "manifest.json").unlink()
    model = run / "checkpoints" / "step_0000028" / "model.safetensors"
    os.truncate(model, model.stat().st_size - 10)
    err = resume(tmp_path, "r", capsys)
    assert "step_0000028: damaged (model.safetensors: not a whole safetensors file" in err
    assert "an older version's, without a manifest: headers checked" in err
    assert_same_run(reference, run)


def test_a_missing_ledger_is_rebuilt_and_checked_against_the_checkpoint(tmp_path, prepared_builtin, capsys):
    """The real stream: the ledger is a pure function of the settings; rebuilt, it equals the ledger of
    the run that wrote it, and agrees with the checkpoint's poisons seen. A stream that counts other
    poisons than the checkpoint saw refuses the resume."""
    cfg = real_cfg(tmp_path, prepared_builtin, max_steps=8, checkpoint_every=4, log_every=4)
    cfg.eval.every_steps, cfg.eval.poison_milestones = 4, []
    train(cfg, progress=False)
    run = cfg.run_dir
    ledger = (run / "ledger.parquet").read_bytes()
    (run / "DONE").unlink()  # as a run killed after its last checkpoint
    (run / "ledger.parquet").unlink()
    train(cfg, progress=False)
    err = capsys.readouterr().err
    seen = json.loads((run / "checkpoints" / "step_0000008" / "state.json").read_text())["poisons_seen"]
    assert f"ledger.parquet: missing; rebuilt from the run's settings (it agrees with the checkpoint at " \
           f"step 8: {seen} poisons seen)" in err and seen > 0
    assert (run / "ledger.parquet").read_bytes() == ledger
    (run / "DONE").unlink()
    (run / "ledger.parquet").write_bytes(ledger[:50])  # torn: rebuilt too
    train(cfg, progress=False)
    assert "ledger.parquet: unreadable" in capsys.readouterr().err
    assert (run / "ledger.parquet").read_bytes() == ledger
    # a placement that no longer gives the checkpoint's count: refused
    (run / "DONE").unlink()
    other = SyntheticStream(512, seq_len=64, batch_size=8, poison_every=1)
    with pytest.raises(UserError, match=rf"saw {seen} poisons, the placement rebuilt from the run's "
                                        r"settings 8.*resume refused"):
        train(cfg, stream=other, progress=False)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from poisonlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return e.value.code, captured.err


@pytest.mark.parametrize("fault", ["metrics.parquet truncated", "config.yaml not YAML",
                                   "state.json torn in every checkpoint"])
def test_unreadable_run_files_refuse_the_resume_in_one_line(tmp_path, prepared_builtin, capsys, fault):
    cfg = real_cfg(tmp_path / "runs", prepared_builtin, max_steps=8, checkpoint_every=4, log_every=4)
    cfg.eval.every_steps, cfg.eval.poison_milestones = 4, []
    path = write_cfg(cfg, tmp_path / "run.yaml")
    train(cfg, progress=False)
    run = cfg.run_dir
    (run / "DONE").unlink()
    if fault.startswith("metrics"):
        os.truncate(run / "metrics.parquet", 64)
        want = "metrics.parquet: unreadable"
    elif fault.startswith("config"):
        (run / "config.yaml").write_text("name: [unclosed\n")
        want = "config.yaml: unreadable"
    else:
        for ckpt in list_checkpoints(run):
            (ckpt / "state.json").write_text('{"step": ')
        want = "no intact checkpoint"
    code, err = run_cli(["train", str(path), "--no-progress"], capsys)
    last = err.strip().splitlines()[-1]  # (after the line saying which checkpoint it resumes from)
    assert code == 2 and last.startswith("error: ") and want in last, err


def test_a_changed_config_names_every_differing_key(tmp_path):
    cfg = make_cfg(tmp_path, "r", max_steps=2)
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    (cfg.run_dir / "DONE").unlink()
    other = make_cfg(tmp_path, "r", max_steps=2, lr=1e-3)
    other.data = tmp_path / "elsewhere"  # a top-level setting
    with pytest.raises(UserError) as e:
        train(other, evaluator=FakeEvaluator(), stream=stream_for(other), progress=False)
    msg = str(e.value)
    assert "different config (data: " in msg and "train.lr: 0.003 -> 0.001" in msg, msg
    assert "top level" not in msg


def test_a_missing_ledger_of_a_synthetic_stream_is_written_again(tmp_path, capsys):
    """The synthetic stream (benchmarks, tests) has no placement to check a ledger file against: a
    missing one is written again and the resume goes on."""
    cfg = make_cfg(tmp_path, "r", max_steps=10, checkpoint_every=5)
    with pytest.raises(RuntimeError):
        train(cfg, evaluator=FakeEvaluator(crash_at=10), stream=stream_for(cfg), progress=False)
    (cfg.run_dir / "ledger.parquet").unlink()
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    assert "ledger.parquet: missing; rebuilt" in capsys.readouterr().err
    assert pq.read_table(cfg.run_dir / "ledger.parquet").num_rows == 0
