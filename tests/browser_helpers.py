"""A real `serve` subprocess and a real headless Chromium (Playwright) for the dashboard tests.

Chromium is Debian's (`/usr/bin/chromium`), never a downloaded one. Without it (or without the
playwright package) the browser tests skip, unless MODEL_SUPERVISOR_TEST_REQUIRE_BROWSER=1
(CI) makes them fail. Everything started here is stopped by pid in a `finally`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from .conftest import PY, REPO, demo_cmd, free_port, free_range, wait_for, write_decl

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = os.environ.get("MODEL_SUPERVISOR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-output"


def require_browser() -> Any:
    """The `playwright.sync_api` module; skips (or fails, in CI) when it or Chromium is missing."""
    missing = None
    try:
        from playwright import sync_api
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and not os.access(CHROMIUM, os.X_OK):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is None:
        return sync_api
    if os.environ.get("MODEL_SUPERVISOR_TEST_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required (MODEL_SUPERVISOR_TEST_REQUIRE_BROWSER=1) but {missing}")
    pytest.skip(f"browser tests skipped: {missing}")


def expect(target: Any, message: str | None = None) -> Any:
    """Playwright's `expect`, imported only once the browser is known to be there."""
    return require_browser().expect(target, message)


def demo_declaration(name: str = "demo", port: int | None = None, **fields: Any) -> dict[str, Any]:
    """Like the shipped conf.d/demo.toml: ready after 1 s, an HTTP health check, restart after 1 s."""
    doc: dict[str, Any] = {
        "name": name,
        "backend": "process",
        "gpus": "none",
        "port": port or free_port(),
        "cwd": str(REPO),
        "command": demo_cmd("--name", "{name}", "--ready-after", "1"),
        "health": {"type": "http", "path": "/health", "interval": 5.0, "start_interval": 0.2},
        "restart": {"policy": "always", "initial_delay": 1.0, "jitter": 0.0, "max_retries": 5},
        "stop": {"timeout": 10.0},
    }
    doc.update(fields)
    return doc


class Server:
    """`python -m supervisor serve` on 127.0.0.1 with its own conf.d/ and state dir."""

    def __init__(self, tmp_path: Path) -> None:
        self.conf = tmp_path / "conf.d"
        self.state = tmp_path / "state"
        self.conf.mkdir()
        self.log_path = tmp_path / "serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token: str | None = None
        self.proc: subprocess.Popen | None = None

    def declare(self, doc: dict[str, Any]) -> Path:
        return write_decl(self.conf, doc)

    def start(self, token: str | None = None, **env: str) -> None:
        low, high = free_range()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        environ.update(
            MODEL_SUPERVISOR_PORT=str(self.port),
            MODEL_SUPERVISOR_PORT_RANGE=f"{low}-{high}",
            MODEL_SUPERVISOR_GPU_SOURCE="none",
            MODEL_SUPERVISOR_LOG_CHECK_INTERVAL="0.2",
        )
        if token:
            environ["MODEL_SUPERVISOR_API_TOKEN"] = token
        environ.update(env)
        self.token = token
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "supervisor",
                    "serve",
                    "--conf-dir",
                    str(self.conf),
                    "--state-dir",
                    str(self.state),
                ],
                cwd=REPO,
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, f"serve exited:\n{self.log()}"
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=5).read()
                return True
            except OSError:
                return False

        try:
            wait_for(up, 60, "serve to come up")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def request(
        self,
        path: str,
        method: str = "GET",
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        all_headers = {"Authorization": f"Bearer {self.token}"} if self.token and auth else {}
        all_headers.update(headers or {})
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        status, _, body = self.request("/api/v1/models/status")
        assert status == 200, body
        return {i["instance_id"]: i for i in json.loads(body)}.get(instance_id)

    def wait_state(self, instance_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        seen: list[dict[str, Any] | None] = [None]

        def reached() -> bool:
            seen[0] = self.instance(instance_id)
            return seen[0] is not None and seen[0]["state"] == state

        try:
            wait_for(reached, timeout, f"{instance_id} to reach {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {seen[0]}\n{self.log()}") from None
        assert seen[0] is not None
        return seen[0]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# Test instrumentation, injected before the page's own script: every state an instance row
# shows (to see BACKOFF/STARTING pass by), and how often each dialog was opened.
RECORDER = """
window.__states = [];
window.__dialogs = {};
const showModal = HTMLDialogElement.prototype.showModal;
HTMLDialogElement.prototype.showModal = function () {
  window.__dialogs[this.id] = (window.__dialogs[this.id] || 0) + 1;
  return showModal.call(this);
};
new MutationObserver(() => {
  for (const el of document.querySelectorAll("tr[data-instance] [data-field=state] .state")) {
    const seen = el.closest("tr").dataset.instance + "=" + el.textContent;
    const mine = window.__states.filter((s) => s.startsWith(el.closest("tr").dataset.instance + "="));
    if (mine[mine.length - 1] !== seen) window.__states.push(seen);
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


class Browser:
    """One page in a fresh context, with its console errors and failed requests collected."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console_errors: list[str] = []
        self.failed_requests: list[str] = []
        self.requests: list[str] = []
        self.navigations = 0
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.failed_requests.append(f"{r.method} {r.url}: {r.failure}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("framenavigated", lambda f: self._navigated(f))
        page.add_init_script(RECORDER)

    def _navigated(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self.navigations += 1

    def states(self, instance_id: str) -> list[str]:
        prefix = instance_id + "="
        return [s[len(prefix) :] for s in self.page.evaluate("window.__states") if s.startswith(prefix)]

    def row(self, instance_id: str):
        return self.page.locator(f'tr[data-instance="{instance_id}"]')


@contextmanager
def playwright_started() -> Iterator[Any]:
    """Playwright, stopped at the end, and then waited for: its driver and the browser
    processes under it end asynchronously, and the test's leftover check must not meet them
    still on their way out (on a loaded machine it did)."""
    sync_api = require_browser()
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    playwright = sync_api.sync_playwright().start()
    drivers = [p for p in me.children() if p.pid not in before]
    try:
        yield playwright
    finally:
        tree = list(drivers)
        for driver in drivers:
            try:
                tree += driver.children(recursive=True)
            except psutil.Error:
                pass
        playwright.stop()
        psutil.wait_procs(tree, timeout=60)  # what still runs after that is the leftover check's


@contextmanager
def browser(
    request: pytest.FixtureRequest, server: Server, viewport: dict[str, int] | None = None
) -> Iterator[Browser]:
    """Chromium with one page; on a failed test, its screenshot, HTML and the serve log go to test-output/."""
    with playwright_started() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport=viewport or {"width": 1280, "height": 800})
            context.set_default_timeout(20_000)
            b = Browser(context.new_page())
            yield b
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                save_artifacts(request.node.name, b.page, server)
        finally:
            chromium.close()


def save_artifacts(test_name: str, page: Page, server: Server) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    stem = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
    try:
        page.screenshot(path=f"{stem}.png", full_page=True)
        Path(f"{stem}.html").write_text(page.content())
    except Exception as exc:  # the page may be what broke: keep what we can
        Path(f"{stem}.artifact-error.txt").write_text(repr(exc))
    Path(f"{stem}.serve.log").write_text(server.log())
