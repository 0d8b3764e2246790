#!/usr/bin/env python3
"""GET /metrics with 200 instances and 8 simulated GPUs (their pids as GPU processes).

Prints JSON: requests/s, p50/p99 latency of back-to-back scrapes on one connection (wrk, or a
Python client), response size.
Target (issue #7): p99 under 10 ms.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import python_load, serve, wait_instances, wrk
from gpu_bench import GPUS, sleepers_on_simulated_gpus, write_gpus

INSTANCES = 200


def main() -> int:
    work, conf, sim = sleepers_on_simulated_gpus("metrics-bench-", "m", INSTANCES)
    env = {"MODEL_SUPERVISOR_GPU_SOURCE": "simulated", "MODEL_SUPERVISOR_GPU_SIMULATED_FILE": str(sim)}
    try:
        with serve(conf, work / "state", env) as base:
            items = wait_instances(base, INSTANCES)
            by_gpu: dict[int, list[tuple[int, int]]] = {}
            for item in items[:100]:
                by_gpu.setdefault(item["gpu_id"], []).append((item["pid"], 2048))
            write_gpus(sim, by_gpu)
            time.sleep(2.5)
            url = base + "/metrics"
            body = urllib.request.urlopen(url).read()
            # One connection, as a Prometheus server scrapes a target: one scrape at a time.
            load = wrk(url, 10, connections=1) if shutil.which("wrk") else python_load(url, 10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "instances": INSTANCES,
                "gpus": GPUS,
                "gpu_processes": 100,
                "response_bytes": len(body),
                "samples": sum(1 for line in body.splitlines() if not line.startswith(b"#")),
                **load,
                "target": "p99 < 10 ms",
                "meets_target": load["p99_ms"] < 10,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
