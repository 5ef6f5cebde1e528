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
# (section owned by corpus/)

# --- attacks: poison -------------------------------------------------------------------------------
# (section owned by attacks/)

# --- training: train, export -----------------------------------------------------------------------
# (section owned by train.py / export.py)

# --- evaluation: eval ------------------------------------------------------------------------------
# (section owned by evaluate.py)

# --- sweeps, results, report, demo -----------------------------------------------------------------
# (section owned by sweep.py / results.py / report.py / demo.py)

# --- defenses: defend ------------------------------------------------------------------------------
# (section owned by defenses/)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the typer app, turning user errors into one line and exit 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
