"""Reading the process table from /proc, and waiting for processes to go without polling.

Every read of /proc in the supervisor goes through this module: the process table (stat),
run marks (environ), argv (cmdline), names (comm), users (status), mapped files (maps), our
own children, mounts and cgroup. All of it blocks (small files): call it from a thread.

psutil builds `children(recursive=True)` from ppids, which loses a grandchild as soon as its
parent dies and it is reparented. Stopping a model server's whole tree needs process groups
and sessions too, so this module reads pid, ppid, pgid, sid, state and start time of every
process in one pass, and shares one scan among concurrent callers (a stop-all of 300
instances costs one scan, not 300).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from supervisor.adapters.marks import Mark, parse_environ


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str  # one letter: R, S, D, Z (zombie), ...
    starttime: int  # clock ticks after boot: (pid, starttime) identifies a process across pid reuse
    mark: Mark | None = None  # filled by scan(marks=True): which run of which instance it belongs to

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def _parse_stat(pid: int, text: str) -> ProcInfo:
    # The command name is in parentheses and may itself contain spaces and parentheses.
    rest = text[text.rindex(")") + 2 :].split()
    return ProcInfo(
        pid=pid,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        state=rest[0],
        starttime=int(rest[19]),
    )


def read_proc(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return _parse_stat(pid, f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def scan(marks: bool = False) -> dict[int, ProcInfo]:
    """One pass over /proc (blocking; call it from a thread). With `marks`, each process's
    run mark too (read once per process and cached, see `read_mark`)."""
    table: dict[int, ProcInfo] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                if marks and not info.zombie:
                    mark = read_mark(info.pid, info.starttime, remember_none=info.ppid != me)
                    if mark is not None:
                        info = replace(info, mark=mark)
                table[info.pid] = info
    return table


_marks: dict[tuple[int, int], Mark | None] = {}
_MARKS_LIMIT = 8192


def read_mark(pid: int, starttime: int, remember_none: bool = True) -> Mark | None:
    """The run mark of a live process (None: unmarked, gone, or not ours to read). Blocking.

    `/proc/<pid>/environ` is the environment at exec time and never changes for a process, so
    a mark is read once per (pid, start time) and cached. `remember_none=False` for our own
    fresh children: between fork and exec a child still has our (unmarked) environment, so
    "no mark" may be only for the moment."""
    key = (pid, starttime)
    try:
        return _marks[key]
    except KeyError:
        pass
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            mark = parse_environ(f.read())
    except OSError:  # gone, or another user's process (we could not have started it)
        mark = None
    if mark is None and not remember_none:
        return None
    if len(_marks) >= _MARKS_LIMIT:
        _marks.clear()
    _marks[key] = mark
    return mark


def marked(table: dict[int, ProcInfo], scope: str, token: str | None = None) -> set[int]:
    """Live processes carrying a mark of `scope` (and of run `token`, if given)."""
    return {
        p
        for p, info in table.items()
        if info.mark is not None
        and info.mark.scope == scope
        and (token is None or info.mark.token == token)
        and not info.zombie
    }


def tree(table: dict[int, ProcInfo], root: int, pgid: int | None = None) -> set[int]:
    """Live (non-zombie) processes that descend from `root` or sit in process group `pgid`.

    The group catches members whose parent already died; the ppid walk catches descendants
    that left the group with setsid() while their ancestors are still alive.
    """
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    if pgid is not None:
        found |= {p for p, info in table.items() if info.pgid == pgid}
    found.discard(root)
    return {p for p in found if not table[p].zombie}


class ProcessTable:
    """A /proc scan shared by everyone who asks within `max_age` seconds of each other."""

    def __init__(self, max_age: float = 0.05) -> None:
        self.max_age = max_age
        self._taken = 0.0
        self._result: dict[int, ProcInfo] | None = None
        self._pending: asyncio.Future[dict[int, ProcInfo]] | None = None

    async def snapshot(self) -> dict[int, ProcInfo]:
        if self._result is not None and time.monotonic() - self._taken < self.max_age:
            return self._result
        if self._pending is None:
            self._pending = asyncio.ensure_future(asyncio.to_thread(scan, True))
            try:
                self._result = await self._pending
                self._taken = time.monotonic()
            finally:
                self._pending = None
            return self._result
        return await asyncio.shield(self._pending)


def open_pidfd(info: ProcInfo) -> int | None:
    """A pidfd for `info`'s process, or None if it is gone (or its pid was reused)."""
    try:
        fd = os.pidfd_open(info.pid)
    except (ProcessLookupError, OSError):
        return None
    now = read_proc(info.pid)  # the pid may have been reused between the scan and the open
    if now is None or now.starttime != info.starttime or now.zombie:
        os.close(fd)
        return None
    return fd


async def wait_fds_readable(fds: Iterable[int], timeout: float) -> set[int]:
    """Wait until every pidfd is readable (its process exited); returns the fds still waiting."""
    loop = asyncio.get_running_loop()
    pending = set(fds)
    if not pending:
        return pending
    done = loop.create_future()

    def readable(fd: int) -> None:
        loop.remove_reader(fd)
        pending.discard(fd)
        if not pending and not done.done():
            done.set_result(None)

    for fd in list(pending):
        loop.add_reader(fd, readable, fd)
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), timeout)
    finally:
        for fd in pending:
            loop.remove_reader(fd)
    return pending


def user_of(pid: int) -> str | None:
    """The name of the user running `pid` (its real uid, as `ps` shows it); None if it is gone.
    Blocking (a /proc read); the stray allow-list matches these names."""
    import pwd

    try:
        with open(f"/proc/{pid}/status") as f:
            uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def read_comm(pid: int) -> str | None:
    """A process's command name (/proc/<pid>/comm, what `ps -o comm` shows); None if it is gone
    or has none."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() or None
    except OSError:
        return None


def read_cmdline(pid: int) -> list[str] | None:
    """A process's argv; None if it is gone, [] for a zombie or a kernel thread (they have none)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


def cmdlines() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every live process that has an argv (zombies have none)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = read_cmdline(int(entry))
            if argv:
                out.append((int(entry), argv))
    return out


def mapped_files(pid: int) -> list[str]:
    """The paths of the files a process maps (/proc/<pid>/maps, one per mapping, in order, with
    the kernel's " (deleted)" after a removed one); [] if it is gone or not ours to read."""
    paths = []
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)  # address perms offset dev inode path
                if len(fields) == 6:
                    paths.append(fields[5])
    except OSError:
        pass
    return paths


def own_children() -> list[int]:
    """Our direct children (every thread's), from /proc/self/task/*/children."""
    found: list[int] = []
    for path in glob.glob("/proc/self/task/*/children"):
        try:
            with open(path) as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def mounts() -> list[tuple[str, str, str]]:
    """(source, mount point, file system type) of every mount this process sees
    (/proc/self/mounts; octal escapes such as \\040 left as they are); [] if unreadable."""
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    found.append((fields[0], fields[1], fields[2]))
    except OSError:
        pass
    return found


def own_cgroup() -> str | None:
    """Our cgroup v2 path (the "0::" line of /proc/self/cgroup), or None (v1 only, unreadable)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None
