"""Edits of declaration files that change only what they change (issue 13).

Users write conf.d/ by hand: comments, alignment, key order and the way an array is wrapped
are theirs. An API or CLI edit (start/stop on a GPU, enable/disable, PUT) computes the new
document as plain data; `apply` then carries just the differences over to the file's
tomlkit document, so a `diff` of the file shows the changed values and nothing else.
Files the API creates get a natural key order (`new_document`).

Pure: text in, text out; reading stays with tomllib (`supervisor.adapters.confd`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Array, InlineTable, Table
from tomlkit.toml_document import TOMLDocument

#: Keys that open a declaration, in this order; the rest follow as given, tables last.
FIRST_KEYS = (
    "name",
    "backend",
    "description",
    "enabled",
    "gpus",
    "instances",
    "gpus_per_instance",
    "min_free_memory_mb",
    "share_gpus",
    "port",
)

TomlError = TOMLKitError


def parse(text: str) -> TOMLDocument:
    """The file as a style-keeping document (raises TomlError)."""
    return tomlkit.parse(text)


def dumps(doc: TOMLDocument) -> str:
    return tomlkit.dumps(doc)


def plain(doc: TOMLDocument) -> dict[str, Any]:
    """The document as ordinary dicts, lists and scalars."""
    return doc.unwrap()


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _ordered(data: Mapping[str, Any], first: tuple[str, ...]) -> list[str]:
    keys = [k for k in first if k in data] + [k for k in data if k not in first]
    # TOML puts a table's own keys before its sub-tables; keep that order stable otherwise.
    return sorted(keys, key=lambda k: _is_table(data[k]) or _is_table_array(data[k]))


def _fill(container: Any, data: Mapping[str, Any], first: tuple[str, ...] = ()) -> None:
    for key in _ordered(data, first):
        value = data[key]
        if _is_table(value):
            table = tomlkit.table()
            _fill(table, value)
            container.add(key, table)
        elif _is_table_array(value):
            aot = tomlkit.aot()
            for entry in value:
                table = tomlkit.table()
                _fill(table, entry)
                aot.append(table)
            container.add(key, aot)
        else:
            container.add(key, tomlkit.item(value))


def new_document(data: Mapping[str, Any]) -> TOMLDocument:
    """A fresh file for `data`: name, backend, description, gpus, port, command…, then the tables."""
    doc = tomlkit.document()
    _fill(doc, data, FIRST_KEYS)
    return doc


def apply(doc: TOMLDocument, new: Mapping[str, Any]) -> TOMLDocument:
    """Change `doc` in place so that it reads as `new`, touching only the keys that differ."""
    _merge(doc, new)
    return doc


def _merge(container: Container | Table | InlineTable | TOMLDocument, new: Mapping[str, Any]) -> None:
    current = container.unwrap()
    for key in [k for k in current if k not in new]:
        del container[key]
    for key, value in new.items():
        if key not in current:
            _add(container, key, value)
            continue
        if current[key] == value and type(current[key]) is type(value):
            continue  # untouched: its text, comment and layout stay as written
        item = container[key]
        if isinstance(item, (Table, InlineTable)) and _is_table(value):
            _merge(item, value)
        elif isinstance(item, Array) and isinstance(value, list) and not _is_table_array(value):
            _edit_array(container, key, item, value)
        elif isinstance(item, AoT) and _is_table_array(value) and len(item) == len(value):
            for table, entry in zip(item, value, strict=False):
                _merge(table, entry)
        else:
            container[key] = _item(value)


def _add(container: Any, key: str, value: Any) -> None:
    if _is_table(value) or _is_table_array(value):
        _fill(container, {key: value})
        return
    # A new plain key goes right after the last plain key. tomlkit alone puts it just above the
    # first table, under the comment that introduces that table, and 0.15 adds a blank line too.
    # `_insert_at` (in every tomlkit from 0.12 to 0.15, unlike `_insert_after`, gone in 0.15)
    # places it by index in the body, which keeps every other line where it was.
    target = container.value if isinstance(container, Table) else container
    body = target.body
    last_plain = max(
        (i for i, (k, v) in enumerate(body) if k is not None and not isinstance(v, (Table, AoT))),
        default=None,
    )
    if last_plain is not None and last_plain + 1 < len(body):
        target._insert_at(last_plain + 1, key, tomlkit.item(value))
    else:
        container[key] = tomlkit.item(value)


def _item(value: Any) -> Any:
    if _is_table(value):
        table = tomlkit.table()
        _fill(table, value)
        return table
    if _is_table_array(value):
        aot = tomlkit.aot()
        for entry in value:
            table = tomlkit.table()
            _fill(table, entry)
            aot.append(table)
        return aot
    return tomlkit.item(value)


def _edit_array(container: Any, key: str, item: Array, value: list[Any]) -> None:
    """Appends and removals edit the array where it stands (keeping its spacing and comments);
    anything else replaces it."""
    old = item.unwrap()
    if value[: len(old)] == old:  # only appended
        for entry in value[len(old) :]:
            item.append(entry)
        return
    keep: list[int] = []
    j = 0
    for i, entry in enumerate(old):
        if j < len(value) and entry == value[j]:
            keep.append(i)
            j += 1
    if j == len(value):  # only removed
        for i in reversed([i for i in range(len(old)) if i not in keep]):
            del item[i]
        return
    container[key] = tomlkit.item(value)
