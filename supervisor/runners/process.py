"""Running a backend as a plain child process tree.

* exec without a shell, in a new session (its own process group, no controlling terminal:
  a Ctrl-C meant for the supervisor does not hit the children behind its back);
* stdout and stderr are an `O_APPEND` descriptor on the instance's log file;
* the exit is noticed at once through a pidfd registered with the event loop: no polling,
  no thread per child, on uvloop and on the plain asyncio loop alike;
* stop signals the whole group, waits, SIGKILLs the group and every descendant that left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading

from ..backends.base import ProcessLaunch
from ..logfiles import LogFile
from ..procscan import ProcessTable, open_pidfd, read_proc, tree, wait_fds_readable
from ..states import ExitStatus
from .base import LaunchError

log = logging.getLogger(__name__)

#: After SIGKILL, how long to wait for the kernel to tear the processes down.
KILL_GRACE = 5.0


class ProcessHandle:
    def __init__(self, popen: subprocess.Popen, table: ProcessTable) -> None:
        self._popen = popen
        self._table = table
        self.pid: int = popen.pid
        self.pgid: int = popen.pid  # start_new_session: the child leads its own group
        info = read_proc(self.pid)
        self.starttime = info.starttime if info else None
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._stopping = False
        self._watch_exit()

    # -- exit notification -------------------------------------------------------------
    def _watch_exit(self) -> None:
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except OSError:  # kernels before 5.3: one blocking waitpid thread per child
            self._pidfd = None
            threading.Thread(target=self._wait_in_thread, name=f"waitpid-{self.pid}", daemon=True).start()
            return
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # someone else reaped it: we know it is gone, not how
            pid, status = self.pid, None
        if pid == 0:
            return  # spurious wake-up
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
        # Tell Popen it is reaped, or its __del__/_cleanup would waitpid() a reused pid later.
        self._popen.returncode = -(result.signal or 0) if result.signal else (result.code or 0)
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
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return  # the common case: nothing left in the group, nothing to scan
        await self._terminate(signum, timeout, include_leader=False)

    async def _terminate(self, signum: int, timeout: float, include_leader: bool) -> None:
        table = await self._table.snapshot()
        leader_alive = include_leader and not self.exited
        members = tree(table, self.pid if leader_alive else -1, self.pgid)
        members.discard(self.pid)
        fds: dict[int, int] = {}
        for pid in members:
            fd = open_pidfd(table[pid])
            if fd is not None:
                fds[fd] = pid
        if not leader_alive and not fds:
            return
        if not include_leader:
            log.warning("pid %s exited but left %d process(es) behind: %s; stopping them",
                        self.pid, len(fds), sorted(fds.values()))
        loop = asyncio.get_running_loop()
        try:
            self._signal_all(signum, fds)
            deadline = loop.time() + timeout
            if leader_alive:
                await asyncio.wait({self._exit}, timeout=timeout)
            remaining = await wait_fds_readable(fds, max(0.0, deadline - loop.time()))
            if remaining or (leader_alive and not self.exited):
                log.info("pid %s: still running %.1f s after %s; sending SIGKILL",
                         self.pid, timeout, signal.Signals(signum).name)
                self._signal_all(signal.SIGKILL, {fd: fds[fd] for fd in remaining})
                if leader_alive:
                    await asyncio.wait({self._exit}, timeout=KILL_GRACE)
                left = await wait_fds_readable(remaining, KILL_GRACE)
                if left:
                    log.error("processes %s survived SIGKILL", sorted(fds[fd] for fd in left))
        finally:
            for fd in fds:
                os.close(fd)

    def _signal_all(self, signum: int, fds: dict[int, int]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)
        for fd in fds:  # descendants that left the group (setsid, setpgid)
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(fd, signum)

    def record(self) -> dict:
        return {"kind": "process", "pid": self.pid, "pgid": self.pgid, "starttime": self.starttime}


class ProcessRunner:
    name = "process"

    def __init__(self, table: ProcessTable | None = None) -> None:
        self.table = table or ProcessTable()

    def unavailable_reason(self) -> str | None:
        return None

    async def close(self) -> None:
        pass

    async def adoptable(self, plan: ProcessLaunch, instance_id: str) -> bool:
        return False

    async def launch(self, plan: ProcessLaunch, log_file: LogFile, instance_id: str = "", stop_signal: int = 15) -> ProcessHandle:
        env = {k: v for k, v in os.environ.items() if k not in plan.unset_env}
        env.update(plan.env)
        fd = log_file.open_for_child()
        try:
            # The run's first line, through the very descriptor the child inherits: no extra
            # open, and it lands before anything the child writes.
            os.write(fd, log_file.marker(f"starting {instance_id}: {plan.describe()}"))
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
            if plan.cwd and not os.path.isdir(plan.cwd):
                raise LaunchError(f"working directory {plan.cwd!r} does not exist") from None
            raise LaunchError(f"command not found: {exc.filename or plan.argv[0]!r}") from None
        except PermissionError as exc:
            raise LaunchError(f"permission denied executing {exc.filename or plan.argv[0]!r}") from None
        except OSError as exc:
            raise LaunchError(f"cannot execute {plan.argv[0]!r}: {exc}") from None
        finally:
            os.close(fd)
        return ProcessHandle(popen, self.table)
