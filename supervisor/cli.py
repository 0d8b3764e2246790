"""The `model-supervisor` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from . import __version__


def _configure_logging(level: str) -> None:
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


def _settings(args: argparse.Namespace, **extra):
    from .settings import SettingsError, load_settings

    try:
        return load_settings(args.settings, conf_dir=args.conf_dir, state_dir=args.state_dir, **extra)
    except SettingsError as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from .engine import ConfDirMissing
    from .serve import serve_engine

    settings = _settings(args, host=args.host, port=args.port, log_level=args.log_level)
    _configure_logging(settings.log_level)
    try:
        return _run(serve_engine(settings))
    except ConfDirMissing as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        return 2


def _run(coro) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with sanic
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def cmd_validate(args: argparse.Namespace) -> int:
    from .backends.registry import default_registry
    from .confd import read_dir
    from .desired import Catalog, resolve
    from .ports import PortAllocator

    if args.dir is not None:
        args.conf_dir = args.dir
    settings = _settings(args)
    conf_dir = settings.conf_dir
    if not conf_dir.is_dir():
        print(f"{conf_dir}: declaration directory does not exist", file=sys.stderr)
        return 2
    parsed = read_dir(conf_dir, default_registry(), settings.defaults())
    ports = PortAllocator(*settings.port_range, is_free=lambda _port: True)
    catalog = resolve(parsed, Catalog(), ports.assign)
    errors = [e for errs in catalog.errors.values() for e in errs]
    for err in errors:
        print(err, file=sys.stderr)
    bad = len(catalog.errors)
    print(f"{conf_dir}: {len(parsed)} file(s), {len(catalog.models)} valid model(s), "
          f"{len(catalog.instances)} instance(s), {bad} file(s) with errors")
    return 1 if errors else 0


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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("validate", help="check the declarations in DIR (default: the conf dir); exit 1 on errors")
    _add_settings_flags(p)
    p.add_argument("dir", nargs="?", type=Path, help="declaration directory")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
