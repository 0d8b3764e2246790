"""One cgroup (v2) per run, where the kernel lets us: nothing of a run can hide from `cgroup.kill`.

Like systemd's `KillMode=control-group`: every process a run starts stays in the run's cgroup
whatever it does with sessions, groups or parents, and `cgroup.kill` (Linux 5.14+) SIGKILLs
them all at once. The runs live under `<our own cgroup>/msup-<scope>/` on the cgroup2 mount,
so a restarted supervisor finds leftovers of its scope there too.

Used only where the supervisor may create cgroups (root, or a delegated subtree) and the
kernel has `cgroup.kill`; otherwise `detect()` says why, and marks + subreaper do the job.
All calls block briefly (small files under /sys/fs/cgroup); the runner calls them from threads
or right after a spawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

from supervisor.adapters.procscan import mounts, own_cgroup

log = logging.getLogger(__name__)


def _cgroup2_mount() -> Path | None:
    return next((Path(point) for _, point, fstype in mounts() if fstype == "cgroup2"), None)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", name)[:100]


class RunCgroups:
    """The cgroups of one supervisor scope's runs."""

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def detect(cls, scope: str) -> tuple[RunCgroups | None, str]:
        """(cgroups, description): cgroups is None where they cannot be used, and why."""
        mount = _cgroup2_mount()
        if mount is None:
            return None, "no cgroup2 hierarchy mounted"
        own = own_cgroup()
        if own is None:
            return None, "not in a cgroup2 hierarchy"
        parent = mount / own.lstrip("/")
        if not (parent / "cgroup.kill").exists() and own != "/":
            return None, "the kernel has no cgroup.kill (Linux 5.14+)"
        base = parent / f"msup-{scope}"
        try:
            base.mkdir(exist_ok=True)
        except OSError as exc:
            return None, f"cannot create cgroups under {parent}: {exc.strerror}"
        probe = base / f"probe-{os.getpid()}"
        try:
            probe.mkdir(exist_ok=True)
            ok = (probe / "cgroup.kill").exists()
            probe.rmdir()
        except OSError as exc:
            return None, f"cannot create cgroups under {base}: {exc.strerror}"
        if not ok:
            return None, "the kernel has no cgroup.kill (Linux 5.14+)"
        return cls(base), f"cgroup v2 ({base})"

    def path_for(self, instance_id: str, token: str) -> Path:
        return self.base / f"{_safe(instance_id)}-{token}"

    def create(self, instance_id: str, token: str) -> Path:
        path = self.path_for(instance_id, token)
        path.mkdir(exist_ok=True)
        return path

    @staticmethod
    def attach(path: Path, pid: int) -> bool:
        try:
            (path / "cgroup.procs").write_text(str(pid))
            return True
        except OSError as exc:
            log.warning("cannot move pid %s into %s: %s", pid, path, exc.strerror)
            return False

    @staticmethod
    def procs(path: Path) -> list[int]:
        try:
            return [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    @staticmethod
    def kill(path: Path) -> None:
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1")

    @staticmethod
    def memory(path: Path) -> int | None:
        """Bytes in use by the run (needs the memory controller delegated; else None)."""
        try:
            return int((path / "memory.current").read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def remove(path: Path, timeout: float = 2.0) -> bool:
        """rmdir once empty (the kernel frees a killed cgroup shortly after its last exit)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)

    def remove_base(self) -> None:
        """Our scope's directory, once no run is left in it (a kept-running run keeps it)."""
        with contextlib.suppress(OSError):
            self.base.rmdir()

    @staticmethod
    def token_of(path: Path) -> str:
        """The run token a run cgroup is named after (`path_for`)."""
        return path.name.rsplit("-", 1)[-1]

    def runs(self) -> list[Path]:
        """The run cgroups of our scope that exist now (read at start: an earlier supervisor's)."""
        try:
            entries = [p for p in self.base.iterdir() if p.is_dir()]
        except OSError:
            return []
        return [p for p in entries if not p.name.startswith("probe-")]
