"""CLI round trip: `model-supervisor status` against a running serve, import time included,
vs supervisorctl's `status` against supervisord 4.3 (issue 13: target under 120 ms).

Each command is a fresh interpreter, as a user's shell runs it. Prints JSON. The supervisord
peer is installed into bench/.peers/supervisord-venv on first run (see core_bench.py);
`--no-peer` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, serve, stop_group, summary

TARGET_MS = 120.0


def timed(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        out.append((time.perf_counter() - began) * 1000)
        if r.returncode not in (0, 3):  # 3: status says something is unhealthy; still a full round trip
            raise SystemExit(f"{argv} failed ({r.returncode}): {r.stderr}")
    return out


def import_ms(base: str) -> float:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "supervisor", "status", "--url", base],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    total = 0
    for line in r.stderr.splitlines():  # "import time: self | cumulative | name": top-level entries only
        parts = line.split("|")
        if len(parts) == 3 and not parts[2].startswith("  ") and parts[1].strip().isdigit():
            total += int(parts[1])
    return total / 1000


def ours(runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "conf.d"
        conf.mkdir()
        (conf / "d.toml").write_text('name = "d"\nbackend = "process"\ncommand = ["sleep", "3600"]\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        with serve(conf, Path(tmp) / "state") as base:
            argv = [sys.executable, "-m", "supervisor", "status", "--url", base]
            timed(argv, 2, env)  # warm the page cache
            wall = timed(argv, runs, env)
            probe = (
                "import sys; from supervisor.cli.main import main; main(['status', '--url', %r]); "
                "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                "('pydantic', 'pydantic_settings', 'sanic', 'asyncio')))" % base
            )
            heavy = subprocess.run(
                [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
            ).stdout.splitlines()[-1]
            return {
                "status_ms": summary(wall),
                "import_ms": round(import_ms(base), 1),
                "heavy_modules_imported": json.loads(heavy.replace("'", '"')),
            }


def supervisorctl(runs: int) -> dict:
    from core_bench import PEER_VENVS, SUPERVISORD, ensure_peer

    versions = ensure_peer(SUPERVISORD)
    venv = PEER_VENVS[SUPERVISORD]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        conf = work / "supervisord.conf"
        conf.write_text(
            "\n".join(
                [
                    "[unix_http_server]",
                    f"file = {work / 'supervisor.sock'}",
                    "",
                    "[supervisord]",
                    f"logfile = {work / 'supervisord.log'}",
                    f"pidfile = {work / 'supervisord.pid'}",
                    "",
                    "[rpcinterface:supervisor]",
                    "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
                    "",
                    "[supervisorctl]",
                    f"serverurl = unix://{work / 'supervisor.sock'}",
                    "",
                    "[program:d]",
                    "command = sleep 3600",
                    "",
                ]
            )
        )
        proc = subprocess.Popen(
            [str(venv / "bin" / "supervisord"), "-n", "-c", str(conf)],
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            argv = [str(venv / "bin" / "supervisorctl"), "-c", str(conf), "status"]
            deadline = time.time() + 30
            while subprocess.run(argv, capture_output=True).returncode != 0:
                if time.time() > deadline:
                    raise SystemExit("supervisord did not come up")
                time.sleep(0.2)
            timed(argv, 2)
            return {"version": versions.get("supervisor"), "status_ms": summary(timed(argv, runs))}
        finally:
            stop_group(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-peer", action="store_true", help="skip supervisorctl")
    args = ap.parse_args()
    result = {
        "bench": "cli_round_trip",
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "target_ms": TARGET_MS,
        "model_supervisor": ours(args.runs),
    }
    if not args.no_peer:
        try:
            result["supervisorctl"] = supervisorctl(args.runs)
        except Exception as exc:  # no network for pip, say so rather than fail the whole bench
            result["supervisorctl"] = {"error": str(exc)[:500]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
