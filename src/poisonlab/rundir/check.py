"""Is a run directory what its writer left? One answer per run, for every reader of runs.

    verified     DONE holds a manifest (manifest.py) and every listed file matches it
    older        DONE from a version that wrote no manifest: usable, its files read back but unverified
    broken       a listed file is missing, of another size or another sha256; or a file the reader
                 needs cannot be read (`RunFileError`, raised by the readers themselves)
    unfinished   no DONE (still training, stopped, or failed)

`check_run` hashes the small files (config, metrics, ledger, samples, logs) and checks the size of the
large ones (checkpoints, a fine-tuned `model/`): those are verified by their own manifest when they are
loaded (checkpoint.verify_checkpoint). A broken run is never averaged, grouped or dropped in silence:
the readers (results, report, archive, sweep) list it with its file and what is wrong, leave it out of
every table and fit, and stop (`BrokenRuns`) unless told to skip broken runs.

`adopt` gives an older run a manifest after reading every file back (YAML, Parquet, JSON lines,
safetensors headers): from then on it is verified like a new one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from poisonlab.errors import UserError
from poisonlab.rundir.manifest import check as check_files
from poisonlab.rundir.manifest import listed_files, read_done, write_done

LARGE_DIRS = ("checkpoints/", "model/")  # size-checked here, hashed when loaded


class RunFileError(UserError):
    """A file of a run that a reader needs cannot be read (missing, truncated, not what it should be)."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        super().__init__(f"{path}: {what}")


@dataclass
class RunCheck:
    run_dir: Path
    status: str  # verified | older | broken | unfinished
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file in the run, what is wrong)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def broken(self) -> bool:
        return self.status == "broken"

    def reason(self) -> str:
        """`metrics.parquet: 100 bytes where the manifest says 21,623 (...)` (and how many more)."""
        if not self.problems:
            return self.status
        f, what = self.problems[0]
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{f}: {what}{more}"

    def line(self) -> str:
        return f"{self.name}: {self.reason()}"


def check_run(run_dir: str | Path, *, deep: bool = False, read_older: bool = False) -> RunCheck:
    """The run's status (module doc). `deep` hashes checkpoints and models too (`poisonlab verify`);
    `read_older` reads every file of an older run back (`read_back_run`), broken when one does not."""
    c = _check(Path(run_dir), deep)
    if read_older and c.status == "older":
        problems = read_back_run(c.run_dir)
        if problems:
            return RunCheck(c.run_dir, "broken", problems)
    return c


def _check(run_dir: Path, deep: bool) -> RunCheck:
    done = read_done(run_dir)
    if done is None:
        return RunCheck(run_dir, "unfinished")
    if "unreadable" in done:
        return RunCheck(run_dir, "broken", [("DONE", f"unreadable ({done['unreadable']}): the manifest "
                                                     "cannot be checked")])
    files = done.get("files")
    if files is None:
        return RunCheck(run_dir, "older")
    if not isinstance(files, dict):
        return RunCheck(run_dir, "broken", [("DONE", "its manifest is malformed")])
    problems = check_files(run_dir, files, hashed=lambda n: deep or not n.startswith(LARGE_DIRS))
    return RunCheck(run_dir, "broken" if problems else "verified", problems)


class BrokenRuns(UserError):
    """Runs whose files failed their check; the command stops unless told to skip them."""

    def __init__(self, checks: list[RunCheck], total: int | None = None, what: str = "nothing was written"):
        self.checks = checks
        of = f" of {total}" if total is not None else ""
        lines = [f"{len(checks)}{of} run(s) broken ({what}; --skip-broken leaves them out):"]
        lines += [f"  broken {c.line()}" for c in checks]
        super().__init__("\n".join(lines))


def broken_note(checks: list[RunCheck]) -> list[str]:
    """What a command that skipped broken runs prints: the count, then one line per run."""
    if not checks:
        return []
    return [f"{len(checks)} broken run(s) left out of every table and fit:"] + \
           [f"  broken {c.line()}" for c in checks]


def older_note(names: Iterable[str]) -> str:
    names = list(names)
    if not names:
        return ""
    return (f"{len(names)} run(s) finished by an older version without a manifest: read back, unverified "
            "(older run); `poisonlab verify DIR --adopt` records one for each.")


# --- reading a file back, for runs without a manifest ------------------------------------------


def read_back(path: Path) -> str | None:
    """None when the file reads back as its kind (by suffix), else what is wrong with it."""
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_table(path)
        elif path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            for i, line in enumerate(lines):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError:
                        # the last line of a killed append is torn; resume drops it, readers skip it
                        if i < len(lines) - 1:
                            raise
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # the header, and its offsets against the file's size
                list(f.keys())
        else:
            path.read_bytes()
    except Exception as e:  # any parser's error: the file is not what its name says
        return f"does not read back ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def read_back_run(run_dir: Path) -> list[tuple[str, str]]:
    """(file, what is wrong) for every file of the run that does not read back."""
    problems = []
    for name in listed_files(run_dir):
        why = read_back(run_dir / name)
        if why:
            problems.append((name, why))
    if not (run_dir / "config.yaml").is_file():
        problems.append(("config.yaml", "missing"))
    return problems


def adopt(run_dir: str | Path) -> RunCheck:
    """Give an older finished run a manifest when all its files read back; verified afterwards (or
    broken, with what did not read back, and left as it was)."""
    run_dir = Path(run_dir)
    c = check_run(run_dir)
    if c.status != "older":
        return c
    problems = read_back_run(run_dir)
    if problems:
        return RunCheck(run_dir, "broken", problems)
    info = {k: v for k, v in (read_done(run_dir) or {}).items() if k != "files"}
    info["adopted"] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "note": "finished by an older version without a manifest; every file read back "
                               "intact when this manifest was written"}
    write_done(run_dir, info)
    return check_run(run_dir)
