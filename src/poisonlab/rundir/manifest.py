"""Manifests: the files of a run or of a checkpoint with their sizes and sha256, so that a reader can
tell a file as its writer left it from one truncated, damaged or replaced since.

A finished run's `DONE` is its manifest, written last (atomically), after every other file:

    {"steps": 1044, "time": 1796237946.7, "version": "0.1.0",
     "files": {"config.yaml": {"size": 1379, "sha256": "..."}, "checkpoints/step_0001044/model.safetensors":
               {...}, ...}}

so "DONE" means "finished, and these are its files". A checkpoint carries its own `manifest.json` (the
same `files` mapping over its directory), written last inside it before it is renamed into place; the
run's manifest takes the checkpoint files' hashes from there instead of reading them a second time.

Left out of a run's manifest: the lock file (`.lock`, rewritten by every process that looks), `DONE`
itself, `FAILED`, and hidden entries (temporary files of writes in progress). Runs finished by an older
version have a DONE without `files` (`runcheck` calls them older runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from poisonlab.fsutil import write_text

DONE = "DONE"
CKPT_MANIFEST = "manifest.json"
NOT_LISTED = frozenset({".lock", DONE, "FAILED"})
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def entry(path: str | os.PathLike) -> dict[str, Any]:
    """{"size", "sha256"} of one file."""
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def listed_files(root: Path) -> list[str]:
    """The files a manifest of `root` lists, relative, sorted (see the module doc for what is left out)."""
    root = Path(root)
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in files:
            if name.startswith(".") or (rel_dir == Path(".") and name in NOT_LISTED):
                continue
            if not os.path.isfile(os.path.join(dirpath, name)):
                continue
            out.append((rel_dir / name).as_posix())
    return sorted(out)


def build(root: Path, names: Iterable[str] | None = None,
          known: Mapping[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The manifest of `names` under root (default: `listed_files`); a file in `known` (hashes recorded
    when it was written) is taken from there when its size still matches, not read again."""
    root = Path(root)
    known = known or {}
    out = {}
    for name in listed_files(root) if names is None else names:
        path = root / name
        k = known.get(name)
        out[name] = dict(k) if k is not None and k.get("size") == path.stat().st_size else entry(path)
    return out


def check(root: Path, files: Mapping[str, Any], *, hashed: Callable[[str], bool] = lambda name: True
          ) -> list[tuple[str, str]]:
    """(file, what is wrong) for every listed file that is missing, of another size, or (where `hashed`
    says so) of another sha256 than the manifest says; [] when all match."""
    root = Path(root)
    problems = []
    for name, want in sorted(files.items()):
        path = root / name
        if not isinstance(want, dict) or "size" not in want:
            problems.append((name, "the manifest's entry is malformed"))
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append((name, "missing (the manifest lists it)"))
            continue
        except OSError as e:
            problems.append((name, f"unreadable ({e.strerror})"))
            continue
        if size != want["size"]:
            problems.append((name, f"{size:,} bytes where the manifest says {want['size']:,} (truncated "
                                   "or rewritten after the run finished)"))
        elif hashed(name) and want.get("sha256"):
            try:
                got = sha256_file(path)
            except OSError as e:
                problems.append((name, f"unreadable ({e.strerror})"))
                continue
            if got != want["sha256"]:
                problems.append((name, "sha256 differs from the manifest (the file changed after it was "
                                       "written: damaged or edited)"))
    return problems


# --- DONE ------------------------------------------------------------------------------------------


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """DONE's contents: None without DONE; {} for a DONE that is not a JSON object (older versions
    wrote a time stamp); a DONE cut short or garbled reads as {"unreadable": why}."""
    path = Path(run_dir) / DONE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return {"unreadable": str(e)}
    try:
        obj = json.loads(text)
    except ValueError:
        # a time stamp (older fine-tuning runs), or a manifest cut short
        return {"unreadable": "not valid JSON"} if text.lstrip().startswith("{") else {}
    return obj if isinstance(obj, dict) else {}


def write_done(run_dir: Path, info: Mapping[str, Any],
               known: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write DONE with `info` and the manifest of every file of the run (hashes of checkpoint files
    from their own manifests); the run's last write. Returns what was written."""
    from poisonlab import __version__

    run_dir = Path(run_dir)
    record = {**info, "time": info.get("time", time.time()), "version": __version__,
              "files": build(run_dir, known={**checkpoint_hashes(run_dir), **(known or {})})}
    write_text(run_dir / DONE, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def checkpoint_hashes(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The files of every checkpoint of the run with a manifest, as run-relative names."""
    out: dict[str, dict[str, Any]] = {}
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return out
    for m in sorted(root.glob(f"*/{CKPT_MANIFEST}")):
        try:
            files = json.loads(m.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            continue
        rel = m.parent.relative_to(run_dir).as_posix()
        out.update({f"{rel}/{name}": e for name, e in files.items() if isinstance(e, dict)})
    return out
