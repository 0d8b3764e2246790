"""Health probes: one HTTP GET or one TCP connect against an instance's port on 127.0.0.1.

A refused connection while a model loads is the normal case, not an error: callers log
readiness probes at debug level.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .desired import ResolvedHealth


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str


async def probe(health: ResolvedHealth, port: int, host: str = "127.0.0.1") -> ProbeResult:
    if health.type == "none":
        return ProbeResult(True, "no health check")
    try:
        async with asyncio.timeout(health.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if health.type == "tcp":
                    return ProbeResult(True, f"tcp {host}:{port} accepts connections")
                return await _http_get(reader, writer, host, port, health.path or "/")
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


async def _http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int, path: str) -> ProbeResult:
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: model-supervisor\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"GET {path}: not an HTTP answer ({status_line[:60]!r})")
    code = int(parts[1])
    if 200 <= code < 300:
        return ProbeResult(True, f"GET {path} -> {code}")
    return ProbeResult(False, f"GET {path} -> {code}")
