"""Ports: automatic assignment from a range, and finding who holds a port before we spawn.

Unlike "bind to port 0, close, reuse later" (the old tool's race), an assignment is
remembered per instance id for as long as the state dir lives, so an instance keeps its port
across restarts of itself and of the supervisor, and no two instances ever share one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from supervisor.core.placement import PortRangeExhausted

__all__ = ["PortAllocator", "PortRangeExhausted", "describe_holder", "port_is_free"]

log = logging.getLogger(__name__)


def port_is_free(port: int) -> bool:
    """True if nothing listens on `port` on any local address (a bind test, no scan)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            # SO_REUSEADDR: a port in TIME_WAIT is usable by the server we are about to start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            if exc.errno == errno.EADDRNOTAVAIL:
                continue  # no IPv6 on this host
            raise
        finally:
            sock.close()
    return True


def describe_holder(port: int) -> str:
    """Who listens on `port`: "pid 1234 (python3 -m http.server 8000)". Blocking: a full scan."""
    import psutil  # only when a port is taken: a node's actors never pay for it otherwise

    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return "another process (not allowed to see which)"
    for conn in conns:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            if conn.pid is None:
                return "another process (pid not visible)"
            try:
                proc = psutil.Process(conn.pid)
                cmdline = " ".join(proc.cmdline()) or proc.name()
            except psutil.Error:
                cmdline = "?"
            return f"pid {conn.pid} ({cmdline})"
    return "another socket (not listening; maybe a client or a socket being closed)"


class PortAllocator:
    """Assigns ports from [start, end], stable per instance id, persisted to a JSON file."""

    def __init__(
        self, start: int, end: int, path: Path | None = None, is_free: Callable[[int], bool] = port_is_free
    ) -> None:
        if not 1 <= start <= end <= 65535:
            raise ValueError(f"bad port range {start}-{end}")
        self.start, self.end = start, end
        self.path = path
        self.is_free = is_free
        self.assigned: dict[str, int] = {}
        # Reloads assign in a thread (resolve) while the loop may forget a port a stranger took
        # (give_up_port): one read-modify-write of the table and its file at a time.
        self._lock = threading.RLock()
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
                self.assigned = {str(k): int(v) for k, v in saved.items() if start <= int(v) <= end}
            except (ValueError, OSError, AttributeError) as exc:
                log.warning("ignoring unreadable port assignments in %s: %s", path, exc)

    def assign(self, instance_id: str, reserved: set[int]) -> int:
        """The instance's port: its previous one when still usable, else the lowest free one."""
        with self._lock:
            taken = {p for i, p in self.assigned.items() if i != instance_id} | reserved
            current = self.assigned.get(instance_id)
            if current is not None and current not in taken:
                return current
            for port in range(self.start, self.end + 1):
                if port not in taken and self.is_free(port):
                    self.record({instance_id: port})  # raises OSError (a full disk): no port, nothing changed
                    return port
        raise PortRangeExhausted(f"no free port left in the automatic range {self.start}-{self.end}")

    def dry_run(self) -> PortAllocator:
        """A copy that assigns the same way but remembers nothing (for checking a candidate)."""
        copy = PortAllocator(self.start, self.end, path=None, is_free=self.is_free)
        copy.assigned = dict(self.assigned)
        return copy

    def record(self, updates: dict[str, int | None]) -> None:
        """Remember `updates` (None: forget that id) once they are on disk. A failed write (a
        full disk) raises and leaves memory and file as they were, so ports.json never lacks a
        port in use (issue 11)."""
        with self._lock:
            new = dict(self.assigned)
            for key, port in updates.items():
                if port is None:
                    new.pop(key, None)  # forgetting twice (two give-ups in a row) is no error
                else:
                    new[key] = port
            self._save(new)
            self.assigned = new

    def forget(self, key: str, port: int) -> bool:
        """Forget `key`'s assignment if it is still `port`; True if it was (and is gone)."""
        with self._lock:
            if self.assigned.get(key) != port:
                return False
            self.record({key: None})
            return True

    def release_unused(self, live_ids: set[str]) -> None:
        """Forget assignments of instances that no longer exist (a declaration removed, or a
        model moved to other GPUs). Keys are instance ids, or "<instance id>#<name>" for a
        kind's extra ports."""
        with self._lock:
            kept = {i: p for i, p in self.assigned.items() if i.split("#")[0] in live_ids}
            if len(kept) != len(self.assigned):
                try:
                    self._save(kept)
                except OSError as exc:  # tidying only: never fail the reload that called it
                    log.warning("cannot forget unused port assignments in %s: %s", self.path, exc)
                    return
                self.assigned = kept

    def _save(self, assigned: dict[str, int]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(assigned, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)  # half a temp file on a full disk: give its space back
            if isinstance(exc, OSError):
                exc.filename = str(self.path)  # a failed write() names no file: say which one
            raise
