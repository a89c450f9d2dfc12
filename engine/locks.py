"""Exclusive `flock` locks on files: shard claims, the run folder's lock and the engine cache's.

The kernel drops a flock when its holder dies (kill -9 included), so a lock file left behind by a dead
process is free to take again: no pid checks, no break-the-stale-lock race. What a lock file holds (pid,
host, time) only says who holds it, for messages.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path


class FileLock:
    """A held exclusive lock; `release()` drops it, unlinking the file first when `unlink`."""

    def __init__(self, path: Path, fd: int, unlink: bool) -> None:
        self.path, self._fd, self._unlink = path, fd, unlink

    def release(self) -> None:
        if self._fd is None:
            return
        if self._unlink:
            # Unlink while still holding the lock: a process blocked on the old file sees its inode vanish
            # and retries on a fresh file (see `acquire`), so two holders never coexist.
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def acquire(path: Path, block: bool = False, unlink: bool = True) -> FileLock | None:
    """Hold an exclusive flock on `path` (created if needed); None when a live process holds it and not
    `block`. The holder's pid, host and time are written into the file."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder released (and unlinked) it between our open and flock: try again
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": round(time.time(), 3)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return FileLock(path, fd, unlink)


@contextmanager
def held(path: Path):
    """Block until `path` is locked, for the body (the file stays, for the next holder)."""
    lock = acquire(path, block=True, unlink=False)
    try:
        yield
    finally:
        lock.release()


def holder(path: Path) -> str:
    """Who holds the lock, for messages: 'pid 123 on host h' (or 'another process')."""
    try:
        owner = json.loads(Path(path).read_text())
        return f"pid {owner['pid']} on host {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
