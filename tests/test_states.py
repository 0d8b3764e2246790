"""The transition table, pair by pair, against moves written out here from the states' intent.

The expected moves are not read from `TRANSITIONS`: they are the README's "How instances behave"
and the comments on `State`, spelled out one pair at a time, so a wrong edit of the table fails.
"""

from __future__ import annotations

import itertools

import pytest

from supervisor.core.states import TRANSITIONS, ExitStatus, IllegalTransition, State, check_transition

S = State

#: Every move an instance may make, and why; any pair not listed here must be refused.
ALLOWED: frozenset[tuple[State, State]] = frozenset(
    {
        # STOPPED: not meant to run; the only way out is a start.
        (S.STOPPED, S.STARTING),
        # STARTING: launched (or launching), not ready yet.
        (S.STARTING, S.RUNNING),  # its health check passed (or it has none)
        (S.STARTING, S.BACKOFF),  # it failed to start: wait out the delay, then again
        (S.STARTING, S.FATAL),  # that failure was the max_retries-th in a row
        (S.STARTING, S.STOPPING),  # stopped by hand (or not ready in time) while its process runs
        (S.STARTING, S.STOPPED),  # stopped before anything was spawned
        # RUNNING: ready.
        (S.RUNNING, S.STOPPING),  # stopped by hand, removed, replaced, or unhealthy
        (S.RUNNING, S.BACKOFF),  # it exited unexpectedly: restart after the delay
        (S.RUNNING, S.FATAL),  # it exited, and that was one failure too many
        (S.RUNNING, S.EXITED),  # it exited and the restart policy says leave it
        # BACKOFF: nothing runs, the next start is due later.
        (S.BACKOFF, S.STARTING),  # the delay is over
        (S.BACKOFF, S.STOPPED),  # stopped meanwhile: nothing to stop
        # STOPPING: the stop signal is sent, the process tree is going.
        (S.STOPPING, S.STOPPED),  # a stop that was asked for
        (S.STOPPING, S.BACKOFF),  # a stop the supervisor decided (not ready, unhealthy): restart later
        (S.STOPPING, S.FATAL),  # ... and that failure was one too many
        (S.STOPPING, S.EXITED),  # ... and the policy says leave it
        # EXITED and FATAL: nothing runs; an explicit start (or a cooldown) leaves them.
        (S.EXITED, S.STARTING),
        (S.EXITED, S.STOPPED),
        (S.FATAL, S.STARTING),
        (S.FATAL, S.STOPPED),
    }
)

PAIRS = list(itertools.product(State, State))


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_pair_is_allowed_or_refused(a: State, b: State) -> None:
    if (a, b) in ALLOWED:
        check_transition(a, b)
        assert b in TRANSITIONS[a]
    else:
        with pytest.raises(IllegalTransition, match=f"illegal transition {a} -> {b}"):
            check_transition(a, b)
        assert b not in TRANSITIONS[a]


def test_the_expected_moves_leave_and_reach_every_state() -> None:
    assert {a for a, _ in ALLOWED} == set(State)  # nothing is a dead end
    assert {b for _, b in ALLOWED} == set(State)  # nothing is unreachable
    assert not any(a == b for a, b in ALLOWED)  # a move always changes the state
    assert set(TRANSITIONS) == set(State)


def test_exit_status() -> None:
    assert ExitStatus.from_returncode(-9).describe() == "killed by SIGKILL"
    assert ExitStatus.from_returncode(3).describe() == "exit code 3"
    assert ExitStatus().describe() == "exit status unknown"
    assert ExitStatus(code=0).is_success([0]) and not ExitStatus(signal=15).is_success([0])
