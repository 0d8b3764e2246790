"""What the supervisor knows about the cluster's nodes, from their agents' samples.

Every `interval` the driver sends one sample per node (`supervisor.cluster.agent`): its GPUs
(the same GPU source code as this machine's) and the processes of every run of this scope by
run mark. From them, on the event loop and without waiting for anything:

* ownership: a GPU process belongs to the instance whose live run's mark it carries; the rest
  are strays of that node (with the node in /api/v1/gpus/strays and the `stray` events),
  handled by the same rules as this machine's (strays.py): reported, allow-listed, or killed
  by the node's agent once `strays_kill_after` has passed where the policy says "kill". A
  process with one of our run marks is never a stray: it is a run (live, or the reaper's);
* the GPU-gated restart per node (`gate`): a run on a node restarts on the same GPUs only
  once its previous processes are off them and their memory is free (`gpu_release_timeout`);
* the reaper: a run seen on a node in `REAP_AFTER` samples in a row and at least `REAP_MIN_AGE`
  seconds, that no instance owns (a lost node's backend that outlived its actor, an actor
  killed behind our back), is stopped there by its mark, and logged.

What only the supervisor's runtime can answer ("is this run one of ours now?") or act on
(a reload when a node's GPUs change, a `reaped` event) comes from its `RunOwner`, registered
with `connect` where everything is wired (`supervisor.wiring`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from supervisor.adapters.gpu.api_view import gpu_info
from supervisor.adapters.gpu.history import GpuHistory, points_of, sample_event
from supervisor.adapters.gpu.model import GpuDevice, GpuProcess, GpuSnapshot
from supervisor.adapters.gpu.release import still_held
from supervisor.cluster.client import ClusterClient, ClusterError, ClusterUnreachable
from supervisor.config.cluster_launch import ClusterLaunch
from supervisor.config.desired import InstanceSpec
from supervisor.core.placement import Claim, ClusterFacts, GpuFacts
from supervisor.core.strays import Stray, StrayRules

log = logging.getLogger(__name__)

#: A run nobody owns is reaped once seen in this many samples in a row, spanning at least
#: REAP_MIN_AGE seconds: a launch in flight or an adoption under way is never mistaken for one.
REAP_AFTER = 3
REAP_MIN_AGE = 3.0


@dataclass(frozen=True, slots=True)
class NodeRun:
    instance: str
    pids: tuple[int, ...]


@dataclass(slots=True)
class NodeSample:
    node_id: str
    label: str
    host: str | None
    snapshot: GpuSnapshot
    runs: dict[str, NodeRun]  # token -> the run's processes on this node
    error: str | None = None
    users: dict[int, str | None] = field(default_factory=dict)  # GPU pid -> its user on the node
    agent_pid: int | None = None  # on the node's host
    labelled: bool = True  # it carries our node label (else `label` is its short id: nothing is pinned there)
    #: Settled once per round of samples (views read these, never recompute them):
    owners: dict[int, str] = field(default_factory=dict)  # GPU pid -> instance id (live runs only)
    used_by: dict[str, dict[int, int]] = field(default_factory=dict)  # instance -> GPU -> MiB


@dataclass
class _LastRun:
    node: str
    pids: set[int]
    memory_mib: dict[int, int] = field(default_factory=dict)


def snapshot_from_wire(sample: dict[str, Any]) -> GpuSnapshot:
    devices = tuple(
        GpuDevice(
            index=d["index"],
            uuid=d.get("uuid"),
            name=d.get("name"),
            memory_total_mib=d.get("memory_total_mib"),
            memory_used_mib=d.get("memory_used_mib"),
            power_draw_w=d.get("power_draw_w"),
            power_limit_w=d.get("power_limit_w"),
            utilization_percent=d.get("utilization_percent"),
            memory_utilization_percent=d.get("memory_utilization_percent"),
            temperature_c=d.get("temperature_c"),
            processes=tuple(
                GpuProcess(p["pid"], p.get("name"), p.get("used_memory_mib"), p.get("kind", "compute"))
                for p in d.get("processes", ())
            ),
            errors=dict(d.get("errors") or {}),
        )
        for d in sample.get("devices", ())
    )
    sampled = sample.get("sampled_at")
    return GpuSnapshot(
        source=sample.get("source", "none"),
        devices=devices,
        reason=sample.get("reason"),
        sampled_at=datetime.fromtimestamp(sampled, UTC) if sampled else None,
        sample_seconds=sample.get("sample_seconds"),
        simulated=bool(sample.get("simulated")),
        driver_version=sample.get("driver_version"),
    )


def unowned_runs(
    runs: dict[str, NodeRun],
    is_live: Callable[[str, str], bool],
    seen: dict[str, tuple[int, float]],
    now: float,
) -> list[str]:
    """Tokens of runs to reap now; updates `seen` (token -> samples in a row, first seen)."""
    due = []
    for token in list(seen):
        if token not in runs:
            del seen[token]
    for token, run in runs.items():
        if is_live(token, run.instance):
            seen.pop(token, None)
            continue
        count, first = seen.get(token, (0, now))
        seen[token] = (count + 1, first)
        if count + 1 >= REAP_AFTER and now - first >= REAP_MIN_AGE:
            due.append(token)
    return due


class Publish(Protocol):
    """The event bus's `publish`."""

    def __call__(self, kind: str, data: dict[str, Any], /, keep: bool = True) -> Any: ...


class RunOwner(Protocol):
    """What the node view asks of the supervisor that owns the runs."""

    def run_is_live(self, token: str, instance_id: str) -> bool:
        """Is run `token` (seen on a node, marked as `instance_id`'s) one of ours now?"""

    def run_reaped(self, instance_id: str, token: str, stopped: dict[str, list[int]]) -> None:
        """The reaper stopped what a run no instance owns left on the nodes."""

    def nodes_changed(self) -> None:
        """A node appeared, went, or reports other GPUs: settle the declarations again."""


class _NoOwner:
    """Until an owner connects: every run is live (nothing is reaped), nothing is settled."""

    def run_is_live(self, token: str, instance_id: str) -> bool:
        return True

    def run_reaped(self, instance_id: str, token: str, stopped: dict[str, list[int]]) -> None:
        pass

    def nodes_changed(self) -> None:
        pass


def _publish_nothing(kind: str, data: dict[str, Any], keep: bool = True) -> None:
    return None


class ClusterNodes:
    def __init__(
        self,
        client: ClusterClient,
        release_timeout: float = 30.0,
        *,
        rules: StrayRules | None = None,
        publish: Publish = _publish_nothing,
        sample_interval: float = 1.0,
    ) -> None:
        self.client = client
        self.release_timeout = release_timeout
        self.samples: dict[str, NodeSample] = {}  # label -> latest sample
        self.reported = False  # a round of samples arrived since the driver (re)connected
        self.version = 0  # bumped with every round of samples (views cache per version)
        self._owner: RunOwner = _NoOwner()
        self.last_run: dict[str, _LastRun] = {}
        self._seen: dict[str, dict[str, tuple[int, float]]] = {}  # label -> token -> (count, first seen)
        self._reaping: set[str] = set()
        #: The stray rules of this machine (without them strays are only reported).
        self.rules = rules or StrayRules()
        self.publish = publish
        self.stray_list: dict[tuple[str, int, int], Stray] = {}  # (label, gpu, pid) -> stray
        self.sample_interval = sample_interval  # gpu_sample_interval: sizes the histories
        self.history: dict[str, GpuHistory] = {}  # label -> its GPUs' last 15 minutes
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        client.subscribe("nodes", self._on_nodes)
        client.subscribe("unreachable", self._on_unreachable)

    def connect(self, owner: RunOwner) -> None:
        """Register the supervisor that owns the runs (once, where everything is wired)."""
        self._owner = owner

    # -- samples -------------------------------------------------------------------------------
    def _on_unreachable(self, _message: dict[str, Any]) -> None:
        self.samples = {}  # nothing known about the nodes until the driver is back
        self.reported = False
        self.version += 1

    def _on_nodes(self, message: dict[str, Any]) -> None:
        samples: dict[str, NodeSample] = {}
        for raw in message.get("samples", ()):
            label = raw.get("label") or str(raw.get("node_id", ""))[:12]
            labelled = bool(raw.get("labelled"))
            if raw.get("error"):
                old = self.samples.get(label)
                snap = old.snapshot if old is not None else snapshot_from_wire({"reason": raw["error"]})
                samples[label] = NodeSample(
                    raw.get("node_id", ""), label, None, snap, {}, raw["error"], labelled=labelled
                )
                continue
            runs = {
                token: NodeRun(r.get("instance", ""), tuple(r.get("pids", ())))
                for token, r in (raw.get("runs") or {}).items()
            }
            users = {int(pid): user for pid, user in (raw.get("users") or {}).items()}
            samples[label] = NodeSample(
                raw["node_id"],
                label,
                raw.get("host"),
                snapshot_from_wire(raw),
                runs,
                users=users,
                agent_pid=raw.get("agent_pid"),
                labelled=labelled,
            )
        for sample in samples.values():
            self._settle(sample)
        before = self.gpu_sets(), self.reported
        self.samples = samples
        self.reported = True
        self.version += 1
        if (self.gpu_sets(), self.reported) != before:
            self._owner.nodes_changed()
        self._remember_runs()
        self._find_unowned()
        self._track_strays()
        self._record()
        self._changed.set()
        self._changed = asyncio.Event()

    def _settle(self, sample: NodeSample) -> None:
        """Who owns each GPU process of the sample (runs that are live), and their memory."""
        for token, run in sample.runs.items():
            if self._owner.run_is_live(token, run.instance):
                for pid in run.pids:
                    sample.owners[pid] = run.instance
        for d in sample.snapshot.devices:
            for p in d.processes:
                owner = sample.owners.get(p.pid)
                if owner is not None and p.used_memory_mib:
                    per_gpu = sample.used_by.setdefault(owner, {})
                    per_gpu[d.index] = per_gpu.get(d.index, 0) + p.used_memory_mib

    @staticmethod
    def owners(sample: NodeSample) -> dict[int, str]:
        """GPU pid on that node -> instance id, for runs that were live at the sample."""
        return sample.owners

    def _remember_runs(self) -> None:
        for label, sample in self.samples.items():
            on_gpus: dict[str, set[int]] = {}
            for d in sample.snapshot.devices:
                for p in d.processes:
                    owner = sample.owners.get(p.pid)
                    if owner is not None:
                        on_gpus.setdefault(owner, set()).add(p.pid)
            for owner, pids in on_gpus.items():  # kept after the run ends: the gate needs it then
                self.last_run[owner] = _LastRun(label, pids, dict(sample.used_by.get(owner, {})))

    # -- the reaper ------------------------------------------------------------------------------
    def _find_unowned(self) -> None:
        now = time.monotonic()
        self._seen = {label: seen for label, seen in self._seen.items() if label in self.samples}
        for label, sample in self.samples.items():
            due = unowned_runs(sample.runs, self._owner.run_is_live, self._seen.setdefault(label, {}), now)
            for token in due:
                if token not in self._reaping:
                    self._reaping.add(token)
                    run = sample.runs[token]
                    self._spawn(self._reap(label, token, run))

    async def _reap(self, label: str, token: str, run: NodeRun) -> None:
        log.warning(
            "node %s: run %s of %s (pids %s) belongs to no instance any more: stopping it",
            label,
            token,
            run.instance or "?",
            list(run.pids),
        )
        stopped: dict[str, list[int]]  # node label -> the pids stopped there
        try:
            stopped = await self.client.call("reap", token=token, signum=15, timeout=10.0, wait=0)
        except (ClusterUnreachable, ClusterError) as exc:
            log.warning("node %s: could not reap run %s: %s", label, token, exc)
            stopped = {}
        finally:
            self._reaping.discard(token)
        self._owner.run_reaped(run.instance, token, stopped)

    async def reap(self, token: str, signum: int, timeout: float) -> dict[str, list[int]]:
        """Stop run `token` wherever an agent finds it (a lost run, from the runner)."""
        try:
            stopped: dict[str, list[int]] = await self.client.call(
                "reap", token=token, signum=signum, timeout=timeout, wait=0
            )
            return stopped
        except (ClusterUnreachable, ClusterError) as exc:
            log.warning("could not reap run %s on the nodes: %s", token, exc)
            return {}

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- GPU-gated restart ------------------------------------------------------------------------
    async def gate(self, inst: object, spec: InstanceSpec) -> None:
        """Before a start of a cluster run on GPUs: wait until its previous run on that node let
        go of them (a prestart check, like the local GPU tracker's)."""
        if not isinstance(spec.launch, ClusterLaunch) or not spec.gpus:
            return
        last = self.last_run.pop(spec.id, None)
        if last is None or last.node not in self.samples:
            return
        began = time.monotonic()
        deadline = began + self.release_timeout
        while True:
            sample = self.samples.get(last.node)
            if sample is None:
                return  # the node is gone: nothing there to wait for
            holding = still_held(sample.snapshot, spec.gpus, last.pids, last.memory_mib)
            if not holding:
                if time.monotonic() - began > 0.01:
                    log.info(
                        "%s: GPU memory of the previous run on node %s released after %.2f s",
                        spec.id,
                        last.node,
                        time.monotonic() - began,
                    )
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "%s: starting anyway after %g s; still held on node %s: %s",
                    spec.id,
                    self.release_timeout,
                    last.node,
                    "; ".join(holding),
                )
                return
            log.info(
                "%s: waiting for node %s to release its GPUs (%s)", spec.id, last.node, "; ".join(holding)
            )
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    # -- views ------------------------------------------------------------------------------------
    def gpu_infos(self) -> list[dict[str, Any]]:
        """The remote nodes' GPUs, in /api/v1/gpus' shape, each with its node."""
        return [
            gpu_info(d, sample.snapshot, self.owners(sample), label)
            for label, sample in sorted(self.samples.items())
            for d in sample.snapshot.devices
        ]

    def facts(self, occupied: dict[str, dict[int, Claim]] | None = None) -> ClusterFacts:
        """What `gpus = "auto"` may know of the labelled nodes (placement.py), from their last
        samples; `occupied`: the GPUs runs placed by Ray hold now, by node label."""
        if not self.reported:
            reason = "no sample from the nodes yet" if self.client.up else "the cluster is unreachable"
            return ClusterFacts(reason=reason, occupied=occupied or {})
        nodes = {}
        for label, sample in self.samples.items():
            if not sample.labelled:
                continue
            snap = sample.snapshot
            if not snap.devices and snap.source == "none":
                nodes[label] = GpuFacts.unknown(snap.reason or "it has no GPU source")
            else:
                nodes[label] = GpuFacts(
                    frozenset(d.index for d in snap.devices),
                    {d.index: d.memory_free_mib for d in snap.devices},
                    sample.used_by,
                )
        return ClusterFacts(nodes, occupied=occupied or {})

    def gpu_sets(self) -> dict[str, frozenset[int]]:
        """Label -> the GPU indices it reports: when this changes, `gpus = "auto"` settles again."""
        return {label: frozenset(d.index for d in s.snapshot.devices) for label, s in self.samples.items()}

    def memory_by_instance(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for sample in self.samples.values():
            for owner, per_gpu in sample.used_by.items():
                out[owner] = out.get(owner, 0) + sum(per_gpu.values())
        return out

    def strays(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": s.pid,
                "gpu": s.gpu,
                "node": label,
                "name": s.name,
                "user": s.user,
                "gpu_memory_usage": s.memory_mib,
                "policy": self.rules.policy(s.gpu),
                "action": s.action,
            }
            for (label, _, _), s in sorted(self.stray_list.items())
        ]

    def _record(self) -> None:
        """Each node's history and its `gpu` event (not kept in the event history)."""
        self.history = {label: h for label, h in self.history.items() if label in self.samples}
        for label, sample in self.samples.items():
            snap = sample.snapshot
            if sample.error is not None or not snap.devices or snap.sampled_at is None:
                continue
            history = self.history.setdefault(label, GpuHistory(self.sample_interval))
            if history.add(snap.sampled_at.timestamp(), points_of(snap)):  # a new sample, not the last again
                strays: dict[int, int] = {}
                for node, gpu, _pid in self.stray_list:
                    if node == label:
                        strays[gpu] = strays.get(gpu, 0) + 1
                self.publish("gpu", sample_event(snap, strays, label), keep=False)

    # -- strays -----------------------------------------------------------------------------------
    def _track_strays(self) -> None:
        now = time.monotonic()
        current: dict[tuple[str, int, int], Any] = {}
        for label, sample in self.samples.items():
            if sample.error is not None:  # its runs are unknown: keep what it had, judge nothing new
                current.update({k: None for k in self.stray_list if k[0] == label})
                continue
            ours = {pid for run in sample.runs.values() for pid in run.pids}
            for d in sample.snapshot.devices:
                for p in d.processes:
                    if p.pid not in sample.owners and p.pid not in ours:
                        current[(label, d.index, p.pid)] = (p, sample.users.get(p.pid))
        for key in [k for k in self.stray_list if k not in current]:
            del self.stray_list[key]
        for key, seen in current.items():
            if key in self.stray_list or seen is None:
                continue
            label, gpu, pid = key
            p, user = seen
            stray = Stray(pid, gpu, p.name, user, p.used_memory_mib, now)
            allowed = self.rules.allowed(p.name, user)
            stray.action = "allowed" if allowed else "reported"
            self.stray_list[key] = stray
            log.warning(
                "node %s: stray GPU process: pid %s (%s, user %s) on GPU %s uses %s MiB and belongs to no "
                "instance%s",
                label,
                pid,
                p.name or "?",
                user or "?",
                gpu,
                p.used_memory_mib,
                " (allow-listed)" if allowed else "",
            )
            self.publish(
                "stray",
                {
                    "pid": pid,
                    "gpu": gpu,
                    "node": label,
                    "name": p.name,
                    "user": user,
                    "memory_mib": p.used_memory_mib,
                    "allowed": allowed,
                },
            )
        for (label, _, pid), stray in list(self.stray_list.items()):
            if self.samples[label].error is None and self.rules.due(stray, now):
                for (
                    other_label,
                    _,
                    other_pid,
                ), other in self.stray_list.items():  # one process, several GPUs
                    if (other_label, other_pid) == (label, pid) and other.action == "reported":
                        other.action = "killing"
                self._spawn(self._kill_stray(label, stray))

    async def _kill_stray(self, label: str, stray: Stray) -> None:
        log.warning(
            'node %s: killing stray GPU process pid %s (%s) on GPU %s (strays = "kill")',
            label,
            stray.pid,
            stray.name,
            stray.gpu,
        )
        try:
            answer = await self.kill(label, stray.pid, force=False)
        except (LookupError, ClusterUnreachable, ClusterError) as exc:
            answer = {"failed": str(exc)}
        action = (
            "killed"
            if "how" in answer or answer.get("missing")
            else "kill refused"
            if "refused" in answer
            else "kill failed"
        )
        if action != "killed":
            log.error(
                "node %s: killing stray pid %s failed: %s",
                label,
                stray.pid,
                answer.get("refused") or answer.get("failed"),
            )
        for (other_label, _, other_pid), other in self.stray_list.items():
            if (other_label, other_pid) == (label, stray.pid):
                other.action = action
        if "how" in answer:
            self.publish(
                "stray_killed", {"pid": stray.pid, "gpu": stray.gpu, "node": label, "how": answer["how"]}
            )

    async def kill(self, label: str, pid: int, force: bool, grace: float = 5.0) -> dict[str, Any]:
        """Kill `pid` on node `label`, judged by its agent (NodeAgent.kill). LookupError: no such
        node; ClusterUnreachable / ClusterError: the node could not be asked."""
        sample = self.samples.get(label)
        if sample is None:
            known = ", ".join(sorted(self.samples)) or "none"
            raise LookupError(f"no node {label!r} in the cluster (nodes: {known})")
        answer: dict[str, Any] = await self.client.call(
            "kill", node_id=sample.node_id, pid=pid, grace=grace, force=force
        )
        return answer

    def nodes(self) -> list[dict[str, Any]]:
        """One line per node for /healthz: its label, host, GPU source, and what is wrong."""
        return [
            {
                "node": s.label,
                "node_id": s.node_id,
                "host": s.host,
                "gpu_source": s.snapshot.source,
                "gpus": len(s.snapshot.devices),
                "runs": len(s.runs),
                "error": s.error or s.snapshot.reason,
            }
            for s in (self.samples[k] for k in sorted(self.samples))
        ]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
