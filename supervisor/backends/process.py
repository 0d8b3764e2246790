"""The `process` kind: any command line, run as a plain child process."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from supervisor.backends import checks
from supervisor.backends.base import (
    BackendKind,
    DefaultHealth,
    LaunchContext,
    ProcessLaunch,
    expand,
    instance_env,
)
from supervisor.core.spec import StrictModel


class ProcessOptions(StrictModel):
    #: argv as a list, never a shell string: no quoting bugs, no shell between us and the pid.
    command: Annotated[list[str], Field(min_length=1)]
    #: Working directory; relative to the declaration file's directory. Default: the
    #: supervisor's own working directory.
    cwd: str | None = None


class ProcessKind(BackendKind[ProcessOptions, ProcessLaunch]):
    name = "process"
    options_model = ProcessOptions

    def default_health(self, options: ProcessOptions) -> DefaultHealth:
        # A generic command may not listen on anything: RUNNING once it is up, unless the
        # declaration asks for an http or tcp check.
        return DefaultHealth("none")

    def listens(self, options: ProcessOptions, env: dict[str, str]) -> bool:
        return any("{port}" in text for text in [*options.command, *env.values()])

    def launch(self, options: ProcessOptions, ctx: LaunchContext, env: dict[str, str]) -> ProcessLaunch:
        argv = tuple(expand(arg, ctx, f"command[{i}]") for i, arg in enumerate(options.command))
        cwd = ctx.resolve_path(expand(options.cwd, ctx, "cwd")) if options.cwd is not None else None
        return ProcessLaunch(argv=argv, cwd=cwd, env=tuple(sorted(instance_env(ctx, env).items())))

    def preflight(
        self, options: ProcessOptions, ctx: LaunchContext, plan: ProcessLaunch
    ) -> list[checks.Problem]:
        problems = []
        if not checks.per_instance(options.cwd):
            problems += checks.directory(plan.cwd, "cwd")
        if not checks.per_instance(options.command[0]):
            problems += checks.program(plan.argv[0], dict(plan.env), plan.cwd, "command[0]")
        return problems
