"""A small HTTP client for the CLI (stdlib only): JSON in, JSON out, the server's message on errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


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
        return "; ".join(f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}" for item in detail)
    return str(detail)


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = -1.0):
        """`timeout` -1: the client's default; None: wait forever (streams)."""
        timeout = self.timeout if timeout == -1.0 else timeout
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=timeout)
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
