"""What the benchmarks share: a `serve` process, HTTP calls, load generation, summaries."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, method: str, path: str, body: object = None, timeout: float = 60) -> object:
    req = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json"},
    )
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


@contextlib.contextmanager
def serve(
    conf: Path, state: Path, env: dict[str, str] | None = None, log_level: str = "WARNING"
) -> Iterator[str]:
    """`python -m supervisor serve` on a free port; yields its base URL once /healthz answers,
    and stops it (SIGTERM, then SIGKILL of its group) when the block ends."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    environment.update(env or {})
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
            "--log-level",
            log_level,
        ],
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                call(base, "GET", "/healthz", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("serve did not come up") from None
                time.sleep(0.05)
        yield base
    finally:
        stop_group(proc, timeout=60)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to a process started with start_new_session; SIGKILL to its group if it has not
    exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_instances(base: str, count: int, timeout: float = 60) -> list[dict]:
    """The status items once `count` instances all have a pid."""
    deadline = time.time() + timeout
    while True:
        items = call(base, "GET", "/api/v1/models/status")
        if len(items) == count and all(i["pid"] for i in items):
            return items
        if time.time() > deadline:
            raise SystemExit(f"only {len(items)} of {count} instances started")
        time.sleep(0.2)


def wrk(url: str, seconds: int, connections: int = 4) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {
        "tool": f"wrk -t1 -c{connections}",
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms("50"),
        "p90_ms": ms("90"),
        "p99_ms": ms("99"),
        "errors": "Non-2xx" in out or "Socket errors" in out,
    }


def python_load(url: str, seconds: int) -> dict:
    """One connection, back to back (the fallback when wrk is not installed)."""
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        urllib.request.urlopen(url, timeout=10).read()
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    return {
        "tool": "python urllib, 1 connection",
        "requests_per_second": len(lat) / seconds,
        "p50_ms": statistics.median(lat),
        "p90_ms": lat[int(0.9 * len(lat))],
        "p99_ms": lat[int(0.99 * len(lat))],
        "errors": False,
    }


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 1),
    }
