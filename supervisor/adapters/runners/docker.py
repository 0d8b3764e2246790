"""Running a backend as a Docker container, through the docker SDK.

* Every SDK call blocks (HTTP to the daemon), so each runs in a small thread pool whose
  threads have a client each (sharing one client across threads is not documented as safe).
* Containers carry labels with the instance id, the supervisor's scope (its state dir) and
  the hash of the plan, so a supervisor that restarts finds its container again: `launch`
  adopts a running container whose hash matches instead of starting a second one, and
  replaces one whose hash does not.
* Exits are noticed from one Docker events stream (a thread), never by polling; after a
  reconnect the tracked containers are inspected once, so a missed event cannot hide an exit.
* The container's output is followed into the instance's log file by a thread per container.
* A container that fails to start is removed at once, so its name is free for the next try
  and the reason (e.g. no NVIDIA runtime) reaches the instance's state.
* No daemon: launches fail with the reason (the instance backs off and retries), everything
  else keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal as signals
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

from supervisor.adapters.health import Prober
from supervisor.adapters.logfiles import LogFile
from supervisor.adapters.marks import scope_of  # noqa: F401  (re-exported: containers are labelled with it)
from supervisor.adapters.runners.base import LaunchError, LogReader
from supervisor.core.launch import ContainerLaunch
from supervisor.core.states import ExitStatus

if TYPE_CHECKING:
    from docker import DockerClient  # imported where used: the package is optional

log = logging.getLogger(__name__)

LABEL_MANAGED = "io.model-supervisor.managed"
LABEL_SCOPE = "io.model-supervisor.scope"
LABEL_INSTANCE = "io.model-supervisor.instance"
LABEL_HASH = "io.model-supervisor.spec-hash"

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

API_TIMEOUT = 120  # seconds for one SDK call (the docker SDK's default is 60)
KILL_GRACE = 10.0


def plan_hash(plan: ContainerLaunch) -> str:
    return hashlib.sha256(json.dumps(plan.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def container_name(scope: str, instance_id: str) -> str:
    return f"msup-{scope}-{instance_id.replace('@', '.')}"


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    if explanation:
        return str(explanation.decode() if isinstance(explanation, bytes) else explanation)
    return str(exc) or type(exc).__name__


def docker_address() -> str:
    """Where the SDK looks for the daemon (docker.from_env: DOCKER_HOST, else the default socket)."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def daemon_reason(exc: BaseException, address: str) -> str:
    """Why the daemon cannot be used, in a user's words: the SDK's text is a nest of wrapped
    exceptions ("('Connection aborted.', FileNotFoundError(2, ...))")."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(repr(e) for e in chain)
    if (
        any(isinstance(e, (FileNotFoundError, ConnectionRefusedError)) for e in chain)
        or "FileNotFoundError" in text
        or "ConnectionRefusedError" in text
        or "Connection refused" in text
    ):
        return f"no Docker daemon at {address}"
    if any(isinstance(e, PermissionError) for e in chain) or "PermissionError" in text:
        return f"no permission to use the Docker daemon at {address} (is this user in the docker group?)"
    return f"Docker daemon at {address} not reachable: {_explain(exc)}"


def _timestamp(rfc3339: str | None) -> float | None:
    """Docker's StartedAt ("2026-11-27T10:00:00.123456789Z") as a UNIX time, or None."""
    if not rfc3339 or rfc3339.startswith("0001-"):
        return None
    main, _, frac = rfc3339.rstrip("Z").partition(".")
    try:
        seconds = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
    return seconds + (float("0." + frac[:6]) if frac else 0.0) - 0.001


def _status_from_code(code: int | None) -> ExitStatus:
    if code is None or code < 0:
        return ExitStatus()
    if 128 < code <= 128 + 64:  # the shell/runtime convention for "killed by signal n"
        return ExitStatus(signal=code - 128)
    return ExitStatus(code=code)


@dataclass
class _Started:
    id: str
    name: str
    pid: int | None
    adopted: bool
    started_at: str | None
    running: bool = True
    exit_code: int | None = None

    @classmethod
    def from_attrs(cls, container_id: str, name: str, adopted: bool, attrs: dict[str, Any]) -> _Started:
        state = attrs.get("State", {})
        return cls(
            container_id,
            name,
            state.get("Pid") or None,
            adopted,
            state.get("StartedAt"),
            bool(state.get("Running")),
            state.get("ExitCode"),
        )


class DockerHandle:
    """One container. Its processes carry no run mark (the container is the unit)."""

    token: str | None = None
    node_name: str | None = None
    prober: Prober | None = None
    remote_log: LogReader | None = None

    def __init__(self, runner: DockerRunner, info: _Started) -> None:
        self.runner = runner
        self.container_id = info.id
        self.name = info.name
        self.pid: int | None = info.pid
        self.adopted = info.adopted
        self._exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._stopping = False

    @property
    def exited(self) -> bool:
        return self._exit.done()

    def _exited(self, status: ExitStatus) -> None:
        if not self._exit.done():
            self._exit.set_result(status)

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    async def stop(self, signum: int, timeout: float) -> ExitStatus:
        self._stopping = True
        if not self.exited:
            try:
                await self.runner.call(self.runner._stop_sync, self.container_id, signum, timeout)
            except Exception as exc:  # the daemon went away: we cannot do more than report it
                log.error("stopping container %s failed: %s", self.name, _explain(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exit), KILL_GRACE)
            if not self.exited:  # no event came (daemon trouble): ask the daemon directly
                self._exited(await self.runner.call(self.runner._inspect_exit, self.container_id))
        await self.runner.forget(self)
        return await self.wait()

    async def cleanup(self, signum: int, timeout: float) -> None:
        """After the container exited by itself: remove it, in the background (a restart
        need not wait: the next launch removes a leftover of the same name itself)."""
        if not self._stopping:
            await self.runner.flush_logs(self)
            self.runner.forget_later(self)

    def record(self) -> dict[str, Any]:
        return {"kind": "docker", "container": self.container_id, "name": self.name, "pid": self.pid}


class DockerRunner:
    name = "docker"
    ports_here = True  # published on this machine

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="docker-api")
        self._local = threading.local()
        self._handles: dict[str, DockerHandle] = {}
        self._early_deaths: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events_thread: threading.Thread | None = None
        self._events_stream: Any = None
        self._events_ready = threading.Event()
        self._closing = threading.Event()
        self._reason: str | None = None
        self._log_threads: dict[str, threading.Thread] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._removing: dict[str, asyncio.Task[None]] = {}  # container name -> its removal under way

    # -- plumbing ------------------------------------------------------------------------------
    def _client(self) -> DockerClient:
        """This thread's client (the SDK's clients are not shared between threads)."""
        client: DockerClient | None = getattr(self._local, "client", None)
        if client is None:
            import docker

            client = docker.from_env(timeout=API_TIMEOUT)
            self._local.client = client
        return client

    async def call(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` in the SDK's thread pool (the SDK blocks)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def unavailable_reason(self) -> str | None:
        """The last known reason the daemon cannot be used (launches re-check it)."""
        return self._reason

    async def check(self) -> None:
        """Ask the daemon now: `unavailable_reason` says why it cannot be used, or None."""
        self._reason = await self.call(self._ping)

    def _ping(self) -> str | None:
        try:
            import docker  # noqa: F401 - is the package there at all?
        except ImportError:
            return "the docker Python package is not installed"
        try:
            self._client().ping()
            return None
        except Exception as exc:
            self._local.client = None
            return daemon_reason(exc, docker_address())

    # -- launching -----------------------------------------------------------------------------
    async def adoptable(self, plan: ContainerLaunch, instance_id: str) -> bool:
        try:
            return await self.call(self._adoptable_sync, plan, instance_id)
        except Exception:
            return False

    def _adoptable_sync(self, plan: ContainerLaunch, instance_id: str) -> bool:
        state = self._client().api.inspect_container(container_name(self.scope, instance_id))
        labels = state.get("Config", {}).get("Labels") or {}
        return bool(state.get("State", {}).get("Running")) and labels.get(LABEL_HASH) == plan_hash(plan)

    async def adopt(
        self, plan: ContainerLaunch, log_file: LogFile, instance_id: str, record: dict[str, Any]
    ) -> DockerHandle | None:
        """The instance's container, if it still runs with this plan's hash (the record only
        says it was a container: the name and labels identify it)."""
        if record.get("kind") != "docker" or not await self.adoptable(plan, instance_id):
            return None
        # Should the container have died just now, launch starts a new one: still one run.
        return await self.launch(plan, log_file, instance_id)

    async def launch(
        self, plan: ContainerLaunch, log_file: LogFile, instance_id: str = "", stop_signal: int = 15
    ) -> DockerHandle:
        self._loop = asyncio.get_running_loop()
        await self._ensure_events()
        removal = self._removing.pop(container_name(self.scope, instance_id), None)
        if removal is not None:  # the previous run's container must be gone before we reuse its name
            await asyncio.gather(removal, return_exceptions=True)
        try:
            info = await self.call(self._launch_sync, plan, instance_id, stop_signal, log_file)
        except LaunchError:
            raise
        except ImportError:
            raise LaunchError("the docker Python package is not installed") from None
        except Exception as exc:  # no daemon, or a daemon error: the reason is the failure
            self._reason = daemon_reason(exc, docker_address())
            self._local.client = None
            raise LaunchError(self._reason) from None
        self._reason = None
        handle = DockerHandle(self, info)
        self._handles[info.id] = handle
        if info.id in self._early_deaths:
            handle._exited(_status_from_code(self._early_deaths.pop(info.id)))
        elif not info.running:  # it died before the events stream saw it as ours
            handle._exited(_status_from_code(info.exit_code))
        self._follow_logs(info, log_file)
        if info.adopted:
            log.info("%s: adopted running container %s (%s)", instance_id, info.name, info.id[:12])
        return handle

    def _launch_sync(
        self, plan: ContainerLaunch, instance_id: str, stop_signal: int, log_file: LogFile
    ) -> _Started:
        import docker
        from docker.types import DeviceRequest, Ulimit

        client = self._client()
        name = container_name(self.scope, instance_id)
        want = plan_hash(plan)
        log_file.mark(f"starting {instance_id}: {plan.describe()}")
        try:
            existing = client.containers.get(name)
        except docker.errors.NotFound:
            existing = None
        if existing is not None:
            labels = existing.labels or {}
            if labels.get(LABEL_HASH) == want and existing.status == "running":
                assert existing.id is not None  # (the SDK's type; a daemon's container has an Id)
                return _Started.from_attrs(existing.id, name, True, existing.attrs)
            log.info(
                "removing stale container %s (status %s, spec %s)",
                name,
                existing.status,
                "changed" if labels.get(LABEL_HASH) != want else "same",
            )
            with contextlib.suppress(docker.errors.NotFound):
                existing.remove(force=True)
        self._ensure_image(client, plan)
        kwargs: dict[str, Any] = {
            "name": name,
            "command": list(plan.command) if plan.command is not None else None,
            "entrypoint": list(plan.entrypoint) if plan.entrypoint is not None else None,
            "environment": dict(plan.env),
            "labels": {
                LABEL_MANAGED: "1",
                LABEL_SCOPE: self.scope,
                LABEL_INSTANCE: instance_id,
                LABEL_HASH: want,
            },
            "network_mode": plan.network,
            "detach": True,
            "init": True,  # tini reaps the zombies a model server's workers leave behind
            "stop_signal": signals.Signals(stop_signal).name,
        }
        if plan.gpus:
            kwargs["device_requests"] = [
                DeviceRequest(device_ids=[str(g) for g in plan.gpus], capabilities=[["gpu"]])
            ]
        if plan.ports:
            kwargs["ports"] = {f"{container}/tcp": (address, host) for address, host, container in plan.ports}
        if plan.volumes:
            kwargs["volumes"] = {
                host: {"bind": container, "mode": mode} for host, container, mode in plan.volumes
            }
        if plan.shm_size:
            kwargs["shm_size"] = plan.shm_size
        if plan.ipc_mode:
            kwargs["ipc_mode"] = plan.ipc_mode
        if plan.user:
            kwargs["user"] = plan.user
        if plan.ulimits:
            kwargs["ulimits"] = [Ulimit(name=n, soft=s, hard=h) for n, s, h in plan.ulimits]
        if plan.workdir:
            kwargs["working_dir"] = plan.workdir
        try:
            container = client.containers.create(plan.image, **kwargs)
        except docker.errors.APIError as exc:
            raise LaunchError(f"cannot create container from {plan.image}: {_explain(exc)}") from None
        try:
            container.start()
        except docker.errors.APIError as exc:
            with contextlib.suppress(Exception):
                container.remove(force=True)
            raise LaunchError(f"container failed to start: {_explain(exc)}") from None
        container.reload()
        assert container.id is not None
        return _Started.from_attrs(container.id, name, False, container.attrs)

    def _ensure_image(self, client: DockerClient, plan: ContainerLaunch) -> None:
        import docker

        present = True
        try:
            client.images.get(plan.image)
        except docker.errors.ImageNotFound:
            present = False
        except docker.errors.APIError as exc:
            raise LaunchError(f"Docker daemon error: {_explain(exc)}") from None
        if plan.pull == "always" or (not present and plan.pull == "missing"):
            log.info("pulling image %s", plan.image)
            try:
                client.images.pull(plan.image)
            except docker.errors.APIError as exc:
                if present:
                    log.warning("pulling %s failed (%s); using the local copy", plan.image, _explain(exc))
                    return
                raise LaunchError(
                    f"image {plan.image} is not present and cannot be pulled: {_explain(exc)}"
                ) from None
        elif not present:
            raise LaunchError(f'image {plan.image} is not present locally (pull = "never")')

    # -- stopping and exits ---------------------------------------------------------------------
    def _stop_sync(self, container_id: str, signum: int, timeout: float) -> None:
        import docker

        client = self._client()
        try:
            container = client.containers.get(container_id)
            if signum == signals.SIGTERM or container.status != "running":
                container.stop(timeout=max(0, round(timeout)))
            else:
                container.kill(signal=signals.Signals(signum).name)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    container.reload()
                    if container.status != "running":
                        return
                    time.sleep(0.1)
                container.kill()
        except docker.errors.NotFound:
            pass

    def _state(self, container_id: str) -> dict[str, Any] | None:
        import docker

        try:
            state: dict[str, Any] = self._client().api.inspect_container(container_id).get("State", {})
            return state
        except docker.errors.NotFound:
            return {"Running": False, "ExitCode": -1}
        except Exception:
            return None

    def _inspect_exit(self, container_id: str) -> ExitStatus:
        state = self._state(container_id) or {}
        return _status_from_code(state.get("ExitCode"))

    def _remove_sync(self, container_id: str) -> None:
        import docker

        with contextlib.suppress(docker.errors.NotFound):
            self._client().api.remove_container(container_id, force=True)

    def forget_later(self, handle: DockerHandle) -> None:
        task = asyncio.ensure_future(self.forget(handle))
        self._background.add(task)
        self._removing[handle.name] = task
        task.add_done_callback(self._background.discard)
        name = handle.name

        def unregister(t: asyncio.Task[None]) -> None:
            if self._removing.get(name) is t:
                self._removing.pop(name)

        task.add_done_callback(unregister)

    async def flush_logs(self, handle: DockerHandle) -> None:
        """Let the container's last lines (often why it died) reach the log file."""
        thread = self._log_threads.get(handle.container_id)
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 2.0)

    async def remove_stale(self, instance_id: str, timeout: float) -> None:
        """At start-up: the container of a run whose declaration is gone or changed while the
        supervisor was down (found by name); stopped, then removed."""
        name = container_name(self.scope, instance_id)
        try:
            await self.call(self._stop_sync, name, signals.SIGTERM, timeout)
            await self.call(self._remove_sync, name)
            log.warning("removed leftover container %s of %s", name, instance_id)
        except Exception as exc:  # no daemon, or already gone: nothing to do from here
            log.info("leftover container %s of %s not removed: %s", name, instance_id, _explain(exc))

    async def forget(self, handle: DockerHandle) -> None:
        self._handles.pop(handle.container_id, None)
        await self.flush_logs(handle)
        try:
            await self.call(self._remove_sync, handle.container_id)
        except Exception as exc:
            log.warning("removing container %s failed: %s", handle.name, _explain(exc))

    # -- the events stream ------------------------------------------------------------------------
    async def _ensure_events(self) -> None:
        if self._events_thread is not None and self._events_thread.is_alive():
            return
        self._events_ready.clear()
        self._events_thread = threading.Thread(target=self._events_loop, name="docker-events", daemon=True)
        self._events_thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._events_ready.wait, 10)

    def _events_loop(self) -> None:
        import docker

        since = None
        while not self._closing.is_set():
            try:
                # The stubs say int; None (no socket timeout) is what a stream that may stay silent
                # for hours needs, and the SDK hands it to requests as is.
                client = docker.from_env(timeout=None)  # type: ignore[arg-type]
                stream = client.events(
                    decode=True,
                    since=since,
                    filters={"type": "container", "label": [f"{LABEL_SCOPE}={self.scope}"]},
                )
                self._events_stream = stream
                if since is not None:  # reconnected: we may have missed deaths
                    self._post(self._recheck_all)
                self._events_ready.set()
                for event in stream:
                    since = event.get("time", since)
                    if event.get("Action") == "die" or event.get("status") == "die":
                        attrs = event.get("Actor", {}).get("Attributes", {})
                        code = int(attrs.get("exitCode", -1))
                        self._post(self._on_die, event.get("id") or event.get("Actor", {}).get("ID"), code)
            except Exception as exc:
                if self._closing.is_set():
                    return
                log.warning("Docker events stream failed (%s); reconnecting", _explain(exc))
                self._events_ready.set()
                self._closing.wait(1.0)
                since = since or int(time.time())

    def _post(self, fn: Callable[[*Ts], object], *args: *Ts) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_die(self, container_id: str, code: int) -> None:
        handle = self._handles.get(container_id)
        if handle is None:
            self._early_deaths[container_id] = code
            if len(self._early_deaths) > 1000:
                self._early_deaths.clear()
            return
        handle._exited(_status_from_code(code))

    def _recheck_all(self) -> None:
        async def recheck() -> None:
            for cid, handle in list(self._handles.items()):
                state = await self.call(self._state, cid)
                if state is not None and not state.get("Running", False):
                    handle._exited(_status_from_code(state.get("ExitCode")))

        self._recheck = asyncio.ensure_future(recheck())  # kept: a task nobody holds may be collected

    # -- logs -------------------------------------------------------------------------------------
    def _follow_logs(self, info: _Started, log_file: LogFile) -> None:
        # From this run's start only: a restarted (or adopted) container has older output.
        since = time.time() if info.adopted else _timestamp(info.started_at)
        thread = threading.Thread(
            target=self._copy_logs,
            args=(info.id, log_file, since),
            name=f"docker-logs-{info.name}",
            daemon=True,
        )
        self._log_threads[info.id] = thread
        thread.start()

    def _copy_logs(self, container_id: str, log_file: LogFile, since: float | None) -> None:
        import docker

        fd = log_file.open_for_child()
        try:
            client = docker.from_env(timeout=None)  # type: ignore[arg-type]  # (as for the events)
            # since=None (its start time unknown) is the SDK's default: the whole log.
            chunks = client.api.logs(
                container_id, stdout=True, stderr=True, stream=True, follow=True, since=since
            )
            for chunk in chunks:
                os.write(fd, chunk)
        except Exception as exc:
            if not self._closing.is_set():
                log.debug("log stream of %s ended: %s", container_id[:12], _explain(exc))
        finally:
            os.close(fd)
            self._log_threads.pop(container_id, None)

    # -- shutdown ---------------------------------------------------------------------------------
    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._closing.set()
        stream = self._events_stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
