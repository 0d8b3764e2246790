"""Running a backend on a node of a Ray cluster, behind the same Runner protocol as a process.

Each run is a detached named actor (`supervisor.cluster.actor`) in the supervisor's namespace
(`msup-<scope>`), named after the instance id, so a restarted supervisor finds it by name and
adopts it without restarting the backend. Everything goes through the driver helper
(`supervisor.cluster.client`); this module never imports Ray.

Exit statuses are real (the actor is the backend's parent); a run whose actor or node is lost,
or whose cluster stays unreachable longer than `unreachable_grace`, ends with a
`ClusterExit` saying so, and the instance backs off with that reason like any failed run.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from supervisor.adapters.health import Prober, ProbeResult, health_to_wire
from supervisor.adapters.logfiles import LogFile, LogUnavailable
from supervisor.adapters.marks import new_token
from supervisor.adapters.procscan import ProcessTable, marked
from supervisor.adapters.runners.base import LaunchError, PortInUse, RunnerUnavailable
from supervisor.adapters.runners.process import KILL_GRACE, stop_processes
from supervisor.cluster.client import ClusterClient, ClusterError, ClusterUnreachable
from supervisor.cluster.nodes import ClusterNodes, Publish, RunOwner
from supervisor.config.cluster_launch import LABEL_KEY, ClusterLaunch
from supervisor.config.desired import ResolvedHealth
from supervisor.config.settings import Settings
from supervisor.core.states import ExitStatus
from supervisor.core.strays import StrayRules

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterExit(ExitStatus):
    """A run that ended without an exit status: its actor, its node or the cluster was lost."""

    reason: str = ""

    def describe(self) -> str:
        return self.reason


class RayHandle:
    """One run on a node: its exit comes from the driver's events, its stop through the actor."""

    def __init__(
        self, runner: RayRunner, name: str, info: dict[str, Any], adopted: bool, log_path: str
    ) -> None:
        self._runner = runner
        self.name = name
        self.log_path = log_path  # on its node
        self.pid: int | None = info.get("pid")
        self.pgid: int | None = info.get("pgid")
        self.starttime: int | None = info.get("starttime")
        self.token: str = info.get("token") or ""
        self.node_id: str = info.get("node_id") or ""
        self.node: str | None = info.get("node_label")
        self.host: str | None = info.get("host")
        self.was_adopted = adopted
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._grace: asyncio.TimerHandle | None = None
        self._lost = False
        runner.client.listen(name, self._on_event)

    @property
    def adopted(self) -> bool:
        # Taken over from an earlier supervisor. Unlike an adopted local process, its exit status
        # stays known (the actor is the backend's parent), and a lost run says why (ClusterExit).
        return self.was_adopted

    @property
    def exited(self) -> bool:
        return self._exit.done()

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    @property
    def remote_log(self) -> RemoteLog:
        """The run's log file, on its node."""
        return RemoteLog(self._runner.client, self.node_id, self.log_path)

    @property
    def prober(self) -> Prober:
        """Probes run in the actor, on the node's loopback."""
        return self.probe

    @property
    def node_name(self) -> str:
        """What the API, CLI, events and metrics show: the node's label, else its short id."""
        return self.node or self.node_id[:12]

    def where(self) -> str:
        return f"node {self.node_name}"

    # -- events from the driver ------------------------------------------------------------
    def _on_event(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "exit":
            status = message.get("status") or {}
            self._finish(ExitStatus(code=status.get("code"), signal=status.get("signal")))
        elif event == "lost":
            self._lost = True
            self._finish(ClusterExit(reason=f"lost on {self.where()}: {message.get('reason')}"))
        elif event == "unreachable" and self._grace is None and not self.exited:
            reason = f"cluster unreachable: {message.get('reason')}"
            self._grace = self._loop.call_later(self._runner.unreachable_grace, self._give_up, reason)
        elif event == "reconnected" and not self.exited:
            task = asyncio.ensure_future(self._reattach())
            task.set_name(f"{self.name} reattach")

    def _give_up(self, reason: str) -> None:
        self._grace = None
        self._lost = True
        self._finish(ClusterExit(reason=reason))

    async def _reattach(self) -> None:
        """After a driver restart: the same actor, still running the same backend?"""
        try:
            info = await self._runner.client.call("attach", name=self.name, label_key=LABEL_KEY, wait=0)
        except (ClusterUnreachable, ClusterError) as exc:
            log.warning("%s: cannot re-attach to its actor yet: %s", self.name, exc)
            return
        if info is None or info.get("pid") != self.pid:
            self._lost = True
            self._finish(ClusterExit(reason=f"lost on {self.where()}: its actor is gone"))
        elif info.get("exited"):
            status = info.get("status") or {}
            self._finish(ExitStatus(code=status.get("code"), signal=status.get("signal")))
        elif self._grace is not None:
            self._grace.cancel()
            self._grace = None
            log.info(
                "%s: re-attached to its actor on %s (pid %s still running)", self.name, self.where(), self.pid
            )

    def _finish(self, status: ExitStatus) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if not self._exit.done():
            self._exit.set_result(status)

    # -- health ------------------------------------------------------------------------------
    async def probe(self, health: ResolvedHealth, port: int) -> ProbeResult:
        """The probe runs in the actor, on the node's loopback: the backend's port is the
        node's, and it may listen on 127.0.0.1 only."""
        while True:
            try:
                answer = await self._runner.client.call(
                    "probe", name=self.name, health=health_to_wire(health), port=port, wait=0
                )
                break
            except ClusterUnreachable:
                # Not the backend's fault: the run either re-attaches or fails with "cluster
                # unreachable" when its grace ends (which cancels this probe).
                while not self._runner.client.up and not self.exited and not self._runner.client.closing:  # noqa: ASYNC110 - `up` has no event; polled while the cluster is away
                    await asyncio.sleep(0.5)
                if self._runner.client.closing:
                    # Left running for the next supervisor (an upgrade): no verdict, ever.
                    await asyncio.get_running_loop().create_future()
                if self.exited:
                    return ProbeResult(False, f"its run on {self.where()} ended")
            except ClusterError as exc:
                return ProbeResult(False, f"cannot probe on {self.where()}: {exc}")
        return ProbeResult(bool(answer.get("ok")), f"{answer.get('detail')} (on {self.where()})")

    # -- stopping ------------------------------------------------------------------------------
    async def stop(self, signum: int, timeout: float) -> ExitStatus:
        try:
            status = await self._runner.client.call(
                "stop", name=self.name, signum=signum, timeout=timeout, wait=0
            )
        except ClusterUnreachable as exc:
            # Not while leaving it for the next supervisor: a reaper must never touch that run.
            self._lost = not self._runner.client.closing
            self._finish(
                ClusterExit(
                    reason=f"cluster unreachable while stopping ({exc}); the run on "
                    f"{self.where()} is stopped when its actor is found again"
                )
            )
        except ClusterError as exc:
            self._finish(ClusterExit(reason=f"stopping on {self.where()} failed: {exc}"))
        else:
            self._finish(
                ExitStatus(**status)
                if status
                else ClusterExit(reason=f"its actor on {self.where()} was gone")
            )
        self._runner.client.unlisten(self.name, self._on_event)
        if self._lost:
            await self._runner.reap_lost(self.token, signum, timeout)
        return await self.wait()

    async def cleanup(self, signum: int, timeout: float) -> None:
        """After the exit: the actor stops what the run left behind, then goes (its GPU
        resources are free for the restart). A lost node cannot be asked: what the run left
        on this machine is reaped here."""
        self._runner.client.unlisten(self.name, self._on_event)
        if self._lost:
            await self._runner.reap_lost(self.token, signum, timeout)
            return
        try:
            await self._runner.client.call("cleanup", name=self.name, signum=signum, timeout=timeout, wait=0)
        except (ClusterUnreachable, ClusterError) as exc:
            log.warning("%s: could not clean up after its run on %s: %s", self.name, self.where(), exc)

    def record(self) -> dict[str, Any]:
        return {
            "kind": "ray",
            "actor": self.name,
            "namespace": self._runner.client.namespace,
            "pid": self.pid,
            "pgid": self.pgid,
            "starttime": self.starttime,
            "token": self.token,
            "node_id": self.node_id,
            "node": self.node,
            "host": self.host,
        }


class RemoteLog:
    """An instance's log file on its node, read by the node's agent (`LocalLog`'s interface)."""

    def __init__(self, client: ClusterClient, node_id: str, path: str) -> None:
        self.client, self.node_id, self.path = client, node_id, path

    async def _call(self, method: str, **args: Any) -> Any:
        try:
            return await self.client.call(
                "log", node_id=self.node_id, method=method, path=self.path, wait=0, **args
            )
        except (ClusterUnreachable, ClusterError) as exc:
            raise LogUnavailable(
                f"the log is on node {self.node_id[:12]}, which cannot be read now: {exc}"
            ) from None

    async def tail(self, lines: int) -> list[str]:
        got: list[str] = await self._call("tail", lines=lines)
        return got

    async def size(self) -> int:
        got: int = await self._call("size")
        return got

    async def read_from(self, offset: int) -> tuple[bytes, int, int]:
        got = await self._call("read_from", offset=offset)
        return base64.b64decode(got["data"]), got["offset"], got["inode"]


class ClusterOwner(RunOwner, Protocol):
    """What the runner asks of the supervisor that owns the runs (see `RunOwner` too)."""

    def pinned_nodes(self, instance_id: str, gpus: tuple[int, ...], share: bool) -> list[str]:
        """Nodes where a declaration pinned there names one of `gpus`: a run placed anywhere
        keeps off them."""

    def cluster_reachable(self) -> None:
        """The driver (re)connected: what waited only for the cluster may start now."""


class RayRunner:
    name = "ray"
    ports_here = False  # its actor checks the run's ports on the node (PortInUse)

    def __init__(
        self,
        client: ClusterClient,
        scope: str,
        placement_timeout: float = 30.0,
        unreachable_grace: float = 30.0,
        table: ProcessTable | None = None,
        release_timeout: float = 30.0,
        *,
        rules: StrayRules | None = None,
        publish: Publish | None = None,
        sample_interval: float = 1.0,
    ) -> None:
        self.client = client
        self.scope = scope
        self.placement_timeout = placement_timeout
        self.unreachable_grace = unreachable_grace
        self.table = table or ProcessTable()
        self.nodes = ClusterNodes(
            client,
            release_timeout,
            rules=rules,
            sample_interval=sample_interval,
            **({"publish": publish} if publish is not None else {}),
        )
        self._owner: ClusterOwner | None = None
        #: instance id -> (node id, log path) of its latest run: where its log is read.
        self.log_places: dict[str, tuple[str, str]] = {}

    def connect(self, owner: ClusterOwner) -> None:
        """Register the supervisor that owns the runs (once, where everything is wired)."""
        self._owner = owner
        self.nodes.connect(owner)
        self.client.subscribe("connected", lambda _message: owner.cluster_reachable())

    def unavailable_reason(self) -> str | None:
        return None if self.client.up else f"cluster unreachable: {self.client.reason}"

    async def check(self) -> None:
        """Started by the engine with its runner checks: connect early (adoption is faster)."""
        self.client.ensure_started()

    async def close(self) -> None:
        await self.nodes.close()
        await self.client.close()

    async def adoptable(self, plan: ClusterLaunch, instance_id: str) -> bool:
        # The instance then checks its port on this machine: right when the node is this
        # machine, too strict (never too lax) when this machine uses the port for something else.
        return False

    async def adopt(
        self, plan: ClusterLaunch, log_file: LogFile, instance_id: str, record: dict[str, Any]
    ) -> RayHandle | None:
        if record.get("kind") != "ray" or record.get("namespace") != self.client.namespace:
            return None
        name = str(record.get("actor") or instance_id)
        try:
            info = await self.client.call("attach", name=name, label_key=LABEL_KEY)
        except ClusterUnreachable as exc:
            # A fresh launch will fail the same way and back off; once the cluster is back, it
            # replaces whatever actor is left under this name (stop first, start later).
            log.warning("%s: cannot look for its actor: cluster unreachable (%s)", instance_id, exc)
            return None
        if info is None:
            return None
        if (
            info.get("exited")
            or info.get("pid") != record.get("pid")
            or info.get("token") != record.get("token")
        ):
            log.info(
                "%s: its actor no longer runs the recorded backend (pid %s); replacing it",
                instance_id,
                record.get("pid"),
            )
            return None  # the launch replaces the actor (it stops any actor of this name first)
        self.log_places[instance_id] = (info.get("node_id") or "", str(log_file.path.absolute()))
        return RayHandle(self, name, info, adopted=True, log_path=str(log_file.path.absolute()))

    async def launch(
        self, plan: ClusterLaunch, log_file: LogFile, instance_id: str = "", stop_signal: int = 15
    ) -> RayHandle:
        if not isinstance(plan, ClusterLaunch):
            raise LaunchError(f"the ray runner cannot run a {type(plan).__name__}")
        token = new_token()
        log_path = str(log_file.path.absolute())
        spec: dict[str, Any] = {  # the actor's start (InstanceActor.start), as JSON
            "argv": list(plan.argv),
            "cwd": plan.cwd,
            "env": dict(plan.env),
            "unset_env": list(plan.unset_env),
            "gpus": list(plan.gpus),
            "log_path": log_path,
            "scope": self.scope,
            "token": token,
            "instance": instance_id,
            "node_label": plan.node,
            "ports": list(plan.ports),
            "marker": f"starting {instance_id}: {plan.describe()}",
        }
        try:
            info = await self.client.call(
                "launch",
                name=instance_id,
                spec=spec,
                node=plan.node,
                label_key=LABEL_KEY,
                resources=plan.resources(),
                num_gpus=0 if plan.share_gpus else len(plan.gpus),
                placement_timeout=self.placement_timeout,
                avoid=self._owner.pinned_nodes(instance_id, plan.gpus, plan.share_gpus)
                if self._owner is not None and plan.node == "*"
                else [],
            )
        except ClusterUnreachable as exc:
            raise RunnerUnavailable(f"cluster unreachable: {exc}") from None
        except ClusterError as exc:
            raise LaunchError(str(exc)) from None
        if refused := info.get("refused"):
            raise PortInUse(int(refused["port"]), str(refused["holder"]))
        self.log_places[instance_id] = (info.get("node_id") or "", log_path)
        return RayHandle(self, instance_id, info, adopted=False, log_path=log_path)

    async def sweep_actors(
        self, keep: set[str], launched_here: Callable[[str], bool], broken_files: bool, timeout: float
    ) -> None:
        """At start-up: stop every actor of our namespace that no declaration wants (removed or
        disabled while the supervisor was down, with or without a run record). While a file is
        broken its instances are unknown, so then nothing without a record is touched."""
        while True:
            try:
                names = await self.client.call("list")
                break
            except ClusterUnreachable:
                await asyncio.sleep(10.0)  # the driver reconnects with backoff meanwhile
            except ClusterError as exc:
                log.warning("cannot list the cluster's actors: %s", exc)
                return
        for name in names:
            if name in keep or launched_here(name):
                continue
            if broken_files:
                log.warning(
                    "actor %s: no valid declaration wants it, but a file in conf.d is broken; left alone",
                    name,
                )
                continue
            log.warning(
                "actor %s: no declaration wants it any more (removed or disabled while the supervisor "
                "was down); stopping it and its backend",
                name,
            )
            try:
                await self.client.call("stop", name=name, signum=15, timeout=timeout)
            except (ClusterUnreachable, ClusterError) as exc:
                log.warning("actor %s: could not stop it: %s", name, exc)

    def log_of(self, instance_id: str) -> RemoteLog | None:
        """Where the API reads the instance's log: on the node of its latest run."""
        place = self.log_places.get(instance_id)
        return RemoteLog(self.client, *place) if place is not None else None

    async def reap_lost(self, token: str, signum: int, timeout: float) -> None:
        """A lost run's processes, stopped by their mark: by the node agents (a node that was
        lost has no agent until it rejoins; then the reaper in `ClusterNodes` finds the run),
        and on this machine, which need not be a node."""
        if not token:
            return
        stopped = await self.nodes.reap(token, signum, timeout)
        if stopped:
            log.warning("the node agents stopped what the lost run %s left: %s", token, stopped)
        await self.reap_here(token, signum, timeout)

    async def reap_here(self, token: str, signum: int, timeout: float) -> None:
        """What a lost run left on this machine (a head that is also a worker, the test rig)."""
        table = await self.table.snapshot()
        victims = marked(table, self.scope, token)
        if victims:
            log.warning(
                "stopping %d process(es) of a lost run on this machine: %s", len(victims), sorted(victims)
            )
            await stop_processes(table, victims, signum, min(timeout, KILL_GRACE))


def from_settings(
    settings: Settings, scope: str, table: ProcessTable | None = None, publish: Publish | None = None
) -> RayRunner:
    """The runner of `cluster = "ray"` (built in supervisor.wiring); starts nothing until used."""
    import sys

    assert settings.ray_address is not None  # Settings refuse cluster = "ray" without one
    client = ClusterClient(
        address=settings.ray_address,
        namespace=f"msup-{scope}",
        python=settings.ray_python or sys.executable,
        log_path=settings.state_dir / "logs" / "ray-driver.log",
        env={"RAY_gcs_rpc_server_reconnect_timeout_s": str(settings.ray_reconnect_timeout)},
        connect_timeout=max(10.0, settings.ray_placement_timeout),
        driver_args=_agent_args(settings),
    )
    return RayRunner(
        client,
        scope,
        settings.ray_placement_timeout,
        settings.ray_unreachable_grace,
        table,
        settings.gpu_release_timeout,
        rules=StrayRules.from_settings(settings),
        publish=publish,
        sample_interval=settings.gpu_sample_interval,
    )


def _agent_args(settings: Settings) -> list[str]:
    """What the node agents sample, as the driver's arguments: this machine's GPU settings."""
    args = ["--gpu-source", settings.gpu_source, "--sample-interval", str(settings.gpu_sample_interval)]
    if settings.gpu_simulated_file is not None:
        args += ["--gpu-file", str(settings.gpu_simulated_file)]
    return args
