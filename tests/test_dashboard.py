"""The web dashboard, in a real headless Chromium against a real `serve` subprocess.

Nothing in the page is faked: the supervisor runs the demo backend, conf.d/ is edited on disk,
crashes are real SIGKILLs, and GPUs come from the simulated source. The page must keep up
through the event stream and polling alone (each test checks that it never navigates).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .browser_helpers import Browser, Server, browser, demo_declaration, expect
from .conftest import alive, free_port
from .conftest import wait_for as wait_for_server

pytestmark = pytest.mark.slow  # a real `serve` process and Chromium

WELCOME = {"status": "ok", "message": "Welcome to the Model Inference Client API"}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def ui(request: pytest.FixtureRequest, server: Server) -> Iterator[Browser]:
    # Depends on `server`, so the browser closes before the server stops.
    with browser(request, server) as b:
        yield b


def state_of(ui: Browser, instance_id: str):
    return ui.row(instance_id).locator("[data-field=state] .state")


def wait_for(ui: Browser, predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate`; waiting through the page lets Playwright deliver the page's events meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        ui.page.wait_for_timeout(50)


def test_page_loads_clean_and_follows_conf_d_live(server: Server, ui: Browser) -> None:
    server.start()
    page = ui.page
    page.goto(server.url + "/")
    expect(page.locator("#instances-empty")).to_be_visible()
    expect(page.locator("#live")).to_have_attribute("data-live", "on")
    expect(page.locator("#gpus-empty")).to_contain_text("No GPUs:")  # the reason comes from /healthz

    server.declare(demo_declaration())  # hot reload; the page is not reloaded
    expect(state_of(ui, "demo@cpu")).to_have_text("RUNNING")
    states = ui.states("demo@cpu")
    assert "STARTING" in states and states.index("STARTING") < states.index("RUNNING"), states
    uptime = ui.row("demo@cpu").locator("[data-field=uptime]")
    first = uptime.inner_text()
    expect(uptime).not_to_have_text(first, timeout=3000)  # ticks without a fetch

    (server.conf / "broken.toml").write_text('name = "broken"\nbackend = "process"\nport = "8000"\n')
    errors = page.locator("#config-errors li")
    expect(errors.filter(has_text="key port")).to_contain_text(
        "broken.toml"
    )  # one item per error of the file
    (server.conf / "broken.toml").unlink()
    expect(errors).to_have_count(0)
    expect(page.locator("#config-empty")).to_be_visible()

    assert ui.navigations == 1
    assert ui.console_errors == []
    assert ui.failed_requests == []


def test_stop_and_start_from_the_page_edit_conf_d(server: Server, ui: Browser) -> None:
    path = server.declare(demo_declaration())
    written = path.read_text()
    server.start()
    pid = server.wait_state("demo@cpu", "RUNNING")["pid"]
    page = ui.page
    page.goto(server.url + "/")
    row, state = ui.row("demo@cpu"), state_of(ui, "demo@cpu")
    expect(state).to_have_text("RUNNING")

    row.locator("[data-action=stop]").click()
    expect(state).to_have_text("STOPPED")
    expect(row.locator("[data-field=state]")).to_contain_text("disabled")
    wait_for(ui, lambda: not alive(pid), what=f"pid {pid} to exit")
    assert tomllib.loads(path.read_text())["enabled"] is False

    expect(row.locator("[data-action=start]")).to_be_enabled()
    row.locator("[data-action=start]").click()
    expect(state).to_have_text("RUNNING")
    assert path.read_text() == written  # enabled again: the file as it was written (issue 13)
    new_pid = server.instance("demo@cpu")["pid"]
    assert new_pid != pid and alive(new_pid)
    assert ui.navigations == 1
    assert ui.console_errors == []


def test_a_crash_shows_as_a_restart_without_reload(server: Server, ui: Browser) -> None:
    server.declare(demo_declaration())
    server.start()
    pid = server.wait_state("demo@cpu", "RUNNING")["pid"]
    page = ui.page
    page.goto(server.url + "/")
    row, state = ui.row("demo@cpu"), state_of(ui, "demo@cpu")
    expect(state).to_have_text("RUNNING")
    expect(row.locator("[data-field=restarts]")).to_have_text("0")
    page.evaluate("window.__same_page = true")

    os.kill(pid, signal.SIGKILL)
    expect(row.locator("[data-field=restarts]")).to_have_text("1")
    expect(state).to_have_text("RUNNING")
    states = ui.states("demo@cpu")
    after_crash = states[states.index("RUNNING") + 1 :]
    assert after_crash[-1] == "RUNNING" and {"BACKOFF", "STARTING"} & set(after_crash[:-1]), states
    assert server.instance("demo@cpu")["pid"] != pid
    assert page.evaluate("window.__same_page") is True and ui.navigations == 1
    assert ui.console_errors == []


def test_the_page_reconnects_when_the_supervisor_restarts(server: Server, ui: Browser) -> None:
    server.declare(demo_declaration())
    server.start()
    server.wait_state("demo@cpu", "RUNNING")
    page = ui.page
    page.goto(server.url + "/")
    live, state = page.locator("#live"), state_of(ui, "demo@cpu")
    expect(state).to_have_text("RUNNING")
    expect(live).to_have_attribute("data-live", "on")

    server.stop()
    expect(live).to_have_attribute("data-live", "off")
    server.start()  # same port, conf.d and state: event ids start from 1 again
    expect(live).to_have_attribute("data-live", "on", timeout=30_000)
    pid = server.wait_state("demo@cpu", "RUNNING")["pid"]
    expect(state).to_have_text("RUNNING")
    seen = len(ui.states("demo@cpu"))
    os.kill(pid, signal.SIGKILL)  # its transitions must arrive as events, not be skipped as already seen
    expect(ui.row("demo@cpu").locator("[data-field=restarts]")).to_have_text("1")
    expect(state).to_have_text("RUNNING")
    assert "BACKOFF" in ui.states("demo@cpu")[seen:], ui.states("demo@cpu")
    assert ui.navigations == 1
    # only the polls and reconnects that found the server down
    assert all("ERR_CONNECTION_REFUSED" in e for e in ui.console_errors), ui.console_errors


def test_the_log_panel_follows_new_lines(server: Server, ui: Browser) -> None:
    port = free_port()
    server.declare(demo_declaration(port=port))
    server.start()
    server.wait_state("demo@cpu", "RUNNING")
    page = ui.page
    page.goto(server.url + "/")
    expect(state_of(ui, "demo@cpu")).to_have_text("RUNNING")

    ui.row("demo@cpu").locator("[data-action=logs]").click()
    expect(page.locator("#logs")).to_be_visible()
    expect(page.locator("#logs-state")).to_have_text("following")
    expect(page.locator("#logs-body > div").first).to_be_visible()  # the tail came first
    predictions = page.locator("#logs-body > div", has_text="POST /v1/predict")
    expect(predictions).to_have_count(0)
    for n in (1, 2):
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=json.dumps({"inputs": [n]}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["outputs"] == [2 * n]
        expect(predictions).to_have_count(n)

    page.click("#logs-close")
    expect(page.locator("#logs")).to_be_hidden()
    # closing the panel ends the follow request (the browser aborts it)
    wait_for(
        ui,
        lambda: any("/logs?" in r and "ERR_ABORTED" in r for r in ui.failed_requests),
        5,
        "the log stream to end",
    )
    assert [r for r in ui.failed_requests if "/logs?" not in r] == []
    assert ui.console_errors == []


def test_with_a_token_the_page_asks_once_then_works(server: Server, ui: Browser) -> None:
    token = "s3cret-<b>token</b>"
    server.declare(demo_declaration())
    server.start(token=token)
    page = ui.page
    page.goto(server.url + "/")
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")
    expect(dialog).to_be_hidden()
    expect(state_of(ui, "demo@cpu")).to_have_text("RUNNING")
    expect(page.locator("#live")).to_have_attribute("data-live", "on")
    page.wait_for_timeout(2500)  # a GPU poll and more: still no second prompt
    assert page.evaluate("window.__dialogs['token-dialog']") == 1
    # every console error is a refused call from before the token was given
    assert all("401" in e for e in ui.console_errors), ui.console_errors

    page.reload()  # the token is kept for the session
    expect(state_of(ui, "demo@cpu")).to_have_text("RUNNING")
    assert page.evaluate("window.__dialogs['token-dialog'] || 0") == 0

    status, headers, body = server.request("/", headers={"Accept": "application/json"}, auth=False)
    assert status == 200 and headers["content-type"] == "application/json" and json.loads(body) == WELCOME


def test_root_is_json_for_api_clients_and_the_page_for_browsers(server: Server) -> None:
    """No browser needed: content negotiation, token exemptions and cache headers over HTTP."""
    server.start(token="tok")
    for accept in (None, "*/*", "application/json", "application/json, text/html", "text/html;q=0.5, */*"):
        status, headers, body = server.request("/", headers={"Accept": accept} if accept else {}, auth=False)
        assert (status, headers["content-type"], json.loads(body)) == (200, "application/json", WELCOME), (
            accept
        )

    status, headers, page = server.request("/", headers={"Accept": BROWSER_ACCEPT}, auth=False)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["Cache-Control"] == "no-cache" and "Accept" in headers["Vary"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assets = re.findall(r'(?:href|src)="(/ui/[^"]+)"', page.decode())
    assert sorted(a.split("?")[0] for a in assets) == ["/ui/app.css", "/ui/app.js"]
    total = len(page)
    for url in assets:  # no token needed; the current version is cached for good
        status, headers, body = server.request(url, auth=False)
        assert status == 200 and headers["Cache-Control"] == "public, max-age=31536000, immutable", url
        total += len(body)
        status, _, _ = server.request(url, headers={"If-None-Match": headers["ETag"]}, auth=False)
        assert status == 304
    assert total < 200_000
    status, headers, _ = server.request("/ui/app.js?v=old", auth=False)
    assert status == 200 and headers["Cache-Control"] == "no-cache"
    assert server.request("/ui/index.html", auth=False)[0] == 404
    assert server.request("/ui/nothing.js", auth=False)[0] == 404
    assert server.request("/api/v1/models/status", auth=False)[0] == 401
    assert server.request("/api/v1/models/status")[0] == 200


def write_gpus(path: Path, processes: list[tuple[int, int]], utilization: float = 7.0) -> None:
    procs = "".join(f"\n[[gpu.process]]\npid = {pid}\nused_memory_mib = {mib}\n" for pid, mib in processes)
    text = (
        '[[gpu]]\nindex = 0\nname = "Simulated A100"\nmemory_total_mib = 81920\npower_draw_w = 61.0\n'
        f"power_limit_w = 400.0\nutilization_percent = {utilization}\ntemperature_c = 41.0\n" + procs
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_stray_is_highlighted_and_killed_after_confirmation(
    server: Server, ui: Browser, tmp_path: Path
) -> None:
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        gpus = tmp_path / "gpus.toml"
        write_gpus(gpus, [(sleeper.pid, 512)])
        server.declare(demo_declaration("gpu-demo", gpus=[0]))
        server.start(
            MODEL_SUPERVISOR_GPU_SOURCE="simulated",
            MODEL_SUPERVISOR_GPU_SIMULATED_FILE=str(gpus),
            MODEL_SUPERVISOR_GPU_SAMPLE_INTERVAL="0.2",
        )
        owned_pid = server.wait_state("gpu-demo@gpu0", "RUNNING")["pid"]
        write_gpus(gpus, [(sleeper.pid, 512), (owned_pid, 1024)])
        page = ui.page
        page.goto(server.url + "/")

        card = page.locator('article[data-gpu="0"]')
        expect(card.locator(".badge.sim")).to_be_visible()
        expect(page.locator("#gpu-source")).to_have_text("simulated")
        expect(card).to_contain_text("61 W / 400 W")
        owned = card.locator(f'tr[data-pid="{owned_pid}"]')
        expect(owned.locator(".owner")).to_have_text("gpu-demo@gpu0")
        expect(owned.locator("[data-action=kill]")).to_be_hidden()
        expect(ui.row("gpu-demo@gpu0").locator("[data-field=gpu-memory]")).to_have_text("1024 MiB")
        stray = card.locator(f'tr[data-pid="{sleeper.pid}"]')
        expect(stray).to_have_class(re.compile(r"\bstray\b"))
        expect(stray.locator(".owner")).to_have_text("stray")

        # a new sample reaches the card as a `gpu` event, with no fetch of /api/v1/gpus
        fetches = sum("/api/v1/gpus" in u for u in ui.requests)
        write_gpus(gpus, [(sleeper.pid, 512), (owned_pid, 1024)], utilization=55.0)
        expect(card).to_contain_text("Util 55 %")
        assert sum("/api/v1/gpus" in u for u in ui.requests) == fetches

        stray.locator("[data-action=kill]").click()  # first: change our mind
        expect(page.locator("#confirm-dialog")).to_be_visible()
        page.click("#confirm-cancel")
        expect(page.locator("#confirm-dialog")).to_be_hidden()
        time.sleep(0.3)
        assert sleeper.poll() is None

        stray.locator("[data-action=kill]").click()
        expect(page.locator("#confirm-dialog")).to_contain_text(str(sleeper.pid))
        page.click("#confirm-ok")
        assert sleeper.wait(timeout=15) == -signal.SIGTERM
        expect(stray).to_have_count(0)
        assert alive(owned_pid)
        assert ui.console_errors == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait()


# -- issue 13: history plots, state strips, warnings -------------------------------------------------


def test_gpu_plots_and_state_strips_match_the_api_and_follow_live(
    server: Server, ui: Browser, tmp_path: Path
) -> None:
    gpus = tmp_path / "gpus.toml"
    write_gpus(gpus, [], utilization=20.0)
    server.declare(demo_declaration("plotted", gpus=[0]))
    server.start(
        MODEL_SUPERVISOR_GPU_SOURCE="simulated",
        MODEL_SUPERVISOR_GPU_SIMULATED_FILE=str(gpus),
        MODEL_SUPERVISOR_GPU_SAMPLE_INTERVAL="0.2",
    )
    pid = server.wait_state("plotted@gpu0", "RUNNING")["pid"]
    write_gpus(gpus, [(pid, 2048)], utilization=20.0)

    def sampled() -> bool:  # a few samples in the server's history (the last with the run) first
        memory = json.loads(server.request("/api/v1/gpus/history")[2])["gpus"][0]["memory_used"]
        return len(memory) >= 3 and memory[-1] == 2048

    wait_for_server(sampled, 30, "samples in the GPU history")
    page = ui.page
    page.goto(server.url + "/")

    def plot(metric: str):
        return page.locator(f'svg.plot[data-gpu="0"][data-metric="{metric}"]')

    api_gpu = json.loads(server.request("/api/v1/gpus")[2])[0]
    expect(plot("memory_used")).to_have_attribute("data-last", str(api_gpu["memory_used"]))
    expect(plot("memory_used")).to_have_attribute("data-max", str(api_gpu["memory_total"]))
    expect(plot("utilization")).to_have_attribute("data-last", "20")
    expect(plot("power_draw")).to_have_attribute("data-last", "61")
    history = json.loads(server.request("/api/v1/gpus/history")[2])["gpus"][0]
    assert history["memory_used"][-1] == api_gpu["memory_used"] == 2048
    assert int(plot("memory_used").get_attribute("data-points")) >= 3  # the history, not just the last sample

    # a new sample reaches the plot over the event stream, and the line grows
    points = int(plot("utilization").get_attribute("data-points"))
    write_gpus(gpus, [(pid, 2048)], utilization=55.0)
    expect(plot("utilization")).to_have_attribute("data-last", "55")
    assert int(plot("utilization").get_attribute("data-points")) > points
    assert json.loads(server.request("/api/v1/gpus/history")[2])["gpus"][0]["utilization"][-1] == 55.0

    strip = page.locator('svg.strip[data-instance="plotted@gpu0"]')
    expect(strip).to_have_attribute("data-current", "RUNNING")
    os.kill(pid, signal.SIGKILL)  # a crash: visible in the strip without a reload
    server.wait_state("plotted@gpu0", "RUNNING")
    wait_for(
        ui,
        lambda: (
            strip.get_attribute("data-current") == "RUNNING"
            and strip.locator('rect[data-state="BACKOFF"]').count()
            + strip.locator('rect[data-state="STARTING"]').count()
            >= 2
        ),
        what="the restart in the strip",
    )
    api_history = json.loads(server.request("/api/v1/instances/history")[2])["instances"]
    transitions = next(i for i in api_history if i["instance_id"] == "plotted@gpu0")["transitions"]
    wait_for(
        ui, lambda: int(strip.get_attribute("data-transitions")) == len(transitions), what="every transition"
    )
    assert ui.console_errors == []


def test_a_gpu_nobody_knows_is_a_warning_on_the_page(server: Server, ui: Browser) -> None:
    # `port` is a base: the instance on GPU 5 listens on base + 5, which must be the free one
    # (a free base with base + 5 held by a client socket failed CI once).
    server.declare(demo_declaration("ghostly", port=free_port() - 5, gpus=[5]))
    server.start()  # no GPU source
    server.wait_state("ghostly@gpu5", "RUNNING")  # it still runs
    page = ui.page
    page.goto(server.url + "/")
    expect(page.locator("#warnings")).to_contain_text("GPU 5 is not known: no GPU source")
    assert ui.console_errors == []
