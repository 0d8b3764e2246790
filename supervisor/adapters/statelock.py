"""One supervisor per state dir: an exclusive lock, held for the life of `serve`.

Two supervisors on one state dir would adopt the same runs and kill each other's "leftovers".
`flock` is released by the kernel when the holder dies however it dies (SIGKILL included), so
a crash never leaves a stale lock; the file holds the holder's pid only to name it.
The descriptor is close-on-exec, so children never hold it (a kept-running instance must not
keep the next supervisor out).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "supervisor.lock"


class StateDirLocked(Exception):
    pass


def lock_state_dir(state_dir: Path) -> int:
    """Take the lock or raise StateDirLocked naming the holder; returns the fd to keep open."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise StateDirLocked(
            f"state dir {state_dir} is in use by another supervisor (pid {holder}); "
            "stop it first, or give this one its own --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
