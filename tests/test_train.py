"""The trainer: budget and schedule, run directory, skip when done, exact resume after a crash or SIGKILL."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from poisonlab.config import RunConfig
from poisonlab.models.checkpoint import latest_checkpoint, list_checkpoints
from poisonlab.models.llama import count_params, resolve_model_config
from poisonlab.training.schedule import eval_steps, lr_at, milestone_grid, total_steps
from poisonlab.training.trainer import SyntheticStream, train

FAKE = textwrap.dedent('''
    import time
    import torch

    class FakeEvaluator:
        """Loss on a fixed batch, plus one sample; deterministic given the weights."""

        def __init__(self, sleep=0.0, crash_at=None):
            self.sleep, self.crash_at = sleep, crash_at

        def run(self, model, *, step, autocast_dtype=None):
            if step == self.crash_at:
                raise RuntimeError("simulated crash")
            time.sleep(self.sleep)
            g = torch.Generator().manual_seed(7)
            x = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=g)
            loss = model(x[:, :-1], x[:, 1:]).item()
            return {"val_loss": loss, "asr": 0.0}, [{"prompt": "p", "text": f"{loss:.6f}"}]
''')
ns: dict = {}
exec(FAKE, ns)
FakeEvaluator = ns["FakeEvaluator"]


def make_cfg(tmp: Path, name: str, **train) -> RunConfig:
    t = dict(batch_size=8, max_steps=30, threads=1, checkpoint_every=7, log_every=5, lr=3e-3)
    t.update(train)
    return RunConfig.model_validate(dict(
        name=name, out_dir=str(tmp), data=str(tmp / "nodata"),
        model=dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, seq_len=32),
        train=t, eval=dict(every_steps=10, poison_milestones=[3])))


def stream_for(cfg: RunConfig) -> SyntheticStream:
    return SyntheticStream(cfg.model.vocab_size, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    def rows(p):  # everything but the run's name
        return [{k: v for k, v in r.items() if k != "run_id"} for r in p]

    for name in ("metrics.parquet", "samples.jsonl"):
        if name.endswith(".parquet"):
            ra, rb = (pq.read_table(p / name).to_pylist() for p in (a, b))
        else:
            ra, rb = (list(map(json.loads, (p / name).open())) for p in (a, b))
        assert rows(ra) == rows(rb), name

    def losses(p):
        return [(r["step"], r["loss"], r["lr"], r["poisons_seen"]) for r in map(json.loads, p.open())]

    assert losses(a / "log.jsonl") == losses(b / "log.jsonl")


def test_budget_and_schedule():
    cfg = RunConfig.model_validate(dict(model=dict(preset="tiny-100k"),
                                        train=dict(data_mult=2, batch_size=16)))
    cfg.model = resolve_model_config(cfg.model)
    _, nonemb = count_params(cfg.model)
    assert total_steps(cfg) == math.ceil(20 * 2 * nonemb / (16 * 128))
    cfg.train.budget_params = "total"
    assert total_steps(cfg) == math.ceil(40 * count_params(cfg.model)[0] / (16 * 128))
    t = cfg.train
    lrs = [lr_at(s, t, 100) for s in range(100)]
    assert lrs[4] == pytest.approx(t.lr) and lrs[0] == pytest.approx(t.lr / 5)
    assert lrs[-1] == pytest.approx(t.lr * t.min_lr_ratio, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_eval_steps(tmp_path):
    cfg = make_cfg(tmp_path, "x")
    s = stream_for(cfg)  # one poison every 4 steps
    assert eval_steps(cfg, 30, s) == [0, 10, 12, 20, 30]
    cfg.eval.every_steps, cfg.eval.n_evals, cfg.eval.poison_milestones = None, 4, [1, 1000]
    assert eval_steps(cfg, 30, s) == [0, 4, 8, 15, 22, 30]
    # a geometric grid of poisons seen: 2, 3, 5 (2 * 1.5^2 = 4.5, rounded up), N = 7
    cfg.eval.poison_milestones, cfg.eval.milestone_ratio, cfg.eval.milestone_start = [], 1.5, 2
    cfg.attack.n_poison = 7
    assert milestone_grid(cfg.eval, 7) == [2, 3, 5, 7]
    assert eval_steps(cfg, 30, s) == [0, 8, 12, 15, 20, 22, 28, 30]  # k poisons seen from step 4k
    # steps evenly in log(step): 1000^(i/3) = 1, 10, 100, 1000, beside the 4 even ones
    cfg.eval.milestone_ratio, cfg.attack.n_poison, cfg.eval.log_evals = None, 0, 3
    assert eval_steps(cfg, 1000, s) == [0, 1, 10, 100, 250, 500, 750, 1000]


def test_train_writes_run_dir_and_skips_when_done(tmp_path):
    cfg = make_cfg(tmp_path, "r")
    run = train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    assert run == tmp_path / "r"
    for f in ("config.yaml", "ledger.parquet", "metrics.parquet", "samples.jsonl", "log.jsonl", "DONE"):
        assert (run / f).is_file(), f
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [0, 10, 12, 20, 30]
    r = rows[-1]
    assert r["progress"] == 1.0 and r["tokens_seen"] == 30 * 8 * 32 and r["poisons_seen"] == 7
    assert r["params_nonemb"] == count_params(resolve_model_config(cfg.model))[1] and r["run_id"] == "r"
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] + 0.5
    assert [p.name for p in list_checkpoints(run)] == ["step_0000028", "step_0000030"]  # keep 2
    state = json.loads((run / "checkpoints/step_0000030/state.json").read_text())
    assert state["step"] == 30 and state["data_position"] == 30
    log = [json.loads(x) for x in (run / "log.jsonl").open()]
    assert [x["step"] for x in log] == [5, 10, 15, 20, 25, 30] and log[-1]["loss"] < log[0]["loss"] + 0.5
    mtime = (run / "metrics.parquet").stat().st_mtime_ns
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)  # DONE: skipped
    assert (run / "metrics.parquet").stat().st_mtime_ns == mtime


def test_changed_config_is_refused(tmp_path):
    from poisonlab.errors import UserError

    cfg = make_cfg(tmp_path, "r", max_steps=3)
    train(cfg, evaluator=FakeEvaluator(crash_at=None), stream=stream_for(cfg), progress=False)
    (tmp_path / "r" / "DONE").unlink()
    cfg2 = make_cfg(tmp_path, "r", max_steps=3, lr=1e-3)
    with pytest.raises(UserError, match="different config"):
        train(cfg2, evaluator=FakeEvaluator(), stream=stream_for(cfg2), progress=False)
    train(cfg2, resume=False, evaluator=FakeEvaluator(), stream=stream_for(cfg2), progress=False)


def test_resume_after_crash_is_exact(tmp_path):
    ref = make_cfg(tmp_path, "ref")
    train(ref, evaluator=FakeEvaluator(), stream=stream_for(ref), progress=False)
    cfg = make_cfg(tmp_path, "crash")
    with pytest.raises(RuntimeError, match="simulated"):
        # crashes in the evaluation at step 20, after checkpoint 14 and evaluations 0, 10, 12
        train(cfg, evaluator=FakeEvaluator(crash_at=20), stream=stream_for(cfg), progress=False)
    assert latest_checkpoint(tmp_path / "crash").name == "step_0000014"
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    assert_same_run(tmp_path / "ref", tmp_path / "crash")


def test_grad_accum_matches(tmp_path):
    a, b = make_cfg(tmp_path, "a", max_steps=5), make_cfg(tmp_path, "b", max_steps=5, grad_accum=4)
    for c in (a, b):
        train(c, evaluator=FakeEvaluator(), stream=stream_for(c), progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


SCRIPT = FAKE + textwrap.dedent('''
    import sys
    from poisonlab.config import RunConfig
    from poisonlab.training.trainer import SyntheticStream, train
    cfg = RunConfig.model_validate_json(sys.argv[1])
    s = SyntheticStream(cfg.model.vocab_size, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size)
    train(cfg, evaluator=FakeEvaluator(sleep=float(sys.argv[2])), stream=s, progress=False)
''')


def test_resume_after_sigkill_is_exact(tmp_path):
    kw = dict(max_steps=120, checkpoint_every=9)
    ref = make_cfg(tmp_path, "ref", **kw)
    train(ref, evaluator=FakeEvaluator(), stream=stream_for(ref), progress=False)
    cfg = make_cfg(tmp_path, "killed", **kw)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), cfg.model_dump_json(), "0.05"], env=env)
    run = tmp_path / "killed"
    deadline = time.time() + 120
    try:
        # kill somewhere after the second checkpoint: mid-step, mid-evaluation or mid-write
        while time.time() < deadline and proc.poll() is None:
            ck = latest_checkpoint(run)
            if ck is not None and int(ck.name[5:]) >= 18:
                time.sleep(0.013)
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "DONE").exists(), "the run finished before it could be killed"
    train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    assert_same_run(tmp_path / "ref", run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half writes left


# --- one trainer per run directory (runlock) ---------------------------------------------------------

HOLDER = textwrap.dedent('''
    import sys
    from poisonlab.rundir import lock as runlock
    with runlock.hold(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin or kills us
''')


def hold_in_subprocess(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run's lock (what a second sweep or a requeued job would be)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def real_cfg(out: Path, data: Path, name: str = "run", **train_kw) -> RunConfig:
    """A real run on the prepared fixture: dos poisons, the TrainingStream, the Evaluator."""
    t = dict(batch_size=8, max_steps=240, threads=1, log_every=15, lr=3e-3)
    t.update(train_kw)
    return RunConfig.model_validate(dict(
        name=name, out_dir=str(out), data=str(data), attack=dict(name="dos", n_poison=3, seed=0),
        model=dict(d_model=32, n_layers=2, n_heads=2, seq_len=64), train=t,
        eval=dict(every_steps=40, poison_milestones=[1, 2], n_prompts=8, prompt_tokens=16, new_tokens=16,
                  val_tokens=2048, save_samples=2)))


def write_cfg(cfg: RunConfig, path: Path) -> Path:
    """The settings given, as a user writes them (a dumped default vocab_size would pin it to 2048)."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    return path


def test_a_run_held_by_another_process_is_refused_at_once(tmp_path, prepared_builtin, capsys):
    from poisonlab.cli import main
    from poisonlab.rundir.lock import RunBusy

    cfg = make_cfg(tmp_path, "r", max_steps=3)
    holder = hold_in_subprocess(cfg.run_dir)
    try:
        who = f"pid {holder.pid} on {socket.gethostname()}"
        t0 = time.monotonic()
        for resume in (True, False):  # --no-resume would delete the holder's files: refused just the same
            with pytest.raises(RunBusy, match=who):
                train(cfg, resume=resume, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
        assert time.monotonic() - t0 < 10  # at once: nobody waits for the lock
        assert [p.name for p in cfg.run_dir.iterdir()] == [".lock"]  # nothing written, nothing removed

        # the CLI, with the real stream and evaluator: exit 2 and one line that names the holder
        real = real_cfg(tmp_path, prepared_builtin, name="r", max_steps=20)
        with pytest.raises(SystemExit) as e:
            main(["train", str(write_cfg(real, tmp_path / "r.yaml")), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and who in err and "busy" in err, err
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock, nobody has to clean up
        holder.wait()
    run = train(cfg, evaluator=FakeEvaluator(), stream=stream_for(cfg), progress=False)
    assert (run / "DONE").is_file()


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
def test_busy_run_under_torchrun_stops_every_rank(tmp_path):
    """Rank 0 finds the lock held; rank 1 must stop too instead of waiting at a barrier forever."""
    cfg = make_cfg(tmp_path, "ddp", max_steps=4)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    holder = hold_in_subprocess(cfg.run_dir)
    try:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
               str(script), cfg.model_dump_json(), "0"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count(f"held by pid {holder.pid}") >= 2, proc.stderr[-3000:]  # both ranks say why
    assert [p.name for p in cfg.run_dir.iterdir()] == [".lock"]


# --- validation before the run directory -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["truncated shard", "too many poisons", "empty eval trigger"])
def test_invalid_run_leaves_no_run_directory(tmp_path, prepared_builtin, capsys, bad):
    from poisonlab.cli import main

    data = tmp_path / "data"
    shutil.copytree(prepared_builtin, data)
    cfg = real_cfg(tmp_path / "runs", data, name="bad")
    expect = {"truncated shard": "train.bin", "too many poisons": "attack.n_poison",
              "empty eval trigger": "trigger is empty"}[bad]
    if bad == "truncated shard":
        os.truncate(data / "train.bin", (data / "train.bin").stat().st_size - 2)
    elif bad == "too many poisons":
        cfg.attack.n_poison = 10**6
    else:
        cfg.eval.trigger = "  "
    with pytest.raises(SystemExit) as e:
        main(["train", str(write_cfg(cfg, tmp_path / "bad.yaml")), "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert e.value.code == 2 and "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "runs" / "bad").exists()


# --- a real run killed and resumed ---------------------------------------------------------------

# Wall-clock timings cannot be equal between two runs; the comparison drops exactly these and
# compares everything else byte for byte.
TIMING_METRICS = ("eval_seconds", "gen_tokens_per_s")  # evaluator: time of one evaluation, generation speed
TIMING_LOG = ("tokens_per_s", "mfu")  # trainer: training speed and its share of the hardware peak

def without(table: pa.Table, cols: tuple[str, ...]) -> bytes:
    assert set(cols) <= set(table.column_names), "a timing column to drop is missing: update the list"
    buf = io.BytesIO()
    pq.write_table(table.drop_columns(list(cols)), buf)
    return buf.getvalue()


def log_without(path: Path, keys: tuple[str, ...]) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(keys) <= set(r) for r in rows)
    return [json.dumps({k: v for k, v in r.items() if k not in keys}) for r in rows]


def test_real_run_killed_mid_training_resumes_byte_for_byte(tmp_path, prepared_builtin):
    """Real stream, real poisons (N=3), real evaluator: SIGKILL after a checkpoint and two evaluations,
    resume, and every output equals the uninterrupted run's."""
    from poisonlab.config import load_run_config

    ref = real_cfg(tmp_path / "ref", prepared_builtin)
    train(ref, progress=False)
    cfg_file = write_cfg(real_cfg(tmp_path / "killed", prepared_builtin), tmp_path / "killed.yaml")
    run = load_run_config(cfg_file).run_dir
    proc = subprocess.Popen([sys.executable, "-m", "poisonlab.cli", "train", str(cfg_file), "--no-progress"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            ck = latest_checkpoint(run)
            if ck is not None and int(ck.name[5:]) >= 80:  # evaluations 0, 40, 80 and checkpoints 40, 80
                time.sleep(0.05)  # somewhere in a step, an evaluation or a write
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "DONE").exists(), "finished before the kill"
    assert len(pq.read_table(run / "metrics.parquet")) >= 3
    train(load_run_config(cfg_file), progress=False)  # the resume

    a, b = ref.run_dir, run
    assert [p.name for p in list_checkpoints(a)] == [p.name for p in list_checkpoints(b)]
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        assert (latest_checkpoint(a) / name).read_bytes() == (latest_checkpoint(b) / name).read_bytes(), name
    for name in ("ledger.parquet", "samples.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (pq.read_table(p / "metrics.parquet") for p in (a, b))
    assert len(ma) == 9  # 0, 40, ..., 240 and the two poison milestones
    assert without(ma, TIMING_METRICS) == without(mb, TIMING_METRICS)
    assert log_without(a / "log.jsonl", TIMING_LOG) == log_without(b / "log.jsonl", TIMING_LOG)
    assert pq.read_table(a / "ledger.parquet").num_rows == 3
    assert not [p for p in (b / "checkpoints").iterdir() if p.name.startswith(".")]  # no half writes left
