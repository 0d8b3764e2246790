"""The `model-supervisor` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor import __version__

if TYPE_CHECKING:
    from supervisor.config.settings import Settings

# Client commands (status, start, ...) must stay fast (issue 13: under 120 ms with imports):
# asyncio, logging, pydantic and the server's modules are imported by `serve` alone.


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=Path, help="settings TOML file (also MODEL_SUPERVISOR_SETTINGS_FILE)")
    p.add_argument("--conf-dir", type=Path, help="declaration directory (default conf.d)")
    p.add_argument("--state-dir", type=Path, help="logs and runtime state (default state)")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    from supervisor.config.settings import SettingsError, load_settings

    try:
        return load_settings(args.settings, conf_dir=args.conf_dir, state_dir=args.state_dir, **extra)
    except SettingsError as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        on_exit="keep" if args.keep_running else None,
    )
    _configure_logging(settings.log_level)
    if not settings.conf_dir.is_dir():
        print(f"model-supervisor: declaration directory {settings.conf_dir} does not exist", file=sys.stderr)
        return 2
    from supervisor.adapters.statelock import StateDirLocked, lock_state_dir

    try:
        lock_state_dir(settings.state_dir)  # held until we exit (the fd stays open)
    except (StateDirLocked, OSError) as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        return 2
    try:
        token = settings.token()
    except Exception as exc:  # an unreadable token file
        print(f"model-supervisor: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(settings.host) and not token and not args.insecure:
        print(
            f"model-supervisor: refusing to serve the API on {settings.host} without a token: anyone who can "
            "reach it could run commands as this user. Set MODEL_SUPERVISOR_API_TOKEN (or api_token_file), "
            "bind 127.0.0.1, or pass --insecure if you really mean it.",
            file=sys.stderr,
        )
        return 2
    if settings.port and not _can_bind(settings.host, settings.port):
        print(
            f"model-supervisor: cannot listen on {settings.host}:{settings.port}: address already in use",
            file=sys.stderr,
        )
        return 2
    from supervisor.serve import serve

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop ships with sanic
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings))
    # Every instance is stopped and every file closed: skip the interpreter's teardown of a
    # few hundred modules and idle pool threads (about 130 ms), so a service manager waiting
    # for us sees the exit as soon as the work is done.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _can_bind(host: str, port: int) -> bool:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return True  # let the server report it
    family, *_, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            return False
    return True


def cmd_validate(args: argparse.Namespace) -> int:
    from supervisor.adapters.confd import read_dir
    from supervisor.adapters.ports import PortAllocator
    from supervisor.backends.registry import default_registry
    from supervisor.config.desired import Catalog, resolve

    only: Path | None = None
    if args.dir is not None and args.dir.is_file():
        # `validate conf.d/x.toml`: that file, checked against the others in its directory.
        only, args.dir = args.dir, args.dir.parent
    if args.dir is not None:
        args.conf_dir = args.dir
    settings = _settings(args)
    conf_dir = settings.conf_dir
    if not conf_dir.is_dir():
        print(f"{conf_dir}: declaration directory does not exist", file=sys.stderr)
        return 2
    try:
        parsed = read_dir(
            conf_dir, default_registry(), settings.defaults(), host_checks=not args.no_host_checks
        )
    except OSError as exc:  # the directory itself (each file's problems are that file's errors)
        print(f"{conf_dir}: cannot list the declaration directory: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if only is not None and str(only) not in parsed:  # e.g. a name the watcher ignores (x.toml.bak)
        from supervisor.adapters.confd import read_file

        parsed[str(only)] = read_file(
            only, default_registry(), settings.defaults(), host_checks=not args.no_host_checks
        )
    ports = PortAllocator(*settings.port_range, is_free=lambda _port: True)
    catalog = resolve(parsed, Catalog(), ports.assign)
    if only is not None:
        errors = catalog.errors.get(str(only), [])
        for err in errors:
            print(err, file=sys.stderr)
        valid = sum(1 for spec in catalog.models.values() if str(spec.source) == str(only))
        print(f"{only}: {valid} valid model(s), {len(errors)} error(s)")
        return 1 if errors else 0
    errors = [e for errs in catalog.errors.values() for e in errs]
    for err in errors:
        print(err, file=sys.stderr)
    bad = len(catalog.errors)
    print(
        f"{conf_dir}: {len(parsed)} file(s), {len(catalog.models)} valid model(s), "
        f"{len(catalog.instances)} instance(s), {bad} file(s) with errors"
    )
    return 1 if errors else 0


def cmd_node(args: argparse.Namespace) -> int:
    from supervisor.cluster.node import run  # Ray itself is never imported here: run() becomes `ray start`

    return run(args)


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=Path, help="settings TOML file (also MODEL_SUPERVISOR_SETTINGS_FILE)")
    p.add_argument("--url", help="API address (default http://HOST:PORT from the settings)")
    p.add_argument("--token", help="bearer token (default: the settings' api_token / api_token_file)")


def client_settings(args: argparse.Namespace) -> tuple[str, str | None]:
    """The API's address and token, from the same sources as `serve`'s settings (read by the
    light `client_config`, not pydantic-settings: see the note at the top)."""
    from supervisor.cli.client_config import ClientConfigError, load

    try:
        config = load(args.settings, args.url, args.token)
    except ClientConfigError as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return config.url, config.token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-supervisor",
        description="Keep declared GPU model-inference backends running.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the supervisor in the foreground")
    _add_settings_flags(p)
    p.add_argument("--host", help="API bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default 6004)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without an API token"
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="on SIGTERM/SIGINT leave every instance running for the next serve to adopt "
        '(upgrades; same as on_exit = "keep")',
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "validate", help="check the declarations in DIR (default: the conf dir); exit 1 on errors"
    )
    _add_settings_flags(p)
    p.add_argument("dir", nargs="?", type=Path, help="declaration directory, or one declaration file")
    p.add_argument(
        "--no-host-checks",
        action="store_true",
        help="check the declarations alone, not this machine (programs, directories): "
        "for files meant for another host",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "node",
        help="join this machine to a Ray cluster as a worker for cluster mode "
        "(its GPUs and label as Ray resources)",
    )
    p.add_argument("--address", required=True, help="the Ray head, HOST:PORT")
    p.add_argument("--label", help="this node's label, the value declarations give as node = ... (msup-node)")
    p.add_argument("--gpus", help="GPU ids to offer, e.g. 0,1 (default: every GPU NVML reports)")
    p.add_argument("--num-gpus", type=int, help="offer NVML's first N GPUs (0: none, NVML not needed)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may schedule here (default: Ray's, every core)")
    p.add_argument(
        "--node-ip-address", help="this node's address as the cluster reaches it (default: Ray's choice)"
    )
    p.add_argument("--ray-python", help="the Python with Ray installed (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the ray start command instead of running it")
    p.set_defaults(func=cmd_node)

    from supervisor.cli.remote import add_commands

    add_commands(sub, _add_client_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
