"""A full disk, said in one line: the path being written, the bytes it needed where known, the space
free there. And the estimate of what a sweep will write, checked against the free space before it
starts (`sweep`, `plan`).

Writers raise `DiskFull` (a UserError: one line, exit status 2, no traceback). `fsutil.atomic_path`
turns any disk-full error inside its block into one (an OSError with ENOSPC or EDQUOT, or a library's
error that wraps one in its message: safetensors, pyarrow), naming the output it was writing; the
atomic write leaves the old output in place and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

from poisonlab.errors import UserError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how a library that is not Python's io says it (safetensors: "StorageFull"; pyarrow: the strerror)
_FULL_TEXTS = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")


def fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the filesystem of `path`, or of its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is the disk or the quota being full."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return False


class DiskFull(UserError):
    """No space left where a file was being written."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None, free: int | None = None,
                 what: str = "no space left on the device"):
        self.path, self.needed = Path(path), needed
        self.free = free_bytes(path) if free is None else free
        need = f", needs {fmt_bytes(needed)}" if needed else ""
        have = f"{fmt_bytes(self.free)} free there" if self.free is not None else "free space unknown"
        super().__init__(f"{path}: {what}{need}; {have} (free some space and run the same command again)")


def check_free(path: str | os.PathLike, needed: int, what: str = "") -> None:
    """DiskFull before a write of `needed` bytes that cannot fit in the space free at `path`."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise DiskFull(path, needed, free, what or "not enough free space to write it")


def disk_full_from(e: BaseException, path: str | os.PathLike, needed: int | None = None) -> DiskFull | None:
    """The DiskFull to raise instead of `e` when `e` is a full disk, else None."""
    if isinstance(e, DiskFull):
        return e
    return DiskFull(path, needed) if is_disk_full(e) else None


# --- what a sweep writes ---------------------------------------------------------------------------

def data_bytes(corpus: Any) -> int | None:
    """What `prepare` writes for a CorpusConfig: tokens (2 bytes each, 4 past 65,536 types) and ~5% of
    document index and held-out split; None when the token count is not set (all of the source)."""
    if not corpus.max_tokens:
        return None
    per = 2 if corpus.vocab_size <= 65536 else 4
    return int(corpus.max_tokens * per * 1.05) + 16 * 2**20


def used_bytes(path: Path) -> int:
    """Bytes already under `path` (a run directory resumed needs only what it has not written yet)."""
    n = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # deleted meanwhile
                n += os.stat(os.path.join(root, f)).st_size
    return n
