"""The engine: reconciles declared instances against running ones, and the façade over them.

`reload()` reads conf.d/ afresh (in a thread), settles it into a catalog (`desired.resolve`),
diffs that against the instances that exist (`plan.plan`) and sends each instance the intent
it needs. It never changes an instance's state itself. Reloads are serialised; each one is
cheap and idempotent, so callers (watcher, SIGHUP, API writes, periodic resync) just call it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from supervisor.adapters import confd, storage
from supervisor.adapters.logfiles import LocalLog, LogFile
from supervisor.adapters.marks import scope_of
from supervisor.adapters.ports import PortAllocator, describe_holder, port_is_free
from supervisor.adapters.procscan import ProcessTable, marked
from supervisor.adapters.records import RunRecords
from supervisor.adapters.runners.base import LogReader, Runner
from supervisor.adapters.runners.docker import DockerRunner
from supervisor.adapters.runners.process import ProcessRunner, stop_processes
from supervisor.adapters.watcher import ConfWatcher
from supervisor.backends.registry import Registry
from supervisor.config.declarations import ConfigError, ModelSpec
from supervisor.config.desired import Catalog, InstanceSpec, resolve
from supervisor.config.plan import Plan, plan
from supervisor.config.settings import Settings
from supervisor.core.events import EventBus
from supervisor.core.placement import NO_CLUSTER, NO_FACTS, ClusterFacts, GpuFacts
from supervisor.core.states import utcnow
from supervisor.runtime.adoption import Adoption, decide, describe_stale, record_alive
from supervisor.runtime.cluster_binding import occupied
from supervisor.runtime.instance import Instance, InstanceServices, PrestartCheck

if TYPE_CHECKING:  # cluster mode only: its modules are not loaded otherwise
    from supervisor.adapters.runners.ray import RayRunner

log = logging.getLogger(__name__)


class ConfDirMissing(Exception):
    pass


class EditConflict(Exception):
    """An edit of a declaration would clash with another one (a name, a port, a GPU)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors


#: Stores an edit once it is settled: (the catalog it makes, the automatic ports it adds).
EditWriter = Callable[[Catalog, dict[str, int]], Awaitable[None]]


class GpuView(Protocol):
    """What the engine needs of the GPU tracker: facts for placement, a gate before a start."""

    def facts(self) -> GpuFacts: ...

    async def gate(self, inst: Instance, spec: InstanceSpec) -> None: ...


class Engine:
    """Built once, by `supervisor.wiring.build`, which hands it every collaborator."""

    def __init__(
        self,
        settings: Settings,
        runners: Mapping[str, Runner],
        process: ProcessRunner,
        *,
        registry: Registry,
        bus: EventBus,
        table: ProcessTable,
        cluster: RayRunner | None = None,
        prestart: Sequence[PrestartCheck] = (),
        on_reconcile: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.defaults = settings.defaults()
        self.bus = bus
        self.table = table
        state_dir = settings.state_dir
        self.scope = scope_of(state_dir)
        self.process_runner = process
        self.runners = runners
        #: Cluster mode's runner (`cluster = "ray"`): its nodes' GPUs, actors and remote logs.
        self.cluster = cluster
        self.ports = PortAllocator(*settings.port_range, path=state_dir / "ports.json")
        self.work_root = state_dir.absolute() / "work"  # per-instance generated files
        self.services = InstanceServices(
            runners=self.runners,
            bus=self.bus,
            records=RunRecords(state_dir / "run"),
            logs_dir=state_dir / "logs",
            port_holder=self._port_holder,
            give_up_port=self._give_up_port,
            prestart=list(prestart),
        )
        self.catalog = self._load_placements()
        self._gpus: GpuView | None = None
        self.parsed: dict[str, ModelSpec | list[ConfigError]] = {}  # the last read of conf.d/
        self._parse_cache: confd.ParseCache = {}
        self._last_inputs: tuple[dict[str, ModelSpec | list[ConfigError]], object] | None = None
        self.instances: dict[str, Instance] = {}
        self.removing: dict[str, Instance] = {}  # removed from the catalog, still stopping
        self.last_reload: dict[str, Any] | None = None
        self.reload_count = 0
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()  # running ones; a finished task leaves
        self._closing = False
        self.watcher: ConfWatcher | None = None
        #: Run records an earlier supervisor left behind, until the first reload sorts them.
        self._records: dict[str, dict[str, Any]] | None = None
        #: Runs of files that were broken at start-up: adopted once their file is valid again.
        self._deferred: dict[str, dict[str, Any]] = {}
        self.adoption: Adoption | None = None
        #: Called with the duration of every reload (metrics).
        self._on_reconcile = on_reconcile

    def use_gpus(self, gpus: GpuView) -> None:
        """Register the GPU tracker (once, where everything is wired): placement reads its facts
        and every start on GPUs first passes its gate."""
        self._gpus = gpus
        self.services.prestart.append(gpus.gate)

    def gpu_facts(self) -> GpuFacts:
        """What placement may know about this machine's GPUs."""
        return self._gpus.facts() if self._gpus is not None else NO_FACTS

    def node_facts(self) -> ClusterFacts:
        """Cluster mode: the nodes' GPUs as last reported, for `gpus = "auto"`."""
        if self.cluster is None:
            return NO_CLUSTER
        return self.cluster.nodes.facts(occupied(self.instances.values()))

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, watch: bool = False) -> Plan:
        """First load, then (with `watch`) follow conf.d/. A missing conf dir is an error here;
        later it only pauses watching."""
        if not self.settings.conf_dir.is_dir():
            raise ConfDirMissing(f"declaration directory {self.settings.conf_dir} does not exist")
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        await self.process_runner.set_up_containment(self.settings.cgroups != "off")
        self._records = await asyncio.to_thread(self.services.records.read_all)
        # Before anything of ours runs: every marked process and run cgroup of our scope now
        # is an earlier supervisor's (adopted, or a leftover once the first reload decides).
        cgroups = self.process_runner.cgroups
        found = await asyncio.to_thread(cgroups.runs) if cgroups is not None else []
        self.adoption = Adoption(self.scope, await self.table.snapshot(), cgroups, found)
        result = await self.reload("startup")
        if self._records is not None:  # the first reload never got to apply (conf.d unreadable):
            self._sort_records(Catalog(), {str(r.get("source")) for r in self._records.values()})  # keep all
        self.spawn_background(self._rotate_logs(), "log rotation")
        for name, runner in self.runners.items():  # e.g. is there a Docker daemon? (for /healthz)
            self.spawn_background(runner.check(), f"{name} runner check")
        if watch:
            self.watcher = ConfWatcher(self.settings.conf_dir, self.reload, self.settings.resync_interval)
            self.spawn_background(self.watcher.run(), "conf.d watcher")
        return result

    def request_reload(self, reason: str) -> None:
        """Re-read conf.d/ through the watcher's coalescing path (SIGHUP, the API's reload)."""
        if self.watcher is not None:
            self.watcher.request(reason)
        else:
            self.spawn_background(self.reload(reason), f"reload ({reason})")

    def spawn_background(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A named background task whose failure is logged the moment it happens."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(_log_failure)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def containment(self) -> str:
        """How each run's processes are kept together (for /healthz)."""
        return self.process_runner.containment()

    async def shutdown(self, keep_running: bool = False) -> None:
        """Stop every instance concurrently; returns when all their process trees are gone.

        With `keep_running` (an upgrade), leave every run alive and recorded instead: the next
        supervisor on this state dir adopts them, and the models never reload."""
        self._closing = True
        for task in list(self._background):
            task.cancel()
        if keep_running:
            async with self._lock:
                # A run spawned but not yet recorded would be a leftover for the next one.
                for _ in range(200):
                    if not any(inst.spawning for inst in self.instances.values()):
                        break
                    await asyncio.sleep(0.01)
                running = sum(1 for inst in self.instances.values() if inst.pid is not None)
                log.info("leaving %d running instance(s) for the next supervisor to adopt", running)
            await asyncio.gather(*self._background, return_exceptions=True)
            for runner in self.runners.values():
                await runner.close()
            return
        async with self._lock:
            pending = [inst.remove("supervisor shutting down") for inst in self.instances.values()]
            pending += [inst.finished for inst in self.removing.values()]
            if pending:
                log.info("stopping %d instance(s)", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        for runner in self.runners.values():
            await runner.close()
        if self.process_runner.cgroups is not None:
            await asyncio.to_thread(self.process_runner.cgroups.remove_base)

    # -- reconcile ---------------------------------------------------------------------------
    async def reload(self, reason: str = "reload") -> Plan:
        async with self._lock:
            began = time.perf_counter()
            try:
                return await self._reload(reason)
            finally:
                if self._on_reconcile is not None:
                    self._on_reconcile(time.perf_counter() - began)

    async def _reload(self, reason: str) -> Plan:
        """One reload; the caller holds the lock."""
        if self._closing:
            return Plan()
        try:
            parsed = await asyncio.to_thread(
                confd.read_dir, self.settings.conf_dir, self.registry, self.defaults, self._parse_cache
            )
        except FileNotFoundError:
            log.error("declaration directory %s is missing; keeping what runs", self.settings.conf_dir)
            return Plan()
        facts, nodes = self.gpu_facts(), self.node_facts()
        known = (facts.known, {label: f.known for label, f in nodes.nodes.items()}, nodes.reason is None)
        if self._unchanged(parsed, known):
            return Plan()  # a resync that found nothing new: nothing to settle again
        catalog = await asyncio.to_thread(
            resolve, parsed, self.catalog, self.ports.assign, self.work_root, facts, nodes
        )
        self._last_inputs = (dict(parsed), known)
        self.parsed = parsed
        if catalog.placement_record() != self.catalog.placement_record():
            try:
                await asyncio.to_thread(self.save_placements, catalog)
            except OSError as exc:  # a full state disk: run as settled, say so, retry next reload
                log.error(
                    "cannot save GPU placements: %s; they are kept in memory for now",
                    storage.describe(exc, self.settings.state_dir / "placements.json"),
                )
        return self._apply(catalog, reason)

    async def apply_edit(
        self, path: Path, candidate: ModelSpec | None, write: EditWriter, reason: str
    ) -> Plan:
        """An API edit of one declaration file, settled once (issue 19: it was resolved twice).

        Under the reload lock, conf.d/ as it is now with `candidate` in `path` (None: the file
        removed) is resolved in a thread. A conflict of `path` raises EditConflict before
        anything is written; otherwise `write` stores the state and the file (raising leaves
        everything as it was) and that same catalog is applied."""
        async with self._lock:
            began = time.perf_counter()
            try:
                parsed = await asyncio.to_thread(
                    confd.read_dir, self.settings.conf_dir, self.registry, self.defaults, self._parse_cache
                )
                if candidate is None:
                    parsed.pop(str(path), None)
                else:
                    parsed[str(path)] = candidate
                facts, nodes = self.gpu_facts(), self.node_facts()
                known = (
                    facts.known,
                    {label: f.known for label, f in nodes.nodes.items()},
                    nodes.reason is None,
                )
                ports = self.ports.dry_run()
                catalog = await asyncio.to_thread(
                    resolve, parsed, self.catalog, ports.assign, self.work_root, facts, nodes
                )
                conflicts = catalog.errors.get(str(path), [])
                if conflicts:
                    raise EditConflict(conflicts)
                await write(
                    catalog, {k: p for k, p in ports.assigned.items() if self.ports.assigned.get(k) != p}
                )
                if candidate is not None:
                    confd.remember(self._parse_cache, path, candidate)
                self._last_inputs = (dict(parsed), known)
                self.parsed = parsed
                return self._apply(catalog, reason)
            finally:
                if self._on_reconcile is not None:
                    self._on_reconcile(time.perf_counter() - began)

    def _unchanged(self, parsed: dict[str, ModelSpec | list[ConfigError]], known: object) -> bool:
        """Same parse results (the very same objects), same GPUs (here and on the nodes), and
        nothing waiting on either."""
        if self._last_inputs is None or self.catalog.errors:
            return False
        last_parsed, last_known = self._last_inputs
        return (
            last_known == known
            and last_parsed.keys() == parsed.keys()
            and all(parsed[k] is last_parsed[k] for k in parsed)
        )

    def _sort_records(self, catalog: Catalog, broken: set[str]) -> dict[str, dict[str, Any]]:
        """First reload only: which of an earlier supervisor's runs to adopt; start the sweep of
        the rest. Returns the records to adopt, by instance id."""
        records, self._records = self._records or {}, None
        decision = decide(records, catalog.instances, broken)
        self._deferred = decision.deferred
        why = {iid: describe_stale(rec, catalog.instances.get(iid)) for iid, rec in decision.stale.items()}
        docker = self.runners.get("docker")
        for iid, reason in why.items():
            log.info("%s: not adopting its run (pid %s): %s", iid, decision.stale[iid].get("pid"), reason)
            self.services.records.remove(iid)
            spec = catalog.instances.get(iid)
            # A changed declaration's launch replaces its container itself; one that will not
            # launch (gone, disabled) must not leave its container running.
            if (
                decision.stale[iid].get("kind") == "docker"
                and isinstance(docker, DockerRunner)
                and (spec is None or not spec.enabled)
            ):
                timeout = spec.stop.timeout if spec is not None else self.defaults.stop.timeout
                self.spawn_background(
                    docker.remove_stale(iid, timeout), f"remove leftover container of {iid}"
                )
        if self.cluster is not None:
            # Cluster runs of declarations removed or disabled while we were down, recorded or
            # not (a record is lost with its state dir): their actors hold GPUs in Ray.
            keep = {
                iid for iid, spec in catalog.instances.items() if spec.enabled and spec.launch.runner == "ray"
            } | set(decision.deferred)
            self.spawn_background(
                self.cluster.sweep_actors(
                    keep, self._launched_here, bool(broken), self.defaults.stop.timeout
                ),
                "stop the actors no declaration wants",
            )
        for iid in decision.deferred:
            log.warning(
                "%s: its declaration file is broken; leaving its run (pid %s) alone until it is valid",
                iid,
                decision.deferred[iid].get("pid"),
            )
        kept = {**decision.adopt, **decision.deferred}
        # A kept run whose leader died already is adopted by nobody: its workers are leftovers.
        kept_tokens = {str(r.get("token")) for r in kept.values() if record_alive(r)}
        assert self.adoption is not None
        victims, cgroups = self.adoption.leftovers(kept_tokens.__contains__, decision.stale)
        if not victims and not cgroups:
            self.adoption.done()  # nothing left over: fresh launches need not wait
        else:
            timeouts = [spec.stop.timeout for spec in catalog.instances.values()] or [
                self.defaults.stop.timeout
            ]
            self.spawn_background(
                self.adoption.sweep(victims, cgroups, max(timeouts), why), "sweep of leftovers"
            )
        return decision.adopt

    def _claim_deferred(
        self, iid: str, spec: Any
    ) -> tuple[dict[str, Any] | None, tuple[asyncio.Future[Any], ...]]:
        """A run left alone at start-up because its file was broken: adopt it now if unchanged,
        or stop it before the new declaration starts."""
        record = self._deferred.pop(iid, None)
        if record is None:
            return None, ()
        if spec.enabled and record.get("launch_hash") == spec.launch_hash:
            return record, ()
        self.services.records.remove(iid)
        log.info(
            "%s: its declaration changed while broken; stopping the old run (pid %s)", iid, record.get("pid")
        )
        return None, (
            self.spawn_background(self._stop_record(record, spec.stop.timeout), f"stop old run of {iid}"),
        )

    async def _stop_record(self, record: dict[str, Any], timeout: float) -> None:
        table = await self.table.snapshot()
        token = record.get("token")
        victims = marked(table, self.scope, token) if isinstance(token, str) and token else set()
        if record_alive(record):
            victims.add(int(record["pid"]))
        await stop_processes(table, victims, 15, timeout)

    def _apply(self, catalog: Catalog, reason: str) -> Plan:
        adopt: dict[str, dict[str, Any]] = {}
        startup = self._records is not None
        if startup:
            adopt = self._sort_records(catalog, set(catalog.errors))
        actual = {iid: inst.spec for iid, inst in self.instances.items()}
        steps = plan(catalog.instances, actual)
        self._report_errors(self.catalog.errors, catalog.errors)

        def gate(iid: str) -> asyncio.Future[Any]:
            if iid in self.removing:
                return self.removing[iid].finished
            return self.instances[iid].run_over()

        gates = {iid: tuple(gate(g) for g in sorted(ids)) for iid, ids in steps.gates.items()}
        for iid in steps.remove:
            inst = self.instances.pop(iid)
            self.removing[iid] = inst
            inst.remove().add_done_callback(functools.partial(self._removed_callback, iid, inst))
        for iid in steps.replace + steps.update:
            self.instances[iid].update(catalog.instances[iid], gates.get(iid, ()))
        for iid in steps.add:
            spec = catalog.instances[iid]
            record = adopt.get(iid)
            before = gates.get(iid, ())
            if record is None and startup and self.adoption is not None:
                before += (self.adoption.swept,)  # stop leftovers first, start later
            if record is None and iid in self._deferred:
                record, waits = self._claim_deferred(iid, spec)
                before += waits
            inst = Instance(spec, self.services, adopt=record)
            self.instances[iid] = inst
            if iid in self.removing:  # re-added while its previous incarnation is still stopping
                before += (self.removing[iid].finished,)
            inst.activate(before)
        self.catalog = catalog
        self.reload_count += 1
        self.last_reload = {
            "at": utcnow().isoformat(),
            "reason": reason,
            "added": steps.add,
            "removed": steps.remove,
            "replaced": steps.replace,
            "updated": steps.update,
        }
        if not steps.empty:
            log.info(
                "reconcile (%s): +%d -%d ~%d replaced, %d updated in place",
                reason,
                len(steps.add),
                len(steps.remove),
                len(steps.replace),
                len(steps.update),
            )
            self.bus.publish("reconcile", self.last_reload)
        self._release_ports()
        return steps

    def _load_placements(self) -> Catalog:
        """An empty catalog with the `gpus = "auto"` placements an earlier run settled."""
        path = self.settings.state_dir / "placements.json"
        try:
            return Catalog.from_placement_record(json.loads(path.read_text()))
        except FileNotFoundError:
            return Catalog()
        except (ValueError, OSError, AttributeError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable GPU placements in %s: %s", path, exc)
            return Catalog()

    def save_placements(self, catalog: Catalog) -> None:
        path = self.settings.state_dir / "placements.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".placements.json.tmp")
        tmp.write_text(json.dumps(catalog.placement_record(), indent=1))
        os.replace(tmp, path)

    def _removed_callback(self, iid: str, inst: Instance, _done: asyncio.Future[None]) -> None:
        self._removed(iid, inst)

    def _removed(self, iid: str, inst: Instance) -> None:
        if self.removing.get(iid) is inst:
            del self.removing[iid]
            if iid not in self.instances:  # gone for good: its automatic ports go back to the range
                self._release_ports()

    def _report_errors(
        self, before: dict[str, list[ConfigError]], after: dict[str, list[ConfigError]]
    ) -> None:
        """Log each file's errors once per change, and say when a file is fixed."""
        for file, errors in after.items():
            if before.get(file) != errors:
                for err in errors:
                    log.error("config error: %s", err)
                self.bus.publish("config_error", {"file": file, "errors": [e.as_dict() for e in errors]})
        for file in before.keys() - after.keys():
            log.info("config: %s is valid again (or gone)", file)
            self.bus.publish("config_ok", {"file": file})

    # -- queries and intents for the API and CLI ---------------------------------------------
    def run_is_live(self, token: str, instance_id: str) -> bool:
        """Is run `token` (seen by a node agent, marked as `instance_id`'s) one of ours now?
        Until start-up has sorted out what to adopt, and while that instance launches, yes."""
        if self._records is not None or self.adoption is None or not self.adoption.swept.done():
            return True
        inst = self.instances.get(instance_id) or self.removing.get(instance_id)
        if inst is not None and (inst.spawning or inst.run_token == token):
            return True
        return any(i.run_token == token for i in (*self.instances.values(), *self.removing.values()))

    def log_reader(self, instance_id: str, log_file: LogFile) -> LogReader:
        """What the API reads an instance's log through: the file here, or on the cluster node
        of its latest run (`RemoteLog`, through that node's agent)."""
        inst = self.instances.get(instance_id) or self.removing.get(instance_id)
        if self.cluster is not None and (inst is None or inst.spec.launch.runner == "ray"):
            remote = self.cluster.log_of(instance_id)
            if remote is not None:
                return remote
        return LocalLog(log_file)

    def _launched_here(self, iid: str) -> bool:
        inst = self.instances.get(iid) or self.removing.get(iid)
        return inst is not None and (inst.spawning or inst.pid is not None)

    def instance(self, iid: str) -> Instance | None:
        return self.instances.get(iid)

    def model_instances(self, model: str) -> list[Instance]:
        return [inst for inst in self.instances.values() if inst.spec.model == model]

    def status(self) -> list[dict[str, Any]]:
        return [self.instances[iid].snapshot() for iid in sorted(self.instances)]

    def config_errors(self) -> list[dict[str, Any]]:
        return [e.as_dict() for errors in self.catalog.errors.values() for e in errors]

    # -- helpers -----------------------------------------------------------------------------
    def _release_ports(self) -> None:
        """Automatic ports of instances that are gone go back to the range: a write of
        ports.json, so in a thread, and under the reload lock (a resolve assigns meanwhile)."""

        async def release() -> None:
            async with self._lock:
                live = set(self.instances) | set(self.removing) | set(self._deferred)
                await asyncio.to_thread(self.ports.release_unused, live)

        self.spawn_background(release(), "release unused automatic ports")

    def _give_up_port(self, iid: str, key: str, port: int) -> None:
        """A stranger took an automatic port: forget it and settle again (a new port). Only if
        `key` still has that port: a retry of the old spec must not forget the new one."""

        async def give_up() -> None:
            try:
                if not await asyncio.to_thread(self.ports.forget, key, port):
                    return
            except OSError as exc:
                log.error("%s: cannot forget its automatic port: %s", iid, exc)
                return
            self._last_inputs = None  # the files did not change, but the outcome will
            self.request_reload(f"automatic port of {iid} taken by another process")

        self.spawn_background(give_up(), f"give up the automatic port of {iid}")

    async def _port_holder(self, port: int) -> str | None:
        if port_is_free(port):
            return None
        return await asyncio.to_thread(describe_holder, port)

    async def _rotate_logs(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.log_check_interval)
            files = [inst.log_file for inst in [*self.instances.values(), *self.removing.values()]]
            await asyncio.to_thread(_rotate_all, files, s.log_max_bytes, s.log_backups)


def _rotate_all(files: list[LogFile], max_bytes: int, backups: int) -> None:
    for log_file in files:
        try:
            if log_file.rotate_if_needed(max_bytes, backups):
                log.info("rotated %s", log_file.path)
        except OSError as exc:
            log.warning("cannot rotate %s: %s", log_file.path, exc)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %r failed", task.get_name(), exc_info=task.exception())
