"""The client half of the CLI: status, start, stop, restart, logs, gpus, kill, reload.

Each talks to a running `serve` through the API (address and token from the same settings),
prints aligned tables like supervisorctl (or `--json`), and exits non-zero with the server's
message when something fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from supervisor.cli.api_client import ApiError, Client

if TYPE_CHECKING:
    import queue
    from collections.abc import Callable, Sequence

    #: A client command: what `run_client` calls with the API client and the parsed arguments.
    ClientCommand = Callable[[Client, argparse.Namespace], int]


def _uptime(seconds: float | None) -> str:
    """H:MM:SS, or "N days, H:MM:SS" (as str(timedelta) writes it, without importing datetime)."""
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {clock}" if days else clock


def table(rows: Sequence[Sequence[object]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


def _status_table(items: list[dict[str, Any]], empty: Sequence[dict[str, Any]] = ()) -> str:
    # A NODE column only in cluster mode (some instance has a node): one machine's table is unchanged.
    nodes = any(it.get("node") for it in items)
    rows = []
    for it in items:
        gpus = ",".join(str(g) for g in it["gpu_ids"]) or "-"
        reason = it.get("last_error") if it["state"] in ("BACKOFF", "FATAL") else it.get("reason")
        mem = it.get("gpu_memory_mib")
        where = [it.get("node") or "-"] if nodes else []
        rows.append(
            [
                it["instance_id"],
                it["state"],
                *where,
                it["pid"] or "-",
                it["port"] or "-",
                gpus,
                f"{mem} MiB" if mem else "-",
                _uptime(it.get("uptime")),
                it["restarts"],
                (reason or "")[:100],
            ]
        )
    for m in empty:
        rows.append([m["model"], "-", *(["-"] if nodes else []), "-", "-", "-", "-", "-", "-", m["reason"]])
    rows.sort(key=lambda r: r[0])
    return table(
        rows,
        [
            "INSTANCE",
            "STATE",
            *(["NODE"] if nodes else []),
            "PID",
            "PORT",
            "GPUS",
            "GPU MEM",
            "UPTIME",
            "RESTARTS",
            "REASON",
        ],
    )


#: `status` exit codes (documented in the README and `status --help`), as `systemctl is-active`
#: gives scripts one: 0 all healthy; 3 an instance is FATAL or BACKOFF, or a declaration file
#: has errors; 1 the API could not be asked (unreachable, refused).
EXIT_UNHEALTHY = 3
UNHEALTHY_STATES = ("FATAL", "BACKOFF")


def _no_instance_rows(models: list[dict[str, Any]], name: str | None) -> list[dict[str, Any]]:
    """Declared models with no instance (`gpus = []`, or nothing placed): shown, not dropped."""
    rows = []
    for m in models:
        if m["instances"] or (name and m["name"] != name):
            continue
        gpus = (m.get("declaration") or {}).get("gpus")
        why = "gpus = []" if gpus == [] else (f"gpus = {json.dumps(gpus)}" if gpus is not None else "")
        rows.append({"model": m["name"], "reason": f"no instances ({why})" if why else "no instances"})
    return rows


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    path = f"/api/v1/models/status/{args.name}" if args.name else "/api/v1/models/status"
    changes = _watch_events(client) if args.watch else None
    clear = args.watch and sys.stdout.isatty()  # never escape codes into a file or a pipe
    while True:
        items = client.call("GET", path)
        errors = client.call("GET", "/api/v1/config/errors")
        empty = (
            _no_instance_rows(client.call("GET", "/api/v1/models"), args.name)
            if not items or not args.name
            else []
        )
        health = client.call("GET", "/healthz")
        warnings = health.get("warnings") or []
        unhealthy = bool(errors) or any(i["state"] in UNHEALTHY_STATES for i in items)
        if args.json:
            print(
                json.dumps(
                    {
                        "instances": items,
                        "models_without_instances": empty,
                        "config_errors": errors,
                        "warnings": warnings,
                    },
                    indent=2,
                )
            )
        else:
            if clear:
                print("\033[2J\033[H", end="")
            elif args.watch:
                print(f"--- {time.strftime('%H:%M:%S')}")
            if items or empty:
                print(_status_table(items, empty))
            else:
                print("no instances declared")
            for w in warnings:
                print(f"warning: {w}")
            if errors:
                print("\nconfiguration errors:")
                for e in errors:
                    where = f"{e['file']}:{e['line']}" if e.get("line") else e["file"]
                    print(f"  {where}: {e['key'] + ': ' if e.get('key') else ''}{e['message']}")
        if changes is None:
            return EXIT_UNHEALTHY if unhealthy else 0
        sys.stdout.flush()
        # Redraw on the next state change (from the event stream), or after `interval` for the uptimes.
        import queue

        try:
            changes.get(timeout=args.interval)
            time.sleep(0.1)  # let a burst of transitions settle into one redraw
            while not changes.empty():
                changes.get_nowait()
        except queue.Empty:
            pass


def _watch_events(client: Client) -> queue.Queue[str]:
    """A queue that receives a token for every state or configuration event."""
    import queue
    import threading

    changes: queue.Queue[str] = queue.Queue()

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
    if not infos:
        print("no instances")
        return
    rows = [
        [
            i["instance_id"],
            i["state"],
            i["pid"] or "-",
            i["port"] or "-",
            ",".join(str(g) for g in i["gpu_ids"]) or "-",
            (i.get("reason") or "")[:100],
        ]
        for i in infos
    ]
    print(table(rows, ["INSTANCE", "STATE", "PID", "PORT", "GPUS", "REASON"]))


def _wait_query(args: argparse.Namespace) -> str:
    return f"?wait=true&timeout={args.timeout}" if args.wait else ""


def _wait_timeout(args: argparse.Namespace) -> float:
    return args.timeout + 30 if args.wait else 60


def _print_all(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_infos(result["instances"], False)
    for f in result["failed"]:
        print(f"model-supervisor: {f['model']}: {f['error']}", file=sys.stderr)
    return 1 if result["failed"] else 0


def _one_name(args: argparse.Namespace, verb: str) -> None:
    problem = (
        "give a model name or --all, not both"
        if args.all and args.name
        else "give a model name, or --all for every model"
        if not args.all and not args.name
        else "--gpu needs a model name, not --all"
        if args.all and getattr(args, "gpu", None) is not None
        else None
    )
    if problem:
        print(f"model-supervisor {verb}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def cmd_start(client: Client, args: argparse.Namespace) -> int:
    _one_name(args, "start")
    if args.all:
        return _print_all(
            client.call("POST", "/api/v1/models/enable" + _wait_query(args), timeout=_wait_timeout(args)),
            args.json,
        )
    if args.gpu is None:
        infos = client.call(
            "POST", f"/api/v1/models/{args.name}/enable" + _wait_query(args), timeout=_wait_timeout(args)
        )
    else:
        body = {
            "model_name": args.name,
            "gpu_id": args.gpu,
            "model_type": args.type,
            "config": json.loads(args.config) if args.config else {},
        }
        infos = client.call(
            "POST", "/api/v1/models/start" + _wait_query(args), body, timeout=_wait_timeout(args)
        )
    _print_infos(infos, args.json)
    return 0


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    _one_name(args, "stop")
    if args.all:
        return _print_all(client.call("POST", "/api/v1/models/disable", timeout=600), args.json)
    if args.gpu is None:
        infos = client.call("POST", f"/api/v1/models/{args.name}/disable", timeout=600)
    else:
        infos = client.call(
            "POST", "/api/v1/models/stop", {"model_name": args.name, "gpu_id": args.gpu}, timeout=600
        )
    _print_infos(infos, args.json)
    return 0


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    infos = client.call(
        "POST", f"/api/v1/models/{args.name}/restart" + _wait_query(args), timeout=_wait_timeout(args)
    )
    _print_infos(infos, args.json)
    return 0


def _log_target(client: Client, target: str) -> str:
    """An instance id as given, or the only instance of a model named instead."""
    if "@" in target:
        return target
    try:
        items = client.call("GET", f"/api/v1/models/status/{target}")
    except ApiError as exc:
        if exc.status == 404:
            raise ApiError(
                404, f"no instance or model {target!r} (instance ids look like {target}@cpu)"
            ) from None
        raise
    ids: list[str] = sorted(i["instance_id"] for i in items)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise ApiError(404, f"model {target!r} has no instances")
    raise ApiError(0, f"model {target!r} has {len(ids)} instances; name one: {', '.join(ids)}")


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    instance = _log_target(client, args.instance)
    path = f"/api/v1/instances/{instance}/logs?tail={args.lines}"
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
        rows.append(
            [
                label,
                g.get("name") or "-",
                mem,
                f"{g.get('utilization') or 0:g}%",
                f"{g.get('power_draw') or 0:.0f} W",
                f"{g.get('temperature') or 0:g} C",
                len(g["processes"]),
            ]
        )
        for p in g["processes"]:
            procs.append(
                [
                    g["id"],
                    p["pid"],
                    p.get("name") or "-",
                    f"{p.get('gpu_memory_usage') or 0} MiB",
                    p.get("instance_id") or "STRAY",
                ]
            )
    print(table(rows, ["GPU", "NAME", "MEMORY", "UTIL", "POWER", "TEMP", "PROCS"]))
    if procs:
        print()
        print(table(procs, ["GPU", "PID", "PROCESS", "MEMORY", "INSTANCE"]))
    return 0


def cmd_kill(client: Client, args: argparse.Namespace) -> int:
    try:
        result = client.call(
            "DELETE", f"/api/v1/processes/{args.pid}" + ("?force=true" if args.force else ""), timeout=30
        )
    except ApiError as exc:  # the API's words are for API clients; say it in the CLI's terms
        message = exc.message.replace("add ?force=true", "pass --force")
        if exc.status == 404:
            message = f"pid {args.pid}: {message}"
        raise ApiError(exc.status, message) from None
    print(
        json.dumps(result, indent=2)
        if args.json
        else f"{result['pid']}: {result['status']} ({result['message']})"
    )
    return 0


def _names(ids: list[str]) -> str:
    return f" ({', '.join(ids)})" if ids else ""


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    """Waits for the reload it asked for (not the watcher's last one) and says what it changed."""
    result = client.call("POST", "/api/v1/reload?wait=true", timeout=120)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    changes = result.get("changes") or {}
    parts = [
        f"{len(changes.get(k, []))} {label}{_names(changes.get(k, []))}"
        for k, label in (
            ("added", "added"),
            ("removed", "removed"),
            ("replaced", "replaced"),
            ("updated", "updated in place"),
        )
        if changes.get(k)
    ]
    if parts:
        print("reloaded: " + "; ".join(parts))
    else:
        # The watcher may have applied the edit a moment before this reload: say so.
        last = result.get("last_reload") or {}
        done = [
            f"{len(last.get(k) or [])} {k}{_names(last.get(k) or [])}"
            for k in ("added", "removed", "replaced", "updated")
            if last.get(k)
        ]
        print(
            "reloaded: nothing changed"
            + (
                f"; already applied ({last.get('reason')}, {last.get('at')}): " + "; ".join(done)
                if done
                else ""
            )
        )
    errors = result.get("config_errors") or 0
    if errors:
        print(f"{errors} configuration error(s): see `model-supervisor status`")
    return 0


STATUS_EPILOG = """exit status: 0 every instance healthy (none FATAL or BACKOFF) and no configuration errors;
3 an instance is FATAL or BACKOFF, or a declaration file has errors; 1 the supervisor could not be
asked; 2 a usage or settings error."""


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_client_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    def command(
        name: str, func: ClientCommand, help: str, json_flag: bool = True, **kw: Any
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        add_client_flags(p)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=run_client, client_func=func)
        return p

    def wait_flags(p: argparse.ArgumentParser, until: str) -> None:
        p.add_argument(
            "--wait", action="store_true", help=f"wait until {until} (exit 1 if an instance fails)"
        )
        p.add_argument(
            "--timeout",
            type=int,
            default=600,
            metavar="SECONDS",
            help="with --wait: give up waiting after this long (default 600)",
        )

    p = command(
        "status",
        cmd_status,
        "instances, their state and why; configuration errors",
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="only this model")
    p.add_argument("-w", "--watch", action="store_true", help="refresh until interrupted")
    p.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="with -w: redraw at least this often (default 2; state changes redraw at once)",
    )
    p = command(
        "start", cmd_start, "start a model (with --gpu: add that GPU to its declaration; --all: every model)"
    )
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true", help="every declared model (sets enabled in each file)")
    p.add_argument("--gpu", type=int, help="GPU id (declares the model there)")
    p.add_argument("--type", help="backend kind, for a model that is not declared yet")
    p.add_argument("--config", help="JSON declaration keys for a new model")
    wait_flags(p, "RUNNING (or failed)")
    p = command(
        "stop",
        cmd_stop,
        "stop a model (with --gpu: remove that GPU from its declaration; --all: every "
        "model); answers once stopped",
    )
    p.add_argument("name", nargs="?")
    p.add_argument(
        "--all", action="store_true", help="every declared model (sets enabled = false in each file)"
    )
    p.add_argument(
        "--gpu", type=int, help="GPU id: stop only the instance there (removes it from the declaration)"
    )
    p = command("restart", cmd_restart, "restart every instance of a model")
    p.add_argument("name")
    wait_flags(p, "RUNNING again (or failed)")
    p = command("logs", cmd_logs, "an instance's log", json_flag=False)
    p.add_argument("instance", help="instance id (e.g. demo@cpu), or a model with one instance")
    p.add_argument("-n", "--lines", type=int, default=100, help="how many lines (default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    command("gpus", cmd_gpus, "GPUs, their processes and owners")
    p = command("kill", cmd_kill, "kill a GPU or supervised process by pid (SIGTERM, then SIGKILL)")
    p.add_argument("pid", type=int)
    p.add_argument(
        "--force", action="store_true", help="also a process that is neither on a GPU nor supervised"
    )
    command("reload", cmd_reload, "re-read conf.d/ now; wait for it and print what changed")


def run_client(args: argparse.Namespace) -> int:
    from supervisor.cli.main import client_settings

    url, token = client_settings(args)
    try:
        code: int = args.client_func(Client(url, token), args)
        return code
    except ApiError as exc:
        print(
            f"model-supervisor: {exc.message}" + (f" (HTTP {exc.status})" if exc.status else ""),
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
