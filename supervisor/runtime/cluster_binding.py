"""What the cluster pieces need to know of the engine (cluster mode only).

The engine knows its runs and its catalog; the Ray runner and its node view need some of that
(`ClusterBinding`, registered in `supervisor.wiring`), and the engine asks the nodes' facts
with the GPUs Ray-placed runs hold now (`occupied`). Pure functions apart from the binding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from supervisor.config.cluster_launch import ANYWHERE, ClusterLaunch
from supervisor.core.placement import Claim
from supervisor.core.states import State

if TYPE_CHECKING:
    from supervisor.config.desired import Catalog
    from supervisor.runtime.engine import Engine
    from supervisor.runtime.instance import Instance


def pinned_nodes(catalog: Catalog, instance_id: str, gpus: tuple[int, ...], share: bool) -> list[str]:
    """Nodes where another enabled declaration pinned to that node names one of `gpus`: an
    instance placed anywhere keeps off them, so it never takes a pinned model's GPU (pure)."""
    out = set()
    for iid, spec in catalog.instances.items():
        launch = spec.launch
        if iid == instance_id or not spec.enabled or not isinstance(launch, ClusterLaunch):
            continue
        if launch.node == ANYWHERE:
            continue
        if set(gpus) & set(spec.gpus) and not (share and launch.share_gpus):
            out.add(launch.node)
    return sorted(out)


#: States in which a run holds its GPUs on its node.
HOLDING = frozenset({State.STARTING, State.RUNNING, State.STOPPING})


def occupied(instances: Iterable[Instance]) -> dict[str, dict[int, Claim]]:
    """Node label -> GPU -> the run Ray placed there (a declaration without `node`, with GPUs)
    that holds it now: `gpus = "auto"` keeps off those GPUs (pure)."""
    out: dict[str, dict[int, Claim]] = {}
    for inst in instances:
        spec = inst.effective_spec
        launch = spec.launch
        if not isinstance(launch, ClusterLaunch) or launch.node != ANYWHERE or not spec.gpus:
            continue
        if inst.state not in HOLDING or inst.node is None:
            continue
        for gpu in spec.gpus:
            out.setdefault(inst.node, {})[gpu] = Claim(inst.id, str(spec.source), launch.share_gpus, 0)
    return out


class ClusterBinding:
    """The engine as cluster mode's runner and node view need it (`ClusterOwner`): registered
    with `RayRunner.connect` in `supervisor.wiring`, so engine.py needs no cluster details."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def run_is_live(self, token: str, instance_id: str) -> bool:
        return self._engine.run_is_live(token, instance_id)

    def run_reaped(self, instance_id: str, token: str, stopped: dict[str, list[int]]) -> None:
        self._engine.bus.publish("reaped", {"instance": instance_id, "run": token, "stopped": stopped})

    def nodes_changed(self) -> None:
        self._engine.request_reload("cluster nodes' GPUs changed")

    def pinned_nodes(self, instance_id: str, gpus: tuple[int, ...], share: bool) -> list[str]:
        return pinned_nodes(self._engine.catalog, instance_id, gpus, share)

    def cluster_reachable(self) -> None:
        # Instances backing off only because the cluster was unreachable start at once.
        for inst in self._engine.instances.values():
            if inst.state == State.BACKOFF and inst.unavailable_waits:
                inst.start("the cluster is reachable again")
