"""Sweeps: expansion, idempotence, failure isolation, the local and submitit executors, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_sweep_helpers import fake_run

from poisonlab.config import RunConfig, load_run_config
from poisonlab.errors import UserError
from poisonlab.injection.placement import describe
from poisonlab.study.spec import expand, list_presets, load_spec, plan_rows, run_name
from poisonlab.study.sweep import run_sweep, write_plan

SMALL = {
    "name": "small",
    "base": {"data": "data/x", "train": {"lr": 0.01}, "eval": {"n_prompts": 16}},
    "grid": {"model": ["tiny-25k", "tiny-100k"], "n_poison": [0, 50], "seed": [0, 1]},
}


def test_presets_expand_to_documented_counts(tmp_path: Path) -> None:
    assert {"demo", "tiny-grid", "gpu-small", "paper"} <= set(list_presets())
    runs = expand(load_spec("tiny-grid"), tmp_path)
    assert len(runs) == 81  # the paper's design less tiny-25k 0.5x N=1000 (69) + 12 N=0 controls
    poisoned = [r for r in runs if r.n_poison > 0]
    assert len(poisoned) == 69
    per_model = Counter((r.model, r.data_mult) for r in poisoned)
    assert per_model[("tiny-25k", 0.5)] == 6 and per_model[("tiny-100k", 2.0)] == 9
    assert ("tiny-400k", 2.0) not in per_model and per_model[("tiny-800k", 1.0)] == 9
    assert len(expand(load_spec("paper"), tmp_path)) == 72
    assert len(expand(load_spec("gpu-small"), tmp_path)) == 56
    assert len({r.name for r in runs}) == len(runs)


def test_the_ordering_preset_shares_its_references_with_the_tiny_grid(tmp_path: Path) -> None:
    """Its uniform N = 300 and N = 0 runs are the tiny-grid's (same names, same settings), so archived
    ones can be copied in; the rest cross density x window and density x frequency at N = 300."""
    runs = {r.name: r for r in expand(load_spec("ordering"), tmp_path)}
    grid = {r.name: r for r in expand(load_spec("tiny-grid"), tmp_path)}
    shared = sorted(n for n in runs if n in grid)
    assert shared == sorted(f"tiny-100k_n{n}_x1.0_s{s}" for n in ("000", "300") for s in range(3))
    assert all(runs[n].config == grid[n].config for n in shared)
    knobs = Counter(tuple(describe(r.config.placement).values()) for r in runs.values() if r.n_poison)
    assert len(runs) == 39 and set(knobs.values()) == {3}  # every placement with 3 seeds
    assert {k for k in knobs if k[2] is None} == {
        (w, pb, None) for w in ("all", "0-0.3333", "0.6667-1") for pb in (1, 2, 4)} | {("all", None, None)}
    assert {k for k in knobs if k[2] is not None} == {("all", 2, 1), ("all", 2, 5)}


@pytest.mark.parametrize("preset", ["demo", "tiny-grid", "ordering", "persistence", "language", "paper"])
def test_the_written_spec_expands_to_the_same_runs(preset: str, tmp_path: Path) -> None:
    """sweep.yaml as written, and a spec dumped in full as older sweeps wrote it: loading either gives
    the same runs (an `also` block that leaves an axis out must keep the grid's, not reset it)."""
    spec = load_spec(preset)
    names = [r.name for r in expand(spec, tmp_path)]
    write_plan(spec, expand(spec, tmp_path), tmp_path)
    assert [r.name for r in expand(load_spec(tmp_path / "sweep.yaml"), tmp_path)] == names
    full = yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))
    assert [r.name for r in expand(load_spec(full), tmp_path)] == names


def test_names_seeds_paths(tmp_path: Path) -> None:
    runs = expand(load_spec(SMALL), tmp_path / "sw")
    assert [r.name for r in runs][:3] == ["tiny-25k_n000_x1.0_s0", "tiny-25k_n000_x1.0_s1",
                                          "tiny-25k_n050_x1.0_s0"]
    assert len(runs) == 8
    r = next(r for r in runs if r.name == "tiny-100k_n050_x1.0_s1")
    c = r.config
    assert (c.train.seed, c.attack.seed, c.placement.seed) == (1, 1, 1)
    assert c.eval.seed == RunConfig().eval.seed  # same prompts and sampling in every run
    assert c.attack.n_poison == 50 and c.model.preset == "tiny-100k" and c.train.lr == 0.01
    assert c.run_dir == (tmp_path / "sw" / "runs" / r.name).absolute()
    assert c.data.is_absolute()
    assert run_name("m", 5, 0.25, 2, {"placement.schedule": "front"}) == "m_n005_x0.25_s2_schedule-front"


def test_seed_keys_axes_blocks_and_dict_models(tmp_path: Path) -> None:
    spec = {
        "base": {"attack": {"seed": 7}},
        "grid": {"model": [{"label": "w64", "d_model": 64, "n_layers": 2, "n_heads": 4}],
                 "n_poison": [10], "seed": [3],
                 "axes": {"placement.schedule": ["uniform", "front"]}},
        "also": [{"data_mult": [0.5], "axes": {}}],
        "seed_keys": ["train.seed"],
    }
    runs = expand(load_spec(spec), tmp_path)
    names = [r.name for r in runs]
    assert names == ["w64_n010_x1.0_s3_schedule-uniform", "w64_n010_x1.0_s3_schedule-front",
                     "w64_n010_x0.5_s3"]
    assert runs[1].config.placement.schedule == "front"
    assert runs[0].config.attack.seed == 7 and runs[0].config.train.seed == 3  # seed_keys respected
    assert runs[0].config.model.d_model == 64


def test_poison_seed_axis_crosses_the_training_seed(tmp_path: Path) -> None:
    """`poison_seed` sets the attack and placement seeds after `seed` set all three: seed x poison_seed
    varies the training seed and the poison set independently; names gain `_p<k>` only from that axis."""
    spec = load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [10], "seed": [0, 1],
                               "poison_seed": [5, 6]},
                      "also": [{"model": ["tiny-100k"], "poison_seed": [7]}]})
    runs = expand(spec, tmp_path)
    assert [r.name for r in runs] == ["tiny-25k_n010_x1.0_s0_p5", "tiny-25k_n010_x1.0_s0_p6",
                                      "tiny-25k_n010_x1.0_s1_p5", "tiny-25k_n010_x1.0_s1_p6",
                                      "tiny-100k_n010_x1.0_s0_p7", "tiny-100k_n010_x1.0_s1_p7"]
    seeds = {r.name: (r.config.train.seed, r.config.attack.seed, r.config.placement.seed, r.poison_seed)
             for r in runs}
    assert seeds["tiny-25k_n010_x1.0_s1_p5"] == (1, 5, 5, 5)
    assert seeds["tiny-100k_n010_x1.0_s0_p7"] == (0, 7, 7, 7)
    assert len({r.config.model_dump_json() for r in runs}) == 6  # six different runs
    # which keys it sets is the spec's: here the poison documents only, the placement follows `seed`
    one = expand(load_spec({"grid": {"n_poison": [1], "seed": [2], "poison_seed": [3]},
                            "poison_seed_keys": ["attack.seed"]}), tmp_path)[0]
    assert (one.config.train.seed, one.config.attack.seed, one.config.placement.seed) == (2, 3, 2)
    assert plan_rows([one], sizes=False)[0]["poison_seed"] == 3
    assert "poison_seed" not in plan_rows(expand(load_spec(SMALL), tmp_path), sizes=False)[0]
    assert run_name("m", 5, 1.0, 2, {"placement.schedule": "front"}, 4) == "m_n005_x1.0_s2_p4_schedule-front"


def test_overrides_and_errors(tmp_path: Path) -> None:
    s = load_spec("demo", ["train.lr=3e-3", "grid.seed=[0, 1, 2, 3]", "name=mine"])
    assert s.name == "mine"
    runs = expand(s, tmp_path)
    # 4 seeds x 2 sizes poisoned; the N = 0 controls keep seed 0
    assert len(runs) == 10 and all(r.config.train.lr == 3e-3 for r in runs)
    with pytest.raises(UserError, match="preset"):
        load_spec("no-such-preset")
    with pytest.raises(UserError, match="grid.n_poisons"):
        load_spec({"grid": {"n_poisons": [1]}})
    with pytest.raises(UserError, match="base.*train.lr"):
        load_spec({"base": {"train": {"lr": -1}}})
    with pytest.raises(UserError, match="run tiny-25k.*attack.n_poison"):
        expand(load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [-5]}}), tmp_path)


def test_child_config_keeps_only_explicit_fields(tmp_path: Path) -> None:
    """A preset's widths must not be shadowed by dumped defaults in the file the child reads."""
    res = run_sweep(load_spec(SMALL), tmp_path, executor="inline", run_fn=fake_run, progress=False,
                    report=False)
    assert res.count("done") == 8
    tree = yaml.safe_load((tmp_path / "configs" / "tiny-100k_n050_x1.0_s1.yaml").read_text())
    assert tree["model"] == {"preset": "tiny-100k"}
    cfg = load_run_config(tmp_path / "configs" / "tiny-100k_n050_x1.0_s1.yaml")
    assert cfg.model.model_fields_set == {"preset"}
    assert (tmp_path / "sweep.yaml").exists() and len(json.loads((tmp_path / "plan.json").read_text())) == 8


def test_idempotent_finished_runs_are_skipped(tmp_path: Path) -> None:
    calls: list[str] = []

    def counting(cfg: RunConfig) -> Path:
        calls.append(cfg.name)
        return fake_run(cfg)

    spec = load_spec(SMALL)
    first = run_sweep(spec, tmp_path, executor="inline", run_fn=counting, progress=False, report=False)
    assert first.count("done") == 8 and len(calls) == 8
    second = run_sweep(spec, tmp_path, executor="inline", run_fn=counting, progress=False, report=False)
    assert second.count("skipped") == 8 and len(calls) == 8  # nothing ran again
    assert "8 skipped" in second.summary_line()


def test_failure_is_recorded_and_isolated_then_retried(tmp_path: Path) -> None:
    def flaky(cfg: RunConfig) -> Path:
        if cfg.name == "tiny-25k_n050_x1.0_s1":
            raise RuntimeError("simulated crash")
        return fake_run(cfg)

    spec = load_spec(SMALL)
    res = run_sweep(spec, tmp_path, executor="inline", run_fn=flaky, progress=False, report=False)
    assert (res.count("done"), res.count("failed")) == (7, 1)
    failed = tmp_path / "runs" / "tiny-25k_n050_x1.0_s1" / "FAILED"
    text = failed.read_text()
    assert text.splitlines()[0] == "RuntimeError: simulated crash" and "Traceback" in text
    assert res.failed[0].error == "RuntimeError: simulated crash"
    again = run_sweep(spec, tmp_path, executor="inline", run_fn=fake_run, progress=False, report=False)
    assert (again.count("done"), again.count("skipped")) == (1, 7)
    assert not failed.exists()


def test_missing_done_counts_as_failure(tmp_path: Path) -> None:
    spec = load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [1]}})
    res = run_sweep(spec, tmp_path, executor="inline", run_fn="test_sweep_helpers:fake_run_no_done",
                    progress=False, report=False)
    assert res.count("failed") == 1 and "DONE was not written" in res.failed[0].error


def test_local_executor_subprocesses_threads_and_failure(tmp_path: Path) -> None:
    spec = load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [0, 50, 100]}})
    res = run_sweep(spec, tmp_path, executor="local", jobs=2, threads=1,
                    run_fn="test_sweep_helpers:fake_run_fails_at_50", progress=False, report=False,
                    poll_s=0.05)
    assert (res.count("done"), res.count("failed")) == (2, 1)
    bad = tmp_path / "runs" / "tiny-25k_n050_x1.0_s0"
    text = (bad / "FAILED").read_text()
    assert text.startswith("ValueError: boom") and "last lines of" in text
    assert (tmp_path / "logs" / "tiny-25k_n050_x1.0_s0.log").exists()
    env = json.loads((tmp_path / "runs" / "tiny-25k_n100_x1.0_s0" / "env.json").read_text())
    assert env["OMP_NUM_THREADS"] == "1" and env["threads"] == 1  # pinned in the child


def test_local_executor_kill_is_recorded(tmp_path: Path) -> None:
    spec = load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [3]}})
    res = run_sweep(spec, tmp_path, executor="local", jobs=1, run_fn="test_sweep_helpers:fake_run_dies",
                    progress=False, report=False, poll_s=0.05)
    assert res.count("failed") == 1 and "exit code 9" in res.failed[0].error


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_submitit_executor(tmp_path: Path, cluster: str) -> None:
    pytest.importorskip("submitit")
    spec = load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [0, 50]}})
    res = run_sweep(spec, tmp_path, executor="slurm", slurm_cluster=cluster, threads=1,
                    run_fn="test_sweep_helpers:fake_run_fails_at_50", progress=False, report=False,
                    poll_s=0.1)
    assert (res.count("done"), res.count("failed")) == (1, 1)
    assert (tmp_path / "runs" / "tiny-25k_n000_x1.0_s0" / "DONE").exists()
    assert (tmp_path / "runs" / "tiny-25k_n050_x1.0_s0" / "FAILED").read_text().startswith("ValueError")


def test_cli_dry_run_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from poisonlab.cli import main

    main(["sweep", "demo", "--dry-run", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "tiny-100k_n500_x1.0_s1" in out and "6 runs" in out
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit) as e:
        main(["sweep", "nope"])
    assert e.value.code == 2


def test_progress_display_eta() -> None:
    from rich.console import Console

    from poisonlab.study.executors import Job, Outcome
    from poisonlab.study.sweep import SweepProgress

    p = SweepProgress(total=5, skipped=1, slots=2)
    first = Job("a1", Path("c"), Path("d"), "small", 1.0)
    p.start(first)
    p.finish(Outcome("a1", "done", 10.0))
    p.start(Job("a2", Path("c"), Path("d"), "small", 2.0))  # same model, twice the data: ~20 s
    p.start(Job("b1", Path("c"), Path("d"), "big", 1.0))  # unknown model: the mean, 10 s
    assert p.eta(remaining_queued=1) == pytest.approx((20 + 10 + 10) / 2, abs=0.5)
    console = Console(width=120, record=True)
    console.print(p.render())
    text = console.export_text()
    assert "2/5 runs finished" in text and "a2" in text and "ETA 0:2" in text


def test_missing_data_is_one_error_up_front(tmp_path: Path) -> None:
    spec = load_spec({"base": {"data": str(tmp_path / "nowhere")}, "grid": {"n_poison": [1, 2]}})
    with pytest.raises(UserError, match="data not prepared"):
        run_sweep(spec, tmp_path / "sw", executor="inline", progress=False, report=False)


# --- runs trained by another process (runlock) -----------------------------------------------------

HOLDER = textwrap.dedent('''
    import sys
    from poisonlab.rundir import lock as runlock
    with runlock.hold(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
''')


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_busy_run_is_reported_as_busy_and_left_alone(tmp_path: Path, executor: str) -> None:
    """A second sweep over a run that another live process trains: `busy` with who holds it, no FAILED
    written over the live run, its files untouched; the next sweep after the holder is gone runs it."""
    spec = load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [0, 50]}})
    live = tmp_path / "runs" / "tiny-25k_n050_x1.0_s0"
    live.mkdir(parents=True)
    (live / "log.jsonl").write_text('{"step": 10}\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(live)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    fn = fake_run if executor == "inline" else "test_sweep_helpers:fake_run"
    kw = dict(executor=executor, jobs=1, threads=1, run_fn=fn, progress=False, report=False, poll_s=0.05)
    try:
        res = run_sweep(spec, tmp_path, **kw)
    finally:
        holder.kill()
        holder.wait()
    assert (res.count("done"), res.count("busy"), res.count("failed")) == (1, 1, 0)
    busy = next(o for o in res.outcomes if o.status == "busy")
    assert busy.name == live.name and f"held by pid {holder.pid}" in busy.error
    assert "1 busy" in res.summary_line()
    assert sorted(p.name for p in live.iterdir()) == [".lock", "log.jsonl"]
    assert (live / "log.jsonl").read_text() == '{"step": 10}\n'
    again = run_sweep(spec, tmp_path, **kw)  # the holder is dead: its lock went with it
    assert (again.count("done"), again.count("skipped")) == (1, 1)


def test_run_taken_between_the_look_and_the_start_is_busy(tmp_path: Path) -> None:
    from poisonlab.rundir import lock as runlock

    def taken(cfg: RunConfig) -> Path:
        # the first hold stands for another process that took the lock just now; the second is what
        # train() then meets: RunBusy
        with runlock.hold(cfg.run_dir), runlock.hold(cfg.run_dir):
            raise AssertionError("not reached")

    spec = load_spec({"grid": {"model": ["tiny-25k"], "n_poison": [1]}})
    res = run_sweep(spec, tmp_path, executor="inline", run_fn=taken, progress=False, report=False)
    assert res.count("busy") == 1 and not list((tmp_path / "runs").glob("*/FAILED"))
