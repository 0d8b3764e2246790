"""Events the engine publishes (state transitions, configuration changes) and their bus.

Every event gets a monotonically increasing id and the bus keeps a bounded history, so a
client that reconnects with the last id it saw (SSE's Last-Event-ID) misses nothing that is
still in the history.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .states import utcnow


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str  # "transition", "config", "gpu", ...
    data: dict[str, Any]
    at: str = field(default_factory=lambda: utcnow().isoformat())

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "at": self.at, **self.data}


class EventBus:
    def __init__(self, history: int = 5000, queue_size: int = 10000) -> None:
        self._ids = itertools.count(1)
        self.history: deque[Event] = deque(maxlen=history)
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._queue_size = queue_size

    def publish(self, type: str, data: dict[str, Any]) -> Event:
        event = Event(next(self._ids), type, data)
        self.history.append(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a stuck consumer loses its subscription, not our memory
                self._subscribers.discard(queue)
        return event

    def since(self, last_id: int) -> list[Event]:
        return [e for e in self.history if e.id > last_id]

    async def subscribe(self, last_id: int | None = None) -> AsyncIterator[Event]:
        """Yield events as they happen; with `last_id`, first replay what came after it."""
        queue: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        try:
            seen = 0
            if last_id is not None:
                for event in self.since(last_id):
                    seen = event.id
                    yield event
            while True:
                event = await queue.get()
                if event.id > seen:
                    yield event
        finally:
            self._subscribers.discard(queue)
