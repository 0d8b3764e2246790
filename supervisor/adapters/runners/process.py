"""Running a backend as a plain child process tree.

* exec without a shell, in a new session (its own process group, no controlling terminal:
  a Ctrl-C meant for the supervisor does not hit the children behind its back);
* stdout and stderr are an `O_APPEND` descriptor on the instance's log file;
* every process of a run carries the run's mark in its environment (marks.py), and where the
  kernel lets us the run has its own cgroup (cgroups.py): no descendant escapes a stop;
* the exit is noticed at once through a pidfd registered with the event loop: no polling,
  no thread per child, on uvloop and on the plain asyncio loop alike;
* stop signals the whole group and every marked descendant that left it, waits, then SIGKILLs
  them (and `cgroup.kill`s the run's cgroup);
* a run that survived a supervisor restart is *adopted* from its run record: the same handle,
  watching a process that is no longer our child (its exit status is then unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from supervisor.adapters import storage
from supervisor.adapters.cgroups import RunCgroups
from supervisor.adapters.health import Prober
from supervisor.adapters.logfiles import LogFile
from supervisor.adapters.marks import MARK_ENV, Mark, new_token
from supervisor.adapters.procscan import (
    ProcessTable,
    ProcInfo,
    marked,
    open_pidfd,
    own_children,
    read_mark,
    read_proc,
    tree,
    wait_fds_readable,
)
from supervisor.adapters.runners.base import LaunchError, LogReader
from supervisor.adapters.subreaper import reap_orphans
from supervisor.core.launch import ProcessLaunch
from supervisor.core.states import ExitStatus

log = logging.getLogger(__name__)

#: After SIGKILL, how long to wait for the kernel to tear the processes down.
KILL_GRACE = 5.0


class ProcessHandle:
    """One run: a child we spawned (`popen`), or a process adopted from a run record."""

    #: A run on this machine: probed from here, its log is the instance's file here.
    node_name: str | None = None
    prober: Prober | None = None
    remote_log: LogReader | None = None

    def __init__(
        self,
        runner: ProcessRunner,
        pid: int,
        pgid: int,
        starttime: int | None,
        token: str,
        popen: subprocess.Popen[bytes] | None = None,
        pidfd: int | None = None,
        cgroup: Path | None = None,
    ) -> None:
        self._runner = runner
        self._popen = popen
        self.pid = pid
        self.pgid = pgid
        self.starttime = starttime
        self.token = token
        self.cgroup = cgroup
        self.adopted = popen is None
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._stopping = False
        self._pidfd = pidfd
        self._watch_exit()

    # -- exit notification -------------------------------------------------------------
    def _watch_exit(self) -> None:
        if self._pidfd is None and self._popen is not None:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except OSError:  # kernels before 5.3: one blocking waitpid thread per child
                threading.Thread(target=self._wait_in_thread, name=f"waitpid-{self.pid}", daemon=True).start()
                return
        if self._pidfd is None:  # adopted, and already gone
            self._finish(None)
            return
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        status: int | None = None
        if self._popen is not None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # someone else reaped it: we know it is gone, not how
                pid, status = self.pid, None
            if pid == 0:
                return  # spurious wake-up
        # An adopted process is not our child: the pidfd says it ended, nobody can say how.
        assert self._pidfd is not None  # this is its reader: removed before the pidfd is closed
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._finish(status)

    def _wait_in_thread(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = None
        self._loop.call_soon_threadsafe(self._finish, status)

    def _finish(self, status: int | None) -> None:
        if status is None:
            result = ExitStatus()
        else:
            result = ExitStatus.from_returncode(os.waitstatus_to_exitcode(status))
        if self._popen is not None:
            # Tell Popen it is reaped, or its __del__/_cleanup would waitpid() a reused pid later.
            self._popen.returncode = -(result.signal or 0) if result.signal else (result.code or 0)
        self._runner._children.pop(self.pid, None)
        if not self._exit.done():
            self._exit.set_result(result)

    @property
    def exited(self) -> bool:
        return self._exit.done()

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    # -- stopping ------------------------------------------------------------------------
    async def stop(self, signum: int, timeout: float) -> ExitStatus:
        self._stopping = True
        await self._terminate(signum, timeout, include_leader=True)
        return await self.wait()

    async def cleanup(self, signum: int, timeout: float) -> None:
        if self._stopping:
            return
        if not await self._may_have_left_something():
            await self._remove_cgroup()
            return  # the common case: nothing left, no scan
        await self._terminate(signum, timeout, include_leader=False)

    async def _may_have_left_something(self) -> bool:
        """A cheap check before a full scan: is anything of this run possibly still alive?"""
        try:
            os.killpg(self.pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            pass
        if self.cgroup is not None:
            return bool(await asyncio.to_thread(RunCgroups.procs, self.cgroup))
        if self._runner.subreaper and not self.adopted:
            # Orphans of our runs are reparented to us: one that is not a leader may be this run's.
            return any(not self._runner.owns(pid) for pid in own_children())
        return True  # descendants may have been reparented anywhere: only a scan can tell

    async def _terminate(self, signum: int, timeout: float, include_leader: bool) -> None:
        table = await self._runner.table.snapshot()
        leader_alive = include_leader and not self.exited
        members = tree(table, self.pid if leader_alive else -1, self.pgid)
        members |= marked(table, self._runner.scope, self.token)
        if self.cgroup is not None:
            members |= set(await asyncio.to_thread(RunCgroups.procs, self.cgroup))
        members.discard(self.pid)
        fds = _pidfds(table, members)
        try:
            if not leader_alive and not fds:
                return
            if not include_leader:
                log.warning(
                    "pid %s exited but left %d process(es) behind: %s; stopping them",
                    self.pid,
                    len(fds),
                    sorted(fds.values()),
                )
            loop = asyncio.get_running_loop()
            self._signal_all(signum, fds)
            deadline = loop.time() + timeout
            if leader_alive:
                await asyncio.wait({self._exit}, timeout=timeout)
            remaining = await wait_fds_readable(fds, max(0.0, deadline - loop.time()))
            if remaining or (leader_alive and not self.exited):
                log.info(
                    "pid %s: still running %.1f s after %s; sending SIGKILL",
                    self.pid,
                    timeout,
                    signal.Signals(signum).name,
                )
                self._signal_all(signal.SIGKILL, {fd: fds[fd] for fd in remaining})
                if self.cgroup is not None:
                    await asyncio.to_thread(RunCgroups.kill, self.cgroup)
                if leader_alive:
                    await asyncio.wait({self._exit}, timeout=KILL_GRACE)
                left = await wait_fds_readable(remaining, KILL_GRACE)
                if left:
                    log.error("processes %s survived SIGKILL", sorted(fds[fd] for fd in left))
        finally:
            for fd in fds:
                os.close(fd)
            await self._remove_cgroup()

    async def _remove_cgroup(self) -> None:
        if self.cgroup is not None and (self.exited or self._stopping):
            await asyncio.to_thread(RunCgroups.remove, self.cgroup)

    def _signal_all(self, signum: int, fds: dict[int, int]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)
        # Not our child: its group may be gone, the pidfd is sure (an adopted run that has not
        # exited has one; None would only have raised the TypeError this once suppressed).
        if self.adopted and not self.exited and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signum)
        for fd in fds:  # descendants that left the group (setsid, setpgid)
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(fd, signum)

    def record(self) -> dict[str, Any]:
        return {
            "kind": "process",
            "pid": self.pid,
            "pgid": self.pgid,
            "starttime": self.starttime,
            "token": self.token,
            "cgroup": str(self.cgroup) if self.cgroup else None,
        }


def _pidfds(table: dict[int, ProcInfo], pids: set[int]) -> dict[int, int]:
    fds: dict[int, int] = {}
    for pid in pids:
        fd = open_pidfd(table[pid]) if pid in table else None
        if fd is not None:
            fds[fd] = pid
    return fds


async def stop_processes(table: dict[int, ProcInfo], pids: set[int], signum: int, timeout: float) -> None:
    """TERM (or `signum`) every process in `pids`, wait up to `timeout`, SIGKILL the rest.
    For leftovers that belong to no handle (an earlier supervisor's runs)."""
    fds = _pidfds(table, pids)
    try:
        for fd in fds:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(fd, signum)
        remaining = await wait_fds_readable(fds, timeout)
        for fd in remaining:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        left = await wait_fds_readable(remaining, KILL_GRACE)
        if left:
            log.error("processes %s survived SIGKILL", sorted(fds[fd] for fd in left))
    finally:
        for fd in fds:
            os.close(fd)


class ProcessRunner:
    name = "process"
    ports_here = True

    def __init__(
        self,
        table: ProcessTable | None = None,
        scope: str = "local",
        cgroups: RunCgroups | None = None,
        *,
        subreaper: bool = False,
    ) -> None:
        self.table = table or ProcessTable()
        self.scope = scope
        self.cgroups = cgroups
        #: Why per-run cgroups are (not) in use, for /healthz.
        self.containment_note = "not detected yet" if cgroups is None else "given"
        #: This process is a child subreaper: orphans of our runs are then our children.
        self.subreaper = subreaper
        self._children: dict[int, ProcessHandle] = {}  # leaders we spawned, until reaped
        self._spawns_in_flight = 0
        self._reap_deferred = False

    async def set_up_containment(self, use_cgroups: bool) -> None:
        """At start-up: a cgroup per run where this machine allows it, else marks (and the
        subreaper) keep each run's processes together."""
        if not use_cgroups:
            self.containment_note = "cgroups off by setting"
            return
        if self.cgroups is not None:
            return
        self.cgroups, self.containment_note = await asyncio.to_thread(RunCgroups.detect, self.scope)
        if self.cgroups is None:
            log.info(
                "no per-run cgroups (%s): runs are kept together by marks%s",
                self.containment_note,
                " and the subreaper" if self.subreaper else "",
            )

    def unavailable_reason(self) -> str | None:
        return None

    async def check(self) -> None:
        return None  # fork and exec are always there

    async def close(self) -> None:
        pass

    async def adoptable(self, plan: ProcessLaunch, instance_id: str) -> bool:
        return False  # without a run record there is nothing to identify a process by

    def owns(self, pid: int) -> bool:
        """True for the leader of a run we spawned (it reaps itself through its pidfd)."""
        return pid in self._children

    def reap_orphans(self) -> list[int]:
        """As a subreaper, after SIGCHLD: reap the zombie children no handle of ours waits for.

        Not while a spawn runs in its thread: its leader exists a moment before it is
        registered here and could be taken for an orphan (its exit status lost). The reap is
        then done as soon as the spawns are."""
        if self._spawns_in_flight:
            self._reap_deferred = True
            return []
        self._reap_deferred = False
        return reap_orphans(self.owns)

    def containment(self) -> str:
        """How runs are kept together, for /healthz."""
        if self.cgroups is not None:
            return "cgroup"
        return "mark+subreaper" if self.subreaper else "mark"

    async def adopt(
        self, plan: ProcessLaunch, log_file: LogFile, instance_id: str, record: dict[str, Any]
    ) -> ProcessHandle | None:
        """A handle on a run an earlier supervisor started, if that very process still runs."""
        if record.get("kind") != "process":
            return None
        try:
            pid, pgid, starttime, token = (
                int(record["pid"]),
                int(record["pgid"]),
                int(record["starttime"]),
                str(record["token"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        info = read_proc(pid)
        if info is None or info.zombie or info.starttime != starttime:
            return None  # gone, or its pid now names another process
        mark = await asyncio.to_thread(read_mark, pid, starttime)
        if mark is not None and (mark.scope != self.scope or mark.token != token):
            return None
        fd = open_pidfd(info)
        if fd is None:
            return None
        cgroup = Path(record["cgroup"]) if record.get("cgroup") else None
        return ProcessHandle(self, pid, pgid, starttime, token, pidfd=fd, cgroup=cgroup)

    def _spawn(
        self, plan: ProcessLaunch, log_file: LogFile, instance_id: str, token: str
    ) -> tuple[subprocess.Popen[bytes], ProcInfo | None, Path | None]:
        """In a thread: the run's cgroup, its log's first line and the child itself."""
        env = {k: v for k, v in os.environ.items() if k not in plan.unset_env}
        env.update(plan.env)
        env[MARK_ENV] = Mark(self.scope, token, instance_id or "?").value()
        cgroup = None
        if self.cgroups is not None:
            try:
                # A mkdir under /sys/fs/cgroup: too quick to be worth a thread hop before a spawn.
                cgroup = self.cgroups.create(instance_id or "run", token)
            except OSError as exc:
                log.warning("%s: no cgroup for this run (%s); marks only", instance_id, exc.strerror)
        try:
            fd = log_file.open_for_child()
        except (
            OSError
        ) as exc:  # the state dir, not the program (issue 11: "cannot execute 'sleep': [Errno 28]")
            _discard(cgroup)
            raise LaunchError(
                f"cannot open the instance log: {storage.describe(exc, log_file.path, 'opening')}"
            ) from None
        try:
            # The run's first line, through the very descriptor the child inherits: no extra
            # open, and it lands before anything the child writes.
            try:
                os.write(fd, log_file.marker(f"starting {instance_id}: {plan.describe()}"))
            except OSError as exc:
                _discard(cgroup)
                raise LaunchError(
                    f"cannot write the instance log: {storage.describe(exc, log_file.path)}"
                ) from None
            popen = subprocess.Popen(
                plan.argv,
                cwd=plan.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            _discard(cgroup)
            if plan.cwd and not os.path.isdir(plan.cwd):
                raise LaunchError(f"working directory {plan.cwd!r} does not exist") from None
            raise LaunchError(f"command not found: {exc.filename or plan.argv[0]!r}") from None
        except PermissionError as exc:
            _discard(cgroup)
            raise LaunchError(f"permission denied executing {exc.filename or plan.argv[0]!r}") from None
        except OSError as exc:
            _discard(cgroup)
            raise LaunchError(f"cannot execute {plan.argv[0]!r}: {exc}") from None
        finally:
            os.close(fd)
        return popen, read_proc(popen.pid), cgroup

    async def launch(
        self, plan: ProcessLaunch, log_file: LogFile, instance_id: str = "", stop_signal: int = 15
    ) -> ProcessHandle:
        token = new_token()
        # fork+exec of a large parent costs 17 ms median and 50 ms at worst: never on the loop.
        spawn = asyncio.ensure_future(asyncio.to_thread(self._spawn, plan, log_file, instance_id, token))
        self._spawns_in_flight += 1
        try:
            popen, info, cgroup = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            spawn.add_done_callback(_kill_abandoned)  # a cancelled launch must not leave its child
            raise
        finally:
            self._spawns_in_flight -= 1
        handle = ProcessHandle(
            self, popen.pid, popen.pid, info.starttime if info else None, token, popen=popen, cgroup=cgroup
        )
        if not handle.exited:
            self._children[popen.pid] = handle
        if self._reap_deferred and not self._spawns_in_flight:
            self.reap_orphans()
        # Moving a process between cgroups costs the kernel up to milliseconds (an RCU grace
        # period): in a thread, so 300 cold starts do not queue behind each other's moves.
        if cgroup is not None and not await asyncio.to_thread(RunCgroups.attach, cgroup, popen.pid):
            handle.cgroup = None
            _discard(cgroup)
        return handle


def _kill_abandoned(
    spawn: asyncio.Future[tuple[subprocess.Popen[bytes], ProcInfo | None, Path | None]],
) -> None:
    """The child of a launch cancelled while it spawned: killed with its group, reaped in a thread."""
    if spawn.cancelled() or spawn.exception() is not None:
        return
    popen, _info, cgroup = spawn.result()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    threading.Thread(target=popen.wait, name=f"reap abandoned {popen.pid}", daemon=True).start()
    _discard(cgroup)


def _discard(cgroup: Path | None) -> None:
    if cgroup is not None:
        with contextlib.suppress(OSError):
            cgroup.rmdir()
