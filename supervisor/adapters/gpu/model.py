"""What the supervisor knows about its GPUs at one moment: plain, immutable data.

Nothing here touches NVML or the file system, so every consumer (placement checks, the API,
metrics) can be tested with hand-built snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

#: A pid listed by NVML as both a compute and a graphics process is reported once, as both.
ProcessKind = Literal["compute", "graphics", "compute+graphics"]
SourceName = Literal["nvml", "simulated", "none"]


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int  # host pid namespace: NVML is not pid-namespace aware
    name: str | None
    used_memory_mib: int | None  # None: NVML reports the value as not available
    kind: ProcessKind

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "used_memory_mib": self.used_memory_mib,
            "kind": self.kind,
        }


@dataclass(frozen=True, slots=True)
class GpuDevice:
    index: int
    uuid: str | None
    name: str | None
    memory_total_mib: int | None
    memory_used_mib: int | None
    power_draw_w: float | None
    power_limit_w: float | None
    utilization_percent: float | None
    memory_utilization_percent: float | None
    temperature_c: float | None
    processes: tuple[GpuProcess, ...] = ()
    #: field name -> why it is missing ("NotSupported", "GpuIsLost", ...). A field that is None
    #: without an entry here was simply not reported. Treat as read-only.
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def memory_used_percent(self) -> float | None:
        if self.memory_used_mib is None or not self.memory_total_mib:
            return None
        return self.memory_used_mib / self.memory_total_mib * 100.0

    @property
    def memory_free_mib(self) -> int | None:
        if self.memory_used_mib is None or self.memory_total_mib is None:
            return None
        return max(0, self.memory_total_mib - self.memory_used_mib)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total_mib": self.memory_total_mib,
            "memory_used_mib": self.memory_used_mib,
            "memory_free_mib": self.memory_free_mib,
            "memory_used_percent": self.memory_used_percent,
            "power_draw_w": self.power_draw_w,
            "power_limit_w": self.power_limit_w,
            "utilization_percent": self.utilization_percent,
            "memory_utilization_percent": self.memory_utilization_percent,
            "temperature_c": self.temperature_c,
            "processes": [p.as_dict() for p in self.processes],
            "errors": dict(self.errors),
        }


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    source: SourceName | str
    devices: tuple[GpuDevice, ...]
    reason: str | None  # why there are no devices, or why the data is degraded
    sampled_at: datetime | None  # when the sample started (UTC, aware); None: nothing sampled yet
    sample_seconds: float | None  # CPU time the sample cost the sampler thread
    simulated: bool
    driver_version: str | None = None

    def device(self, index: int) -> GpuDevice | None:
        for dev in self.devices:
            if dev.index == index:
                return dev
        return None

    def pids(self, index: int | None = None) -> frozenset[int]:
        """Every pid using a GPU (or GPU `index` only)."""
        return frozenset(
            proc.pid for dev in self.devices if index is None or dev.index == index for proc in dev.processes
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            # Always present, so simulated numbers can never pass for real ones in any output.
            "simulated": self.simulated,
            "reason": self.reason,
            "sampled_at": self.sampled_at.isoformat() if self.sampled_at else None,
            "sample_seconds": self.sample_seconds,
            "driver_version": self.driver_version,
            "devices": [dev.as_dict() for dev in self.devices],
        }
