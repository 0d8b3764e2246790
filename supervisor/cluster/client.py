"""The supervisor's side of the Ray driver helper: spawn it, talk JSON lines, restart it.

Never imports Ray. The driver (`supervisor.cluster.driver`) is an asyncio subprocess; while it
is up, `call` sends a request and awaits its answer, and events about one actor (its backend
exited, its node was lost) go to whoever `listen`s on that actor's name. When the driver dies
or never gets connected (a wrong address, a lost head: Ray ends a driver about 60 s after
losing its head), the cluster is *unreachable*: pending calls fail with `ClusterUnreachable`
and that reason, listeners hear `{"event": "unreachable"}`, and the helper is started again
with backoff; once it is back listeners hear `{"event": "reconnected"}` (they re-attach to
their actors by name). Local instances never depend on any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.core.backoff import Backoff

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


class ClusterUnreachable(Exception):
    """The driver is not connected to the cluster; the message says why."""


class ClusterError(Exception):
    """The driver answered, with an error (the message is for the user)."""


class ClusterClient:
    def __init__(
        self,
        address: str,
        namespace: str,
        python: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        connect_timeout: float = 30.0,
        backoff: Backoff | None = None,
        driver_args: list[str] | None = None,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self.python = python
        self.log_path = log_path
        self.env = env or {}
        self.connect_timeout = connect_timeout
        self.driver_args = driver_args or []
        self.backoff = backoff or Backoff(1.0, 2.0, 30.0, 0.1)
        self.reason: str | None = "not connected yet"
        self.nodes: list[dict[str, Any]] = []
        self.connects = 0  # successful connections so far (1 + reconnects)
        self.driver_pid: int | None = None
        self._up = asyncio.Event()
        #: Resolves when the connection attempt under way succeeds (True) or fails (False).
        self._attempt: asyncio.Future[bool] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}  # a call's answer: the op's JSON result
        self._next_id = 0
        self._listeners: dict[str, Listener] = {}
        #: Events about no actor in particular ("nodes": the node agents' samples), by type.
        self._subscribers: dict[str, list[Listener]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- public ----------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self._up.is_set()

    @property
    def closing(self) -> bool:
        return self._closing

    def ensure_started(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.ensure_future(self._supervise())
            self._task.set_name("ray driver")
            self._task.add_done_callback(_log_failure)

    async def wait_up(self, timeout: float) -> bool:
        """True once connected; waits at most `timeout`, and only for the attempt under way
        (a helper in its backoff sleep is not waited for: its reason is the answer)."""
        self.ensure_started()
        if self.up or timeout <= 0:
            return self.up
        if self._attempt is None:
            self._attempt = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._attempt), timeout)
        return self.up

    async def call(self, op: str, wait: float | None = None, **args: Any) -> Any:
        """Send one request; `wait` bounds how long to wait for a connection first."""
        # Past the attempt's own timeout (plus the helper's start), so its reason is the answer.
        if not await self.wait_up(self.connect_timeout + 5.0 if wait is None else wait):
            raise ClusterUnreachable(self.reason or "not connected")
        if self._closing or self._proc is None or self._proc.stdin is None:
            raise ClusterUnreachable("the supervisor is closing its connection to the cluster")
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._proc.stdin.write((json.dumps({"id": rid, "op": op, **args}) + "\n").encode())
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._pending.pop(rid, None)
            raise ClusterUnreachable(self.reason or "the Ray driver went away") from None
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    def listen(self, name: str, listener: Listener) -> None:
        self._listeners[name] = listener

    def unlisten(self, name: str, listener: Listener | None = None) -> None:
        if listener is None or self._listeners.get(name) is listener:
            self._listeners.pop(name, None)

    def subscribe(self, event: str, listener: Listener) -> None:
        self._subscribers.setdefault(event, []).append(listener)

    async def close(self) -> None:
        """End the driver (the detached actors live on); waits for it."""
        self._closing = True
        grace = 5.0 if self.up else 0.0  # a connected driver exits by itself once stdin closes
        self._up.clear()
        self.reason = "closed"
        proc = self._proc
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._proc = self._proc or proc
        await self._end_driver(grace=grace)

    # -- the driver's life -------------------------------------------------------------------
    async def _supervise(self) -> None:
        failures = 0
        while not self._closing:
            reason, was_up = await self._run_once()
            self._went_down(reason)
            failures = 1 if was_up else failures + 1
            delay = self.backoff.delay(failures)
            log.warning(
                "Ray cluster at %s unreachable: %s; trying again in %.1f s", self.address, reason, delay
            )
            await asyncio.sleep(delay)

    def _settle(self, up: bool) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done():
            attempt.set_result(up)

    async def _run_once(self) -> tuple[str, bool]:
        if self._attempt is None:
            self._attempt = asyncio.get_running_loop().create_future()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        errfd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "supervisor.cluster.driver",
                "--address",
                self.address,
                "--namespace",
                self.namespace,
                *self.driver_args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=errfd,
                env={**os.environ, **self.env},
                limit=16 << 20,
                start_new_session=True,
            )
        except OSError as exc:
            return f"cannot start the Ray driver {self.python!r}: {exc}", False
        finally:
            os.close(errfd)
        self.driver_pid = self._proc.pid
        assert self._proc.stdout is not None
        try:
            first = await asyncio.wait_for(self._proc.stdout.readline(), self.connect_timeout)
        except TimeoutError:
            await self._end_driver(grace=0)  # stuck in ray.init: it reads nothing
            return f"no connection to the Ray head at {self.address} within {self.connect_timeout:g} s", False
        message = _parse(first)
        if message.get("event") != "ready":
            await self._end_driver()
            return message.get("error") or await self._driver_died(), False
        self.nodes = message.get("nodes", [])
        self.reason = None
        self.connects += 1
        self._up.set()
        self._settle(True)
        log.info(
            "connected to the Ray cluster at %s in %.2f s (%d live nodes)",
            self.address,
            message.get("seconds", 0),
            sum(1 for n in self.nodes if n.get("alive")),
        )
        self._tell_all({"event": "connected"})  # e.g. starts waiting for the cluster: try now
        if self.connects > 1:
            self._tell_all({"event": "reconnected"})
        while True:
            line = await self._proc.stdout.readline()
            if not line:
                break
            self._dispatch(_parse(line))
        return await self._driver_died(), True

    async def _driver_died(self) -> str:
        assert self._proc is not None
        rc = await self._proc.wait()
        last = await asyncio.to_thread(_last_line, self.log_path)
        return f"the Ray driver exited (rc {rc})" + (f": {last}" if last else "")

    def _went_down(self, reason: str) -> None:
        self.reason = reason
        was_up = self._up.is_set()
        self._up.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ClusterUnreachable(reason))
        self._pending.clear()
        self._settle(False)
        if was_up:
            self._tell_all({"event": "unreachable", "reason": reason})

    def _tell_all(self, message: dict[str, Any]) -> None:
        for listener in [*self._listeners.values(), *self._subscribers.get(message["event"], ())]:
            try:
                listener(message)
            except Exception:
                log.exception("cluster listener failed on %s", message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            fut = self._pending.get(message["id"])
            if fut is not None and not fut.done():
                if message.get("ok"):
                    fut.set_result(message.get("result"))
                else:
                    fut.set_exception(ClusterError(message.get("error") or "unknown error"))
            return
        subscribers = self._subscribers.get(message.get("event", ""))
        if subscribers and "name" not in message:
            for subscriber in subscribers:
                try:
                    subscriber(message)
                except Exception:
                    log.exception("cluster subscriber failed on a %s event", message.get("event"))
            return
        listener = self._listeners.get(message.get("name", ""))
        if listener is not None:
            listener(message)
        elif message.get("event") == "error":
            log.error("Ray driver: %s", message.get("error"))

    async def _end_driver(self, grace: float = 5.0) -> None:
        """Close its stdin (its cue to exit), then after `grace` kill it: a driver stuck in
        `ray.init` reads nothing. Killed at once if we are cancelled meanwhile."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            pass
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # our own child, by its pid
                await asyncio.shield(proc.wait())


def _parse(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        return {"event": "error", "error": f"unreadable line from the Ray driver: {line[:120]!r}"}
    return message if isinstance(message, dict) else {"event": "error", "error": "not an object"}


def _last_line(path: Path) -> str:
    """The driver's last meaningful stderr line (Ray's "Failed to connect to GCS ..." and the like)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if not line.startswith(("at ", "File ", "Traceback", "*** ")) and "SIGTERM handler" not in line:
            # Ray's own prefix ("[2026-12-01 23:13:42,484 E 123 456] rpc_client.h:204: ") says nothing.
            return re.sub(r"^\[[^\]]*\]\s+\S+:\d+:\s*", "", line)[:300]
    return ""


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the Ray driver supervision failed", exc_info=task.exception())
