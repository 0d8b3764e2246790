"""The one registry of backend kinds: built-ins plus third-party kinds from entry points.

A plugin package declares, in its pyproject.toml:

    [project.entry-points."model_supervisor.backends"]
    mykind = "my_package.module:MyKind"

where `MyKind` is a `BackendKind` subclass (or an instance of one). A plugin that fails to
load is logged and listed in `plugin_errors`; it never stops the supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points

from supervisor.backends.base import AnyBackendKind, BackendKind
from supervisor.core.launch import UnknownBackend

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "model_supervisor.backends"

__all__ = ["ENTRY_POINT_GROUP", "Registry", "UnknownBackend", "builtin_kinds", "default_registry"]


class Registry:
    """The kinds by name (a `supervisor.core.launch.KindRegistry`, as the config layer sees it)."""

    def __init__(self, kinds: Iterable[AnyBackendKind] = ()) -> None:
        self._kinds: dict[str, AnyBackendKind] = {}
        self.plugin_errors: dict[str, str] = {}
        for kind in kinds:
            self.register(kind)

    def register(self, kind: AnyBackendKind) -> None:
        if kind.name in self._kinds:
            raise ValueError(f"backend kind {kind.name!r} is already registered")
        self._kinds[kind.name] = kind

    def get(self, name: str) -> AnyBackendKind:
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownBackend(f"unknown backend {name!r} (known: {', '.join(self.names())})") from None

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def __iter__(self) -> Iterator[AnyBackendKind]:
        return iter(self._kinds.values())

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in entry_points(group=group):
            try:
                obj = ep.load()
                kind = obj() if isinstance(obj, type) else obj
                if not isinstance(kind, BackendKind):
                    raise TypeError(f"{ep.value} is not a BackendKind")
                if kind.name != ep.name:
                    raise ValueError(f"entry point {ep.name!r} loads kind named {kind.name!r}")
                self.register(kind)
                log.info("loaded backend kind %r from %s", ep.name, ep.value)
            except Exception as exc:  # a broken plugin must not take the supervisor down
                self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                log.error("backend plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)


def builtin_kinds() -> list[AnyBackendKind]:
    from supervisor.backends.comfyui import ComfyUIKind
    from supervisor.backends.docker import DockerKind
    from supervisor.backends.process import ProcessKind
    from supervisor.backends.textgen import TextgenKind
    from supervisor.backends.triton import TritonKind
    from supervisor.backends.vllm import VllmKind

    return [ProcessKind(), DockerKind(), TritonKind(), ComfyUIKind(), VllmKind(), TextgenKind()]


def default_registry(load_plugins: bool = True) -> Registry:
    registry = Registry(builtin_kinds())
    if load_plugins:
        registry.load_entry_points()
    return registry
