"""Instance states and the transition table, written as data.

The names are supervisord's, so operators coming from it read them without a glossary.
Only `supervisor.runtime.instance` moves an instance between states, and it checks every move
against `TRANSITIONS`: an illegal move is a bug and raises, it is never papered over.
"""

from __future__ import annotations

import enum
import signal as _signal
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class State(enum.StrEnum):
    STOPPED = "STOPPED"  # not running, and not meant to run right now
    STARTING = "STARTING"  # launched (or launching), not yet ready
    RUNNING = "RUNNING"  # ready: its health check passes (or it has none)
    BACKOFF = "BACKOFF"  # failed; waiting out the backoff delay before the next start
    STOPPING = "STOPPING"  # stop signal sent, waiting for the process tree to go
    EXITED = "EXITED"  # exited and the restart policy says to leave it
    FATAL = "FATAL"  # gave up after too many consecutive failures


class Desired(enum.StrEnum):
    """Where an instance is heading: set by its declaration, an API intent or its removal."""

    RUNNING = "running"
    STOPPED = "stopped"
    REMOVED = "removed"  # declaration gone: stop, then the instance ends


class Timer(enum.StrEnum):
    """The one timer an instance has armed at a time."""

    BACKOFF = "backoff"  # then the next start
    COOLDOWN = "cooldown"  # FATAL's one more try (restart.fatal_cooldown)
    UPTIME = "uptime"  # RUNNING long enough (restart.min_uptime): failures forgiven
    START_TIMEOUT = "start_timeout"  # not ready in time: a failed start


#: The state a timer belongs to: one that fires in any other state is stale and ignored.
TIMER_STATE: dict[Timer, State] = {
    Timer.BACKOFF: State.BACKOFF,
    Timer.COOLDOWN: State.FATAL,
    Timer.UPTIME: State.RUNNING,
    Timer.START_TIMEOUT: State.STARTING,
}


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.FATAL, S.STOPPING, S.STOPPED}),
    S.RUNNING: frozenset({S.STOPPING, S.BACKOFF, S.FATAL, S.EXITED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.FATAL, S.EXITED}),
    S.EXITED: frozenset({S.STARTING, S.STOPPED}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(current: State, target: State) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal transition {current} -> {target}")


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process (or container) ended: an exit code or a signal, never both."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        return cls(signal=-returncode) if returncode < 0 else cls(code=returncode)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.code is None:
            return "exit status unknown"
        return f"exit code {self.code}"

    def is_success(self, success_codes: tuple[int, ...] | list[int]) -> bool:
        return self.signal is None and self.code is not None and self.code in success_codes


@dataclass(frozen=True, slots=True)
class Transition:
    """One recorded move, so the engine can say *why* an instance is where it is."""

    at: datetime
    from_state: State
    to_state: State
    reason: str
    exit: ExitStatus | None = None
    log_tail: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "from": self.from_state.value,
            "to": self.to_state.value,
            "reason": self.reason,
            "exit_code": self.exit.code if self.exit else None,
            "signal": self.exit.signal if self.exit else None,
            "log_tail": list(self.log_tail),
        }


def utcnow() -> datetime:
    return datetime.now(UTC)
