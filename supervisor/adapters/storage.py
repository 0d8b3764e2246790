"""Storage errors told as what they are, and the state dir's health.

With the state dir on a full disk, a PUT answered 500 "internal error: OSError", a start
failed with "cannot execute 'sleep': [Errno 28]" (blaming the program) and `/healthz` said
"ok" (issue 11). Here an OSError from a write becomes a reason naming the cause and the
path ("no space left on device while writing state/ports.json"), and `probe` tells whether a
directory takes writes right now. Blocking functions; `StateDirHealth.check` is the async,
cached face of `probe` for `/healthz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from supervisor.core.oserrors import FULL, describe, is_full

__all__ = ["FULL", "StateDirHealth", "describe", "is_full", "probe"]

#: Enough for a log line, a run record and ports.json: a probe that writes nothing would pass
#: on a full file system that still has inodes.
PROBE_BYTES = 4096


def probe(directory: Path) -> OSError | None:
    """Write, fsync and remove a small file in `directory`: None if it all worked, else the error."""
    path = directory / f".write-probe.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)  # tmpfs and most disks report ENOSPC at write; some only at fsync
        finally:
            os.close(fd)
    except OSError as exc:
        return exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


class StateDirHealth:
    """The state dir's writability for `/healthz`, probed at most every `interval` seconds
    (off the event loop). Recovers by itself: the next probe after space is freed passes."""

    def __init__(self, directory: Path, interval: float = 2.0) -> None:
        self.directory = directory
        self.interval = interval
        self.reason: str | None = None
        self._checked = float("-inf")
        self._lock = asyncio.Lock()

    async def check(self) -> str | None:
        async with self._lock:  # concurrent health checks share one probe
            if time.monotonic() - self._checked >= self.interval:
                failure = await asyncio.to_thread(probe, self.directory)
                self.reason = describe(failure, self.directory) if failure is not None else None
                self._checked = time.monotonic()
            return self.reason
