"""The desired state: which instances should exist, with which effective spec.

Pure functions from "what the files say now" (plus what was in force before) to a catalog of
models and the instances they declare. Conflicts between files are settled here:

* Two files declaring one name: the file that already owned the name keeps it (at the first
  load: the first file in name order); the other file is rejected, naming both.
* Two models claiming one explicit port: the same rule.
* A file that no longer validates keeps its last good version in force, so a typo in an
  editor never takes a running model down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.config.cluster_launch import in_cluster
from supervisor.config.declarations import ConfigError, ModelSpec
from supervisor.core import oserrors
from supervisor.core.launch import LaunchContext, LaunchPlan, ProcessLaunch
from supervisor.core.placement import (
    NO_CLUSTER,
    NO_FACTS,
    Claim,
    ClaimKey,
    ClusterFacts,
    GpuClaims,
    GpuFacts,
    PlacementError,
    PortRangeExhausted,
    check_exists,
    place,
    place_on_nodes,
)
from supervisor.core.spec import RestartSpec, StopSpec, instance_id, instance_port

DEFAULT_WORK_ROOT = Path("state") / "work"


@dataclass(frozen=True, slots=True)
class ResolvedHealth:
    type: str  # "http" | "tcp" | "none"
    path: str | None
    interval: float
    start_interval: float
    timeout: float
    start_timeout: float
    failure_threshold: int
    live_path: str | None = None  # http only: probed once RUNNING (None: `path`)
    #: http/https: sent with every probe (a bearer token). A secret: out of repr, logs and
    #: the policy hash; it changes only with the launch (argv or the file the server reads).
    headers: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)

    def for_liveness(self) -> ResolvedHealth:
        """The probe used once RUNNING: the same check on `live_path`."""
        if self.live_path is None or self.live_path == self.path:
            return self
        return dataclasses.replace(self, path=self.live_path)


@dataclass(frozen=True, eq=False)
class InstanceSpec:
    """One model on one GPU set: what the engine runs and supervises as a unit."""

    id: str
    model: str
    backend: str
    gpus: tuple[int, ...]
    port: int  # 0: the instance listens on nothing (auto port, no {port}, no health check)
    uses_port: bool  # checked for a holder before each start
    extra_ports: tuple[tuple[str, int], ...]  # more ports the backend kind asked for, by name
    enabled: bool
    launch: LaunchPlan
    health: ResolvedHealth
    restart: RestartSpec
    stop: StopSpec
    source: Path
    launch_hash: str  # changes => the running process must be replaced
    policy_hash: str  # changes (alone) => applied in place, nothing restarts
    auto_port: bool = False  # `port` came from the automatic range (given up if a stranger holds it)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "backend": self.backend,
            "gpus": list(self.gpus),
            "port": self.port or None,
            "command": self.launch.describe(),
            "source": str(self.source),
        }


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_instance(
    model: ModelSpec,
    gpus: tuple[int, ...],
    port: int,
    extra_ports: tuple[tuple[str, int], ...] = (),
    work_root: Path = DEFAULT_WORK_ROOT,
    node: str | None = None,
) -> InstanceSpec:
    """`node`: where this instance runs, if not where its model says (`gpus = "auto"` placed
    across the cluster's nodes)."""
    decl = model.decl
    node = node or model.node
    iid = instance_id(decl.name, gpus, node)
    ctx = LaunchContext(
        iid,
        decl.name,
        gpus,
        port,
        model.source.parent,
        extra_ports=extra_ports,
        work_dir=work_root / iid,
        stop_timeout=decl.stop.timeout,
    )
    launch: LaunchPlan = model.kind.launch(model.options, ctx, decl.env)
    default = model.kind.instance_health(model.options, ctx)
    h = decl.health
    health_type = h.type or default.type
    health = ResolvedHealth(
        type=health_type,
        path=(h.path or default.path or "/health") if health_type in ("http", "https") else None,
        interval=h.interval,
        start_interval=h.start_interval,
        timeout=h.timeout,
        start_timeout=h.start_timeout,
        failure_threshold=h.failure_threshold,
        live_path=(
            h.live_path
            or (default.live_path if h.path is None else None)
            or h.path
            or default.path
            or "/health"
        )
        if health_type in ("http", "https")
        else None,
        headers=default.headers if health_type in ("http", "https") else (),
    )
    uses_port = port != 0 and (health.type != "none" or model.kind.listens(model.options, decl.env))
    if node is not None:  # cluster mode: the same plan, run by the ray runner on a node
        ports = (port, *(p for _, p in extra_ports)) if uses_port else ()
        # A node is only ever given to a process plan (declarations._where, _slots).
        assert isinstance(launch, ProcessLaunch), f"{launch.runner} plans run on this machine only"
        launch = in_cluster(launch, node, gpus, decl.share_gpus, ports)
    # Only what reaches the process decides whether it must be replaced. Restart, health and
    # stop settings change how we supervise it: applied in place, so a tweak to a backoff
    # never costs a model that took ten minutes to load.
    launch_hash = _digest(
        {"backend": decl.backend, "gpus": gpus, "port": port, "launch": launch.fingerprint()}
    )
    policy_hash = _digest(
        {
            "enabled": decl.enabled,
            "health": health.__repr__(),
            "restart": decl.restart.model_dump(),
            "stop": decl.stop.model_dump(),
        }
    )
    return InstanceSpec(
        id=iid,
        model=decl.name,
        backend=decl.backend,
        gpus=gpus,
        port=port,
        extra_ports=extra_ports,
        uses_port=uses_port,
        enabled=decl.enabled,
        launch=launch,
        health=health,
        restart=decl.restart,
        stop=decl.stop,
        source=model.source,
        launch_hash=launch_hash,
        policy_hash=policy_hash,
        auto_port=decl.port == "auto",
    )


@dataclass
class Catalog:
    """The models in force, the instances they declare and every file's errors."""

    models: dict[str, ModelSpec] = field(default_factory=dict)  # by model name
    instances: dict[str, InstanceSpec] = field(default_factory=dict)  # by instance id
    errors: dict[str, list[ConfigError]] = field(default_factory=dict)  # by file
    owners: dict[str, str] = field(default_factory=dict)  # model name -> file
    placements: dict[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # "<model>#<n>" -> GPUs (gpus = "auto")
    placed_on: dict[str, str] = field(default_factory=dict)  # "<model>#<n>" -> node (auto across nodes)
    slots: dict[str, list[Slot]] = field(default_factory=dict)  # model name -> where each instance runs

    def placement_record(self) -> dict[str, object]:
        """placements.json: `[gpus]`, or `{"node": label, "gpus": [...]}` for one placed on a node."""
        return {
            key: ({"node": self.placed_on[key], "gpus": list(gpus)} if key in self.placed_on else list(gpus))
            for key, gpus in sorted(self.placements.items())
        }

    @classmethod
    def from_placement_record(cls, record: dict[str, Any]) -> Catalog:
        """An empty catalog that remembers the placements of `record` (placement_record's shape)."""
        catalog = cls()
        for key, value in record.items():
            if isinstance(value, dict):
                catalog.placements[key] = tuple(int(g) for g in value["gpus"])
                catalog.placed_on[key] = str(value["node"])
            else:
                catalog.placements[key] = tuple(int(g) for g in value)
        return catalog


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one instance of a model runs: its GPUs, and its node (None, "*" or a label)."""

    node: str | None
    gpus: tuple[int, ...]

    def claim_keys(self) -> tuple[ClaimKey, ...]:
        """What it holds exclusively: GPU g of this machine, or "gpu-a:g" of a named node."""
        if self.node is None:
            return self.gpus
        return tuple(f"{self.node}:{g}" for g in self.gpus)


PortAssigner = Callable[[str, set[int]], int]
"""(instance id, ports reserved by explicit declarations) -> a port for that instance."""


def resolve(
    parsed: dict[str, ModelSpec | list[ConfigError]],
    previous: Catalog,
    assign_port: PortAssigner,
    work_root: Path = DEFAULT_WORK_ROOT,
    facts: GpuFacts = NO_FACTS,
    cluster: ClusterFacts = NO_CLUSTER,
) -> Catalog:
    """Settle names, ports and GPUs across files and expand every model into its instances.

    `parsed` maps each file present now to its fresh parse (a spec, or its errors). Files
    absent from it were deleted: their models go. `previous` is the catalog in force (its
    owners keep their names, ports and GPUs; its placements stay where they are).
    """
    errors: dict[str, list[ConfigError]] = {f: list(e) for f, e in parsed.items() if isinstance(e, list)}
    last_good = {str(m.source): m for m in previous.models.values()}

    def candidates(file: str) -> list[ModelSpec]:
        """The fresh version first, then (if the file is broken or loses a conflict) the last good one."""
        fresh = parsed[file]
        out = [fresh] if isinstance(fresh, ModelSpec) else []
        old = last_good.get(file)
        if old is not None and (not out or old is not out[0]):
            out.append(old)
        return out

    def chooses_gpus(file: str) -> bool:
        return any(m.decl.gpus == "auto" for m in candidates(file)[:1])

    # Files that already owned a name go first so they keep it; then the rest in name order.
    # In each group, `gpus = "auto"` comes after declarations that name their GPUs: it fits
    # around them, whatever the file names.
    incumbents = sorted(
        (f for f in parsed if _owner_of(previous.owners, last_good.get(f)) == f),
        key=lambda f: (chooses_gpus(f), f),
    )
    newcomers = sorted((f for f in parsed if f not in incumbents), key=lambda f: (chooses_gpus(f), f))

    catalog = Catalog()
    explicit: dict[int, str] = {}  # port -> instance id claiming it
    claims = GpuClaims()
    for file in incumbents + newcomers:
        for model in candidates(file):
            try:
                slots = _slots(model, facts, claims, previous, cluster)
                problems = _conflicts(model, slots, catalog, explicit, claims)
            except PlacementError as exc:
                problems = [ConfigError(file, str(exc), key="gpus", loc=("gpus",), type="conflict")]
            if not problems:
                catalog.models[model.name] = model
                catalog.owners[model.name] = file
                catalog.slots[model.name] = slots
                decl = model.decl
                for replica, slot in enumerate(slots):
                    iid = instance_id(model.name, slot.gpus, slot.node)
                    if decl.port != "auto":
                        explicit[instance_port(decl.port, slot.gpus)] = iid
                    if slot.gpus and slot.node != "*":  # "*": Ray's per-GPU resources keep them apart
                        claims.add(
                            slot.claim_keys(), Claim(iid, file, decl.share_gpus, decl.min_free_memory_mb)
                        )
                    if decl.gpus == "auto":
                        catalog.placements[f"{model.name}#{replica}"] = slot.gpus
                        if slot.node != model.node:
                            catalog.placed_on[f"{model.name}#{replica}"] = str(slot.node)
                break
            if model is parsed[file]:
                errors.setdefault(file, []).extend(problems)

    reserved = set(explicit)
    for model in catalog.models.values():
        for slot in catalog.slots[model.name]:
            gpus = slot.gpus
            iid = instance_id(model.name, gpus, slot.node)
            if model.decl.port == "auto" and not _listens(model):
                port = 0  # nothing listens: do not spend a port of the range on it
            elif model.decl.port == "auto":
                try:
                    port = assign_port(iid, reserved)
                except (PortRangeExhausted, OSError) as exc:
                    errors.setdefault(str(model.source), []).append(
                        ConfigError(
                            str(model.source),
                            f"instance {iid}: {_port_problem(exc)}",
                            key="port",
                            loc=("port",),
                            type="conflict",
                        )
                    )
                    continue
            else:
                port = instance_port(model.decl.port, gpus)
            try:
                extra = tuple(
                    (name, assign_port(f"{iid}#{name}", reserved))
                    for name in model.kind.extra_ports(model.options)
                )
            except (PortRangeExhausted, OSError) as exc:
                errors.setdefault(str(model.source), []).append(
                    ConfigError(
                        str(model.source),
                        f"instance {iid}: {_port_problem(exc)}",
                        key="port",
                        loc=("port",),
                        type="conflict",
                    )
                )
                continue
            catalog.instances[iid] = make_instance(model, gpus, port, extra, work_root, slot.node)
    catalog.errors = {f: e for f, e in errors.items() if e}
    return catalog


def _port_problem(exc: Exception) -> str:
    # An assignment is only used once it is on disk (ports.json), so a full state disk means
    # no port, said as such, instead of a failed reload (issue 11). Retried at the next reload.
    if isinstance(exc, OSError):
        return f"cannot record its automatic port: {oserrors.describe(exc)}"
    return str(exc)


def _slots(
    model: ModelSpec, facts: GpuFacts, claims: GpuClaims, previous: Catalog, cluster: ClusterFacts
) -> list[Slot]:
    decl = model.decl
    if decl.gpus != "auto":
        sets = decl.gpu_sets()
        for gpus in sets:
            if model.node is None:  # a cluster node's GPUs are not this machine's
                check_exists(gpus, facts)
        return [Slot(model.node, gpus) for gpus in sets]
    slots: list[Slot] = []
    trial = GpuClaims()  # this model's own instances may not land on one another's GPUs
    trial.by_gpu = {g: list(c) for g, c in claims.by_gpu.items()}
    for replica in range(decl.instances):
        key = f"{model.name}#{replica}"
        sticky = previous.placements.get(key)
        if model.node is None:
            slot = Slot(
                None,
                place(decl.gpus_per_instance, decl.min_free_memory_mb, decl.share_gpus, facts, trial, sticky),
            )
        elif model.node == "*":  # any node: the node is chosen here, then the instance is pinned to it
            was = (
                (previous.placed_on[key], sticky)
                if sticky is not None and key in previous.placed_on
                else None
            )
            slot = Slot(
                *place_on_nodes(
                    decl.gpus_per_instance, decl.min_free_memory_mb, decl.share_gpus, cluster, trial, was
                )
            )
        else:  # `node = "gpu-a"`: that node's GPUs, as its agent last reported them
            on_node = trial.on_node(model.node, cluster.occupied.get(model.node))
            slot = Slot(
                model.node,
                place(
                    decl.gpus_per_instance,
                    decl.min_free_memory_mb,
                    decl.share_gpus,
                    cluster.of(model.node),
                    on_node,
                    sticky,
                ),
            )
        # Never shared with its own siblings (a GPU appears once per model, and one id per instance).
        trial.add(
            slot.claim_keys(),
            Claim(
                instance_id(model.name, slot.gpus, slot.node),
                str(model.source),
                False,
                decl.min_free_memory_mb,
            ),
        )
        slots.append(slot)
    return slots


def _listens(model: ModelSpec) -> bool:
    health = model.decl.health.type or model.kind.default_health(model.options).type
    return health != "none" or model.kind.listens(model.options, model.decl.env)


def _owner_of(owners: dict[str, str], model: ModelSpec | None) -> str | None:
    """The file that owns `model`'s name (None: no model, or its name is unowned)."""
    return owners.get(model.name) if model is not None else None


def _conflicts(
    model: ModelSpec, slots: list[Slot], catalog: Catalog, explicit: dict[int, str], claims: GpuClaims
) -> list[ConfigError]:
    file = str(model.source)
    if model.name in catalog.models:
        other = catalog.owners[model.name]
        return [
            ConfigError(
                file,
                f"model name {model.name!r} is already declared in {other}; names must be unique",
                key="name",
                loc=("name",),
                type="conflict",
            )
        ]
    problems = []
    if model.decl.port != "auto":
        for slot in slots:
            port = instance_port(model.decl.port, slot.gpus)
            iid = instance_id(model.name, slot.gpus, slot.node)
            if not 1 <= port <= 65535:
                problems.append(
                    ConfigError(
                        file, f"instance {iid} would get port {port}, out of range", key="port", loc=("port",)
                    )
                )
            elif port in explicit:
                owner = explicit[port]
                problems.append(
                    ConfigError(
                        file,
                        f"port {port} (instance {iid}) is already declared by "
                        f"{owner} in {catalog.owners[owner.split('@')[0]]}",
                        key="port",
                        loc=("port",),
                        type="conflict",
                    )
                )
    for slot in slots:
        if slot.node == "*":
            continue
        held = claims.blocking(slot.claim_keys(), model.decl.share_gpus)
        if held is not None:
            gpu, claim = held
            problems.append(
                ConfigError(
                    file,
                    f"GPU {gpu} is already held by instance {claim.instance} ({claim.file}); an instance holds its GPUs "
                    "alone unless every instance on it sets share_gpus = true",
                    key="gpus",
                    loc=("gpus",),
                    type="conflict",
                )
            )
            break
    return problems
