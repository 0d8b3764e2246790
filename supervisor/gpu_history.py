"""The last minutes of GPU samples, for the dashboard's plots (issue 13).

A bounded ring buffer fed by the GPU tracker after each sample: per GPU its memory used,
utilisation and power over `window` seconds. Pure and small: a sample is a handful of
numbers per GPU, so 15 minutes at one sample a second is about 900 rows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

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

    def add(self, at: float, points: tuple[GpuPoint, ...]) -> None:
        if self._samples and at <= self._samples[-1][0]:
            return  # the same sample seen twice (or a clock step back): keep the series monotonic
        self._samples.append((at, points))

    def __len__(self) -> int:
        return len(self._samples)

    def as_dict(self, now: float, seconds: float | None = None) -> dict[str, Any]:
        """Columns per GPU (times in UNIX seconds) for the samples of the last `seconds`."""
        span = min(self.window, seconds) if seconds is not None else self.window
        since = now - span
        series: dict[int, dict[str, Any]] = {}
        for at, points in self._samples:
            if at < since:
                continue
            for p in points:
                s = series.setdefault(p.gpu, {"id": p.gpu, "memory_total": p.memory_total, "t": [], "memory_used": [],
                                              "utilization": [], "power_draw": []})
                s["t"].append(round(at, 3))
                s["memory_used"].append(p.memory_used)
                s["utilization"].append(p.utilization)
                s["power_draw"].append(p.power_draw)
                if p.memory_total is not None:
                    s["memory_total"] = p.memory_total
        return {"window_seconds": span, "now": round(now, 3), "gpus": [series[g] for g in sorted(series)]}
