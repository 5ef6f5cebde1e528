"""The small, lasting part of a sweep: its finished runs without checkpoints, to keep in a repository.

A tiny-grid run directory is ~1-7 MB, almost all of it checkpoints and the generations of every
evaluation; what the results store and the report read is ~100 KB: config, metrics, ledger, log,
hardware, the DONE marker, the data's header (its content hash: which data, without the data) and the
generations of the last evaluation (the report shows only those).
`archive_sweep` copies that part of every finished run (and the sweep's spec) into another directory,
adding to what an earlier archive holds, so a sweep run across sessions on machines that do not last can
be committed as it goes. The archive is itself a sweep directory: `poisonlab report` and `poisonlab
results` read it, and copying its `runs/` into a live sweep directory makes the sweep skip those runs.

Each archived run gets its own DONE: the manifest of the files the archive holds (manifest.py), the
source DONE's other fields, and `archived`: when, the sha256 of the source's DONE (so a later archive
knows the run is already there) and how the source was checked. A source run that fails its check
(runcheck) is not archived: `archive_sweep` stops (BrokenRuns) unless told to skip broken runs. A run
finished by an older version (DONE without a manifest) is adopted: its copied files must read back,
and the archive's manifest makes it verified from then on.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from poisonlab.corpus.shards import data_headers
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path
from poisonlab.rundir.check import BrokenRuns, RunCheck, RunFileError, check_run, read_back_run
from poisonlab.rundir.manifest import read_done, sha256_file, write_done

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


def archive_run(run_dir: Path, dest: Path, source: RunCheck | None = None) -> None:
    """Copy a finished run's small files into dest, replacing it as a whole (never half-written), with
    the archive's own manifest (module doc); RunFileError when a copy does not match or read back."""
    source = source or check_run(run_dir)
    done = read_done(run_dir) or {}
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
        how = "verified against its manifest"
        if source.status == "older":
            problems = read_back_run(tmp)
            if problems:
                raise RunFileError(run_dir / problems[0][0], problems[0][1])
            how = "finished by an older version without a manifest; every file read back when archived"
        info = {k: v for k, v in done.items() if k not in ("files", "archived", "adopted")}
        info["archived"] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "source": how,
                            "source_done_sha256": sha256_file(run_dir / "DONE")}
        record = write_done(tmp, info)
        for name in set(done.get("files") or {}) & set(KEPT):  # byte copies: the source's hashes
            if record["files"].get(name, {}).get("sha256") != done["files"][name].get("sha256"):
                raise RunFileError(tmp / name, "the copy differs from the source's manifest")


def _archived(target: Path, source_done: Path) -> bool:
    """Whether target is this finished run archived before, whole (and with a manifest)."""
    info = (read_done(target) or {}).get("archived") or {}
    return (info.get("source_done_sha256") == sha256_file(source_done)
            and check_run(target).status == "verified")


def archive_sweep(sweep_dir: str | Path, dest: str | Path, *,
                  skip_broken: bool = False) -> dict[str, list[str]]:
    """Archive every finished run of sweep_dir into dest/runs (and a fine-tuning sweep's finished base
    stages into dest/stages); returns the runs added, updated, kept, unfinished and broken (left out:
    with any and not `skip_broken`, BrokenRuns before anything is written)."""
    sweep_dir, dest = Path(sweep_dir), Path(dest)
    runs = sweep_dir / "runs"
    if not runs.is_dir():
        raise UserError(f"{sweep_dir}: not a sweep directory (no runs/ folder)")
    if dest.resolve() == sweep_dir.resolve():
        raise UserError(f"{dest}: the archive must be another directory than the sweep")
    out: dict[str, list[str]] = {"added": [], "updated": [], "kept": [], "unfinished": [], "broken": []}
    checks = []
    run_dirs = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    # a fine-tuning sweep's base stages (base/align, base/pretrain/runs/*): their evaluations are the
    # evidence that the grid's base model is what it claims (aligned, clean), so they are kept too, in
    # stages/ (not base/: a sweep resumed on the archive would take a stage without its model for done)
    base = sweep_dir / "base"
    stage_dirs = sorted(d.parent for d in base.rglob("DONE"))  # none without a base/
    targets = {r: dest / "runs" / r.name for r in run_dirs} | {
        s: dest / "stages" / s.relative_to(base) for s in stage_dirs}
    for run_dir in targets:
        c = check_run(run_dir, read_older=True)  # an older run's files read back before any is copied
        if c.status == "unfinished":
            out["unfinished"].append(run_dir.name)
        else:
            checks.append(c)
    bad = [c for c in checks if c.broken]
    if bad and not skip_broken:
        raise BrokenRuns(bad, len(checks))
    for c in checks:
        if c.broken:
            out["broken"].append(c.line())
            continue
        target = targets[c.run_dir]
        if _archived(target, c.run_dir / "DONE"):
            out["kept"].append(c.name)  # the same finished run archived before
            continue
        existed = target.exists()
        try:
            archive_run(c.run_dir, target, c)
        except RunFileError as e:
            if not skip_broken:
                raise BrokenRuns([RunCheck(c.run_dir, "broken", [(e.path.name, e.what)])], len(checks),
                                 "the runs before it were archived") from None
            out["broken"].append(f"{c.name}: {e.path.name}: {e.what}")
            continue
        out["updated" if existed else "added"].append(c.name)
    for name in SWEEP_FILES:
        if (sweep_dir / name).is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copy2(sweep_dir / name, tmp)
    return out
