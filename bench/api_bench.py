#!/usr/bin/env python3
"""GET /api/v1/models/status with 200 instances, under load, while instances keep crashing.

Starts `python -m supervisor serve` with 200 declarations: 180 idle `sleep` instances and 20
that exit after half a second and are restarted (backoff 0.2 s), so the state keeps moving.
A load generator in another process hammers the status endpoint: wrk (Debian package `wrk`)
when installed, else a multi-process Python client (weaker: it shares the two cores).
Prints JSON: requests/s, p50/p99 latency, restarts seen during the run.

Target (issue #4): p99 under 10 ms and at least 3,000 requests/s on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def declarations(conf: Path, idle: int, crashing: int) -> None:
    for i in range(idle):
        (conf / f"idle{i:03d}.toml").write_text(
            f'name = "idle{i:03d}"\nbackend = "process"\ncommand = ["sleep", "100000"]\n')
    for i in range(crashing):
        (conf / f"crash{i:03d}.toml").write_text(
            f'name = "crash{i:03d}"\nbackend = "process"\n'
            'command = ["sh", "-c", "sleep 0.5; exit 1"]\n'
            "[restart]\ninitial_delay = 0.2\nfactor = 1.0\njitter = 0.5\nmax_retries = 0\n")


def get(url: str) -> object:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def wrk(url: str, seconds: int, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {
        "tool": f"wrk -t1 -c{connections} -d{seconds}s",
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms("50"), "p90_ms": ms("90"), "p99_ms": ms("99"),
        "errors": "Non-2xx" in out or "Socket errors" in out,
    }


def _python_worker(args: tuple[str, float]) -> list[float]:
    import http.client

    url, until = args
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    conn = http.client.HTTPConnection(host, int(port))
    lat = []
    while time.perf_counter() < until:
        t = time.perf_counter()
        conn.request("GET", path)
        conn.getresponse().read()
        lat.append((time.perf_counter() - t) * 1000)
    return lat


def python_load(url: str, seconds: int, workers: int) -> dict:
    until = time.perf_counter() + seconds
    with ProcessPoolExecutor(workers) as pool:
        lat = [x for chunk in pool.map(_python_worker, [(url, until)] * workers) for x in chunk]
    lat.sort()
    return {"tool": f"python http.client x{workers} processes", "requests_per_second": len(lat) / seconds,
            "p50_ms": statistics.median(lat), "p90_ms": lat[int(0.9 * len(lat))], "p99_ms": lat[int(0.99 * len(lat))],
            "errors": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--python", action="store_true", help="use the Python load generator even if wrk exists")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="api-bench-"))
    conf = work / "conf.d"
    conf.mkdir()
    declarations(conf, 180, 20)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    serve = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "serve", "--conf-dir", str(conf), "--state-dir", str(work / "state"),
         "--port", str(port), "--log-level", "WARNING"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                items = get(base + "/api/v1/models/status")
                if len(items) == 200 and sum(i["state"] == "RUNNING" for i in items) >= 180:
                    break
            except OSError:
                pass
            if time.time() > deadline or serve.poll() is not None:
                raise SystemExit("serve did not come up with 200 instances")
            time.sleep(0.2)
        restarts_before = sum(i["restarts"] for i in get(base + "/api/v1/models/status"))
        url = base + "/api/v1/models/status"
        size = len(urllib.request.urlopen(url).read())
        if shutil.which("wrk") and not args.python:
            load = wrk(url, args.seconds, args.connections)
        else:
            load = python_load(url, args.seconds, args.connections)
        items = get(url)
        restarts = sum(i["restarts"] for i in items) - restarts_before
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "instances": len(items),
            "response_bytes": size,
            "restarts_during_run": restarts,
            **load,
            "target": "p99 < 10 ms and >= 3000 requests/s while instances keep restarting",
        }
        result["meets_target"] = result["p99_ms"] < 10 and result["requests_per_second"] >= 3000 and restarts > 0
        print(json.dumps(result, indent=2))
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
