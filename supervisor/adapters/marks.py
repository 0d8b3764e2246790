"""The mark every process of an instance carries, so none escapes the supervisor.

Process groups and ppid walks lose a descendant that calls setsid() and whose parent then
dies (it is reparented to pid 1 or a subreaper). The environment is inherited across fork and
exec, so each run's leader gets `MODEL_SUPERVISOR_RUN=<scope>:<token>:<instance id>` and every
descendant carries it too, unless it deliberately clears its environment.

* scope: this supervisor's state dir (two supervisors on one host never touch each other's);
* token: one run of one instance (a restart gets a new token; adoption keeps the old one);
* instance id: for the log line when a leftover is stopped.

`/proc/<pid>/environ` is the environment at exec time; it never changes for a process, so a
mark is read once per (pid, start time) and cached.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass

MARK_ENV = "MODEL_SUPERVISOR_RUN"
_NEEDLE = MARK_ENV.encode() + b"="
_CACHE_LIMIT = 8192


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


_cache: dict[tuple[int, int], Mark | None] = {}


def read_mark(pid: int, starttime: int, remember_none: bool = True) -> Mark | None:
    """The mark of a live process (None: unmarked, gone, or not ours to read). Blocking.

    `remember_none=False` for our own fresh children: between fork and exec a child still has
    our (unmarked) environment, so "no mark" may be only for the moment."""
    key = (pid, starttime)
    try:
        return _cache[key]
    except KeyError:
        pass
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            mark = parse_environ(f.read())
    except OSError:  # gone, or another user's process (we could not have started it)
        mark = None
    if mark is None and not remember_none:
        return None
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[key] = mark
    return mark
