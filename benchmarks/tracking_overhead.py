"""What live curves cost: a run of the demo's settings with and without `train.log_to: [tensorboard]`.

The run is the demo preset's tiny-100k at N = 1000 (the demo's N until 2026-12-07), seed 0 (its model,
batch, lr, poisons, log_every and evaluation schedule, as `poisonlab demo` expands it), on data prepared
with the demo's corpus settings; `--steps` cuts its budget (default: the demo's full run) and the data
is prepared to fit. Each repetition is a fresh process (`python -m poisonlab.cli train`, as a sweep
starts a run), so the logged side pays everything a user pays: importing tensorboard, opening the
writer, every event, the final flush. Each repetition runs both sides at once, one thread each, side by
side as the demo runs its jobs (the one started first alternates), so that the load of a shared machine
falls on both alike. Measured per run: its own CPU time (user + system, from wait4: on a shared machine
the wall clock mostly measures the others' load), its wall time, and the trainer's tokens/s (log.jsonl).
Prints the machine, each run, median and range per side, the ratio of medians and the ratio within each
pair; the last line is one JSON object.

    .venv/bin/python benchmarks/tracking_overhead.py [--reps 3] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from poisonlab import hardware
from poisonlab.config import CorpusConfig
from poisonlab.study.spec import expand, load_spec, spec_tree


def demo_run(out: Path, data: Path, steps: int | None, threads: int, log_to: list[str]) -> dict:
    """The demo's tiny-100k seed-0 run at N = 1000, as a config tree (its settings as the preset gives)."""
    # N pinned to 1000, the demo's N when the overhead was measured (docs/training.md); the demo now uses 500
    spec = load_spec("demo", ["grid.n_poison=[1000]"])
    run = next(r for r in expand(spec, out) if r.model == "tiny-100k" and r.n_poison == 1000 and r.seed == 0)
    tree = json.loads(json.dumps(run.tree))  # the settings as the preset gives them (a sweep's child too)
    tree.update(name="run", out_dir=str(out), data=str(data))
    tree.setdefault("train", {}).update(threads=threads, log_to=log_to)
    if steps:
        tree["train"]["max_steps"] = steps
    return tree


def prepare_data(where: Path, tokens: int) -> Path:
    from poisonlab.corpus.prepare import prepare

    tree, _ = spec_tree("demo")
    cfg = CorpusConfig(**{**tree["prepare"], "max_tokens": tokens})
    out = where / f"data-{tokens}"
    if not (out / "train.json").is_file():
        prepare(cfg, out, progress=False)
    return out


def start(tree: dict, work: Path, side: str, i: int, out: dict) -> None:
    """Train one repetition in a fresh process; record its wall time and its own CPU time (wait4)."""
    d = work / f"{side}-{i}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "run.yaml").write_text(yaml.safe_dump(dict(tree, out_dir=str(d))))
    env = dict(os.environ, OMP_NUM_THREADS=str(tree["train"]["threads"]), POISONLAB_NO_PROGRESS="1")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "poisonlab.cli", "train", str(d / "run.yaml"), "--no-progress"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    run = d / "run"
    ok = p.returncode == 0 and (run / "DONE").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] if ok else []
    speeds = [e["tokens_per_s"] for e in log if "tokens_per_s" in e]
    cpu = usage.ru_utime + usage.ru_stime
    out.update(side=side, rep=i, ok=ok, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
               tokens_per_s=statistics.median(speeds) if speeds else None,
               event_files=len(list((run / "tb").iterdir())) if (run / "tb").is_dir() else 0)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # MBs per repetition


def pair(trees: dict, work: Path, i: int) -> list[dict]:
    """Both sides at once, side by side on one thread each (as the demo runs its jobs), so that they
    meet the same load; the side started first alternates."""
    order = list(trees) if i % 2 == 0 else list(trees)[::-1]
    outs = [{} for _ in order]
    threads = [threading.Thread(target=start, args=(trees[s], work, s, i, o))
               for s, o in zip(order, outs, strict=True)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join()
    return outs


def summary(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f}, n {len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="cut the run to this many steps (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "poisonlab-bench-tracking")
    args = ap.parse_args()
    import tensorboard  # noqa: F401  (the logged side needs it: fail here, not after the first side)

    machine = hardware.describe_machine()
    print(hardware.machine_line(machine), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    probe = demo_run(args.work, args.work, args.steps, args.threads, [])
    from poisonlab.config import RunConfig
    from poisonlab.training.resolve import resolve_run

    resolved = resolve_run(RunConfig.model_validate(probe))
    steps = resolved.n_steps
    tokens = int(steps * resolved.tokens_per_step * 1.25) + 400_000  # room for the poisons' documents
    data = prepare_data(args.work, tokens)
    print(f"run: demo tiny-100k N=1000 seed 0, {steps} steps, log_every {resolved.cfg.train.log_every}, "
          f"{args.threads} thread(s) each; {args.reps} repetitions, both sides at once", flush=True)
    trees = {side: demo_run(args.work, data, args.steps, args.threads, log_to)
             for side, log_to in (("plain", []), ("tensorboard", ["tensorboard"]))}
    results = []
    for i in range(args.reps):
        for r in pair(trees, args.work, i):
            results.append(r)
            print(json.dumps(r), flush=True)
    if not all(r["ok"] for r in results):
        raise SystemExit("a run failed: see its directory under " + str(args.work))
    by = {s: [r for r in results if r["side"] == s] for s in trees}
    for s, rs in by.items():
        print(f"{s:12s} CPU s: {summary([r['cpu_s'] for r in rs])}; wall s: "
              f"{summary([r['wall_s'] for r in rs])}; train tokens/s: "
              f"{summary([r['tokens_per_s'] for r in rs])}")
    ratios = {}
    for key in ("cpu_s", "wall_s"):
        per_pair = [b[key] / a[key] for a, b in zip(by["plain"], by["tensorboard"], strict=True)]
        ratios[key] = (statistics.median(r[key] for r in by["tensorboard"])
                       / statistics.median(r[key] for r in by["plain"]), per_pair)
        print(f"logged / plain, {key}: ratio of medians x{ratios[key][0]:.3f}; per pair "
              + ", ".join(f"x{x:.3f}" for x in per_pair))
    end_load = hardware.describe_machine()["load_avg_1m"]
    print(json.dumps({"cpu_ratio": round(ratios["cpu_s"][0], 4), "wall_ratio": round(ratios["wall_s"][0], 4),
                      "steps": steps, "reps": args.reps, "threads": args.threads, "results": results,
                      "machine": machine, "load_avg_1m_end": end_load}))


if __name__ == "__main__":
    main()
