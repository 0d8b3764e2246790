"""Engine objects as API bodies (plain dicts matching `schemas`)."""

from __future__ import annotations

import json
import time
from typing import Any

from supervisor.core.states import State
from supervisor.runtime.instance import Instance

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
        "node": snap["node"],
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


class StatusCache:
    """The status list as JSON, re-rendering only the instances that changed.

    Each instance's item is kept as a JSON fragment, keyed by the instance's revision and the
    GPU attribution's version; only `uptime`, which moves with the clock, is added per request.
    200 instances cost a string join instead of 200 snapshots and a serialisation (this is
    the hot path of `GET /api/v1/models/status`; see bench/api_bench.py).
    """

    def __init__(self) -> None:
        # instance -> (revision, gpu version, prefix ending in '"uptime": ', ready time or None, whole item)
        self._fragments: dict[Instance, tuple[int, int, str, float | None, str]] = {}

    def render(self, instances: list[Instance], gpus: Any) -> bytes:
        now = time.monotonic()
        version = gpus.version
        fragments = self._fragments
        parts: list[str] = []
        add = parts.append
        for inst in instances:
            cached = fragments.get(inst)
            if cached is None or cached[0] != inst.revision or cached[1] != version:
                cached = self._build(inst, gpus, version)
                fragments[inst] = cached
            ready = cached[3]
            if ready is None:
                add(cached[4])
            else:
                add(cached[2])
                add("%.3f}, " % (now - ready))
        if len(fragments) > 2 * len(instances) + 64:
            live = set(instances)
            self._fragments = {k: v for k, v in fragments.items() if k in live}
        body = "".join(parts)
        return ("[" + body[:-2] + "]").encode() if parts else b"[]"

    @staticmethod
    def _build(inst: Instance, gpus: Any, version: int) -> tuple[int, int, str, float | None, str]:
        item = status_item(inst, gpus.instance_gpu(inst.id))
        del item["uptime"]
        prefix = json.dumps(item)[:-1] + ', "uptime": '
        ready = inst.ready_monotonic if inst.state == State.RUNNING else None
        return (inst.revision, version, prefix, ready, prefix + "null}, ")
