"""`poisonlab demo`: the study's experiment at toy scale, end to end, in minutes on a laptop CPU.

prepare the built-in corpus -> run the `demo` sweep preset (two model sizes x N poisons, with N = 0 as
control) -> HTML report -> results table and the report's count-vs-fraction sentence. Every stage is
the same code a full sweep uses; the demo only picks small settings (see presets/demo.yaml and the
README for what it shows and what it does not).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from poisonlab.corpus.prepare import prepare
from poisonlab.study.spec import load_spec
from poisonlab.study.sweep import run_sweep

console = Console(stderr=True)


def run_demo(out: str | Path = "runs/demo", *, jobs: int | None = None, progress: bool = True,
             overrides: list[str] | None = None) -> Path:
    """Run the demo into `out` (resumable: finished stages are reused); return the report path."""
    out = Path(out)
    t0 = time.perf_counter()
    console.rule("[bold]poisonlab demo[/]: constant-count poisoning at toy scale")
    spec = load_spec("demo", [f"base.data={(out / 'data').absolute()}", *(overrides or [])])
    assert spec.prepare is not None  # the preset says which data it needs
    console.print(f"1/3 preparing the built-in corpus -> {out / 'data'}")
    prepare(spec.prepare, out / "data", progress=progress)
    console.print(f"2/3 training and evaluating the demo sweep -> {out / 'runs'}")
    result = run_sweep(spec, out, jobs=jobs, progress=progress, report=False)
    console.print(result.summary_line())
    for o in result.failed:
        console.print(f"  [red]failed[/] {o.name}: {o.error}", highlight=False)
    console.print("3/3 building the report")
    from poisonlab.report.page import build_report
    from poisonlab.results.store import gather
    from poisonlab.results.summary import summarize
    from poisonlab.results.table import COMPACT_WIDTH, compact_table

    report = build_report(out)
    rows = summarize(gather(out))
    show = Console(width=COMPACT_WIDTH)  # `poisonlab results --wide` has every column
    if rows:
        show.print(compact_table(rows, title="demo: final evaluation per size and N"))
    for line in answer_lines(report.parent / "fits.json"):
        show.print(line, highlight=False)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s; report: [bold]{report}[/]")
    return report


def answer_lines(fits_json: Path) -> list[str]:
    """The report's count-vs-fraction sentence, one line per group of settings (labelled when several)."""
    groups = json.loads(fits_json.read_text())["groups"] if fits_json.exists() else []
    return [f"Count or fraction? {g['label'] + ': ' if g['label'] else ''}{g['sentence']}" for g in groups]
