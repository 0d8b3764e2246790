#!/usr/bin/env python3
"""The dashboard's first load: bytes on the wire and time until it is interactive.

Runs `python -m supervisor serve` on the shipped conf.d/demo.toml (copied to a temp dir, with
a free port and the repository as `cwd`), waits for demo@cpu to be RUNNING, then loads `/` in
headless Chromium (Debian's /usr/bin/chromium through Playwright), each run in a fresh browser
context (empty cache):

  first_load_bytes  every byte Chromium received for the requests the page made in its first
                    1.5 s (before its first 2 s poll): the page, CSS, JS, the API calls and what
                    arrived so far on the event stream; headers included (CDP's
                    encodedDataLength). Target: under 200 KB.
  interactive_ms    navigation start to the `dashboard-ready` mark, set once the instance table
                    is rendered with data from the API. Target: under 1 s.

Prints JSON. Usage: python bench/dashboard_bench.py [--runs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_port, stop_group

CHROMIUM = os.environ.get("MODEL_SUPERVISOR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FIRST_LOAD_WINDOW_MS = 1500
TARGET_BYTES = 200_000
TARGET_INTERACTIVE_MS = 1000.0


def shipped_demo(conf: Path) -> None:
    doc = tomllib.loads((REPO / "conf.d" / "demo.toml").read_text())
    doc.update(port=free_port(), cwd=str(REPO))  # 8100 may be taken; ".." is relative to the original file
    (conf / "demo.toml").write_text(tomli_w.dumps(doc))


def start_serve(conf: Path, state: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor",
            "serve",
            "--conf-dir",
            str(conf),
            "--state-dir",
            str(state),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            items = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/models/status", timeout=1).read()
            )
            if any(i["state"] == "RUNNING" for i in items):
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_group(proc)
            raise RuntimeError("serve did not bring demo@cpu to RUNNING")
        time.sleep(0.05)


class Wire:
    """Bytes received per request, from the DevTools protocol (a stream counts what arrived)."""

    def __init__(self, cdp: Any) -> None:
        self.requests: dict[str, dict[str, Any]] = {}
        cdp.on("Network.requestWillBeSent", self._sent)
        cdp.on("Network.responseReceived", self._response)
        cdp.on("Network.dataReceived", self._data)
        cdp.on("Network.loadingFinished", self._finished)
        cdp.send("Network.enable")

    def _sent(self, e: dict[str, Any]) -> None:
        self.requests[e["requestId"]] = {
            "url": e["request"]["url"],
            "type": e.get("type", ""),
            "at": e["timestamp"],
            "headers": 0,
            "data": 0,
            "total": None,
        }

    def _response(self, e: dict[str, Any]) -> None:
        if e["requestId"] in self.requests:
            self.requests[e["requestId"]]["headers"] = e["response"].get("encodedDataLength", 0)

    def _data(self, e: dict[str, Any]) -> None:
        if e["requestId"] in self.requests:
            self.requests[e["requestId"]]["data"] += e.get("encodedDataLength", 0)

    def _finished(self, e: dict[str, Any]) -> None:
        if e["requestId"] in self.requests:
            self.requests[e["requestId"]]["total"] = e["encodedDataLength"]

    def first_load(self) -> list[dict[str, Any]]:
        if not self.requests:
            return []
        start = min(r["at"] for r in self.requests.values())
        out = []
        for r in self.requests.values():
            if (r["at"] - start) * 1000 > FIRST_LOAD_WINDOW_MS:
                continue
            size = r["total"] if r["total"] is not None else r["headers"] + r["data"]
            out.append({"url": r["url"], "bytes": size, "finished": r["total"] is not None})
        return out


def kind(url: str) -> str:
    path = url.split("://", 1)[-1].split("/", 1)[-1].split("?")[0]
    if path == "":
        return "html"
    if path.endswith(".css"):
        return "css"
    if path.endswith(".js"):
        return "js"
    if path == "api/v1/events":
        return "events_stream"
    return "api"


def one_run(browser: Any, url: str) -> dict[str, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        wire = Wire(context.new_cdp_session(page))
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        # a selector, not wait_for_function: the page's CSP (rightly) forbids the eval that needs
        page.wait_for_selector("html[data-ready=true] tr[data-instance]", timeout=30_000)
        page.wait_for_timeout(FIRST_LOAD_WINDOW_MS)
        timing = page.evaluate("""() => {
            const nav = performance.getEntriesByType("navigation")[0];
            const ready = performance.getEntriesByName("dashboard-ready")[0];
            return {interactive: ready.startTime, dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd};
        }""")
        requests = wire.first_load()
        by_kind: dict[str, int] = {}
        for r in requests:
            by_kind[kind(r["url"])] = by_kind.get(kind(r["url"]), 0) + r["bytes"]
        return {
            "interactive_ms": timing["interactive"],
            "dom_content_loaded_ms": timing["dcl"],
            "load_ms": timing["load"],
            "bytes": sum(r["bytes"] for r in requests),
            "by_kind": by_kind,
            "requests": [r["url"].split(url.rstrip("/"), 1)[-1] or "/" for r in requests],
            "console_errors": errors,
        }
    finally:
        context.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        conf, state = Path(tmp) / "conf.d", Path(tmp) / "state"
        conf.mkdir()
        shipped_demo(conf)
        port = free_port()
        serve = start_serve(conf, state, port)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    one_run(
                        browser, f"http://127.0.0.1:{port}/"
                    )  # warm-up: the server's first requests, disk cache
                    runs = [one_run(browser, f"http://127.0.0.1:{port}/") for _ in range(args.runs)]
                    version = browser.version
                finally:
                    browser.close()
        finally:
            stop_group(serve)

    interactive = sorted(r["interactive_ms"] for r in runs)
    sizes = sorted(r["bytes"] for r in runs)
    result = {
        "bench": "dashboard_first_load",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "browser": f"chromium {version} (headless)",
        },
        "runs": args.runs,
        "first_load_bytes": {
            "median": statistics.median(sizes),
            "max": sizes[-1],
            "target_max": TARGET_BYTES,
        },
        "first_load_by_kind": runs[len(runs) // 2]["by_kind"],
        "first_load_requests": runs[len(runs) // 2]["requests"],
        "interactive_ms": {
            "median": round(statistics.median(interactive), 1),
            "max": round(interactive[-1], 1),
            "min": round(interactive[0], 1),
            "target_max": TARGET_INTERACTIVE_MS,
        },
        "dom_content_loaded_ms": round(statistics.median(r["dom_content_loaded_ms"] for r in runs), 1),
        "load_ms": round(statistics.median(r["load_ms"] for r in runs), 1),
        "console_errors": sorted({e for r in runs for e in r["console_errors"]}),
    }
    result["ok"] = (
        sizes[-1] < TARGET_BYTES and interactive[-1] < TARGET_INTERACTIVE_MS and not result["console_errors"]
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
