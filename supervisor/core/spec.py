"""The declaration format: what one `conf.d/*.toml` file may say, as pydantic models.

Everything here is pure (no I/O). The models are strict: TOML already has types, so a
string where a number belongs is the user's mistake and is reported, not coerced.
Backend-specific keys (`command`, `image`, ...) live in each backend kind's own options
model; `supervisor.config.declarations` validates a file against both.
"""

from __future__ import annotations

import re
import signal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: A model name becomes a file name (`conf.d/<name>.toml`), a log file name and part of
#: instance ids and container names, so nothing outside this set is accepted. The first
#: character may not be a dot: a leading dot would make a hidden file the watcher ignores.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: `node = "<label>"`: part of instance ids, Ray actor names and a Ray node label value.
NODE_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

#: Set by the supervisor from `gpus`; a declaration that sets them would desynchronise
#: what the process sees from what the supervisor (and NVML attribution) believes.
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"})

Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]
GpuIndex = Annotated[int, Field(ge=0, le=1023)]
Port = Annotated[int, Field(ge=1, le=65535)]


#: Names that are API paths (`GET /api/v1/models/status`): a model so named could not be
#: addressed as `/api/v1/models/{name}`.
RESERVED_NAMES = frozenset({"status", "supported", "start", "stop"})


def is_valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and name not in RESERVED_NAMES


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RestartSpec(StrictModel):
    """`[restart]`: what happens when an instance exits or fails to become ready."""

    policy: Literal["always", "on-failure", "never"] = "always"
    initial_delay: Seconds = 2.0
    factor: Annotated[float, Field(ge=1)] = 2.0
    max_delay: Seconds = 300.0
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    min_uptime: Seconds = 60.0
    max_retries: Annotated[int, Field(ge=0)] = 5
    fatal_cooldown: Seconds = 900.0
    success_exit_codes: list[Annotated[int, Field(ge=0, le=255)]] = [0]

    @model_validator(mode="after")
    def _cap_not_below_initial(self) -> RestartSpec:
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"max_delay ({self.max_delay}) is smaller than initial_delay ({self.initial_delay})"
            )
        return self


class HealthSpec(StrictModel):
    """`[health]`: how readiness (STARTING -> RUNNING) and liveness are decided."""

    type: Literal["http", "tcp", "none"] | None = None  # None: the backend kind's default
    path: str | None = None  # http only; None: the backend kind's default
    #: http only: the liveness path once RUNNING. None: the kind's liveness path when `path`
    #: is the kind's default too, else `path` (Triton: ready for readiness, live for liveness).
    live_path: str | None = None
    interval: PositiveSeconds = 10.0
    start_interval: PositiveSeconds = 1.0
    timeout: PositiveSeconds = 5.0
    start_timeout: PositiveSeconds = 600.0
    failure_threshold: Annotated[int, Field(ge=1)] = 3

    @field_validator("path", "live_path")
    @classmethod
    def _path_is_absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value


class StopSpec(StrictModel):
    """`[stop]`: how an instance is asked to go, and how long it gets before SIGKILL."""

    signal: str = "SIGTERM"
    timeout: Seconds = 30.0

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name not in signal.Signals.__members__ or name in {"SIGKILL", "SIGSTOP"}:
            raise ValueError(f"unknown or unusable stop signal {value!r} (e.g. SIGTERM, SIGINT, SIGQUIT)")
        return name

    @property
    def signum(self) -> int:
        return int(signal.Signals[self.signal])


GpuEntry = GpuIndex | list[GpuIndex]


class Declaration(StrictModel):
    """The keys every declaration has, whatever its backend kind."""

    name: str
    backend: str
    description: str = ""
    enabled: bool = True
    gpus: list[GpuEntry] | Literal["none", "auto"] = "none"
    #: With gpus = "auto": how many instances, how many GPUs each, and the free memory (MiB)
    #: a GPU needs to be chosen (counting what other declared instances will still need).
    instances: Annotated[int, Field(ge=1, le=1024)] = 1
    gpus_per_instance: Annotated[int, Field(ge=1, le=64)] = 1
    min_free_memory_mb: Annotated[int, Field(ge=0)] = 0
    #: By default an instance holds its GPUs alone; instances that all set this may share one.
    share_gpus: bool = False
    port: Port | Literal["auto"] = "auto"
    env: dict[str, str] = {}
    restart: RestartSpec = RestartSpec()
    health: HealthSpec = HealthSpec()
    stop: StopSpec = StopSpec()
    #: Cluster mode (issue 14): the label of the node it runs on, "local" for this machine;
    #: unset: any node with its GPUs free. A load error without `cluster = "ray"` in the settings.
    node: str | None = None

    @field_validator("node")
    @classmethod
    def _node_label(cls, value: str | None) -> str | None:
        if value is not None and not NODE_LABEL_RE.match(value):
            raise ValueError(
                f"{value!r} is not a node label: use 1 to 32 lower-case letters, digits or '-',"
                " starting and ending with a letter or digit"
            )
        return value

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(
                f"{value!r} is not a valid model name: use 1 to 64 letters, digits, '.', '_' or '-',"
                " starting with a letter or digit"
                + (
                    " (and not one of the reserved names " + ", ".join(sorted(RESERVED_NAMES)) + ")"
                    if value in RESERVED_NAMES
                    else ""
                )
            )
        return value

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_sets_are_disjoint(cls, value: object) -> object:
        # Checked by hand before the type check: a union's default errors list every
        # alternative ("should be a list", "should be 'none'") and bury the real problem.
        if value in ("none", "auto"):
            return value
        shape = 'a list of GPU indices (e.g. [0, 2]; [[0, 1]] for one instance on two GPUs), "auto" or "none"'
        if not isinstance(value, list):
            raise ValueError(f"must be {shape}, got {value!r}")
        seen: set[int] = set()
        for entry in value:
            group = entry if isinstance(entry, list) else [entry]
            if not group:
                raise ValueError('an instance\'s GPU list may not be empty (use gpus = "none" for CPU only)')
            for gpu in group:
                if type(gpu) is not int or not 0 <= gpu <= 1023:
                    raise ValueError(f"must be {shape}; {gpu!r} is not a GPU index (0-1023)")
                if gpu in seen:
                    raise ValueError(f"GPU {gpu} is listed more than once in this model")
                seen.add(gpu)
        return value

    @field_validator("port", mode="before")
    @classmethod
    def _port_or_auto(cls, value: object) -> object:
        if value == "auto" or (type(value) is int and 1 <= value <= 65535):
            return value
        raise ValueError(f'must be a port number (1-65535) or "auto", got {value!r}')

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if key in RESERVED_ENV:
                raise ValueError(f"{key} is set by the supervisor from `gpus`; remove it from env")
        return value

    @model_validator(mode="after")
    def _auto_only_keys(self) -> Declaration:
        if self.gpus != "auto":
            for key in ("instances", "gpus_per_instance"):
                if key in self.model_fields_set:
                    raise ValueError(
                        f'{key} only applies with gpus = "auto" (list the GPUs of each instance instead)'
                    )
        return self

    def gpu_sets(self) -> list[tuple[int, ...]]:
        """One tuple per instance; `()` is the single CPU-only instance of `gpus = "none"`.
        With `gpus = "auto"` the GPUs are chosen at run time (`supervisor.core.placement`)."""
        if self.gpus == "auto":
            raise ValueError('gpus = "auto": the GPU sets come from placement')
        if self.gpus == "none":
            return [()]
        return [(entry,) if isinstance(entry, int) else tuple(entry) for entry in self.gpus]

    def sample_gpu_sets(self) -> list[tuple[int, ...]]:
        """GPU sets of the right shape, for checking a declaration before any placement."""
        if self.gpus == "auto":
            return [tuple(range(self.gpus_per_instance))] * self.instances
        return self.gpu_sets()


#: Keys of `Declaration`; every other top-level key belongs to the backend kind.
COMMON_KEYS = frozenset(Declaration.model_fields)


def instance_id(model: str, gpus: tuple[int, ...], node: str | None = None) -> str:
    """Stable, readable ids: `llama@gpu0`, `llama@gpu0-1` (tensor parallel), `demo@cpu`; on a
    named cluster node `llama@gpu-a:gpu1` (`node` None, "*" or "local": no node in the id)."""
    where = f"{node}:" if node not in (None, "*", "local") else ""
    if not gpus:
        return f"{model}@{where}cpu"
    return f"{model}@{where}gpu" + "-".join(str(g) for g in gpus)


def instance_port(base: int, gpus: tuple[int, ...]) -> int:
    """An explicit `port` is a base: the instance whose lowest GPU is g listens on base + g.

    Keyed on the GPU index rather than the list position, so adding or removing one GPU of a
    model never moves the ports of its other instances (and never restarts them).
    """
    return base + (min(gpus) if gpus else 0)
