"""The sequence batcher alone, over a real Batcher whose execute adds each row's input to its state:
order, slots, cancellation, END followed by more requests, and a version closing."""

import asyncio

import numpy as np
import pytest

from server.engine.batching import Batcher
from server.engine.sequences import Sequences
from server.errors import InvalidInput, ShuttingDown
from server.models.model_config import BatchingSettings
from server.models.sequence_config import DIRECT, OLDEST, START, ControlInput, SequenceSettings, StateSpec
from server.observe.events import EventBus, SequenceChanged

STATE = StateSpec("STATE_IN", "STATE_OUT", "INT32", (1,))


class Accumulator:
    """execute(): OUTPUT = STATE_OUT = INPUT + STATE_IN, row by row; records which instance ran what."""

    def __init__(self) -> None:
        self.ran: list[tuple[int, list[int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def execute(self, feeds, names, instance):
        await self.gate.wait()
        self.ran.append((instance, feeds["INPUT"].ravel().tolist()))
        total = feeds["INPUT"] + feeds["STATE_IN"]
        return {"OUTPUT": total, "STATE_OUT": total.copy()}


def sequences(
    strategy=OLDEST, instances=1, max_batch_size=4, candidates=2, events=None
) -> tuple[Sequences, Accumulator]:
    model, bus = Accumulator(), EventBus()
    if events is not None:
        bus.subscribe(events.append, SequenceChanged)
    batcher = Batcher(
        model.execute, BatchingSettings(max_batch_size=max_batch_size), instances, "m", "1", bus, ("cpu",) * instances
    )
    batcher.start()
    settings = SequenceSettings(
        where="config.pbtxt",
        strategy=strategy,
        max_candidate_sequences=candidates,
        controls=(ControlInput("START", START, "INT32", 0, 1),),
        states=(STATE,),
    )
    return Sequences(settings, batcher, {"STATE_IN": np.zeros((1, 1), np.int32)}, bus), model


def send(table: Sequences, key, value: int, start=False, end=False):
    feeds = {"INPUT": np.full((1, 1), value, np.int32)}
    parameters = {"sequence_id": key, "sequence_start": start, "sequence_end": end}
    return table.enqueue(feeds, 1, ("OUTPUT",), parameters)


async def answers(*items) -> list:
    done = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
    return [d if isinstance(d, BaseException) else int(d.outputs["OUTPUT"][0, 0]) for d in done]


def test_a_sequences_requests_run_in_order_and_its_state_is_not_returned():
    async def body():
        table, _ = sequences()
        items = [send(table, 1, v, start=i == 0, end=i == 3) for i, v in enumerate((5, 1, 2, 3))]
        results = await answers(*items)
        return results, set((await items[0].future).outputs)

    results, names = asyncio.run(body())
    assert results == [5, 6, 8, 11]
    assert names == {"OUTPUT"}


def test_a_request_cancelled_before_it_ran_leaves_the_state_and_the_order_alone():
    async def body():
        table, model = sequences()
        first = send(table, 1, 10, start=True)
        await first.future
        model.gate.clear()  # the next request waits in the batch, the one after it in the sequence
        second, third = send(table, 1, 100), send(table, 1, 1, end=True)
        await asyncio.sleep(0)
        table.batcher.cancel(third)  # never reached the batcher
        model.gate.set()
        fourth = send(table, 1, 2, end=True)
        return await answers(second, fourth), third.future.cancelled()

    results, cancelled = asyncio.run(body())
    assert results == [110, 112] and cancelled


def test_after_an_end_a_start_begins_anew_and_anything_else_is_refused_saying_why():
    async def body():
        table, model = sequences()
        model.gate.clear()
        items = [send(table, 7, 4, start=True, end=True), send(table, 7, 1), send(table, 7, 9, start=True, end=True)]
        model.gate.set()
        results = await answers(*items)
        with pytest.raises(InvalidInput, match="its END request ran"):
            send(table, 7, 1)
        return results

    first, refused, restarted = asyncio.run(body())
    assert first == 4 and restarted == 9
    assert isinstance(refused, InvalidInput) and "must specify the START flag" in str(refused)


def test_beyond_the_candidates_a_sequence_waits_for_a_slot():
    async def body():
        events: list = []
        table, _ = sequences(candidates=1, events=events)
        a = send(table, "a", 1, start=True)
        b = send(table, "b", 2, start=True, end=True)  # waits: one candidate, "a" holds it
        await a.future
        await asyncio.sleep(0.01)
        waited = not b.future.done()
        c = send(table, "a", 3, end=True)
        return waited, await answers(b, c), [(e.change, e.live, e.waiting) for e in events]

    waited, results, changes = asyncio.run(body())
    assert waited and results == [2, 4]
    assert changes[:2] == [("started", 1, 0), ("waiting", 1, 1)]
    assert ("ended", 0, 0) in changes


def test_direct_binds_each_sequence_to_one_instance_with_max_batch_size_slots_each():
    async def body():
        table, model = sequences(strategy=DIRECT, instances=2, max_batch_size=2)
        assert table.capacity == 4
        keys = [10, 11, 12, 13]
        for step in range(3):
            await answers(*(send(table, key, key, start=step == 0, end=step == 2) for key in keys))
        return model.ran

    ran = asyncio.run(body())
    by_instance: dict[int, set] = {}
    for instance, values in ran:
        by_instance.setdefault(instance, set()).update(values)
    assert by_instance[0].isdisjoint(by_instance[1])  # no sequence ran on both instances
    assert sorted(by_instance[0] | by_instance[1]) == [10, 11, 12, 13] and len(by_instance[0]) == 2


def test_a_closing_version_ends_its_sequences_and_fails_what_waits():
    async def body():
        events: list = []
        table, model = sequences(candidates=1, events=events)
        await send(table, "live", 1, start=True).future
        waiting = send(table, "next", 1, start=True)
        table.close("the model was unloaded")
        with pytest.raises(ShuttingDown, match="the model was unloaded"):
            send(table, "live", 1)
        return (await answers(waiting))[0], [e.change for e in events]

    waiting, changes = asyncio.run(body())
    assert isinstance(waiting, ShuttingDown)
    assert changes.count("aborted") == 2
