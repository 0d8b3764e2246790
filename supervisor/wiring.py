"""The composition root: the one place that builds the supervisor's objects and connects them.

Read top to bottom, `build` is the whole object graph: the event bus and process table that
everything shares, the runners (a cluster runner only with `cluster = "ray"`), the metrics, the
engine, the GPU tracker, and the two registrations that close the loops between them (the
tracker's facts and gate for the engine; the engine, as run owner, for the cluster runner).
Every object receives what it needs here; nothing sets another object's attributes later.
`serve` builds one and adds the API (`supervisor.api.app.create_app`); tests build their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from supervisor.adapters.marks import scope_of
from supervisor.adapters.procscan import ProcessTable
from supervisor.adapters.runners.base import Runner
from supervisor.adapters.runners.docker import DockerRunner
from supervisor.adapters.runners.process import ProcessRunner
from supervisor.backends.registry import Registry, default_registry
from supervisor.config.settings import Settings
from supervisor.core.events import EventBus
from supervisor.runtime.cluster_binding import ClusterBinding
from supervisor.runtime.engine import Engine
from supervisor.runtime.gpu_tracker import GpuTracker
from supervisor.runtime.instance import PrestartCheck
from supervisor.runtime.metrics import Metrics


@dataclass(frozen=True)
class Supervisor:
    """Everything `serve` runs, built and connected."""

    settings: Settings
    engine: Engine
    gpus: GpuTracker
    metrics: Metrics


def build(
    settings: Settings,
    *,
    registry: Registry | None = None,
    prestart: Sequence[PrestartCheck] = (),
    subreaper: bool = False,
) -> Supervisor:
    """The supervisor's objects for `settings`, connected; nothing is started yet.

    `subreaper`: this process already is a child subreaper (`serve` asks the kernel first), so
    orphans of our runs come back to us. `prestart` checks run before every start (tests)."""
    bus = EventBus()
    table = ProcessTable()
    scope = scope_of(settings.state_dir)
    process = ProcessRunner(table, scope, subreaper=subreaper)
    runners: dict[str, Runner] = {"process": process, "docker": DockerRunner(scope)}
    cluster = None
    if settings.cluster == "ray":
        from supervisor.adapters.runners.ray import from_settings  # Ray itself runs in a helper

        cluster = from_settings(settings, scope, table, publish=bus.publish)
        runners["ray"] = cluster
        prestart = [*prestart, cluster.nodes.gate]  # a node's GPUs are free before a restart there
    metrics = Metrics()
    engine = Engine(
        settings,
        runners,
        process,
        registry=registry or default_registry(),
        bus=bus,
        table=table,
        cluster=cluster,
        prestart=prestart,
        on_reconcile=metrics.reconcile_seconds.observe,
    )
    gpus = GpuTracker(engine, settings, cluster.nodes if cluster is not None else None)
    engine.use_gpus(gpus)
    if cluster is not None:
        cluster.connect(ClusterBinding(engine))
    metrics.attach(engine, gpus)
    return Supervisor(settings, engine, gpus, metrics)
