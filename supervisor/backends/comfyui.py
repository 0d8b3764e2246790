"""The `comfyui` preset: `python main.py --listen ADDRESS --port {port}` in a ComfyUI checkout.

Fixes of the old tool's runner: the interpreter is configurable (weakness 10: it ran `python`
from PATH, not ComfyUI's venv), readiness is `/system_stats`, and the GPUs are pinned with
CUDA_VISIBLE_DEVICES in PCI bus order (weakness 25).

Instances of one checkout share nothing that breaks them (issue 12): `main.py` empties its temp
directory whenever an instance starts or exits, and the SQLite database and user settings sit
in the checkout's `user/` by default, so each instance gets `--temp-directory`,
`--user-directory` and `--database-url` under its own work dir (unless `extra_args` sets them).
`input/` and `output/` stay shared unless `share_input_output = false`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, field_validator

from supervisor.backends import checks
from supervisor.backends.base import BackendKind, DefaultHealth, LaunchContext, ProcessLaunch, instance_env
from supervisor.backends.flags import read_options
from supervisor.backends.parser_options import COMFYUI
from supervisor.backends.preset import (
    PROBE_REACHABLE,
    NonEmpty,
    executable,
    expand_all,
    local_path,
    owned_args,
)
from supervisor.core.spec import StrictModel

#: Flags this preset sets itself, refused in extra_args in every spelling ComfyUI's argparse
#: accepts (`--po 9999` is --port). `--cuda-device` would override CUDA_VISIBLE_DEVICES (ComfyUI
#: sets it from that flag) and put the instance on a GPU the supervisor did not give it.
OWNED_FLAGS = {"--listen": "listen", "--port": "port", "--cuda-device": "gpus"}

ComfyArgs = Annotated[list[str], AfterValidator(owned_args(OWNED_FLAGS, COMFYUI))]

#: Per-instance state a checkout would otherwise share; each is left alone when extra_args sets it.
_STATE_FLAGS = ("--temp-directory", "--user-directory", "--database-url")


def _uses(args: list[str], option: str) -> bool:
    return any(use.option == option for use in read_options(args, COMFYUI))


def serves_tls(args: list[str]) -> bool:
    # server.py serves HTTPS only when both files are given (one alone: plain HTTP).
    return _uses(args, "--tls-keyfile") and _uses(args, "--tls-certfile")


@dataclass(frozen=True, slots=True)
class MakeDirs:
    """Create the instance's own ComfyUI directories (--user-directory must exist at start)."""

    paths: tuple[str, ...]

    def run(self) -> None:
        for path in self.paths:
            Path(path).mkdir(parents=True, exist_ok=True)


class ComfyUIOptions(StrictModel):
    #: The ComfyUI checkout (the directory with main.py); relative to the declaration file.
    comfyui_path: NonEmpty
    #: The interpreter with ComfyUI's dependencies, usually its venv's python. A bare name is
    #: looked up on PATH; "{python}" is the supervisor's own interpreter.
    python: NonEmpty = "python3"
    #: ComfyUI's --listen: one address or a comma-separated list (ComfyUI accepts both).
    listen: NonEmpty = "127.0.0.1"
    #: Whether instances share the checkout's input/ and output/ (what users expect: one place
    #: for uploads and results). false: each gets its own under its work dir.
    share_input_output: bool = True
    extra_args: ComfyArgs = []

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        addresses = [a.strip() for a in value.split(",")]
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"{address!r} is not an IP address") from None
        if not any(a in PROBE_REACHABLE for a in addresses):
            raise ValueError(
                f"{value!r}: the supervisor checks readiness on 127.0.0.1, so include 127.0.0.1 "
                "(this machine only) or 0.0.0.0 / :: (every interface)"
            )
        return value


class ComfyUIKind(BackendKind[ComfyUIOptions, ProcessLaunch]):
    name = "comfyui"
    options_model = ComfyUIOptions

    def default_health(self, options: ComfyUIOptions) -> DefaultHealth:
        # Answers once the server is up and the custom nodes are imported; the old tool's
        # /history also answered 200, but says nothing about the machine. With TLS flags the
        # probe speaks HTTPS (a plain GET would fail every probe until start_timeout).
        return DefaultHealth("https" if serves_tls(options.extra_args) else "http", "/system_stats")

    def listens(self, options: ComfyUIOptions, env: dict[str, str]) -> bool:
        return True

    def launch(self, options: ComfyUIOptions, ctx: LaunchContext, env: dict[str, str]) -> ProcessLaunch:
        argv = [
            executable(options.python, ctx, "python"),
            "main.py",
            "--listen",
            options.listen,
            "--port",
            str(ctx.port),
        ]
        if not ctx.gpus:
            # ComfyUI asks torch for the current CUDA device at import and dies when there is
            # none (CUDA_VISIBLE_DEVICES is empty here) unless it is told to use the CPU.
            argv.append("--cpu")
        extra = expand_all(options.extra_args, ctx, "extra_args")
        work = ctx.work_dir.resolve()
        dirs: list[str] = []
        if not _uses(extra, "--temp-directory"):
            # ComfyUI appends "temp" itself (main.py): this is {work_dir}/temp.
            argv += ["--temp-directory", str(work)]
            dirs.append(str(work))
        if not _uses(extra, "--user-directory"):
            argv += ["--user-directory", str(work / "user")]
            dirs.append(str(work / "user"))
        if not _uses(extra, "--database-url"):
            # Its default is <checkout>/user/comfyui.db whatever --user-directory says (cli_args.py).
            argv += ["--database-url", f"sqlite:///{work / 'user' / 'comfyui.db'}"]
        if not options.share_input_output:
            for flag, name in (("--input-directory", "input"), ("--output-directory", "output")):
                if not _uses(extra, flag):
                    argv += [flag, str(work / name)]
                    dirs.append(str(work / name))
        argv += extra
        return ProcessLaunch(
            argv=tuple(argv),
            cwd=local_path(options.comfyui_path, ctx, "comfyui_path"),
            env=tuple(sorted(instance_env(ctx, env).items())),
            prepare=(MakeDirs(tuple(dirs)),) if dirs else (),
        )

    def preflight(
        self, options: ComfyUIOptions, ctx: LaunchContext, plan: ProcessLaunch
    ) -> list[checks.Problem]:
        return checks.directory(
            plan.cwd, "comfyui_path", "main.py", " (is it a ComfyUI checkout?)"
        ) + checks.program(plan.argv[0], dict(plan.env), plan.cwd, "python")
