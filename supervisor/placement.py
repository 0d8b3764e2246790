"""Which instance may hold which GPU: existence checks, exclusivity, and `gpus = "auto"`.

Pure: the GPU facts come in as data (from the last NVML sample), decisions go out as data.

* A declared GPU must exist, when anything is known about GPUs (a laptop without a driver
  checks nothing, so the demo still runs).
* An instance holds its GPUs alone unless it and every other instance on the GPU set
  `share_gpus = true` (the old tool allowed one model per GPU, and users rely on it).
* `gpus = "auto"` picks, for each instance, the GPUs with the most memory available: free
  memory minus what the other declared instances placed there will still need
  (`min_free_memory_mb` minus what their processes already use). A placement is sticky: an
  instance keeps its GPUs across its restarts and the supervisor's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class PlacementError(ValueError):
    pass


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


@dataclass(frozen=True, slots=True)
class Claim:
    instance: str
    file: str
    share: bool
    need_mib: int


class GpuClaims:
    """The GPUs claimed so far while settling the catalog (first come, first served)."""

    def __init__(self) -> None:
        self.by_gpu: dict[int, list[Claim]] = {}

    def blocking(self, gpus: tuple[int, ...], share: bool) -> tuple[int, Claim] | None:
        for gpu in gpus:
            for claim in self.by_gpu.get(gpu, []):
                if not (share and claim.share):
                    return gpu, claim
        return None

    def add(self, gpus: tuple[int, ...], claim: Claim) -> None:
        for gpu in gpus:
            self.by_gpu.setdefault(gpu, []).append(claim)

    def still_needed(self, gpu: int, facts: GpuFacts) -> int:
        return sum(max(0, c.need_mib - facts.used_by.get(c.instance, {}).get(gpu, 0)) for c in self.by_gpu.get(gpu, []))


def check_exists(gpus: tuple[int, ...], facts: GpuFacts) -> None:
    if facts.known is None:
        return
    missing = [g for g in gpus if g not in facts.known]
    if missing:
        have = ", ".join(str(g) for g in sorted(facts.known)) or "none"
        raise PlacementError(f"GPU {', '.join(map(str, missing))} does not exist on this machine (GPUs: {have})")


def place(count: int, need_mib: int, share: bool, facts: GpuFacts, claims: GpuClaims,
          sticky: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The GPUs for one `gpus = "auto"` instance; raises PlacementError saying why none fit."""
    if facts.known is None:
        raise PlacementError(f'gpus = "auto" needs to know the GPUs, and {facts.reason or "nothing is known"}')
    if sticky and all(g in facts.known for g in sticky) and len(sticky) == count and claims.blocking(sticky, share) is None:
        return sticky
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
    if len(available) < count:
        wanted = f"{count} GPU(s)" + (f" with {need_mib} MiB free" if need_mib else "")
        raise PlacementError(f"cannot place: needs {wanted}; " + ("; ".join(notes) or "no GPU"))
    chosen = sorted(available, key=lambda item: (-item[0], item[1]))[:count]
    return tuple(sorted(gpu for _, gpu in chosen))
