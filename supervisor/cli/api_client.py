"""A small HTTP client for the CLI (stdlib only): JSON in, JSON out, the server's message on errors."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, Protocol

UNIX_SCHEME = "unix://"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "(no message)"
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, list):  # 422: one line per bad field
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}" for item in detail
        )
    return str(detail)


class _Opener(Protocol):
    """urllib's urlopen, or the open of an opener with a unix-socket handler."""

    def __call__(
        self, req: urllib.request.Request, /, *, timeout: float | None
    ) -> http.client.HTTPResponse: ...


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, host: str, timeout: float | None = None, **_: Any) -> None:
        super().__init__(host, timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Private, so not in typeshed: the sentinel http.client uses for "no timeout given".
            if self.timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixHandler(urllib.request.HTTPHandler):
    """http:// requests carried over a unix socket (the server sees Host: localhost)."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = socket_path

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(lambda host, **kw: _UnixConnection(self.socket_path, host, **kw), req)


class Client:
    """`base_url` is http://HOST:PORT, or unix:///path/to.sock for the API's unix-socket listener."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        if self.base_url.startswith(UNIX_SCHEME):
            self._prefix = "http://localhost"
            # No ProxyHandler: an http_proxy in the environment must not capture socket requests.
            self._open: _Opener = urllib.request.build_opener(
                _UnixHandler(self.base_url[len(UNIX_SCHEME) :])
            ).open
        else:
            self._prefix = self.base_url
            self._open = urllib.request.urlopen

    def _request(
        self, method: str, path: str, body: Any = None, timeout: float | None = -1.0
    ) -> http.client.HTTPResponse:
        """`timeout` -1: the client's default; None: wait forever (streams)."""
        timeout = self.timeout if timeout == -1.0 else timeout
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self._prefix + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return self._open(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, _message(exc.read())) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, f"cannot reach the supervisor at {self.base_url}: {exc.reason}") from None
        except TimeoutError:
            raise ApiError(0, f"no answer from {self.base_url} within {timeout:g} s") from None

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = -1.0) -> Any:
        with self._request(method, path, body, timeout) as resp:
            raw = resp.read()
            if resp.headers.get_content_type() == "application/json":
                return json.loads(raw)
            return raw.decode("utf-8", "replace")

    def stream(self, path: str) -> Iterator[bytes]:
        """Yield chunks of a streamed response as they arrive (no timeout between chunks)."""
        resp = self._request("GET", path, timeout=None)
        with resp:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    return
                yield chunk
