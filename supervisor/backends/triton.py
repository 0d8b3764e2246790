"""The `triton` preset: NVIDIA Triton Inference Server, in Docker (default) or as a local binary.

One server per instance, loading `models` at start (`--model-control-mode=explicit
--load-model=M`). What it fixes in the old tool's runner:

* config.pbtxt is never written into the user's repository (weakness 26): each start builds an
  overlay repository in the instance's work dir, one directory per model holding the generated
  config.pbtxt and symlinks to everything else of the original model directory. A template's
  own `instance_group` is replaced, not duplicated.
* The `gpus:` of the generated instance_group are the ids the *server* sees, 0..n-1 (weakness
  25): inside a container the device request renumbers the GPUs from 0, and a local
  tritonserver gets CUDA_VISIBLE_DEVICES (in PCI bus order), which renumbers them the same way.
* Ports are published on 127.0.0.1 unless `bind_address` says otherwise, and a local or
  host-network server binds that address itself (weakness 15).
* Model names are checked before they go into paths (weakness 16).
* Readiness is /v2/health/ready, which (strict readiness, Triton's default) waits for every
  loaded model, not /v2/health/live (weakness 29).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator

from ..spec import StrictModel
from . import checks
from .base import BackendKind, DefaultHealth, LaunchContext, LaunchPlan, ProcessLaunch, instance_env
from .docker import DockerOptions, UlimitRange, build_container, container_env
from .preset import (BindAddress, ModelName, NonEmpty, OptionError, executable, expand_all, local_path,
                     model_name, reject_flags)

DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:25.04-py3"
TEMPLATE = "config.pbtxt.template"
CONFIG = "config.pbtxt"
OVERLAY = "model_repository"
CONTAINER_REPOSITORY = "/models"
#: Triton's own ports inside a container on a bridge network (its defaults).
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}

OWNED_FLAGS = {
    "--model-repository": "model_repository",
    "--model-store": "model_repository",
    "--model-control-mode": "models",
    "--load-model": "models",
    "--http-port": "port",
    "--grpc-port": "port (the automatic grpc port)",
    "--metrics-port": "port (the automatic metrics port)",
    "--http-address": "bind_address",
    "--grpc-address": "bind_address",
    "--metrics-address": "bind_address",
}

TritonArg = Annotated[str, AfterValidator(reject_flags(OWNED_FLAGS))]
PositiveInt = Annotated[int, Field(ge=1)]


def _docker_rule(key: str) -> AfterValidator:
    """Check a Docker key by the `docker` kind's own rules (one source of truth), reported
    under this preset's key."""

    def check(value: Any) -> Any:
        try:
            DockerOptions.model_validate({"image": "x", key: value})
        except ValidationError as exc:
            messages = (e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError("; ".join(messages)) from None
        return value

    return AfterValidator(check)


#: Keys that only mean something in one mode; setting one in the other mode is an error.
DOCKER_KEYS = ("image", "network", "shm_size", "volumes", "ulimits", "ipc", "pull", "user")
PROCESS_KEYS = ("tritonserver",)


class TritonOptions(StrictModel):
    mode: Literal["docker", "process"] = "docker"
    #: The host directory with one subdirectory per model; relative to this file. Only read.
    model_repository: NonEmpty
    #: Models loaded at start; default: the declaration's name.
    models: Annotated[list[ModelName], Field(min_length=1)] | None = None
    #: Instances of each model on each of the instance's GPUs: one number, or per model
    #: ({MAM = 8, FastFitAll = 1}; models not listed get 1). Applied through config.pbtxt.template.
    instances_per_gpu: PositiveInt | dict[ModelName, PositiveInt] = 1
    extra_args: list[TritonArg] = []
    #: Where ports are published (docker, bridge network) or the server binds (otherwise).
    bind_address: BindAddress = "127.0.0.1"
    # mode = "process"
    tritonserver: NonEmpty = "tritonserver"
    # mode = "docker"
    image: NonEmpty = DEFAULT_IMAGE
    network: Literal["bridge", "host"] = "bridge"
    shm_size: Annotated[str, _docker_rule("shm_size")] | None = "2g"
    volumes: Annotated[list[str], _docker_rule("volumes")] = []
    ulimits: Annotated[dict[str, int | UlimitRange], _docker_rule("ulimits")] = {}
    ipc: Literal["private", "shareable", "host"] | None = None
    pull: Literal["missing", "never", "always"] = "missing"
    user: NonEmpty | None = None

    @field_validator("instances_per_gpu", mode="before")
    @classmethod
    def _counts(cls, value: object) -> object:
        # Checked by hand before the type check: a union's own errors list every alternative
        # ("should be >= 1", "should be a valid dictionary") and bury the real problem.
        shape = "a number of instances (>= 1) or a table of them by model, e.g. {MAM = 8, FastFitAll = 1}"
        counts = value if isinstance(value, dict) else {None: value}
        for model, count in counts.items():
            if model is not None:
                model_name(model)
            if type(count) is not int or count < 1:
                where = f" for {model!r}" if model is not None else ""
                raise ValueError(f"must be {shape}; got {count!r}{where}")
        return value

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            seen = set()
            for name in value:
                if name in seen:
                    raise ValueError(f"{name!r} is listed twice")
                seen.add(name)
        return value


class TritonKind(BackendKind):
    name = "triton"
    options_model = TritonOptions

    def default_health(self, options: TritonOptions) -> DefaultHealth:  # type: ignore[override]
        return DefaultHealth("http", "/v2/health/ready")

    def extra_ports(self, options: TritonOptions) -> tuple[str, ...]:  # type: ignore[override]
        return ("grpc", "metrics")

    def listens(self, options: TritonOptions, env: dict[str, str]) -> bool:  # type: ignore[override]
        return True

    def launch(self, options: TritonOptions, ctx: LaunchContext, env: dict[str, str]) -> LaunchPlan:  # type: ignore[override]
        _check_mode_keys(options)
        models = options.models or [ctx.model]
        counts = _instance_counts(options, models)
        repository = local_path(options.model_repository, ctx, "model_repository")
        overlay = os.path.abspath(ctx.work_dir / OVERLAY)
        step = TritonRepositoryOverlay(
            repository=repository,
            overlay=overlay,
            models=tuple((m, counts[m]) for m in models),
            # The ids as the server sees them: a container's device request and a local
            # server's CUDA_VISIBLE_DEVICES both renumber the instance's GPUs from 0.
            gpus=tuple(range(len(ctx.gpus))),
            instance=ctx.instance_id,
        )
        server_ports = options.mode == "process" or options.network == "host"
        argv = ["--model-repository=" + (overlay if options.mode == "process" else CONTAINER_REPOSITORY),
                "--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
        if server_ports:
            address = options.bind_address
            argv += [f"--http-port={ctx.port}", f"--grpc-port={ctx.port_of('grpc')}",
                     f"--metrics-port={ctx.port_of('metrics')}", f"--http-address={address}",
                     f"--grpc-address={address}", f"--metrics-address={address}"]
        argv += expand_all(options.extra_args, ctx, "extra_args")

        if options.mode == "process":
            return ProcessLaunch(argv=(executable(options.tritonserver, ctx, "tritonserver"), *argv),
                                 env=tuple(sorted(instance_env(ctx, env).items())), prepare=(step,))

        bridge = options.network == "bridge"
        docker = DockerOptions(
            image=options.image,
            network=options.network,
            container_port=CONTAINER_PORTS["http"] if bridge else None,
            bind_address=options.bind_address,
            publish=[f"{options.bind_address}:{ctx.port_of(name)}:{CONTAINER_PORTS[name]}"
                     for name in ("grpc", "metrics")] if bridge else [],
            volumes=options.volumes,
            shm_size=options.shm_size,
            ipc=options.ipc,
            user=options.user,
            ulimits=options.ulimits,
            pull=options.pull,
        )
        # The overlay's symlinks point at absolute host paths, so the user's repository is
        # mounted (read-only) at the same path inside the container for them to resolve.
        mounts = ((repository, repository, "ro"), (overlay, CONTAINER_REPOSITORY, "ro"))
        plan = build_container(docker, ctx, container_env(ctx, env), extra_volumes=mounts)
        for i, (host, container, _) in enumerate(plan.volumes[:len(options.volumes)]):
            if host == repository or container in (repository, CONTAINER_REPOSITORY):
                raise OptionError(f"volumes[{i}]",
                                  f"{options.volumes[i]!r} collides with the model repository mounts "
                                  f"({repository} and {CONTAINER_REPOSITORY} are the supervisor's)")
        return dataclasses.replace(plan, command=("tritonserver", *argv), prepare=(step,))

    def preflight(self, options: TritonOptions, ctx: LaunchContext, plan: LaunchPlan) -> list[checks.Problem]:  # type: ignore[override]
        # Both modes read the repository on this machine (a container gets it bind-mounted).
        step = next(s for s in plan.prepare if isinstance(s, TritonRepositoryOverlay))
        problems = checks.directory(step.repository, "model_repository")
        if not problems:
            missing = [m for m, _ in step.models if not os.path.isdir(os.path.join(step.repository, m))]
            if missing:
                problems.append(("models" if options.models else "model_repository",
                                 f"{step.repository} has no directory for model(s) {', '.join(missing)}"))
        if isinstance(plan, ProcessLaunch):
            problems += checks.program(plan.argv[0], dict(plan.env), None, "tritonserver")
        return problems


def _check_mode_keys(options: TritonOptions) -> None:
    wrong = PROCESS_KEYS if options.mode == "docker" else DOCKER_KEYS
    for key in wrong:
        if key in options.model_fields_set:
            other = "process" if options.mode == "docker" else "docker"
            raise OptionError(key, f'{key} applies to mode = "{other}" only (mode is "{options.mode}")')


def _instance_counts(options: TritonOptions, models: list[str]) -> dict[str, int]:
    per_gpu = options.instances_per_gpu
    if isinstance(per_gpu, int):
        return {m: per_gpu for m in models}
    for name in per_gpu:
        if name not in models:
            raise OptionError("instances_per_gpu",
                              f"{name!r} is not one of the models loaded ({', '.join(models)})")
    return {m: per_gpu.get(m, 1) for m in models}


# --- the overlay repository (runs in a thread right before each launch) ---------------------


@dataclass(frozen=True, slots=True)
class TritonRepositoryOverlay:
    """Builds `overlay`: for each model a directory with a generated config.pbtxt and symlinks
    to every other entry of `repository/<model>`. The user's repository is only read."""

    repository: str
    overlay: str
    models: tuple[tuple[str, int], ...]  # (model, instances per GPU)
    gpus: tuple[int, ...]  # as the server sees them; () = a CPU-only instance
    instance: str

    def run(self) -> None:
        repository = Path(self.repository)
        if not repository.is_dir():
            raise ValueError(f"model_repository {repository} is not a directory")
        for model, _ in self.models:
            if not (repository / model).is_dir():
                present = sorted(p.name for p in repository.iterdir() if p.is_dir())
                raise ValueError(f"model {model!r} has no directory in {repository} "
                                 f"(it has: {', '.join(present) or 'nothing'})")
        # Everything is read and rendered before anything is written: a bad template fails
        # the launch without leaving half an overlay.
        built = [self._model_contents(repository / model, count) for model, count in self.models]
        # Rebuilt in place rather than swapped for a new directory: a container adopted after
        # a supervisor restart has this very directory bind-mounted at /models.
        target = Path(self.overlay)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        target.mkdir(parents=True, exist_ok=True)
        wanted = {model for model, _ in self.models}
        for entry in target.iterdir():
            if entry.name not in wanted:  # a model no longer listed
                _remove(entry)
        for (model, _), (links, config) in zip(self.models, built):
            dest = target / model
            _remove(dest)  # stale entries (a removed version directory) go with it
            dest.mkdir()
            for entry in links:
                os.symlink(entry, dest / entry.name)
            if config is not None:
                (dest / CONFIG).write_text(config, encoding="utf-8")

    def _model_contents(self, source: Path, count: int) -> tuple[list[Path], str | None]:
        """The entries to link and the generated config.pbtxt (None: no template)."""
        template = source / TEMPLATE
        has_template = template.is_file()
        links = [entry for entry in sorted(source.iterdir())
                 if entry.name != TEMPLATE and not (has_template and entry.name == CONFIG)]
        if not has_template:
            return links, None
        try:
            return links, render_config(template.read_text(encoding="utf-8"), count, self.gpus, self.instance)
        except ValueError as exc:
            raise ValueError(f"{template}: {exc}") from None


def _remove(path: Path) -> None:
    # rmtree unlinks symlinks without following them: the user's files are never touched.
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def render_config(template: str, count: int, gpus: tuple[int, ...], instance: str) -> str:
    """The template without its own `instance_group`, plus the one for this instance."""
    body = strip_instance_groups(template).rstrip()
    if gpus:
        entry = (f"  {{\n    count: {count}\n    kind: KIND_GPU\n"
                 f"    gpus: [ {', '.join(str(g) for g in gpus)} ]\n  }}")
    else:
        entry = f"  {{\n    count: {count}\n    kind: KIND_CPU\n  }}"
    block = (f"# instance_group generated by model-supervisor for {instance}\n"
             f"instance_group [\n{entry}\n]\n")
    return f"{body}\n\n{block}" if body else block


_IDENT = re.compile(r"[A-Za-z0-9_]")
_FIELD = "instance_group"
_OPEN, _CLOSE = "{[<", "}]>"


def strip_instance_groups(text: str) -> str:
    """Remove every top-level `instance_group` field (`instance_group [ ... ]` or a repeated
    `instance_group { ... }`) from protobuf text, skipping comments and strings."""
    out: list[str] = []
    copied = 0
    depth = 0
    i = _next_code(text, 0)
    while i < len(text):
        c = text[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif (depth == 0 and text.startswith(_FIELD, i) and (i == 0 or not _IDENT.match(text[i - 1]))
              and not _IDENT.match(text[i + len(_FIELD):i + len(_FIELD) + 1])):
            start, end = _field_span(text, i)
            out.append(text[copied:start])
            copied = end
            i = _next_code(text, end)
            continue
        i = _next_code(text, i + 1)
    out.append(text[copied:])
    return "".join(out)


def _next_code(text: str, i: int) -> int:
    """The first index at or after `i` that is outside comments and strings."""
    while i < len(text):
        if text[i] == "#":
            i = _line_end(text, i)
        elif text[i] in "\"'":
            i = _string_end(text, i)
        else:
            return i
    return len(text)


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _string_end(text: str, i: int) -> int:
    quote, i = text[i], i + 1
    while i < len(text) and text[i] != quote and text[i] != "\n":
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _skip_blank(text: str, i: int) -> int:
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text[i] == "#":
            i = _line_end(text, i)
        else:
            break
    return i


def _field_span(text: str, at: int) -> tuple[int, int]:
    """[start, end) of the field whose name starts at `at`, widened to whole lines when the
    field has its lines to itself (so no blank line is left behind)."""
    line = text.count("\n", 0, at) + 1
    i = _skip_blank(text, at + len(_FIELD))
    if i < len(text) and text[i] == ":":
        i = _skip_blank(text, i + 1)
    if i >= len(text) or text[i] not in _OPEN:
        raise ValueError(f"cannot read the instance_group on line {line}: expected [ or {{ after it")
    depth = 0
    while i < len(text):
        c = text[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                break
        i = _next_code(text, i + 1)
    else:
        raise ValueError(f"cannot read the instance_group on line {line}: its brackets are not closed")
    end = i + 1
    while end < len(text) and text[end] in " \t":
        end += 1
    if end < len(text) and text[end] in ",;":  # protobuf text allows a separator after a field
        end += 1
    start = at
    while start > 0 and text[start - 1] in " \t":
        start -= 1
    if (start == 0 or text[start - 1] == "\n") and (end == len(text) or text[end] == "\n"):
        end = min(end + 1, len(text))
    else:
        start = at
    return start, end
