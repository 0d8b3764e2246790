#!/usr/bin/env python3
"""Check model-supervisor against a real NVIDIA GPU, in one go (under 5 minutes).

    python scripts/gpu_check.py [--gpu 0] [--mib 1024]

Starts `model-supervisor serve` with one declaration that allocates a known amount of GPU
memory (PyTorch if importable, else a tiny CUDA C program built with nvcc), then checks:

  1. nvml-matches-nvidia-smi   GET /api/v1/gpus agrees with nvidia-smi (count, names, total
                               and used memory, the compute processes)
  2. attribution               the allocating process is listed under its instance, with
                               about the allocated memory
  3. gated-restart             after a SIGKILL, the instance is started again only once the
                               killed process and its memory are gone from the GPU
  4. stray                     an allocation by a process nobody supervises is reported as
                               a stray
Prints PASS/FAIL per check (SKIP with the reason when something needed is missing) and exits
0 only if every check passed. Everything it starts is stopped by pid before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEADLINE = time.monotonic() + 280  # leave time for cleanup inside the 5 minutes

TORCH_ALLOC = """
import sys, time, torch
mib = int(sys.argv[1])
x = torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print(f"allocated {mib} MiB on {torch.cuda.get_device_name(0)}", flush=True)
while True:
    time.sleep(3600)
"""

CUDA_ALLOC = r"""
#include <cstdio>
#include <cstdlib>
#include <unistd.h>
#include <cuda_runtime.h>
int main(int argc, char** argv) {
    size_t mib = argc > 1 ? atol(argv[1]) : 1024;
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, mib << 20);
    if (err != cudaSuccess) { fprintf(stderr, "cudaMalloc: %s\n", cudaGetErrorString(err)); return 1; }
    cudaMemset(p, 1, mib << 20);
    cudaDeviceSynchronize();
    printf("allocated %zu MiB\n", mib); fflush(stdout);
    for (;;) sleep(3600);
}
"""

results: list[tuple[str, str, str]] = []


def report(name: str, ok: bool | None, detail: str) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    results.append((name, status, detail))
    print(f"{status} {name}: {detail}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smi(query: str, what: str = "gpu") -> list[list[str]]:
    flag = "--query-gpu" if what == "gpu" else "--query-compute-apps"
    out = subprocess.run(
        ["nvidia-smi", f"{flag}={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def api(base: str, path: str) -> object:
    return json.loads(urllib.request.urlopen(base + path, timeout=10).read())


def wait_for(predicate, timeout: float, interval: float = 0.2):
    end = min(time.monotonic() + timeout, DEADLINE)
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def allocator(work: Path) -> list[str] | None:
    """The command that allocates `mib` MiB and waits; None if neither PyTorch nor nvcc works."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
            capture_output=True,
            timeout=120,
        )
        if probe.returncode == 0:
            (work / "alloc.py").write_text(TORCH_ALLOC)
            return [sys.executable, str(work / "alloc.py")]
    except subprocess.TimeoutExpired:
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        (work / "alloc.cu").write_text(CUDA_ALLOC)
        built = subprocess.run(
            [nvcc, "-O2", "-o", str(work / "alloc"), str(work / "alloc.cu")],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if built.returncode == 0:
            return [str(work / "alloc")]
        print(built.stderr, file=sys.stderr)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    if not shutil.which("nvidia-smi"):
        report("all", None, "nvidia-smi not found: not an NVIDIA GPU machine")
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    alloc = allocator(work)
    if alloc is None:
        report("all", None, "neither PyTorch with CUDA nor a working nvcc to build a CUDA allocator")
        return 2
    conf = work / "conf.d"
    conf.mkdir()
    (conf / "gpucheck.toml").write_text(
        textwrap.dedent(f"""\
        name = "gpucheck"
        backend = "process"
        gpus = [{args.gpu}]
        command = {json.dumps(alloc + [str(args.mib)])}
        [restart]
        initial_delay = 0.0
        jitter = 0.0
        [stop]
        timeout = 5.0
        """)
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    env.update(MODEL_SUPERVISOR_GPU_SAMPLE_INTERVAL="0.5", MODEL_SUPERVISOR_GPU_RELEASE_TIMEOUT="60")
    log_path = work / "serve.log"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor",
            "serve",
            "--conf-dir",
            str(conf),
            "--state-dir",
            str(work / "state"),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    stray = None
    try:

        def running():
            try:
                items = api(base, "/api/v1/models/status")
                return items[0] if items and items[0]["state"] == "RUNNING" else None
            except OSError:
                return None

        item = wait_for(running, 120)
        if item is None:
            report("all", False, f"the instance never became RUNNING; see {log_path}")
            return 1
        pid = item["pid"]

        def attributed():
            try:
                for g in api(base, "/api/v1/gpus"):
                    for p in g["processes"]:
                        if p["pid"] == pid and (p["gpu_memory_usage"] or 0) >= args.mib * 0.9:
                            return g, p
            except OSError:
                return None
            return None

        found = wait_for(attributed, 60)

        # 1. the API against nvidia-smi
        gpus = api(base, "/api/v1/gpus")
        rows = smi("index,name,memory.total,memory.used")
        apps = smi("pid,used_memory", "apps")
        problems = []
        if len(gpus) != len(rows):
            problems.append(f"{len(gpus)} GPUs in the API, {len(rows)} in nvidia-smi")
        for g, row in zip(gpus, rows, strict=False):
            if g["name"] != row[1]:
                problems.append(f"GPU {row[0]} name {g['name']!r} != {row[1]!r}")
            if abs((g["memory_total"] or 0) - int(row[2])) > 1:
                problems.append(f"GPU {row[0]} total {g['memory_total']} != {row[2]} MiB")
            if abs((g["memory_used"] or 0) - int(row[3])) > max(256, int(row[3]) * 0.05):
                problems.append(f"GPU {row[0]} used {g['memory_used']} vs {row[3]} MiB")
        api_pids = {p["pid"] for g in gpus for p in g["processes"]}
        smi_pids = {int(a[0]) for a in apps}
        if not smi_pids <= api_pids:
            problems.append(f"compute processes missing from the API: {sorted(smi_pids - api_pids)}")
        report("nvml-matches-nvidia-smi", not problems, "; ".join(problems) or f"{len(rows)} GPU(s) agree")

        # 2. attribution
        if found is None:
            report("attribution", False, f"pid {pid} never appeared with >= {args.mib * 0.9:.0f} MiB")
        else:
            g, p = found
            ok = (
                p["instance_id"] == "gpucheck@gpu" + str(args.gpu)
                and p["gpu_memory_usage"] <= args.mib + 1536
            )
            report(
                "attribution",
                ok,
                f"pid {pid} on GPU {g['id']}: {p['gpu_memory_usage']} MiB, instance {p['instance_id']}",
            )

        # 3. GPU-gated restart after SIGKILL
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        gone_at = wait_for(
            lambda: time.time() if pid not in {int(a[0]) for a in smi("pid", "apps")} else None, 60, 0.05
        )
        again = wait_for(lambda: (r := running()) and r["pid"] != pid and r, 120)
        starts = [
            line
            for line in (work / "state" / "logs" / f"gpucheck@gpu{args.gpu}.log").read_text().splitlines()
            if "] starting gpucheck" in line
        ]
        if gone_at is None or again is None or len(starts) < 2:
            report(
                "gated-restart",
                False,
                f"gone={gone_at is not None} restarted={again is not None} starts={len(starts)}",
            )
        else:
            stamp = starts[-1].split()[1].rstrip("]")
            started = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
            ok = started >= gone_at - 0.25
            report(
                "gated-restart",
                ok,
                f"old process gone from the GPU {gone_at - killed_at:.2f} s after the kill; "
                f"new one started {started - killed_at:.2f} s after it",
            )

        # 4. a stray
        stray = subprocess.Popen(
            alloc + ["256"],
            env={**os.environ, "CUDA_VISIBLE_DEVICES": str(args.gpu)},
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        listed = wait_for(lambda: [s for s in api(base, "/api/v1/gpus/strays") if s["pid"] == stray.pid], 60)
        report("stray", bool(listed), f"pid {stray.pid} listed as a stray: {listed}")
    finally:
        if stray is not None and stray.poll() is None:
            stray.kill()
            stray.wait()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    failed = [r for r in results if r[1] == "FAIL"]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed; work dir {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
