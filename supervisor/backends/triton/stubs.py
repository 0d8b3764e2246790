"""The python backend's stub processes and their /dev/shm regions, per instance.

Each instance's server runs with its own shm-region prefix (`shm_prefix`), so its stubs and its
regions are told apart from every other server's: `count_stubs` counts an instance's live stubs
per model (the liveness check heals a model with fewer than its instance_group says), and
`sweep_shm` removes the regions no live process maps (before a launch, after a heal, and as
the plan's after-exit step `ShmSweep`). The process table is read through
`supervisor.adapters.procscan`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from supervisor.adapters.procscan import cmdlines, mapped_files

log = logging.getLogger(__name__)

STUB = "triton_python_backend_stub"
SHM_DIR = "/dev/shm"


def shm_prefix(instance: str, overlay: str) -> str:
    """The python backend's shm region prefix for one instance: readable, and unique per
    supervisor state dir (the overlay path), so no other server's regions ever match it."""
    readable = re.sub(r"[^A-Za-z0-9]+", "_", instance)[:40]
    return f"msup_{readable}_{hashlib.sha256(overlay.encode()).hexdigest()[:10]}_"


def count_stubs(prefix: str) -> dict[str, int]:
    """Live python backend stubs of one instance, per model. A stub's argv is
    `<stub> <repository>/<model>/<version>/model.py <shm region name> ...`, and its region
    name starts with the instance's own prefix."""
    counts: dict[str, int] = {}
    if not prefix:
        return counts
    for _pid, argv in cmdlines():
        if len(argv) > 2 and os.path.basename(argv[0]) == STUB and argv[2].startswith(prefix):
            model = Path(argv[1]).parent.parent.name
            counts[model] = counts.get(model, 0) + 1
    return counts


@dataclass(frozen=True, slots=True)
class ShmSweep:
    """After a run: its python-backend regions, which a killed server or stub leaves behind."""

    prefix: str
    instance: str

    def run(self) -> None:
        removed = sweep_shm(self.prefix)
        if removed:
            log.info(
                "%s: removed %d python-backend shm region(s) the run left behind: %s",
                self.instance,
                len(removed),
                ", ".join(removed),
            )


def sweep_shm(prefix: str) -> list[str]:
    """Remove /dev/shm/<prefix>* regions that no live process maps; returns their names.
    Only processes carrying the prefix in their argv (the server, its stubs) can map one."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if prefix and n.startswith(prefix)]
    except FileNotFoundError:
        return []
    if not names:
        return []
    region = f"{SHM_DIR}/{prefix}"
    mapped: set[str] = set()
    for pid, argv in cmdlines():
        if any(prefix in arg for arg in argv):
            for path in mapped_files(pid):
                if path.startswith(region):
                    mapped.add(path[len(SHM_DIR) + 1 :].split()[0])  # " (deleted)" left out
    removed = []
    for name in names:
        if name not in mapped:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
