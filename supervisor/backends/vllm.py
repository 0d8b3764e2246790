"""The `vllm` preset: `vllm serve MODEL --host HOST --port {port} --tensor-parallel-size N`.

N is the number of GPUs of the instance (`gpus = [[0, 1]]` -> 2), so tensor parallelism
always matches the GPUs the supervisor gave it; a CPU-only instance gets no such flag.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from supervisor.backends import checks
from supervisor.backends.base import (
    BackendKind,
    DefaultHealth,
    LaunchContext,
    ProcessLaunch,
    expand,
    instance_env,
)
from supervisor.backends.flags import read_options
from supervisor.backends.parser_options import VLLM
from supervisor.backends.preset import BindAddress, NonEmpty, executable, expand_all, owned_args
from supervisor.core.spec import StrictModel

#: Refused in extra_args in every spelling vllm's parser accepts (`--hos`, `--por=1`, `-t 4`,
#: `--tensor_parallel_size`). The last four would take the API away from where readiness looks.
OWNED_FLAGS = {
    "--host": "host",
    "--port": "port",
    "--tensor-parallel-size": "gpus (the instance's GPU count)",
    "--model": "model",
    "--served-model-name": "served_model_name",
    "--uds": "port (a unix socket replaces host and port)",
    "--headless": "the preset (headless runs no API server to check)",
    "--grpc": "the preset (a gRPC server has no HTTP /health)",
    "--config": "extra_args (its file may set the flags above; list its options in extra_args)",
}

VllmArgs = Annotated[list[str], AfterValidator(owned_args(OWNED_FLAGS, VLLM))]


def serves_tls(args: list[str]) -> bool:
    options = {use.option for use in read_options(args, VLLM)}
    return {"--ssl-keyfile", "--ssl-certfile"} <= options


_PATH_PREFIXES = ("/", "./", "../", "~")


class VllmOptions(StrictModel):
    #: A Hugging Face id ("Qwen/Qwen2.5-7B-Instruct") or a local directory. Only values that
    #: start with / ./ ../ or ~ are paths (relative to the declaration file): "org/name" is an id.
    model: NonEmpty
    #: The `vllm` program; a bare name is looked up on PATH, a path is relative to this file.
    vllm: NonEmpty = "vllm"
    host: BindAddress = "127.0.0.1"
    #: The name clients use in requests; default: vLLM's (the model id or path).
    served_model_name: NonEmpty | None = None
    extra_args: VllmArgs = []


class VllmKind(BackendKind[VllmOptions, ProcessLaunch]):
    name = "vllm"
    options_model = VllmOptions

    def default_health(self, options: VllmOptions) -> DefaultHealth:
        # vLLM's API server only starts answering once the engine has loaded the weights.
        return DefaultHealth("https" if serves_tls(options.extra_args) else "http", "/health")

    def listens(self, options: VllmOptions, env: dict[str, str]) -> bool:
        return True

    def launch(self, options: VllmOptions, ctx: LaunchContext, env: dict[str, str]) -> ProcessLaunch:
        model = expand(options.model, ctx, "model")
        if model.startswith(_PATH_PREFIXES):
            model = ctx.resolve_path(model)
        argv = [
            executable(options.vllm, ctx, "vllm"),
            "serve",
            model,
            "--host",
            options.host,
            "--port",
            str(ctx.port),
        ]
        if ctx.gpus:
            argv += ["--tensor-parallel-size", str(len(ctx.gpus))]
        if options.served_model_name is not None:
            argv += ["--served-model-name", expand(options.served_model_name, ctx, "served_model_name")]
        argv += expand_all(options.extra_args, ctx, "extra_args")
        return ProcessLaunch(argv=tuple(argv), env=tuple(sorted(instance_env(ctx, env).items())))

    def preflight(
        self, options: VllmOptions, ctx: LaunchContext, plan: ProcessLaunch
    ) -> list[checks.Problem]:
        problems = checks.program(plan.argv[0], dict(plan.env), None, "vllm")
        if options.model.startswith(_PATH_PREFIXES) and not checks.per_instance(options.model):
            problems += checks.exists(plan.argv[2], "model")  # a local model directory
        return problems
