"""Surviving our own death: what a starting supervisor does with an earlier one's runs.

An earlier supervisor of this state dir (SIGKILLed, crashed, or told to keep its instances
running on exit) leaves run records (records.py) and marked processes (marks.py) behind.
At start:

* `decide` (pure) sorts the records: a run whose instance is still declared, enabled and
  unchanged (same launch hash) is **adopted**; one whose declaration file is broken right now
  is **deferred** (left running, claimable once the file is valid again: a broken file never
  costs a running model); every other run is **stale** (declaration changed, disabled or gone)
  and is stopped before its replacement starts.
* `Adoption.sweep` then stops every process that carries our scope's mark but belongs to no
  adopted or deferred run (a SIGKILL between spawn and record, a setsid grandchild of a dead
  run), and removes leftover run cgroups. Fresh launches at start-up wait for the sweep:
  stop first, start later, so a leftover never holds the port or GPU its replacement needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.adapters.cgroups import RunCgroups
from supervisor.adapters.procscan import ProcInfo, marked, read_cmdline, read_proc
from supervisor.adapters.runners.process import stop_processes
from supervisor.config.desired import InstanceSpec

log = logging.getLogger(__name__)


@dataclass
class Decision:
    adopt: dict[str, dict[str, Any]] = field(default_factory=dict)  # instance id -> record
    deferred: dict[str, dict[str, Any]] = field(default_factory=dict)
    stale: dict[str, dict[str, Any]] = field(default_factory=dict)


def decide(
    records: Mapping[str, dict[str, Any]], instances: Mapping[str, InstanceSpec], broken_files: set[str]
) -> Decision:
    """Sort an earlier supervisor's run records into adopt / deferred / stale."""
    out = Decision()
    for iid, record in records.items():
        spec = instances.get(iid)
        if spec is not None and spec.enabled and record.get("launch_hash") == spec.launch_hash:
            out.adopt[iid] = record
        elif spec is None and record.get("source") in broken_files:
            out.deferred[iid] = record
        else:
            out.stale[iid] = record
    return out


def describe_stale(record: dict[str, Any], spec: InstanceSpec | None) -> str:
    if spec is None:
        return "its declaration is gone"
    if not spec.enabled:
        return "it is disabled in its declaration"
    return "its declaration changed while the supervisor was down"


def _cmdline(pid: int) -> str:
    return " ".join(read_cmdline(pid) or ()).strip() or "?"


def record_alive(record: dict[str, Any]) -> bool:
    """The recorded process itself still runs (pid and start time match)."""
    try:
        info = read_proc(int(record["pid"]))
        return info is not None and not info.zombie and info.starttime == int(record["starttime"])
    except (KeyError, TypeError, ValueError):
        return False


class Adoption:
    """One start-up's adoption: the sweep of leftovers, and the gate fresh launches wait on.

    What exists is read once, before this supervisor starts anything (`table`, the run cgroups
    found): every marked process and run cgroup of our scope in it is an earlier supervisor's.
    So deciding costs no scan at the moment launches wait, and when nothing is left over (the
    common case) the gate is open at once."""

    def __init__(
        self, scope: str, table: dict[int, ProcInfo], cgroups: RunCgroups | None, cgroups_found: list[Path]
    ) -> None:
        self.scope = scope
        self.table = table
        self.cgroups = cgroups
        self.cgroups_found = cgroups_found
        self.swept: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.stopped: list[tuple[int, str, str]] = []  # (pid, instance, command line) of leftovers

    def leftovers(
        self, keep: Callable[[str], bool], stale: dict[str, dict[str, Any]]
    ) -> tuple[set[int], list[Path]]:
        """(processes, run cgroups) that belong to no run we keep (`keep(token)`: adopted or
        deferred). Pure but for reading the stat of a stale record's leader."""
        table = self.table
        victims = {
            p for p in marked(table, self.scope) if (m := table[p].mark) is not None and not keep(m.token)
        }
        for record in stale.values():  # a stale leader that cleared its environment
            if record.get("kind") == "process" and record_alive(record):
                victims.add(int(record["pid"]))
        victims.discard(os.getpid())
        return victims, [p for p in self.cgroups_found if not keep(RunCgroups.token_of(p))]

    def done(self) -> None:
        if not self.swept.done():
            self.swept.set_result(None)

    async def sweep(
        self, victims: set[int], cgroups: list[Path], stop_timeout: float, why: dict[str, str]
    ) -> None:
        """Stop the leftovers (TERM, `stop_timeout`, KILL), log each with its command line,
        remove their cgroups; resolves `swept` when done (even on error)."""
        table = self.table
        try:
            for pid in sorted(victims):
                info = table.get(pid)
                instance = info.mark.instance if info is not None and info.mark is not None else "?"
                command = await asyncio.to_thread(_cmdline, pid)
                reason = why.get(instance, "it belongs to no run this supervisor adopted")
                log.warning(
                    "stopping leftover pid %s of instance %s (%s): %s", pid, instance, reason, command
                )
                self.stopped.append((pid, instance, command))
            if victims:  # pidfds check the start time: a pid reused since the scan is spared
                await stop_processes(table, victims, signal.SIGTERM, stop_timeout)
            for path in cgroups:
                log.warning("removing leftover cgroup %s", path)
                await asyncio.to_thread(RunCgroups.kill, path)
                await asyncio.to_thread(RunCgroups.remove, path)
        finally:
            self.done()
