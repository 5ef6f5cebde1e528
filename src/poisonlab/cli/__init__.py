"""The `poisonlab` command line: every command is a thin wrapper over the Python API.

One module per command group, by what a user does: `data` (prepare, poison), `models` (train, export,
import-gguf), `evaluate` (eval, clean-score, calibrate), `study` (sweep, status, plan, finetune, demo),
`results` (results, verify, archive, report), `defend`. This module owns the typer app, registers the
commands (in the order `poisonlab --help` lists them) and holds `main`, the console entry point: user
errors (`UserError`) print one line and exit with status 2, with no traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from poisonlab.cli import data, defend, evaluate, models, results, study
from poisonlab.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="poisonlab: constant-count data poisoning of language models, end to end.",
)
console = Console(stderr=True)

app.command()(data.prepare)
app.command()(data.poison)
app.command("train")(models.train_cmd)
app.command("export")(models.export_cmd)
app.command("import-gguf")(models.import_gguf_cmd)
app.command("eval")(evaluate.eval_)
app.command("clean-score")(evaluate.clean_score_cmd)
app.command("calibrate")(evaluate.calibrate_cmd)
app.command("sweep")(study.sweep_cmd)
app.command("status")(study.status_cmd)
app.command("plan")(study.plan_cmd)
app.command("finetune")(study.finetune_cmd)
app.command("results")(results.results_cmd)
app.command("verify")(results.verify_cmd)
app.command("archive")(results.archive_cmd)
app.command("report")(results.report_cmd)
app.command("demo")(study.demo_cmd)
app.command("defend")(defend.defend_cmd)


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

