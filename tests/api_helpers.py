"""A real Sanic server on 127.0.0.1 in the test's own loop, with a real engine behind it."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from sanic import Sanic

from supervisor.api.app import create_app
from supervisor.config.settings import Settings
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

from .conftest import free_port


@dataclass
class Api:
    app: Sanic
    engine: Engine
    client: httpx.AsyncClient
    url: str
    settings: Settings

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return await self.client.post(path, json=json, **kw)

    async def put(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return await self.client.put(path, json=json, **kw)

    async def delete(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.delete(path, **kw)


@asynccontextmanager
async def running_api(settings: Settings, token: str | None = None, **overrides: Any):
    port = free_port()
    update: dict[str, Any] = {"port": port, **overrides}
    if settings.gpu_source == "auto":  # tests never depend on this machine's GPUs
        update.setdefault("gpu_source", "none")
    if token is not None:
        from pydantic import SecretStr

        update["api_token"] = SecretStr(token)
    settings = settings.model_copy(update=update)
    sup = build(settings)
    engine = sup.engine
    app = create_app(settings, engine, sup.gpus, sup.metrics)
    server = await app.create_server(host="127.0.0.1", port=port, return_asyncio_server=True)
    assert server is not None
    await server.startup()
    await server.before_start()
    await server.after_start()
    serving = asyncio.ensure_future(server.serve_forever())
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.AsyncClient(base_url=url, headers=headers, timeout=60)
    try:
        yield Api(app, engine, client, url, settings)
    finally:
        await client.aclose()
        await server.before_stop()
        server.close()
        await server.wait_closed()
        await server.after_stop()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
