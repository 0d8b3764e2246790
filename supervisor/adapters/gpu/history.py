"""The last minutes of GPU samples, for the dashboard's plots (issue 13).

A bounded ring buffer fed by the GPU tracker after each sample: per GPU its memory used,
utilisation and power over `window` seconds. In cluster mode every node has its own, fed by
its agent's samples (supervisor.cluster.nodes). Pure and small: a sample is a handful of
numbers per GPU, so 15 minutes at one sample a second is about 900 rows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from supervisor.adapters.gpu.api_view import NO_NODE
from supervisor.adapters.gpu.model import GpuSnapshot

WINDOW_SECONDS = 900.0  # 15 minutes, as nvitop shows
MAX_SAMPLES = 20_000  # a bound whatever the sample interval


@dataclass(frozen=True, slots=True)
class GpuPoint:
    gpu: int
    memory_used: int | None
    memory_total: int | None
    utilization: float | None
    power_draw: float | None


class GpuHistory:
    def __init__(self, sample_interval: float, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        size = min(MAX_SAMPLES, int(window / max(sample_interval, 0.01)) + 2)
        self._samples: deque[tuple[float, tuple[GpuPoint, ...]]] = deque(maxlen=size)

    def add(self, at: float, points: tuple[GpuPoint, ...]) -> bool:
        """Add a sample; False if it is not newer than the last one (seen twice, or a clock
        step back): the series stays monotonic."""
        if self._samples and at <= self._samples[-1][0]:
            return False
        self._samples.append((at, points))
        return True

    def __len__(self) -> int:
        return len(self._samples)

    def as_dict(self, now: float, seconds: float | None = None, node: Any = NO_NODE) -> dict[str, Any]:
        """Columns per GPU (times in UNIX seconds) for the samples of the last `seconds`; with
        `node` (cluster mode), each GPU says which node it is on (None: this machine)."""
        span = min(self.window, seconds) if seconds is not None else self.window
        since = now - span
        series: dict[int, dict[str, Any]] = {}
        for at, points in self._samples:
            if at < since:
                continue
            for p in points:
                s = series.setdefault(
                    p.gpu,
                    {
                        "id": p.gpu,
                        **({} if node is NO_NODE else {"node": node}),
                        "memory_total": p.memory_total,
                        "t": [],
                        "memory_used": [],
                        "utilization": [],
                        "power_draw": [],
                    },
                )
                s["t"].append(round(at, 3))
                s["memory_used"].append(p.memory_used)
                s["utilization"].append(p.utilization)
                s["power_draw"].append(p.power_draw)
                if p.memory_total is not None:
                    s["memory_total"] = p.memory_total
        return {"window_seconds": span, "now": round(now, 3), "gpus": [series[g] for g in sorted(series)]}


def points_of(snapshot: GpuSnapshot) -> tuple[GpuPoint, ...]:
    return tuple(
        GpuPoint(d.index, d.memory_used_mib, d.memory_total_mib, d.utilization_percent, d.power_draw_w)
        for d in snapshot.devices
    )


def sample_event(snapshot: GpuSnapshot, strays: dict[int, int], node: Any = NO_NODE) -> dict[str, Any]:
    """The `gpu` event of one sample: a summary for event-stream clients (the dashboard)."""
    return {
        "sampled_at": snapshot.sampled_at.isoformat() if snapshot.sampled_at else None,
        **({} if node is NO_NODE else {"node": node}),
        "simulated": snapshot.simulated,
        "gpus": [
            {
                "id": d.index,
                "memory_used": d.memory_used_mib,
                "memory_total": d.memory_total_mib,
                "utilization": d.utilization_percent,
                "power_draw": d.power_draw_w,
                "temperature": d.temperature_c,
                "processes": len(d.processes),
                "strays": strays.get(d.index, 0),
            }
            for d in snapshot.devices
        ],
    }
