"""`model-supervisor serve`: the GPU monitor, the engine and the API in one process and loop.

The order is chosen for a fast start: GPU facts first (placement and GPU checks need a sample),
then the engine, which starts every instance at once, and only then the import and start of
the web server (the slowest part, about 0.4 s), so no instance waits for the API. The server
runs embedded on our own loop (Sanic's `create_server`), so its lifecycle is ours too.

Signals: handlers only record; the loop acts. SIGINT/SIGTERM: stop every instance
concurrently, then close the API and exit 0. SIGHUP: re-read conf.d/.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from .engine import Engine
from .gpu_tracker import GpuTracker
from .settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(sig: signal.Signals) -> None:
        log.info("received %s%s", sig.name, ": stopping every instance" if not stop.is_set() else " again")
        stop.set()

    engine = Engine(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, engine)
    tracker = GpuTracker(engine, settings)
    server = serving = None
    try:
        await tracker.start()
        await engine.start(watch=True)
        for _ in range(3):  # let the launches spawn (actor, then launch task) before the slow import
            await asyncio.sleep(0)
        if not stop.is_set():
            from .api.app import create_app
            from .api.listeners import create_servers

            app = create_app(settings, engine, tracker, manage_lifecycle=False)
            server = await create_servers(app, settings)  # TCP and/or the unix socket
            await server.startup()
            await server.before_start()
            await server.after_start()
            serving = asyncio.ensure_future(server.serve_forever())
            log.info("API on %s (docs at /docs)", server.where)
            await stop.wait()
    finally:
        if server is not None:
            await server.before_stop()  # no new requests change anything from here on
        await engine.shutdown()
        await tracker.stop()
        if server is not None:
            server.close()
            await server.wait_closed()
            await server.after_stop()
        if serving is not None:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("all instances stopped; bye")
    return 0


def _on_sighup(engine: Engine) -> None:
    log.info("received SIGHUP: re-reading %s", engine.settings.conf_dir)
    engine.request_reload("SIGHUP")
