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

# per kept generation: the JSON record's keys, numbers and escapes around the prompt and the generation
_SAMPLE_OVERHEAD = 400
_BYTES_PER_TOKEN_TEXT = 8  # decoded text as JSON: ~4 characters per token, escapes double it
_RECORDS_PER_EVAL = 20_000  # metrics row, per-prompt perplexities, log lines: a generous constant


def run_bytes(cfg: Any) -> dict[str, int]:
    """What one run writes at most at any moment: `checkpoints` (the kept ones plus the one being
    written: fp32 weights and AdamW's two moments), `samples` (generations kept per evaluation) and
    `records` (metrics, per-prompt perplexities, log, ledger). `cfg` is a resolved RunConfig."""
    from poisonlab.model import count_params
    from poisonlab.schedule import milestone_grid, total_steps

    total, _ = count_params(cfg.model)
    t, e = cfg.train, cfg.eval
    ckpt = 12 * total + 64 * 1024  # model + 2 moments in fp32, and the JSON
    n_steps = total_steps(cfg)
    evals = n_steps // e.every_steps + 2 if e.every_steps else e.n_evals + 1
    evals += e.log_evals + len(set(e.poison_milestones) | set(milestone_grid(e, cfg.attack.n_poison)))
    conditions = 2 + 7  # clean, trigger and the default look-alike panel (more with a longer panel)
    if isinstance(e.lookalikes, dict):
        conditions = 2 + sum(len(v) for v in e.lookalikes.values())
    per_sample = _SAMPLE_OVERHEAD + _BYTES_PER_TOKEN_TEXT * (e.prompt_tokens + e.new_tokens)
    samples = evals * min(e.save_samples, e.n_prompts) * conditions * per_sample
    records = evals * (_RECORDS_PER_EVAL + 30 * e.n_prompts * conditions) + 64 * cfg.attack.n_poison
    return {"checkpoints": (t.keep_checkpoints + 1) * ckpt, "samples": samples, "records": records}


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
