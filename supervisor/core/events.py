"""Events the engine publishes (state transitions, configuration changes) and their bus.

Every event gets a monotonically increasing id and the bus keeps a bounded history, so a
client that reconnects with the last id it saw (SSE's Last-Event-ID) misses nothing that is
still in the history.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from supervisor.core.states import utcnow


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str  # "transition", "config", "gpu", ...
    data: dict[str, Any]
    at: str = field(default_factory=lambda: utcnow().isoformat())

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "at": self.at, **self.data}


class Subscription:
    """Events after `last_id` (replayed from the history), then live ones, in order."""

    def __init__(self, bus: EventBus, last_id: int | None, queue_size: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(queue_size)
        self._backlog = deque(bus.since(last_id)) if last_id is not None else deque()
        self._seen = self._backlog[-1].id if self._backlog else (last_id or 0)
        bus._subscribers.add(self._queue)

    async def get(self) -> Event:
        """The next event. Safe to cancel (e.g. by a timeout): nothing is lost."""
        if self._backlog:
            return self._backlog.popleft()
        while True:
            event = await self._queue.get()
            if event.id > self._seen:
                self._seen = event.id
                return event

    def close(self) -> None:
        self._bus._subscribers.discard(self._queue)


class EventBus:
    def __init__(self, history: int = 5000, queue_size: int = 10000) -> None:
        # Ids start from the clock (microseconds), so they keep growing across restarts of the
        # supervisor: a client that resumes with an id from before a restart gets everything.
        self._ids = itertools.count(int(time.time() * 1_000_000))
        self.history: deque[Event] = deque(maxlen=history)
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._queue_size = queue_size

    def publish(self, type: str, data: dict[str, Any], keep: bool = True) -> Event:
        """Send `data` to every subscriber. `keep=False` is for frequent, superseded events (GPU
        samples): they get an id but stay out of the history, which keeps its room for the
        transitions a reconnecting client must not miss."""
        event = Event(next(self._ids), type, data)
        if keep:
            self.history.append(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a stuck consumer loses its subscription, not our memory
                self._subscribers.discard(queue)
        return event

    @property
    def last_id(self) -> int:
        return self.history[-1].id if self.history else 0

    def since(self, last_id: int) -> list[Event]:
        return [e for e in self.history if e.id > last_id]

    def open(self, last_id: int | None = None) -> Subscription:
        return Subscription(self, last_id, self._queue_size)

    async def subscribe(self, last_id: int | None = None) -> AsyncIterator[Event]:
        """Yield events as they happen; with `last_id`, first replay what came after it."""
        sub = self.open(last_id)
        try:
            while True:
                yield await sub.get()
        finally:
            sub.close()
