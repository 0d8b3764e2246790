"""`model-supervisor serve`: the engine in the foreground, driven by signals.

Signal handlers only record what arrived; the loop acts on it (SIGINT/SIGTERM: stop every
instance concurrently, then exit 0; SIGHUP: re-read conf.d/).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from .engine import Engine
from .settings import Settings

log = logging.getLogger(__name__)


async def serve_engine(settings: Settings, engine: Engine | None = None) -> int:
    engine = engine or Engine(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hup = asyncio.Event()

    def on_stop(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("received %s again; already stopping", sig.name)
        else:
            log.info("received %s: stopping every instance", sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, hup.set)

    async def reload_on_hup() -> None:
        while True:
            await hup.wait()
            hup.clear()
            log.info("received SIGHUP: re-reading %s", settings.conf_dir)
            engine.request_reload("SIGHUP")

    try:
        await engine.start(watch=True)
        engine.spawn_background(reload_on_hup(), "SIGHUP reload")
        log.info("supervising %d instance(s) from %s", len(engine.instances), settings.conf_dir)
        await stop.wait()
    finally:
        await engine.shutdown()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("all instances stopped; bye")
    return 0
