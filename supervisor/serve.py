"""`model-supervisor serve`: the GPU monitor, the engine and the API in one process and loop.

The order is chosen for a fast start: GPU facts first (placement and GPU checks need a sample),
then the engine, which starts every instance at once, and only then the import and start of
the web server (the slowest part, about 0.4 s), so no instance waits for the API. The server
runs embedded on our own loop (Sanic's `create_server`), so its lifecycle is ours too.

Signals: handlers only record; the loop acts. SIGINT/SIGTERM: stop every instance
concurrently (or, with `on_exit = "keep"`, leave them running for the next supervisor to
adopt), then close the API and exit 0. SIGHUP: re-read conf.d/. SIGCHLD: reap orphaned
descendants that came back to us as their subreaper.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from supervisor.adapters.subreaper import become_subreaper
from supervisor.config.settings import Settings
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(sig: signal.Signals) -> None:
        log.info("received %s%s", sig.name, ": stopping every instance" if not stop.is_set() else " again")
        stop.set()

    why_not = become_subreaper()
    if why_not is not None:
        log.warning("not a child subreaper (%s): an orphaned worker is found by its mark only", why_not)
    sup = build(settings, subreaper=why_not is None)
    engine, tracker = sup.engine, sup.gpus
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, engine)
    if why_not is None:
        # uvloop keeps SIGCHLD to itself for loop.add_signal_handler; a plain handler still runs
        # on the main thread (and only records: the loop does the reaping).
        signal.signal(
            signal.SIGCHLD, lambda _sig, _frame: loop.call_soon_threadsafe(_on_sigchld, loop, engine)
        )
    server = serving = None
    try:
        await tracker.start()
        await engine.start(watch=True)
        for _ in range(3):  # let the launches spawn (actor, then launch task) before the slow import
            await asyncio.sleep(0)
        if not stop.is_set():
            from supervisor.api.app import create_app
            from supervisor.api.listeners import create_servers

            app = create_app(settings, engine, tracker, sup.metrics, manage_lifecycle=False)
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
        await engine.shutdown(keep_running=settings.on_exit == "keep")
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
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    log.info(
        "instances left running for the next supervisor; bye"
        if settings.on_exit == "keep"
        else "all instances stopped; bye"
    )
    return 0


_reap_scheduled = False


def _on_sigchld(loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
    """Coalesce a burst of SIGCHLDs into one pass (a stop-all of 300 instances sends 300)."""
    global _reap_scheduled
    if not _reap_scheduled:
        _reap_scheduled = True
        loop.call_soon(_reap, engine)


def _reap(engine: Engine) -> None:
    global _reap_scheduled
    _reap_scheduled = False
    engine.process_runner.reap_orphans()


def _on_sighup(engine: Engine) -> None:
    log.info("received SIGHUP: re-reading %s", engine.settings.conf_dir)
    engine.request_reload("SIGHUP")
