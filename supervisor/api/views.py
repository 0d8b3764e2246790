"""Engine objects as API bodies (plain dicts matching `schemas`)."""

from __future__ import annotations

from typing import Any

from ..instance import Instance
from ..states import State

#: The old tool had four states; its clients may parse `status` as that enum.
COMPAT_STATUS = {
    State.STOPPED: "STOPPED",
    State.STARTING: "STARTING",
    State.RUNNING: "RUNNING",
    State.BACKOFF: "ERROR",
    State.STOPPING: "STOPPED",
    State.EXITED: "STOPPED",
    State.FATAL: "ERROR",
}


def instance_info(inst: Instance, siblings: list[Instance]) -> dict[str, Any]:
    """The old tool's ModelInstanceInfo, plus `state`, `gpu_ids`, `reason`, `last_error`."""
    snap = inst.snapshot()
    active = sorted({g for s in siblings for g in s.spec.gpus})
    last = inst.history[-1].at.isoformat() if inst.history else snap["created_at"]
    return {
        "instance_id": inst.id,
        "model_name": inst.spec.model,
        "model_type": inst.spec.backend,
        "active_gpu_ids": active,
        "total_instances": len(siblings),
        "status": COMPAT_STATUS[inst.state],
        "pid": snap["pid"],
        "port": snap["port"],
        "created_at": snap["created_at"],
        "updated_at": last,
        "state": snap["state"],
        "gpu_ids": snap["gpus"],
        "reason": snap["reason"],
        "last_error": snap["last_error"],
    }


def status_item(inst: Instance, gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    snap = inst.snapshot()
    gpu = gpu or {}
    return {
        "model_name": snap["model"],
        "model_type": snap["backend"],
        "gpu_id": snap["gpus"][0] if snap["gpus"] else None,
        "instance_id": snap["id"],
        "gpu_ids": snap["gpus"],
        "status": COMPAT_STATUS[inst.state],
        "state": snap["state"],
        "desired": snap["desired"],
        "pid": snap["pid"],
        "port": snap["port"],
        "restarts": snap["restarts"],
        "consecutive_failures": snap["consecutive_failures"],
        "uptime": snap["uptime"],
        "state_since": snap["state_since"],
        "reason": snap["reason"],
        "last_error": snap["last_error"],
        "last_exit": snap["last_exit"],
        "last_exit_code": snap["last_exit_code"],
        "gpu_memory_mib": gpu.get("memory_mib"),
        "gpu_processes": gpu.get("processes", []),
    }
