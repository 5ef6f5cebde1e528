"""`poisonlab results`, `verify`, `archive` and `report`: read, check, keep and report a sweep's runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional  # noqa: F401  (typer reads Optional at runtime)

import typer
from rich.console import Console

from poisonlab.errors import UserError

console = Console(stderr=True)


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
    and the poisons' share of tokens and spacing, and under it the clean loss against the N = 0 control.
    Runs whose files fail their check are listed and stop it (exit 2) unless --skip-broken."""
    import json

    from poisonlab.report.finetune import is_finetune_dir
    from poisonlab.results.store import failed_runs, gathered
    from poisonlab.results.summary import summarize, unfinished_note
    from poisonlab.results.table import CLEAN_TITLE, COMPACT_WIDTH, clean_table, compact_table, wide_table

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
            Console(width=None if tty else 200).print(clean_table(rows, title=CLEAN_TITLE))
        else:
            Console(width=None if tty else COMPACT_WIDTH).print(compact_table(rows, title=str(path)))
    note = unfinished_note(table, unfinished)
    if note:  # never mix in or leave out unfinished runs silently
        console.print(note + ("" if unfinished else " Use --unfinished to include them."), highlight=False)
    for name, err in failed_runs(path):
        console.print(f"[red]failed[/] {name}: {err}", highlight=False)


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
