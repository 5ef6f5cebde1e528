"""`poisonlab status` on a sweep while it runs: one run finished, one failed, one held by another process
mid-training (a real trainer in a child process, its lock really held), one not started. Everything
from the real trainer and executor; status writes nothing and takes no lock."""

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

import poisonlab
from poisonlab.cli import main
from poisonlab.study.executors import THREAD_ENV, run_one
from poisonlab.study.spec import expand, load_spec
from poisonlab.study.status import sweep_status
from poisonlab.study.sweep import write_plan

SPEC = """
name: live
base:
  data: {data}
  model: {{preset: tiny-25k, seq_len: 64}}
  train: {{max_steps: 8, batch_size: 8, lr: 1.0e-2, log_every: 2}}
  attack: {{gibberish_tokens: [40, 80]}}
  eval: {{n_evals: 1, n_prompts: 4, prompt_tokens: 16, new_tokens: 8, val_tokens: 256, batch_size: 8}}
grid:
  model: [tiny-25k]
  n_poison: [0, 6]
  seed: [0, 1]
"""
DONE, FAILED, RUNNING, NEW = ("tiny-25k_n000_x1.0_s0", "tiny-25k_n006_x1.0_s0", "tiny-25k_n006_x1.0_s1",
                              "tiny-25k_n000_x1.0_s1")


def _edit(path: Path, section: str, **kw) -> None:
    tree = yaml.safe_load(path.read_text())
    tree.setdefault(section, {}).update(kw)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _log(run: Path) -> list[dict]:
    lines = []
    for line in (run / "log.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            lines.append(json.loads(line))
    return [e for e in lines if "tokens_per_s" in e]


def _wait(cond, what: str, child: subprocess.Popen, run: Path, err: Path, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        failed = (run / "FAILED").read_text() if (run / "FAILED").is_file() else ""
        assert child.poll() is None, (f"the training child ended ({child.returncode}) before {what}: "
                                      f"{failed[:2000]}{err.read_text()[-2000:]}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_status_of_a_running_sweep(prepared_builtin: Path, tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "live.yaml").write_text(SPEC.format(data=prepared_builtin))
    sweep = tmp_path / "sweep"
    write_plan(spec := load_spec(str(tmp_path / "live.yaml")), expand(spec, sweep), sweep)
    configs, runs = sweep / "configs", sweep / "runs"
    # long enough to catch it running (it would read the data 170 times over: let it)
    _edit(configs / f"{RUNNING}.yaml", "train", max_steps=100_000, allow_data_repeat=True)
    _edit(configs / f"{FAILED}.yaml", "model", vocab_size=64)  # smaller than the data's: it fails
    for k in THREAD_ENV:  # run_one pins them in this process: put them back afterwards
        monkeypatch.setenv(k, "1")
    env = dict(os.environ, PYTHONPATH=str(Path(poisonlab.__file__).parents[1]), POISONLAB_NO_PROGRESS="1")
    err = open(tmp_path / "child.err", "w")  # noqa: SIM115  (closed below; a pipe could fill and block it)
    child = subprocess.Popen([sys.executable, "-m", "poisonlab.study.sweep", "run-one",
                              str(configs / f"{RUNNING}.yaml"), "--threads", "1"], env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert run_one(configs / f"{DONE}.yaml", threads=1) == "done"
        assert run_one(configs / f"{FAILED}.yaml", threads=1) == "failed"
        live = runs / RUNNING
        _wait(lambda: (live / "metrics.parquet").is_file() and (live / "log.jsonl").is_file()
              and len(_log(live)) >= 3, "three log lines", child, live,
              tmp_path / "child.err")
        os.kill(child.pid, signal.SIGSTOP)  # mid-training, its lock held: the files hold still
        before = _tree(sweep)
        st = sweep_status(sweep)
        assert _tree(sweep) == before  # nothing written, not even the lock files
        by = {r.name: r for r in st.runs}
        assert {n: r.state for n, r in by.items()} == {DONE: "done", FAILED: "failed", RUNNING: "running",
                                                       NEW: "not started"}
        reason = (runs / FAILED / "FAILED").read_text().splitlines()[0]
        assert by[FAILED].reason == reason and "vocab_size 64" in reason

        r, log = by[RUNNING], _log(live)
        assert r.holder["pid"] == child.pid and r.step == log[-1]["step"] and r.total_steps == 100_000
        rows = pq.read_table(live / "metrics.parquet").to_pylist()
        assert (r.asr, r.asr_step) == (rows[-1]["asr"], rows[-1]["step"])
        # tokens/s of the last lines: their tokens over their time (each line's rate covers the
        # tokens since the line before)
        tail = log[-20:]
        laps = [(b["tokens_seen"] - a["tokens_seen"], b["tokens_per_s"])
                for a, b in zip(tail[:-1], tail[1:], strict=True)]
        assert r.tokens_per_s == pytest.approx(sum(t for t, _ in laps) / sum(t / v for t, v in laps))
        left = (100_000 - r.step) * 8 * 64
        eval_s = sum(x["eval_seconds"] for x in rows) / len(rows)
        assert r.evals_left == 1  # the one at the end
        assert r.eta_s == pytest.approx(left / r.tokens_per_s + eval_s)
        # one slot (one run runs now): the run not started waits for it; two slots: side by side
        new = by[NEW]
        assert new.eta_s > 0 and st.jobs == 1
        assert st.eta_s == pytest.approx(r.eta_s + new.eta_s)
        assert sweep_status(sweep, jobs=2).eta_s == pytest.approx(max(r.eta_s, new.eta_s), rel=0.05)

        monkeypatch.setenv("COLUMNS", "80")
        main(["status", str(sweep)])
        out = capsys.readouterr().out
        assert all(len(line) <= 80 for line in out.splitlines()), out
        assert RUNNING in out and "1 done · 1 running · 1 failed · 0 stopped · 1 not started" in out
        assert f"{r.step:,}/100,000" in out and "vocab_size 64" in out
        main(["status", str(sweep), "--json"])
        js = json.loads(capsys.readouterr().out)
        assert js["counts"] == {"done": 1, "running": 1, "failed": 1, "stopped": 0, "not started": 1}
        assert {x["name"]: x["state"] for x in js["runs"]}[RUNNING] == "running"

        # stopped by a signal: it checkpoints, lets go of its lock, and waits to be resumed
        os.kill(child.pid, signal.SIGTERM)
        os.kill(child.pid, signal.SIGCONT)
        child.wait(timeout=120)
        st = {x.name: x for x in sweep_status(sweep).runs}[RUNNING]
        ckpts = sorted((live / "checkpoints").glob("step_*"))
        assert st.state == "stopped" and st.step == int(ckpts[-1].name.removeprefix("step_")) > 0
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait()
        err.close()


def test_status_refuses_what_is_not_a_sweep(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["status", str(tmp_path)])
    assert e.value.code == 2 and "not a sweep directory" in capsys.readouterr().err
