"""Health probes: one HTTP GET or one TCP connect against an instance's port on 127.0.0.1.

A refused connection while a model loads is the normal case, not an error: callers log
readiness probes at debug level.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from supervisor.config.desired import ResolvedHealth


@functools.cache
def _loopback_tls() -> ssl.SSLContext:
    # The probe only ever connects to 127.0.0.1: a server's certificate names its public host
    # (or is self-signed), so it is not verified; encryption is what the server insists on.
    # Built on first use: loading the system's CA store costs ~20 ms of every start otherwise.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str


async def probe(health: ResolvedHealth, port: int, host: str = "127.0.0.1") -> ProbeResult:
    if health.type == "none":
        return ProbeResult(True, "no health check")
    try:
        async with asyncio.timeout(health.timeout):
            tls = _loopback_tls() if health.type == "https" else None
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
            try:
                if health.type == "tcp":
                    return ProbeResult(True, f"tcp {host}:{port} accepts connections")
                return await _http_get(reader, writer, host, port, health.path or "/", health.headers)
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (ConnectionError, OSError):
                    pass
    except ConnectionRefusedError:
        return ProbeResult(False, f"connection to {host}:{port} refused")
    except TimeoutError:
        return ProbeResult(False, f"no answer from {host}:{port} within {health.timeout:g} s")
    except (ConnectionError, OSError) as exc:
        return ProbeResult(False, f"{host}:{port}: {exc}")


def health_to_wire(health: ResolvedHealth) -> dict[str, Any]:
    """A probe's settings as JSON-able data, for a probe that runs on another node."""
    return asdict(health)


def health_from_wire(data: dict[str, Any]) -> ResolvedHealth:
    return ResolvedHealth(**{**data, "headers": tuple(tuple(h) for h in data.get("headers") or ())})


def _header_lines(headers: tuple[tuple[str, str], ...]) -> str:
    # Values are secrets (a bearer token): never echoed into a probe's detail, which is logged.
    for name, value in headers:
        if any(c in name + value for c in "\r\n\0"):
            raise ValueError(f"the value of probe header {name!r} contains a line break or NUL")
    return "".join(f"{name}: {value}\r\n" for name, value in headers)


async def _http_get(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
    path: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> ProbeResult:
    try:
        extra = _header_lines(headers)
    except ValueError as exc:
        return ProbeResult(False, str(exc))
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: model-supervisor\r\n"
        f"Accept: */*\r\n{extra}Connection: close\r\n\r\n".encode("latin-1", "replace")
    )
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"GET {path}: not an HTTP answer ({status_line[:60]!r})")
    code = int(parts[1])
    if 200 <= code < 300:
        return ProbeResult(True, f"GET {path} -> {code}")
    if code in (401, 403):
        why = (
            "the server refused the probe's credentials"
            if headers
            else "the server wants credentials; the probe sent none"
        )
        return ProbeResult(False, f"GET {path} -> {code} ({why})")
    return ProbeResult(False, f"GET {path} -> {code}")


#: Where a probe runs: `probe` here, or a run's own (a Ray run probes on its node's loopback).
Prober = Callable[[ResolvedHealth, int], Awaitable[ProbeResult]]


async def liveness(
    health: ResolvedHealth, port: int, plan: object = None, prober: Prober | None = None
) -> ProbeResult:
    """The check of a RUNNING instance: the probe on the liveness path, then the plan's own
    deeper check if it has one (Triton: python-backend stubs that died while the server and
    the model still answer ready). The deeper check talks to 127.0.0.1, so it is left out for
    a run probed elsewhere (`prober`)."""
    result = await (prober or probe)(health.for_liveness(), port)
    live = getattr(plan, "live", None) if prober is None else None
    if not result.ok or live is None:
        return result
    ok, detail = await live.check(port, health.timeout)
    return ProbeResult(ok, f"{result.detail}; {detail}" if detail else result.detail)
