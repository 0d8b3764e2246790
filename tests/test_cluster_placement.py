"""`gpus = "auto"` across a cluster's nodes, and placements that lack of information never
moves (pure: desired.resolve and placement.py with GPU facts as data; no Ray, no processes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.adapters.ports import PortAllocator
from supervisor.backends.registry import default_registry
from supervisor.config.declarations import Defaults, parse_declaration
from supervisor.config.desired import Catalog, resolve
from supervisor.core.placement import (
    NO_FACTS,
    Claim,
    ClusterFacts,
    GpuClaims,
    GpuFacts,
    PlacementError,
    place_on_nodes,
)

from .conftest import declaration, wait_until

REGISTRY = default_registry(load_plugins=False)
CLUSTER = Defaults(cluster=True)


def gpus(free: dict[int, int]) -> GpuFacts:
    return GpuFacts(frozenset(free), dict(free))


def settle(
    docs: list[dict],
    cluster: ClusterFacts,
    previous: Catalog | None = None,
    defaults: Defaults = CLUSTER,
    facts: GpuFacts = NO_FACTS,
) -> Catalog:
    parsed = {
        f"/c/{d['name']}.toml": parse_declaration(d, Path(f"/c/{d['name']}.toml"), REGISTRY, defaults)
        for d in docs
    }
    ports = PortAllocator(30000, 30999, is_free=lambda _p: True)
    return resolve(parsed, previous or Catalog(), ports.assign, facts=facts, cluster=cluster)


def test_the_node_with_the_most_memory_available_is_chosen_and_the_instance_pinned_there() -> None:
    nodes = ClusterFacts({"gpu-a": gpus({0: 3000, 1: 9000}), "gpu-b": gpus({0: 8000, 1: 8500})})
    catalog = settle([declaration("llm", gpus="auto", instances=3, min_free_memory_mb=2000)], nodes)
    assert catalog.errors == {}
    # 9000 on gpu-a:1, then gpu-b's 8500 and 8000 (gpu-a:0 has 3000 left): each the freest left.
    assert sorted(catalog.instances) == ["llm@gpu-a:gpu1", "llm@gpu-b:gpu0", "llm@gpu-b:gpu1"]
    spec = catalog.instances["llm@gpu-a:gpu1"]
    assert (spec.launch.node, spec.launch.gpus, spec.launch.runner) == ("gpu-a", (1,), "ray")
    assert catalog.placements == {"llm#0": (1,), "llm#1": (1,), "llm#2": (0,)}
    assert catalog.placed_on == {"llm#0": "gpu-a", "llm#1": "gpu-b", "llm#2": "gpu-b"}
    again = Catalog.from_placement_record(catalog.placement_record())
    assert (again.placements, again.placed_on) == (catalog.placements, catalog.placed_on)


def test_a_tensor_parallel_instance_goes_where_its_tightest_gpu_has_the_most_room() -> None:
    # gpu-a has the single freest GPU, but its second one is nearly full.
    nodes = ClusterFacts({"gpu-a": gpus({0: 9900, 1: 1200}), "gpu-b": gpus({0: 6000, 1: 6000, 2: 100})})
    catalog = settle([declaration("tp", gpus="auto", gpus_per_instance=2)], nodes)
    assert list(catalog.instances) == ["tp@gpu-b:gpu0-1"]


def test_gpus_other_declarations_hold_are_kept_off_exclusive_and_shared() -> None:
    nodes = ClusterFacts(
        {"gpu-a": gpus({0: 9000, 1: 9000}), "gpu-b": gpus({0: 5000})},
        occupied={"gpu-a": {1: Claim("free@gpu1", "/c/free.toml", False, 0)}},
    )
    docs = [declaration("pinned", node="gpu-a", gpus=[0]), declaration("auto", gpus="auto")]
    catalog = settle(docs, nodes)
    # gpu-a:0 is pinned, gpu-a:1 runs `free` (placed by Ray): only gpu-b is left.
    assert "auto@gpu-b:gpu0" in catalog.instances, catalog.errors
    docs.append(declaration("more", gpus="auto"))
    catalog = settle(docs, nodes)
    [error] = catalog.errors["/c/more.toml"]
    assert error.key == "gpus" and "cannot place on any node: needs 1 GPU(s)" in error.message
    assert "gpu-a: GPU 0: held by pinned@gpu-a:gpu0; GPU 1: held by free@gpu1" in error.message, error.message
    assert "gpu-b: GPU 0: held by auto@gpu-b:gpu0" in error.message, error.message
    shared = [
        declaration("s1", gpus="auto", share_gpus=True),
        declaration("s2", gpus="auto", share_gpus=True),
        declaration("solo", gpus="auto"),
    ]
    catalog = settle(shared, ClusterFacts({"gpu-a": gpus({0: 9000})}))
    assert sorted(catalog.instances) == ["s1@gpu-a:gpu0", "s2@gpu-a:gpu0"]
    assert "GPU 0: held by s1@gpu-a:gpu0" in catalog.errors["/c/solo.toml"][0].message


def test_a_placement_stays_put_until_its_node_leaves_the_cluster() -> None:
    doc = declaration("llm", gpus="auto", port="auto")
    first = settle([doc], ClusterFacts({"gpu-a": gpus({0: 9000}), "gpu-b": gpus({0: 5000})}))
    assert list(first.instances) == ["llm@gpu-a:gpu0"]
    # gpu-b is freer now: the instance stays (a move would restart a model that took minutes).
    later = settle([doc], ClusterFacts({"gpu-a": gpus({0: 1000}), "gpu-b": gpus({0: 9500})}), first)
    assert list(later.instances) == ["llm@gpu-a:gpu0"]
    # The driver is down, nothing is known of any node: it stays too (and is adopted later).
    dark = settle([doc], ClusterFacts(reason="the cluster is unreachable"), later)
    assert list(dark.instances) == ["llm@gpu-a:gpu0"] and dark.errors == {}
    # gpu-a left the cluster: placed again on a node that is there.
    moved = settle([doc], ClusterFacts({"gpu-b": gpus({0: 9500})}), dark)
    assert list(moved.instances) == ["llm@gpu-b:gpu0"] and moved.placed_on == {"llm#0": "gpu-b"}
    # Nothing to go on and no placement yet: a load error that says why.
    none = settle([declaration("new", gpus="auto")], ClusterFacts(reason="the cluster is unreachable"))
    [error] = none.errors["/c/new.toml"]
    assert (
        error.key == "gpus"
        and "needs to know the nodes' GPUs, and the cluster is unreachable" in error.message
    )


def test_a_pinned_auto_placement_is_kept_while_its_node_is_silent() -> None:
    doc = declaration("chooser", node="gpu-a", gpus="auto")
    first = settle([doc], ClusterFacts({"gpu-a": gpus({0: 100, 1: 9000})}))
    assert list(first.instances) == ["chooser@gpu-a:gpu1"]
    for silent in (ClusterFacts(reason="the cluster is unreachable"), ClusterFacts({})):
        catalog = settle([doc], silent, first)
        assert list(catalog.instances) == ["chooser@gpu-a:gpu1"] and catalog.errors == {}


def test_a_local_auto_placement_survives_a_gpu_source_that_stops_answering() -> None:
    local = Defaults()
    doc = declaration("auto1", gpus="auto")
    first = settle([doc], ClusterFacts(), defaults=local, facts=gpus({0: 100, 1: 9000}))
    assert list(first.instances) == ["auto1@gpu1"]
    later = settle([doc], ClusterFacts(), first, local, GpuFacts.unknown("NVML: driver not loaded"))
    assert list(later.instances) == ["auto1@gpu1"] and later.errors == {}
    fresh = settle([doc], ClusterFacts(), None, local, GpuFacts.unknown("NVML: driver not loaded"))
    assert "needs to know the GPUs, and NVML: driver not loaded" in fresh.errors["/c/auto1.toml"][0].message


def test_unlabelled_and_unknown_nodes_are_never_chosen() -> None:
    nodes = ClusterFacts({"gpu-a": GpuFacts.unknown("no GPU source")})
    with pytest.raises(PlacementError, match="gpu-a: no GPU source"):
        place_on_nodes(1, 0, False, nodes, GpuClaims())
    assert place_on_nodes(
        1, 0, False, ClusterFacts({"gpu-a": GpuFacts.unknown("x"), "gpu-b": gpus({3: 10})}), GpuClaims()
    ) == ("gpu-b", (3,))


def test_instances_of_one_sharing_model_never_land_on_one_gpu() -> None:
    doc = declaration("s", gpus="auto", share_gpus=True, instances=2)
    catalog = settle([doc], ClusterFacts(), defaults=Defaults(), facts=gpus({0: 9000, 1: 100}))
    assert sorted(catalog.instances) == ["s@gpu0", "s@gpu1"]  # before: both on GPU 0, one id for two
    catalog = settle([doc], ClusterFacts(), defaults=Defaults(), facts=gpus({0: 9000}))
    assert "held by s@gpu0" in catalog.errors["/c/s.toml"][0].message and not catalog.instances
    catalog = settle([doc], ClusterFacts({"gpu-a": gpus({0: 9000}), "gpu-b": gpus({0: 100})}))
    assert sorted(catalog.instances) == ["s@gpu-a:gpu0", "s@gpu-b:gpu0"]


class _Client:
    """What ClusterNodes needs of the driver connection, for feeding it samples by hand."""

    up = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def subscribe(self, event: str, listener) -> None:
        pass

    async def call(self, op: str, **args):
        self.calls.append((op, args))
        return {"how": "terminated", "reason": "a GPU process", "instance": None}


def _sample(
    label: str | None,
    node_id: str,
    processes: list[tuple[int, int]],
    runs: dict | None = None,
    error: str | None = None,
) -> dict:
    import time

    return {
        "node_id": node_id,
        "label": label or node_id[:12],
        "labelled": label is not None,
        "error": error,
        "sampled_at": time.time(),
        "devices": [
            {
                "index": 0,
                "memory_total_mib": 10000,
                "memory_used_mib": 100,
                "processes": [{"pid": pid, "used_memory_mib": mib} for pid, mib in processes],
            }
        ],
        "runs": runs or {},
        "users": {str(pid): "alice" for pid, _ in processes},
    }


async def test_node_facts_and_strays_from_the_agents_samples() -> None:
    import asyncio

    from supervisor.cluster.nodes import ClusterNodes
    from supervisor.core.strays import StrayRules

    client = _Client()
    events: list[tuple[str, dict]] = []
    nodes = ClusterNodes(
        client,  # type: ignore[arg-type]
        rules=StrayRules(default="kill", kill_after=0.05),
        publish=lambda kind, data, keep=True: events.append((kind, data)),
    )
    assert nodes.facts().reason == "no sample from the nodes yet"  # nothing moves before the first round
    ours = {"tok": {"instance": "m@gpu-a:gpu0", "pids": [11]}}
    nodes._on_nodes(
        {
            "samples": [
                _sample("gpu-a", "a" * 20, [(10, 500), (11, 900)], ours),
                _sample(None, "f" * 20, [(20, 100)]),
            ]
        }
    )
    facts = nodes.facts()
    assert list(facts.nodes) == ["gpu-a"]  # a node without our label is never chosen
    assert facts.nodes["gpu-a"].free_mib == {0: 9900}
    # pid 11 carries a run mark of ours (the reaper's, if no instance owns it): never a stray.
    assert [(s["node"], s["pid"], s["user"]) for s in nodes.strays()] == [
        ("ffffffffffff", 20, "alice"),
        ("gpu-a", 10, "alice"),
    ]
    await asyncio.sleep(0.1)  # kill_after (0.05 s) passes
    # A failed sample judges nothing (its runs are unknown), and keeps the strays it had.
    nodes._on_nodes(
        {"samples": [_sample("gpu-a", "a" * 20, [], error="no answer"), _sample(None, "f" * 20, [(20, 100)])]}
    )
    await wait_until(lambda: any(kind == "stray_killed" for kind, _ in events))  # the kill's task
    assert client.calls == [("kill", {"node_id": "f" * 20, "pid": 20, "grace": 5.0, "force": False})]
    assert {s["pid"]: s["action"] for s in nodes.strays()} == {10: "reported", 20: "killed"}
    assert ("stray_killed", {"pid": 20, "gpu": 0, "node": "ffffffffffff", "how": "terminated"}) in events
    assert [d["node"] for kind, d in events if kind == "gpu"] == ["gpu-a", "ffffffffffff", "ffffffffffff"]
