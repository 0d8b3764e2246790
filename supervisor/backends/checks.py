"""Checks a kind's `preflight` runs against this machine before a declaration is accepted.

A declaration naming a program that is not installed, or a directory that is not there, used
to pass `validate` and, as a hot edit, replace a healthy instance with one stuck in BACKOFF
(issue 11). What can be known before the launch is checked here, the same way the launch
itself would resolve it. Blocking (stats only). Each check returns (key, problem) pairs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

Problem = tuple[str, str]

#: Placeholders whose value differs per instance (and is only known at launch): a template
#: holding one cannot be checked from a sample expansion.
_PER_INSTANCE = ("{port", "{gpus}", "{gpu_count}", "{instance}", "{work_dir}")


def per_instance(template: str | None) -> bool:
    return template is not None and any(p in template for p in _PER_INSTANCE)


def program(argv0: str, env: Mapping[str, str], cwd: str | None, key: str) -> list[Problem]:
    """`argv0` can be executed: a bare name is found on the PATH the child gets; a path is
    taken relative to the child's working directory, as exec does after the chdir."""
    if "\0" in argv0:
        return []  # reported with its key by the NUL check of the declaration
    if "/" not in argv0:
        search = env.get("PATH", os.environ.get("PATH", os.defpath))
        if shutil.which(argv0, path=search) is None:
            return [(key, f"program {argv0!r} is not found on PATH ({search}), or is not executable there")]
        return []
    if cwd is not None and not os.path.isabs(argv0) and not os.path.isdir(cwd):
        return []  # the missing working directory is the problem (reported by its own check)
    path = os.path.join(cwd or os.getcwd(), argv0)
    shown = repr(argv0) if path == argv0 else f"{argv0!r} ({path})"
    if not os.path.exists(path):
        return [(key, f"program {shown} does not exist")]
    if os.path.isdir(path):
        return [(key, f"program {shown} is a directory, not a program")]
    if not os.access(path, os.X_OK):
        return [(key, f"program {shown} is not executable (chmod +x?)")]
    return []


def directory(path: str | None, key: str, containing: str | None = None, hint: str = "") -> list[Problem]:
    """`path` is a directory (holding the file `containing`, when given)."""
    if path is None or "\0" in path:
        return []
    if not os.path.exists(path):
        return [(key, f"directory {path} does not exist")]
    if not os.path.isdir(path):
        return [(key, f"{path} is not a directory")]
    if containing is not None and not os.path.isfile(os.path.join(path, containing)):
        return [(key, f"{path} has no {containing}{hint}")]
    return []


def exists(path: str, key: str) -> list[Problem]:
    if "\0" in path or os.path.exists(path):
        return []
    return [(key, f"{path} does not exist")]
