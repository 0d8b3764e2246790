"""The `comfyui` preset: `python main.py --listen ADDRESS --port {port}` in a ComfyUI checkout.

Fixes of the old tool's runner: the interpreter is configurable (weakness 10: it ran `python`
from PATH, not ComfyUI's venv), readiness is `/system_stats`, and the GPUs are pinned with
CUDA_VISIBLE_DEVICES in PCI bus order (weakness 25).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import AfterValidator, field_validator

from ..spec import StrictModel
from . import checks
from .base import BackendKind, DefaultHealth, LaunchContext, ProcessLaunch, instance_env
from .preset import PROBE_REACHABLE, NonEmpty, executable, expand_all, local_path, reject_flags

#: Flags this preset sets itself. `--cuda-device` would override CUDA_VISIBLE_DEVICES (ComfyUI
#: sets it from that flag) and put the instance on a GPU the supervisor did not give it.
OWNED_FLAGS = {"--listen": "listen", "--port": "port", "--cuda-device": "gpus"}

ComfyArg = Annotated[str, AfterValidator(reject_flags(OWNED_FLAGS))]


class ComfyUIOptions(StrictModel):
    #: The ComfyUI checkout (the directory with main.py); relative to the declaration file.
    comfyui_path: NonEmpty
    #: The interpreter with ComfyUI's dependencies, usually its venv's python. A bare name is
    #: looked up on PATH; "{python}" is the supervisor's own interpreter.
    python: NonEmpty = "python3"
    #: ComfyUI's --listen: one address or a comma-separated list (ComfyUI accepts both).
    listen: NonEmpty = "127.0.0.1"
    extra_args: list[ComfyArg] = []

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
            raise ValueError(f"{value!r}: the supervisor checks readiness on 127.0.0.1, so include 127.0.0.1 "
                             "(this machine only) or 0.0.0.0 / :: (every interface)")
        return value


class ComfyUIKind(BackendKind):
    name = "comfyui"
    options_model = ComfyUIOptions

    def default_health(self, options: ComfyUIOptions) -> DefaultHealth:  # type: ignore[override]
        # Answers once the server is up and the custom nodes are imported; the old tool's
        # /history also answered 200, but says nothing about the machine.
        return DefaultHealth("http", "/system_stats")

    def listens(self, options: ComfyUIOptions, env: dict[str, str]) -> bool:  # type: ignore[override]
        return True

    def launch(self, options: ComfyUIOptions, ctx: LaunchContext, env: dict[str, str]) -> ProcessLaunch:  # type: ignore[override]
        argv = [executable(options.python, ctx, "python"), "main.py",
                "--listen", options.listen, "--port", str(ctx.port)]
        if not ctx.gpus:
            # ComfyUI asks torch for the current CUDA device at import and dies when there is
            # none (CUDA_VISIBLE_DEVICES is empty here) unless it is told to use the CPU.
            argv.append("--cpu")
        argv += expand_all(options.extra_args, ctx, "extra_args")
        return ProcessLaunch(argv=tuple(argv), cwd=local_path(options.comfyui_path, ctx, "comfyui_path"),
                             env=tuple(sorted(instance_env(ctx, env).items())))

    def preflight(self, options: ComfyUIOptions, ctx: LaunchContext, plan: ProcessLaunch) -> list[checks.Problem]:  # type: ignore[override]
        return (checks.directory(plan.cwd, "comfyui_path", "main.py", " (is it a ComfyUI checkout?)")
                + checks.program(plan.argv[0], dict(plan.env), plan.cwd, "python"))
