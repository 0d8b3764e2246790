"""What a backend kind is: declaration options in, a launch plan plus a default health check out.

The launch types every layer shares: the context a kind builds a plan from (`LaunchContext`,
placeholders, the instance's environment), the plans a runner executes (`ProcessLaunch`,
`ContainerLaunch`) with their prepare, after-exit and live parts, the default health check,
the `BackendKind` base class, and what the config layer needs of a registry of kinds
(`KindRegistry`; the real one is `supervisor.backends.registry.Registry`, handed in from above).

Pure: nothing here starts a process, opens a socket or reads /proc. A plugin does not import
this module by name: `supervisor.backends.base` is the plugin API and re-exports what it uses.

A kind never starts anything itself. It turns one instance of a declaration into a plan that a
runner executes, so every kind gets the same restart, backoff, health and stop behaviour for free.
"""

from __future__ import annotations

import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel

#: "https": HTTP over TLS, certificate not verified (the probe only connects to 127.0.0.1).
HealthType = Literal["http", "https", "tcp", "none"]


@dataclass(frozen=True, slots=True)
class LaunchContext:
    """Everything a kind may use to build one instance's plan."""

    instance_id: str
    model: str
    gpus: tuple[int, ...]
    port: int
    here: Path  # directory of the declaration file: relative paths are resolved against it
    python: str = sys.executable
    #: More ports the kind asked for (`extra_ports`), by name: placeholders `{port_<name>}`.
    extra_ports: tuple[tuple[str, int], ...] = ()
    #: A directory of the supervisor's own for this instance (generated files live there).
    work_dir: Path = Path("state/work/unknown")
    #: The declaration's `stop.timeout`: a server with its own exit timeout (Triton's
    #: --exit-timeout-secs) is told a shorter one, so its graceful exit is not raced by SIGKILL.
    stop_timeout: float = 30.0

    def port_of(self, name: str) -> int:
        return dict(self.extra_ports)[name]

    def placeholders(self) -> dict[str, str]:
        return {
            **{f"port_{name}": str(port) for name, port in self.extra_ports},
            "work_dir": str(self.work_dir),
            "port": str(self.port),
            "gpus": ",".join(str(g) for g in self.gpus),
            "gpu_count": str(len(self.gpus)),
            "name": self.model,
            "instance": self.instance_id,
            "python": self.python,
            "here": str(self.here),
        }

    def resolve_path(self, value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (self.here / path).resolve())


class PlaceholderError(ValueError):
    """A template could not be expanded; `key` names the declaration key (e.g. `command[2]`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def expand(template: str, ctx: LaunchContext, key: str) -> str:
    """Expand `{port}`-style placeholders; `{{` and `}}` are literal braces."""
    values = ctx.placeholders()
    try:
        return template.format_map(values)
    except KeyError as exc:
        known = ", ".join("{" + k + "}" for k in values)
        raise PlaceholderError(key, f"unknown placeholder {{{exc.args[0]}}} (known: {known})") from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise PlaceholderError(
            key, f"cannot expand {template!r}: {exc}; write {{{{ and }}}} for literal braces"
        ) from None


def gpu_env(gpus: tuple[int, ...]) -> dict[str, str]:
    """Pin a process to its GPUs, with CUDA numbering forced to match NVML's (PCI bus order).

    Without CUDA_DEVICE_ORDER=PCI_BUS_ID, CUDA orders devices fastest-first and the GPU a
    process calls "0" may be another card than NVML's GPU 0 (weakness 25 of the old tool).
    An empty CUDA_VISIBLE_DEVICES hides every GPU from a CPU-only instance.
    """
    visible = ",".join(str(g) for g in gpus)
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": visible,
        "NVIDIA_VISIBLE_DEVICES": visible or "void",
    }


#: `${NAME}` (the supervisor's variable) or `$$` (a literal `$`) in an `env` value.
_ENV_REF = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)\})")


def expand_env(value: str, ctx: LaunchContext, key: str, environ: Mapping[str, str] | None = None) -> str:
    """An `env` value: `${NAME}` from the supervisor's environment (`PATH = "/opt/tb/bin:${PATH}"`,
    issue 12: `env` could not extend an inherited variable), `$$` a literal `$`, and the
    `{port}`-style placeholders in the text between. An unset NAME is an error naming `key`.
    Expanded when the plan is built, so the value is in the launch hash: a changed variable of
    the supervisor is seen on the next reload."""
    environ = os.environ if environ is None else environ
    parts: list[str] = []
    pos = 0
    for match in _ENV_REF.finditer(value):
        parts.append(expand(value[pos : match.start()], ctx, key))
        name = match.group(2)
        if name is None:
            parts.append("$")
        elif name in environ:
            parts.append(environ[name])  # verbatim: braces in it are not placeholders
        else:
            raise PlaceholderError(
                key, f"${{{name}}} is not set in the supervisor's environment (write $$ for a literal $)"
            )
        pos = match.end()
    parts.append(expand(value[pos:], ctx, key))
    return "".join(parts)


def instance_env(ctx: LaunchContext, declared: dict[str, str]) -> dict[str, str]:
    """The variables every supervised process gets on top of the supervisor's environment."""
    env = {key: expand_env(value, ctx, f"env.{key}") for key, value in declared.items()}
    env.update(gpu_env(ctx.gpus))
    env["MODEL_SUPERVISOR_INSTANCE"] = ctx.instance_id
    if ctx.port:
        env["MODEL_SUPERVISOR_PORT"] = str(ctx.port)
    return env


class LiveConfig(Protocol):
    """The part of a plan a running server can take without a restart (Triton's model list,
    loaded through its repository API). Left out of the plan's fingerprint: when only this
    part changes, the instance calls `apply` on its RUNNING server instead of replacing it,
    and restarts only if `apply` raises. Compared by equality (a frozen dataclass)."""

    async def apply(self, previous: LiveConfig, port: int, timeout: float) -> str:
        """Bring the running server from `previous` to this configuration; returns what it did.
        Raises (with a reason a user can act on) when the server could not follow."""

    async def check(self, port: int, timeout: float) -> tuple[bool, str]:
        """A deeper liveness check run after the HTTP liveness probe succeeded (e.g. dead
        worker processes the server itself does not notice): (ok, detail)."""


class PrepareStep(Protocol):
    """Work done (in a thread) right before each launch, e.g. generating config files into the
    instance's work dir. A frozen dataclass: its fields are part of the plan's fingerprint.
    Raises ValueError or OSError with a message a user can act on (a failed start)."""

    def run(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProcessLaunch:
    """Run `argv` (no shell) in `cwd` with the supervisor's environment plus `env`."""

    argv: tuple[str, ...]
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    prepare: tuple[PrepareStep, ...] = ()
    #: Applied to the running server when it alone changes; not in the fingerprint.
    live: LiveConfig | None = None
    #: Removed from the inherited environment (before `env` is applied): variables the server
    #: reads ahead of its flags (text-generation-webui's OPENEDAI_*).
    unset_env: tuple[str, ...] = ()
    #: Regexes of log lines that mean the start failed even though the process lives on
    #: (text-generation-webui: "Port X is already in use. Using port Y instead"); the line is
    #: the failure's reason. Consumed by the instance while STARTING.
    fail_patterns: tuple[str, ...] = ()
    #: Run (in a thread) once a run has ended and everything of it is gone, whatever ended it:
    #: Triton's python-backend /dev/shm regions are freed right away, not at the next start.
    after_exit: tuple[PrepareStep, ...] = ()
    runner: ClassVar[str] = "process"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "argv": list(self.argv),
            "cwd": self.cwd,
            "env": dict(self.env),
            "prepare": [repr(step) for step in self.prepare],
            "unset_env": list(self.unset_env),
        }

    def describe(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True, slots=True)
class ContainerLaunch:
    """Run `image` as a Docker container bound to the instance's GPUs (device requests).

    Ports are (host address, host port, container port) triples published on the host; with
    `network = "host"` nothing is published (the server binds host ports itself).
    """

    image: str
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    gpus: tuple[int, ...] = ()
    network: str = "bridge"
    ports: tuple[tuple[str, int, int], ...] = ()
    volumes: tuple[tuple[str, str, str], ...] = ()  # (host path, container path, "rw" | "ro")
    shm_size: str | None = None
    ipc_mode: str | None = None
    user: str | None = None
    ulimits: tuple[tuple[str, int, int], ...] = ()  # (name, soft, hard)
    workdir: str | None = None
    pull: str = "missing"  # "missing" | "never" | "always"
    prepare: tuple[PrepareStep, ...] = ()
    #: Applied to the running server when it alone changes; not in the fingerprint.
    live: LiveConfig | None = None
    #: As for a process (log lines that mean a failed start; work after a run's end): the
    #: instance reads them from any plan. Not in the fingerprint.
    fail_patterns: tuple[str, ...] = ()
    after_exit: tuple[PrepareStep, ...] = ()
    runner: ClassVar[str] = "docker"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "image": self.image,
            "command": self.command,
            "entrypoint": self.entrypoint,
            "env": dict(self.env),
            "gpus": list(self.gpus),
            "network": self.network,
            "ports": [list(p) for p in self.ports],
            "volumes": [list(v) for v in self.volumes],
            "shm_size": self.shm_size,
            "ipc_mode": self.ipc_mode,
            "user": self.user,
            "ulimits": [list(u) for u in self.ulimits],
            "workdir": self.workdir,
            "prepare": [repr(step) for step in self.prepare],
        }

    def describe(self) -> str:
        return f"docker {self.image}" + (" " + " ".join(self.command) if self.command else "")


LaunchPlan = ProcessLaunch | ContainerLaunch


@dataclass(frozen=True, slots=True)
class DefaultHealth:
    type: HealthType
    path: str | None = None  # readiness (STARTING -> RUNNING)
    #: Liveness, when it differs: Triton's /v2/health/ready goes false while a model loads
    #: through the repository API (triton-inference-server/server#7014); /v2/health/live does not.
    live_path: str | None = None
    #: Sent with every HTTP probe (text-generation-webui's --api-key as a bearer token). A
    #: secret: kept out of repr, so out of logs and of the policy hash.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


#: A kind's options model (its `options_model`), and the plan type its `launch` returns.
OptionsT = TypeVar("OptionsT", bound=BaseModel)
PlanT = TypeVar("PlanT", bound=LaunchPlan)


class BackendKind(ABC, Generic[OptionsT, PlanT]):
    """One kind of backend. Subclasses set `name` and `options_model` and build plans.

    A subclass names its options model and plan type, `class MyKind(BackendKind[MyOptions,
    ProcessLaunch])`: its methods then take `MyOptions` (what `options_model` validates) and
    its `preflight` the plan its `launch` made. Plain `BackendKind` (no parameters) still works.
    """

    name: ClassVar[str]
    #: Backend-specific keys of a declaration (strict, extra keys forbidden). Its instances
    #: are what the methods below receive as `options`.
    options_model: ClassVar[type[BaseModel]]

    @abstractmethod
    def default_health(self, options: OptionsT) -> DefaultHealth: ...

    def instance_health(self, options: OptionsT, ctx: LaunchContext) -> DefaultHealth:
        """The default health check of one instance: `default_health`, unless it depends on a
        file the server reads at start (text-generation-webui's CMD_FLAGS.txt). May read small
        files; called where instances are built from declarations."""
        return self.default_health(options)

    @abstractmethod
    def launch(self, options: OptionsT, ctx: LaunchContext, env: dict[str, str]) -> PlanT:
        """The plan for one instance. `env` is the declaration's `env` table, unexpanded."""

    def extra_ports(self, options: OptionsT) -> tuple[str, ...]:
        """Names of more ports each instance needs beyond `{port}` (e.g. Triton's grpc and
        metrics): each gets an automatic port of its own, as `{port_<name>}`."""
        return ()

    def listens(self, options: OptionsT, env: dict[str, str]) -> bool:
        """Whether the backend binds its `{port}`: if so the port is checked before each start."""
        return True

    def preflight(self, options: OptionsT, ctx: LaunchContext, plan: PlanT) -> list[tuple[str, str]]:
        """What can be checked on this machine before `plan` replaces a running instance, as
        (key, problem) pairs: the program is installed, the directories exist
        (`supervisor.backends.checks`). Blocking (stats only). Default: nothing to check."""
        return []


#: A kind whose options and plan types are not known statically (the registry's, a model's).
AnyBackendKind = BackendKind[Any, Any]


class UnknownBackend(KeyError):
    """No kind of that name is registered (the message lists the known ones)."""


class KindRegistry(Protocol):
    """What reading a declaration needs of the registry of backend kinds. The one registry is
    `supervisor.backends.registry.Registry`; the composition root hands it in."""

    def get(self, name: str) -> AnyBackendKind:
        """The kind called `name`; raises `UnknownBackend` if there is none."""

    def names(self) -> list[str]: ...

    def __contains__(self, name: object) -> bool: ...
