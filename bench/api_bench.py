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
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import call, serve, wrk


def declarations(conf: Path, idle: int, crashing: int) -> None:
    for i in range(idle):
        (conf / f"idle{i:03d}.toml").write_text(
            f'name = "idle{i:03d}"\nbackend = "process"\ncommand = ["sleep", "100000"]\n'
        )
    for i in range(crashing):
        (conf / f"crash{i:03d}.toml").write_text(
            f'name = "crash{i:03d}"\nbackend = "process"\n'
            'command = ["sh", "-c", "sleep 0.5; exit 1"]\n'
            "[restart]\ninitial_delay = 0.2\nfactor = 1.0\njitter = 0.5\nmax_retries = 0\n"
        )


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


def python_processes(url: str, seconds: int, workers: int) -> dict:
    until = time.perf_counter() + seconds
    with ProcessPoolExecutor(workers) as pool:
        lat = [x for chunk in pool.map(_python_worker, [(url, until)] * workers) for x in chunk]
    lat.sort()
    return {
        "tool": f"python http.client x{workers} processes",
        "requests_per_second": len(lat) / seconds,
        "p50_ms": statistics.median(lat),
        "p90_ms": lat[int(0.9 * len(lat))],
        "p99_ms": lat[int(0.99 * len(lat))],
        "errors": False,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--python", action="store_true", help="use the Python load generator even if wrk exists"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="api-bench-"))
    conf = work / "conf.d"
    conf.mkdir()
    declarations(conf, 180, 20)
    try:
        with serve(conf, work / "state") as base:
            url = base + "/api/v1/models/status"
            deadline = time.time() + 60
            while sum(i["state"] == "RUNNING" for i in call(base, "GET", "/api/v1/models/status")) < 180:
                if time.time() > deadline:
                    raise SystemExit("the 180 idle instances never all ran")
                time.sleep(0.2)
            restarts_before = sum(i["restarts"] for i in call(base, "GET", "/api/v1/models/status"))
            size = len(urllib.request.urlopen(url).read())
            if shutil.which("wrk") and not args.python:
                load = wrk(url, args.seconds, args.connections)
            else:
                load = python_processes(url, args.seconds, args.connections)
            items = call(base, "GET", "/api/v1/models/status")
            restarts = sum(i["restarts"] for i in items) - restarts_before
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
