"""The `docker` kind: any image, run as a container on the instance's GPUs.

Ports are published on 127.0.0.1 unless the declaration names another address: the old tool
published Triton's unauthenticated model-control API on every interface.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from supervisor.backends.base import (
    BackendKind,
    ContainerLaunch,
    DefaultHealth,
    LaunchContext,
    PlaceholderError,
    expand,
)
from supervisor.core.spec import StrictModel

_SIZE = re.compile(r"^\d+[bkmgBKMG]?$")
_ULIMIT_NAMES = {
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
}


class UlimitRange(StrictModel):
    soft: int
    hard: int


class DockerOptions(StrictModel):
    image: Annotated[str, Field(min_length=1)]
    #: Arguments after the image (its CMD); default: the image's own.
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    #: "bridge": the container gets its own network; its `container_port` is published on
    #: `bind_address`:{port}. "host": the server binds host ports itself (nothing published).
    network: Literal["bridge", "host", "none"] = "bridge"
    #: The port the server listens on inside the container (bridge network only).
    container_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    bind_address: str = "127.0.0.1"
    #: Extra published ports: "HOST:CONTAINER" or "ADDRESS:HOST:CONTAINER" (address 127.0.0.1 if omitted).
    publish: list[str] = []
    #: "HOST:CONTAINER" or "HOST:CONTAINER:ro"; a relative host path is relative to the declaration.
    volumes: list[str] = []
    shm_size: str | None = None
    ipc: Literal["private", "shareable", "host"] | None = None
    user: str | None = None
    #: {memlock = -1, stack = 67108864} (soft = hard) or {nofile = {soft = 1024, hard = 4096}}; -1 = unlimited.
    ulimits: dict[str, int | UlimitRange] = {}
    workdir: str | None = None
    pull: Literal["missing", "never", "always"] = "missing"

    @field_validator("bind_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @field_validator("shm_size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not _SIZE.match(value):
            raise ValueError(f"{value!r} is not a size like 2g, 512m or 1073741824")
        return value

    @field_validator("ulimits")
    @classmethod
    def _ulimit_names(cls, value: dict[str, int | UlimitRange]) -> dict[str, int | UlimitRange]:
        for name in value:
            if name not in _ULIMIT_NAMES:
                raise ValueError(f"unknown ulimit {name!r} (known: {', '.join(sorted(_ULIMIT_NAMES))})")
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[str]) -> list[str]:
        for spec in value:
            parts = spec.split(":")
            if (
                len(parts) not in (2, 3)
                or not all(parts[:2])
                or (len(parts) == 3 and parts[2] not in ("ro", "rw"))
            ):
                raise ValueError(f"{spec!r} is not HOST:CONTAINER or HOST:CONTAINER:ro")
            if not parts[1].startswith("/"):
                raise ValueError(f"{spec!r}: the container path must be absolute")
        return value

    @field_validator("publish")
    @classmethod
    def _publish(cls, value: list[str]) -> list[str]:
        for spec in value:
            _parse_publish(spec)
        return value

    @model_validator(mode="after")
    def _network_rules(self) -> DockerOptions:
        if self.network != "bridge" and (self.publish or self.container_port is not None):
            raise ValueError(
                f'publish and container_port need network = "bridge" (network is {self.network!r})'
            )
        return self


def _parse_publish(spec: str) -> tuple[str, int, int]:
    parts = spec.rsplit(":", 2)
    if len(parts) == 2:
        parts = ["127.0.0.1", *parts]
    try:
        address, host, container = parts[0], int(parts[1]), int(parts[2])
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{spec!r} is not HOST:CONTAINER or ADDRESS:HOST:CONTAINER") from None
    if not (1 <= host <= 65535 and 1 <= container <= 65535):
        raise ValueError(f"{spec!r}: ports must be 1-65535")
    return address, host, container


def container_env(ctx: LaunchContext, declared: dict[str, str]) -> dict[str, str]:
    """Inside a container the GPUs are renumbered from 0, so no host CUDA_VISIBLE_DEVICES;
    NVIDIA_VISIBLE_DEVICES matches the device request ("void" hides every GPU from a CPU-only
    instance even when the image sets "all")."""
    env = {key: expand(value, ctx, f"env.{key}") for key, value in declared.items()}
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ctx.gpus) or "void"
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["MODEL_SUPERVISOR_INSTANCE"] = ctx.instance_id
    if ctx.port:
        env["MODEL_SUPERVISOR_PORT"] = str(ctx.port)
    return env


def uses_port_placeholder(options: DockerOptions, env: dict[str, str]) -> bool:
    texts = [*(options.command or []), *(options.entrypoint or []), *env.values()]
    return any("{port}" in t for t in texts)


class DockerKind(BackendKind[DockerOptions, ContainerLaunch]):
    name = "docker"
    options_model = DockerOptions

    def listens(self, options: DockerOptions, env: dict[str, str]) -> bool:
        if options.network == "none":
            return False
        return options.container_port is not None or uses_port_placeholder(options, env)

    def default_health(self, options: DockerOptions) -> DefaultHealth:
        return DefaultHealth("tcp" if options.container_port is not None else "none")

    def launch(self, options: DockerOptions, ctx: LaunchContext, env: dict[str, str]) -> ContainerLaunch:
        return build_container(options, ctx, container_env(ctx, env))


def build_container(
    options: DockerOptions,
    ctx: LaunchContext,
    env: dict[str, str],
    command: list[str] | None = None,
    extra_volumes: tuple[tuple[str, str, str], ...] = (),
) -> ContainerLaunch:
    """The container plan for `options` (shared by presets that run in Docker)."""
    cmd = command if command is not None else options.command
    ports: list[tuple[str, int, int]] = []
    if options.network == "bridge" and ctx.port:
        ports.append((options.bind_address, ctx.port, options.container_port or ctx.port))
    ports += [_parse_publish(expand(p, ctx, f"publish[{i}]")) for i, p in enumerate(options.publish)]
    volumes = []
    for i, spec in enumerate(options.volumes):
        parts = expand(spec, ctx, f"volumes[{i}]").split(":")
        mode = parts[2] if len(parts) == 3 else "rw"
        volumes.append((ctx.resolve_path(parts[0]), parts[1], mode))
    ulimits = []
    for name, value in sorted(options.ulimits.items()):
        soft, hard = (value, value) if isinstance(value, int) else (value.soft, value.hard)
        ulimits.append((name, soft, hard))
    if options.image.strip() != options.image:
        raise PlaceholderError("image", f"{options.image!r} has surrounding spaces")
    return ContainerLaunch(
        image=expand(options.image, ctx, "image"),
        command=tuple(expand(a, ctx, f"command[{i}]") for i, a in enumerate(cmd))
        if cmd is not None
        else None,
        entrypoint=(
            tuple(expand(a, ctx, f"entrypoint[{i}]") for i, a in enumerate(options.entrypoint))
            if options.entrypoint is not None
            else None
        ),
        env=tuple(sorted(env.items())),
        gpus=ctx.gpus,
        network=options.network,
        ports=tuple(ports),
        volumes=tuple(volumes) + extra_volumes,
        shm_size=options.shm_size,
        ipc_mode=options.ipc,
        user=options.user,
        ulimits=tuple(ulimits),
        workdir=expand(options.workdir, ctx, "workdir") if options.workdir else None,
        pull=options.pull,
    )
