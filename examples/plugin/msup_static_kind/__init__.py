"""A complete third-party backend kind: `static` serves a directory over HTTP.

Declaration keys: `directory` (required; relative to the declaration file) and `python`
(the interpreter, default the supervisor's own). The supervisor gives it the same restart,
backoff, health and stop behaviour as every built-in kind.

    name = "docs"
    backend = "static"
    directory = "../site"
"""

from __future__ import annotations

from pydantic import BaseModel

from supervisor.backends.base import (
    BackendKind,
    DefaultHealth,
    LaunchContext,
    ProcessLaunch,
    StrictModel,
    expand,
    instance_env,
)


class StaticOptions(StrictModel):
    directory: str
    python: str = "{python}"


class StaticKind(BackendKind):
    name = "static"
    options_model = StaticOptions

    def default_health(self, options: BaseModel) -> DefaultHealth:
        return DefaultHealth("http", "/")

    def listens(self, options: BaseModel, env: dict[str, str]) -> bool:
        return True

    def launch(self, options: StaticOptions, ctx: LaunchContext, env: dict[str, str]) -> ProcessLaunch:  # type: ignore[override]
        directory = ctx.resolve_path(expand(options.directory, ctx, "directory"))
        argv = (
            expand(options.python, ctx, "python"),
            "-m",
            "http.server",
            str(ctx.port),
            "--bind",
            "127.0.0.1",
            "--directory",
            directory,
        )
        return ProcessLaunch(argv=argv, env=tuple(sorted(instance_env(ctx, env).items())))
