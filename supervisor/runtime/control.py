"""Run-time control that edits the *declared* state: what the API's start/stop/put/delete do.

An API start or stop is a change to a file in conf.d/, so what it did survives a restart of
the supervisor and the files never disagree with what runs. Each edit:

1. reads the model's file from disk (refusing to build on a file that currently has errors),
2. computes the new document and validates it exactly like a file dropped by hand
   (422 naming the field) and checks it against the other declarations (409 naming the
   occupant of a port or GPU),
3. writes it atomically (temp file, fsync, rename) and applies it at once through the
   engine; the watcher then sees a directory that already matches.

Edits are serialised (one lock for all of conf.d/: per file is not enough when two new
models race for one port), so concurrent storms end in a state that matches the files.
"""

from __future__ import annotations

import asyncio
import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.adapters import confd, storage
from supervisor.config.declarations import (
    ConfigError,
    DeclarationInvalid,
    ModelSpec,
    parse_declaration,
    preflight,
)
from supervisor.config.desired import Catalog
from supervisor.core import tomledit
from supervisor.core.spec import is_valid_name
from supervisor.core.states import Desired, State
from supervisor.runtime.engine import EditConflict, Engine
from supervisor.runtime.instance import Instance

#: After a stop or delete, how long beyond the instance's stop timeout we wait for it to go.
STOP_MARGIN = 15.0


class ControlError(Exception):
    """A request the controller refuses, with what to tell the caller. What kind of refusal it
    is (the subclass) decides the HTTP status, in `supervisor.api.errors`: no status here."""

    def __init__(self, detail: Any, **extra: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else "invalid request")
        self.detail = detail
        self.extra = extra


class NotFound(ControlError):
    """No such model or instance."""


class Conflict(ControlError):
    """It clashes with what is declared or running (a port, a GPU, a file with errors)."""


class Forbidden(ControlError):
    """Not something this API may do (kill a process that is not a GPU process of ours)."""


class Invalid(ControlError):
    """Invalid input, as FastAPI-shaped items: {"type", "loc", "msg"}, so old clients parse it."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__(items)


class StorageFailed(ControlError):
    """Something could not be written (`full`: the disk is full; otherwise a read-only file
    system, permissions, ...). Nothing was changed."""

    def __init__(self, exc: OSError, path: Path | str, what: str = "nothing was changed") -> None:
        super().__init__(f"{storage.describe(exc, path)}; {what}")
        self.full = storage.is_full(exc)


class UpstreamFailed(ControlError):
    """The backend itself failed to come up (a start with `wait`)."""


def invalid(loc: list[str | int], msg: str, type: str = "value_error") -> Invalid:
    return Invalid([{"type": type, "loc": loc, "msg": msg}])


def config_errors_to_items(errors: list[ConfigError], prefix: list[str | int]) -> list[dict[str, Any]]:
    return [
        {"type": e.type, "loc": prefix + list(e.loc or ((e.key,) if e.key else ())), "msg": e.message}
        for e in errors
    ]


FAILED_STATES = (State.BACKOFF, State.FATAL, State.EXITED)
#: Without --wait, how long an answer waits for the new process to exist (its pid).
LAUNCH_WAIT = 5.0
SETTLE_POLL = 0.05


def took_effect(inst: Instance, old_pid: int | None, until_running: bool) -> bool:
    """Has a start/restart visibly happened? A new pid (STARTING or RUNNING; RUNNING with
    `until_running`), a failure, or the instance is no longer meant to run."""
    if inst.desired != Desired.RUNNING or inst.state in FAILED_STATES:
        return True
    if inst.pid is None or inst.pid == old_pid:
        return inst.state == State.RUNNING and old_pid is None and inst.pid is None  # e.g. no pid to show
    return inst.state == State.RUNNING or (inst.state == State.STARTING and not until_running)


async def settle(
    instances: list[Instance], old_pids: dict[str, int | None], until_running: bool, timeout: float
) -> None:
    """Wait (up to `timeout`) until every instance's start or restart took effect.

    Polled rather than awaited on transitions: the pid appears without a state change."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(took_effect(i, old_pids.get(i.id), until_running) for i in instances):
        if loop.time() >= deadline:
            return
        await asyncio.sleep(SETTLE_POLL)


def read_document(path: Path) -> tomledit.TOMLDocument | None:
    """The file in `path` as a style-keeping document, None if there is no such file (blocking).

    Edits are applied to this document (not to a re-serialised dict), so the user's comments,
    layout and key order survive them."""
    try:
        # The same guarded read as the watcher's: a FIFO named x.toml must not hang the edit.
        return tomledit.parse(confd.read_limited(path).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (tomledit.TomlError, UnicodeDecodeError, confd.Unreadable) as exc:
        raise Conflict(f"{path} cannot be read ({exc}); fix it by hand or replace it with PUT") from None


def render(current: tomledit.TOMLDocument | None, new: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The text to write for `new` (carried onto `current` when there is one) and that text as
    tomllib reads it: what is validated is exactly what the watcher will read back."""
    doc = tomledit.apply(current, new) if current is not None else tomledit.new_document(new)
    text = tomledit.dumps(doc)
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # tomlkit wrote something tomllib rejects: do not write it
        raise Conflict(f"the edited declaration would not read back as TOML ({exc})") from None


def _gpu_entries(doc: dict[str, Any]) -> list[int | list[int]]:
    gpus = doc.get("gpus", "none")
    return list(gpus) if isinstance(gpus, list) else []


def first_null(document: dict[str, Any]) -> list[str | int] | None:
    """Where the first None in `document` is (its key path), or None (iterative: any depth)."""
    stack: list[tuple[Any, list[str | int]]] = [(document, [])]
    while stack:
        value, where = stack.pop()
        if value is None:
            return where
        if isinstance(value, dict):
            stack.extend((v, [*where, k]) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, [*where, i]) for i, v in reversed(list(enumerate(value))))
    return None


class Controller:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = asyncio.Lock()

    # -- reading ------------------------------------------------------------------------------
    def check_name(self, name: str, loc: list[str | int]) -> None:
        """422 before any path is built from a name that is not a valid model name."""
        if not is_valid_name(name):
            raise invalid(
                loc,
                f"{name!r} is not a valid model name (1-64 letters, digits, '.', '_', '-', "
                "starting with a letter or digit; not status, supported, start or stop)",
            )

    def model(self, name: str) -> ModelSpec:
        self.check_name(name, ["path", "name"])
        spec = self.engine.catalog.models.get(name)
        if spec is None:
            raise NotFound(f"Model '{name}' not found.")
        return spec

    def instances_of(self, name: str) -> list[Instance]:
        return sorted(self.engine.model_instances(name), key=lambda i: i.spec.gpus)

    def path_for(self, name: str) -> Path:
        owner = self.engine.catalog.owners.get(name)
        return Path(owner) if owner else self.engine.settings.conf_dir / f"{name}.toml"

    # -- the original API: start / stop on a GPU ----------------------------------------------
    async def start_on_gpu(
        self, name: str, model_type: str | None, gpu_id: int, config: dict[str, Any]
    ) -> Instance:
        self.check_name(name, ["body", "model_name"])
        registry = self.engine.registry
        if model_type is not None and model_type not in registry:
            raise invalid(
                ["body", "model_type"],
                f"unknown backend {model_type!r} (known: {', '.join(registry.names())})",
                "enum",
            )
        spec = self.engine.catalog.models.get(name)
        if spec is not None:
            if model_type is not None and model_type != spec.decl.backend:
                raise Conflict(
                    f"model '{name}' is declared with backend '{spec.decl.backend}' in {spec.source}, "
                    f"not '{model_type}'"
                )
            if config:
                raise invalid(
                    ["body", "config"],
                    f"must be empty for model '{name}', which is already declared in "
                    f"{spec.source}; change its declaration with PUT /api/v1/models/{name}",
                )
            if spec.decl.gpus == "none":
                raise Conflict(f"model '{name}' runs without GPUs (gpus = \"none\" in {spec.source})")
            current = self._instance_on(name, gpu_id)
            if current is not None and spec.decl.enabled:
                current.start("start requested through the API")
                return current

            def add_gpu(doc: dict[str, Any] | None) -> dict[str, Any]:
                if doc is None:
                    raise Conflict(f"{self.path_for(name)} disappeared; declare '{name}' again")
                entries = _gpu_entries(doc)
                if not any(gpu_id == e or (isinstance(e, list) and gpu_id in e) for e in entries):
                    entries.append(gpu_id)
                doc["gpus"] = entries
                if doc.get("enabled") is False:
                    del doc["enabled"]  # the default (see set_enabled)
                return doc

            await self._edit(name, add_gpu, ["body", "config"], f"start {name} on GPU {gpu_id}")
        else:
            if model_type is None:
                raise invalid(
                    ["body", "model_type"],
                    f"required: model '{name}' is not declared yet "
                    f"(known backends: {', '.join(registry.names())})",
                    "missing",
                )
            doc = dict(config)
            for key, value in (("name", name), ("backend", model_type)):
                if key in doc and doc[key] != value:
                    raise invalid(
                        ["body", "config", key], f"must be {value!r} (from the request) or left out"
                    )
            if "gpus" in doc:
                raise invalid(["body", "config", "gpus"], "is set from gpu_id; leave it out")
            doc.update(name=name, backend=model_type, gpus=[gpu_id])

            def create(existing: dict[str, Any] | None) -> dict[str, Any]:
                if existing is not None:
                    raise Conflict(
                        f"{self.path_for(name)} already exists but does not declare a valid model '{name}'"
                    )
                return doc

            await self._edit(name, create, ["body", "config"], f"declare {name} on GPU {gpu_id}")
        inst = self._instance_on(name, gpu_id)
        if inst is None:  # the declaration is in force but this instance is not (should not happen)
            raise Conflict(f"model '{name}' has no instance on GPU {gpu_id} after the change")
        return inst

    async def stop_on_gpu(
        self, name: str | None, model_type: str | None, gpu_id: int | None, instance_id: str | None
    ) -> Instance:
        """The old tool's stop: the instance named by `instance_id` or by its GPU. Either alone
        is enough; a CPU-only model (gpus = "none") needs neither, since it has one instance,
        which the old body could not name (issue 12: 422, gpu_id required)."""
        if name is None:  # instance_id alone: the model is the instance's
            if instance_id is None:
                raise invalid(["body", "model_name"], "required unless instance_id is given", "missing")
            found = self.engine.instances.get(instance_id)
            if found is None:
                raise NotFound(f"Instance '{instance_id}' not found.")
            name = found.spec.model
        self.check_name(name, ["body", "model_name"])
        spec = self.engine.catalog.models.get(name)
        if instance_id is not None:
            where = f"instance '{instance_id}'" + (f" on GPU {gpu_id}" if gpu_id is not None else "")
            not_found = NotFound(f"Model '{name}' has no running {where}.")
        elif gpu_id is not None:
            not_found = NotFound(f"Model '{name}' not found or not running on GPU {gpu_id}.")
        else:
            not_found = NotFound(f"Model '{name}' not found or not running.")
        if spec is None:
            raise not_found
        if model_type is not None and model_type != spec.decl.backend:
            raise Conflict(
                f"model '{name}' is declared with backend '{spec.decl.backend}', not '{model_type}'"
            )
        if instance_id is not None:
            inst = self.engine.instances.get(instance_id)
        elif gpu_id is not None:
            inst = self._instance_on(name, gpu_id)
        elif spec.decl.gpus == "none":
            inst = next(iter(self.engine.model_instances(name)), None)
        else:
            raise invalid(
                ["body", "gpu_id"],
                f"required: model '{name}' runs on GPUs (gpus = {spec.decl.gpus!r} "
                f"in {spec.source}); give gpu_id or instance_id",
                "missing",
            )
        if inst is None or inst.spec.model != name or (gpu_id is not None and gpu_id not in inst.spec.gpus):
            raise not_found
        if not inst.spec.gpus:
            return await self._stop_cpu_only(name, inst, not_found)
        if spec.decl.gpus == "auto":
            # Its GPUs are chosen at run time, so there is no entry of `gpus` to remove.
            raise Conflict(
                f"model '{name}' places its instances itself (gpus = \"auto\" in {spec.source}); "
                f"lower `instances` with PUT /api/v1/models/{name}, or stop every instance with "
                f"POST /api/v1/models/{name}/disable"
            )
        gpus = list(inst.spec.gpus)

        def remove_gpu(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                raise not_found
            entries = _gpu_entries(doc)
            doc["gpus"] = [e for e in entries if (list(e) if isinstance(e, list) else [e]) != gpus]
            return doc

        await self._edit(name, remove_gpu, ["body"], f"stop {name} on GPU {'-'.join(map(str, gpus))}")
        await self._wait_gone([inst])
        return inst

    async def _stop_cpu_only(self, name: str, inst: Instance, not_found: NotFound) -> Instance:
        # A CPU-only model has no GPU entry to remove: the stop is `enabled = false` (what
        # POST /models/{name}/disable writes), so the file stays and the model remains known.
        # Already disabled is the old "not running" 404, like a second stop on a GPU.
        spec = self.engine.catalog.models.get(name)
        if spec is None or not spec.decl.enabled:
            raise not_found
        await self._set_enabled_file(name, False)
        try:
            await asyncio.wait_for(inst.wait_state(State.STOPPED), inst.spec.stop.timeout + STOP_MARGIN)
        except TimeoutError:
            pass  # answered with the state it is in; the stop goes on
        return inst

    # -- whole declarations -----------------------------------------------------------------------
    async def put(self, name: str, document: dict[str, Any]) -> tuple[ModelSpec, bool]:
        self.check_name(name, ["path", "name"])
        if "name" in document and document["name"] != name:
            raise invalid(["body", "name"], f"must be {name!r} (the name in the path) or left out")
        document = {**document, "name": name}
        created = False

        def replace_with(_current: dict[str, Any] | None) -> dict[str, Any]:
            # Decided under the edit lock: of 50 concurrent PUTs of one new model, only the first
            # creates it (deciding before the lock answered 201 to nearly all of them, issue 11).
            nonlocal created
            created = name not in self.engine.catalog.models
            return document

        spec = await self._edit(name, replace_with, ["body"], f"put {name}", replace=True)
        assert spec is not None
        return spec, created

    async def delete(self, name: str) -> list[str]:
        self.model(name)
        instances = self.instances_of(name)
        await self._edit(name, lambda _current: None, ["body"], f"delete {name}", replace=True)
        await self._wait_gone(instances)
        return [inst.id for inst in instances]

    async def set_enabled(self, name: str, enabled: bool) -> list[Instance]:
        spec = self.model(name)
        if spec.decl.enabled != enabled:
            await self._set_enabled_file(name, enabled)
        instances = self.instances_of(name)
        if enabled:
            # Answer after the instances took the intent (so the caller sees STARTING, not the
            # STOPPED of a moment ago).
            await asyncio.gather(*(inst.start("start requested through the API") for inst in instances))
        else:
            await asyncio.gather(
                *(
                    asyncio.wait_for(inst.wait_state(State.STOPPED), inst.spec.stop.timeout + STOP_MARGIN)
                    for inst in instances
                ),
                return_exceptions=True,
            )
        return instances

    async def set_enabled_all(self, enabled: bool) -> tuple[list[Instance], list[dict[str, str]]]:
        """`set_enabled` for every declared model (supervisorctl's `stop all` / `start all`).

        The files are edited one after another (edits are serialised anyway); the waits run
        together, so a stop-all takes as long as the slowest stop, not their sum. A model whose
        edit is refused is reported and the others go ahead."""
        failed: list[dict[str, str]] = []

        async def one(name: str) -> list[Instance]:
            try:
                return await self.set_enabled(name, enabled)
            except ControlError as exc:
                failed.append({"model": name, "error": str(exc.detail)})
                return []

        names = sorted(self.engine.catalog.models)
        if enabled:
            groups = [await one(name) for name in names]
        else:
            # Edit every file first, then wait for all instances at once.
            for name in names:
                spec = self.engine.catalog.models.get(name)
                if spec is not None and spec.decl.enabled:
                    try:
                        await self._set_enabled_file(name, False)
                    except ControlError as exc:
                        failed.append({"model": name, "error": str(exc.detail)})
            groups = list(await asyncio.gather(*(one(name) for name in names)))
        return sorted((i for g in groups for i in g), key=lambda i: i.id), failed

    async def _set_enabled_file(self, name: str, enabled: bool) -> None:
        def toggle(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                raise NotFound(f"Model '{name}' not found.")
            # `enabled` defaults to true: enabling drops the key rather than writing
            # `enabled = true`, so a stop and a start leave a hand-written (or git-tracked)
            # file exactly as it was.
            if enabled:
                doc.pop("enabled", None)
            else:
                doc["enabled"] = False
            return doc

        await self._edit(name, toggle, ["body"], f"{'enable' if enabled else 'disable'} {name}")

    async def restart(self, name: str) -> list[Instance]:
        self.model(name)
        instances = self.instances_of(name)
        await asyncio.gather(*(inst.restart("restart requested through the API") for inst in instances))
        return instances

    # -- helpers ---------------------------------------------------------------------------------
    def _instance_on(self, name: str, gpu_id: int) -> Instance | None:
        for inst in self.engine.model_instances(name):
            if gpu_id in inst.spec.gpus:
                return inst
        return None

    async def _wait_gone(self, instances: list[Instance]) -> None:
        waits = [
            asyncio.wait_for(asyncio.shield(inst.finished), inst.spec.stop.timeout + STOP_MARGIN)
            for inst in instances
        ]
        await asyncio.gather(*waits, return_exceptions=True)

    async def _edit(
        self,
        name: str,
        change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
        loc: list[str | int],
        what: str,
        replace: bool = False,
    ) -> ModelSpec | None:
        engine = self.engine
        async with self._lock:
            path = self.path_for(name)
            errors = engine.catalog.errors.get(str(path))
            if errors and not replace:
                raise Conflict(
                    f"{path} has errors ({'; '.join(e.message for e in errors)}); fix it or replace it "
                    f"with PUT /api/v1/models/{name}"
                )
            current = None if replace and errors else await asyncio.to_thread(read_document, path)
            new = change(copy.deepcopy(tomledit.plain(current)) if current is not None else None)
            candidate: ModelSpec | None = None
            if new is None:

                async def write(catalog: Catalog, ports: dict[str, int]) -> None:  # stores no state
                    try:
                        await asyncio.to_thread(path.unlink, True)
                    except IsADirectoryError:
                        raise Conflict(
                            f"{path} is a directory, not a declaration; remove it by hand"
                        ) from None
                    except OSError as exc:
                        raise StorageFailed(exc, path) from None

            else:
                null_at = first_null(new)
                if null_at is not None:  # JSON null has no TOML form: a 422, not a failed write
                    raise invalid(
                        loc + null_at,
                        "null has no TOML equivalent: leave the key out (or give a value)",
                        "null_value",
                    )
                text, new = render(current, new)
                try:
                    candidate = parse_declaration(new, path, engine.registry, engine.defaults)
                except DeclarationInvalid as exc:
                    raise Invalid(config_errors_to_items(exc.errors, loc)) from None
                problems = await asyncio.to_thread(preflight, candidate)  # the program, the paths
                if problems:
                    raise Invalid(config_errors_to_items(problems, loc))

                async def write(catalog: Catalog, ports: dict[str, int]) -> None:
                    await self._write_all_or_nothing(path, text, catalog, ports)

            try:
                await engine.apply_edit(path, candidate, write, f"API: {what}")
            except EditConflict as exc:
                raise Conflict(str(exc)) from None
            except OSError as exc:  # the state dir filled up since the checks
                raise StorageFailed(
                    exc,
                    exc.filename or engine.settings.state_dir,
                    f"{path} is written and applies once the state dir can be written",
                ) from None
            return engine.catalog.models.get(name)

    async def _write_all_or_nothing(
        self, path: Path, text: str, catalog: Catalog, ports: dict[str, int]
    ) -> None:
        """The state first (ports.json, placements.json), then the declaration: an edit is in
        force completely or not at all. With a full state disk the first write fails and
        nothing is changed; a port recorded for a file that then cannot be written is taken
        back (issue 11: a 500, yet the file written and an auto port missing from ports.json)."""
        engine = self.engine
        state_dir = engine.settings.state_dir
        # A start needs its log file too: a state dir that takes no write at all refuses the edit
        # here, rather than a model declared now failing to start with a misleading reason.
        failure = await asyncio.to_thread(storage.probe, state_dir)
        if failure is not None:
            raise StorageFailed(failure, state_dir)
        try:
            if ports:
                await asyncio.to_thread(engine.ports.record, dict(ports))
            if catalog.placement_record() != engine.catalog.placement_record():
                await asyncio.to_thread(engine.save_placements, catalog)
        except OSError as exc:
            raise StorageFailed(exc, exc.filename or state_dir) from None
        try:
            await asyncio.to_thread(confd.write_atomic, path, text)
        except OSError as exc:
            if ports:
                try:
                    await asyncio.to_thread(engine.ports.record, dict.fromkeys(ports))
                except OSError:  # harmless: an unused assignment, dropped when the range runs short
                    pass
            if isinstance(exc, IsADirectoryError):
                raise Conflict(f"{path} is a directory, not a declaration; remove it by hand") from None
            raise StorageFailed(exc, path) from None
