"""Signals, as a terminal, Slurm, Kubernetes or an OOM killer send them, to `train` and to `sweep` in
their own processes. Ctrl-C: exit 130 naming the step; SIGTERM: a checkpoint at the next step, exit
143, and the resumed run ends bitwise equal to an uninterrupted one; a sweep takes its runs down with
it on any signal or death, leaving no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_train import TIMING_LOG, TIMING_METRICS, real_cfg, without, write_cfg

from poisonlab.config import load_run_config
from poisonlab.models.checkpoint import latest_checkpoint, list_checkpoints
from poisonlab.rundir import lock as runlock
from poisonlab.training.trainer import train

ENV = dict(os.environ, OMP_NUM_THREADS="1")
DEADLINE_S = 240


def log_steps(run: Path) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in (run / "log.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line)["step"])
    return out


def wait_for(cond, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert proc is None or proc.poll() is None, f"ended before {what}: {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _ctrl_c_as_in_a_terminal() -> None:
    # a suite started as a background job (`cmd &`, nohup) inherits SIGINT ignored, and poisonlab
    # rightly keeps it so; the children here stand for a command typed at a terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "poisonlab.cli", *args], env=ENV, text=True,
                            stderr=subprocess.PIPE, preexec_fn=_ctrl_c_as_in_a_terminal, **kw)


def test_train_ctrl_c_then_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, prepared_builtin):
    kw = dict(max_steps=400, checkpoint_every=200, log_every=5)
    ref = real_cfg(tmp_path / "ref", prepared_builtin, **kw)
    ref.eval.every_steps = 200
    train(ref, progress=False)
    cfg = real_cfg(tmp_path / "sig", prepared_builtin, **kw)
    cfg.eval.every_steps = 200
    path = write_cfg(cfg, tmp_path / "sig.yaml")
    run = load_run_config(path).run_dir
    args = ["train", str(path), "--no-progress"]

    p = cli(args)  # Ctrl-C (SIGINT): stops at once, says where, exit 130
    wait_for(lambda: len(log_steps(run)) >= 2, p, "two log lines")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at step" in err and "resume with the same command" in err
    assert not (run / "DONE").exists()

    p = cli(args)  # SIGTERM: a checkpoint at the next step boundary, exit 143
    wait_for(lambda: max(log_steps(run), default=0) >= 30 and len(log_steps(run)) >= 6, p, "step 30")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 143 and "Traceback" not in err, err
    step = int(err.split("stopped on SIGTERM at step ")[1].split(":")[0])
    assert "checkpoint written; resume with the same command" in err
    assert latest_checkpoint(run).name == f"step_{step:07d}"
    assert {"step": step, "event": "stopped on SIGTERM; checkpoint written"} in [
        json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]

    p = cli(args)  # and on to the end
    _, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 0, err
    assert f"resuming from step_{step:07d}" in err
    a, b = ref.run_dir, run
    assert [c.name for c in list_checkpoints(a)] == [c.name for c in list_checkpoints(b)]
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        assert (latest_checkpoint(a) / name).read_bytes() == (latest_checkpoint(b) / name).read_bytes(), name
    for name in ("ledger.parquet", "samples.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (pq.read_table(p / "metrics.parquet") for p in (a, b))
    assert without(ma, TIMING_METRICS) == without(mb, TIMING_METRICS)

    def log(p: Path) -> list[dict]:  # the trainer's lines, timings dropped (the stop's event line is extra)
        rows = [json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_LOG} for r in rows if "event" not in r]

    assert log(a) == log(b)


def sweep_spec(tmp: Path, data: Path, seeds: list[int]) -> Path:
    """Runs that would take minutes (the test stops them after a few steps)."""
    spec = {"name": "sig", "base": {
        "data": str(data), "model": {"d_model": 16, "n_layers": 1, "n_heads": 1, "seq_len": 32},
        "attack": {"n_poison": 2, "gibberish_tokens": [10, 20], "prefix_chars": [0, 50]},
        "train": {"max_steps": 20000, "batch_size": 4, "log_every": 5, "checkpoint_every": 10000,
                  "allow_data_repeat": True},
        "eval": {"n_evals": 1, "n_prompts": 2, "prompt_tokens": 8, "new_tokens": 4, "val_tokens": 64}},
        "grid": {"seed": seeds}}
    path = tmp / "sig.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True


@pytest.mark.parametrize("how", ["SIGTERM to the sweep", "SIGINT to its process group",
                                 "kill -9 of the sweep"])
def test_a_sweep_takes_its_runs_down_with_it(tmp_path, prepared_builtin, how):
    out = tmp_path / "sweep"
    seeds = [0, 1] if how.startswith("SIGTERM") else [0]  # two runs side by side, or one
    p = cli(["sweep", str(sweep_spec(tmp_path, prepared_builtin, seeds)), "--out", str(out), "--jobs",
             str(len(seeds)), "--no-report"], start_new_session=True)  # its own group, as a shell gives
    runs = [out / "runs" / f"d16l1_n002_x1.0_s{s}" for s in seeds]
    wait_for(lambda: all(len(log_steps(r)) >= 2 for r in runs), p, "both runs training")
    children = [runlock.read_holder(r)["pid"] for r in runs]
    assert all(alive(c) for c in children)
    if how.startswith("SIGTERM"):
        p.send_signal(signal.SIGTERM)
    elif how.startswith("SIGINT"):
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        p.kill()
    _, err = p.communicate(timeout=DEADLINE_S)
    wait_for(lambda: not any(alive(c) for c in children), None, "the runs to end")  # no orphans
    assert "Traceback" not in err, err
    if how.startswith("kill"):
        assert p.returncode == -signal.SIGKILL
    else:
        code = 143 if how.startswith("SIGTERM") else 130
        names = ", ".join(r.name for r in runs)
        assert p.returncode == code and f"{len(runs)} run(s) stopped ({names})" in err, err
        last = json.loads((out / "last_sweep.json").read_text())
        assert [o["status"] for o in last["outcomes"]] == ["stopped"] * len(runs)
    for r in runs:
        assert not (r / "FAILED").exists() and not (r / "DONE").exists()
        tail = (out / "logs" / f"{r.name}.log").read_text().strip().splitlines()[-1]
        if how.startswith("SIGINT"):
            assert tail.startswith("run-one: interrupted at step")
        else:  # the sweep's SIGTERM, or the kernel's when the sweep died: checkpointed where it stopped
            step = int(tail.split("stopped on SIGTERM at step ")[1].split(":")[0])
            assert latest_checkpoint(r).name == f"step_{step:07d}"
