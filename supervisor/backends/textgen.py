"""The `textgen` preset: oobabooga's text-generation-webui serving its OpenAI-compatible API.

    python server.py --api --api-port {port} --nowebui [--model M] [extra args]

Flags as read in the project's `modules/shared.py` (argparse) and `modules/api/script.py`
(`run_server`): without `--listen` the API binds 127.0.0.1 only (`--listen-host` is ignored
unless `--listen` is given, so it is not passed); `--nowebui` starts the API alone, after the
model is loaded (server.py), so the API answering means the model is ready. With
`webui = true` the Gradio UI runs too, on its own port (`--listen-port {port_ui}`), also bound
to 127.0.0.1 unless `listen = true`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from ..spec import StrictModel
from . import checks
from .base import BackendKind, DefaultHealth, LaunchContext, ProcessLaunch, expand, instance_env
from .flags import read_options
from .parser_options import TEXTGEN
from .preset import NonEmpty, executable, expand_all, local_path, owned_args

OWNED_FLAGS = {
    "--api-port": "port",
    "--listen-port": "webui (the ui port)",
    "--nowebui": "webui",
    "--listen": "listen",
    "--listen-host": "listen",
    "--model": "model",
    # Without IPv4 the API listens on ::1 only, and readiness connects to 127.0.0.1.
    "--api-disable-ipv4": "the preset (readiness connects over IPv4)",
}

#: Refused in every spelling its argparse accepts (`--api-p 5001` is --api-port).
TextgenArgs = Annotated[list[str], AfterValidator(owned_args(OWNED_FLAGS, TEXTGEN))]

#: Variables modules/api/script.py reads before its flags (run_server, at 1dcde41d): inherited
#: from the supervisor's environment they would move or re-protocol the API, so they are
#: removed unless the declaration's `env` sets them. OPENEDAI_PORT is set to {port} instead.
OPENEDAI_LISTEN_ENV = ("OPENEDAI_CERT_PATH", "OPENEDAI_KEY_PATH", "OPENEDAI_ENABLE_IPV6", "OPENEDAI_DISABLE_IPV4")

#: The API's own message when --api-port is taken (modules/api/script.py find_available_port):
#: it then listens elsewhere, so the start has failed.
PORT_SWITCH = r"Port (\d+) is already in use\. Using port (\d+) instead"


class TextgenOptions(StrictModel):
    #: The text-generation-webui checkout (the directory with server.py); relative to this file.
    textgen_path: NonEmpty
    #: Its interpreter (usually installer_files/env/bin/python or a venv's); bare name: PATH.
    python: NonEmpty = "python3"
    #: The model to load at start (a name under its models directory); default: none.
    model: NonEmpty | None = None
    #: Also serve the Gradio UI, on an extra automatic port `{port_ui}`.
    webui: bool = False
    #: Listen on every interface (text-generation-webui's --listen) instead of 127.0.0.1.
    listen: bool = False
    extra_args: TextgenArgs = []


def _uses_api_key(options: TextgenOptions) -> bool:
    return any(use.option == "--api-key" for use in read_options(options.extra_args, TEXTGEN))


class TextgenKind(BackendKind):
    name = "textgen"
    options_model = TextgenOptions

    def default_health(self, options: TextgenOptions) -> DefaultHealth:  # type: ignore[override]
        # Every API route checks --api-key, and the probe sends no key: with a key, readiness is
        # the API port accepting connections (it opens only after the model is loaded).
        if _uses_api_key(options):
            return DefaultHealth("tcp")
        return DefaultHealth("http", "/v1/models")

    def extra_ports(self, options: TextgenOptions) -> tuple[str, ...]:  # type: ignore[override]
        return ("ui",) if options.webui else ()

    def listens(self, options: TextgenOptions, env: dict[str, str]) -> bool:  # type: ignore[override]
        return True

    def launch(self, options: TextgenOptions, ctx: LaunchContext, env: dict[str, str]) -> ProcessLaunch:  # type: ignore[override]
        argv = [executable(options.python, ctx, "python"), "server.py", "--api", "--api-port", str(ctx.port)]
        argv += ["--listen-port", str(ctx.port_of("ui"))] if options.webui else ["--nowebui"]
        if options.listen:
            argv.append("--listen")
        if options.model is not None:
            argv += ["--model", expand(options.model, ctx, "model")]
        argv += expand_all(options.extra_args, ctx, "extra_args")
        environment = instance_env(ctx, env)
        # OPENEDAI_PORT, when set, wins over --api-port (modules/api/script.py): one inherited
        # from the supervisor's environment would move the API away from {port}.
        environment["OPENEDAI_PORT"] = str(ctx.port)
        return ProcessLaunch(argv=tuple(argv), cwd=local_path(options.textgen_path, ctx, "textgen_path"),
                             env=tuple(sorted(environment.items())),
                             unset_env=tuple(name for name in OPENEDAI_LISTEN_ENV if name not in env),
                             fail_patterns=(PORT_SWITCH,))

    def preflight(self, options: TextgenOptions, ctx: LaunchContext, plan: ProcessLaunch) -> list[checks.Problem]:  # type: ignore[override]
        return (checks.directory(plan.cwd, "textgen_path", "server.py", " (is it a text-generation-webui checkout?)")
                + checks.program(plan.argv[0], dict(plan.env), plan.cwd, "python"))
