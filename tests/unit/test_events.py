"""The event bus: immediate observers see an event as it is published; deferred ones at the end of
the loop turn, in order, after what the publisher scheduled first; a failing observer is contained."""

import asyncio

from server.observe.events import EventBus, RequestFinished, RequestStarted


def started(n: int) -> RequestStarted:
    return RequestStarted("m", str(n))


def test_deferred_observers_get_events_after_the_turn_in_order():
    async def body():
        bus, seen = EventBus(), []
        bus.subscribe(lambda e: seen.append(("now", e.version)), RequestStarted)
        bus.subscribe(lambda e: seen.append(("later", e.version)), deferred=True)
        answered = asyncio.get_running_loop().create_future()
        answered.add_done_callback(lambda _: seen.append(("caller", "resumed")))
        answered.set_result(None)  # the data path answers a caller, then publishes
        bus.publish(started(1))
        bus.publish(RequestFinished("m", "2", "ok", 1, 0.001))
        during = list(seen)
        await asyncio.sleep(0)
        return during, seen

    during, seen = asyncio.run(body())
    assert during == [("now", "1")]
    assert seen == [("now", "1"), ("caller", "resumed"), ("later", "1"), ("later", "2")]


def test_without_a_running_loop_deferred_observers_get_events_at_once():
    bus, seen = EventBus(), []
    bus.subscribe(seen.append, deferred=True)
    bus.publish(started(1))
    assert [e.version for e in seen] == ["1"]


def test_a_failing_observer_does_not_stop_the_others(caplog):
    async def body():
        bus, seen = EventBus(), []
        bus.subscribe(lambda e: 1 / 0, deferred=True)
        bus.subscribe(seen.append, deferred=True)
        bus.publish(started(1))
        await asyncio.sleep(0)
        return seen

    assert [e.version for e in asyncio.run(body())] == ["1"]
    assert "ZeroDivisionError" in caplog.text
