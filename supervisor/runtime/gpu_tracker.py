"""GPU truth joined with the engine: ownership of GPU processes, strays, GPU-gated restarts.

The GPU monitor samples in its own thread. After each sample, this tracker (on the event
loop) scans /proc in a thread and attributes every GPU process to the instance whose process
tree (or container) holds it; the rest are strays, reported and, where the policy says so,
killed. API handlers and metrics read the results and never wait for NVML or a scan.

Before an instance is (re)started on its GPUs, `gate` waits until the processes of its
previous run are gone from them and their memory is free again, up to
`gpu_release_timeout`: restarting into memory a dead worker still holds is the OOM loop
this exists to prevent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from supervisor.adapters import kill
from supervisor.adapters.gpu.api_view import NO_NODE, gpu_info
from supervisor.adapters.gpu.history import GpuHistory, points_of, sample_event
from supervisor.adapters.gpu.model import GpuSnapshot
from supervisor.adapters.gpu.monitor import GpuMonitor, GpuMonitorStopped
from supervisor.adapters.gpu.release import still_held
from supervisor.adapters.gpu.sources import GpuUnavailable, NoGpuSource, node_file, open_source
from supervisor.adapters.kill import owners_of
from supervisor.adapters.procscan import ProcInfo, scan, user_of
from supervisor.config.desired import InstanceSpec
from supervisor.config.settings import Settings
from supervisor.core.placement import NO_FACTS, GpuFacts
from supervisor.core.strays import Stray, StrayRules
from supervisor.runtime.engine import Engine
from supervisor.runtime.instance import Instance

if TYPE_CHECKING:  # cluster mode only
    from supervisor.cluster.nodes import ClusterNodes

log = logging.getLogger(__name__)

FIRST_SAMPLE_TIMEOUT = 10.0

NOT_STARTED = GpuSnapshot(
    source="none",
    devices=(),
    reason="GPU monitoring has not started",
    sampled_at=None,
    sample_seconds=None,
    simulated=False,
)


@dataclass
class _LastRun:
    """What an instance's processes held, per GPU, when last seen."""

    pids: set[int]
    memory_mib: dict[int, int]


class GpuTracker:
    """Registered with the engine (`Engine.use_gpus`) where everything is wired."""

    def __init__(self, engine: Engine, settings: Settings, nodes: ClusterNodes | None = None) -> None:
        self.engine = engine
        self.settings = settings
        #: Cluster mode: the node agents' view (their GPUs, owners, strays); None otherwise.
        self.cluster_nodes = nodes
        self.monitor: GpuMonitor | None = None
        self.owners: dict[int, str] = {}  # GPU pid -> instance id, as of the last attribution
        self.attributed: GpuSnapshot = NOT_STARTED  # the sample `owners` belongs to
        self.local_version = 0  # bumped after every attribution
        self.stray_list: dict[tuple[int, int], Stray] = {}  # (gpu, pid) -> stray
        self.last_run: dict[str, _LastRun] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.history = GpuHistory(settings.gpu_sample_interval)
        self._warned: set[str] = set()  # unknown-GPU warnings already logged

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            source, reason = await asyncio.to_thread(
                open_source, self.settings.gpu_source, node_file(self.settings.gpu_simulated_file, "local")
            )
        except GpuUnavailable as exc:
            log.error("GPU monitoring is off: %s", exc.reason)
            source, reason = NoGpuSource(exc.reason), exc.reason
        if reason:
            log.info("GPU monitoring: %s", reason)
        # Nothing to sample without a source: one sample, then none (no wake-ups for nothing).
        interval = self.settings.gpu_sample_interval if source.name != "none" else 24 * 3600.0
        self.monitor = GpuMonitor(source, interval)
        self.monitor.add_listener(self._on_sample_thread)
        await asyncio.to_thread(self.monitor.start)
        if source.name != "none":  # placement and GPU checks need a first sample
            try:
                await self.monitor.wait_for_sample(timeout=FIRST_SAMPLE_TIMEOUT)
            except (TimeoutError, GpuMonitorStopped):
                log.warning("no GPU sample within %s s; GPU checks wait for one", FIRST_SAMPLE_TIMEOUT)
        self._spawn(self._log_unknown_gpus())

    async def stop(self) -> None:
        if self.monitor is not None:
            await asyncio.to_thread(self.monitor.stop)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def snapshot(self) -> GpuSnapshot:
        return self.monitor.snapshot() if self.monitor is not None else NOT_STARTED

    def attributed_view(self) -> GpuSnapshot:
        """The sample the ownership data belongs to (views never mix two samples)."""
        return self.attributed if self.attributed is not NOT_STARTED else self.snapshot()

    def facts(self) -> GpuFacts:
        """What placement may know about the GPUs (see `supervisor.core.placement`)."""
        if self.monitor is None:
            return NO_FACTS  # not started: placement knows nothing yet
        snap = self.attributed_view()
        if snap.source == "none" or snap.sampled_at is None:
            return GpuFacts.unknown(snap.reason or "no GPU sample yet")
        used: dict[str, dict[int, int]] = {}
        for d in snap.devices:
            for p in d.processes:
                owner = self.owners.get(p.pid)
                if owner is not None and p.used_memory_mib:
                    per_gpu = used.setdefault(owner, {})
                    per_gpu[d.index] = per_gpu.get(d.index, 0) + p.used_memory_mib
        return GpuFacts(
            frozenset(d.index for d in snap.devices), {d.index: d.memory_free_mib for d in snap.devices}, used
        )

    # -- attribution and strays --------------------------------------------------------------------
    def _on_sample_thread(self, snapshot: GpuSnapshot) -> None:
        """Runs in the sampler thread: hand over to the loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_sample, snapshot)

    def _on_sample(self, snapshot: GpuSnapshot) -> None:
        if self._pending:
            return  # one attribution at a time; the next sample catches up
        self._pending = True
        self._spawn(self._attribute(snapshot))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attribute(self, snapshot: GpuSnapshot) -> None:
        try:
            pids = snapshot.pids()
            roots = {iid: inst.pid for iid, inst in self.engine.instances.items() if inst.pid is not None}
            runs = {inst.run_token: iid for iid, inst in self.engine.instances.items() if inst.run_token}
            table, owners = (
                await asyncio.to_thread(_scan_owners, pids, roots, self.engine.scope, runs)
                if pids
                else ({}, {})
            )
            self.owners = owners
            self.attributed = snapshot
            self.local_version += 1
            self._remember_runs(snapshot)
            await self._handle_strays(snapshot, table)
            self._publish_sample(snapshot)
            self._record(snapshot)
        except Exception:
            log.exception("GPU attribution failed")
        finally:
            self._pending = False

    def _publish_sample(self, snapshot: GpuSnapshot) -> None:
        """A summary of the sample for event-stream clients (the dashboard), not kept in history."""
        if not snapshot.devices:
            return
        strays = Counter(gpu for gpu, _pid in self.stray_list)
        here = NO_NODE if self.cluster_nodes is None else None
        self.engine.bus.publish("gpu", sample_event(snapshot, strays, here), keep=False)

    def _record(self, snapshot: GpuSnapshot) -> None:
        if snapshot.devices and snapshot.sampled_at is not None:
            self.history.add(snapshot.sampled_at.timestamp(), points_of(snapshot))

    # -- GPUs that are not known -------------------------------------------------------------------
    def unknown_gpu_warnings(self) -> list[str]:
        """Instances declared on GPUs nobody can vouch for (issue 13). With no GPU source they
        still run (a laptop demo needs that), but status, /healthz, the dashboard and the log
        say so. With a source, a GPU that does not exist is a declaration error instead."""
        if self.attributed_view().source != "none":  # a source that has not sampled yet knows soon enough
            return []
        facts = self.facts()
        on: dict[int, list[str]] = {}
        for iid, inst in self.engine.instances.items():
            for gpu in inst.spec.gpus:
                on.setdefault(gpu, []).append(iid)
        why = f" ({facts.reason})" if facts.reason and facts.reason != "no GPU source" else ""
        return [
            f"GPU {gpu} is not known: no GPU source{why}; {', '.join(sorted(on[gpu]))} runs there unchecked"
            for gpu in sorted(on)
        ]

    async def _log_unknown_gpus(self) -> None:
        """Log each unknown-GPU warning once, at start-up and after every reconcile."""
        sub = self.engine.bus.open()
        try:
            while True:
                for warning in self.unknown_gpu_warnings():
                    if warning not in self._warned:
                        self._warned.add(warning)
                        log.warning("%s", warning)
                while (await sub.get()).type != "reconcile":
                    pass
        finally:
            sub.close()

    def _remember_runs(self, snapshot: GpuSnapshot) -> None:
        seen: dict[str, _LastRun] = {}
        for d in snapshot.devices:
            for p in d.processes:
                owner = self.owners.get(p.pid)
                if owner is not None:
                    run = seen.setdefault(owner, _LastRun(set(), {}))
                    run.pids.add(p.pid)
                    run.memory_mib[d.index] = run.memory_mib.get(d.index, 0) + (p.used_memory_mib or 0)
        self.last_run.update(seen)  # kept after the run ends: the gate needs it then

    async def _handle_strays(self, snapshot: GpuSnapshot, table: dict[int, ProcInfo]) -> None:
        s = self.settings
        now = time.monotonic()
        current = {
            (d.index, p.pid): p for d in snapshot.devices for p in d.processes if p.pid not in self.owners
        }
        for key in list(self.stray_list):
            if key not in current:
                del self.stray_list[key]
        new = [key for key in current if key not in self.stray_list]
        users = await asyncio.to_thread(_users, [pid for _, pid in new]) if new else {}
        rules = StrayRules.from_settings(s)
        for gpu, pid in new:
            p = current[(gpu, pid)]
            stray = Stray(pid, gpu, p.name, users.get(pid), p.used_memory_mib, now)
            allowed = rules.allowed(p.name, stray.user)
            stray.action = "allowed" if allowed else "reported"
            self.stray_list[(gpu, pid)] = stray
            log.warning(
                "stray GPU process: pid %s (%s, user %s) on GPU %s uses %s MiB and belongs to no instance%s",
                pid,
                p.name or "?",
                stray.user or "?",
                gpu,
                p.used_memory_mib,
                " (allow-listed)" if allowed else "",
            )
            self.engine.bus.publish(
                "stray",
                {
                    "pid": pid,
                    "gpu": gpu,
                    "name": p.name,
                    "user": stray.user,
                    "memory_mib": p.used_memory_mib,
                    "allowed": bool(allowed),
                },
            )
        for stray in self.stray_list.values():
            if rules.due(stray, now):
                for other in self.stray_list.values():  # one process may hold several GPUs
                    if other.pid == stray.pid and other.action == "reported":
                        other.action = "killing"
                self._spawn(self._kill_stray(stray, table))

    async def _kill_stray(self, stray: Stray, table: dict[int, ProcInfo]) -> None:
        facts = kill.facts_for(stray.pid, table, {}, {stray.pid})
        verdict = kill.judge(facts, force=False)
        if not verdict.allowed:
            log.error("not killing stray pid %s: %s", stray.pid, verdict.reason)
            stray.action = "kill refused"
            return
        log.warning(
            'killing stray GPU process pid %s (%s) on GPU %s (strays = "kill")',
            stray.pid,
            stray.name,
            stray.gpu,
        )
        try:
            how = await kill.terminate(stray.pid, 5.0)
            for other in self.stray_list.values():
                if other.pid == stray.pid:
                    other.action = "killed"
            self.engine.bus.publish("stray_killed", {"pid": stray.pid, "gpu": stray.gpu, "how": how})
        except (ProcessLookupError, PermissionError) as exc:
            stray.action = "kill failed"
            log.error("killing stray pid %s failed: %s", stray.pid, exc)

    # -- GPU-gated restart ---------------------------------------------------------------------------
    async def gate(self, inst: Instance, spec: InstanceSpec) -> None:
        """Before a start on GPUs: wait until the previous run's processes and memory are gone."""
        last = self.last_run.pop(spec.id, None)
        if last is None or not spec.gpus or self.monitor is None:
            return
        timeout = self.settings.gpu_release_timeout
        deadline = time.monotonic() + timeout
        snap = self.snapshot()
        began = time.monotonic()
        while True:
            holding = still_held(snap, spec.gpus, last.pids, last.memory_mib)
            if not holding:
                waited = time.monotonic() - began
                if waited > 0.01:
                    log.info("%s: GPU memory of the previous run released after %.2f s", spec.id, waited)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "%s: starting anyway after %g s; still held on its GPUs: %s",
                    spec.id,
                    timeout,
                    "; ".join(holding),
                )
                return
            log.info(
                "%s: waiting for GPU memory of the previous run to be released (%s)",
                spec.id,
                "; ".join(holding),
            )
            try:
                snap = await self.monitor.wait_for_sample(after=snap.sampled_at, timeout=remaining)
            except (TimeoutError, GpuMonitorStopped):
                continue

    # -- views ---------------------------------------------------------------------------------------
    def gpu_pids(self) -> set[int]:
        return set(self.snapshot().pids())

    @property
    def version(self) -> tuple[int, int]:
        """Changes with every attribution, here or (cluster mode) on a node: views cache per version."""
        nodes = self.cluster_nodes
        return self.local_version, nodes.version if nodes is not None else 0

    def gpu_infos(self) -> list[dict[str, Any]]:
        snap = self.attributed_view()
        nodes = self.cluster_nodes
        here = [gpu_info(d, snap, self.owners, None if nodes is not None else NO_NODE) for d in snap.devices]
        return here + (nodes.gpu_infos() if nodes is not None else [])

    def instance_gpu(self, instance_id: str) -> dict[str, Any]:
        """The GPU processes of one instance and the memory they use (MiB)."""
        procs = []
        total = 0
        known = False
        nodes = self.cluster_nodes
        views: list[tuple[str | None, GpuSnapshot, dict[int, str]]] = [
            (None, self.attributed_view(), self.owners)
        ]
        if nodes is not None:  # a cluster run's processes are on its node
            views += [
                (label, sample.snapshot, nodes.owners(sample))
                for label, sample in sorted(nodes.samples.items())
            ]
        for node, snap, owners in views:
            for d in snap.devices:
                for p in d.processes:
                    if owners.get(p.pid) == instance_id:
                        procs.append(
                            {
                                "pid": p.pid,
                                "name": p.name or "N/A",
                                "gpu_memory_usage": p.used_memory_mib,
                                "instance_id": instance_id,
                                "type": p.kind,
                                "gpu": d.index,
                                **({"node": node} if nodes is not None else {}),
                            }
                        )
                        if p.used_memory_mib is not None:
                            total += p.used_memory_mib
                            known = True
        return {"memory_mib": total if known else (0 if not procs else None), "processes": procs}

    def memory_by_instance(self) -> dict[str, int]:
        """MiB of GPU memory each instance's processes use, from one pass over the sample
        (and, in cluster mode, over each node's)."""
        out: dict[str, int] = {}
        for d in self.attributed_view().devices:
            for p in d.processes:
                owner = self.owners.get(p.pid)
                if owner is not None and p.used_memory_mib:
                    out[owner] = out.get(owner, 0) + p.used_memory_mib
        nodes = self.cluster_nodes
        if nodes is not None:
            for iid, mib in nodes.memory_by_instance().items():
                out[iid] = out.get(iid, 0) + mib
        return out

    def history_dict(self, now: float, seconds: float | None) -> dict[str, Any]:
        """GET /api/v1/gpus/history: this machine's GPUs, then (cluster mode) every node's."""
        nodes = self.cluster_nodes
        out = self.history.as_dict(now, seconds, NO_NODE if nodes is None else None)
        if nodes is not None:
            for label, history in sorted(nodes.history.items()):
                out["gpus"] += history.as_dict(now, seconds, label)["gpus"]
        return out

    def strays(self) -> list[dict[str, Any]]:
        rules = StrayRules.from_settings(self.settings)
        nodes = self.cluster_nodes
        here = [
            {
                "pid": s.pid,
                "gpu": s.gpu,
                "name": s.name,
                "user": s.user,
                "gpu_memory_usage": s.memory_mib,
                "policy": rules.policy(s.gpu),
                "action": s.action,
                **({"node": None} if nodes is not None else {}),
            }
            for s in sorted(self.stray_list.values(), key=lambda s: (s.gpu, s.pid))
        ]
        return here + (nodes.strays() if nodes is not None else [])


def _users(pids: list[int]) -> dict[int, str | None]:
    return {pid: user_of(pid) for pid in pids}


def _scan_owners(
    pids: frozenset[int], roots: dict[str, int], scope: str = "", runs: dict[str, str] | None = None
) -> tuple[dict[int, ProcInfo], dict[int, str]]:
    """In a thread: the process table, and which instance owns each GPU pid: by ancestry and
    process group, or by the run mark a worker carries after it left both (setsid, orphaned)."""
    table = scan(marks=True)
    owners = owners_of(pids, table, roots)
    for pid in pids:
        mark = table[pid].mark if pid in table else None
        if pid not in owners and mark is not None and mark.scope == scope and runs and mark.token in runs:
            owners[pid] = runs[mark.token]
    return table, owners
