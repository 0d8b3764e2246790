"""The mark every process of an instance carries, so none escapes the supervisor.

Process groups and ppid walks lose a descendant that calls setsid() and whose parent then
dies (it is reparented to pid 1 or a subreaper). The environment is inherited across fork and
exec, so each run's leader gets `MODEL_SUPERVISOR_RUN=<scope>:<token>:<instance id>` and every
descendant carries it too, unless it deliberately clears its environment.

* scope: this supervisor's state dir (two supervisors on one host never touch each other's);
* token: one run of one instance (a restart gets a new token; adoption keeps the old one);
* instance id: for the log line when a leftover is stopped.

A mark is read from `/proc/<pid>/environ` (the environment at exec time, which never changes
for a process) by `procscan.read_mark`, once per (pid, start time); this module only makes and
parses marks, so the process table's reader can use it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass

MARK_ENV = "MODEL_SUPERVISOR_RUN"
_NEEDLE = MARK_ENV.encode() + b"="


def scope_of(state_dir: os.PathLike[str] | str) -> str:
    """One supervisor's scope (its state dir): containers and marks of two never collide."""
    return hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:8]


def new_token() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class Mark:
    scope: str
    token: str
    instance: str

    def value(self) -> str:
        return f"{self.scope}:{self.token}:{self.instance}"

    @classmethod
    def parse(cls, text: str) -> Mark | None:
        parts = text.split(":", 2)
        if len(parts) != 3 or not all(parts):
            return None
        return cls(*parts)


def parse_environ(blob: bytes) -> Mark | None:
    """The mark in a NUL-separated environment block, or None."""
    start = blob.find(_NEEDLE)
    while start > 0 and blob[start - 1] != 0:  # a match inside another variable's value
        start = blob.find(_NEEDLE, start + 1)
    if start < 0:
        return None
    end = blob.find(b"\0", start)
    value = blob[start + len(_NEEDLE) : end if end >= 0 else None]
    try:
        return Mark.parse(value.decode())
    except UnicodeDecodeError:
        return None
