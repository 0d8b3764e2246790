"""Reading and writing `conf.d/`: the only module that touches declaration files.

Reading is level-triggered: every reload reads the whole directory afresh, so no sequence
of file events can leave the engine out of step with the files. All functions block.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from supervisor.backends.registry import Registry
from supervisor.config.declarations import (
    MAX_DEPTH,
    ConfigError,
    DeclarationInvalid,
    Defaults,
    ModelSpec,
    parse_declaration,
    preflight,
    toml_error,
)

log = logging.getLogger(__name__)

#: A declaration is a few hundred bytes. Anything over this is not one, and is refused from
#: its size alone (before it is read), so one file cannot hold a reload or memory hostage.
MAX_FILE_BYTES = 1 << 20

_TEMP_SUFFIXES = (".tmp", ".swp", ".swx", ".bak", "~")


def is_declaration_file(name: str) -> bool:
    """`*.toml`, not hidden, not an editor's temporary or backup file."""
    return (
        name.endswith(".toml") and not name.startswith((".", "#", "~")) and not name.endswith(_TEMP_SUFFIXES)
    )


def declaration_files(conf_dir: Path) -> list[Path]:
    """Every entry with a declaration's name, whatever it is. A directory, FIFO or broken
    symlink named `x.toml` becomes x.toml's error instead of vanishing: vanishing would stop
    its running model as "declaration removed" (issue 11)."""
    return sorted(conf_dir / name for name in os.listdir(conf_dir) if is_declaration_file(name))


class Unreadable(Exception):
    """A declaration file that cannot be read as one; the message says why."""


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in _KINDS if test(mode)), "something else")
    return f"is {what}, not a regular file: a declaration must be a plain file"


def _open_error(path: Path, exc: OSError) -> Exception:
    if exc.errno == errno.ELOOP:
        return Unreadable("is a symlink loop (too many levels of symbolic links)")
    if exc.errno == errno.ENOENT:
        if path.is_symlink():
            return Unreadable(f"is a dangling symlink (to {os.readlink(path)!r}, which does not exist)")
        return exc  # deleted since the directory was listed: it is simply gone
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unreadable("permission denied: the supervisor's user cannot read it")
    return Unreadable(f"cannot read: {exc.strerror or exc}")


def read_limited(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Raises `Unreadable` (saying why)
    or FileNotFoundError (the file is gone). Never blocks on a FIFO or a device."""
    try:
        st = path.stat()  # follows symlinks: loops and dangling links fail here, nothing is opened
    except OSError as exc:
        raise _open_error(path, exc) from None
    problem = _not_regular(st.st_mode)
    if problem:
        raise Unreadable(problem)
    if st.st_size > limit:
        raise Unreadable(f"is {st.st_size} bytes, over the limit of {limit} bytes for a declaration file")
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO since the stat, opening it must not
        # wait for a writer (that would freeze this and every later reload).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        problem = _not_regular(os.fstat(fd).st_mode)
        if problem:
            raise Unreadable(problem)
        chunks, size = [], 0
        while size <= limit:  # up to one byte past the limit, to notice a file that grew
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Unreadable(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise Unreadable(f"is over the limit of {limit} bytes for a declaration file")
    return b"".join(chunks)


def read_file(
    path: Path, registry: Registry, defaults: Defaults, host_checks: bool = True
) -> ModelSpec | list[ConfigError]:
    """One file's spec, or its errors. Whatever the file holds this returns (FileNotFoundError
    aside, for a file deleted meanwhile): one hostile file is that file's error, never a
    failed reload or a failed start of `serve` (issue 11)."""
    file = str(path)
    try:
        return _read_file(path, registry, defaults, host_checks)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a bug (ours or a plugin kind's) must not hold up every other file
        log.exception("loading %s failed unexpectedly", file)
        return [ConfigError(file, f"cannot be loaded: internal error: {type(exc).__name__}: {exc}")]


def _read_file(
    path: Path, registry: Registry, defaults: Defaults, host_checks: bool
) -> ModelSpec | list[ConfigError]:
    file = str(path)
    try:
        data = tomllib.loads(read_limited(path).decode("utf-8"))
    except Unreadable as exc:
        return [ConfigError(file, str(exc), type="unreadable")]
    except tomllib.TOMLDecodeError as exc:
        return [toml_error(file, exc)]
    except UnicodeDecodeError as exc:
        return [ConfigError(file, f"not UTF-8 text: {exc}")]
    except RecursionError:  # tomllib recurses once per nested array or inline table
        return [
            ConfigError(file, f"TOML nested too deeply (the limit is {MAX_DEPTH} levels)", type="too_deep")
        ]
    try:
        spec = parse_declaration(data, path, registry, defaults)
    except DeclarationInvalid as exc:
        return exc.errors
    return (preflight(spec) if host_checks else []) or spec


Signature = tuple[int, int, int, int]
ParseCache = dict[str, tuple[Signature, "ModelSpec | list[ConfigError]"]]


def signature(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def read_dir(
    conf_dir: Path,
    registry: Registry,
    defaults: Defaults,
    cache: ParseCache | None = None,
    host_checks: bool = True,
) -> dict[str, ModelSpec | list[ConfigError]]:
    """Parse every declaration file; raises FileNotFoundError if the directory is missing.

    With `cache`, a file whose stat signature (mtime, ctime, size, inode) is unchanged is not
    read again: the periodic full resync then costs a stat per file, not a parse.
    `host_checks=False` checks the declarations alone, not this machine (`preflight`).
    """
    out: dict[str, ModelSpec | list[ConfigError]] = {}
    seen = set()
    for path in declaration_files(conf_dir):
        key = str(path)
        seen.add(key)
        sig = signature(path) if cache is not None else None
        cached = cache.get(key) if cache is not None else None
        if cached is not None and sig is not None and cached[0] == sig:
            out[key] = cached[1]
            continue
        try:
            out[key] = read_file(path, registry, defaults, host_checks)
        except FileNotFoundError:  # deleted since the listing: absent, like any deleted file
            seen.discard(key)
            continue
        # Errors about this machine (a program not installed yet) are not the file's text:
        # they are checked again at every reload, so installing the program is enough.
        if cache is not None and sig is not None and not _machine_dependent(out[key]):
            cache[key] = (sig, out[key])
    if cache is not None:
        for key in set(cache) - seen:
            del cache[key]
    return out


def remember(cache: ParseCache, path: Path, spec: ModelSpec) -> None:
    """`spec` is what `path` holds now (the API just wrote it from that very spec): the next
    read takes it from the cache instead of parsing the file again."""
    sig = signature(path)
    if sig is not None:
        cache[str(path)] = (sig, spec)


def _machine_dependent(result: ModelSpec | list[ConfigError]) -> bool:
    return isinstance(result, list) and any(e.machine for e in result)


def write_atomic(path: Path, document: str | dict[str, Any]) -> None:
    """Replace `path` with `document` (TOML text, or data for a new file): temp file in the same
    dir, fsync, rename.

    Readers (and the watcher) see the old file or the new one, never half of one. The temp
    name starts with a dot and ends in `.tmp`, which `is_declaration_file` ignores. Edits pass
    the text `supervisor.core.tomledit` made from the file itself, so its comments stay.
    """
    if not isinstance(document, str):
        from supervisor.core.tomledit import dumps, new_document

        document = dumps(new_document(document))
    blob = document.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
