"""The `triton` kind: its options, their checks, and the launch plan (docker or process mode).

The plan runs the server on the instance's overlay repository (`overlay`), with every model
of it loaded at start (`--load-model=*`), the instance's own python-backend shm prefix
(`stubs.shm_prefix`), an exit timeout below the supervisor's stop timeout, and, where the
server binds them itself, the instance's ports on `bind_address`. `extra_args` may not take
over what the supervisor sets (`OWNED_FLAGS`, in any spelling tritonserver's getopt accepts).
"""

from __future__ import annotations

import dataclasses
import os
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
from supervisor.backends.triton.overlay import TritonRepositoryOverlay
from supervisor.backends.triton.stubs import ShmSweep, shm_prefix
from supervisor.core.spec import StrictModel

DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:25.04-py3"
#: The overlay repository's directory in the instance's work dir.
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
