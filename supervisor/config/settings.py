"""Global settings: field defaults < settings TOML file < `MODEL_SUPERVISOR_*` env vars < CLI flags.

Nested keys use a double underscore in env vars: `MODEL_SUPERVISOR_RESTART__MAX_RETRIES=3`.
The settings file is named by `--settings` or `MODEL_SUPERVISOR_SETTINGS_FILE`; its tables
mirror the fields (`[restart]`, `[health]`, `[stop]`).
"""

from __future__ import annotations

import contextvars
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from supervisor.config.declarations import Defaults
from supervisor.core.spec import NODE_LABEL_RE, HealthSpec, RestartSpec, StopSpec

ENV_PREFIX = "MODEL_SUPERVISOR_"
SETTINGS_FILE_ENV = ENV_PREFIX + "SETTINGS_FILE"

_settings_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("settings_file", default=None)

_LAX = ConfigDict(extra="forbid", strict=False, frozen=True)


# Env vars arrive as strings, so the defaults tables accept "3" for 3 (declarations do not).
class RestartDefaults(RestartSpec):
    model_config = _LAX


class HealthDefaults(HealthSpec):
    model_config = _LAX


class StopDefaults(StopSpec):
    model_config = _LAX


class SettingsError(Exception):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    conf_dir: Path = Path("conf.d")
    state_dir: Path = Path("state")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 6004
    #: Automatic instance ports come from this inclusive range ("20000-20999" or [20000, 20999]).
    port_range: Annotated[tuple[int, int], NoDecode] = (20000, 20999)
    log_level: str = "INFO"
    #: Per-instance log files are copy-truncated past this size; 0 disables rotation.
    log_max_bytes: Annotated[int, Field(ge=0)] = 50 * 1024 * 1024
    log_backups: Annotated[int, Field(ge=0)] = 5
    log_check_interval: Annotated[float, Field(gt=0)] = 10.0
    #: Full re-read of conf.d/ as a safety net behind the file watcher (seconds).
    resync_interval: Annotated[float, Field(gt=0)] = 30.0
    #: What SIGTERM/SIGINT of `serve` does to the instances: "stop" them all (the default), or
    #: "keep" them running and recorded, for the next `serve` on this state dir to adopt (upgrades).
    on_exit: Literal["stop", "keep"] = "stop"
    #: Per-run cgroups (cgroup v2, root or a delegated subtree): "auto" uses them where possible,
    #: "off" keeps runs together by environment marks and the subreaper only.
    cgroups: Literal["auto", "off"] = "auto"
    restart: RestartDefaults = RestartDefaults()
    health: HealthDefaults = HealthDefaults()
    stop: StopDefaults = StopDefaults()
    #: Where GPU facts come from: "auto" (NVML if it loads, else none), "nvml", "simulated"
    #: (read from `gpu_simulated_file`, for demos and tests), or "none".
    gpu_source: Literal["auto", "nvml", "simulated", "none"] = "auto"
    #: In cluster mode, `{node}` in this path becomes each node's label ("local" here).
    gpu_simulated_file: Path | None = None
    gpu_sample_interval: Annotated[float, Field(gt=0)] = 1.0
    #: GPU processes that belong to no instance: "report" them, or "kill" them (after
    #: `strays_kill_after` seconds), per GPU with `strays_per_gpu = {3 = "kill"}`.
    strays: Literal["report", "kill"] = "report"
    strays_per_gpu: dict[int, Literal["report", "kill"]] = {}
    strays_allow_names: list[str] = []  # process names never killed (e.g. "Xorg")
    strays_allow_users: list[str] = []  # users whose processes are never killed
    strays_kill_after: Annotated[float, Field(ge=0)] = 30.0
    #: Before a restart on a GPU, wait this long for the previous run's memory to be released.
    gpu_release_timeout: Annotated[float, Field(ge=0)] = 60.0
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    #: Host header values accepted beyond the bound address, localhost, 127.0.0.1 and [::1] (the
    #: names a reverse proxy forwards): "name" (any port) or "name:port"; "*" turns the check off.
    allowed_hosts: Annotated[list[str], NoDecode] = []
    #: Origins (besides the server's own) allowed to send state-changing requests, e.g.
    #: "https://gpu.example.com"; also the only origins accepted on the unix socket.
    allowed_origins: Annotated[list[str], NoDecode] = []
    #: Also serve the API on this unix socket (mode 0600: only this user and root can connect).
    unix_socket: Path | None = None
    #: Serve the API on host:port; false: only on `unix_socket`.
    listen_tcp: bool = True

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        # Env vars: a JSON list or "a,b"; TOML: a list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host or any(c in host for c in "/ \t@") or "://" in host:
                raise ValueError(
                    f'{host!r} is not a host name (expected "name" or "name:port", no scheme or path)'
                )
        return [host.lower().rstrip(".") for host in value]

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            scheme, sep, rest = origin.strip().rstrip("/").partition("://")
            if (
                not sep
                or scheme.lower() not in ("http", "https")
                or not rest
                or any(c in rest for c in "/ ?#@")
            ):
                raise ValueError(f'{origin!r} is not an origin (expected "http(s)://host[:port]", no path)')
            out.append(f"{scheme.lower()}://{rest.lower()}")
        return out

    @model_validator(mode="after")
    def _check_listeners(self) -> Settings:
        if not self.listen_tcp and self.unix_socket is None:
            raise ValueError("listen_tcp = false needs unix_socket (the API would not be reachable at all)")
        return self

    @field_validator("port_range", mode="before")
    @classmethod
    def _parse_range(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            low, sep, high = text.partition("-")
            if not sep:
                raise ValueError(f'expected "LOW-HIGH", e.g. "20000-20999", got {value!r}')
            return (int(low), int(high))
        return value

    @model_validator(mode="after")
    def _check_range(self) -> Settings:
        low, high = self.port_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port_range {low}-{high} is not a range of ports (1-65535, low <= high)")
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _settings_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def defaults(self) -> Defaults:
        """The declaration defaults, re-validated as the strict declaration models."""
        return Defaults(
            restart=RestartSpec.model_validate(self.restart.model_dump()),
            health=HealthSpec.model_validate(self.health.model_dump()),
            stop=StopSpec.model_validate(self.stop.model_dump()),
            cluster=self.cluster == "ray",
            nodes=frozenset(self.ray_nodes),
        )

    def token(self) -> str | None:
        if self.api_token is not None:
            return self.api_token.get_secret_value() or None
        if self.api_token_file is not None:
            try:
                return self.api_token_file.read_text().strip() or None
            except OSError as exc:
                raise SettingsError(
                    f"cannot read api_token_file {self.api_token_file}: {exc.strerror}"
                ) from None
        return None

    # -- cluster mode (issue 14); nothing imports Ray unless cluster = "ray" -------------------
    #: "ray": process declarations run on the nodes of the Ray cluster at `ray_address`.
    cluster: Literal["none", "ray"] = "none"
    ray_address: str | None = None  # "HEAD:6379"
    #: Node labels declarations may name in `node` (empty: any, checked when placing).
    ray_nodes: Annotated[list[str], NoDecode] = []
    #: The Python that runs the Ray driver helper (a venv with `model-supervisor[ray]`).
    ray_python: str | None = None
    #: How long a run may wait for a node with its GPUs free before the start fails.
    ray_placement_timeout: Annotated[float, Field(gt=0)] = 30.0
    #: How long a run survives an unreachable cluster before it counts as lost.
    ray_unreachable_grace: Annotated[float, Field(ge=0)] = 30.0
    #: Ray ends a driver this long after it loses its head (RAY_gcs_rpc_server_reconnect_timeout_s).
    ray_reconnect_timeout: Annotated[int, Field(ge=1)] = 60

    @field_validator("ray_nodes", mode="before")
    @classmethod
    def _parse_nodes(cls, value: Any) -> Any:
        if isinstance(value, str):  # env: a JSON list or "a,b"
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [p.strip() for p in text.split(",") if p.strip()]
            )
        return value

    @field_validator("ray_nodes")
    @classmethod
    def _node_labels(cls, value: list[str]) -> list[str]:
        for label in value:
            if not NODE_LABEL_RE.match(label) or label == "local":
                raise ValueError(
                    f"{label!r} is not a node label (1-32 lower-case letters, digits or '-'; not \"local\")"
                )
        return value

    @model_validator(mode="after")
    def _cluster_needs_address(self) -> Settings:
        if self.cluster == "ray" and not self.ray_address:
            raise ValueError('cluster = "ray" needs ray_address (the head, e.g. "10.0.0.1:6379")')
        return self


def load_settings(settings_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings; `overrides` (CLI flags) win, None values are ignored."""
    path = settings_file or os.environ.get(SETTINGS_FILE_ENV) or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"settings file {path} does not exist")
    token = _settings_file.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        origin = (
            f" (settings file {path}, env {ENV_PREFIX}*, flags)" if path else f" (env {ENV_PREFIX}*, flags)"
        )
        raise SettingsError("invalid settings" + origin + ":\n" + "\n".join(lines)) from None
    except ValueError as exc:  # TOML syntax in the settings file, undecodable env values
        where = f"settings file {path} or " if path else ""
        raise SettingsError(f"invalid settings ({where}env {ENV_PREFIX}*): {exc}") from None
    finally:
        _settings_file.reset(token)
