"""`poisonlab defend`: score data filters against poisons."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional  # noqa: F401  (typer reads Optional at runtime)

import typer
from rich.console import Console

from poisonlab.errors import UserError

console = Console(stderr=True)


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
