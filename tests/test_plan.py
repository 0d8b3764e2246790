"""The reconcile step as a pure function, with hand-built inputs."""

from __future__ import annotations

from pathlib import Path

from supervisor.backends.base import ProcessLaunch
from supervisor.config.desired import InstanceSpec, ResolvedHealth
from supervisor.config.plan import plan
from supervisor.core.spec import RestartSpec, StopSpec

HEALTH = ResolvedHealth("none", None, 1, 1, 1, 1, 1)


def spec(iid: str, gpus=(), port=1000, launch="a", policy="p") -> InstanceSpec:
    return InstanceSpec(
        id=iid,
        model=iid.split("@")[0],
        backend="process",
        gpus=tuple(gpus),
        port=port,
        uses_port=True,
        extra_ports=(),
        enabled=True,
        launch=ProcessLaunch(("x",)),
        health=HEALTH,
        restart=RestartSpec(),
        stop=StopSpec(),
        source=Path("f.toml"),
        launch_hash=launch,
        policy_hash=policy,
    )


def test_add_remove_replace_update_unchanged() -> None:
    actual = {
        s.id: s for s in [spec("a@cpu"), spec("b@cpu", port=2), spec("c@cpu", port=3), spec("d@cpu", port=4)]
    }
    desired = {
        s.id: s
        for s in [
            spec("a@cpu"),
            spec("b@cpu", port=2, launch="B"),
            spec("c@cpu", port=3, policy="P"),
            spec("e@cpu", port=5),
        ]
    }
    p = plan(desired, actual)
    assert (p.remove, p.replace, p.update, p.add, p.unchanged) == (
        ["d@cpu"],
        ["b@cpu"],
        ["c@cpu"],
        ["e@cpu"],
        ["a@cpu"],
    )
    assert p.gates == {}


def test_nothing_changes_nothing() -> None:
    actual = {"a@cpu": spec("a@cpu")}
    assert plan({"a@cpu": spec("a@cpu")}, actual).empty


def test_new_instance_waits_for_stopping_one_on_same_gpu() -> None:
    actual = {"old@gpu0": spec("old@gpu0", gpus=[0], port=1), "x@gpu1": spec("x@gpu1", gpus=[1], port=2)}
    desired = {"new@gpu0": spec("new@gpu0", gpus=[0], port=3), "x@gpu1": spec("x@gpu1", gpus=[1], port=2)}
    p = plan(desired, actual)
    assert p.gates == {"new@gpu0": {"old@gpu0"}}


def test_new_instance_waits_for_port_of_replaced_one() -> None:
    actual = {"a@cpu": spec("a@cpu", port=1)}
    desired = {"a@cpu": spec("a@cpu", port=2, launch="new"), "b@cpu": spec("b@cpu", port=1)}
    p = plan(desired, actual)
    assert p.replace == ["a@cpu"] and p.gates == {"b@cpu": {"a@cpu"}}


def test_unrelated_instances_do_not_wait() -> None:
    actual = {"a@gpu0": spec("a@gpu0", gpus=[0], port=1)}
    desired = {"b@gpu1": spec("b@gpu1", gpus=[1], port=2)}
    assert plan(desired, actual).gates == {}
