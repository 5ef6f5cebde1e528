"""The small, lasting part of a sweep: its finished runs without checkpoints, to keep in a repository.

A tiny-grid run directory is ~1-7 MB, almost all of it checkpoints and the generations of every
evaluation; what the results store and the report read is ~100 KB: config, metrics, ledger, log,
hardware, the DONE marker, the data's header (its content hash: which data, without the data) and the
generations of the last evaluation (the report shows only those).
`archive_sweep` copies that part of every finished run (and the sweep's spec) into another directory,
adding to what an earlier archive holds, so a sweep run across sessions on machines that do not last can
be committed as it goes. The archive is itself a sweep directory: `poisonlab report` and `poisonlab
results` read it, and copying its `runs/` into a live sweep directory makes the sweep skip those runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path
from poisonlab.results import data_headers

KEPT = ("config.yaml", "metrics.parquet", "ledger.parquet", "log.jsonl", "hardware.json")
SWEEP_FILES = ("sweep.yaml", "plan.json")


def _last_step_samples(src: Path, dest: Path) -> None:
    """samples.jsonl reduced to the last evaluated step, read line by line (bounded memory)."""
    last = -1
    with src.open() as f:
        for line in f:
            if line.strip():
                last = max(last, int(json.loads(line)["step"]))
    with src.open() as f, dest.open("w") as out:
        for line in f:
            if line.strip() and int(json.loads(line)["step"]) == last:
                out.write(line)


def _data_header(run_dir: Path) -> Path | None:
    """The training data's header (content hash, tokens, tokenizer hash), where it can be found."""
    try:
        data = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data")
    except (OSError, yaml.YAMLError):
        return None
    return next((h for h in data_headers(data, run_dir) if h.is_file()), None)


def archive_run(run_dir: Path, dest: Path) -> None:
    """Copy a finished run's small files into dest, replacing it as a whole (never half-written)."""
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for name in KEPT:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        if (run_dir / "samples.jsonl").is_file():
            _last_step_samples(run_dir / "samples.jsonl", tmp / "samples.jsonl")
        header = _data_header(run_dir)
        if header is not None:  # the data by content, for a reader without the data directory
            shutil.copy2(header, tmp / "data.json")
        shutil.copy2(run_dir / "DONE", tmp / "DONE")


def archive_sweep(sweep_dir: str | Path, dest: str | Path) -> dict[str, list[str]]:
    """Archive every finished run of sweep_dir into dest/runs; returns the runs added, updated, kept."""
    sweep_dir, dest = Path(sweep_dir), Path(dest)
    runs = sweep_dir / "runs"
    if not runs.is_dir():
        raise UserError(f"{sweep_dir}: not a sweep directory (no runs/ folder)")
    if dest.resolve() == sweep_dir.resolve():
        raise UserError(f"{dest}: the archive must be another directory than the sweep")
    out: dict[str, list[str]] = {"added": [], "updated": [], "kept": [], "unfinished": []}
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        if not (run_dir / "DONE").is_file():
            out["unfinished"].append(run_dir.name)
            continue
        target = dest / "runs" / run_dir.name
        if (target / "DONE").is_file() and (target / "DONE").read_bytes() == (run_dir / "DONE").read_bytes():
            out["kept"].append(run_dir.name)  # the same finished run archived before
            continue
        out["updated" if target.exists() else "added"].append(run_dir.name)
        archive_run(run_dir, target)
    for name in SWEEP_FILES:
        if (sweep_dir / name).is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copy2(sweep_dir / name, tmp)
    return out
