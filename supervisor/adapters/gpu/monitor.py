"""A sampler thread that keeps the latest GpuSnapshot, so nobody else ever waits on NVML.

NVML calls block on driver ioctls (and `nvmlInit` can take seconds without persistence mode),
so the source is opened, sampled and closed in one daemon thread; readers get the last
published snapshot, an immutable object swapped in by reference.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from supervisor.adapters.gpu.model import GpuSnapshot
from supervisor.adapters.gpu.sources import GpuSource, GpuUnavailable

log = logging.getLogger(__name__)

Listener = Callable[[GpuSnapshot], None]


class GpuMonitorStopped(RuntimeError):
    """`wait_for_sample` cannot be satisfied: the sampler has ended."""


@dataclass(slots=True, eq=False)  # identity: two waiters on the same `after` are distinct
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GpuSnapshot]
    after: datetime | None


def _newer(snapshot: GpuSnapshot, after: datetime | None) -> bool:
    return snapshot.sampled_at is not None and (after is None or snapshot.sampled_at > after)


def _settle(future: asyncio.Future[GpuSnapshot], result: GpuSnapshot | BaseException) -> None:
    # Runs on the waiter's loop; the waiter may have timed out or been cancelled meanwhile.
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class GpuMonitor:
    """Samples `source` every `interval` seconds in a background thread.

    Single use: `start()` once, `stop()` once (stop is safe to repeat).
    """

    def __init__(self, source: GpuSource, interval: float = 1.0) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.source = source
        self.interval = interval
        self._simulated = source.name == "simulated"
        self._snapshot = GpuSnapshot(
            source=source.name,
            devices=(),
            reason="not sampled yet",
            sampled_at=None,
            sample_seconds=None,
            simulated=self._simulated,
        )
        self._lock = threading.Lock()  # guards _waiters, _listeners and _ended
        self._waiters: list[_Waiter] = []
        self._listeners: list[Listener] = []
        self._ended = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling; returns at once. A source that fails to open yields a "none"
        snapshot carrying the reason, never an exception."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("a GpuMonitor starts once (and not after stop())")
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the sampler and close the source (the thread closes it on its way out).

        Waits at most `timeout` seconds for a sample in progress; a driver call that hangs
        leaves the daemon thread to finish and close the source on its own.
        """
        self._stop.set()
        thread = self._thread
        if thread is None:
            self._end()
            return
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "GPU sampler still busy after %.1f s; it will close the source when done", timeout
                )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- readers -------------------------------------------------------------------------

    def snapshot(self) -> GpuSnapshot:
        """The latest snapshot. Never blocks, never calls the GPU library."""
        return self._snapshot

    async def wait_for_sample(
        self, after: datetime | None = None, timeout: float | None = None
    ) -> GpuSnapshot:
        """The first snapshot sampled after `after` (any sample at all when None).

        Raises TimeoutError after `timeout` seconds, GpuMonitorStopped if the sampler ended.
        """
        snapshot = self._snapshot
        if _newer(snapshot, after):
            return snapshot
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future(), after)
        with self._lock:
            # Checked again under the lock: a sample published since the first check would
            # otherwise never notify this waiter.
            snapshot = self._snapshot
            if _newer(snapshot, after):
                return snapshot
            if self._ended:
                raise GpuMonitorStopped("the GPU sampler has ended")
            self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter.future, timeout)
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def add_listener(self, callback: Listener) -> None:
        """Call `callback(snapshot)` after every sample.

        It runs **in the sampler thread**: keep it short, never block, and hand results to an
        event loop with `loop.call_soon_threadsafe`. Its exceptions are logged and ignored.
        """
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    # -- sampler thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            try:
                self.source.open()
            except Exception as exc:
                reason = (
                    exc.reason
                    if isinstance(exc, GpuUnavailable)
                    else f"opening the GPU source failed: {exc!r}"
                )
                if not isinstance(exc, GpuUnavailable):
                    log.exception("opening GPU source %r failed", self.source.name)
                else:
                    log.warning("GPU source %r unavailable: %s", self.source.name, reason)
                self._publish(
                    GpuSnapshot(
                        source="none",
                        devices=(),
                        reason=reason,
                        sampled_at=datetime.now(UTC),
                        sample_seconds=None,
                        simulated=False,
                    )
                )
                return
            try:
                self._loop()
            finally:
                try:
                    self.source.close()
                except Exception:
                    log.exception("closing GPU source %r failed", self.source.name)
        finally:
            self._end()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._sample_once()
            # Fixed rate, skipping missed ticks rather than bursting to catch up.
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.interval
            if self._stop.wait(next_at - now):
                return

    def _sample_once(self) -> None:
        # Stamped at the start: every value in the snapshot was read after `sampled_at`, so
        # `wait_for_sample(after=t)` never returns data read before t.
        sampled_at = datetime.now(UTC)
        cpu_start = time.thread_time()
        try:
            devices = self.source.sample()
        except Exception:
            # Keep the previous snapshot: its sampled_at shows its age. Log once per streak.
            if not self._failing:
                log.exception("GPU sample from %r failed; keeping the previous snapshot", self.source.name)
            self._failing = True
            return
        if self._failing:
            log.info("GPU sampling from %r works again", self.source.name)
            self._failing = False
        self._publish(
            GpuSnapshot(
                source=self.source.name,
                devices=devices,
                reason=self.source.reason,
                sampled_at=sampled_at,
                sample_seconds=time.thread_time() - cpu_start,
                simulated=self._simulated,
                driver_version=self.source.driver_version,
            )
        )

    def _publish(self, snapshot: GpuSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            ready = [w for w in self._waiters if _newer(snapshot, w.after)]
            self._waiters = [w for w in self._waiters if w not in ready]
            listeners = list(self._listeners)
        for waiter in ready:
            self._notify(waiter, snapshot)
        for callback in listeners:
            try:
                callback(snapshot)
            except Exception:
                log.exception("GPU snapshot listener %r failed", callback)

    def _end(self) -> None:
        with self._lock:
            self._ended = True
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._notify(waiter, GpuMonitorStopped("the GPU sampler has ended"))

    @staticmethod
    def _notify(waiter: _Waiter, result: GpuSnapshot | BaseException) -> None:
        try:
            waiter.loop.call_soon_threadsafe(_settle, waiter.future, result)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass
