"""One GPU as GET /api/v1/gpus shows it (the original API's fields, then ours), from a sample.

Shared by this machine's GPUs (gpu_tracker) and a cluster node's (cluster.nodes), so both
read the same to every client.
"""

from __future__ import annotations

from typing import Any

from supervisor.adapters.gpu.model import GpuDevice, GpuSnapshot

#: No `node` key at all: outside cluster mode the answer stays exactly the original's shape.
NO_NODE = object()


def gpu_info(d: GpuDevice, snap: GpuSnapshot, owners: dict[int, str], node: Any = NO_NODE) -> dict[str, Any]:
    return {
        "id": d.index,
        **({} if node is NO_NODE else {"node": node}),  # cluster mode: None is this machine
        "memory_usage": round(d.memory_used_percent, 2) if d.memory_used_percent is not None else None,
        "power_draw": d.power_draw_w,
        "processes": [
            {
                "pid": p.pid,
                "name": p.name or "N/A",
                "gpu_memory_usage": p.used_memory_mib,
                "instance_id": owners.get(p.pid),
                "type": p.kind,
            }
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
        "sampled_at": snap.sampled_at.isoformat() if snap.sampled_at else None,
        "source": snap.source,
        "simulated": snap.simulated,
        "errors": dict(d.errors),
    }
