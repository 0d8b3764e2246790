"""The kill policy and process ownership, as pure functions over hand-built process tables."""

from __future__ import annotations

import pytest

from supervisor.adapters.kill import Facts, judge, owners_of
from supervisor.adapters.procscan import ProcInfo


def proc(pid: int, ppid: int, pgid: int | None = None, state: str = "S") -> ProcInfo:
    return ProcInfo(
        pid=pid, ppid=ppid, pgid=pgid if pgid is not None else pid, sid=pid, state=state, starttime=pid
    )


TABLE = {
    p.pid: p
    for p in [
        proc(1, 0),
        proc(100, 1),  # instance a's main process (its own group)
        proc(101, 100, pgid=100),  # a's worker
        proc(102, 101, pgid=100),  # a's worker's child
        proc(103, 1, pgid=100),  # a's group member whose parent died (reparented to init)
        proc(104, 101),  # left a's group with setsid, parent still alive
        proc(200, 1),  # instance b
        proc(300, 1),  # nobody's
        proc(301, 300),
    ]
}


def test_owners_walk_parents_and_groups() -> None:
    owners = owners_of([100, 101, 102, 103, 104, 200, 300, 301, 999], TABLE, {"a@gpu0": 100, "b@gpu1": 200})
    assert owners == {
        100: "a@gpu0",
        101: "a@gpu0",
        102: "a@gpu0",
        103: "a@gpu0",
        104: "a@gpu0",
        200: "b@gpu1",
    }


def facts(pid: int, **kw) -> Facts:
    base = dict(
        pid=pid,
        self_pid=50,
        self_pgid=40,
        target_pgid=pid,
        ancestors=frozenset({1, 40}),
        owner=None,
        on_gpu=False,
    )
    base.update(kw)
    return Facts(**base)


@pytest.mark.parametrize(
    "f,force,allowed,words",
    [
        (facts(0), True, False, "never a valid target"),
        (facts(-1), True, False, "never a valid target"),
        (facts(1), True, False, "never a valid target"),
        (facts(50), True, False, "the supervisor itself"),
        (facts(40), True, False, "ancestor"),
        (facts(60, target_pgid=40), True, False, "own process group"),
        (facts(70, owner="m@gpu0"), False, True, "belongs to instance m@gpu0"),
        (facts(71, on_gpu=True), False, True, "GPU process"),
        (facts(72), False, False, "add ?force=true"),
        (facts(72), True, True, "force=true"),
    ],
)
def test_judge(f: Facts, force: bool, allowed: bool, words: str) -> None:
    verdict = judge(f, force)
    assert verdict.allowed is allowed and words in verdict.reason
