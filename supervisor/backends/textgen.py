"""The `textgen` preset: oobabooga's text-generation-webui serving its OpenAI-compatible API.

    python server.py --api --api-port {port} --nowebui [--model M] [extra args]

Flags as read in the project's `modules/shared.py` (argparse) and `modules/api/script.py`
(`run_server`): without `--listen` the API binds 127.0.0.1 only (`--listen-host` is ignored
unless `--listen` is given, so it is not passed); `--nowebui` starts the API alone, after the
model is loaded (server.py), so the API answering means the model is ready. With
`webui = true` the Gradio UI runs too, on its own port (`--listen-port {port_ui}`), also bound
to 127.0.0.1 unless `listen = true`.

It also reads `user_data/CMD_FLAGS.txt` and puts those flags *before* ours (modules/shared.py,
"Handle CMD_FLAGS.txt"): the file is read here too, its owned flags are refused like
`extra_args`, and an `--api-key` in it (or in `extra_args`) is sent by the health probes as
`Authorization: Bearer <key>` (every API route checks it, /v1/models included).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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
from supervisor.backends.flags import owned_flag_findings, read_options, value_of
from supervisor.backends.parser_options import TEXTGEN
from supervisor.backends.preset import NonEmpty, executable, expand_all, local_path, owned_args
from supervisor.core.spec import StrictModel

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
OPENEDAI_LISTEN_ENV = (
    "OPENEDAI_CERT_PATH",
    "OPENEDAI_KEY_PATH",
    "OPENEDAI_ENABLE_IPV6",
    "OPENEDAI_DISABLE_IPV4",
)

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


#: At most this many bytes are read from CMD_FLAGS.txt (a flags file, not a model).
MAX_CMD_FLAGS_BYTES = 1 << 16


class CmdFlagsError(ValueError):
    """CMD_FLAGS.txt cannot be used; the message names the file and says why."""


def user_data_dir(checkout: Path, args: Sequence[str]) -> Path:
    """Where text-generation-webui looks for user_data (modules/paths.py resolve_user_data_dir
    at 1dcde41d): `--user-data-dir` as typed (it is read from sys.argv before argparse, so no
    abbreviation counts), then --portable's ../user_data, else user_data in its working
    directory, which the preset makes the checkout."""
    for i, arg in enumerate(args):
        if arg == "--user-data-dir" and i + 1 < len(args):
            return checkout / args[i + 1]
        if arg.startswith("--user-data-dir="):
            return checkout / arg.split("=", 1)[1]
    if "--portable" in args:
        if (checkout.parent / "app").exists() and (checkout.parent.parent / "user_data").exists():
            return checkout.parent.parent / "user_data"
        if (checkout.parent / "user_data").exists():
            return checkout.parent / "user_data"
    return checkout / "user_data"


def split_cmd_flags(text: str) -> list[str]:
    """The flags of CMD_FLAGS.txt exactly as its shared.py reads them: each line stripped and
    a trailing backslash dropped, blank and `#` lines skipped, the rest joined with spaces and
    split like a shell would (shlex). Raises ValueError for an unclosed quote."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # its universal newlines
    kept = [
        line.strip().rstrip("\\").strip()
        for line in lines
        if line.strip().rstrip("\\").strip() and not line.strip().startswith("#")
    ]
    return shlex.split(" ".join(kept)) if kept else []


def read_cmd_flags(path: Path) -> list[str] | None:
    """The flags of the file at `path`; None when there is none (it is optional). Blocking (one
    small read); never waits on a FIFO. Raises CmdFlagsError naming the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None if not path.is_symlink() else _unusable(path, "is a dangling symlink")
    except OSError as exc:
        return _unusable(path, f"cannot be read: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return _unusable(path, "is not a regular file (text-generation-webui would fail or hang reading it)")
    if st.st_size > MAX_CMD_FLAGS_BYTES:
        return _unusable(path, f"is {st.st_size} bytes, over {MAX_CMD_FLAGS_BYTES} for a flags file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            data = os.read(fd, MAX_CMD_FLAGS_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        why = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or str(exc))
        return _unusable(path, f"cannot be read: {why}")
    try:
        return split_cmd_flags(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return _unusable(path, f"is not UTF-8 (byte {exc.start}), which text-generation-webui requires")
    except ValueError as exc:  # shlex: "No closing quotation"
        return _unusable(
            path, f"cannot be split into flags ({exc}), so text-generation-webui would not start"
        )


def _unusable(path: Path, why: str) -> list[str]:
    raise CmdFlagsError(f"{path} {why}")


def cmd_flags_problems(flags: Sequence[str], path: Path) -> list[str]:
    """Owned flags in the file, in every spelling its argparse accepts, named by item."""
    problems = [
        f"{path} item {index}: {message}"
        for index, message in owned_flag_findings(flags, OWNED_FLAGS, TEXTGEN, key=path.name)
    ]
    if "--" in flags:
        problems.append(
            f"{path} has a bare '--': every flag the supervisor passes after it would be an operand"
        )
    return problems


def last_value(args: Sequence[str], option: str) -> str | None:
    """The value argparse keeps for a `store` option given (in any spelling) in `args`: the last."""
    value = None
    for use in read_options(args, TEXTGEN):
        if use.option == option:
            value = value_of(args, use)
    return value


@dataclass(frozen=True, slots=True)
class CmdFlagsCheck:
    """Runs right before each launch: CMD_FLAGS.txt is read again, since the server reads it at
    every start. New owned flags fail the start; any other change since the plan was built does
    too (the probe's key could be stale), naming the remedy: the declaration read again. Only a digest is kept:
    the flags may hold the API key, and this step's repr is in the plan's fingerprint."""

    file: str
    digest: str

    def run(self) -> None:
        path = Path(self.file)
        flags = read_cmd_flags(path)
        problems = cmd_flags_problems(flags or [], path)
        if problems:
            raise ValueError("; ".join(problems))
        if _digest(flags) != self.digest:
            # A reload re-reads only declarations whose own file changed (confd's parse cache).
            raise ValueError(
                f"{path} changed since the model's declaration was loaded; to apply it, "
                "touch or edit that declaration in conf.d/ (a reload alone does not re-read it)"
            )


def _digest(flags: list[str] | None) -> str:
    return "none" if flags is None else hashlib.sha256("\0".join(flags).encode()).hexdigest()[:16]


def _file_flags(
    options: TextgenOptions, ctx: LaunchContext, args: Sequence[str]
) -> tuple[Path, list[str] | None, str]:
    """CMD_FLAGS.txt's path, its flags (None: none or unreadable) and their digest."""
    path = user_data_dir(Path(local_path(options.textgen_path, ctx, "textgen_path")), args) / "CMD_FLAGS.txt"
    try:
        flags = read_cmd_flags(path)
        return path, flags, _digest(flags)
    except CmdFlagsError:  # reported by preflight (a load error) and by CmdFlagsCheck (a failed start)
        return path, None, "unreadable"


def _server_args(options: TextgenOptions, ctx: LaunchContext) -> list[str]:
    """What follows `server.py` on the command line."""
    args = ["--api", "--api-port", str(ctx.port)]
    args += ["--listen-port", str(ctx.port_of("ui"))] if options.webui else ["--nowebui"]
    if options.listen:
        args.append("--listen")
    if options.model is not None:
        args += ["--model", expand(options.model, ctx, "model")]
    return args + expand_all(options.extra_args, ctx, "extra_args")


class TextgenKind(BackendKind[TextgenOptions, ProcessLaunch]):
    name = "textgen"
    options_model = TextgenOptions

    def default_health(self, options: TextgenOptions) -> DefaultHealth:
        return DefaultHealth("http", "/v1/models")

    def instance_health(self, options: TextgenOptions, ctx: LaunchContext) -> DefaultHealth:
        # The server's command line is CMD_FLAGS.txt's flags, then ours: the last --api-key of
        # both is the one every API route checks (modules/api/script.py verify_api_key).
        args = _server_args(options, ctx)
        _path, flags, _ = _file_flags(options, ctx, args)
        key = last_value([*(flags or []), *args], "--api-key")
        headers = (("Authorization", f"Bearer {key}"),) if key else ()
        return DefaultHealth("http", "/v1/models", headers=headers)

    def extra_ports(self, options: TextgenOptions) -> tuple[str, ...]:
        return ("ui",) if options.webui else ()

    def listens(self, options: TextgenOptions, env: dict[str, str]) -> bool:
        return True

    def launch(self, options: TextgenOptions, ctx: LaunchContext, env: dict[str, str]) -> ProcessLaunch:
        args = _server_args(options, ctx)
        argv = [executable(options.python, ctx, "python"), "server.py", *args]
        path, _flags, digest = _file_flags(options, ctx, args)
        environment = instance_env(ctx, env)
        # OPENEDAI_PORT, when set, wins over --api-port (modules/api/script.py): one inherited
        # from the supervisor's environment would move the API away from {port}.
        environment["OPENEDAI_PORT"] = str(ctx.port)
        return ProcessLaunch(
            argv=tuple(argv),
            cwd=local_path(options.textgen_path, ctx, "textgen_path"),
            env=tuple(sorted(environment.items())),
            unset_env=tuple(name for name in OPENEDAI_LISTEN_ENV if name not in env),
            fail_patterns=(PORT_SWITCH,),
            prepare=(CmdFlagsCheck(str(path), digest),),
        )

    def preflight(
        self, options: TextgenOptions, ctx: LaunchContext, plan: ProcessLaunch
    ) -> list[checks.Problem]:
        problems = checks.directory(
            plan.cwd, "textgen_path", "server.py", " (is it a text-generation-webui checkout?)"
        ) + checks.program(plan.argv[0], dict(plan.env), plan.cwd, "python")
        if problems or plan.cwd is None:
            return problems
        path = user_data_dir(Path(plan.cwd), plan.argv[2:]) / "CMD_FLAGS.txt"
        try:
            flags = read_cmd_flags(path) or []
        except CmdFlagsError as exc:
            return [("textgen_path", str(exc))]
        return [("textgen_path", problem) for problem in cmd_flags_problems(flags, path)]
