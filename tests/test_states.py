"""The transition table, pair by pair."""

from __future__ import annotations

import itertools

import pytest

from supervisor.core.states import TRANSITIONS, ExitStatus, IllegalTransition, State, check_transition

PAIRS = list(itertools.product(State, State))


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_pair_is_allowed_or_refused(a: State, b: State) -> None:
    if b in TRANSITIONS[a]:
        check_transition(a, b)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(a, b)


def test_every_state_can_be_left_and_reached() -> None:
    assert set(TRANSITIONS) == set(State)
    reachable = set().union(*TRANSITIONS.values())
    assert reachable == set(State)
    assert all(TRANSITIONS[s] for s in State)


def test_exit_status() -> None:
    assert ExitStatus.from_returncode(-9).describe() == "killed by SIGKILL"
    assert ExitStatus.from_returncode(3).describe() == "exit code 3"
    assert ExitStatus().describe() == "exit status unknown"
    assert ExitStatus(code=0).is_success([0]) and not ExitStatus(signal=15).is_success([0])
