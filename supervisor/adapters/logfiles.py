"""Per-instance log files that children write to directly.

The child's stdout and stderr are an `O_APPEND` descriptor on the file, not a pipe through
us: logging costs the supervisor no CPU, a chatty child can never block on a full pipe, and
the child keeps running if the supervisor dies. Because the child holds the descriptor,
rotation is copy-then-truncate; with `O_APPEND` the child's next write lands at the new end
(without it, truncation leaves a NUL-filled hole). Lines written between the copy and the
truncate are lost: the price of never interrupting the child.

`LogFile`'s methods block; the engine calls them from threads (`LocalLog` does that for the API).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

TAIL_BYTES = 8192


class LogFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def open_for_child(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    @staticmethod
    def marker(text: str) -> bytes:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"[model-supervisor {stamp}] {text}\n".encode()

    def mark(self, text: str) -> None:
        """Append one supervisor line, so a reader sees where each run begins and ends."""
        fd = self.open_for_child()
        try:
            os.write(fd, self.marker(text))
        finally:
            os.close(fd)

    def tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                want = TAIL_BYTES
                while True:
                    start = max(0, size - want)
                    f.seek(start)
                    data = f.read()
                    found = data.splitlines()
                    if len(found) > lines or start == 0:
                        break
                    want *= 4
        except FileNotFoundError:
            return []
        if start > 0 and found:
            found = found[1:]  # first line is probably cut
        return [line.decode("utf-8", "replace") for line in found[-lines:]]

    def read_from(self, offset: int, limit: int = 1 << 16) -> tuple[bytes, int, int]:
        """Up to `limit` bytes from `offset`; returns (data, new offset, inode). After a
        copy-truncate rotation the file is shorter than `offset`: reading restarts at 0."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size < offset:
                    offset = 0
                f.seek(offset)
                data = f.read(limit)
                return data, offset + len(data), st.st_ino
        except FileNotFoundError:
            return b"", 0, 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def rotate_if_needed(self, max_bytes: int, backups: int) -> bool:
        """Copy-truncate once the file exceeds `max_bytes`; keep `backups` old copies."""
        if max_bytes <= 0 or self.size() <= max_bytes:
            return False
        if backups > 0:
            for n in range(backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            shutil.copyfile(self.path, self.path.with_name(f"{self.path.name}.1"))
        with open(self.path, "r+b") as f:
            f.truncate(0)
        return True


class LogUnavailable(Exception):
    """A log that cannot be read now: its node, or the cluster, is unreachable."""


class LocalLog:
    """The reader the API streams from (`tail`, `size`, `read_from`), async: a log file on
    this machine, read in a thread. A run on a cluster node has a `RemoteLog` instead
    (runners/ray.py), read by that node's agent."""

    def __init__(self, log_file: LogFile) -> None:
        self.log_file = log_file

    async def tail(self, lines: int) -> list[str]:
        return await asyncio.to_thread(self.log_file.tail, lines)

    async def size(self) -> int:
        return await asyncio.to_thread(self.log_file.size)

    async def read_from(self, offset: int) -> tuple[bytes, int, int]:
        return await asyncio.to_thread(self.log_file.read_from, offset)
