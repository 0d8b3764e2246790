"""Has a previous run let go of its GPUs? (pure: one snapshot in, reasons out)

Used before a restart on the same GPUs, on this machine (gpu_tracker) and on a cluster node
(cluster.nodes): restarting into memory a dead worker still holds is the OOM loop to avoid.
"""

from __future__ import annotations

from supervisor.adapters.gpu.model import GpuSnapshot


def still_held(
    snap: GpuSnapshot, gpus: tuple[int, ...], pids: set[int], memory_mib: dict[int, int]
) -> list[str]:
    """Why the GPUs are not free yet ([] once they are): a process of the previous run is
    still listed on one, or less memory is free than the previous run held there."""
    held = []
    for gpu in gpus:
        device = snap.device(gpu)
        if device is None:
            continue
        lingering = [p for p in device.processes if p.pid in pids]
        if lingering:
            held.append(
                f"GPU {gpu}: pid " + ", ".join(f"{p.pid} ({p.used_memory_mib} MiB)" for p in lingering)
            )
            continue
        need = memory_mib.get(gpu, 0)
        free = device.memory_free_mib
        if need and free is not None and free < need:
            others = ", ".join(
                f"pid {p.pid} {p.name or '?'} {p.used_memory_mib} MiB" for p in device.processes
            )
            held.append(
                f"GPU {gpu}: {free} MiB free of the {need} MiB the previous run held"
                + (f" (in use: {others})" if others else "")
            )
    return held
