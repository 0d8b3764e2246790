"""The contract between the instance state machine and whatever actually runs a backend."""

from __future__ import annotations

from typing import Protocol

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


class RunHandle(Protocol):
    """One run of one instance: a process tree or a container."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exited(self) -> bool: ...

    async def wait(self) -> ExitStatus:
        """Resolves as soon as the main process (or container) exits; never polls."""

    async def cleanup(self, signum: int, timeout: float) -> None:
        """After an exit: stop whatever the run left behind (workers still holding GPU memory)."""

    async def stop(self, signum: int, timeout: float) -> ExitStatus:
        """Signal, wait up to `timeout`, then kill everything the run started."""

    def record(self) -> dict:
        """What to persist in the state dir so a later supervisor can find this run again."""

    @property
    def adopted(self) -> bool:
        """True if this run was started by an earlier supervisor and adopted."""


class Runner(Protocol):
    name: str
    #: Its runs listen on this machine: their ports are checked free here before a launch.
    #: (A cluster runner checks them on the node, and raises PortInUse from `launch`.)
    ports_here: bool

    async def launch(self, plan, log: LogFile, instance_id: str = "", stop_signal: int = 15) -> RunHandle:
        """Start (or adopt) the run; raises LaunchError with a reason a user can act on."""

    async def adopt(self, plan, log: LogFile, instance_id: str, record: dict) -> RunHandle | None:
        """A handle on the run described by `record` (written by an earlier supervisor) if that
        very run is still alive; None if it is gone. The caller has checked the spec hash."""

    async def adoptable(self, plan, instance_id: str) -> bool:
        """True if a run of this plan survived a supervisor restart and `launch` will adopt it
        (a run with no record: a container started just before the supervisor died)."""

    def unavailable_reason(self) -> str | None:
        """Why this runner cannot be used, as far as it last knew (None: usable)."""

    async def close(self) -> None: ...
