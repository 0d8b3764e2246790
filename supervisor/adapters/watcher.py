"""Watching conf.d/ so that dropping, editing or deleting a file is applied at once.

watchfiles reports *which* files changed; we only use it as a doorbell. Every ring leads to
a full, fresh read of the directory (the engine's `reload`), so no sequence of events (atomic
replaces, editor save dances, renames, lost events) can leave the engine out of step with the
files. Bursts are coalesced here: watchfiles' batching is not a debounce (a file rewritten
every 20 ms yields a batch every ~100 ms), so after a ring we wait for a short quiet period
and reload once.

The watched directory itself may disappear (`rm -r conf.d`) or be swapped for a new one
(`mv conf.new conf.d`): both are noticed within a second, what runs keeps running, and
watching resumes on the new directory with a full reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import Change, DefaultFilter, awatch

from supervisor.adapters.confd import is_declaration_file

log = logging.getLogger(__name__)

#: watchfiles' step (ms): how long the set of changes must stay unchanged before a batch is
#: returned. Its thread wakes (and takes the GIL) every step even when nothing happens, so this
#: trades idle CPU (about 25 wake-ups/s at 40 ms) against reload latency (about 1.5 steps).
STEP_MS = 40
#: After a batch, reload once no further batch has come for this long ...
SETTLE = 0.02
#: ... but never later than this after the first one, however busy the directory.
MAX_DELAY = 0.5
#: How often the directory's identity is checked (and the resync clock ticks).
TICK_MS = 5000
#: While the directory is missing, how often to look for it again.
DIR_POLL = 1.0


class DeclarationFilter(DefaultFilter):
    """Only `*.toml` declarations: no hidden, editor temp/backup files (`.#x`, `x~`, `4913`, `*.tmp`);
    and the watched directory itself, so its removal is noticed at once."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = os.path.abspath(directory)

    def __call__(self, change: Change, path: str) -> bool:
        if os.path.abspath(path) == self.directory:
            return True
        return super().__call__(change, path) and is_declaration_file(os.path.basename(path))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if path.is_dir() else None


class ConfWatcher:
    """Rings `reload(reason)` on file changes, explicit requests and a periodic resync."""

    def __init__(
        self, conf_dir: Path, reload: Callable[[str], Awaitable[object]], resync_interval: float = 30.0
    ) -> None:
        self.conf_dir = conf_dir
        self._reload = reload
        self.resync_interval = resync_interval
        self._dirty = asyncio.Event()
        self._reasons: list[str] = []
        self._stop = asyncio.Event()
        self.reloads = 0  # reloads this watcher triggered (for tests and benchmarks)
        #: Why the last reload failed (None: it worked), for /healthz: a reload that keeps
        #: failing must not look like a healthy, idle watcher (issue 11).
        self.failure: str | None = None
        self.batches = 0
        #: Set once the OS watch is in place: from then on no change can be missed.
        self.active = asyncio.Event()

    def request(self, reason: str) -> None:
        """Ask for a reload through the same coalescing path (SIGHUP, `model-supervisor reload`)."""
        self._reasons.append(reason)
        self._dirty.set()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()  # wake the apply loop so it sees the stop

    async def run(self) -> None:
        watch = asyncio.create_task(self._watch(), name="conf.d watch")
        try:
            await self._apply_loop()
        finally:
            self._stop.set()
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _apply_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await self._dirty.wait()
            if self._stop.is_set():
                break
            first = loop.time()
            # Coalesce: wait until the directory has been quiet for SETTLE (bounded by MAX_DELAY).
            while True:
                self._dirty.clear()
                remaining = MAX_DELAY - (loop.time() - first)
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._dirty.wait(), min(SETTLE, remaining))
                except TimeoutError:
                    break
            reasons, self._reasons = self._reasons, []
            reason = ", ".join(sorted(set(reasons))) or "conf.d changed"
            self.reloads += 1
            try:
                await self._reload(reason)
            except Exception as exc:  # the next change or resync tries again
                log.exception("reload (%s) failed", reason)
                self.failure = f"{type(exc).__name__}: {exc}"
            else:
                self.failure = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        last_resync = loop.time()
        while not self._stop.is_set():
            identity = _identity(self.conf_dir)
            if identity is None:
                self.active.clear()
                await self._wait_for_dir()
                continue
            log.debug("watching %s", self.conf_dir)
            batches = awatch(
                self.conf_dir,
                watch_filter=DeclarationFilter(self.conf_dir),
                recursive=False,
                step=STEP_MS,
                rust_timeout=int(min(TICK_MS, self.resync_interval * 1000)),
                yield_on_timeout=True,
                stop_event=self._stop,
            )
            try:
                nxt = asyncio.ensure_future(batches.__anext__())
                # awatch sets up the OS watch synchronously in its first step: once that step
                # has run, no change can be missed. Read the directory again now, so a file
                # dropped since the initial read is not left for the periodic resync.
                await asyncio.sleep(0)
                self.active.set()
                self.request("watch started")
                while True:
                    try:
                        changes = await nxt
                    except StopAsyncIteration:
                        break
                    if changes:
                        self.batches += 1
                        self.request("conf.d changed")
                    if _identity(self.conf_dir) != identity:
                        log.warning("%s was removed or replaced; keeping what runs", self.conf_dir)
                        self.active.clear()
                        self.request("conf.d replaced")
                        break
                    if loop.time() - last_resync >= self.resync_interval:
                        last_resync = loop.time()
                        self.request("periodic resync")
                    nxt = asyncio.ensure_future(batches.__anext__())
            except (FileNotFoundError, RuntimeError, OSError) as exc:
                log.warning("watching %s failed (%s); retrying", self.conf_dir, exc)
                await asyncio.sleep(1.0)
            finally:
                if not nxt.done():
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                await batches.aclose()

    async def _wait_for_dir(self) -> None:
        log.error(
            "declaration directory %s is missing; keeping what runs, waiting for it to return", self.conf_dir
        )
        while not self._stop.is_set() and _identity(self.conf_dir) is None:
            try:
                await asyncio.wait_for(self._stop.wait(), DIR_POLL)
            except TimeoutError:
                pass
        if not self._stop.is_set():
            log.info("declaration directory %s is back", self.conf_dir)
            self.request("conf.d returned")
