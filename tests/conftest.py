"""Shared fixtures: temp conf.d/state dirs, declarations written as real files, a real engine.

Every test kills what it started: the engine's own shutdown stops every instance, and the
`no_leftover_processes` fixture kills (by pid) any descendant of this test process that is
still alive afterwards, then fails the test that leaked it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest
import tomli_w
import uvloop

from supervisor.config.settings import Settings, load_settings
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "backends" / "demo_server.py"
PY = sys.executable


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (`item.rep_call`): fixtures that save artifacts of a
    failed test (the dashboard tests' screenshots) read it in their teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_asyncio_loop_factories(config, item):
    """Run every async test on uvloop, the loop `serve` uses in production."""
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(size: int = 50) -> tuple[int, int]:
    """A block of ports that are free right now, for automatic assignment in one test."""
    for _ in range(200):
        start = free_port()
        if start + size > 65000:
            continue
        ok = True
        for port in range(start, start + size):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start, start + size - 1
    raise RuntimeError("no free port range")


def demo_cmd(*extra: str) -> list[str]:
    return [PY, str(DEMO), "--port", "{port}", *extra]


def sleep_cmd(seconds: float = 3600) -> list[str]:
    return [PY, "-c", f"import time; time.sleep({seconds})"]


def declaration(name: str, command: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "backend": "process", "command": command or sleep_cmd()}
    doc.update(fields)
    return doc


def write_decl(conf_dir: Path, doc: dict[str, Any], filename: str | None = None) -> Path:
    path = conf_dir / (filename or f"{doc['name']}.toml")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps(doc))
    os.replace(tmp, path)
    return path


FAST_RESTART = {"initial_delay": 0.0, "jitter": 0.0, "max_retries": 0, "min_uptime": 1.0}


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "conf.d"
    d.mkdir()
    return d


@pytest.fixture
def settings(tmp_path: Path, conf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("MODEL_SUPERVISOR_"):
            monkeypatch.delenv(key)
    return load_settings(
        conf_dir=conf_dir,
        state_dir=tmp_path / "state",
        port_range=free_range(),
        log_check_interval=0.2,
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    eng = build(settings).engine
    try:
        yield eng
    finally:
        await asyncio.wait_for(eng.shutdown(), 60)


LEAK_MARK = "MSUP_TEST_LEAK_MARK"


def _marked(mark: str) -> list[int]:
    """Pids of live processes whose environment carries `mark` (inherited from this test)."""
    needle = f"{LEAK_MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail (and clean up after) any test that leaves a process behind.

    Every process a test starts inherits a marker in its environment, so even a grandchild
    that left its session and was reparented to init is found, and killed by pid.
    """
    mark = f"{os.getpid()}-{id(request)}"
    previous = os.environ.get(LEAK_MARK)
    os.environ[LEAK_MARK] = mark
    try:
        yield
    finally:
        if previous is None:
            del os.environ[LEAK_MARK]
        else:
            os.environ[LEAK_MARK] = previous
    leftovers = []
    for pid in _marked(mark):
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            leftovers.append(f"{pid} {' '.join(proc.cmdline())}")
            os.kill(pid, signal.SIGKILL)
        except psutil.Error:
            continue
    assert not leftovers, f"test left processes behind: {leftovers}"


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a zombie has released everything it held)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    """For conditions outside the engine (files, other processes); engine state is awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        await asyncio.sleep(interval)


def wait_for(predicate, timeout: float = 20.0, what: str = "", interval: float = 0.05) -> None:
    """Poll `predicate` until it holds (the blocking twin of `wait_until`, for tests that drive
    processes). `timeout` is a generous deadline for a loaded machine, never a measurement."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def default_sigint() -> None:
    """`preexec_fn` for a child a test stops with SIGINT, as a user's ^C does. A suite started with
    SIGINT ignored (`nohup`, `cmd &` in a script) hands SIG_IGN down to every child, and Python
    then installs no KeyboardInterrupt handler: without this, the SIGINT never stops the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Output:
    """A child's text output, read by a thread as it comes, so a test waits for what it expects
    (with a deadline) instead of sleeping, or blocking in `readline` on a child that is silent."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="child-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._lock:
                self._chunks.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20.0, what: str = "") -> str:
        """The output so far, once `predicate(output)` holds."""
        try:
            wait_for(lambda: predicate(self.text()), timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; output so far:\n{self.text()[-3000:]}") from None
        return self.text()

    def close(self, timeout: float = 10.0) -> str:
        """Everything the child wrote, once it closed its end (call after the child exited)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the child's output did not end"
        return self.text()
