#!/usr/bin/env python3
"""A tiny stand-in for an inference server (stdlib only), with knobs for misbehaving.

It serves:
  GET  /health       503 until --ready-after seconds have passed, then 200 (500 again after
                     --unhealthy-after seconds, if given)
  POST /v1/predict   {"inputs": [...]} -> {"outputs": [...], "model": NAME}  (doubles numbers)
  GET  /             what it is, its pid and its GPUs (CUDA_VISIBLE_DEVICES)

Knobs used by the tests and the benchmarks:
  --exit-after S --exit-code N   exit on its own after S seconds with code N
  --ignore-sigterm               ignore SIGTERM (the supervisor must SIGKILL it)
  --spawn-grandchild             start a child process that sleeps forever
  --grandchild-setsid            ... in its own session, outside our process group
  --grandchild-pidfile PATH      write the grandchild's pid there
  --spam N                       print N log lines at start
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="demo")
    p.add_argument("--health-path", default="/health")
    p.add_argument("--ready-after", type=float, default=0.0)
    p.add_argument("--unhealthy-after", type=float, default=None)
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--exit-code", type=int, default=1)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--spawn-grandchild", action="store_true")
    p.add_argument("--grandchild-setsid", action="store_true")
    p.add_argument("--grandchild-pidfile", default=None)
    p.add_argument("--spam", type=int, default=0)
    return p.parse_args(argv)


def make_handler(args: argparse.Namespace, started: float):
    class Handler(BaseHTTPRequestHandler):
        server_version = "demo-inference/1.0"

        def log_message(self, fmt: str, *a: object) -> None:
            print(f"{self.address_string()} {fmt % a}", flush=True)

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            age = time.monotonic() - started
            if self.path == args.health_path:
                if age < args.ready_after:
                    self._json(503, {"ready": False, "loading": True, "ready_in": args.ready_after - age})
                elif args.unhealthy_after is not None and age >= args.unhealthy_after:
                    self._json(500, {"ready": False, "error": "simulated failure"})
                else:
                    self._json(200, {"ready": True})
            elif self.path == "/":
                self._json(
                    200,
                    {
                        "name": args.name,
                        "pid": os.getpid(),
                        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "instance": os.environ.get("MODEL_SUPERVISOR_INSTANCE"),
                    },
                )
            else:
                self._json(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/v1/predict":
                self._json(404, {"error": f"no route {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                outputs = [x * 2 for x in body.get("inputs", [])]
            except (ValueError, TypeError, AttributeError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, {"outputs": outputs, "model": args.name})

    return Handler


def spawn_grandchild(args: argparse.Namespace) -> None:
    code = "import signal, time\n"
    if args.ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "while True: time.sleep(3600)\n"
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=args.grandchild_setsid)
    print(f"spawned grandchild pid {child.pid}", flush=True)
    if args.grandchild_pidfile:
        tmp = args.grandchild_pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(child.pid))
        os.replace(tmp, args.grandchild_pidfile)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for i in range(args.spam):
        print(f"log line {i:08d} " + "x" * 100)
    sys.stdout.flush()
    if args.spawn_grandchild:
        spawn_grandchild(args)
    if args.exit_after is not None:

        def bail() -> None:
            print(f"exiting on purpose with code {args.exit_code}", flush=True)
            os._exit(args.exit_code)

        timer = threading.Timer(args.exit_after, bail)
        timer.daemon = True
        timer.start()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args, started))
    print(
        f"{args.name} listening on {args.host}:{args.port} (pid {os.getpid()}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})",
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
