"""The client half of the CLI: status, start, stop, restart, logs, gpus, kill, reload.

Each talks to a running `serve` through the API (address and token from the same settings),
prints aligned tables like supervisorctl (or `--json`), and exits non-zero with the server's
message when something fails.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from datetime import timedelta
from typing import Any

from .client import ApiError, Client


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(timedelta(seconds=int(seconds)))


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _status_table(items: list[dict[str, Any]]) -> str:
    rows = []
    for it in items:
        gpus = ",".join(str(g) for g in it["gpu_ids"]) or "-"
        reason = it.get("last_error") if it["state"] in ("BACKOFF", "FATAL") else it.get("reason")
        mem = it.get("gpu_memory_mib")
        rows.append([it["instance_id"], it["state"], it["pid"] or "-", it["port"] or "-", gpus,
                     f"{mem} MiB" if mem else "-", _uptime(it.get("uptime")), it["restarts"], (reason or "")[:100]])
    return table(rows, ["INSTANCE", "STATE", "PID", "PORT", "GPUS", "GPU MEM", "UPTIME", "RESTARTS", "REASON"])


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    path = f"/api/v1/models/status/{args.name}" if args.name else "/api/v1/models/status"
    changes = _watch_events(client) if args.watch else None
    while True:
        items = client.call("GET", path)
        errors = client.call("GET", "/api/v1/config/errors")
        if args.json:
            print(json.dumps({"instances": items, "config_errors": errors}, indent=2))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(_status_table(items) if items else "no instances declared")
            if errors:
                print("\nconfiguration errors:")
                for e in errors:
                    where = f"{e['file']}:{e['line']}" if e.get("line") else e["file"]
                    print(f"  {where}: {e['key'] + ': ' if e.get('key') else ''}{e['message']}")
        if changes is None:
            return 0
        sys.stdout.flush()
        # Redraw on the next state change (from the event stream), or after `interval` for the uptimes.
        try:
            changes.get(timeout=args.interval)
            time.sleep(0.1)  # let a burst of transitions settle into one redraw
            while not changes.empty():
                changes.get_nowait()
        except queue.Empty:
            pass


def _watch_events(client: Client) -> queue.Queue:
    """A queue that receives a token for every state or configuration event."""
    changes: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for chunk in client.stream("/api/v1/events"):
                for line in chunk.decode("utf-8", "replace").splitlines():
                    if line.startswith("event:") and line.split(":", 1)[1].strip() != "gpu":
                        changes.put(line)
        except ApiError:
            pass

    threading.Thread(target=read, name="events", daemon=True).start()
    return changes


def _print_infos(infos: list[dict[str, Any]] | dict[str, Any], as_json: bool) -> None:
    infos = infos if isinstance(infos, list) else [infos]
    if as_json:
        print(json.dumps(infos, indent=2))
        return
    rows = [[i["instance_id"], i["state"], i["pid"] or "-", i["port"] or "-",
             ",".join(str(g) for g in i["gpu_ids"]) or "-", (i.get("reason") or "")[:100]] for i in infos]
    print(table(rows, ["INSTANCE", "STATE", "PID", "PORT", "GPUS", "REASON"]))


def cmd_start(client: Client, args: argparse.Namespace) -> int:
    if args.gpu is None:
        infos = client.call("POST", f"/api/v1/models/{args.name}/enable")
    else:
        body = {"model_name": args.name, "gpu_id": args.gpu, "model_type": args.type,
                "config": json.loads(args.config) if args.config else {}}
        query = f"?wait=true&timeout={args.timeout}" if args.wait else ""
        infos = client.call("POST", f"/api/v1/models/start{query}", body, timeout=args.timeout + 30)
    _print_infos(infos, args.json)
    return 0


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    if args.gpu is None:
        infos = client.call("POST", f"/api/v1/models/{args.name}/disable", timeout=600)
    else:
        infos = client.call("POST", "/api/v1/models/stop", {"model_name": args.name, "gpu_id": args.gpu}, timeout=600)
    _print_infos(infos, args.json)
    return 0


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    _print_infos(client.call("POST", f"/api/v1/models/{args.name}/restart"), args.json)
    return 0


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    path = f"/api/v1/instances/{args.instance}/logs?tail={args.lines}"
    if not args.follow:
        sys.stdout.write(client.call("GET", path))
        return 0
    try:
        for chunk in client.stream(path + "&follow=true"):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_gpus(client: Client, args: argparse.Namespace) -> int:
    gpus = client.call("GET", "/api/v1/gpus")
    if args.json:
        print(json.dumps(gpus, indent=2))
        return 0
    if not gpus:
        health = client.call("GET", "/healthz")
        print(f"no GPUs ({health.get('gpu_reason') or health.get('gpu_source')})")
        return 0
    rows, procs = [], []
    for g in gpus:
        label = f"{g['id']}" + (" (simulated)" if g.get("simulated") else "")
        mem = f"{g.get('memory_used') or 0}/{g.get('memory_total') or '?'} MiB"
        rows.append([label, g.get("name") or "-", mem, f"{g.get('utilization') or 0:g}%",
                     f"{g.get('power_draw') or 0:.0f} W", f"{g.get('temperature') or 0:g} C", len(g["processes"])])
        for p in g["processes"]:
            procs.append([g["id"], p["pid"], p.get("name") or "-", f"{p.get('gpu_memory_usage') or 0} MiB",
                          p.get("instance_id") or "STRAY"])
    print(table(rows, ["GPU", "NAME", "MEMORY", "UTIL", "POWER", "TEMP", "PROCS"]))
    if procs:
        print()
        print(table(procs, ["GPU", "PID", "PROCESS", "MEMORY", "INSTANCE"]))
    return 0


def cmd_kill(client: Client, args: argparse.Namespace) -> int:
    result = client.call("DELETE", f"/api/v1/processes/{args.pid}" + ("?force=true" if args.force else ""), timeout=30)
    print(json.dumps(result, indent=2) if args.json else f"{result['pid']}: {result['status']} ({result['message']})")
    return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    result = client.call("POST", "/api/v1/reload")
    print(json.dumps(result, indent=2) if args.json else "reload requested")
    return 0


def add_commands(sub: argparse._SubParsersAction, add_client_flags) -> None:
    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        add_client_flags(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=run_client, client_func=func)
        return p

    p = command("status", cmd_status, "instances, their state and why; configuration errors")
    p.add_argument("name", nargs="?", help="only this model")
    p.add_argument("-w", "--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0)
    p = command("start", cmd_start, "start a model (with --gpu: add that GPU to its declaration)")
    p.add_argument("name")
    p.add_argument("--gpu", type=int, help="GPU id (declares the model there)")
    p.add_argument("--type", help="backend kind, for a model that is not declared yet")
    p.add_argument("--config", help="JSON declaration keys for a new model")
    p.add_argument("--wait", action="store_true", help="wait until RUNNING (or failed)")
    p.add_argument("--timeout", type=int, default=600)
    p = command("stop", cmd_stop, "stop a model (with --gpu: remove that GPU from its declaration)")
    p.add_argument("name")
    p.add_argument("--gpu", type=int)
    p = command("restart", cmd_restart, "restart every instance of a model")
    p.add_argument("name")
    p = command("logs", cmd_logs, "an instance's log")
    p.add_argument("instance", help="instance id, e.g. demo@cpu")
    p.add_argument("-n", "--lines", type=int, default=100)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    command("gpus", cmd_gpus, "GPUs, their processes and owners")
    p = command("kill", cmd_kill, "kill a GPU or supervised process by pid (SIGTERM, then SIGKILL)")
    p.add_argument("pid", type=int)
    p.add_argument("--force", action="store_true", help="also a process that is neither on a GPU nor supervised")
    command("reload", cmd_reload, "re-read conf.d/ now")


def run_client(args: argparse.Namespace) -> int:
    from .cli import client_settings

    url, token = client_settings(args)
    try:
        return args.client_func(Client(url, token), args)
    except ApiError as exc:
        print(f"model-supervisor: {exc.message}" + (f" (HTTP {exc.status})" if exc.status else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
