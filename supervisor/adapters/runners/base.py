"""The contract between the instance state machine and whatever actually runs a backend."""

from __future__ import annotations

from typing import Any, Protocol

from supervisor.adapters.health import Prober
from supervisor.adapters.logfiles import LogFile
from supervisor.core.states import ExitStatus


class LaunchError(Exception):
    """The backend could not be started at all (bad executable, missing image, no daemon)."""


class RunnerUnavailable(LaunchError):
    """Not the backend's fault: what runs it cannot be reached now (the Ray cluster). The
    instance backs off and tries again, but this never counts toward `max_retries`: an outage
    of the cluster must not leave its models FATAL once it is back."""


class PortInUse(LaunchError):
    """A port of the run is held by another process (found where the run would listen)."""

    def __init__(self, port: int, holder: str) -> None:
        super().__init__(f"port {port} is already in use by {holder}")
        self.port = port
        self.holder = holder


class LogReader(Protocol):
    """A run's log, read where the run is (the file here, or through a node's agent)."""

    async def tail(self, lines: int) -> list[str]: ...

    async def size(self) -> int: ...

    async def read_from(self, offset: int) -> tuple[bytes, int, int]: ...


class RunHandle(Protocol):
    """One run of one instance: a process tree, a container or a run on a cluster node.

    The optional capabilities are typed members that are None where a kind has none of them,
    so the instance asks the handle, never `getattr`."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exited(self) -> bool: ...

    @property
    def adopted(self) -> bool:
        """True if this run was started by an earlier supervisor and adopted."""

    @property
    def token(self) -> str | None:
        """The run mark's token (runs whose processes carry our mark); None for containers."""

    @property
    def node_name(self) -> str | None:
        """The cluster node the run is on (its label, else its short id); None: this machine."""

    @property
    def prober(self) -> Prober | None:
        """Probes the run where it runs (a node's loopback); None: probe it from here."""

    @property
    def remote_log(self) -> LogReader | None:
        """The run's log where it runs; None: the instance's log file on this machine."""

    async def wait(self) -> ExitStatus:
        """Resolves as soon as the main process (or container) exits; never polls."""

    async def cleanup(self, signum: int, timeout: float) -> None:
        """After an exit: stop whatever the run left behind (workers still holding GPU memory)."""

    async def stop(self, signum: int, timeout: float) -> ExitStatus:
        """Signal, wait up to `timeout`, then kill everything the run started."""

    def record(self) -> dict[str, Any]:
        """What to persist in the state dir so a later supervisor can find this run again."""


class Runner(Protocol):
    name: str
    #: Its runs listen on this machine: their ports are checked free here before a launch.
    #: (A cluster runner checks them on the node, and raises PortInUse from `launch`.)
    ports_here: bool

    async def launch(
        self, plan: Any, log_file: LogFile, instance_id: str = "", stop_signal: int = 15
    ) -> RunHandle:
        """Start (or adopt) the run; raises LaunchError with a reason a user can act on."""

    async def adopt(
        self, plan: Any, log_file: LogFile, instance_id: str, record: dict[str, Any]
    ) -> RunHandle | None:
        """A handle on the run described by `record` (written by an earlier supervisor) if that
        very run is still alive; None if it is gone. The caller has checked the spec hash."""

    async def adoptable(self, plan: Any, instance_id: str) -> bool:
        """True if a run of this plan survived a supervisor restart and `launch` will adopt it
        (a run with no record: a container started just before the supervisor died)."""

    def unavailable_reason(self) -> str | None:
        """Why this runner cannot be used, as far as it last knew (None: usable)."""

    async def check(self) -> None:
        """Find out whether the runner can be used now (is there a Docker daemon?), for
        `unavailable_reason` and /healthz; called once in the background at start-up."""

    async def close(self) -> None: ...
