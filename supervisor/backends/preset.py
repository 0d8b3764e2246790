"""What the backend presets (triton, comfyui, vllm, textgen) share: option types and the
small rules every preset applies the same way.

A preset owns some command-line flags (the port, the bind address, the GPU count): the user's
`extra_args` may not repeat them, or the server would listen where the supervisor does not
look, or on GPUs it was not given.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from supervisor.backends.base import LaunchContext, PlaceholderError, expand
from supervisor.backends.flags import ParserSyntax, owned_flag_findings
from supervisor.core.spec import NAME_RE

#: Health probes always connect to 127.0.0.1, so a server must listen there or everywhere.
PROBE_REACHABLE = ("127.0.0.1", "0.0.0.0", "::")


class OptionError(PlaceholderError):
    """An option that only `launch()` can check (it needs the declaration's name or several
    keys at once). It is raised at load time like a placeholder error, naming its key."""


def _bind_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    if value not in PROBE_REACHABLE:
        raise ValueError(
            f"{value!r}: the supervisor checks readiness on 127.0.0.1, so listen on 127.0.0.1 "
            "(this machine only) or on 0.0.0.0 / :: (every interface)"
        )
    return value


#: An address a server binds: 127.0.0.1 (the default everywhere), 0.0.0.0 or ::.
BindAddress = Annotated[str, AfterValidator(_bind_address)]


def model_name(value: str) -> str:
    # Model names become directory names in the overlay repository and Triton URLs
    # (weakness 16 of the old tool: "../x" escaped the repository).
    if not NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid model name: use 1 to 64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return value


ModelName = Annotated[str, AfterValidator(model_name)]

NonEmpty = Annotated[str, Field(min_length=1)]


def reject_flags(owned: Mapping[str, str]) -> Callable[[str], str]:
    """A validator for one `extra_args` item: flags in `owned` (flag -> the key that sets it)
    are the preset's own. `--flag value`, `--flag=value` and `--flag_name` are all caught."""

    def check(arg: str) -> str:
        # vLLM reads --tensor_parallel_size as --tensor-parallel-size: compare in dash form.
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag in owned:
            raise ValueError(
                f"{flag} is set by the supervisor (from {owned[flag]}); remove it from extra_args"
            )
        return arg

    return check


def owned_args(owned: Mapping[str, str], syntax: ParserSyntax) -> Callable[[list[str]], list[str]]:
    """A validator for a whole `extra_args` list: every item that sets a flag of `owned`
    (flag -> the key that sets it) in any spelling `syntax`'s parser accepts is an error under
    its own key (`extra_args[3]`). The whole list is needed: after `--` nothing is an option."""

    def check(args: list[str]) -> list[str]:
        findings = owned_flag_findings(args, owned, syntax)
        if findings:
            # Raised as a ValidationError so each error keeps its item's index in its location.
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

    return check


def expand_all(values: Iterable[str], ctx: LaunchContext, key: str) -> list[str]:
    return [expand(value, ctx, f"{key}[{i}]") for i, value in enumerate(values)]


def executable(value: str, ctx: LaunchContext, key: str) -> str:
    """A program: a bare name is looked up on PATH; anything with a slash is a path, relative
    to the declaration file's directory. Symlinks are kept: `venv/bin/python` is a symlink to
    the base interpreter, and resolving it would silently leave the venv."""
    value = expand(value, ctx, key)
    if "/" not in value and not value.startswith("~"):
        return value
    path = Path(value).expanduser()
    return str(path) if path.is_absolute() else os.path.normpath(ctx.here / path)


def local_path(value: str, ctx: LaunchContext, key: str) -> str:
    return ctx.resolve_path(expand(value, ctx, key))
