"""One trainer per run directory: `runs/<name>/.lock`, held for as long as a process trains the run.

The lock is an `fcntl.flock` on that file: the OS releases it when its holder exits or is killed (no
stale locks to clean up by hand), and on Linux it also works across hosts over NFSv4. The holder writes
its host, pid, start time and command into the file, so that whoever finds the run busy can say who
has it. The file stays after the run (it names the last holder); only the flock says whether a
process holds it now.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from poisonlab.errors import UserError

LOCK_FILE = ".lock"


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    command = " ".join(str(holder.get("command", "?")).split())
    command = command if len(command) <= 160 else command[:157] + "..."
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} ({command})"


class RunBusy(UserError):
    """Another live process trains this run directory."""

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"{run_dir}: busy, held by {describe(holder)}; wait for it or stop that process")


def _read(fd: int) -> dict:
    # through our own descriptor: never open and close the holder's lock file a second time
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def read_holder(run_dir: str | os.PathLike) -> dict:
    """What the lock file says about its (last) holder; {} when there is none."""
    try:
        return json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[dict]:
    """Hold the run's lock for the block (creating the run directory); RunBusy at once if it is held."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(3):  # a look by busy() holds it for microseconds: do not mistake that
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 2:
                    raise RunBusy(run_dir, _read(fd)) from None
                time.sleep(0.02)
            except OSError as e:  # e.g. ENOLCK: an NFS mount without locking
                raise UserError(f"{run_dir / LOCK_FILE}: cannot lock it ({e.strerror}); put runs on a "
                                "filesystem with file locks") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield me
    finally:
        os.close(fd)  # releases the lock


def busy(run_dir: str | os.PathLike) -> dict | None:
    """The holder if another process holds the run's lock now, else None (a look, not a reservation).

    Opens the file read-only (a shared flock needs no more), so it also looks into a run directory it
    may not write to (`poisonlab status` on another user's sweep)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            # a shared lock: enough to see an exclusive holder, and it never blocks another look
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        return None
    finally:
        os.close(fd)
