"""One instance's state machine: the only code that ever changes an instance's state.

Everything else *sends intents* (start, stop, restart, update, remove) into the instance's
inbox and, if it wants, awaits the answer. Helper tasks (launching, watching the exit,
probing health, stopping) never touch the state either: they post what they observed
(`Launched`, `Exited`, `Ready`, ...) into the same inbox. One task consumes the inbox and
handles one message at a time with plain synchronous code, so there is no read-then-act race
between callers (llama-swap's issue #946) and every transition is checked against
`states.TRANSITIONS`.

Each launch gets a run number; messages from an older run are stale and ignored, and so are
timers armed before the latest transition.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from supervisor.adapters.health import liveness, probe
from supervisor.adapters.logfiles import LogFile, LogUnavailable
from supervisor.adapters.records import RunRecords
from supervisor.adapters.runners.base import LaunchError, PortInUse, RunHandle, Runner, RunnerUnavailable
from supervisor.config.cluster_launch import ANYWHERE, ClusterLaunch
from supervisor.config.desired import InstanceSpec
from supervisor.core.backoff import Backoff, gives_up
from supervisor.core.events import EventBus
from supervisor.core.failure_line import with_log_reason
from supervisor.core.states import (
    TIMER_STATE,
    Desired,
    ExitStatus,
    State,
    Timer,
    Transition,
    check_transition,
    utcnow,
)

log = logging.getLogger(__name__)

HISTORY = 200  # transitions kept per instance
TAIL_LINES = 20  # log lines attached to a failure


# -- messages ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartIntent:
    reason: str
    done: asyncio.Future[None] | None = None


@dataclass(frozen=True, slots=True)
class StopIntent:
    reason: str
    done: asyncio.Future[None] | None = None
    remove: bool = False


@dataclass(frozen=True, slots=True)
class RestartIntent:
    reason: str
    done: asyncio.Future[None] | None = None


@dataclass(frozen=True, slots=True)
class UpdateIntent:
    spec: InstanceSpec
    gates: tuple[Awaitable[Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Launched:
    run: int
    handle: RunHandle
    adopted_from: dict[str, Any] | None = None  # the run record of an earlier supervisor's run, if adopted


@dataclass(frozen=True, slots=True)
class LaunchFailed:
    run: int
    reason: str
    tail: tuple[str, ...] = ()
    unavailable: bool = False  # RunnerUnavailable: backs off, never counts toward max_retries


@dataclass(frozen=True, slots=True)
class Exited:
    run: int
    status: ExitStatus
    tail: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ready:
    run: int
    detail: str


@dataclass(frozen=True, slots=True)
class Unhealthy:
    run: int
    detail: str


@dataclass(frozen=True, slots=True)
class StartFailed:
    """A log line of a starting run matched one of its plan's `fail_patterns`."""

    run: int
    line: str


@dataclass(frozen=True, slots=True)
class Stopped:
    run: int
    status: ExitStatus
    tail: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TimerFired:
    token: int
    what: Timer


@dataclass(frozen=True, slots=True)
class _Failure:
    """What to do once a stop that was caused by a failure has finished."""

    reason: str
    while_running: bool = False  # it had been ready (stopped answering), not a failed start


PrestartCheck = Callable[["Instance", InstanceSpec], Awaitable[None]]


#: Everything the actor's inbox carries: intents from outside, facts from its own helpers.
Message = (
    StartIntent
    | StopIntent
    | RestartIntent
    | UpdateIntent
    | Launched
    | LaunchFailed
    | Exited
    | Ready
    | Unhealthy
    | StartFailed
    | Stopped
    | TimerFired
)


@dataclass
class InstanceServices:
    """What an instance needs from the engine; injected so tests can swap pieces."""

    runners: Mapping[str, Runner]
    bus: EventBus
    records: RunRecords
    logs_dir: Path
    port_holder: Callable[[int], Awaitable[str | None]]
    #: Called with (instance id, assignment key) when a stranger holds an automatic port: the
    #: engine forgets that assignment and reloads, so the instance gets another port.
    give_up_port: Callable[[str, str, int], None] | None = None
    prestart: list[PrestartCheck] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)


class Instance:
    def __init__(
        self, spec: InstanceSpec, services: InstanceServices, adopt: dict[str, Any] | None = None
    ) -> None:
        self.spec = spec  # the desired spec
        #: An earlier supervisor's run record for this instance: its first launch adopts that
        #: run instead of starting one, if the very process (or container) still runs.
        self._adopt_record = adopt
        self.running_spec: InstanceSpec | None = None  # the spec of the current run
        self.services = services
        self.log_file = LogFile(services.logs_dir / f"{spec.id}.log")
        self.state = State.STOPPED
        self.history: deque[Transition] = deque(maxlen=HISTORY)
        self.created_at = utcnow()
        self.state_since = self.created_at
        self.failures = 0  # consecutive failed starts / early exits
        self.restarts = 0  # automatic restarts since the instance was created
        self.adoptions = 0  # runs of an earlier supervisor taken over (0 or 1: only at start-up)
        self.unavailable_waits = 0  # starts in a row its runner could not be reached for (backoff only)
        self.last_exit: ExitStatus | None = None
        self.last_error: str | None = None
        self.last_probe: str | None = None
        self.ready_at: datetime | None = None
        self.ready_monotonic: float | None = None  # the same moment on the monotonic clock
        #: Bumped whenever anything `snapshot()` shows changes (except the uptime clock), so
        #: views can cache what they render per instance.
        self.revision = 0
        self._desired = Desired.RUNNING if spec.enabled else Desired.STOPPED
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._run = 0
        self._tcount = 0
        self._handle: RunHandle | None = None
        self._run_node: str | None = None  # cluster mode: the node of the current or last run
        self._launch_task: asyncio.Task[Any] | None = None
        self._spawning = False
        self._stop_pending: str | None = None
        self._after_stop: _Failure | None = None
        self._health_task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._gates: list[Awaitable[Any]] = []
        self._stop_waiters: list[asyncio.Future[None]] = []
        self._state_waiters: list[tuple[Callable[[Instance], bool], asyncio.Future[None]]] = []
        self._helpers: set[asyncio.Task[Any]] = set()
        self._finished = asyncio.get_running_loop().create_future()
        self._run_over = asyncio.get_running_loop().create_future()
        self._run_over.set_result(None)
        self._actor: asyncio.Task[Any] | None = None
        self._log_offset = 0

    # == public: intents ==================================================================
    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def pid(self) -> int | None:
        return self._handle.pid if self._handle is not None else None

    @property
    def node(self) -> str | None:
        """Cluster mode: the node of the current or last run (its label, else its short id);
        before a first run, the label a pinned declaration names. None on this machine."""
        if self._run_node is not None:
            return self._run_node
        launch = self.effective_spec.launch
        return launch.node if isinstance(launch, ClusterLaunch) and launch.node != ANYWHERE else None

    @property
    def run_token(self) -> str | None:
        """The run mark's token of the current run (process runs), see marks.py."""
        return self._handle.token if self._handle is not None else None

    @property
    def spawning(self) -> bool:
        """A process may exist that the state machine has not heard of yet."""
        return self._spawning

    @property
    def effective_spec(self) -> InstanceSpec:
        """The spec of the current (or last) run, else the declared one: what runs now."""
        return self.running_spec or self.spec

    @property
    def desired(self) -> Desired:
        """Where the instance is heading."""
        return self._desired

    @property
    def finished(self) -> asyncio.Future[None]:
        return self._finished

    def run_over(self) -> asyncio.Future[None]:
        """Resolves once the current run (if any) has ended: its GPUs and port are free."""
        return self._run_over

    def activate(self, gates: tuple[Awaitable[Any], ...] = ()) -> None:
        """Start the actor; an enabled instance then starts once its `gates` resolve."""
        self._gates.extend(gates)
        self._actor = asyncio.create_task(
            self._main(), name=f"instance {self.id}"
        )  # held: tasks are weakly referenced
        if self._desired == Desired.RUNNING:
            self._post(StartIntent("declared"))

    def start(self, reason: str = "start requested") -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        self._post(StartIntent(reason, done))
        return done

    def stop(self, reason: str = "stop requested") -> asyncio.Future[None]:
        """Resolves once the instance is STOPPED (its whole process tree gone)."""
        done = asyncio.get_running_loop().create_future()
        self._post(StopIntent(reason, done))
        return done

    def remove(self, reason: str = "declaration removed") -> asyncio.Future[None]:
        """Stop for good; resolves once stopped and the actor has ended."""
        self._post(StopIntent(reason, None, remove=True))
        return self._finished

    def restart(self, reason: str = "restart requested") -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        self._post(RestartIntent(reason, done))
        return done

    def update(self, spec: InstanceSpec, gates: tuple[Awaitable[Any], ...] = ()) -> None:
        self._post(UpdateIntent(spec, gates))

    async def wait_for(self, predicate: Callable[[Instance], bool], timeout: float | None = None) -> None:
        if predicate(self):
            return
        fut = asyncio.get_running_loop().create_future()
        self._state_waiters.append((predicate, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._state_waiters = [(p, f) for p, f in self._state_waiters if f is not fut]

    async def wait_state(self, *states: State, timeout: float | None = None) -> None:
        await self.wait_for(lambda i: i.state in states, timeout)

    def uptime(self, now: datetime | None = None) -> float | None:
        if self.state != State.RUNNING or self.ready_at is None:
            return None
        return ((now or utcnow()) - self.ready_at).total_seconds()

    def snapshot(self) -> dict[str, Any]:
        now = utcnow()
        last = self.history[-1] if self.history else None
        spec = self.effective_spec
        return {
            "id": self.id,
            "model": spec.model,
            "backend": spec.backend,
            "gpus": list(spec.gpus),
            "port": spec.port or None,
            "state": self.state.value,
            "desired": self._desired,
            "pid": self.pid,
            "node": self.node,
            "restarts": self.restarts,
            "consecutive_failures": self.failures,
            "uptime": self.uptime(now),
            "state_since": self.state_since.isoformat(),
            "created_at": self.created_at.isoformat(),
            "reason": last.reason if last else None,
            "last_exit": self.last_exit.describe() if self.last_exit else None,
            "last_exit_code": self.last_exit.code if self.last_exit else None,
            "last_error": self.last_error,
            "last_probe": self.last_probe,
            "log_file": str(self.log_file.path),
            "source": str(self.spec.source),
            "pending_replace": self.running_spec is not None
            and self.running_spec.launch_hash != self.spec.launch_hash,
        }

    # == the actor ========================================================================
    def _port_taken(self, spec: InstanceSpec, port: int, holder: str) -> NoReturn:
        """A port of `spec` is held by `holder`: fail the start. An automatic port stays
        automatic: another one from the range, not a crash loop against a stranger (a fixed
        port is the user's to free)."""
        auto_keys = {
            **({spec.port: spec.id} if spec.auto_port else {}),
            **{p: f"{spec.id}#{name}" for name, p in spec.extra_ports},
        }
        auto_key = auto_keys.get(port)
        if auto_key is not None and self.services.give_up_port is not None:
            log.warning("%s: automatic port %d is held by %s; taking another one", self.id, port, holder)
            self.services.give_up_port(spec.id, auto_key, port)
            raise LaunchError(f"automatic port {port} is held by {holder}; moving to another port")
        raise LaunchError(f"port {port} is already in use by {holder}")

    def _post(self, message: Message) -> None:
        self._inbox.put_nowait(message)

    async def _main(self) -> None:
        while not self._finished.done():
            message = await self._inbox.get()
            try:
                self._dispatch(message)
            except Exception:  # a bug here must not orphan the instance's process
                log.exception("%s: error handling %r", self.id, message)
        while not self._inbox.empty():  # never leave a launched process without an owner
            message = self._inbox.get_nowait()
            if isinstance(message, Launched):
                log.error(
                    "%s: a process (pid %s) was launched after removal; stopping it",
                    self.id,
                    message.handle.pid,
                )
                spec = self.effective_spec
                await message.handle.stop(spec.stop.signum, spec.stop.timeout)

    def _dispatch(self, m: object) -> None:
        self.revision += 1
        match m:
            case StartIntent():
                self._on_start(m.reason)
                _resolve(m.done)
            case StopIntent():
                self._desired = Desired.REMOVED if m.remove else Desired.STOPPED
                if m.done is not None:
                    self._stop_waiters.append(m.done)
                self._halt(m.reason)
            case RestartIntent():
                self._on_restart(m.reason)
                _resolve(m.done)
            case UpdateIntent():
                self._on_update(m.spec, m.gates)
            case Launched():
                self._on_launched(m)
            case LaunchFailed():
                self._on_launch_failed(m)
            case Exited():
                self._on_exited(m)
            case Ready():
                self._on_ready(m)
            case Unhealthy():
                self._on_unhealthy(m)
            case StartFailed():
                self._on_start_failed(m)
            case Stopped():
                self._on_stopped(m)
            case TimerFired():
                self._on_timer(m)
            case _:
                raise TypeError(f"unknown message {m!r}")

    # -- intents -----------------------------------------------------------------------------
    def _on_start(self, reason: str) -> None:
        if self._desired == Desired.REMOVED:
            return
        self._desired = Desired.RUNNING
        if self.state in (State.STOPPED, State.EXITED, State.FATAL):
            self.failures = 0
            self._launch(reason)
        elif self.state == State.BACKOFF:
            self._launch(f"{reason} (backoff cut short)")
        # STARTING/RUNNING: already there. STOPPING: _on_stopped starts it (desired is running).

    def _on_restart(self, reason: str) -> None:
        if self._desired == Desired.REMOVED:
            return
        self._desired = Desired.RUNNING
        if self.state == State.RUNNING or (self.state == State.STARTING and self._handle is not None):
            self._begin_stop(reason)
        elif self.state == State.STARTING and self._spawning:
            self._stop_pending = reason
        elif self.state != State.STARTING:
            self._on_start(reason)

    def _on_update(self, spec: InstanceSpec, gates: tuple[Awaitable[Any], ...]) -> None:
        previous = self.spec
        self.spec = spec
        self._gates.extend(gates)
        if self._desired == Desired.REMOVED:
            return
        if not spec.enabled and self._desired == Desired.RUNNING:
            self._desired = Desired.STOPPED
            self._halt("disabled in its declaration")
            return
        if spec.enabled and not previous.enabled:
            self._on_start("enabled in its declaration")
            return
        current = self.running_spec or previous
        live_only = spec.launch_hash == current.launch_hash and spec.launch.live != current.launch.live
        if live_only and self.state == State.RUNNING and self._desired == Desired.RUNNING:
            self._apply_live(current, spec)
            return
        if (spec.launch_hash == current.launch_hash and not live_only) or self._desired != Desired.RUNNING:
            return  # policies only (applied in place), or not meant to run anyway
        reason = "declaration changed"
        self.failures = 0  # a new spec deserves a fresh set of attempts
        if self.state == State.RUNNING or (self.state == State.STARTING and self._handle is not None):
            self._begin_stop(reason)
        elif self.state == State.STARTING:
            if self._spawning:
                self._stop_pending = reason
            else:  # still waiting for its gates: relaunch with the new spec
                self._cancel_launch()
                self._transition(State.STOPPED, reason)
                self._launch(reason)
        elif self.state in (State.BACKOFF, State.EXITED, State.FATAL, State.STOPPED):
            self._launch(reason)
        # STOPPING: _on_stopped launches the new spec.

    def _apply_live(self, current: InstanceSpec, spec: InstanceSpec) -> None:
        """Only the plan's live part changed (Triton's model list and instance counts): the
        RUNNING server takes it through its own API instead of being replaced; it restarts
        only if it cannot (issue 12)."""
        self.running_spec = spec  # what runs once applied; a failed apply restarts with it
        run = self._run

        async def apply() -> None:
            live, previous = spec.launch.live, current.launch.live
            try:
                if live is None or previous is None:  # a live part added or dropped: a restart
                    raise ValueError("the server's live configuration was added or removed")
                done = await live.apply(previous, spec.port, spec.health.start_timeout)
            except Exception as exc:
                log.warning("%s: the change could not be applied in place: %s", self.id, exc)
                if self._run == run:
                    self._post(RestartIntent(f"the change could not be applied in place ({exc}); restarting"))
                return
            log.info("%s: applied in place, no restart: %s", self.id, done)

        self._helper(apply(), "apply live")

    def _halt(self, reason: str) -> None:
        """Head for STOPPED (used by stop, remove and disable)."""
        if self.state == State.STOPPED:
            self._reached_stopped()
        elif self.state == State.STARTING:
            if self._handle is not None:
                self._begin_stop(reason)
            elif self._spawning:
                self._stop_pending = reason
            else:
                self._cancel_launch()
                self._transition(State.STOPPED, reason)
                self._reached_stopped()
        elif self.state == State.RUNNING:
            self._begin_stop(reason)
        elif self.state in (State.BACKOFF, State.EXITED, State.FATAL):
            self._transition(State.STOPPED, reason)
            self._reached_stopped()
        elif self.state == State.STOPPING:
            self._after_stop = None

    # -- launching ---------------------------------------------------------------------------
    def _launch(self, reason: str) -> None:
        if self._adopt_record is not None:
            reason = f"adopting pid {self._adopt_record.get('pid')} from an earlier supervisor"
        self._transition(State.STARTING, reason)
        self._run += 1
        self._run_over = asyncio.get_running_loop().create_future()
        self.running_spec = self.spec
        self.ready_at = None
        self.last_probe = None
        self._stop_pending = None
        self._launch_task = self._helper(self._launch_run(self._run, self.spec), "launch")
        self._arm(self.spec.health.start_timeout, Timer.START_TIMEOUT)

    def _cancel_launch(self) -> None:
        if self._launch_task is not None:
            self._launch_task.cancel()
            self._launch_task = None
        self._spawning = False
        self._end_run()

    def _end_run(self) -> None:
        self._handle = None
        _resolve(self._run_over)

    async def _launch_run(self, run: int, spec: InstanceSpec) -> None:
        record, self._adopt_record = self._adopt_record, None
        try:
            runner = self.services.runners.get(spec.launch.runner)
            if record is not None and runner is not None:
                # Before any gate: an adopted run is already there, it waits for nobody.
                handle = await runner.adopt(spec.launch, self.log_file, spec.id, record)
                if handle is not None:
                    self._log_offset = self.log_file.size()
                    self._post(Launched(run, handle, adopted_from=record))
                    return
                log.info(
                    "%s: the recorded run (pid %s) is gone; starting a new one", self.id, record.get("pid")
                )
        except Exception:
            log.exception("%s: adopting the recorded run failed; starting a new one", self.id)
        try:
            gates, self._gates = self._gates, []
            for gate in gates:  # stop first, start later: wait for whoever frees our GPU/port
                try:
                    await gate
                except Exception:
                    pass
            for check in self.services.prestart:
                await check(self, spec)
            runner = self.services.runners.get(spec.launch.runner)
            if runner is None:
                raise LaunchError(f"no runner {spec.launch.runner!r} for backend {spec.backend!r}")
            # A run of ours that survived a supervisor restart holds the port legitimately.
            if spec.uses_port and runner.ports_here and not await runner.adoptable(spec.launch, spec.id):
                for port in (spec.port, *(p for _, p in spec.extra_ports)):
                    holder = await self.services.port_holder(port)
                    if holder is not None:
                        self._port_taken(spec, port, holder)
            for step in spec.launch.prepare:
                try:
                    await asyncio.to_thread(step.run)
                except (ValueError, OSError) as exc:
                    raise LaunchError(f"preparing the launch failed: {exc}") from None
            # From here on a process may exist that only this task knows about: the actor must
            # not treat the launch as abandonable until it has handled Launched/LaunchFailed.
            self._spawning = True
            self._log_offset = self.log_file.size()  # fail_patterns look at this run's lines only
            try:
                handle = await runner.launch(
                    spec.launch, self.log_file, instance_id=spec.id, stop_signal=spec.stop.signum
                )
            except PortInUse as exc:  # found where the run listens (a cluster node)
                self._port_taken(spec, exc.port, exc.holder)
            # Recorded before anyone hears of the run: a supervisor killed from here on finds
            # and adopts it instead of starting a second copy.
            record = {
                "instance": spec.id,
                "model": spec.model,
                "launch_hash": spec.launch_hash,
                "source": str(spec.source),
                "port": spec.port or None,
                "gpus": list(spec.gpus),
                "started_at": utcnow().isoformat(),
                **handle.record(),
            }
            try:
                await asyncio.to_thread(self.services.records.write, spec.id, record)
            except Exception as exc:  # the run is fine; only a later adoption would miss it
                log.error("%s: cannot write its run record: %s", self.id, exc)
        except LaunchError as exc:
            self._post(LaunchFailed(run, str(exc), unavailable=isinstance(exc, RunnerUnavailable)))
            return
        except Exception as exc:  # a bug (ours or a plugin's) must fail the start, not wedge it
            log.exception("%s: launch failed unexpectedly", self.id)
            self._post(LaunchFailed(run, f"internal error while launching: {type(exc).__name__}: {exc}"))
            return
        self._post(Launched(run, handle))

    def _on_launched(self, m: Launched) -> None:
        if m.run != self._run or self.state != State.STARTING:
            log.error("%s: launched a stale run %d; stopping it", self.id, m.run)
            self._helper(m.handle.stop(self.spec.stop.signum, self.spec.stop.timeout), "stop stale")
            return
        self._launch_task = None
        self._spawning = False
        self.unavailable_waits = 0
        self._handle = m.handle
        self._run_node = m.handle.node_name  # None for runs on this machine
        spec = self.effective_spec
        self._watcher = self._helper(self._watch_exit(m.run, m.handle, spec), "watch exit")
        if m.adopted_from is not None:
            self._on_adopted(m, spec)
        else:
            log.info("%s: launched pid %s", self.id, m.handle.pid)
        if self._stop_pending is not None:
            reason, self._stop_pending = self._stop_pending, None
            self._begin_stop(reason)
        elif spec.health.type == "none":
            self._become_ready(
                "adopted (no health check)" if m.adopted_from is not None else "started (no health check)"
            )
        else:
            self._health_task = self._helper(self._probe_loop(m.run, spec), "health")

    def _on_adopted(self, m: Launched, spec: InstanceSpec) -> None:
        """An earlier supervisor's run is ours now: it keeps its log, port and GPUs; health checks
        resume, with what is left of its start_timeout if it was not ready yet."""
        record = m.adopted_from or {}
        self.adoptions += 1
        log.info(
            "%s: adopted pid %s (started %s by an earlier supervisor)",
            self.id,
            m.handle.pid,
            record.get("started_at", "?"),
        )
        self.services.bus.publish(
            "adopted",
            {
                "instance": self.id,
                "model": spec.model,
                "pid": m.handle.pid,
                "started_at": record.get("started_at"),
            },
        )
        try:
            elapsed = (utcnow() - datetime.fromisoformat(record["started_at"])).total_seconds()
        except (KeyError, TypeError, ValueError):
            elapsed = 0.0
        self._arm(
            max(spec.health.start_timeout - elapsed, 2 * spec.health.start_interval, 1.0), Timer.START_TIMEOUT
        )

    def _on_launch_failed(self, m: LaunchFailed) -> None:
        if m.run != self._run or self.state != State.STARTING:
            return
        self._launch_task = None
        self._spawning = False
        self._end_run()
        if self._desired != Desired.RUNNING:
            self._transition(State.STOPPED, f"launch abandoned: {m.reason}")
            self._reached_stopped()
        else:
            self._fail(f"could not start: {m.reason}", tail=m.tail, counts=not m.unavailable)

    # -- readiness and liveness --------------------------------------------------------------
    async def _probe_loop(self, run: int, spec: InstanceSpec) -> None:
        attempt = 0
        patterns = [re.compile(p) for p in spec.launch.fail_patterns]
        offset = self._log_offset
        # A run on another node is probed there, on its loopback (RayHandle.probe), and its log
        # is read there (RayHandle.log).
        handle = self._handle
        prober = handle.prober if handle is not None else None
        remote_log = handle.remote_log if handle is not None else None
        while True:  # readiness: quick probes at first, then every start_interval
            if patterns:  # e.g. textgen's "Port X is already in use. Using port Y instead"
                if remote_log is not None:
                    try:
                        data, offset, _ = await remote_log.read_from(offset)
                    except LogUnavailable:
                        data = b""
                else:
                    data, offset, _ = await asyncio.to_thread(self.log_file.read_from, offset)
                for line in data.decode("utf-8", "replace").splitlines():
                    if any(p.search(line) for p in patterns):
                        self._post(StartFailed(run, line.strip()))
                        return
            result = await (prober or probe)(spec.health, spec.port)
            self.last_probe = result.detail
            if result.ok:
                self._post(Ready(run, result.detail))
                break
            log.debug("%s: not ready yet: %s", self.id, result.detail)
            await asyncio.sleep(min(spec.health.start_interval, 0.05 * 2**attempt))
            attempt += 1
        failures = 0
        while True:  # liveness: reads self.spec so an in-place edit of the interval applies
            health = self.spec.health if self.spec.launch_hash == spec.launch_hash else spec.health
            await asyncio.sleep(health.interval)
            result = await liveness(health, spec.port, (self.running_spec or spec).launch, prober)
            self.last_probe = result.detail
            if result.ok:
                failures = 0
                continue
            if handle is not None and handle.exited:
                return  # the run ended (its exit says why); a probe of it is no verdict
            failures += 1
            log.warning(
                "%s: health check failed (%d/%d): %s",
                self.id,
                failures,
                health.failure_threshold,
                result.detail,
            )
            if failures >= health.failure_threshold:
                self._post(Unhealthy(run, result.detail))
                return

    def _on_start_failed(self, m: StartFailed) -> None:
        if m.run == self._run and self.state == State.STARTING and self._handle is not None:
            reason = f"failed to start: its log says {m.line!r}"
            self._begin_stop(reason, _Failure(reason))

    def _on_ready(self, m: Ready) -> None:
        if m.run == self._run and self.state == State.STARTING:
            adopted = self._handle is not None and self._handle.adopted
            self._become_ready(
                f"adopted pid {self.pid}; ready: {m.detail}" if adopted else f"ready: {m.detail}"
            )

    def _become_ready(self, reason: str) -> None:
        self.ready_at = utcnow()
        self.ready_monotonic = time.monotonic()
        self._transition(State.RUNNING, reason)
        self._arm(self.effective_spec.restart.min_uptime, Timer.UPTIME)

    def _on_unhealthy(self, m: Unhealthy) -> None:
        if m.run == self._run and self.state == State.RUNNING:
            self._begin_stop(
                f"stopped answering its health check ({m.detail})",
                _Failure(f"unhealthy: {m.detail}", while_running=True),
            )

    # -- exits -------------------------------------------------------------------------------
    async def _watch_exit(self, run: int, handle: RunHandle, spec: InstanceSpec) -> tuple[str, ...]:
        """Runs for the whole life of a run; returns the log tail once everything is gone."""
        status = await handle.wait()
        # Workers the main process left behind would hold GPU memory and ports: clear them
        # before the state machine decides anything (a no-op scan-free check when none are left).
        await handle.cleanup(spec.stop.signum, spec.stop.timeout)
        for step in spec.launch.after_exit:
            try:
                await asyncio.to_thread(step.run)
            except Exception as exc:  # tidying after a run must never wedge the instance
                log.warning("%s: cleaning up after the run failed: %s", self.id, exc)
        tail = tuple(await asyncio.to_thread(self._finish_run_files, spec, status))
        self._post(Exited(run, status, tail))
        return tail

    def _finish_run_files(self, spec: InstanceSpec, status: ExitStatus) -> list[str]:
        self.services.records.remove(spec.id)
        tail = self.log_file.tail(TAIL_LINES)
        self.log_file.mark(f"{spec.id} ended: {status.describe()}")
        return tail

    def _on_exited(self, m: Exited) -> None:
        if m.run != self._run or self._handle is None:
            return
        if self.state == State.STOPPING:
            return  # the stop task reports Stopped
        if (
            self._handle.adopted
            and type(m.status) is ExitStatus
            and m.status.code is None
            and m.status.signal is None
        ):  # nobody could read it (a ClusterExit says why itself)
            m = Exited(m.run, _AdoptedExit(), m.tail)
        self._end_run()
        self.last_exit = m.status
        self._cancel_health()
        spec = self.effective_spec
        if self._desired != Desired.RUNNING:
            self._transition(State.STOPPED, f"exited ({m.status.describe()})", exit=m.status, tail=m.tail)
            self._reached_stopped()
        elif self.state == State.STARTING:
            self._fail(f"exited before becoming ready ({m.status.describe()})", m.status, m.tail)
        elif self.state == State.RUNNING:
            policy = spec.restart.policy
            if policy == "never" or (
                policy == "on-failure" and m.status.is_success(spec.restart.success_exit_codes)
            ):
                self._transition(
                    State.EXITED,
                    f"exited ({m.status.describe()}); restart policy is {policy}",
                    exit=m.status,
                    tail=m.tail,
                )
            else:
                self._fail(f"exited unexpectedly ({m.status.describe()})", m.status, m.tail)

    # -- stopping ----------------------------------------------------------------------------
    def _begin_stop(self, reason: str, after: _Failure | None = None) -> None:
        handle = self._handle
        assert handle is not None
        self._cancel_health()
        self._after_stop = after
        self._transition(State.STOPPING, reason)
        spec = self.effective_spec
        self._helper(
            self._stop_run(self._run, handle, spec, self._watcher, tail_wanted=after is not None), "stop"
        )

    async def _stop_run(
        self,
        run: int,
        handle: RunHandle,
        spec: InstanceSpec,
        watcher: asyncio.Task[tuple[str, ...]] | None,
        tail_wanted: bool,
    ) -> None:
        status = await handle.stop(spec.stop.signum, spec.stop.timeout)
        assert watcher is not None  # set when the run launched, before anything can stop it
        tail = await asyncio.shield(watcher)  # it closes the run's files once the exit is seen
        self._post(Stopped(run, status, tail if tail_wanted else ()))

    def _on_stopped(self, m: Stopped) -> None:
        if m.run != self._run or self.state != State.STOPPING:
            return
        self._end_run()
        self.last_exit = m.status
        after, self._after_stop = self._after_stop, None
        spec = self.effective_spec
        if (
            self._desired == Desired.RUNNING
            and after is not None
            and after.while_running
            and spec.restart.policy == "never"
        ):
            self._transition(
                State.EXITED, f"{after.reason}; restart policy is never", exit=m.status, tail=m.tail
            )
        elif self._desired == Desired.RUNNING and after is not None:
            self._fail(after.reason, m.status, m.tail)
        elif self._desired == Desired.RUNNING:
            self._transition(State.STOPPED, f"stopped ({m.status.describe()})", exit=m.status)
            self._launch(
                "restarting"
                if self.spec.launch_hash == self.effective_spec.launch_hash
                else "starting the changed declaration"
            )
        else:
            self._transition(State.STOPPED, f"stopped ({m.status.describe()})", exit=m.status)
            self._reached_stopped()

    def _reached_stopped(self) -> None:
        self.running_spec = None
        for fut in self._stop_waiters:
            _resolve(fut)
        self._stop_waiters.clear()
        if self._desired == Desired.REMOVED:
            self._cancel_timer()
            for task in self._helpers:
                task.cancel()
            _resolve(self._finished)

    # -- failures, backoff, timers -----------------------------------------------------------
    def _fail(
        self, reason: str, exit: ExitStatus | None = None, tail: tuple[str, ...] = (), counts: bool = True
    ) -> None:
        spec = self.effective_spec
        r = spec.restart
        reason = with_log_reason(reason, tail)  # "exited (exit code 1): error: creating server: ..."
        self.last_error = reason
        if not counts:  # its runner is unreachable: wait for it with backoff, never give up
            self.unavailable_waits += 1
            # At least 1 s: the runner answers at once while it is down (no spinning on it).
            delay = max(
                1.0,
                Backoff(r.initial_delay, r.factor, r.max_delay, r.jitter).delay(
                    self.unavailable_waits, self.services.rng
                ),
            )
            self._transition(
                State.BACKOFF,
                f"{reason}; trying again in {delay:.2f} s (waiting for it: not counted as a failure)",
                exit=exit,
                tail=tail,
            )
            self._arm(delay, Timer.BACKOFF)
            return
        self.failures += 1
        if gives_up(self.failures, r.max_retries):
            retry = f"; retrying once after {r.fatal_cooldown:g} s" if r.fatal_cooldown else ""
            self._transition(
                State.FATAL,
                f"{reason}; gave up after {self.failures} consecutive failures{retry}",
                exit=exit,
                tail=tail,
            )
            if r.fatal_cooldown:
                self._arm(r.fatal_cooldown, Timer.COOLDOWN)
            return
        delay = Backoff(r.initial_delay, r.factor, r.max_delay, r.jitter).delay(
            self.failures, self.services.rng
        )
        limit = f"/{r.max_retries}" if r.max_retries else ""
        self._transition(
            State.BACKOFF,
            f"{reason}; restarting in {delay:.2f} s (retry {self.failures}{limit})",
            exit=exit,
            tail=tail,
        )
        self._arm(delay, Timer.BACKOFF)

    def _on_timer(self, m: TimerFired) -> None:
        if m.token != self._tcount:
            return  # re-armed or cancelled since
        self._timer = None
        if self.state != TIMER_STATE[m.what]:
            return  # the state it was armed for is over
        spec = self.effective_spec
        match m.what:
            case Timer.BACKOFF:
                self.restarts += 1
                self._launch(f"restart {self.restarts} after backoff")
            case Timer.COOLDOWN:
                self.failures = spec.restart.max_retries  # exactly one more try
                self.restarts += 1
                self._launch("FATAL cooldown elapsed: one more try")
            case Timer.UPTIME:
                self.failures = 0
            case Timer.START_TIMEOUT:
                timeout = spec.health.start_timeout
                reason = (
                    f"not ready within start_timeout ({timeout:g} s); last probe: {self.last_probe or 'none'}"
                )
                if self._handle is not None:
                    self._begin_stop(reason, _Failure(reason))
                elif self._spawning:
                    self._stop_pending = reason
                else:
                    self._cancel_launch()
                    self._fail(reason)

    def _arm(self, delay: float, what: Timer) -> None:
        self._cancel_timer()
        token = self._tcount
        self._timer = asyncio.get_running_loop().call_later(delay, self._post, TimerFired(token, what))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cancel_health(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None

    # -- bookkeeping -------------------------------------------------------------------------
    def _transition(
        self, to: State, reason: str, exit: ExitStatus | None = None, tail: tuple[str, ...] = ()
    ) -> None:
        check_transition(self.state, to)
        self._cancel_timer()
        record = Transition(utcnow(), self.state, to, reason, exit, tuple(tail))
        self.history.append(record)
        self.state = to
        self.state_since = record.at
        self._tcount += 1
        level = logging.WARNING if to in (State.BACKOFF, State.FATAL) else logging.INFO
        log.log(level, "%s: %s -> %s: %s", self.id, record.from_state, to, reason)
        event = {"instance": self.id, "model": self.spec.model, **record.as_dict()}
        if (node := self.node) is not None:  # cluster mode only: local events keep their shape
            event["node"] = node
        self.services.bus.publish("transition", event)
        for predicate, fut in list(self._state_waiters):
            if not fut.done() and predicate(self):
                fut.set_result(None)

    def _helper(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.id} {what}")
        self._helpers.add(task)
        task.add_done_callback(self._helper_done)
        return task

    def _helper_done(self, task: asyncio.Task[Any]) -> None:
        self._helpers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s failed", self.id, task.get_name(), exc_info=task.exception())


class _AdoptedExit(ExitStatus):
    """The exit of an adopted process: not our child, so nobody could read its status."""

    __slots__ = ()

    def describe(self) -> str:
        return "exit status unknown: adopted from an earlier supervisor, so not our child"


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
