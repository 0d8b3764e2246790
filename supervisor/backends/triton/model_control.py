"""Triton's model-control API, as live apply and the stub heal use it (explicit mode).

`POST /v2/repository/models/<model>/load` (Triton 2.51 adds or removes instances in place
when only the instance_group changed) and `.../unload`, and `POST /v2/repository/index` to
wait for an unload to finish. Plain urllib in a thread, always to 127.0.0.1: a handful of
requests per change. Errors carry Triton's own message (`LiveApplyError`).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

#: How long a heal may wait for Triton to finish unloading a model with a dead stub.
UNLOAD_WAIT = 60.0


class LiveApplyError(Exception):
    """The running server did not take a change (Triton's own error in the message)."""


async def repository_action(port: int, model: str, action: str, timeout: float) -> None:
    """POST /v2/repository/models/<model>/<action>; raises with Triton's own error."""
    status, body = await asyncio.to_thread(
        http_request, port, "POST", f"/v2/repository/models/{model}/{action}", timeout
    )
    if status != 200:
        error = _json(body, {}).get("error") if isinstance(_json(body, {}), dict) else None
        raise LiveApplyError(
            f"{action} {model}: HTTP {status}: {error or body[:200].decode(errors='replace')}"
        )


async def wait_unloaded(port: int, model: str, timeout: float) -> None:
    """Until the repository index no longer shows `model` UNLOADING; raises after UNLOAD_WAIT."""
    deadline = time.monotonic() + UNLOAD_WAIT
    while True:
        status, body = await asyncio.to_thread(http_request, port, "POST", "/v2/repository/index", timeout)
        states = [m.get("state") for m in _json(body, []) if isinstance(m, dict) and m.get("name") == model]
        if status == 200 and "UNLOADING" not in states:
            return
        if time.monotonic() > deadline:
            raise LiveApplyError(f"{model} was still unloading after {UNLOAD_WAIT:g} s")
        await asyncio.sleep(0.2)


def http_request(port: int, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) of one request to the server on 127.0.0.1:`port`; blocking. An HTTP error
    is an answer; no answer at all raises `LiveApplyError`."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise LiveApplyError(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None


def _json(body: bytes, default: Any) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return default
