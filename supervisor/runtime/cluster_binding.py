"""What the cluster pieces need to know of the engine, wired in one place (cluster mode only).

The engine knows its runs and its catalog; the Ray runner and its node view (`nodes`) need
some of that, and the engine needs their node facts and GPU gate. `bind` connects them, so
engine.py stays free of cluster details beyond calling it.
"""

from __future__ import annotations

from typing import Any

from supervisor.config.cluster_launch import ANYWHERE, ClusterLaunch
from supervisor.core.placement import Claim
from supervisor.core.states import State
from supervisor.core.strays import StrayRules


def pinned_nodes(catalog: Any, instance_id: str, gpus: tuple[int, ...], share: bool) -> list[str]:
    """Nodes where another enabled declaration pinned to that node names one of `gpus`: an
    instance placed anywhere keeps off them, so it never takes a pinned model's GPU (pure)."""
    out = set()
    for iid, spec in catalog.instances.items():
        launch = spec.launch
        node = getattr(launch, "node", ANYWHERE)
        if (
            iid == instance_id
            or not spec.enabled
            or getattr(launch, "runner", None) != "ray"
            or node == ANYWHERE
        ):
            continue
        if set(gpus) & set(spec.gpus) and not (share and getattr(launch, "share_gpus", False)):
            out.add(node)
    return sorted(out)


#: States in which a run holds its GPUs on its node.
HOLDING = frozenset({State.STARTING, State.RUNNING, State.STOPPING})


def occupied(instances: Any) -> dict[str, dict[int, Claim]]:
    """Node label -> GPU -> the run Ray placed there (a declaration without `node`, with GPUs)
    that holds it now: `gpus = "auto"` keeps off those GPUs (pure)."""
    out: dict[str, dict[int, Claim]] = {}
    for inst in instances:
        spec = inst.running_spec or inst.spec
        launch = spec.launch
        if not isinstance(launch, ClusterLaunch) or launch.node != ANYWHERE or not spec.gpus:
            continue
        if inst.state not in HOLDING or inst.node is None:
            continue
        for gpu in spec.gpus:
            out.setdefault(inst.node, {})[gpu] = Claim(inst.id, str(spec.source), launch.share_gpus, 0)
    return out


def bind(engine: Any, runner: Any) -> None:
    nodes = runner.nodes
    runner.pinned_elsewhere = lambda iid, gpus, share: pinned_nodes(engine.catalog, iid, gpus, share)

    def reachable(_message: dict[str, Any]) -> None:
        # Instances backing off only because the cluster was unreachable start at once.
        for inst in engine.instances.values():
            if inst.state == State.BACKOFF and inst.unavailable_waits:
                inst.start("the cluster is reachable again")

    runner.client.subscribe("connected", reachable)
    nodes.is_live = engine.run_is_live
    nodes.on_reaped = lambda iid, token, stopped: engine.bus.publish(
        "reaped", {"instance": iid, "run": token, "stopped": stopped}
    )
    nodes.on_gpus_changed = lambda: engine.request_reload("cluster nodes' GPUs changed")
    nodes.rules = StrayRules.from_settings(engine.settings)
    nodes.publish = engine.bus.publish
    nodes.sample_interval = engine.settings.gpu_sample_interval
    engine.node_facts = lambda: nodes.facts(occupied(engine.instances.values()))
    engine.services.prestart.append(nodes.gate)
