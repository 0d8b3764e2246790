"""The Sanic app: built by a factory so tests can hand it their own engine.

One process, one loop: child processes, NVML and the Docker client must live in exactly one
process, and Sanic's default worker model would start one supervisor per worker. `serve`
runs the app as an embedded server on its own loop (see `supervisor.serve`); tests do the same.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from supervisor import __version__
from supervisor.adapters.storage import StateDirHealth
from supervisor.api import docs, errors, guard
from supervisor.api.routes import dashboard, gpus, models, processes, system
from supervisor.api.schemas import components
from supervisor.api.views import StatusCache
from supervisor.config.settings import Settings
from supervisor.runtime.control import Controller
from supervisor.runtime.engine import Engine
from supervisor.runtime.gpu_tracker import GpuTracker
from supervisor.runtime.metrics import Metrics

log = logging.getLogger(__name__)

#: Our app: Sanic's default config, and a plain namespace as `ctx` (set in `create_app`).
App = Sanic[Any, Any]

_names = itertools.count(1)

#: Reachable without the bearer token: health checks, the (static) API documentation and the
#: dashboard's static files (the page holds no data; its API calls carry the token).
PUBLIC_PATHS = ("/healthz", "/api/v1/healthz", "/docs", "/ui/")


def create_app(
    settings: Settings,
    engine: Engine,
    tracker: GpuTracker,
    metrics: Metrics,
    *,
    manage_lifecycle: bool = True,
) -> App:
    """Build the app over a built supervisor (`supervisor.wiring.build`). With
    `manage_lifecycle` the server's start and stop also start and stop the GPU tracker and the
    engine; `serve` manages them itself (it starts them first)."""
    n = next(_names)
    app = Sanic("model_supervisor" if n == 1 else f"model_supervisor_{n}", configure_logging=False)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 2.0
    # Sanic's "touchup" rewrites its HTTP classes in place at startup; a second app in one
    # process (the tests build many) then fails with KeyError 'http1_request_header'.
    app.config.TOUCHUP = False
    app.config.OAS_AUTODOC = False
    # sanic-ext's automatic HEAD/OPTIONS routes are added at start-up and make Sanic rebuild
    # its router (about 0.4 s on this machine, before the first instance can start). The API
    # needs neither: no CORS preflight (the dashboard is same-origin), no HEAD clients.
    app.config.HTTP_AUTO_HEAD = False
    app.config.HTTP_AUTO_OPTIONS = False
    app.config.CORS_AUTOMATIC_OPTIONS = False
    docs.configure(app)
    # The server runs through create_server, so Sanic's banner ("Goin' Fast @ ...:8000") and
    # sanic-ext's ("openapi [http://<unknown>/docs]") would print addresses they cannot know;
    # serve logs the real one ("API on http://HOST:PORT (docs at /docs)").
    app.config.MOTD = False
    app.ext._display = lambda: None  # type: ignore[method-assign]  # no banner (see above)
    app.ext.openapi.describe(
        "model-supervisor API",
        version=__version__,
        description="Control and observe supervised model-inference backends. Errors are JSON with `detail`.",
    )
    spec: dict[str, Any] = {"components": {"schemas": components(engine.registry.names())}}
    token = settings.token()
    if token:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    app.ext.openapi.raw(spec)

    app.ctx.settings = settings
    app.ctx.engine = engine
    app.ctx.controller = Controller(engine)
    app.ctx.gpus = tracker
    app.ctx.status_cache = StatusCache()
    app.ctx.metrics = metrics
    app.ctx.state_dir_health = StateDirHealth(settings.state_dir)
    app.ctx.token = token
    app.ctx.closing = asyncio.Event()

    errors.install(app)
    guard.install(app, settings)
    docs.install(app)
    for bp in (system.bp, gpus.bp, processes.bp, models.bp, dashboard.bp):
        app.blueprint(bp)
    system.install_root(app)

    @app.on_request
    async def require_token(request: Request) -> HTTPResponse | None:
        expected = request.app.ctx.token
        if not expected or request.path == "/" or request.path.startswith(PUBLIC_PATHS):
            return None
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode()):
            return None
        return errors.error_response(
            401,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": 'Bearer realm="model-supervisor"'},
        )

    @app.on_response  # type: ignore[untyped-decorator]  # sanic types it loosely
    async def count_request(request: Request, response: HTTPResponse) -> None:
        route = request.route.path if request.route is not None else "unmatched"
        request.app.ctx.metrics.count_request("/" + route.lstrip("/"), request.method, response.status)

    @app.before_server_start
    async def start(app: App, _loop: Any = None) -> None:
        app.ctx.closing = asyncio.Event()
        if manage_lifecycle:
            await tracker.start()  # first: GPU checks and placement need the first sample
            await engine.start(watch=True)

    @app.before_server_stop
    async def stop(app: App, _loop: Any = None) -> None:
        app.ctx.closing.set()  # ends the event and log streams
        if manage_lifecycle:
            await engine.shutdown()
            await tracker.stop()

    return app
