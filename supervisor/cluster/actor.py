"""The actor that owns one backend on its node (runs inside a Ray worker, never in the supervisor).

One detached, named actor per instance run (`max_restarts=0`: the supervisor owns restarts).
It is the backend's parent, so unlike an adopted local run its exit status is always known.

* the backend runs in its own session, its stdout/stderr an `O_APPEND` descriptor on its log
  file on the node, with the declaration's `CUDA_VISIBLE_DEVICES`/`NVIDIA_VISIBLE_DEVICES`/
  `CUDA_DEVICE_ORDER` (never the ids Ray chose for the actor) and the run mark (marks.py);
* its exit is seen through a pidfd on the actor's event loop (no polling) and handed to
  whoever awaits `wait_exit` (the driver, on behalf of the supervisor);
* its health is probed here, on the node's 127.0.0.1 (`probe`), where the backend listens;
* `stop` is the same sequence as a local stop: TERM to the group and to every marked
  descendant that left it, wait, KILL, before the driver `ray.kill`s the actor (which would
  SIGKILL only the direct children, and not in every path: ray-project/ray#42861, #45596).

Plain Python: Ray is imported only for the node id. The driver wraps the class with `ray.remote`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from supervisor.adapters.health import health_from_wire, probe
from supervisor.adapters.logfiles import LogFile
from supervisor.adapters.marks import MARK_ENV, Mark
from supervisor.adapters.ports import describe_holder, port_is_free
from supervisor.adapters.procscan import ProcessTable, marked, read_proc, tree
from supervisor.adapters.runners.process import KILL_GRACE, stop_processes

#: Set by Ray in its workers; a backend must not think it is part of the Ray job.
_RAY_ENV_PREFIXES = ("RAY_", "RAYLET_")


def _status(returncode: int | None) -> dict[str, int | None]:
    if returncode is None:
        return {"code": None, "signal": None}
    return {"code": None, "signal": -returncode} if returncode < 0 else {"code": returncode, "signal": None}


class InstanceActor:
    def __init__(self) -> None:
        self.popen: subprocess.Popen[bytes] | None = None
        self.pgid = 0
        self.starttime: int | None = None
        self.scope = ""
        self.token = ""
        self.instance = ""
        self.node_id = ""
        self._exit: asyncio.Future[dict[str, int | None]] | None = None
        self._pidfd: int | None = None
        self._table = ProcessTable()

    # -- starting ------------------------------------------------------------------------
    async def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Spawn the backend; returns where and as what it runs. Raises with a reason a user
        can act on (the driver passes the message to the supervisor's LaunchError)."""
        if self.popen is not None:
            raise RuntimeError("this actor already runs a backend")
        import ray  # only here: the module stays importable without Ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.scope, self.token, self.instance = spec["scope"], spec["token"], spec["instance"]
        for port in spec.get("ports", ()):
            if not port_is_free(port):  # refused, not raised: an automatic port then moves on
                where = spec.get("node_label") or self.node_id[:12]
                holder = await asyncio.to_thread(describe_holder, port)
                return {"refused": {"port": port, "holder": f"{holder} on node {where}"}}
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_RAY_ENV_PREFIXES) and k not in spec.get("unset_env", ())
        }
        env.update(spec["env"])
        env.update(_gpu_env(spec["gpus"]))  # after `env`: the declaration's GPUs, never Ray's
        env[MARK_ENV] = Mark(self.scope, self.token, self.instance).value()
        log_file = LogFile(Path(spec["log_path"]))
        try:
            fd = log_file.open_for_child()
        except OSError as exc:
            raise RuntimeError(
                f"cannot open the instance log {log_file.path} on the node: {exc.strerror}"
            ) from None
        try:
            os.write(fd, log_file.marker(spec["marker"]))
            # fork+exec off the actor's loop (probes run there)
            popen: subprocess.Popen[bytes] = await asyncio.to_thread(
                subprocess.Popen,
                spec["argv"],
                cwd=spec.get("cwd"),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
            self.popen = popen
        except FileNotFoundError as exc:
            if spec.get("cwd") and not await asyncio.to_thread(os.path.isdir, spec["cwd"]):
                raise RuntimeError(f"working directory {spec['cwd']!r} does not exist on the node") from None
            raise RuntimeError(
                f"command not found on the node: {exc.filename or spec['argv'][0]!r}"
            ) from None
        except OSError as exc:
            raise RuntimeError(f"cannot execute {spec['argv'][0]!r} on the node: {exc}") from None
        finally:
            os.close(fd)
        self.pgid = popen.pid
        info = read_proc(popen.pid)
        self.starttime = info.starttime if info is not None else None
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        loop.add_reader(self._pidfd, self._reap)
        return self.info()

    def _reap(self) -> None:
        assert self.popen is not None and self._pidfd is not None
        returncode = self.popen.poll()  # WNOHANG: the pidfd said it ended
        if returncode is None:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(_status(returncode))

    # -- queries ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        ended = self._exit if self._exit is not None and self._exit.done() else None
        return {
            "pid": self.popen.pid if self.popen else None,
            "pgid": self.pgid,
            "starttime": self.starttime,
            "token": self.token,
            "node_id": self.node_id,
            "host": socket.gethostname(),
            "actor_pid": os.getpid(),
            "exited": ended is not None,
            "status": ended.result() if ended is not None else None,
        }

    async def wait_exit(self) -> dict[str, int | None]:
        if self._exit is None:
            raise RuntimeError("nothing was started")
        return await asyncio.shield(self._exit)

    def tail(self, log_path: str, lines: int = 20) -> list[str]:
        return LogFile(Path(log_path)).tail(lines)

    async def probe(self, health: dict[str, Any], port: int) -> dict[str, Any]:
        """The health probe, on this node's loopback (where the backend listens)."""
        result = await probe(health_from_wire(health), port)
        return {"ok": result.ok, "detail": result.detail}

    # -- stopping --------------------------------------------------------------------------
    async def stop(self, signum: int, timeout: float) -> dict[str, int | None]:
        """Group signal -> `timeout` -> KILL, then every marked descendant; returns the exit."""
        await self._terminate(signum, timeout, include_leader=True)
        assert self._exit is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exit), KILL_GRACE)
        return self._exit.result() if self._exit.done() else _status(None)

    async def cleanup(self, signum: int, timeout: float) -> int:
        """After an exit: stop what the run left behind (a setsid worker holding GPU memory)."""
        return await self._terminate(signum, timeout, include_leader=False)

    async def _terminate(self, signum: int, timeout: float, include_leader: bool) -> int:
        if self.popen is None:
            return 0
        table = await self._table.snapshot()
        leader_alive = include_leader and self._exit is not None and not self._exit.done()
        members = tree(table, self.popen.pid if leader_alive else -1, self.pgid) | marked(
            table, self.scope, self.token
        )
        members.discard(os.getpid())
        if leader_alive:
            members.add(self.popen.pid)
        if not members:
            return 0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)
        await stop_processes(table, members, signum, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)  # anything forked into the group meanwhile
        return len(members)


def _gpu_env(gpus: list[int]) -> dict[str, str]:
    visible = ",".join(str(g) for g in gpus)
    # "" (not unset) for CPU-only: with num_gpus=0 Ray leaves the variable alone, and an
    # unset one shows every GPU of the node.
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": visible,
        "NVIDIA_VISIBLE_DEVICES": visible or "void",
    }
