"""Turning the contents of one declaration file into a validated `ModelSpec`, or errors.

Pure: the caller reads the file (see `supervisor.adapters.confd`). Errors always name the file and
the key (or the line, for TOML syntax) and say what was wrong with which value, and all of a
file's errors are reported at once so a user fixes them in one pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from supervisor.core.launch import (
    AnyBackendKind,
    KindRegistry,
    LaunchContext,
    PlaceholderError,
    UnknownBackend,
)
from supervisor.core.spec import COMMON_KEYS, Declaration, HealthSpec, RestartSpec, StopSpec, instance_id


@dataclass(frozen=True, slots=True)
class ConfigError:
    file: str
    message: str
    key: str | None = None
    line: int | None = None
    loc: tuple[str | int, ...] = ()  # the key as a path ("command", 2), for API error locations
    type: str = "value_error"  # pydantic's error type, e.g. "missing", "extra_forbidden"
    #: About this machine rather than the file's text (a program not installed): such errors
    #: are checked again at every reload instead of being cached with the file.
    machine: bool = False

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "key": self.key, "line": self.line, "message": self.message}


class DeclarationInvalid(Exception):
    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class Defaults:
    """Global defaults for the `[restart]`, `[health]` and `[stop]` tables (from settings)."""

    restart: RestartSpec = field(default_factory=RestartSpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    stop: StopSpec = field(default_factory=StopSpec)
    #: Cluster mode (settings `cluster = "ray"`) and the node labels declarations may name
    #: (settings `ray_nodes`; empty: any label, checked when the instance is placed).
    cluster: bool = False
    nodes: frozenset[str] = frozenset()


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """One valid declaration: the common keys, the kind's options and where it came from."""

    decl: Declaration
    options: BaseModel
    kind: AnyBackendKind
    source: Path
    raw: dict[str, Any]  # the document as written, without defaults filled in
    #: Where its instances run: None on this machine (the process or docker runner); in
    #: cluster mode "*" (any node with the GPUs free) or a node label (issue 14).
    node: str | None = None

    @property
    def name(self) -> str:
        return self.decl.name

    def effective_document(self) -> dict[str, Any]:
        """Every key with its effective value, defaults included (for `status` and the API)."""
        doc = self.decl.model_dump(mode="json", exclude_none=True)
        doc.update(self.options.model_dump(mode="json", exclude_none=True))
        return doc


#: Deeper than any declaration needs (a table of lists of lists is 3). Checked before anything
#: recursive (pydantic, hashing, JSON) sees the document: 50,000 nested arrays were a
#: RecursionError that stopped `serve` from starting (issue 11).
MAX_DEPTH = 32


def hostile_values(data: Any, file: str) -> list[ConfigError]:
    """Nesting over MAX_DEPTH, and NUL bytes in any key or string (no program, path or
    environment variable can hold one: exec would fail with "embedded null byte").
    Iterative, so no document can make it recurse."""
    errors: list[ConfigError] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if len(loc) > MAX_DEPTH:
            return [
                ConfigError(
                    file,
                    f"nested more than {MAX_DEPTH} levels deep (at {key_of(loc[:3])}...)",
                    key=key_of(loc[:1]),
                    loc=loc[:1],
                    type="too_deep",
                )
            ]
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and "\0" in k:
                    errors.append(
                        ConfigError(
                            file,
                            f"the key {k!r} contains a NUL byte",
                            key=key_of(loc) or None,
                            loc=loc,
                            type="nul_byte",
                        )
                    )
                stack.append((v, (*loc, k)))
        elif isinstance(value, list):
            stack.extend((v, (*loc, i)) for i, v in enumerate(value))
        elif isinstance(value, str) and "\0" in value:
            errors.append(
                ConfigError(
                    file, f"contains a NUL byte (got {value!r})", key=key_of(loc), loc=loc, type="nul_byte"
                )
            )
    return sorted(errors, key=lambda e: str(e.key))


_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def toml_error(file: str, exc: Exception) -> ConfigError:
    message = str(exc)
    match = _TOML_LINE.search(message)
    line = int(match.group(1)) if match else None
    return ConfigError(file, f"TOML syntax error: {message}", line=line)


def key_of(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def pydantic_errors(
    file: str, exc: ValidationError, prefix: tuple[int | str, ...] = (), known: list[str] | None = None
) -> list[ConfigError]:
    errors = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        key = key_of(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            hint = f" (accepted here: {', '.join(known)})" if known and len(err["loc"]) == 1 else ""
            message = f"unknown key{hint}"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
            if kind != "value_error" and "input" in err:
                message += f" (got {err['input']!r})"
        errors.append(ConfigError(file, message, key=key, loc=loc, type=kind))
    return errors


def _loc_of(key: str) -> tuple[str | int, ...]:
    """`command[2]` -> ("command", 2); `env.X` -> ("env", "X")."""
    loc: list[str | int] = []
    for part in key.split("."):
        name, *indexes = part.replace("]", "").split("[")
        loc.append(name)
        loc.extend(int(i) for i in indexes)
    return tuple(loc)


def _with_defaults(data: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    merged = dict(data)
    for table, default in (
        ("restart", defaults.restart),
        ("health", defaults.health),
        ("stop", defaults.stop),
    ):
        given = data.get(table, {})
        if isinstance(given, dict):
            merged[table] = {**default.model_dump(exclude_none=True), **given}
    return merged


def parse_declaration(
    data: dict[str, Any], source: Path, registry: KindRegistry, defaults: Defaults | None = None
) -> ModelSpec:
    """Validate one declaration document. Raises `DeclarationInvalid` with every error found."""
    file = str(source)
    defaults = defaults or Defaults()
    if not isinstance(data, dict):
        raise DeclarationInvalid(
            [ConfigError(file, f"a declaration is a table of keys, got {type(data).__name__}")]
        )
    hostile = hostile_values(data, file)
    if hostile:
        raise DeclarationInvalid(hostile)
    common = {k: v for k, v in data.items() if k in COMMON_KEYS}
    extra = {k: v for k, v in data.items() if k not in COMMON_KEYS}
    errors: list[ConfigError] = []

    decl: Declaration | None = None
    try:
        decl = Declaration.model_validate(_with_defaults(common, defaults))
    except ValidationError as exc:
        errors += pydantic_errors(file, exc)

    kind: AnyBackendKind | None = None
    backend = data.get("backend")
    if isinstance(backend, str):
        try:
            kind = registry.get(backend)
        except UnknownBackend as exc:
            errors.append(ConfigError(file, exc.args[0], key="backend", loc=("backend",), type="enum"))

    options: BaseModel | None = None
    if kind is not None:
        known = sorted(COMMON_KEYS | set(kind.options_model.model_fields))
        try:
            options = kind.options_model.model_validate(extra)
        except ValidationError as exc:
            errors += pydantic_errors(file, exc, known=known)
    elif extra and backend is None:
        errors.append(
            ConfigError(file, "required key is missing", key="backend", loc=("backend",), type="missing")
        )

    if decl is not None and kind is not None and options is not None:
        # Expand every template once now, so a bad placeholder is a load error with its key
        # instead of a launch failure discovered later in a crash loop.
        runner = "process"
        for gpus in decl.sample_gpu_sets() or [()]:  # a model with no instance is still checked
            ports = tuple((name, 1) for name in kind.extra_ports(options))
            ctx = LaunchContext(
                instance_id(decl.name, gpus), decl.name, gpus, 1, source.parent, extra_ports=ports
            )
            try:
                runner = kind.launch(options, ctx, decl.env).runner
            except PlaceholderError as exc:
                errors.append(ConfigError(file, str(exc), key=exc.key, loc=_loc_of(exc.key)))
                break
            except ValueError as exc:
                errors.append(ConfigError(file, str(exc)))
                break

    node: str | None = None
    if decl is not None and kind is not None and options is not None and not errors:
        node, problems = _where(decl, runner, defaults, file)
        errors += problems

    if errors:
        raise DeclarationInvalid(errors)
    assert decl is not None and kind is not None and options is not None
    return ModelSpec(decl=decl, options=options, kind=kind, source=source, raw=dict(data), node=node)


def _where(
    decl: Declaration, runner: str, defaults: Defaults, file: str
) -> tuple[str | None, list[ConfigError]]:
    """Where a declaration's instances run (ModelSpec.node), or why its `node` is wrong."""

    def error(key: str, message: str) -> tuple[None, list[ConfigError]]:
        return None, [ConfigError(file, message, key=key, loc=(key,))]

    if not defaults.cluster:
        if decl.node is not None:
            return error("node", f'node = {decl.node!r} needs cluster mode: cluster = "ray" in the settings')
        return None, []
    if decl.node == "local":
        return None, []
    if runner != "process":
        if decl.node is not None:
            return error(
                "node",
                f"node = {decl.node!r}: only process backends run on cluster nodes; "
                f'{decl.backend} runs on this machine (remove node, or set node = "local")',
            )
        return None, []
    if defaults.nodes and decl.node is not None and decl.node not in defaults.nodes:
        known = ", ".join(sorted(defaults.nodes))
        return error("node", f'unknown node {decl.node!r} (ray_nodes in the settings: {known}, or "local")')
    return decl.node or "*", []


def preflight(spec: ModelSpec) -> list[ConfigError]:
    """What this machine can tell before the declaration replaces anything: the program is
    installed and executable, the directories it needs are there (the kind's `preflight`).
    Blocking (stats only); the caller is a reader of conf.d/ or the API, off the event loop.

    A declaration that fails here is refused like a syntax error, so a hot edit naming a
    program that does not exist keeps the last good instance running (issue 11)."""
    decl, kind, file = spec.decl, spec.kind, str(spec.source)
    gpus = (decl.sample_gpu_sets() or [()])[0]
    extra = tuple((name, 1) for name in kind.extra_ports(spec.options))
    ctx = LaunchContext(
        instance_id(decl.name, gpus), decl.name, gpus, 1, spec.source.parent, extra_ports=extra
    )
    try:
        problems = kind.preflight(spec.options, ctx, kind.launch(spec.options, ctx, decl.env))
    except Exception as exc:  # a plugin's check that breaks is reported, not a failed reload
        return [ConfigError(file, f"checking the launch failed: {type(exc).__name__}: {exc}", machine=True)]
    return [
        ConfigError(file, message, key=key, loc=_loc_of(key), type="preflight", machine=True)
        for key, message in problems
    ]
