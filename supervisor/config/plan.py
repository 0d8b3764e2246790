"""Desired versus actual, as a pure function: what to remove, replace, update and add.

*Stop first, start later*: an instance that is being started waits for every stopping
instance whose old GPUs or port it shares (its "gates"), so GPU memory and ports are free
before the replacement needs them. Instances that share nothing proceed concurrently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from supervisor.config.desired import InstanceSpec


@dataclass
class Plan:
    remove: list[str] = field(default_factory=list)  # stop, then forget
    replace: list[str] = field(default_factory=list)  # launch changed: stop, start with the new spec
    update: list[str] = field(default_factory=list)  # policies or the plan's live part: apply in place
    add: list[str] = field(default_factory=list)  # new: start
    unchanged: list[str] = field(default_factory=list)
    gates: dict[str, set[str]] = field(default_factory=dict)  # starting id -> stopping ids to await

    @property
    def empty(self) -> bool:
        return not (self.remove or self.replace or self.update or self.add)


def _resources(spec: InstanceSpec) -> set[tuple[str, int]]:
    ports = ([spec.port] if spec.port else []) + [port for _, port in spec.extra_ports]
    return {("gpu", g) for g in spec.gpus} | {("port", p) for p in ports}


def plan(desired: Mapping[str, InstanceSpec], actual: Mapping[str, InstanceSpec]) -> Plan:
    result = Plan()
    for iid in sorted(actual):
        if iid not in desired:
            result.remove.append(iid)
    for iid in sorted(desired):
        new, old = desired[iid], actual.get(iid)
        if old is None:
            result.add.append(iid)
        elif new.launch_hash != old.launch_hash:
            result.replace.append(iid)
        elif (
            new.policy_hash != old.policy_hash
            or new.source != old.source
            or new.launch.live != old.launch.live
        ):
            # A changed live part (Triton's model list) is applied to the running server too.
            result.update.append(iid)
        else:
            result.unchanged.append(iid)

    stopping = {iid: _resources(actual[iid]) for iid in result.remove + result.replace}
    for iid in result.add + result.replace:
        needs = _resources(desired[iid])
        gates = {other for other, held in stopping.items() if other != iid and held & needs}
        if gates:
            result.gates[iid] = gates
    return result
