"""The plugin API: what a backend kind is, declaration options in, a launch plan plus a default
health check out.

A plugin (a third-party kind, see examples/plugin/) imports from this module only: its names
below are the stable API, and everything else of the supervisor may move between releases.
They are defined in `supervisor.core.launch` (the launch types every layer shares) and
`supervisor.core.spec` (`StrictModel`, the base of a kind's options model), and re-exported here.

A kind never starts anything itself. It turns one instance of a declaration into a plan
(`ProcessLaunch` or `ContainerLaunch`) that a runner executes, so every kind gets the same
restart, backoff, health and stop behaviour for free.
"""

from __future__ import annotations

from supervisor.core.launch import (
    AnyBackendKind,
    BackendKind,
    ContainerLaunch,
    DefaultHealth,
    HealthType,
    LaunchContext,
    LaunchPlan,
    LiveConfig,
    PlaceholderError,
    PrepareStep,
    ProcessLaunch,
    expand,
    expand_env,
    gpu_env,
    instance_env,
)
from supervisor.core.spec import StrictModel

__all__ = [
    "AnyBackendKind",
    "BackendKind",
    "ContainerLaunch",
    "DefaultHealth",
    "HealthType",
    "LaunchContext",
    "LaunchPlan",
    "LiveConfig",
    "PlaceholderError",
    "PrepareStep",
    "ProcessLaunch",
    "StrictModel",
    "expand",
    "expand_env",
    "gpu_env",
    "instance_env",
]
