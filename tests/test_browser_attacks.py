"""Issue 11 item 1 from a real browser: a page on another origin cannot make the supervisor run
anything, and the dashboard (same origin) still starts and stops models.

The attacker's page is served by a plain HTTP server on another 127.0.0.1 port; it sends what
browsers send without asking (a `text/plain` fetch, form posts) and tries a CORS request. DNS
rebinding is reproduced with Chromium's host resolver: `evil.example` resolves to 127.0.0.1,
the attacker's page is answered for `http://evil.example:<supervisor port>/` (Playwright plays
the attacker's server before the rebinding), and its same-origin fetches then reach the real
supervisor with `Host: evil.example:<port>`. Each declared command would create a marker file;
it must never appear. The supervisor's request counters prove every attempt arrived.
"""

from __future__ import annotations

import json
import re
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .browser_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Server,
    demo_declaration,
    playwright_started,
    require_browser,
)
from .conftest import PY, free_port, wait_for

pytestmark = pytest.mark.slow  # a real `serve` process and Chromium

EVIL_HOST = "evil.example"
# Recent Chromium asks the user before a public page may reach the local network ("Local
# Network Access"); headless it just refuses. Other browsers, older Chromium and a user who
# clicks "allow" do not stop the request, so the supervisor must: the check is turned off here.
LNA_FEATURES = (
    "LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights"
)


def marker_cmd(marker: Path) -> list[str]:
    return [PY, "-c", f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"]


def attack_page(target: str, marker: Path) -> str:
    start = {
        "model_name": "pwned",
        "model_type": "process",
        "gpu_id": 0,
        "config": {"command": marker_cmd(marker)},
    }
    body = json.dumps(start)
    # A text/plain form whose one field's name and value join ("name=value") into JSON.
    form_name, form_value = body[:-1] + ', "pad": "', '"}'
    return f"""<!doctype html><meta charset="utf-8"><title>cute cats</title>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe><iframe name="sink3"></iframe>
<form id="f1" method="post" enctype="text/plain" target="sink1" action="{target}/api/v1/models/start">
  <input type="hidden" name='{form_name}' value='{form_value}'></form>
<form id="f2" method="post" target="sink2" action="{target}/api/v1/models/victim/disable"></form>
<form id="f3" method="post" target="sink3" action="{target}/api/v1/models/victim/restart"></form>
<script>
window.results = {{}};
const body = {json.dumps(body)};
fetch("{target}/api/v1/models/start", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}})
  .then(r => results.no_cors = r.type, e => results.no_cors = "error: " + e);
fetch("{target}/api/v1/models/start", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}})
  .then(r => results.cors = r.status, e => results.cors = "blocked: " + e);
fetch("{target}/api/v1/models", {{mode: "cors"}})
  .then(r => r.text()).then(t => results.read = t, e => results.read = "blocked: " + e);
for (const id of ["f1", "f2", "f3"]) document.getElementById(id).submit();
</script>"""


def rebinding_page(marker: Path) -> str:
    start = {
        "model_name": "rebound",
        "model_type": "process",
        "gpu_id": 0,
        "config": {"command": marker_cmd(marker)},
    }
    return f"""<!doctype html><meta charset="utf-8"><title>rebinding</title><script>
window.results = {{}};
(async () => {{
  try {{
    const read = await fetch("/api/v1/models");
    results.read = {{status: read.status, text: await read.text()}};
    const write = await fetch("/api/v1/models/start", {{method: "POST", headers: {{"Content-Type": "application/json"}},
                                                        body: {json.dumps(json.dumps(start))}}});
    results.write = {{status: write.status, text: await write.text()}};
    const stop = await fetch("/api/v1/models/victim/disable", {{method: "POST"}});
    results.stop = {{status: stop.status}};
  }} catch (e) {{ results.error = String(e); }}
  results.done = true;
}})();
</script>"""


class _Pages(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def attacker() -> Iterator[tuple[ThreadingHTTPServer, str]]:
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), type("Pages", (_Pages,), {}))
    thread = threading.Thread(target=httpd.serve_forever, name="attacker", daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def chromium(request: pytest.FixtureRequest) -> Iterator[object]:
    with playwright_started() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                *CHROMIUM_ARGS,
                f"--host-resolver-rules=MAP {EVIL_HOST} 127.0.0.1",
                f"--disable-features={LNA_FEATURES}",
            ],
        )
        try:
            context = browser.new_context()
            context.set_default_timeout(20_000)
            yield context
        finally:
            browser.close()


def refused_counts(server: Server) -> dict[tuple[str, str], int]:
    """(method, status) -> count of requests refused before routing (the guard's 403/415/421)."""
    status, _, body = server.request("/metrics")
    assert status == 200
    counts: dict[tuple[str, str], int] = {}
    for m in re.finditer(
        r'api_requests_total\{route="/unmatched",method="(\w+)",status="(\d+)"\} (\d+)', body.decode()
    ):
        counts[(m[1], m[2])] = int(m[3])
    return counts


def test_cross_origin_page_runs_nothing(server: Server, attacker, chromium, tmp_path: Path) -> None:
    httpd, attacker_url = attacker
    marker = tmp_path / "pwned-marker"
    server.declare(demo_declaration("victim"))
    server.start()
    victim = server.wait_state("victim@cpu", "RUNNING")
    httpd.RequestHandlerClass.page = attack_page(server.url, marker).encode()

    page = chromium.new_page()
    page.goto(attacker_url + "/")
    wait_for(
        lambda: len(page.evaluate("Object.keys(window.results)")) == 3, what="the page's fetches to settle"
    )
    results = page.evaluate("window.results")
    assert results["no_cors"] == "opaque"  # sent (the browser asks no one for a text/plain POST)
    assert str(results["cors"]).startswith("blocked"), results  # the preflight is refused
    assert str(results["read"]).startswith("blocked"), results  # no CORS headers: the page reads nothing
    time.sleep(2.0)  # the issue saw the command run ~2 s after its 202
    assert not marker.exists(), "a cross-origin page ran a command"
    assert not (server.conf / "pwned.toml").exists()
    after = server.instance("victim@cpu")
    assert (
        after["state"] == "RUNNING"
        and after["pid"] == victim["pid"]
        and after["restarts"] == victim["restarts"]
    )
    assert tomllib.loads((server.conf / "victim.toml").read_text()).get("enabled", True) is True
    # Every attempt arrived and was refused before routing: the text/plain fetch, the text/plain
    # form and the two empty forms (all 403 for their Origin); the preflight got its 405.
    assert refused_counts(server).get(("POST", "403"), 0) == 4, refused_counts(server)


def test_dns_rebinding_page_is_refused(server: Server, chromium, tmp_path: Path) -> None:
    marker = tmp_path / "rebound-marker"
    server.declare(demo_declaration("victim", env={"SECRET": "hunter2"}))
    server.start()
    server.wait_state("victim@cpu", "RUNNING")
    origin = f"http://{EVIL_HOST}:{server.port}"
    page = chromium.new_page()
    # Before the rebinding the attacker's own server answers for evil.example; then the name
    # points at 127.0.0.1, and the page's "same-origin" requests go to the supervisor.
    page.route(
        f"{origin}/",
        lambda route: route.fulfill(status=200, content_type="text/html", body=rebinding_page(marker)),
    )
    page.goto(f"{origin}/")
    wait_for(lambda: page.evaluate("window.results.done === true"), what="the rebinding page to finish")
    results = page.evaluate("window.results")
    assert "error" not in results, results
    # The requests reached the supervisor (the page can read these answers: same origin) and were refused.
    assert results["read"]["status"] == 421 and "hunter2" not in results["read"]["text"], results
    assert results["write"]["status"] == 421 and results["stop"]["status"] == 421, results
    time.sleep(2.0)
    assert not marker.exists() and not (server.conf / "rebound.toml").exists()
    assert server.instance("victim@cpu")["state"] == "RUNNING"


def test_dashboard_still_starts_and_stops_models(server: Server, chromium) -> None:
    server.declare(demo_declaration("demo"))
    server.start()
    server.wait_state("demo@cpu", "RUNNING")
    page = chromium.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/")
    expect = require_browser().expect
    row = page.locator('tr[data-instance="demo@cpu"]')
    state = row.locator("[data-field=state] .state")
    expect(state).to_have_text("RUNNING")
    row.locator("[data-action=stop]").click()  # POST .../disable from the page's own origin
    expect(state).to_have_text("STOPPED")
    assert tomllib.loads((server.conf / "demo.toml").read_text())["enabled"] is False
    expect(row.locator("[data-action=start]")).to_be_enabled()
    row.locator("[data-action=start]").click()
    expect(state).to_have_text("RUNNING")
    assert tomllib.loads((server.conf / "demo.toml").read_text()).get("enabled", True) is True
    assert refused_counts(server) == {}, "the dashboard's own requests were refused"
    assert errors == []
