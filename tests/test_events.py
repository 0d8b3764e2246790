"""The event bus: ids, replay, and resuming across a restart of the supervisor."""

from __future__ import annotations

import asyncio

from supervisor.core.events import EventBus


async def test_replay_after_last_id_then_live() -> None:
    bus = EventBus()
    first = bus.publish("transition", {"n": 1})
    bus.publish("transition", {"n": 2})
    sub = bus.open(first.id)
    assert (await sub.get()).data == {"n": 2}
    bus.publish("transition", {"n": 3})
    assert (await asyncio.wait_for(sub.get(), 1)).data == {"n": 3}
    sub.close()


async def test_ids_from_before_a_restart_replay_everything_new() -> None:
    old = EventBus()
    last_seen = old.publish("transition", {"life": 1}).id
    await asyncio.sleep(0.001)
    new = EventBus()  # the supervisor restarted
    new.publish("transition", {"life": 2, "n": 1})
    new.publish("transition", {"life": 2, "n": 2})
    sub = new.open(last_seen)
    got = [(await sub.get()).data for _ in range(2)]
    assert got == [{"life": 2, "n": 1}, {"life": 2, "n": 2}]


async def test_volatile_events_are_delivered_but_not_replayed() -> None:
    bus = EventBus()
    sub = bus.open()
    bus.publish("gpu", {"x": 1}, keep=False)
    assert (await sub.get()).type == "gpu"
    assert list(bus.history) == []


async def test_a_stuck_subscriber_is_dropped_not_buffered_forever() -> None:
    bus = EventBus(queue_size=2)
    bus.open()
    for n in range(5):
        bus.publish("transition", {"n": n})
    assert bus._subscribers == set()
