"""One contract for every backend kind in the registry: built-ins, presets and any kind added
later. A kind registered without an entry in MINIMAL fails here, so none goes untested."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest
import tomli_w

from supervisor.adapters.confd import read_dir
from supervisor.adapters.ports import PortAllocator
from supervisor.backends.base import (
    BackendKind,
    ContainerLaunch,
    DefaultHealth,
    HealthType,
    LaunchContext,
    ProcessLaunch,
)
from supervisor.backends.registry import default_registry
from supervisor.config.declarations import Defaults
from supervisor.config.desired import Catalog, resolve

REGISTRY = default_registry(load_plugins=False)
KINDS = REGISTRY.names()
USER = "marker-{instance}-{port}-{gpu_count}"  # a user string with placeholders in it


@dataclass(frozen=True)
class Minimal:
    keys: dict[str, Any]  # the kind's keys of a minimal valid declaration
    user: Callable[[str], dict[str, Any]]  # those keys with `s` in a user-supplied string
    user_key: str  # the key that string is reported under


MINIMAL: dict[str, Minimal] = {
    "process": Minimal({"command": ["true"]}, lambda s: {"command": ["true", s]}, "command[1]"),
    "docker": Minimal(
        {"image": "busybox"}, lambda s: {"image": "busybox", "command": ["echo", s]}, "command[1]"
    ),
    "triton": Minimal(
        {"model_repository": "models"},
        lambda s: {"model_repository": "models", "extra_args": [s]},
        "extra_args[0]",
    ),
    "comfyui": Minimal(
        {"comfyui_path": "ComfyUI"},
        lambda s: {"comfyui_path": "ComfyUI", "extra_args": ["--verbose", s]},
        "extra_args[1]",
    ),
    "vllm": Minimal(
        {"model": "facebook/opt-125m"},
        lambda s: {"model": "facebook/opt-125m", "extra_args": [s]},
        "extra_args[0]",
    ),
    "textgen": Minimal(
        {"textgen_path": "text-generation-webui"},
        lambda s: {"textgen_path": "text-generation-webui", "extra_args": [s]},
        "extra_args[0]",
    ),
}


def test_every_registered_kind_has_a_minimal_declaration() -> None:
    missing = sorted(set(KINDS) - set(MINIMAL))
    assert not missing, (
        f"add a minimal declaration to MINIMAL for {missing}: the contract must cover every kind"
    )


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> BackendKind:
    if request.param not in MINIMAL:
        pytest.fail(f"backend kind {request.param!r} has no minimal declaration in MINIMAL")
    return REGISTRY.get(request.param)


def load(tmp_path: Path, doc: dict[str, Any]) -> tuple[Catalog, Path]:
    conf = tmp_path / "conf.d"
    conf.mkdir(exist_ok=True)
    path = conf / "decl.toml"
    path.write_text(tomli_w.dumps(doc))
    # The contract is about declarations and plans; the servers are not installed here, so the
    # checks of this machine are left out (tests/test_hostile_declarations.py has them).
    parsed = read_dir(conf, REGISTRY, Defaults(), host_checks=False)
    ports = PortAllocator(30000, 30999, is_free=lambda _p: True)
    return resolve(parsed, Catalog(), ports.assign, tmp_path / "work"), path


def declaration(kind: BackendKind, keys: dict[str, Any], **common: Any) -> dict[str, Any]:
    return {"name": "m", "backend": kind.name, **common, **keys}


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_name_matches_its_registry_key(kind: BackendKind) -> None:
    assert isinstance(kind, BackendKind)
    assert REGISTRY.get(kind.name) is kind
    assert re.fullmatch(r"[a-z][a-z0-9_-]*", kind.name)


def test_options_model_is_strict(kind: BackendKind, tmp_path: Path) -> None:
    config = kind.options_model.model_config
    assert config.get("extra") == "forbid" and config.get("strict") is True and config.get("frozen") is True
    catalog, path = load(tmp_path, declaration(kind, {**MINIMAL[kind.name].keys, "surely_not_a_key": 1}))
    found = [(e.key, e.message) for e in catalog.errors[str(path)]]
    assert any(key == "surely_not_a_key" and message.startswith("unknown key") for key, message in found), (
        found
    )


@pytest.mark.parametrize("gpus", ["none", [0], [[0, 1]]], ids=["cpu", "one-gpu", "two-gpus"])
def test_minimal_declaration_loads(kind: BackendKind, tmp_path: Path, gpus: Any) -> None:
    catalog, path = load(tmp_path, declaration(kind, MINIMAL[kind.name].keys, gpus=gpus))
    assert not catalog.errors, catalog.errors
    assert "m" in catalog.models and len(catalog.instances) == 1
    (inst,) = catalog.instances.values()
    assert isinstance(inst.launch, ProcessLaunch | ContainerLaunch)
    assert inst.launch.runner in ("process", "docker")
    assert dict(inst.extra_ports).keys() == set(kind.extra_ports(catalog.models["m"].options))


def test_default_health_is_valid(kind: BackendKind) -> None:
    options = kind.options_model.model_validate(MINIMAL[kind.name].keys)
    health = kind.default_health(options)
    assert isinstance(health, DefaultHealth)
    assert health.type in get_args(HealthType)
    assert health.path is None or (health.type == "http" and health.path.startswith("/"))
    assert isinstance(kind.listens(options, {}), bool)
    names = kind.extra_ports(options)
    assert isinstance(names, tuple) and all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names)


@pytest.mark.parametrize("gpus", [(), (2,), (0, 1)], ids=["cpu", "one-gpu", "two-gpus"])
def test_launch_is_pure_and_deterministic(kind: BackendKind, tmp_path: Path, gpus: tuple[int, ...]) -> None:
    """launch() also runs at load time to check placeholders: it must read and write nothing."""
    here, work = tmp_path / "here", tmp_path / "work"
    here.mkdir()
    options = kind.options_model.model_validate(MINIMAL[kind.name].keys)

    def context() -> LaunchContext:
        extra = tuple((name, 31000 + i) for i, name in enumerate(kind.extra_ports(options)))
        return LaunchContext("m@x", "m", gpus, 30000, here, extra_ports=extra, work_dir=work / "m@x")

    before = snapshot(tmp_path)
    first = kind.launch(options, context(), {"GREETING": "hi {name}"})
    second = kind.launch(options, context(), {"GREETING": "hi {name}"})
    assert first == second
    assert first.fingerprint() == second.fingerprint()
    json.dumps(first.fingerprint())  # JSON as it is: no default=str needed
    assert snapshot(tmp_path) == before and not any(here.iterdir()) and not work.exists()
    assert dict(first.env)["GREETING"] == "hi m"
    for step in first.prepare:  # work deferred to launch time: frozen data, part of the fingerprint
        assert dataclasses.is_dataclass(step) and type(step).__dataclass_params__.frozen
        assert callable(step.run)


def test_placeholders_in_user_strings_are_expanded(kind: BackendKind, tmp_path: Path) -> None:
    catalog, _ = load(tmp_path, declaration(kind, MINIMAL[kind.name].user(USER), gpus=[[0, 1]], port=9000))
    assert not catalog.errors, catalog.errors
    plan = json.dumps(catalog.instances["m@gpu0-1"].launch.fingerprint())
    assert "marker-m@gpu0-1-9000-2" in plan
    assert "{instance}" not in plan


def test_unknown_placeholder_is_a_load_error_naming_the_key(kind: BackendKind, tmp_path: Path) -> None:
    minimal = MINIMAL[kind.name]
    catalog, path = load(tmp_path, declaration(kind, minimal.user("--x={nope}")))
    found = [(e.key, e.message) for e in catalog.errors.get(str(path), [])]
    assert any(
        key == minimal.user_key and "unknown placeholder {nope}" in message for key, message in found
    ), found
    assert "m" not in catalog.models
