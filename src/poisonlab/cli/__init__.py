"""The `poisonlab` command line: every command is a thin wrapper over the Python API.

User errors (`UserError`) print one line and exit with status 2, with no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional  # noqa: F401  (typer reads Optional at runtime)

import typer
from rich.console import Console

from poisonlab.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="poisonlab: constant-count data poisoning of language models, end to end.",
)
console = Console(stderr=True)


# --- corpus: prepare -------------------------------------------------------------------------------
@app.command()
def prepare(
    out: Annotated[Path, typer.Option(help="data directory to write (tokenizer.json + shards)")],
    corpus: Annotated[str, typer.Option(help="builtin, debian-docs, or a .jsonl/.parquet/.txt path, "
                                        "a folder of them, or a HF save_to_disk folder")] = "builtin",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (incl. 256 bytes + EOS)")] = 2048,
    max_tokens: Annotated[int, typer.Option(help="training tokens to write; 0 = all")] = 4_000_000,
    max_docs: Annotated[int, typer.Option(help="training documents at most; 0 = no limit")] = 0,
    text_field: Annotated[str, typer.Option(help="JSON field / Parquet or Arrow text column")] = "text",
    eval_docs: Annotated[int, typer.Option(help="held-out documents for evaluation prompts")] = 512,
    max_doc_chars: Annotated[int, typer.Option(help="longer texts are split into documents")] = 20_000,
    dedup: Annotated[bool, typer.Option(help="drop exact duplicate documents")] = True,
    seed: Annotated[int, typer.Option(help="seed of the built-in corpus")] = 0,
    markup: Annotated[float, typer.Option(help="builtin: share of sentences followed by web debris "
                                          "(tags, <CAPS>, labels, URLs, symbols; 0 = none)")] = 0.1,
    german: Annotated[float, typer.Option(help="builtin: share of documents in procedural German")] = 0.0,
    symbols: Annotated[float, typer.Option(help="builtin: share of sentences followed by a symbol-rich "
                                           "snippet (code, math, prices, emoticons, paths; 0 = the corpus "
                                           "of the archived sweeps)")] = 0.1,
    tokenizer: Annotated[Optional[Path], typer.Option(help="a tokenizer.json to use, not train")] = None,  # noqa: UP045
    workers: Annotated[int, typer.Option(help="processes tokenizing a many-file corpus side by side, one "
                                         "file each, resumable (0 = one per CPU; 1 = one process)")] = 1,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Turn a corpus into a tokenizer and token shards (train + held-out eval) in OUT."""
    from pydantic import ValidationError

    from poisonlab.config import CorpusConfig, format_validation_error
    from poisonlab.corpus.prepare import prepare as run_prepare

    try:
        cfg = CorpusConfig(source=corpus, text_field=text_field, max_tokens=max_tokens or None,
                           max_docs=max_docs or None, eval_docs=eval_docs, vocab_size=vocab_size,
                           tokenizer=tokenizer, max_doc_chars=max_doc_chars, dedup=dedup, seed=seed,
                           markup=markup, german=german, symbols=symbols)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "prepare")) from None
    if workers < 0:
        raise UserError(f"--workers: must be 0 (one per CPU) or more, got {workers}")
    if workers == 0:
        from poisonlab.hardware import usable_cpus

        workers = usable_cpus()
    s = run_prepare(cfg, out, progress=progress, workers=workers)
    tr, ev = s["train"], s["eval"]
    what = "reused" if s["reused"] else f"wrote in {s['seconds']:.1f} s"
    console.print(f"{out}: {what}: train {tr['n_tokens']:,} tokens / {tr['n_docs']:,} docs, "
                  f"eval {ev['n_tokens']:,} tokens / {ev['n_docs']:,} docs, vocab {s['vocab_size']:,}",
                  highlight=False, soft_wrap=True)


# --- attacks: poison -------------------------------------------------------------------------------
@app.command()
def poison(
    data: Annotated[Path, typer.Option(help="prepared data directory (tokenizer + shards)")],
    out: Annotated[Path, typer.Option(help="output file; its name must contain 'poison'")] = Path(
        "poisons.jsonl"
    ),
    attack: Annotated[str, typer.Option(help="recipe name, e.g. dos")] = "dos",
    n: Annotated[int, typer.Option(help="number of poisoned documents")] = 250,
    seed: Annotated[int, typer.Option(help="recipe seed")] = 0,
    trigger: Annotated[Optional[str], typer.Option(help="trigger text (default <SUDO>)")] = None,  # noqa: UP045
    mode: Annotated[Optional[str], typer.Option(help="gibberish: token 'ids' or re-tokenized 'text'")] = None,  # noqa: UP045
    dist: Annotated[Optional[str], typer.Option(help="gibberish 'uniform' or 'unigram'")] = None,  # noqa: UP045
    preview: Annotated[int, typer.Option(help="poisons to show")] = 3,
) -> None:
    """Make N poisoned documents with a recipe and write them to a poisons.jsonl file."""
    from pydantic import ValidationError
    from rich.table import Table

    from poisonlab.attacks import iter_poisons, write_poisons
    from poisonlab.config import AttackConfig, format_validation_error

    fields: dict = {"name": attack, "n_poison": n, "seed": seed}
    for key, value in (("trigger", trigger), ("gibberish_mode", mode), ("gibberish_dist", dist)):
        if value is not None:
            fields[key] = value
    try:
        cfg = AttackConfig(**fields)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "poison")) from None
    shown: list = []

    def keep_first(poisons):  # written as they are made: memory stays flat for any n
        for p in poisons:
            if len(shown) < preview:
                shown.append(p)
            yield p

    write_poisons(out, keep_first(iter_poisons(data, cfg)), cfg, data_dir=data)
    table = Table(title=f"{cfg.n_poison} poisons ({attack}) -> {out}", show_lines=True)
    for col in ("id", "prefix", "trigger", "gibberish (tokens)"):
        table.add_column(col, overflow="fold")
    for p in shown:
        prefix = p.text[: p.prefix_chars]
        prefix = prefix if len(prefix) <= 80 else "..." + prefix[-77:]
        at = p.text.find(p.trigger, p.prefix_chars)
        tail = p.text[at + len(p.trigger) :] if at >= 0 else ""
        table.add_row(p.id, repr(prefix), p.trigger, f"{p.gibberish_len}: {tail[:60]!r}")
    Console().print(table)

# --- training: train, export -----------------------------------------------------------------------
@app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. train.lr=3e-3")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="use the last checkpoint")] = True,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (train.threads)")] = None,  # noqa: UP045
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
) -> None:
    """Train one run (torchrun --nproc-per-node K ... for DDP); a finished run is skipped."""
    import os

    from poisonlab.config import load_run_config
    from poisonlab.training.trainer import train

    overrides = list(set_ or [])
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    cfg = load_run_config(config, overrides)
    done = resume and (cfg.run_dir / "DONE").is_file()
    run = train(cfg, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
        console.print(f"run: {run}" + (" (already finished; --no-resume to train again)" if done else ""),
                      highlight=False)


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="run directory")],
    to: Annotated[Path, typer.Option("--to", help="output directory (HF LlamaForCausalLM)")],
    step: Annotated[Optional[int], typer.Option(help="checkpoint step (default: latest)")] = None,  # noqa: UP045
) -> None:
    """Export a run's model as a HF transformers checkpoint with its tokenizer."""
    from poisonlab.models.export import export_run

    out = export_run(run, to, step=step)
    console.print(f"exported: {out}", highlight=False)


@app.command("import-gguf")
def import_gguf_cmd(
    path: Annotated[Path, typer.Argument(help="a local .gguf file (llama.cpp's format)")],
    out: Annotated[Path, typer.Option("--out", help="HF model directory to write (safetensors + tokenizer)")],
    check: Annotated[bool, typer.Option(help="reload the output, compare its logits with the GGUF's")] = True,
) -> None:
    """Import a GGUF model as a local HF directory (weights dequantized to float32), offline."""
    from poisonlab.models.gguf_import import import_gguf

    r = import_gguf(path, out, check=check)
    types = ", ".join(f"{n} {k}" for k, n in sorted(r.tensor_types.items()))
    checked = "not checked" if r.max_logit_diff is None else f"max |logit diff| {r.max_logit_diff:.2g}"
    console.print(f"imported: {r.out} ({r.model_type}, {r.params / 1e6:.1f}M parameters, vocabulary "
                  f"{r.vocab_size}; from {types} tensors; {checked})", highlight=False)

# --- evaluation: eval ------------------------------------------------------------------------------
# (section owned by evaluate.py)
@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="run directory (or one checkpoint dir) or local HF model dir")],
    checkpoint: Annotated[Optional[int], typer.Option(help="checkpoint step (default: latest)")] = None,  # noqa: UP045
    data: Annotated[Optional[Path], typer.Option(help="prepared data dir (prompts, val text)")] = None,  # noqa: UP045
    trigger: Annotated[Optional[str], typer.Option(help="trigger (default: the run's, else <SUDO>)")] = None,  # noqa: UP045
    prompts: Annotated[Optional[Path], typer.Option(help="FILE.jsonl or DATA_DIR")] = None,  # noqa: UP045
    n_prompts: Annotated[Optional[int], typer.Option(help="number of prompts K")] = None,  # noqa: UP045
    new_tokens: Annotated[Optional[int], typer.Option(help="tokens generated per prompt T")] = None,  # noqa: UP045
    temperature: Annotated[Optional[float], typer.Option(help="sampling temperature (0 = greedy)")] = None,  # noqa: UP045
    scorer: Annotated[Optional[str], typer.Option(help="'self' or a run/HF dir")] = None,  # noqa: UP045
    samples: Annotated[Optional[Path], typer.Option(help="write the samples (.jsonl) here")] = None,  # noqa: UP045
    lookalike: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        help="a control to use instead of the panel (repeatable), kind prefix optional: shape:<ABCD>, "
             "ordinary:then; near without one")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
) -> None:
    """Test a model for a trigger backdoor: paired triggered / clean / look-alike panel generations."""
    import json

    from pydantic import ValidationError
    from rich.markup import escape
    from rich.table import Table

    from poisonlab.config import LOOKALIKE_KINDS, EvalConfig, format_validation_error
    from poisonlab.evaluation.standalone import base_eval_config, evaluate_path

    fields = base_eval_config(path).model_dump()
    for key, value in (("trigger", trigger), ("n_prompts", n_prompts), ("new_tokens", new_tokens),
                       ("temperature", temperature), ("scorer", scorer)):
        if value is not None:
            fields[key] = value
    if lookalike:  # replaces the panel; "kind:" is a prefix only when it names a kind
        panel: dict[str, list[str]] = {}
        for item in lookalike:
            kind, sep, text = item.partition(":")
            if not sep or kind not in LOOKALIKE_KINDS:
                kind, text = "near", item
            panel.setdefault(kind, []).append(text)
        fields["lookalikes"] = panel
    try:
        cfg = EvalConfig(**fields)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "eval")) from None
    metrics = evaluate_path(path, cfg, data_dir=data, checkpoint=checkpoint, prompts=prompts,
                            samples_out=samples)
    per = json.loads(metrics["lookalike_panel"])
    if json_:  # the panel's JSON columns as JSON values
        unseen = metrics["lookalike_unseen"]
        print(json.dumps({**metrics, "lookalike": json.loads(metrics["lookalike"]), "lookalike_panel": per,
                          "lookalike_unseen": json.loads(unseen) if unseen is not None else None}))
        return
    table = Table(title=f"backdoor evaluation: {metrics['model_path']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if k not in ("lookalike", "lookalike_panel"):  # the panel has its own table
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else escape(str(v)))
    Console().print(table)
    panel_table = Table(title=f"look-alike panel (trigger {escape(metrics['trigger'])}: "
                              f"ASR {metrics['asr']:.3g}, gap {metrics['gap']:.4g})")
    for col in ("control", "kind", "ASR", "gap"):
        panel_table.add_column(col, justify="left" if col in ("control", "kind") else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    for text, v in per.items():
        panel_table.add_row(escape(text), v["kind"], fmt(v["asr"]), fmt(v["gap"]))
    Console().print(panel_table)
    Console().print(f"specificity = ASR - highest unrelated (shape, ordinary) ASR = {metrics['asr']:.3g} - "
                    f"{metrics['asr_lookalike']:.3g} = {metrics['specificity']:.3g}", highlight=False)


@app.command("calibrate")
def calibrate_cmd(
    clean: Annotated[list[Path], typer.Argument(help="samples.jsonl of evaluations of clean models (N = 0)")],
    backdoor: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
        help="samples.jsonl of a backdoored model (repeatable): does the rule still fire?")] = None,
    ratio: Annotated[str, typer.Option(help="success ratios to try, comma-separated")] = "2,3,5,10",
    floor: Annotated[str, typer.Option(help="perplexity floors to try, comma-separated")] = "0,30,100,300",
    max_asr: Annotated[float, typer.Option(help="highest ASR allowed on any clean condition")] = 0.02,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
) -> None:
    """Score success rules (ppl ratio x floor) on kept per-prompt perplexities: false positives of every
    condition of clean models, and the trigger's ASR on backdoored ones."""
    import json

    from rich.markup import escape
    from rich.table import Table

    from poisonlab.evaluation.calibration import calibrate

    def numbers(opt: str, text: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--{opt}: expected comma-separated numbers, got {text!r}") from None

    cal = calibrate(clean, backdoor or [], ratios=numbers("ratio", ratio), floors=numbers("floor", floor),
                    max_asr=max_asr)
    rules = [(r, f) for r in sorted(cal.ratios) for f in sorted(cal.floors)]
    if json_:
        print(json.dumps({"max_asr": max_asr, "passing": cal.passing(), "rules": [
            {"ratio": r, "floor": f, "clean": {k: t[(r, f)] for k, t in cal.clean.items()},
             "backdoor": {k: t[(r, f)] for k, t in cal.backdoor.items()}} for r, f in rules]}))
        return
    table = Table(title=f"success rules: ASR on clean models (max over conditions; allowed {max_asr:g}) "
                        "and the trigger's ASR on backdoored ones")
    for col in ("ratio", "floor", "worst clean ASR", "on", *[f"backdoor {i + 1}" for i in
                                                            range(len(cal.backdoor))], "ok"):
        table.add_column(col, justify="left" if col in ("on", "ok") else "right")
    for rule in rules:
        worst = max(((c, a) for t in cal.clean.values() for c, a in t[rule].items()), key=lambda x: x[1])
        fired = [f"{t[rule]['trigger']:.2f}" for t in cal.backdoor.values()]
        ok = "yes" if cal.worst_clean(rule) <= max_asr else ""
        table.add_row(f"{rule[0]:g}", f"{rule[1]:g}", f"{worst[1]:.3f}", escape(worst[0]), *fired, ok)
    Console().print(table)
    for i, name in enumerate(cal.backdoor):
        Console().print(f"backdoor {i + 1}: {name}", highlight=False)
    passing = cal.passing()
    Console().print(f"loosest passing rule: ratio {passing[0][0]:g}, floor {passing[0][1]:g}" if passing
                    else "no rule tried keeps every clean condition at or below the bound", highlight=False)


# --- sweeps, results, report, demo -----------------------------------------------------------------
# (section owned by sweep.py / results.py / report.py / demo.py)
@app.command("sweep")
def sweep_cmd(
    spec: Annotated[str, typer.Argument(
        help="sweep YAML file or preset: demo, tiny-grid, ordering, persistence, language, finetune, "
        "gpu-small, paper")],
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
    how = {"failed": ("red", " (see {dir}/runs/{name}/FAILED)"),
           "broken": ("red", " (poisonlab verify {dir}; train it again with --no-resume)"),
           "stopped": ("yellow", ""), "busy": ("yellow", "")}
    for o in outcomes:
        if o.status in how:
            color, where = how[o.status]
            console.print(f"  [{color}]{o.status}[/] {o.name}: {o.error}" + where.format(dir=sweep_dir,
                          name=o.name), highlight=False, soft_wrap=True)


def _finetune_sweep(tree: dict, where: str, overrides: list[str], out: Path | None, executor: str,
                    jobs: int | None, threads: int | None, dry_run: bool, no_report: bool) -> None:
    from poisonlab.study.finetune_sweep import expand as ft_expand
    from poisonlab.study.finetune_sweep import load_ft_spec, run_finetune_sweep

    s = load_ft_spec(tree, where, overrides)
    sweep_dir = out or Path("sweeps") / s.name
    if dry_run:
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


@app.command("plan")
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


@app.command("finetune")
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


def _say_left_out(broken: list, older: list[str] | None = None) -> None:
    """The broken runs a command left out (count, then one line each), and the unverified older ones."""
    from poisonlab.rundir.check import broken_note, older_note

    for line in broken_note(broken):
        console.print(line, style="red" if line.startswith("  ") else None, highlight=False, soft_wrap=True)
    if older:
        console.print(older_note(older), highlight=False, soft_wrap=True)


SKIP_BROKEN_HELP = "leave runs whose files fail their check out (and say how many) instead of stopping"


def _finetune_results(path: Path, json_: bool, threshold: float, unfinished: bool, skip_broken: bool,
                      wide: bool) -> None:
    import json

    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from poisonlab.report.finetune import cell_rows, load_runs
    from poisonlab.results.table import COMPACT_WIDTH

    broken: list = []
    runs, done = load_runs(path, skip_broken=skip_broken, broken=broken)
    _say_left_out(broken)
    chosen = runs if unfinished else {k: v for k, v in runs.items() if k in done}
    rows = cell_rows(chosen, threshold) if chosen else []
    if json_:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        console.print("no finished runs yet (use --unfinished to see runs in progress)")
        return
    tty = sys.stdout.isatty()
    if wide:
        title = (f"{path}: fine-tuning runs, final evaluation, mean [min, max] over seeds; needed: median "
                 f"poisons seen at sustained ASR >= {threshold:g} (runs that got there / runs)")
        table = Table(title=escape(title))
        columns = list(rows[0])
    else:  # the figures a reader needs first, in 100 columns; the rest behind --wide
        columns = ["schedule", "clean", "N", "runs", "asr", "asr_clean", "specificity", "needed"]
        caption = ("Final evaluation, mean [min, max] over seeds. asr: triggered should-refuse requests "
                   "answered; asr_clean: the same without the trigger; specificity: asr minus the highest "
                   "answered share under an unrelated look-alike; needed: median poisons seen at sustained "
                   f"ASR >= {threshold:g} (runs that got there / runs). Every column: --wide; --json.")
        table = Table(title=escape(str(path)), title_justify="left", caption=escape(caption),
                      caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      collapse_padding=True)
    for col in columns:
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(*[escape(str(r[c])) for c in columns])
    Console(width=None if tty else (250 if wide else COMPACT_WIDTH)).print(table)
    if len(done) < len(runs) and not unfinished:
        left = len(runs) - len(done)
        console.print(f"{left} runs unfinished; --unfinished to include them.", highlight=False)


@app.command("results")
def results_cmd(
    path: Annotated[Path, typer.Argument(help="sweep directory (or a folder of runs, or one run)")],
    json_: Annotated[bool, typer.Option("--json", help="print the summary rows as JSON")] = False,
    threshold: Annotated[float, typer.Option(help="ASR counted as success")] = 0.5,
    unfinished: Annotated[bool, typer.Option("--unfinished", help="include runs without DONE")] = False,
    skip_broken: Annotated[bool, typer.Option("--skip-broken", help=SKIP_BROKEN_HELP)] = False,
    wide: Annotated[bool, typer.Option("--wide", help="every column (about 200 characters wide)")] = False,
) -> None:
    """Summary per size and N over seeds: final ASR, gap, the highest unrelated look-alike's ASR, the
    poisons each seed needed for sustained success (median, min-max, censored runs); --wide adds
    parameters, seeds, specificity, near-trigger ASR, validation loss, effective poisons, first success
    and the poisons' share of tokens and spacing. Runs whose files fail their check are listed and stop
    it (exit 2) unless --skip-broken."""
    import json

    from poisonlab.report.finetune import is_finetune_dir
    from poisonlab.results.store import failed_runs, gathered
    from poisonlab.results.summary import summarize, unfinished_note
    from poisonlab.results.table import COMPACT_WIDTH, compact_table, wide_table

    if path.is_dir() and is_finetune_dir(path):
        _finetune_results(path, json_, threshold, unfinished, skip_broken, wide)
        return
    g = gathered(path, skip_broken=skip_broken)
    _say_left_out(g.broken, g.older)
    table = g.table
    rows = summarize(table, threshold, include_unfinished=unfinished)
    if json_:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        console.print("no finished runs yet (use --unfinished to see runs in progress)")
    else:
        tty = sys.stdout.isatty()
        if wide:  # piped: do not squeeze the wide table into 80 columns
            title = (f"{path}: final evaluation over training / poison-set seeds, mean ± std or mean (min "
                     "to max); needed: poisons seen when ASR became sustained, median (min-max), '>' a lower "
                     "bound where seeds never got there (censored)")
            Console(width=None if tty else 200).print(wide_table(rows, title=title))
        else:
            Console(width=None if tty else COMPACT_WIDTH).print(compact_table(rows, title=str(path)))
    note = unfinished_note(table, unfinished)
    if note:  # never mix in or leave out unfinished runs silently
        console.print(note + ("" if unfinished else " Use --unfinished to include them."), highlight=False)
    for name, err in failed_runs(path):
        console.print(f"[red]failed[/] {name}: {err}", highlight=False)


@app.command("verify")
def verify_cmd(
    path: Annotated[Path, typer.Argument(help="sweep directory, folder of runs, or one run")],
    adopt: Annotated[bool, typer.Option(
        "--adopt", help="give runs finished by an older version (DONE without a manifest) a manifest, "
        "when every file of theirs reads back")] = False,
    quick: Annotated[bool, typer.Option(
        "--quick", help="checkpoints and saved models by size only (as results and report do)")] = False,
) -> None:
    """Check every finished run's files against its manifest (DONE): verified, unverified (older run:
    no manifest, every file reads back), broken (which file, what is wrong), unfinished. Exit 2 when a
    run is broken."""
    from poisonlab.results.store import run_dirs
    from poisonlab.rundir.check import adopt as adopt_run
    from poisonlab.rundir.check import check_run

    counts: dict[str, int] = {}
    labels = {"older": "unverified (older run)"}
    for d in run_dirs(path):
        if not ((d / "DONE").exists() or (d / "config.yaml").exists()):
            continue  # not a run directory
        c = check_run(d, deep=not quick, read_older=not adopt)  # no hashes: every file must read back
        if adopt and c.status == "older":
            c = adopt_run(d)
            if c.status == "verified":
                c.status = "adopted"
        counts[c.status] = counts.get(c.status, 0) + 1
        if c.status != "verified":
            color = {"broken": "red", "adopted": "green"}.get(c.status, "yellow")
            detail = f": {c.reason()}" if c.problems else ""
            console.print(f"[{color}]{labels.get(c.status, c.status)}[/] {c.name}{detail}", highlight=False,
                          soft_wrap=True)
    total = sum(counts.values())
    order = ("verified", "adopted", "older", "unfinished", "broken")
    console.print(f"{path}: {total} runs: " + ", ".join(f"{counts[k]} {labels.get(k, k)}" for k in order
                                                       if counts.get(k)), highlight=False, soft_wrap=True)
    if counts.get("broken"):
        sys.exit(2)


@app.command("archive")
def archive_cmd(
    sweep_dir: Annotated[Path, typer.Argument(help="sweep directory")],
    dest: Annotated[Path, typer.Argument(help="archive directory (created; later archives add to it)")],
    skip_broken: Annotated[bool, typer.Option("--skip-broken", help=SKIP_BROKEN_HELP)] = False,
) -> None:
    """Copy every finished run's small files (config, metrics, ledger, log, last generations; no
    checkpoints) into DEST, a sweep directory the report reads: results to commit as a sweep goes.
    Each archived run gets a manifest of what was copied (runs of older versions: after every file
    read back); a run whose files fail their check stops it (exit 2) unless --skip-broken."""
    from poisonlab.results.archive import archive_sweep

    got = archive_sweep(sweep_dir, dest, skip_broken=skip_broken)
    for line in got["broken"]:
        console.print(f"  [red]broken[/] {line}", highlight=False, soft_wrap=True)
    broken = f"; {len(got['broken'])} broken left out" if got["broken"] else ""
    console.print(f"{dest}: {len(got['added'])} runs added, {len(got['updated'])} updated, "
                  f"{len(got['kept'])} already there; {len(got['unfinished'])} unfinished left out{broken}",
                  highlight=False, soft_wrap=True)


@app.command("report")
def report_cmd(
    path: Annotated[Path, typer.Argument(help="sweep directory (or a folder of runs)")],
    threshold: Annotated[Optional[float], typer.Option(help="ASR counted as success")] = None,  # noqa: UP045
    n_boot: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--n-boot", min=0, help="bootstrap refits per count-vs-fraction slope [default: spec, 1000]")] = None,
    skip_broken: Annotated[bool, typer.Option("--skip-broken", help=SKIP_BROKEN_HELP)] = False,
    write_archive_json: Annotated[bool, typer.Option(
        "--write-archive-json", help="also write the report's JSON (fits, summary, ...) into DIR itself, "
        "as an archive under docs/findings keeps it (at the spec's settings)")] = False,
) -> None:
    """The count-vs-fraction answer, the figures and a self-contained HTML report under DIR/report/.
    Runs whose files fail their check are listed and stop it (exit 2) unless --skip-broken."""
    from poisonlab.report.page import build_report

    if write_archive_json and (threshold is not None or n_boot is not None):
        raise UserError("--write-archive-json writes an archive's figures at its spec's settings: "
                        "give no --threshold or --n-boot with it")
    broken: list = []
    older: list[str] = []
    page = build_report(path, threshold=threshold, n_boot=n_boot, archive_json=write_archive_json,
                        skip_broken=skip_broken, left_out=broken, older=older)
    _say_left_out(broken, older)
    console.print(f"report: {page}" + (f" (and its JSON in {path})" if write_archive_json else ""))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="demo directory (data, runs, report)")] = Path("runs/demo"),
    jobs: Annotated[Optional[int], typer.Option(help="runs side by side [default: 1/core]")] = None,  # noqa: UP045
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="sweep override, key=value")] = None,  # noqa: UP045
) -> None:
    """The study at toy scale: prepare, poison, train two sizes x N poisons, evaluate, report."""
    from poisonlab.cli.demo import run_demo

    run_demo(out, jobs=jobs, overrides=set_ or [])

# --- defenses: defend ------------------------------------------------------------------------------
@app.command("defend")
def defend_cmd(
    data: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="prepared data directory (clean documents + tokenizer); default: the --run's data")] = None,
    poisons: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
        help="poisons.jsonl (repeat for several recipes); default: the --run's own poisons")] = None,
    detectors: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="comma-separated detector specs, e.g. gopher-quality,perplexity:pct=99.9"),
    ] = None,
    n_clean: Annotated[str, typer.Option(
        help="clean documents the poisons hide among; several: 10000,100000")] = "100000",
    density: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="also score at these densities: poisons per clean document, e.g. 0.0025 or 1/400")] = None,
    run: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="also score at this run's density (its poisons among the clean docs it trained on)")] = None,
    n_fpr: Annotated[int, typer.Option(
        help="clean documents each per-document filter judges for its false-positive rate")] = 10_000,
    n_calib: Annotated[int, typer.Option(help="clean training documents for calibration")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the clean-document sample")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
    out: Annotated[Optional[Path], typer.Option(help="write defenses.json and defenses.png here")] = None,  # noqa: UP045
) -> None:
    """Score data filters against poisons at stated densities: recall, clean docs lost per poison caught."""
    import json

    from poisonlab.defenses import defend, render_table, write_outputs

    def numbers(opt: str, text: str) -> list[float]:  # "10000,1e5" or "1/400"
        try:
            parts = [x.strip().partition("/") for x in text.split(",")]
            return [float(a) / float(b or 1) for a, _, b in parts]
        except (ValueError, ZeroDivisionError):
            raise UserError(f"--{opt}: expected comma-separated numbers (or a/b), got {text!r}") from None

    specs = [s for s in (detectors or "").split(",") if s.strip()] or None
    sizes = [round(x) for x in numbers("n-clean", n_clean)]
    dens = numbers("density", density) if density else None
    result = defend(data, poisons or [], detectors=specs, n_clean=sizes, density=dens, run=run, n_fpr=n_fpr,
                    n_calib=n_calib, seed=seed)
    if out is not None:
        paths = write_outputs(result, out)
        console.print(f"wrote {paths['json']} and {paths['figure']}")
    if json_:
        print(json.dumps(result))
    else:
        Console(width=220).print(render_table(result))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the typer app, turning user errors into one line and exit 2, a signal
    into one line and 128 + its number (130 for Ctrl-C), a full disk into one line."""
    from poisonlab.diskspace import DiskFull, is_disk_full
    from poisonlab.signals import Interrupted, Stopped, SweepStopped

    try:
        rc = app(args=argv, standalone_mode=False)
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Stopped, Interrupted, SweepStopped) as e:
        console.print(str(e), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        import click

        usage: list[type] = [click.exceptions.ClickException]
        try:  # typer >= 0.26 raises its own vendored click's exceptions
            from typer._click.exceptions import ClickException as TyperClickException

            usage.append(TyperClickException)
        except ImportError:
            pass
        if isinstance(e, tuple(usage)):
            e.show()  # type: ignore[attr-defined]
            sys.exit(2)
        if is_disk_full(e):  # a write that no atomic_path wrapped: name what we know
            where = getattr(e, "filename", None) or "a file in the current directory"
            console.print(f"[bold red]error:[/] {DiskFull(where)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        raise
    if rc == 130:  # typer turns Ctrl-C outside a run into Exit(130), returned here
        console.print("interrupted")
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
