"""`poisonlab sweep`, `status`, `plan`, `finetune` and `demo`: run the study (grids of runs, where they
stand, their cost, fine-tuning).

Only the demo's wrapper is here: demo.py imports the whole pipeline, which `poisonlab --help` should not
wait for.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional  # noqa: F401  (typer reads Optional at runtime)

import typer
from rich.console import Console

from poisonlab.errors import UserError

console = Console(stderr=True)


def sweep_cmd(
    spec: Annotated[str, typer.Argument(
        help="sweep YAML file or preset: demo, tiny-grid, ordering, persistence, language, density-ladder, "
        "finetune, real-cpt, real-finetune, gpu-small, paper")],
    out: Annotated[Optional[Path], typer.Option(help="sweep directory [default: sweeps/NAME]")] = None,  # noqa: UP045
    executor: Annotated[str, typer.Option(help="local | slurm | inline")] = "local",
    jobs: Annotated[Optional[int], typer.Option(help="runs side by side [default: 1/core]")] = None,  # noqa: UP045
    threads_per_job: Annotated[Optional[int], typer.Option(help="threads per run")] = None,  # noqa: UP045
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the expanded runs and stop")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value, e.g. train.lr=3e-3")] = None,  # noqa: UP045
    no_report: Annotated[bool, typer.Option("--no-report", help="skip the report at the end")] = False,
) -> None:
    """Run a grid of runs (sizes x poison counts x data budgets x seeds, or a fine-tuning grid);
    finished runs are skipped."""
    from rich.table import Table

    from poisonlab.study.spec import expand, load_spec, plan_rows, spec_tree
    from poisonlab.study.sweep import run_sweep

    tree, where = spec_tree(spec)
    if tree.get("kind") == "finetune":
        _finetune_sweep(tree, where, set_ or [], out, executor, jobs, threads_per_job, dry_run, no_report)
        return
    s = load_spec(spec, set_ or [])
    sweep_dir = out or Path("sweeps") / s.name
    if executor not in ("local", "slurm", "inline"):
        raise UserError(f"--executor {executor!r}: use local, slurm or inline")
    if dry_run:
        rows = plan_rows(expand(s, sweep_dir))
        table = Table(title=f"sweep {s.name}: {len(rows)} runs -> {sweep_dir}/runs")
        cols = {"name": "name", "params_nonemb": "params", "tokens": "tokens", "n_poison": "N",
                "data_mult": "data", "seed": "seed", "status": "status"}
        for c, head in cols.items():
            table.add_column(head, justify="left" if c in ("name", "status") else "right", no_wrap=True)
        for r in rows:
            table.add_row(*[str(r.get(c, "-")) for c in cols])
        Console().print(table)
        return
    res = run_sweep(s, sweep_dir, executor=executor, jobs=jobs, threads=threads_per_job,  # type: ignore[arg-type]
                    report=not no_report)
    console.print(res.summary_line(), highlight=False, soft_wrap=True)
    _say_not_done(res.outcomes, sweep_dir)
    if res.report:
        console.print(f"report: {res.report}")
    if not res.ok:  # a script chaining `sweep && report` must see that some run is not done
        sys.exit(1)


def _say_not_done(outcomes: list, sweep_dir: Path) -> None:
    """One line per run that did not end finished: failed, broken, stopped or busy, with its reason."""
    how = {"failed": ("red", " (see {run}/FAILED)"),
           "broken": ("red", " (poisonlab verify {dir}; train it again with --no-resume)"),
           "stopped": ("yellow", ""), "busy": ("yellow", "")}
    for o in outcomes:
        if o.status in how:
            color, where = how[o.status]
            run = o.extra.get("run_dir") or f"{sweep_dir}/runs/{o.name}"  # a stage's run lies elsewhere
            console.print(f"  [{color}]{o.status}[/] {o.name}: {o.error}" + where.format(dir=sweep_dir,
                          run=run), highlight=False, soft_wrap=True)


def _finetune_sweep(tree: dict, where: str, overrides: list[str], out: Path | None, executor: str,
                    jobs: int | None, threads: int | None, dry_run: bool, no_report: bool) -> None:
    from poisonlab.study.finetune_sweep import align_config, load_ft_spec, pretrain_dir, run_finetune_sweep
    from poisonlab.study.finetune_sweep import expand as ft_expand

    s = load_ft_spec(tree, where, overrides)
    sweep_dir = out or Path("sweeps") / s.name
    if dry_run:
        if s.pretrain is not None:
            console.print(f"pretrain -> {pretrain_dir(s, sweep_dir.absolute())}", highlight=False)
        if s.align is not None:
            a = align_config(s, sweep_dir.absolute())
            how = f"LoRA r={a.train.lora.r}" if a.train.lora else "full"
            console.print(f"align ({a.data.clean_size} examples x {a.train.epochs} epochs, {how}): "
                          f"{a.model} -> {a.run_dir}  {'done' if (a.run_dir / 'DONE').is_file() else 'todo'}",
                          highlight=False)
        runs = ft_expand(s, sweep_dir)
        for r in runs:
            state = "done" if (r.run_dir / "DONE").is_file() else "todo"
            console.print(f"{r.name}  N={r.attack.n_poison} clean={r.data.clean_size} "
                          f"{r.placement.schedule} seed={r.train.seed}  {state}", highlight=False)
        model = runs[0].model if runs else "-"
        console.print(f"{len(runs)} fine-tuning runs -> {sweep_dir}/runs (model: {model})", highlight=False)
        return
    outcomes, report = run_finetune_sweep(s, sweep_dir, executor=executor, jobs=jobs, threads=threads,
                                          report=not no_report)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    console.print(" · ".join(f"{v} {k}" for k, v in sorted(counts.items())), highlight=False)
    _say_not_done(outcomes, sweep_dir)
    if report:
        console.print(f"report: {report}")
    if any(o.status not in ("done", "skipped") for o in outcomes):
        sys.exit(1)


def status_cmd(
    sweep: Annotated[Path, typer.Argument(help="sweep directory (what `poisonlab sweep --out` wrote)")],
    as_json: Annotated[bool, typer.Option("--json", help="print every figure as JSON")] = False,
    jobs: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="runs side by side for the ETA [default: as many as run now]")] = None,
) -> None:
    """Where a sweep stands, while it runs: runs done, running (step, latest ASR, tokens/s, ETA),
    failed (with why), stopped and not started, and the sweep's ETA. Reads only."""
    import json

    from poisonlab.study.status import render, sweep_status

    st = sweep_status(sweep, jobs=jobs)
    if as_json:
        print(json.dumps(st.to_json(), indent=1))
        return
    Console(highlight=False).print(render(st))


def plan_cmd(
    spec: Annotated[str, typer.Argument(help="sweep YAML, preset (e.g. paper) or run config YAML")],
    gpu: Annotated[str, typer.Option(
        help="h100-80gb | h100-pcie | h200 | a100-80gb | a100-40gb | l40s | rtx-4090")] = "h100-80gb",
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs per node")] = 8,
    nodes: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="nodes per run [default: the fewest that fit]")] = None,
    mfu: Annotated[float, typer.Option(min=0.01, max=1.0, help="training MFU for GPU-hours")] = 0.4,
    eval_mfu: Annotated[float, typer.Option(min=0.001, max=1.0, help="MFU of generation")] = 0.05,
    set_: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--set", help="key=value, e.g. model.vocab_size=32768")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="the sweep directory whose disk is checked [default: sweeps/NAME; a run: its out_dir]")] = None,
) -> None:
    """Memory per GPU, the layout that fits (DDP or FSDP, micro-batch x accumulation, nodes), tokens
    and GPU-hours of every run of a sweep or of one run config, and the disk its runs not yet finished
    will fill against the space free at --out (the sweep refuses to start without it), before anything
    is launched. Exit 1 when a run does not fit its GPUs."""
    import json

    from poisonlab.config import load_run_config
    from poisonlab.study.plan import get_gpu, plan_runs
    from poisonlab.study.spec import expand, load_spec, spec_tree
    from poisonlab.study.sweep import check_disk, disk_line

    g = get_gpu(gpu)
    tree, _ = spec_tree(spec)  # a sweep file, a preset or a run config: all YAML
    if tree.get("kind") == "finetune":
        raise UserError(f"{spec}: a fine-tuning sweep; `plan` covers pretraining runs")
    prepare = None
    if "base" in tree or "grid" in tree:
        s = load_spec(spec, set_ or [])
        where = out or Path("sweeps") / s.name
        cfgs, title, prepare = [r.config for r in expand(s, where)], f"sweep {s.name}", s.prepare
    else:
        cfgs, title = [load_run_config(spec, set_ or [])], f"run {spec}"
        where = out or cfgs[0].out_dir
    plans, totals = plan_runs(cfgs, g, gpus_per_node=gpus_per_node, nodes=nodes, mfu=mfu,
                              eval_mfu=eval_mfu)
    todo = [c for c in cfgs if not (c.run_dir / "DONE").exists()]
    disk = check_disk(prepare, todo, Path(where))
    short = [e for e in disk.values() if e["free"] is not None and e["need"] > e["free"]]
    if as_json:
        typer.echo(json.dumps({"runs": [p.row() for p in plans], "totals": totals,
                               "disk": list(disk.values())}, indent=1))
    else:
        _print_plan(plans, totals, f"{title} on {g.name} x {gpus_per_node} per node")
        for e in disk.values():
            head = "[red]does not fit the disk:[/] " if e in short else "disk: "
            console.print(head + disk_line(e, len(todo)), highlight=False, soft_wrap=True)
    if totals["fit"] < totals["runs"]:  # the disk here may not be the cluster's: said, not an exit
        sys.exit(1)  # (typer.Exit's code is dropped by main's standalone_mode=False)


def _print_plan(plans: list, totals: dict, title: str) -> None:
    from rich.table import Table

    from poisonlab.study.plan import fmt_count

    # runs that differ only in N or seeds have one plan: one row per distinct plan, with its count
    groups: dict[tuple, list] = {}
    for p in plans:
        key = (p.model, p.tokens, p.strategy, p.activation_checkpointing, p.nodes, p.micro_batch,
               p.eval_batch)
        groups.setdefault(key, []).append(p)
    table = Table(title=title)
    for head in ("model", "runs", "tokens", "layout", "nodes", "micro x accum", "eval batch",
                 "GiB/GPU", "GPU-h/run"):
        table.add_column(head, justify="left" if head in ("model", "layout") else "right", no_wrap=True)
    notes = []
    for (model, tokens, *_), ps in groups.items():
        p = ps[0]
        # "+ ckpt": activation checkpointing (recomputed blocks)
        layout = (p.strategy + " + ckpt" * p.activation_checkpointing) if p.fits else "[red]no fit[/]"
        table.add_row(f"{model} ({fmt_count(p.params)})", str(len(ps)), fmt_count(tokens), layout,
                      str(p.nodes), f"{p.micro_batch} x {p.grad_accum}" if p.fits else "-", str(p.eval_batch),
                      f"{p.memory['peak']:.1f}/{p.usable_gib:.0f}",
                      f"{p.gpu_hours:,.1f}" if p.gpu_hours >= 1 else f"{p.gpu_hours:.2g}")
        if p.note:
            notes.append(f"  {model} at {fmt_count(tokens)} tokens: {p.note}")
    Console(width=max(110, Console().width)).print(table)
    for line in dict.fromkeys(notes):
        console.print(line, highlight=False)
    vocabs = sorted({p.vocab_size for p in plans})
    console.print(f"vocabulary {', '.join(map(str, vocabs))} (the data's tokenizer, else model.vocab_size; "
                  "--set model.vocab_size=V when the data is not prepared yet)", highlight=False)
    fsdp = f" ({totals['need_fsdp']} of them only under FSDP)" if totals["need_fsdp"] else ""
    console.print(f"{totals['fit']} of {totals['runs']} runs fit{fsdp}; "
                  f"{fmt_count(totals['tokens'])} tokens; "
                  f"{totals['gpu_hours']:,.0f} GPU-hours at MFU {totals['mfu']:.0%} (generation at "
                  f"{totals['eval_mfu']:.0%}); largest run {totals['max_nodes']} node(s)", highlight=False)


def finetune_cmd(
    config: Annotated[Path, typer.Argument(help="fine-tuning config YAML (docs/finetuning.md)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="e.g. attack.n_poison=50")] = None,  # noqa: UP045
    threads: Annotated[Optional[int], typer.Option(help="torch threads (train.threads)")] = None,  # noqa: UP045
) -> None:
    """Fine-tune a model (a poisonlab run or a local HF directory) on instruction data with N poisons,
    evaluating ASR, CA and NTA as it goes; a finished run is skipped."""
    from poisonlab.finetune.config import load_finetune_config
    from poisonlab.finetune.loop import finetune

    overrides = list(set_ or [])
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    cfg = load_finetune_config(config, overrides)
    done = (cfg.run_dir / "DONE").is_file()
    run = finetune(cfg, progress=True)
    console.print(f"run: {run}" + (" (already finished)" if done else ""), highlight=False)


def demo_cmd(
    out: Annotated[Path, typer.Option(help="demo directory (data, runs, report)")] = Path("runs/demo"),
    jobs: Annotated[Optional[int], typer.Option(help="runs side by side [default: 1/core]")] = None,  # noqa: UP045
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="sweep override, key=value")] = None,  # noqa: UP045
) -> None:
    """The study at toy scale: prepare, poison, train two sizes x N poisons, evaluate, report."""
    from poisonlab.cli.demo import run_demo

    run_demo(out, jobs=jobs, overrides=set_ or [])
