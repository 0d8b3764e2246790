"""Being a child subreaper: orphaned descendants of our instances come back to us.

A worker that calls setsid() and whose parent then dies would be reparented to pid 1 and live
on unsupervised. With `PR_SET_CHILD_SUBREAPER` it is reparented to the supervisor instead, so
it stays findable (our children, carrying a run's mark) and is stopped with its instance.

The cost is that we must reap those orphans when they exit, or they stay zombies. We reap only
zombie children that are *not in our own process group*: instance leaders each lead their own
group (and reap themselves through their pidfd), and helper subprocesses that library code
starts from threads stay in our group and are reaped by whoever started them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

from supervisor.adapters.procscan import own_children, read_proc

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> str | None:
    """Ask the kernel to reparent our orphaned descendants to us; returns why not, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:
        return f"prctl is not available: {exc}"
    return None


def reap_orphans(owned: Callable[[int], bool]) -> list[int]:
    """Reap zombie children that no handle of ours waits for; returns their pids."""
    mine = os.getpgrp()
    reaped = []
    for pid in own_children():
        if owned(pid):
            continue
        info = read_proc(pid)
        if info is None or not info.zombie or info.pgid == mine:
            continue
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped.append(pid)
        except ChildProcessError:
            pass
    if reaped:
        log.debug("reaped orphaned descendant(s) %s", reaped)
    return reaped
