"""Which instance may hold which GPU: existence checks, exclusivity, and `gpus = "auto"`.

Pure: the GPU facts come in as data (from the last NVML sample), decisions go out as data.

* A declared GPU must exist, when anything is known about GPUs (a laptop without a driver
  checks nothing, so the demo still runs).
* An instance holds its GPUs alone unless it and every other instance on the GPU set
  `share_gpus = true` (the old tool allowed one model per GPU, and users rely on it).
* `gpus = "auto"` picks, for each instance, the GPUs with the most memory available: free
  memory minus what the other declared instances placed there will still need
  (`min_free_memory_mb` minus what their processes already use). A placement is sticky: an
  instance keeps its GPUs across its restarts and the supervisor's, and while nothing is known
  about the GPUs (a driver that stopped answering, a cluster out of reach): lack of
  information never moves or drops a model that is placed.
* In cluster mode, `gpus = "auto"` without `node` chooses a node too (`place_on_nodes`): the
  node whose best GPUs have the most memory available. Sticky as well, until that node leaves
  the cluster; then the instance is placed again elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class PortRangeExhausted(Exception):
    """Every port of the automatic range is taken."""


class PlacementError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Claim:
    instance: str
    file: str
    share: bool
    need_mib: int


@dataclass(frozen=True)
class GpuFacts:
    known: frozenset[int] | None  # None: no GPU source, nothing can be checked
    free_mib: Mapping[int, int | None] = field(default_factory=dict)
    used_by: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # instance -> gpu -> MiB
    reason: str | None = None  # why nothing is known

    @classmethod
    def unknown(cls, reason: str) -> GpuFacts:
        return cls(None, {}, {}, reason)


NO_FACTS = GpuFacts.unknown("no GPU information")


@dataclass(frozen=True)
class ClusterFacts:
    """What the cluster's node agents last reported: the facts of every labelled node."""

    nodes: Mapping[str, GpuFacts] = field(default_factory=dict)  # label -> its GPUs
    reason: str | None = None  # None: the nodes have reported; else why nothing is known
    #: GPUs that runs placed by Ray (declarations without `node`) hold now: label -> GPU -> claim.
    occupied: Mapping[str, Mapping[int, Claim]] = field(default_factory=dict)

    def of(self, label: str) -> GpuFacts:
        facts = self.nodes.get(label)
        if facts is None:
            why = self.reason or "it is not in the cluster"
            return GpuFacts.unknown(f"node {label} has not reported its GPUs ({why})")
        return facts


NO_CLUSTER = ClusterFacts(reason="no cluster connection")


#: What a claim holds: GPU g of this machine (g), or "label:g" for GPU g of a cluster node.
ClaimKey = int | str


class GpuClaims:
    """The GPUs claimed so far while settling the catalog (first come, first served)."""

    def __init__(self) -> None:
        self.by_gpu: dict[ClaimKey, list[Claim]] = {}

    def blocking(self, gpus: tuple[ClaimKey, ...], share: bool) -> tuple[ClaimKey, Claim] | None:
        for gpu in gpus:
            for claim in self.by_gpu.get(gpu, []):
                if not (share and claim.share):
                    return gpu, claim
        return None

    def add(self, gpus: tuple[ClaimKey, ...], claim: Claim) -> None:
        for gpu in gpus:
            self.by_gpu.setdefault(gpu, []).append(claim)

    def still_needed(self, gpu: int, facts: GpuFacts) -> int:
        return sum(
            max(0, c.need_mib - facts.used_by.get(c.instance, {}).get(gpu, 0))
            for c in self.by_gpu.get(gpu, [])
        )

    def on_node(self, label: str, occupied: Mapping[int, Claim] | None = None) -> GpuClaims:
        """The claims on node `label` (keys "label:g") by GPU index, plus what runs there now."""
        prefix = f"{label}:"
        out = GpuClaims()
        out.by_gpu = {
            int(str(k)[len(prefix) :]): list(c) for k, c in self.by_gpu.items() if str(k).startswith(prefix)
        }
        for gpu, claim in (occupied or {}).items():
            if all(c.instance != claim.instance for c in out.by_gpu.get(gpu, [])):
                out.by_gpu.setdefault(gpu, []).append(claim)
        return out


def check_exists(gpus: tuple[int, ...], facts: GpuFacts) -> None:
    if facts.known is None:
        return
    missing = [g for g in gpus if g not in facts.known]
    if missing:
        have = ", ".join(str(g) for g in sorted(facts.known)) or "none"
        raise PlacementError(
            f"GPU {', '.join(map(str, missing))} does not exist on this machine (GPUs: {have})"
        )


def place(
    count: int,
    need_mib: int,
    share: bool,
    facts: GpuFacts,
    claims: GpuClaims,
    sticky: tuple[int, ...] | None = None,
) -> tuple[int, ...]:
    """The GPUs for one `gpus = "auto"` instance; raises PlacementError saying why none fit."""
    if _keeps(sticky, count, share, facts, claims):
        assert sticky is not None
        return sticky
    if facts.known is None:
        raise PlacementError(
            f'gpus = "auto" needs to know the GPUs, and {facts.reason or "nothing is known"}'
        )
    available, notes = _room(need_mib, share, facts, claims)
    if len(available) < count:
        raise PlacementError(
            f"cannot place: needs {_wanted(count, need_mib)}; " + ("; ".join(notes) or "no GPU")
        )
    return _best(available, count)


def place_on_nodes(
    count: int,
    need_mib: int,
    share: bool,
    cluster: ClusterFacts,
    claims: GpuClaims,
    sticky: tuple[str, tuple[int, ...]] | None = None,
) -> tuple[str, tuple[int, ...]]:
    """The node and GPUs for one `gpus = "auto"` instance without `node` (claims keyed "label:g").

    The node chosen is the one whose `count` best GPUs leave the most memory on the tightest
    of them (ties: the first label). A sticky placement stays while its node is in the
    cluster, or while nothing is known of the nodes at all."""
    if sticky is not None:
        label, gpus = sticky
        there = cluster.reason is not None or label in cluster.nodes  # nothing known, or still in the cluster
        if there and _keeps(
            gpus, count, share, cluster.of(label), claims.on_node(label, cluster.occupied.get(label))
        ):
            return sticky
    if cluster.reason is not None:
        raise PlacementError(f'gpus = "auto" needs to know the nodes\' GPUs, and {cluster.reason}')
    best: tuple[int, str, tuple[int, ...]] | None = None
    notes = []
    for label in sorted(cluster.nodes):
        facts = cluster.nodes[label]
        if facts.known is None:
            notes.append(f"{label}: {facts.reason or 'GPUs unknown'}")
            continue
        available, why = _room(need_mib, share, facts, claims.on_node(label, cluster.occupied.get(label)))
        if len(available) < count:
            notes.append(f"{label}: " + ("; ".join(why) or "no GPU"))
            continue
        tightest = sorted(available, key=lambda item: (-item[0], item[1]))[count - 1][0]
        if best is None or tightest > best[0]:
            best = (tightest, label, _best(available, count))
    if best is None:
        raise PlacementError(
            f"cannot place on any node: needs {_wanted(count, need_mib)}; "
            + (" | ".join(notes) or "no node has reported GPUs")
        )
    return best[1], best[2]


def _keeps(
    sticky: tuple[int, ...] | None, count: int, share: bool, facts: GpuFacts, claims: GpuClaims
) -> bool:
    """A placement stays where it is if its GPUs still exist (or nothing is known) and are free."""
    if not sticky or len(sticky) != count or claims.blocking(sticky, share) is not None:
        return False
    return facts.known is None or all(g in facts.known for g in sticky)


def _room(
    need_mib: int, share: bool, facts: GpuFacts, claims: GpuClaims
) -> tuple[list[tuple[int, int]], list[str]]:
    """(MiB available, GPU) for every GPU an instance needing `need_mib` fits on, and why not the rest."""
    assert facts.known is not None
    available: list[tuple[int, int]] = []
    notes = []
    for gpu in sorted(facts.known):
        held = claims.blocking((gpu,), share)
        if held is not None:
            notes.append(f"GPU {gpu}: held by {held[1].instance}")
            continue
        free = facts.free_mib.get(gpu)
        if free is None:
            notes.append(f"GPU {gpu}: free memory unknown")
            continue
        left = free - claims.still_needed(gpu, facts)
        if left < need_mib:
            notes.append(f"GPU {gpu}: {left} MiB available")
            continue
        available.append((left, gpu))
    return available, notes


def _best(available: list[tuple[int, int]], count: int) -> tuple[int, ...]:
    chosen = sorted(available, key=lambda item: (-item[0], item[1]))[:count]
    return tuple(sorted(gpu for _, gpu in chosen))


def _wanted(count: int, need_mib: int) -> str:
    return f"{count} GPU(s)" + (f" with {need_mib} MiB free" if need_mib else "")
