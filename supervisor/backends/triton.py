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
  loaded model, not /v2/health/live (weakness 29). Liveness, once RUNNING, is /v2/health/live:
  ready goes false while a model loads through the repository API (server#7014), and a
  healthy server must not be restarted for that (issue 12).

Issue 12 (tried against a real tritonserver 2.51):

* The model list and `instances_per_gpu` are the plan's *live* part (`TritonRepositoryOverlay`
  is both the prepare step and `plan.live`; its `models` are left out of its repr, hence of the
  launch fingerprint). The server starts with `--load-model=*` on an overlay holding exactly the
  listed models, so the argv does not depend on them; a change is applied to the running
  server by rebuilding the overlay and `POST /v2/repository/models/<m>/load` (Triton 2.51 only
  adds or removes instances when just the instance_group changed) or `.../unload`.
* A plain config.pbtxt is used as the template when there is no config.pbtxt.template, and a
  model with no config at all gets one holding only its name and instance_group (Triton's
  auto-complete fills in the rest), so `instances_per_gpu` always applies.
* Each instance gets its own python-backend shm prefix (`--backend-config=python,
  shm-region-prefix-name=`), so its stubs and its /dev/shm regions can be told apart from
  every other server's: leftovers are removed before each launch and when a dead stub is
  healed, and only if no live process maps them.
* A killed python-backend stub leaves the server and the model "ready" while every request
  to it fails: the liveness check counts the instance's stubs per model and reloads (unload,
  load) a model that has fewer than its instance_group says.
* `--exit-timeout-secs` is the instance's stop.timeout - 5 (at least 1): Triton's graceful
  exit finishes before our SIGKILL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from supervisor.backends import checks
from supervisor.backends.base import (
    BackendKind,
    DefaultHealth,
    LaunchContext,
    LaunchPlan,
    ProcessLaunch,
    expand,
    instance_env,
)
from supervisor.backends.docker import DockerOptions, UlimitRange, build_container, container_env
from supervisor.backends.flags import ParserSyntax, owned_flag_findings, read_options, value_of
from supervisor.backends.preset import (
    BindAddress,
    ModelName,
    NonEmpty,
    OptionError,
    executable,
    expand_all,
    local_path,
    model_name,
)
from supervisor.core.spec import StrictModel

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:25.04-py3"
TEMPLATE = "config.pbtxt.template"
CONFIG = "config.pbtxt"
OVERLAY = "model_repository"
CONTAINER_REPOSITORY = "/models"
#: Triton's own ports inside a container on a bridge network (its defaults).
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}

#: tritonserver's options as its getopt_long reads them: every long option takes unambiguous
#: prefixes (`--http-p=18010` really moved the HTTP port); there are no short options
#: (`-v` is "invalid option"). Taken from `tritonserver --help` of Triton 2.51.0, the binary
#: in the nvidia-pytriton 0.7.0 wheel (tests/test_triton_real.py re-reads it from the binary).
TRITON_SYNTAX = ParserSyntax(
    "getopt",
    frozenset(
        [
            "--allow-cpu-metrics",
            "--allow-gpu-metrics",
            "--allow-grpc",
            "--allow-http",
            "--allow-metrics",
            "--allow-sagemaker",
            "--allow-vertex-ai",
            "--backend-config",
            "--backend-directory",
            "--buffer-manager-thread-count",
            "--cache-config",
            "--cache-directory",
            "--cuda-memory-pool-byte-size",
            "--cuda-virtual-address-size",
            "--disable-auto-complete-config",
            "--enable-peer-access",
            "--exit-on-error",
            "--exit-timeout-secs",
            "--grpc-address",
            "--grpc-header-forward-pattern",
            "--grpc-http2-max-ping-strikes",
            "--grpc-http2-max-pings-without-data",
            "--grpc-http2-min-recv-ping-interval-without-data",
            "--grpc-infer-allocation-pool-size",
            "--grpc-infer-response-compression-level",
            "--grpc-keepalive-permit-without-calls",
            "--grpc-keepalive-time",
            "--grpc-keepalive-timeout",
            "--grpc-max-connection-age",
            "--grpc-max-connection-age-grace",
            "--grpc-port",
            "--grpc-restricted-protocol",
            "--grpc-root-cert",
            "--grpc-server-cert",
            "--grpc-server-key",
            "--grpc-use-ssl",
            "--grpc-use-ssl-mutual",
            "--help",
            "--host-policy",
            "--http-address",
            "--http-header-forward-pattern",
            "--http-port",
            "--http-restricted-api",
            "--http-thread-count",
            "--id",
            "--load-model",
            "--log-error",
            "--log-file",
            "--log-format",
            "--log-info",
            "--log-verbose",
            "--log-warning",
            "--metrics-address",
            "--metrics-config",
            "--metrics-interval-ms",
            "--metrics-port",
            "--min-supported-compute-capability",
            "--model-config-name",
            "--model-control-mode",
            "--model-load-gpu-limit",
            "--model-load-retry-count",
            "--model-load-thread-count",
            "--model-namespacing",
            "--model-repository",
            "--model-store",
            "--pinned-memory-pool-byte-size",
            "--rate-limit",
            "--rate-limit-resource",
            "--repoagent-directory",
            "--repository-poll-secs",
            "--response-cache-byte-size",
            "--reuse-grpc-port",
            "--reuse-http-port",
            "--sagemaker-port",
            "--sagemaker-safe-port-range",
            "--sagemaker-thread-count",
            "--strict-model-config",
            "--strict-readiness",
            "--trace-config",
            "--trace-count",
            "--trace-file",
            "--trace-level",
            "--trace-log-frequency",
            "--trace-rate",
            "--vertex-ai-default-model",
            "--vertex-ai-port",
            "--vertex-ai-thread-count",
        ]
    ),
    source="tritonserver 2.51.0 --help (nvidia-pytriton 0.7.0 wheel)",
)

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
    "--exit-timeout-secs": "stop.timeout, minus 5 s",
    "--backend-directory": "backend_directory",
}
#: Triton's boolean options read these (any case) as false; `--allow-http=false` would leave
#: the readiness probe nothing to talk to.
FALSE_WORDS = frozenset({"false", "off", "0"})
SHM_SETTING = "python,shm-region-prefix-name="


def _triton_findings(args: list[str]) -> list[tuple[int, str]]:
    """Items of extra_args that would take the server out of the supervisor's hands, in any
    spelling getopt_long accepts: an owned flag, HTTP switched off, another shm prefix."""
    found = owned_flag_findings(args, OWNED_FLAGS, TRITON_SYNTAX)
    for use in read_options(args, TRITON_SYNTAX):
        value = value_of(args, use) or ""
        spelled = f" ({use.item!r} is {use.option})" if use.item.partition("=")[0] != use.option else ""
        if use.option == "--allow-http" and value.lower() in FALSE_WORDS:
            found.append(
                (
                    use.index,
                    f"extra_args[{use.index}] {use.item!r}{spelled} switches HTTP off: the "
                    "supervisor checks readiness and liveness over HTTP; remove it from extra_args",
                )
            )
        elif use.option == "--backend-config" and value.replace(" ", "").startswith(SHM_SETTING):
            found.append(
                (
                    use.index,
                    f"extra_args[{use.index}] {use.item!r}{spelled} sets the python backend's "
                    "shm-region-prefix-name, which the supervisor sets per instance (to find its "
                    "stubs and clean up their /dev/shm regions); remove it from extra_args",
                )
            )
    return sorted(found)


def _extra_args(args: list[str]) -> list[str]:
    findings = _triton_findings(args)
    if findings:
        # A ValidationError with the item's index in its location: the error names extra_args[i].
        raise ValidationError.from_exception_data(
            "extra_args",
            [
                InitErrorDetails(
                    type=PydanticCustomError("value_error", "{message}", {"message": message}),
                    loc=(index,),
                    input=args[index],
                )
                for index, message in findings
            ],
        )
    return args


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
PROCESS_KEYS = ("tritonserver", "python_env", "library_path")


class TritonOptions(StrictModel):
    mode: Literal["docker", "process"] = "docker"
    #: The host directory with one subdirectory per model; relative to this file. Only read.
    model_repository: NonEmpty
    #: Models loaded at start; default: the declaration's name.
    models: Annotated[list[ModelName], Field(min_length=1)] | None = None
    #: Instances of each model on each of the instance's GPUs: one number, or per model
    #: ({MAM = 8, FastFitAll = 1}; models not listed get 1). Applied through config.pbtxt.template.
    instances_per_gpu: PositiveInt | dict[ModelName, PositiveInt] = 1
    extra_args: Annotated[list[str], AfterValidator(_extra_args)] = []
    #: --backend-directory: where the backends (python/libtriton_python.so, its stub) are.
    #: A host path in process mode (relative to this file), a container path in docker mode.
    backend_directory: NonEmpty | None = None
    #: Where ports are published (docker, bridge network) or the server binds (otherwise).
    bind_address: BindAddress = "127.0.0.1"
    # mode = "process"
    tritonserver: NonEmpty = "tritonserver"
    #: The Python environment (a venv or prefix) the python backend's models run in: its bin/
    #: goes first on PATH, since the stub finds its packages through the first python3 there.
    python_env: NonEmpty | None = None
    #: Directories put first on LD_LIBRARY_PATH (the inherited value follows), e.g. the
    #: nvidia-pytriton wheel's nvidia_pytriton.libs, which a copied stub needs.
    library_path: list[NonEmpty] = []
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


class TritonKind(BackendKind[TritonOptions, LaunchPlan]):
    name = "triton"
    options_model = TritonOptions

    def default_health(self, options: TritonOptions) -> DefaultHealth:
        return DefaultHealth("http", "/v2/health/ready", live_path="/v2/health/live")

    def extra_ports(self, options: TritonOptions) -> tuple[str, ...]:
        return ("grpc", "metrics")

    def listens(self, options: TritonOptions, env: dict[str, str]) -> bool:
        return True

    def launch(self, options: TritonOptions, ctx: LaunchContext, env: dict[str, str]) -> LaunchPlan:
        _check_mode_keys(options)
        models = options.models or [ctx.model]
        counts = _instance_counts(options, models)
        repository = local_path(options.model_repository, ctx, "model_repository")
        overlay = os.path.abspath(ctx.work_dir / OVERLAY)
        prefix = shm_prefix(ctx.instance_id, overlay)
        step = TritonRepositoryOverlay(
            repository=repository,
            overlay=overlay,
            models=tuple((m, counts[m]) for m in models),
            # The ids as the server sees them: a container's device request and a local
            # server's CUDA_VISIBLE_DEVICES both renumber the instance's GPUs from 0.
            gpus=tuple(range(len(ctx.gpus))),
            instance=ctx.instance_id,
            shm_prefix=prefix,
            # A container's /dev/shm is its own and goes with it; a local server's is the host's.
            sweep_shm=options.mode == "process",
        )
        server_ports = options.mode == "process" or options.network == "host"
        # "*": every model of the overlay, which holds exactly the listed ones. The argv then
        # does not change with the model list, which is applied to the running server.
        argv = [
            "--model-repository=" + (overlay if options.mode == "process" else CONTAINER_REPOSITORY),
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--backend-config={SHM_SETTING}{prefix}",
            f"--exit-timeout-secs={exit_timeout(ctx.stop_timeout)}",
        ]
        if options.backend_directory is not None:
            directory = expand(options.backend_directory, ctx, "backend_directory")
            argv.append(
                "--backend-directory="
                + (ctx.resolve_path(directory) if options.mode == "process" else directory)
            )
        if server_ports:
            address = options.bind_address
            argv += [
                f"--http-port={ctx.port}",
                f"--grpc-port={ctx.port_of('grpc')}",
                f"--metrics-port={ctx.port_of('metrics')}",
                f"--http-address={address}",
                f"--grpc-address={address}",
                f"--metrics-address={address}",
            ]
        argv += expand_all(options.extra_args, ctx, "extra_args")

        if options.mode == "process":
            return ProcessLaunch(
                argv=(executable(options.tritonserver, ctx, "tritonserver"), *argv),
                env=tuple(sorted(_process_env(options, ctx, env).items())),
                prepare=(step,),
                live=step,
                after_exit=(ShmSweep(step.shm_prefix, ctx.instance_id),),
            )

        bridge = options.network == "bridge"
        docker = DockerOptions(
            image=options.image,
            network=options.network,
            container_port=CONTAINER_PORTS["http"] if bridge else None,
            bind_address=options.bind_address,
            publish=[
                f"{options.bind_address}:{ctx.port_of(name)}:{CONTAINER_PORTS[name]}"
                for name in ("grpc", "metrics")
            ]
            if bridge
            else [],
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
        for i, (host, container, _) in enumerate(plan.volumes[: len(options.volumes)]):
            if host == repository or container in (repository, CONTAINER_REPOSITORY):
                raise OptionError(
                    f"volumes[{i}]",
                    f"{options.volumes[i]!r} collides with the model repository mounts "
                    f"({repository} and {CONTAINER_REPOSITORY} are the supervisor's)",
                )
        return dataclasses.replace(plan, command=("tritonserver", *argv), prepare=(step,), live=step)

    def preflight(self, options: TritonOptions, ctx: LaunchContext, plan: LaunchPlan) -> list[checks.Problem]:
        # Both modes read the repository on this machine (a container gets it bind-mounted).
        step = next(s for s in plan.prepare if isinstance(s, TritonRepositoryOverlay))
        problems = checks.directory(step.repository, "model_repository")
        if not problems:
            missing = [m for m, _ in step.models if not os.path.isdir(os.path.join(step.repository, m))]
            if missing:
                problems.append(
                    (
                        "models" if options.models else "model_repository",
                        f"{step.repository} has no directory for model(s) {', '.join(missing)}",
                    )
                )
        if isinstance(plan, ProcessLaunch):
            problems += checks.program(plan.argv[0], dict(plan.env), None, "tritonserver")
        return problems


def exit_timeout(stop_timeout: float) -> int:
    """Triton's own --exit-timeout-secs (default 30, as our stop.timeout): below ours, so its
    graceful exit is over before the supervisor's SIGKILL."""
    return max(1, int(stop_timeout) - 5)


def shm_prefix(instance: str, overlay: str) -> str:
    """The python backend's shm region prefix for one instance: readable, and unique per
    supervisor state dir (the overlay path), so no other server's regions ever match it."""
    readable = re.sub(r"[^A-Za-z0-9]+", "_", instance)[:40]
    return f"msup_{readable}_{hashlib.sha256(overlay.encode()).hexdigest()[:10]}_"


def _process_env(options: TritonOptions, ctx: LaunchContext, declared: dict[str, str]) -> dict[str, str]:
    """The instance's environment plus python_env's bin/ first on PATH and library_path first
    on LD_LIBRARY_PATH; both keep what they extend (the declaration's value, else the
    supervisor's own)."""
    env = instance_env(ctx, declared)
    if options.python_env is not None:
        bin_dir = os.path.join(local_path(options.python_env, ctx, "python_env"), "bin")
        env["PATH"] = _prepend([bin_dir], env.get("PATH", os.environ.get("PATH", os.defpath)))
    if options.library_path:
        dirs = [local_path(d, ctx, f"library_path[{i}]") for i, d in enumerate(options.library_path)]
        env["LD_LIBRARY_PATH"] = _prepend(
            dirs, env.get("LD_LIBRARY_PATH", os.environ.get("LD_LIBRARY_PATH", ""))
        )
    return env


def _prepend(dirs: list[str], existing: str) -> str:
    return ":".join([*dirs, *(p for p in existing.split(":") if p and p not in dirs)])


def _check_mode_keys(options: TritonOptions) -> None:
    wrong = PROCESS_KEYS if options.mode == "docker" else DOCKER_KEYS
    for key in wrong:
        if key in options.model_fields_set:
            other = "process" if options.mode == "docker" else "docker"
            raise OptionError(key, f'{key} applies to mode = "{other}" only (mode is "{options.mode}")')


def _instance_counts(options: TritonOptions, models: list[str]) -> dict[str, int]:
    per_gpu = options.instances_per_gpu
    if isinstance(per_gpu, int):
        return dict.fromkeys(models, per_gpu)
    for name in per_gpu:
        if name not in models:
            raise OptionError(
                "instances_per_gpu", f"{name!r} is not one of the models loaded ({', '.join(models)})"
            )
    return {m: per_gpu.get(m, 1) for m in models}


# --- the overlay repository (runs in a thread right before each launch) ---------------------

#: How long a heal may wait for Triton to finish unloading a model with a dead stub.
UNLOAD_WAIT = 60.0


class LiveApplyError(Exception):
    """The running server did not take a change (Triton's own error in the message)."""


@dataclass(frozen=True, slots=True)
class TritonRepositoryOverlay:
    """Builds `overlay`: for each model a directory with a generated config.pbtxt and symlinks
    to every other entry of `repository/<model>`. The user's repository is only read.

    Also the plan's live part: `apply` takes a changed model list or instance counts to the
    running server, `check` finds dead python-backend stubs and reloads their model."""

    repository: str
    overlay: str
    #: (model, instances per GPU). Not in the repr, hence not in the launch fingerprint:
    #: changes are applied live (the plan compares `live` objects by equality instead).
    models: tuple[tuple[str, int], ...] = field(repr=False)
    gpus: tuple[int, ...]  # as the server sees them; () = a CPU-only instance
    instance: str
    shm_prefix: str = ""  # the python backend's shm-region-prefix-name for this instance
    sweep_shm: bool = False  # remove unmapped /dev/shm/<shm_prefix>* leftovers (a local server)

    def run(self) -> None:
        built = self._render()
        if self.sweep_shm:
            removed = sweep_shm(self.shm_prefix)
            if removed:
                log.info(
                    "%s: removed %d python-backend shm region(s) a previous run left behind: %s",
                    self.instance,
                    len(removed),
                    ", ".join(removed),
                )
        self._write(built)

    def _render(self) -> list[tuple[list[Path], str]]:
        repository = Path(self.repository)
        if not repository.is_dir():
            raise ValueError(f"model_repository {repository} is not a directory")
        for model, _ in self.models:
            if not (repository / model).is_dir():
                present = sorted(p.name for p in repository.iterdir() if p.is_dir())
                raise ValueError(
                    f"model {model!r} has no directory in {repository} "
                    f"(it has: {', '.join(present) or 'nothing'})"
                )
        # Everything is read and rendered before anything is written: a bad template fails
        # the launch (or the live change) without leaving half an overlay.
        return [self._model_contents(repository / model, model, count) for model, count in self.models]

    def _write(self, built: list[tuple[list[Path], str]]) -> None:
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
        for (model, _), (links, config) in zip(self.models, built, strict=False):
            dest = target / model
            _remove(dest)  # stale entries (a removed version directory) go with it
            dest.mkdir()
            for entry in links:
                os.symlink(entry, dest / entry.name)
            (dest / CONFIG).write_text(config, encoding="utf-8")

    def _model_contents(self, source: Path, model: str, count: int) -> tuple[list[Path], str]:
        """The entries to link and the generated config.pbtxt. The template is
        config.pbtxt.template, else the model's own config.pbtxt (its instance_group is
        replaced all the same: host GPU ids or KIND_GPU must not pass through), else a config
        with only the name, which Triton's auto-complete fills in (python: from model.py)."""
        template = next((source / name for name in (TEMPLATE, CONFIG) if (source / name).is_file()), None)
        links = [entry for entry in sorted(source.iterdir()) if entry.name not in (TEMPLATE, CONFIG)]
        text = f'name: "{model}"\n' if template is None else template.read_text(encoding="utf-8")
        try:
            return links, render_config(text, count, self.gpus, self.instance)
        except ValueError as exc:
            raise ValueError(f"{template}: {exc}") from None

    # -- live: the running server follows the model list ---------------------------------
    def _lock(self) -> asyncio.Lock:
        # One change or heal at a time per server; keyed by loop too (each test has its own).
        key = (self.overlay, id(asyncio.get_running_loop()))
        return _LOCKS.setdefault(key, asyncio.Lock())

    async def apply(self, previous: object, port: int, timeout: float) -> str:
        old = dict(previous.models) if isinstance(previous, TritonRepositoryOverlay) else {}
        new = dict(self.models)
        removed = [m for m in old if m not in new]
        changed = [m for m, count in new.items() if old.get(m) != count]
        async with self._lock():
            built = await asyncio.to_thread(self._render)
            for model in removed:
                await _repository(port, model, "unload", timeout)
            await asyncio.to_thread(self._write, built)
            for model in changed:  # instance_group only: Triton 2.51 adds/removes instances in place
                await _repository(port, model, "load", timeout)
        done = [
            f"loaded {m} ({new[m]} per GPU)" if m not in old else f"{m}: {old[m]} -> {new[m]} per GPU"
            for m in changed
        ] + [f"unloaded {m}" for m in removed]
        return "; ".join(done) or "nothing to change"

    async def check(self, port: int, timeout: float) -> tuple[bool, str]:
        lock = self._lock()
        if lock.locked():
            return True, "a model change is being applied"
        async with lock:
            running, expected = await asyncio.to_thread(self._stub_counts)
            short = {m: (running.get(m, 0), want) for m, want in expected.items() if running.get(m, 0) < want}
            healed = []
            for model, (have, want) in short.items():
                what = f"model {model}: {have} of its {want} python backend stub(s) running"
                log.warning(
                    "%s: %s (a stub died; Triton still reports it ready); reloading it", self.instance, what
                )
                try:
                    await self._reload(port, model, timeout)
                except (LiveApplyError, OSError) as exc:
                    return False, f"{what}, and reloading it failed: {exc}"
                healed.append(f"{what}, reloaded it")
            return True, "; ".join(healed)

    def _stub_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(python backend stubs alive per model, how many each python model should have)."""
        running = count_stubs(self.shm_prefix)
        expected = {}
        for model, count in self.models:
            directory = Path(self.overlay) / model
            try:
                config = _strip_comments((directory / CONFIG).read_text(encoding="utf-8"))
            except OSError:
                continue
            backend = re.search(r'\b(backend|platform)\s*:\s*"([^"]*)"', config)
            python = (
                backend.group(2) == "python" if backend is not None else any(directory.glob("*/model.py"))
            )  # auto-complete picks python for model.py
            if python:
                expected[model] = count * max(1, len(self.gpus))
        return running, expected

    async def _reload(self, port: int, model: str, timeout: float) -> None:
        # A plain load does not bring a dead stub back (Triton 2.51 keeps the unchanged
        # instances, dead one included): unload, wait until it is gone, load again.
        await _repository(port, model, "unload", timeout)
        deadline = time.monotonic() + UNLOAD_WAIT
        while True:
            status, body = await asyncio.to_thread(_http, port, "POST", "/v2/repository/index", timeout)
            states = [
                m.get("state") for m in _json(body, []) if isinstance(m, dict) and m.get("name") == model
            ]
            if status == 200 and "UNLOADING" not in states:
                break
            if time.monotonic() > deadline:
                raise LiveApplyError(f"{model} was still unloading after {UNLOAD_WAIT:g} s")
            await asyncio.sleep(0.2)
        if self.sweep_shm:
            await asyncio.to_thread(sweep_shm, self.shm_prefix)  # the dead stub's region
        await _repository(port, model, "load", timeout)


_LOCKS: dict[tuple[str, int], asyncio.Lock] = {}


async def _repository(port: int, model: str, action: str, timeout: float) -> None:
    """POST /v2/repository/models/<model>/<action>; raises with Triton's own error."""
    status, body = await asyncio.to_thread(
        _http, port, "POST", f"/v2/repository/models/{model}/{action}", timeout
    )
    if status != 200:
        error = _json(body, {}).get("error") if isinstance(_json(body, {}), dict) else None
        raise LiveApplyError(
            f"{action} {model}: HTTP {status}: {error or body[:200].decode(errors='replace')}"
        )


def _http(port: int, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise LiveApplyError(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None


def _json(body: bytes, default: Any) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return default


def _strip_comments(text: str) -> str:
    """Protobuf text without its comments (strings kept: a "#" inside one is not a comment)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "#":
            i = _line_end(text, i)
        elif text[i] in "\"'":
            end = _string_end(text, i)
            out.append(text[i:end])
            i = end
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --- python backend stubs and their /dev/shm regions ----------------------------------------

STUB = "triton_python_backend_stub"
SHM_DIR = "/dev/shm"


def _cmdlines() -> list[tuple[int, list[str]]]:
    """Every live process's argv (zombies have none)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            if raw:
                out.append((int(entry), [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]))
    return out


def count_stubs(prefix: str) -> dict[str, int]:
    """Live python backend stubs of one instance, per model. A stub's argv is
    `<stub> <repository>/<model>/<version>/model.py <shm region name> ...`, and its region
    name starts with the instance's own prefix."""
    counts: dict[str, int] = {}
    if not prefix:
        return counts
    for _pid, argv in _cmdlines():
        if len(argv) > 2 and os.path.basename(argv[0]) == STUB and argv[2].startswith(prefix):
            model = Path(argv[1]).parent.parent.name
            counts[model] = counts.get(model, 0) + 1
    return counts


@dataclass(frozen=True, slots=True)
class ShmSweep:
    """After a run: its python-backend regions, which a killed server or stub leaves behind."""

    prefix: str
    instance: str

    def run(self) -> None:
        removed = sweep_shm(self.prefix)
        if removed:
            log.info(
                "%s: removed %d python-backend shm region(s) the run left behind: %s",
                self.instance,
                len(removed),
                ", ".join(removed),
            )


def sweep_shm(prefix: str) -> list[str]:
    """Remove /dev/shm/<prefix>* regions that no live process maps; returns their names.
    Only processes carrying the prefix in their argv (the server, its stubs) can map one."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if prefix and n.startswith(prefix)]
    except FileNotFoundError:
        return []
    if not names:
        return []
    mapped: set[str] = set()
    for pid, argv in _cmdlines():
        if any(prefix in arg for arg in argv):
            try:
                with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                    for line in f:
                        at = line.find(f"{SHM_DIR}/{prefix}")
                        if at >= 0:
                            mapped.add(line[at + len(SHM_DIR) + 1 :].split()[0])
            except OSError:
                continue
    removed = []
    for name in names:
        if name not in mapped:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


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
        entry = (
            f"  {{\n    count: {count}\n    kind: KIND_GPU\n"
            f"    gpus: [ {', '.join(str(g) for g in gpus)} ]\n  }}"
        )
    else:
        entry = f"  {{\n    count: {count}\n    kind: KIND_CPU\n  }}"
    block = f"# instance_group generated by model-supervisor for {instance}\ninstance_group [\n{entry}\n]\n"
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
        elif (
            depth == 0
            and text.startswith(_FIELD, i)
            and (i == 0 or not _IDENT.match(text[i - 1]))
            and not _IDENT.match(text[i + len(_FIELD) : i + len(_FIELD) + 1])
        ):
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
