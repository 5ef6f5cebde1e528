"""Atomic outputs: a crash at any moment leaves the old or the new output under its final name, never a mix.

A file is written beside its final name, fsynced, renamed over it (`os.replace`, atomic), and then the
parent directory is fsynced, so that the rename itself survives a power cut or an NFS server restart.

A directory cannot be renamed over a non-empty one, so replacing a directory X takes two renames. The
steps, with the names they use beside X:

    1. build the new tree in a private `.X.<random>.tmp/X`; fsync every file and directory in it
    2. rename it to `.X.atomic-new`          the new tree is complete: from here on it wins
    3. rename X to `.X.atomic-old`
    4. rename `.X.atomic-new` to X
    5. delete `.X.atomic-old`

Every rename is followed by an fsync of the parent. A crash between steps 3 and 4 leaves no X at all, so
`recover(X)` finishes an interrupted replacement: with `.X.atomic-new` present it redoes steps 3-5 (the
new tree wins), otherwise it puts a lone `.X.atomic-old` back or deletes a leftover one. `atomic_path`
recovers before it writes, and every reader of a replaceable directory recovers before it reads (data
directories, checkpoint lookup, model directories). Steps 2-5 and `recover` hold an flock on
`.X.atomic-lock`, so a reader's recovery never races a live writer.

Why not `renameat2(RENAME_EXCHANGE)`, which swaps two directories in one step: NFS does not support it
(EINVAL), so the two-rename path and its recovery would be needed anyway; one path that always runs
(and is tested crash by crash) is easier to trust than two.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NEW, OLD, TRASH, LOCK = ".atomic-new", ".atomic-old", ".atomic-trash", ".atomic-lock"


def _side(final: Path, suffix: str) -> Path:
    return final.with_name(f".{final.name}{suffix}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and directory of a tree (children before their directory)."""
    path = Path(path)
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                fsync_tree(Path(p))
        fsync_dir(Path(root))


@contextlib.contextmanager
def _swap_lock(final: Path) -> Iterator[None]:
    """Hold `.X.atomic-lock` (an flock: the OS drops it if we die). The file is removed on release;
    a waiter that then holds a lock on the removed file notices (another inode) and tries again."""
    path = _side(final, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)
    fsync_dir(dst.parent)


def _recover_locked(final: Path) -> None:
    new, old = _side(final, NEW), _side(final, OLD)
    if new.exists():  # the new tree is complete: finish steps 3-5
        if final.exists():
            if old.exists():  # cannot happen step by step; a stray leftover, not the old output
                shutil.rmtree(old)
            _rename(final, old)
        _rename(new, final)
    elif old.exists() and not final.exists():  # nothing newer to put in place: the old output returns
        _rename(old, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    trash = _side(final, TRASH)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)


def recover(final: str | os.PathLike) -> None:
    """Finish or undo an interrupted replacement of `final` (cheap when there is nothing to do)."""
    final = Path(final)
    if not any(_side(final, s).exists() for s in (NEW, OLD, TRASH)):
        return
    with _swap_lock(final):
        _recover_locked(final)


def recover_all(parent: str | os.PathLike) -> None:
    """`recover` every entry of `parent` that an interrupted write or removal left unfinished."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    names = set()
    for p in parent.iterdir():
        for s in (NEW, OLD, TRASH):
            if p.name.startswith(".") and p.name.endswith(s):
                names.add(p.name[1:-len(s)])
    for name in sorted(names):
        recover(parent / name)


def remove_staging(parent: str | os.PathLike) -> None:
    """Delete the temporary dirs that killed writers left in `parent`. Only for a caller that knows no
    other writer is at work there (the trainer, holding its run's lock)."""
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory so that it vanishes at once: renamed to `.X.atomic-trash` first (a reader never
    sees it half deleted under its name), then deleted; `recover` finishes a deletion cut short."""
    path = Path(path)
    trash = _side(path, TRASH)
    with _swap_lock(path):
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        _rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; put it in place of `final` only if the block succeeds.

    Works for files and directories alike (whatever the block creates at the yielded path); a crash at
    any moment leaves the old or the new content at `final` once `recover(final)` has run. A full disk
    anywhere in the block is raised as `DiskFull` naming `final` (and `size_hint`, the bytes it needs,
    when the caller knows them; with it the free space is checked before anything is written), after
    the temporary files are gone.
    """
    from poisonlab.diskspace import check_free, disk_full_from

    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover(final)
        if size_hint:
            check_free(final, size_hint)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        target = tmp / final.name
        try:
            yield target
            fsync_tree(target)
            if target.is_dir() and final.is_dir() and not final.is_symlink():
                with _swap_lock(final):
                    _recover_locked(final)  # a writer that died after our first look
                    _rename(target, _side(final, NEW))
                    _recover_locked(final)  # steps 3-5
            else:
                os.replace(target, final)
                fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:
        full = disk_full_from(e, final, size_hint)
        if full is None or full is e:
            raise
        raise full from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a file (a log: a torn last line is what a crash can leave; readers skip it); a full
    disk is raised as DiskFull naming the file."""
    from poisonlab.diskspace import disk_full_from

    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        full = disk_full_from(e, path, len(text.encode()))
        if full is None:
            raise
        raise full from None
