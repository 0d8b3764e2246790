"""The launch plan of an instance that runs in the Ray cluster (pure: no Ray, no I/O).

A `ClusterLaunch` is a `ProcessLaunch` (same argv, env, prepare and fail_patterns, so every
process backend kind works unchanged) routed to the "ray" runner, plus where it may run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from supervisor.core.launch import ProcessLaunch

#: The label every node joined by `model-supervisor node` carries (a Ray node label).
LABEL_KEY = "msup-node"
#: `node = "local"`: on the supervisor's own machine, through the process runner (no Ray).
LOCAL = "local"
#: A cluster instance without `node`: any node with its GPUs free.
ANYWHERE = "*"


def gpu_resource(gpu: int) -> str:
    """One custom resource per physical GPU of a node: how declared GPU ids are honoured
    exactly (Ray's own GPU ids cannot be requested, ray-project/ray#27078)."""
    return f"msup_gpu_{gpu}"


#: Amount of a GPU's resource held by an instance with `share_gpus = true`: any number of
#: sharers fit on one GPU, and an exclusive instance (which needs all of it) fits beside none.
SHARE_AMOUNT = 0.001


@dataclass(frozen=True, slots=True)
class ClusterLaunch(ProcessLaunch):
    node: str = ANYWHERE  # a label, or ANYWHERE
    gpus: tuple[int, ...] = ()
    share_gpus: bool = False
    #: Checked free on the node before the backend starts (there, not on this machine).
    ports: tuple[int, ...] = ()
    runner: ClassVar[str] = "ray"

    def fingerprint(self) -> dict[str, Any]:
        return {**ProcessLaunch.fingerprint(self), "node": self.node, "share_gpus": self.share_gpus}

    def describe(self) -> str:
        where = "any node" if self.node == ANYWHERE else f"node {self.node}"
        return f"{ProcessLaunch.describe(self)} (on {where})"

    def resources(self) -> dict[str, float]:
        amount = SHARE_AMOUNT if self.share_gpus else 1.0
        return {gpu_resource(g): amount for g in self.gpus}


def in_cluster(
    plan: ProcessLaunch, node: str, gpus: tuple[int, ...], share: bool, ports: tuple[int, ...] = ()
) -> ClusterLaunch:
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    return ClusterLaunch(**fields, node=node, gpus=gpus, share_gpus=share, ports=ports)
