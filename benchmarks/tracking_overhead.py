"""What live curves cost: a run of the demo's settings with and without `train.log_to: [tensorboard]`.

The run is the demo preset's tiny-100k, N = 1000, seed 0 (its model, batch, lr, poisons, log_every and
evaluation schedule, as `poisonlab demo` expands it), on data prepared with the demo's corpus settings;
`--steps` cuts its budget (default: the demo's full run) and the data is prepared to fit. Each
repetition is a fresh process (`python -m poisonlab.cli train`, as a sweep starts a run), so the
logged side pays everything a user pays: importing tensorboard, opening the writer, every event, the
final flush. Sides alternate A B, B A, A B, ... so that the load of a shared machine falls on both
alike. Prints the machine, each repetition, the median and spread per side and the ratio of medians
(process wall time, and the trainer's own steps/s from log.jsonl); the last line is one JSON object.

    .venv/bin/python benchmarks/tracking_overhead.py [--reps 3] [--steps 300] [--threads 1]
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
import time
from pathlib import Path

import yaml

from poisonlab import hardware
from poisonlab.config import CorpusConfig
from poisonlab.study.spec import expand, load_spec, spec_tree


def demo_run(out: Path, data: Path, steps: int | None, threads: int, log_to: list[str]) -> dict:
    """The demo's tiny-100k N = 1000 seed-0 run, as a config tree (its settings as the preset gives them)."""
    run = next(r for r in expand(load_spec("demo"), out) if r.model == "tiny-100k" and r.n_poison == 1000
               and r.seed == 0)
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


def one(tree: dict, work: Path, side: str, i: int) -> dict:
    out = work / f"{side}-{i}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tree = dict(tree, out_dir=str(out))
    (out / "run.yaml").write_text(yaml.safe_dump(tree))
    env = dict(os.environ, OMP_NUM_THREADS=str(tree["train"]["threads"]), POISONLAB_NO_PROGRESS="1")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "poisonlab.cli", "train", str(out / "run.yaml"), "--no-progress"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    tps = statistics.median(e["tokens_per_s"] for e in log if "tokens_per_s" in e)
    events = sum(1 for _ in (out / "run" / "tb").iterdir()) if (out / "run" / "tb").is_dir() else 0
    shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # ~MBs per repetition
    return {"side": side, "rep": i, "wall_s": round(wall, 2), "tokens_per_s": tps, "event_files": events}


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
          f"{args.threads} thread(s); {args.reps} repetitions per side, alternating", flush=True)
    trees = {side: demo_run(args.work, data, args.steps, args.threads, log_to)
             for side, log_to in (("plain", []), ("tensorboard", ["tensorboard"]))}
    results = []
    for i in range(args.reps):
        order = ("plain", "tensorboard") if i % 2 == 0 else ("tensorboard", "plain")
        for side in order:
            r = one(trees[side], args.work, side, i)
            results.append(r)
            print(json.dumps(r), flush=True)
    by = {s: [r for r in results if r["side"] == s] for s in trees}
    for s, rs in by.items():
        print(f"{s:12s} wall s: {summary([r['wall_s'] for r in rs])}; train tokens/s: "
              f"{summary([r['tokens_per_s'] for r in rs])}")
    wall = statistics.median(r["wall_s"] for r in by["tensorboard"]) / statistics.median(
        r["wall_s"] for r in by["plain"])
    tps = statistics.median(r["tokens_per_s"] for r in by["plain"]) / statistics.median(
        r["tokens_per_s"] for r in by["tensorboard"])
    print(f"logged / plain: wall time x{wall:.3f}, time per training step x{tps:.3f} (ratio of medians)")
    end_load = hardware.describe_machine()["load_avg_1m"]
    print(json.dumps({"wall_ratio": round(wall, 4), "step_time_ratio": round(tps, 4), "steps": steps,
                      "reps": args.reps, "threads": args.threads, "results": results, "machine": machine,
                      "load_avg_1m_end": end_load}))


if __name__ == "__main__":
    main()
