"""A run as one submitit job of 2 tasks (ranks) on CPU, through submitit's local executor: the ranks
get their distributed environment from submitit and train FSDP; SIGUSR2 (Slurm's warning before a
time limit) makes the trainer checkpoint at the next step, submitit requeues the job, and the run
finishes from that checkpoint with the weights of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from poisonlab.config import RunConfig
from poisonlab.models.checkpoint import latest_checkpoint, load_model
from poisonlab.study.executors import Job, SubmititExecutor
from poisonlab.training.trainer import train


def slow_train(cfg: RunConfig) -> None:
    """The trainer, with each batch slowed so that the test can signal the job mid-run; each task
    leaves its pid so that the test can signal it as Slurm signals every task of a job."""
    from poisonlab.training import trainer as T

    rank = os.environ.get("RANK", "0")
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir).parent / f"pid-{rank}-{os.getpid()}").write_text(str(os.getpid()))
    make = T._default_stream

    def stream(*a, **k):
        s = make(*a, **k)
        batch = s.batch

        def slow(step):
            time.sleep(0.05)
            return batch(step)

        s.batch = slow
        return s

    T._default_stream = stream
    T.train(cfg, progress=False)


def cfg_for(tmp: Path, data: Path, name: str, parallel: str) -> RunConfig:
    return RunConfig.model_validate(dict(
        name=name, out_dir=str(tmp / "runs"), data=str(data), attack=dict(name="dos", n_poison=3, seed=0),
        model=dict(d_model=32, n_layers=2, n_heads=2, seq_len=64),
        train=dict(batch_size=8, max_steps=40, threads=1, log_every=5, lr=3e-3, parallel=parallel),
        eval=dict(every_steps=20, n_prompts=4, prompt_tokens=16, new_tokens=4, val_tokens=512,
                  save_samples=0)))


def _log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def test_two_task_job_trains_fsdp_and_is_requeued_on_the_timeout_signal(tmp_path, prepared_builtin):
    pytest.importorskip("submitit")
    cfg = cfg_for(tmp_path, prepared_builtin, "job", parallel="fsdp")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    run_dir = Path(cfg.run_dir)
    ex = SubmititExecutor(tmp_path / "slurm", threads=1, fn="test_submitit_tasks:slow_train", cluster="local",
                          parameters={"tasks_per_node": 2, "timeout_min": 10}, poll_s=0.2)
    outcomes = []
    worker = threading.Thread(target=ex.run, args=([Job("job", path, run_dir)], lambda j: None,
                                                   outcomes.append))
    worker.start()
    try:
        deadline = time.monotonic() + 240
        while not any(e.get("step", 0) >= 5 for e in _log(run_dir)):  # training, past step 5
            assert worker.is_alive() and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        for p in (tmp_path / "runs").glob("pid-*"):  # as Slurm does: every task of the job
            os.kill(int(p.read_text()), signal.SIGUSR2)
    finally:
        worker.join(timeout=300)
    assert not worker.is_alive()
    assert [o.status for o in outcomes] == ["done"], outcomes
    assert len(list((tmp_path / "runs").glob("pid-0-*"))) == 2  # rank 0 ran twice: requeued once
    assert len(list((tmp_path / "runs").glob("pid-1-*"))) == 2
    log = _log(run_dir)
    stops = [e["step"] for e in log if "event" in e]
    assert len(stops) == 1 and 5 <= stops[0] < 40  # checkpointed where it was stopped
    assert [e["step"] for e in log if "loss" in e] == list(range(5, 41, 5))  # then on to the end

    # the same weights as the run trained in one piece, in one process
    whole = cfg_for(tmp_path, prepared_builtin, "whole", parallel="ddp")
    train(whole, progress=False)
    a, b = load_model(run_dir), load_model(whole.run_dir)
    for (k, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=k)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_slurm_job_runs_as_srun_starts_it(tmp_path, prepared_builtin):
    """A run as a Slurm job of 2 nodes x 2 tasks, started as srun starts it: 4 processes of
    `python -m submitit.core._submit FOLDER` (the command in submitit's sbatch script), each with the
    variables Slurm sets per task (node id, global and node-local rank, the job's node list), loading
    the pickled job. Global and local ranks now differ (ranks 2 and 3 are local 0 and 1 on node 1):
    the run trains FSDP over 4 ranks, rank 0 alone writes the run, and the weights are those of one
    process; every task reports its result, rank 0's is "done". MASTER_PORT is set in the job's
    environment, as many sbatch scripts do (submitit's export refused to run over it before)."""
    submitit = pytest.importorskip("submitit")
    from submitit.core.utils import DelayedSubmission

    from poisonlab.study.executors import SubmititRun

    def cfg(name: str, parallel: str) -> RunConfig:
        c = cfg_for(tmp_path, prepared_builtin, name, parallel)
        c.train.max_steps, c.eval.every_steps = 12, 6
        return c

    job = cfg("nodes", "fsdp")
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude_unset=True)))
    folder, job_id = tmp_path / "slurm", "4242"
    folder.mkdir()
    DelayedSubmission(SubmititRun(str(path), 1, None, [])).dump(folder / f"{job_id}_submitted.pkl")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    base.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=job_id, SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
                SLURM_JOB_NODELIST="localhost,localhost", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
                POISONLAB_NO_PROGRESS="1")
    tasks = []
    for node in range(2):
        for local in range(2):
            rank = 2 * node + local
            env = dict(base, SLURM_NODEID=str(node), SLURM_PROCID=str(rank), SLURM_LOCALID=str(local))
            out = (folder / f"{job_id}_{rank}_log.out").open("w")
            tasks.append(subprocess.Popen([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)],
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [t.wait(timeout=300) for t in tasks]
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(folder.glob("*_log.out")))
    assert codes == [0, 0, 0, 0], logs
    results = [submitit.core.utils.pickle_load(folder / f"{job_id}_{r}_result.pkl") for r in range(4)]
    assert results[0] == ("success", "done"), logs
    assert all(r[0] == "success" for r in results), results
    assert (Path(job.run_dir) / "DONE").is_file()
    assert [e["step"] for e in _log(Path(job.run_dir)) if "loss" in e] == [5, 10, 12]
    assert len(list(latest_checkpoint(job.run_dir).glob("model-*-of-00004.safetensors"))) == 4  # 4 shards

    whole = cfg("whole", "ddp")
    train(whole, progress=False)
    a, b = load_model(job.run_dir), load_model(whole.run_dir)
    for (k, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=k)


def record_tasks(cfg) -> None:
    """A run function that records how many tasks its job has, from each task, and finishes."""
    import submitit

    from poisonlab.fsutil import write_text

    env = submitit.JobEnvironment()
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / f"task-{env.global_rank}").write_text(str(env.num_tasks))
    write_text(run / "DONE", "")


def test_a_fine_tuning_job_gets_one_task_a_pretraining_job_one_per_gpu(tmp_path, prepared_builtin):
    """Fine-tuning's loop is one process: with the sweep's Slurm settings asking for 2 tasks per node
    (one per GPU), its job still gets one task, while a pretraining job gets its 2 ranks."""
    pytest.importorskip("submitit")
    from poisonlab.study.executors import slurm_parameters

    pre = cfg_for(tmp_path, prepared_builtin, "pre", parallel="ddp")
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre.model_dump(mode="json", exclude_unset=True)))
    ft = {"kind": "finetune", "name": "ft", "out_dir": str(tmp_path / "runs"), "model": str(pre.run_dir)}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(ft))
    jobs = [Job("pre", tmp_path / "pre.yaml", Path(pre.run_dir)),
            Job("ft", tmp_path / "ft.yaml", tmp_path / "runs" / "ft")]
    ex = SubmititExecutor(tmp_path / "slurm", threads=1, fn="test_submitit_tasks:record_tasks",
                          cluster="local", parameters={"tasks_per_node": 2, "timeout_min": 5}, poll_s=0.2)
    outcomes = []
    ex.run(jobs, lambda j: None, outcomes.append)
    assert sorted((o.name, o.status) for o in outcomes) == [("ft", "done"), ("pre", "done")], outcomes
    assert sorted(p.name for p in (tmp_path / "runs" / "ft").glob("task-*")) == ["task-0"]
    assert (tmp_path / "runs" / "ft" / "task-0").read_text() == "1"
    assert sorted(p.read_text() for p in Path(pre.run_dir).glob("task-*")) == ["2", "2"]
    # on a cluster: one GPU for the one process, one task per GPU for the ranks
    gpus = {"gpus_per_node": 8, "nodes": 2}
    assert slurm_parameters(gpus, one=True) == {"gpus_per_node": 1, "nodes": 1, "tasks_per_node": 1}
    assert slurm_parameters(gpus, one=False) == {"gpus_per_node": 8, "nodes": 2, "tasks_per_node": 8}
