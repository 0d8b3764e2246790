"""Killing a process by pid, safely (the old tool SIGKILLed any pid, 0 and -1 included).

`judge` is the pure policy; `terminate` does it: SIGTERM through a pidfd (immune to pid
reuse), then SIGKILL after a grace period, waiting on the pidfd rather than polling.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from supervisor.adapters.procscan import ProcInfo, open_pidfd, read_proc, wait_fds_readable


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str
    instance: str | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    """What the policy needs to know about the target and about ourselves."""

    pid: int
    self_pid: int
    self_pgid: int
    target_pgid: int | None
    ancestors: frozenset[int]
    owner: str | None  # the supervised instance whose process tree holds pid
    on_gpu: bool


def judge(f: Facts, force: bool) -> Verdict:
    if f.pid <= 1:
        return Verdict(
            False,
            f"pid {f.pid} is never a valid target (0 and negative pids signal whole process groups "
            "or every process; 1 is init)",
        )
    if f.pid == f.self_pid:
        return Verdict(False, f"pid {f.pid} is the supervisor itself")
    if f.pid in f.ancestors:
        return Verdict(False, f"pid {f.pid} is an ancestor of the supervisor")
    if f.target_pgid is not None and f.target_pgid == f.self_pgid:
        return Verdict(False, f"pid {f.pid} is in the supervisor's own process group")
    if f.owner is not None:
        return Verdict(
            True,
            f"pid {f.pid} belongs to instance {f.owner}; it will be restarted according to its "
            "restart policy",
            f.owner,
        )
    if f.on_gpu:
        return Verdict(True, f"pid {f.pid} is a GPU process that belongs to no supervised instance")
    if force:
        return Verdict(
            True, f"pid {f.pid} is neither a GPU process nor supervised; killed because force=true"
        )
    return Verdict(
        False,
        f"pid {f.pid} is neither using a GPU nor part of a supervised instance; "
        "add ?force=true to kill it anyway",
    )


def ancestors(pid: int, table: dict[int, ProcInfo]) -> frozenset[int]:
    found = set()
    info = table.get(pid)
    while info is not None and info.ppid > 0 and info.ppid not in found:
        found.add(info.ppid)
        info = table.get(info.ppid)
    return frozenset(found)


def owner_of(pid: int, table: dict[int, ProcInfo], instance_pids: dict[str, int]) -> str | None:
    """The instance whose process tree (descendants or process group) contains `pid`."""
    return owners_of([pid], table, instance_pids).get(pid)


def owners_of(
    pids: list[int] | set[int] | frozenset[int], table: dict[int, ProcInfo], instance_pids: dict[str, int]
) -> dict[int, str]:
    """For each pid, the instance that owns it: walks up from the pid through its parents,
    and its process group, to an instance's main process. O(depth) per pid, not O(table)."""
    roots = {root: iid for iid, root in instance_pids.items()}
    owners: dict[int, str] = {}
    for pid in pids:
        current, hops = pid, 0
        while current > 1 and hops < 64:
            if current in roots:
                owners[pid] = roots[current]
                break
            info = table.get(current)
            if info is None:
                break
            if info.pgid in roots:  # a member of an instance's group whose parent already died
                owners[pid] = roots[info.pgid]
                break
            current, hops = info.ppid, hops + 1
    return owners


async def terminate(pid: int, grace: float) -> str:
    """SIGTERM, wait up to `grace`, then SIGKILL. Returns "terminated" or "killed"."""
    info = read_proc(pid)
    fd = open_pidfd(info) if info is not None else None
    if fd is None:
        raise ProcessLookupError(pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not await wait_fds_readable([fd], grace):
            return "terminated"
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        await wait_fds_readable([fd], 5.0)
        return "killed"
    except ProcessLookupError:
        return "terminated"
    finally:
        os.close(fd)


def facts_for(
    pid: int, table: dict[int, ProcInfo], instance_pids: dict[str, int], gpu_pids: set[int]
) -> Facts:
    target = table.get(pid)
    me = os.getpid()
    return Facts(
        pid=pid,
        self_pid=me,
        self_pgid=os.getpgrp(),
        target_pgid=target.pgid if target else None,
        ancestors=ancestors(me, table),
        owner=owner_of(pid, table, instance_pids),
        on_gpu=pid in gpu_pids,
    )
