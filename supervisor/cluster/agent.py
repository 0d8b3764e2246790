"""The node agent: one actor pinned to every node of the cluster (runs in a Ray worker there).

What the supervisor does for its own machine, the agent does for its node, with the same code:

* `sample`: the node's GPUs through the same GPU source as the supervisor (`gpu.sources`:
  NVML, or a simulated file whose path may hold `{node}`), plus every process of this
  supervisor's scope by run mark (marks.py), so the supervisor can attribute GPU processes
  to instances, find strays, and see runs nobody owns any more;
* `reap`: stops every process that carries the mark of one run (TERM, wait, KILL): what a
  lost run left on the node (a backend in its own session survives its actor's node being
  removed, and keeps its GPU memory);
* `kill`: one process of the node by pid, judged there by the same rules as
  DELETE /api/v1/processes on the supervisor's machine (kill.judge: a GPU process or one of
  our runs; never the agent, its ancestors (the raylet) or its group; others only by force);
* `tail`, `read_from`, `size`: an instance's log file, which lives on the node.

Owned by the driver (not detached): it dies with it and the next driver starts a new one, so
an agent can never outlive its supervisor. Plain Python: the driver wraps it with `ray.remote`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from supervisor.adapters import kill as killing
from supervisor.adapters.gpu.sources import GpuSource, GpuUnavailable, NoGpuSource, node_file, open_source
from supervisor.adapters.logfiles import LogFile
from supervisor.adapters.procscan import ProcessTable, marked, scan, user_of
from supervisor.adapters.runners.process import stop_processes

log = logging.getLogger(__name__)


class NodeAgent:
    def __init__(self, scope: str, label: str, gpu_source: str = "auto", gpu_file: str | None = None) -> None:
        import ray  # only here: the module stays importable without Ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.scope = scope
        self.label = label
        self.host = socket.gethostname()
        self._kind = gpu_source
        self._file = node_file(gpu_file, label)
        self._source: GpuSource | None = None
        self._reason: str | None = None
        self._lock = threading.Lock()  # one sampler at a time: NVML handles are not shared
        self._table = ProcessTable()
        self._gpu_pids: set[int] = set()  # in the last sample

    # -- sampling --------------------------------------------------------------------------
    async def sample(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._sample)

    def _sample(self) -> dict[str, Any]:
        with self._lock:
            source = self._source
            if source is None:
                try:
                    source, self._reason = open_source(self._kind, self._file)
                    self._source = source
                except GpuUnavailable as exc:  # e.g. no simulated file for this node (yet): next time
                    source, self._reason = NoGpuSource(exc.reason), exc.reason
            began = time.monotonic()
            devices = source.sample()
            seconds = time.monotonic() - began
        runs: dict[str, dict[str, Any]] = {}
        table = scan(marks=True)
        for info in table.values():
            mark = info.mark
            if mark is not None and mark.scope == self.scope and not info.zombie:
                run = runs.setdefault(mark.token, {"instance": mark.instance, "pids": []})
                run["pids"].append(info.pid)
        gpu_pids = {p.pid for d in devices for p in d.processes}
        self._gpu_pids = gpu_pids
        return {
            "node_id": self.node_id,
            "label": self.label,
            "host": self.host,
            "agent_pid": os.getpid(),
            "source": source.name,
            "reason": source.reason or self._reason,
            "sampled_at": time.time(),
            "sample_seconds": seconds,
            "simulated": source.name == "simulated",
            "driver_version": source.driver_version,
            "devices": [d.as_dict() for d in devices],
            "runs": runs,
            "users": {str(pid): user_of(pid) for pid in gpu_pids if pid in table},
        }

    # -- reaping ---------------------------------------------------------------------------
    async def reap(self, token: str, signum: int, timeout: float) -> list[int]:
        """Stop every process of run `token` on this node; returns their pids."""
        table = await self._table.snapshot()
        victims = marked(table, self.scope, token)
        victims.discard(os.getpid())
        if victims:
            log.warning("reaping %d process(es) of lost run %s: %s", len(victims), token, sorted(victims))
            await stop_processes(table, victims, signum, timeout)
        return sorted(victims)

    async def kill(self, pid: int, grace: float, force: bool = False) -> dict[str, Any]:
        """Kill process `pid` of this node if kill.judge allows it: {"how", "reason", "instance"},
        or {"refused": why}, or {"missing": True} when there is no such process."""
        table = await self._table.snapshot()
        if pid > 1 and pid not in table:
            return {"missing": True}
        target = table.get(pid)
        mark = target.mark if target is not None else None
        owner = mark.instance if mark is not None and mark.scope == self.scope else None
        facts = killing.Facts(
            pid=pid,
            self_pid=os.getpid(),
            self_pgid=os.getpgrp(),
            target_pgid=target.pgid if target is not None else None,
            ancestors=killing.ancestors(os.getpid(), table),
            owner=owner,
            on_gpu=pid in self._gpu_pids,
        )
        verdict = killing.judge(facts, force)
        if not verdict.allowed:
            return {"refused": verdict.reason}
        log.warning("killing pid %s on node %s: %s", pid, self.label, verdict.reason)
        try:
            how = await killing.terminate(pid, grace)
        except ProcessLookupError:
            return {"missing": True}
        except PermissionError:
            return {"refused": "permission denied on the node"}
        return {"how": how, "reason": verdict.reason, "instance": verdict.instance}

    # -- logs ------------------------------------------------------------------------------
    def tail(self, path: str, lines: int) -> list[str]:
        return LogFile(Path(path)).tail(lines)

    def size(self, path: str) -> int:
        return LogFile(Path(path)).size()

    def read_from(self, path: str, offset: int, limit: int = 1 << 16) -> dict[str, Any]:
        data, new_offset, inode = LogFile(Path(path)).read_from(offset, limit)
        return {"data": base64.b64encode(data).decode(), "offset": new_offset, "inode": inode}

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
