"""The contract between the instance state machine and whatever actually runs a backend."""

from __future__ import annotations

from typing import Protocol

from ..logfiles import LogFile
from ..states import ExitStatus


class LaunchError(Exception):
    """The backend could not be started at all (bad executable, missing image, no daemon)."""


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


class Runner(Protocol):
    name: str

    async def launch(self, plan, log: LogFile) -> RunHandle: ...

    def unavailable_reason(self) -> str | None: ...
