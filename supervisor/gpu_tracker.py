"""GPU truth joined with the engine: which instance owns which GPU process, and strays.

The GPU monitor samples in its own thread; after each sample this tracker (on the event
loop) scans /proc in a thread and attributes every GPU process to the instance whose process
tree holds it. API handlers and metrics read the results (`gpu_infos`, `instance_gpu`)
and never wait for NVML or a scan.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .engine import Engine
from .gpu.model import GpuSnapshot
from .gpu.monitor import GpuMonitor
from .gpu.sources import GpuUnavailable, NoGpuSource, open_source
from .kill import owner_of
from .procscan import ProcInfo, scan
from .settings import Settings

log = logging.getLogger(__name__)

NOT_STARTED = GpuSnapshot(source="none", devices=(), reason="GPU monitoring has not started", sampled_at=None,
                          sample_seconds=None, simulated=False)


class GpuTracker:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.monitor: GpuMonitor | None = None
        self.owners: dict[int, str] = {}  # GPU pid -> instance id, as of the last attribution
        self.attributed: GpuSnapshot = NOT_STARTED
        self.version = 0  # bumped after every attribution (views cache per version)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            source, reason = await asyncio.to_thread(open_source, self.settings.gpu_source,
                                                     self.settings.gpu_simulated_file)
        except GpuUnavailable as exc:
            log.error("GPU monitoring is off: %s", exc.reason)
            source, reason = NoGpuSource(exc.reason), exc.reason
        if reason:
            log.info("GPU monitoring: %s", reason)
        self.monitor = GpuMonitor(source, self.settings.gpu_sample_interval)
        self.monitor.add_listener(self._on_sample_thread)
        await asyncio.to_thread(self.monitor.start)

    async def stop(self) -> None:
        if self.monitor is not None:
            await asyncio.to_thread(self.monitor.stop)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def snapshot(self) -> GpuSnapshot:
        return self.monitor.snapshot() if self.monitor is not None else NOT_STARTED

    # -- attribution -----------------------------------------------------------------------------
    def _on_sample_thread(self, snapshot: GpuSnapshot) -> None:
        """Runs in the sampler thread: hand over to the loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_sample, snapshot)

    def _on_sample(self, snapshot: GpuSnapshot) -> None:
        if self._pending:
            return  # one attribution at a time; the next sample catches up
        self._pending = True
        self._task = asyncio.ensure_future(self._attribute(snapshot))

    async def _attribute(self, snapshot: GpuSnapshot) -> None:
        try:
            pids = snapshot.pids()
            table: dict[int, ProcInfo] = await asyncio.to_thread(scan) if pids else {}
            roots = {iid: inst.pid for iid, inst in self.engine.instances.items() if inst.pid is not None}
            self.owners = {pid: owner for pid in pids if (owner := owner_of(pid, table, roots)) is not None}
            self.attributed = snapshot
            self.version += 1
        except Exception:
            log.exception("GPU attribution failed")
        finally:
            self._pending = False

    def gpu_pids(self) -> set[int]:
        return set(self.snapshot().pids())

    def owner(self, pid: int) -> str | None:
        return self.owners.get(pid)

    # -- views -------------------------------------------------------------------------------------
    def gpu_infos(self) -> list[dict[str, Any]]:
        snap = self.snapshot()
        sampled = snap.sampled_at.isoformat() if snap.sampled_at else None
        out = []
        for d in snap.devices:
            out.append({
                "id": d.index,
                "memory_usage": round(d.memory_used_percent, 2) if d.memory_used_percent is not None else None,
                "power_draw": d.power_draw_w,
                "processes": [
                    {"pid": p.pid, "name": p.name or "N/A", "gpu_memory_usage": p.used_memory_mib,
                     "instance_id": self.owners.get(p.pid), "type": p.kind}
                    for p in d.processes
                ],
                "uuid": d.uuid,
                "name": d.name,
                "memory_total": d.memory_total_mib,
                "memory_used": d.memory_used_mib,
                "power_limit": d.power_limit_w,
                "utilization": d.utilization_percent,
                "memory_utilization": d.memory_utilization_percent,
                "temperature": d.temperature_c,
                "sampled_at": sampled,
                "source": snap.source,
                "simulated": snap.simulated,
                "errors": dict(d.errors),
            })
        return out

    def instance_gpu(self, instance_id: str) -> dict[str, Any]:
        """The GPU processes of one instance and the memory they use (MiB)."""
        procs = []
        total = 0
        known = False
        for d in self.snapshot().devices:
            for p in d.processes:
                if self.owners.get(p.pid) == instance_id:
                    procs.append({"pid": p.pid, "name": p.name or "N/A", "gpu_memory_usage": p.used_memory_mib,
                                  "instance_id": instance_id, "type": p.kind, "gpu": d.index})
                    if p.used_memory_mib is not None:
                        total += p.used_memory_mib
                        known = True
        return {"memory_mib": total if known else (0 if not procs else None), "processes": procs}

    def strays(self) -> list[dict[str, Any]]:
        out = []
        for d in self.snapshot().devices:
            for p in d.processes:
                if p.pid not in self.owners:
                    out.append({"gpu": d.index, "pid": p.pid, "name": p.name, "gpu_memory_usage": p.used_memory_mib})
        return out
