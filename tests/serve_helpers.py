"""Running `model-supervisor serve` as a real process in tests, and reading what it left on the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from supervisor.adapters.marks import MARK_ENV, scope_of

from .conftest import PY, REPO, free_port, wait_for

__all__ = ["Serve", "kill_marked", "marked_processes", "wait_for"]


class Serve:
    """One `serve` process on a conf dir and state dir, with its API on a free port."""

    def __init__(self, conf: Path, state: Path, *extra: str, port_range: tuple[int, int]) -> None:
        self.conf, self.state = conf, state
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        env["MODEL_SUPERVISOR_PORT_RANGE"] = f"{port_range[0]}-{port_range[1]}"
        self.log = state.parent / f"serve-{time.monotonic_ns()}.log"
        state.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "supervisor",
                    "serve",
                    "--conf-dir",
                    str(conf),
                    "--state-dir",
                    str(state),
                    "--port",
                    str(self.port),
                    *extra,
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, timeout: float = 2.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict | None = None, timeout: float = 10.0):
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def status(self) -> dict[str, dict] | None:
        """Instance id -> status item, or None while the API does not answer."""
        try:
            return {item["instance_id"]: item for item in self.get("/api/v1/models/status")}
        except (OSError, ValueError):
            return None

    def wait_states(self, wanted: dict[str, str], timeout: float = 90.0) -> dict[str, dict]:
        def ok() -> bool:
            st = self.status()
            return st is not None and all(iid in st and st[iid]["state"] == s for iid, s in wanted.items())

        try:
            wait_for(ok, timeout, f"states {wanted}")
        except AssertionError:
            raise AssertionError(
                f"states not reached: {wanted}; now {self.status()}\n{self.output()[-4000:]}"
            ) from None
        return self.status() or {}

    def kill(self) -> None:
        """SIGKILL the supervisor alone: its instances live on (they have their own sessions)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)


def marked_processes(state: Path) -> dict[int, tuple[str, str]]:
    """Live processes carrying the run mark of `state`'s scope: pid -> (token, instance id).
    Read straight from /proc, independently of the code under test."""
    scope = scope_of(state)
    found: dict[int, tuple[str, str]] = {}
    prefix = f"{MARK_ENV}={scope}:".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, IndexError):
            continue
        for item in env:
            if item.startswith(prefix):
                token, _, instance = item[len(prefix) :].decode().partition(":")
                found[int(entry)] = (token, instance)
    return found


def kill_marked(state: Path) -> list[int]:
    """Cleanup after a test: SIGKILL (by pid) whatever carries our mark and wait until it is
    gone (the leftover check runs next), then remove the run cgroups a SIGKILLed supervisor of
    this scope left (a later one would have, in real life)."""
    pids = list(marked_processes(state))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not set(pids) & set(marked_processes(state)), 60, f"killed pids {pids} to end")
    from supervisor.adapters.cgroups import RunCgroups

    cgroups, _ = RunCgroups.detect(scope_of(state))
    if cgroups is not None:
        for path in cgroups.runs():
            RunCgroups.kill(path)
            RunCgroups.remove(path)
        cgroups.remove_base()
    return pids
