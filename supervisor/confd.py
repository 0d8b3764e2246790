"""Reading and writing `conf.d/`: the only module that touches declaration files.

Reading is level-triggered: every reload reads the whole directory afresh, so no sequence
of file events can leave the engine out of step with the files. All functions block.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from .backends.registry import Registry
from .declarations import ConfigError, DeclarationInvalid, Defaults, ModelSpec, parse_declaration, toml_error

_TEMP_SUFFIXES = (".tmp", ".swp", ".swx", ".bak", "~")


def is_declaration_file(name: str) -> bool:
    """`*.toml`, not hidden, not an editor's temporary or backup file."""
    return (
        name.endswith(".toml")
        and not name.startswith((".", "#", "~"))
        and not name.endswith(_TEMP_SUFFIXES)
    )


def declaration_files(conf_dir: Path) -> list[Path]:
    return sorted(p for p in conf_dir.iterdir() if is_declaration_file(p.name) and p.is_file())


def read_file(path: Path, registry: Registry, defaults: Defaults) -> ModelSpec | list[ConfigError]:
    file = str(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        return [toml_error(file, exc)]
    except UnicodeDecodeError as exc:
        return [ConfigError(file, f"not UTF-8 text: {exc}")]
    except OSError as exc:
        return [ConfigError(file, f"cannot read: {exc.strerror or exc}")]
    try:
        return parse_declaration(data, path, registry, defaults)
    except DeclarationInvalid as exc:
        return exc.errors


Signature = tuple[int, int, int, int]
ParseCache = dict[str, tuple[Signature, "ModelSpec | list[ConfigError]"]]


def signature(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def read_dir(conf_dir: Path, registry: Registry, defaults: Defaults,
             cache: ParseCache | None = None) -> dict[str, ModelSpec | list[ConfigError]]:
    """Parse every declaration file; raises FileNotFoundError if the directory is missing.

    With `cache`, a file whose stat signature (mtime, ctime, size, inode) is unchanged is not
    read again: the periodic full resync then costs a stat per file, not a parse.
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
        out[key] = read_file(path, registry, defaults)
        if cache is not None and sig is not None:
            cache[key] = (sig, out[key])
    if cache is not None:
        for key in set(cache) - seen:
            del cache[key]
    return out


def write_atomic(path: Path, document: str | dict[str, Any]) -> None:
    """Replace `path` with `document` (TOML text, or data for a new file): temp file in the same
    dir, fsync, rename.

    Readers (and the watcher) see the old file or the new one, never half of one. The temp
    name starts with a dot and ends in `.tmp`, which `is_declaration_file` ignores. Edits pass
    the text `supervisor.tomledit` made from the file itself, so its comments stay.
    """
    if not isinstance(document, str):
        from .tomledit import dumps, new_document

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
