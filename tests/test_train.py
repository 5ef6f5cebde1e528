"""The trainer: budget and schedule, run directory, skip when done, exact resume after a crash or SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from poisonlab.checkpoint import latest_checkpoint, list_checkpoints
from poisonlab.config import RunConfig
from poisonlab.model import count_params, resolve_model_config
from poisonlab.train import SyntheticStream, eval_steps, lr_at, total_steps, train

FAKE = textwrap.dedent('''
    import time
    import torch

    class FakeEvaluator:
        """Loss on a fixed batch, plus one sample; deterministic given the weights."""

        def __init__(self, sleep=0.0, crash_at=None):
            self.sleep, self.crash_at = sleep, crash_at

        def run(self, model, *, step):
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
    from poisonlab.train import SyntheticStream, train
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
