"""Runtime records in the state dir: one JSON file per running instance.

Each holds the pid and the process start time (or the container id), so a supervisor that
restarts after a crash can tell its own surviving children from a reused pid.
Blocking file I/O: called from helper tasks through threads, never from the state machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunRecords:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, instance_id: str) -> Path:
        return self.directory / f"{instance_id}.json"

    def write(self, instance_id: str, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(instance_id)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, path)

    def remove(self, instance_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(instance_id).unlink()

    def read_all(self) -> dict[str, dict[str, Any]]:
        """Every record left in the directory, by instance id (unreadable ones are logged, skipped)."""
        found: dict[str, dict[str, Any]] = {}
        try:
            paths = sorted(self.directory.glob("*.json"))
        except OSError:
            return found
        for path in paths:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable run record %s: %s", path, exc)
                continue
            if isinstance(record, dict) and isinstance(record.get("instance"), str):
                found[record["instance"]] = record
        return found
