"""The Batcher alone, with a fake execute gated by asyncio.Events."""

import asyncio

import numpy as np
import pytest

from server.engine.batching import Batcher
from server.errors import DeadlineExceeded, ExecutionFailed, Overloaded
from server.models.model_config import BatchingSettings, QueuePolicy
from server.observe.events import BatchExecuted, EventBus


class GatedModel:
    """execute() records each batch and waits for the test to open the gate."""

    def __init__(self, gated: bool = True) -> None:
        self.batches: list[dict] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.started = asyncio.Event()

    async def execute(self, feeds, output_names, instance):
        self.batches.append(feeds)
        self.started.set()
        await self.gate.wait()
        return {"y": feeds["x"] * 10}


def make_batcher(model: GatedModel, events=None, instances=1, **settings) -> Batcher:
    bus = EventBus()
    if events is not None:
        bus.subscribe(events.append)
    batcher = Batcher(model.execute, BatchingSettings(**settings), instances, "m", "1", bus, ("cpu",) * instances)
    batcher.start()
    return batcher


def rows(value: float, count: int, width: int = 2) -> dict:
    return {"x": np.full((count, width), value, dtype=np.float32)}


async def submit(batcher, value, count, width=2, **options):
    answer = await batcher.submit(rows(value, count, width), count, ("y",), **options)
    return answer.outputs


async def busy_batcher(events=None, **settings) -> tuple[GatedModel, Batcher, asyncio.Task]:
    """A gated model whose only instance is busy with one 1-row request (value 0): what is
    submitted next waits in the queue until the test opens the gate."""
    model = GatedModel()
    batcher = make_batcher(model, events, **settings)
    blocker = asyncio.create_task(submit(batcher, 0, 1))
    await model.started.wait()
    return model, batcher, blocker


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_form_one_batch_and_get_their_own_rows():
    async def body():
        events = []
        model, batcher, first = await busy_batcher(events, max_batch_size=16, max_queue_delay_us=0)
        rest = [asyncio.create_task(submit(batcher, value, value)) for value in (1, 2, 3)]
        await asyncio.sleep(0.01)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return model, events, results

    model, events, results = run(body())
    assert [len(batch["x"]) for batch in model.batches] == [1, 6]
    for value, result in zip((0, 1, 2, 3), results):
        np.testing.assert_array_equal(result["y"], np.full((max(value, 1), 2), value * 10, np.float32))
    assert [(e.rows, e.requests) for e in events if isinstance(e, BatchExecuted)] == [(1, 1), (6, 3)]


def test_shapes_that_differ_go_to_different_batches():
    async def body():
        model = GatedModel(gated=False)
        batcher = make_batcher(model, max_batch_size=16, max_queue_delay_us=50_000)
        results = await asyncio.gather(submit(batcher, 1, 1, width=2), submit(batcher, 2, 1, width=3))
        await batcher.close()
        return model, results

    model, results = run(body())
    assert sorted(batch["x"].shape for batch in model.batches) == [(1, 2), (1, 3)]
    assert results[1]["y"].shape == (1, 3)


def test_preferred_size_leaves_before_the_delay():
    async def body():
        model = GatedModel(gated=False)
        batcher = make_batcher(model, max_batch_size=8, max_queue_delay_us=10_000_000, preferred_batch_sizes=(4,))
        await asyncio.wait_for(asyncio.gather(*(submit(batcher, v, 1) for v in range(4))), timeout=5)
        await batcher.close()
        return model

    assert [len(b["x"]) for b in run(body()).batches] == [4]


def test_max_batch_size_is_never_exceeded():
    async def body():
        model, batcher, blocker = await busy_batcher(max_batch_size=4)
        waiting = [asyncio.create_task(submit(batcher, v, 3)) for v in (1, 2, 3)]
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(blocker, *waiting)
        await batcher.close()
        return model

    assert [len(b["x"]) for b in run(body()).batches] == [1, 3, 3, 3]


def test_full_queue_raises_overloaded_at_once():
    async def body():
        model, batcher, running = await busy_batcher(max_batch_size=4, queue_policy=QueuePolicy(max_queue_size=1))
        queued = asyncio.create_task(submit(batcher, 1, 1))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await submit(batcher, 2, 1)
        model.gate.set()
        await asyncio.gather(running, queued)
        await batcher.close()

    run(body())


def test_timeout_in_queue_never_executes():
    async def body():
        model, batcher, running = await busy_batcher(
            max_batch_size=4, queue_policy=QueuePolicy(default_timeout_us=20_000)
        )
        with pytest.raises(DeadlineExceeded):
            await submit(batcher, 5, 1)
        assert batcher.depth == 0
        model.gate.set()
        await running
        await batcher.close()
        return model

    model = run(body())
    assert all(5 not in batch["x"] for batch in model.batches)


def test_cancelled_caller_leaves_queue_and_running_rows_are_discarded():
    async def body():
        model, batcher, running = await busy_batcher(max_batch_size=4)
        cancelled = asyncio.create_task(submit(batcher, 9, 1))
        kept = asyncio.create_task(submit(batcher, 1, 1))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert batcher.depth == 1
        running.cancel()  # already executing: its rows are computed, then discarded
        model.gate.set()
        result = await kept
        await batcher.close()
        return model, result, cancelled, running

    model, result, cancelled, running = run(body())
    assert cancelled.cancelled() and running.cancelled()
    assert all(9 not in batch["x"] for batch in model.batches)
    np.testing.assert_array_equal(result["y"], np.full((1, 2), 10, np.float32))


def test_execution_failure_reaches_every_caller_of_the_batch_once():
    async def failing(feeds, output_names, instance):
        raise RuntimeError("boom")

    async def body():
        batcher = Batcher(failing, BatchingSettings(max_batch_size=4), 1, "m", "1", EventBus(), ("cpu",))
        batcher.start()
        results = await asyncio.gather(submit(batcher, 1, 1), submit(batcher, 2, 1), return_exceptions=True)
        await batcher.close()
        return results

    assert all(isinstance(r, ExecutionFailed) for r in run(body()))


def test_two_instances_run_two_batches_at_once():
    async def body():
        model = GatedModel()
        batcher = make_batcher(model, instances=2, max_batch_size=1)
        tasks = [asyncio.create_task(submit(batcher, v, 1)) for v in (1, 2)]
        for _ in range(100):
            if len(model.batches) == 2:
                break
            await asyncio.sleep(0.001)
        in_flight = len(model.batches)
        model.gate.set()
        await asyncio.gather(*tasks)
        await batcher.close()
        return in_flight

    assert run(body()) == 2


def test_close_drains_what_is_queued():
    async def body():
        model = GatedModel(gated=False)
        batcher = make_batcher(model, max_batch_size=2, max_queue_delay_us=10_000_000)
        pending = asyncio.create_task(submit(batcher, 3, 1))
        await asyncio.sleep(0.01)
        await batcher.close()
        return await pending

    np.testing.assert_array_equal(run(body())["y"], np.full((1, 2), 30, np.float32))


def test_overlapping_callers_wait_for_a_fuller_batch_and_a_lone_caller_never_waits():
    adaptive = 0.4  # seconds; long enough that the test can tell a wait from none

    async def body():
        loop = asyncio.get_running_loop()
        model = GatedModel(gated=False)
        batcher = make_batcher(model, max_batch_size=8, adaptive_delay_us=int(adaptive * 1e6))
        await asyncio.gather(*(submit(batcher, v, 1) for v in (1, 2, 3)))  # 3 callers at once: all in, none waits
        began = loop.time()
        second = [asyncio.create_task(submit(batcher, v, 1)) for v in (4, 5)]  # fewer than came at once
        await asyncio.sleep(adaptive / 4)
        await asyncio.gather(*second, submit(batcher, 6, 1))  # the third caller completes the batch
        waited = loop.time() - began
        await asyncio.sleep(2.5 * adaptive)  # the overlap is forgotten
        began = loop.time()
        await submit(batcher, 7, 1)
        alone = loop.time() - began
        await batcher.close()
        return model, waited, alone

    model, waited, alone = run(body())
    assert [len(batch["x"]) for batch in model.batches] == [3, 3, 1]
    assert adaptive / 4 <= waited < adaptive * 0.9, "it waited for the late caller, and left once it came"
    assert alone < adaptive / 4


def test_a_configured_queue_delay_replaces_the_adaptive_one():
    async def body():
        model = GatedModel(gated=False)
        batcher = make_batcher(model, max_batch_size=8, max_queue_delay_us=1, adaptive_delay_us=10_000_000)
        await asyncio.gather(*(submit(batcher, v, 1) for v in (1, 2, 3)))  # 3 callers came at once
        await asyncio.wait_for(asyncio.gather(*(submit(batcher, v, 1) for v in (4, 5))), timeout=5)
        await batcher.close()

    run(body())


def test_a_request_pinned_to_an_instance_runs_only_there_and_others_take_any_free_one():
    """A direct sequence's requests hold one instance's slot: they wait for that instance even while
    another is free, which meanwhile runs what anyone may run."""

    async def body():
        model = GatedModel()
        ran: list[tuple[int, float]] = []

        async def execute(feeds, names, instance):
            ran.append((instance, float(feeds["x"][0, 0])))
            return await model.execute(feeds, names, instance)

        batcher = Batcher(execute, BatchingSettings(max_batch_size=4), 2, "m", "1", EventBus(), ("cpu", "cpu"))
        batcher.start()
        busy = asyncio.create_task(submit(batcher, 1, 1))  # instance 0 takes it and waits at the gate
        await model.started.wait()
        pinned = batcher.prepare(rows(2, 1), 1, ("y",))
        pinned.instance = 0
        batcher.admit(pinned)
        free = asyncio.create_task(submit(batcher, 3, 1))  # instance 1 is free: it runs this at once
        await asyncio.sleep(0.01)
        before_gate = list(ran)
        model.gate.set()
        await asyncio.gather(busy, pinned.future, free)
        await batcher.close()
        return before_gate, ran

    before_gate, ran = run(body())
    assert before_gate == [(0, 1.0), (1, 3.0)]  # the pinned request did not go to the free instance 1
    assert (0, 2.0) in ran and (1, 2.0) not in ran


def test_a_full_batch_is_shared_between_tenants_so_a_lone_request_does_not_wait_behind_a_flood():
    """Twenty requests of tenant A wait, then one of B: the next batch of 4 rows takes B's too, where
    arrival order alone would have made it wait four batches."""

    async def body():
        model = GatedModel()
        batcher = make_batcher(model, max_batch_size=4, max_queue_delay_us=0)
        blocker = asyncio.create_task(submit(batcher, 0, 1))
        await model.started.wait()
        flood = [asyncio.create_task(submit(batcher, 1, 1, tenant="a")) for _ in range(20)]
        lone = asyncio.create_task(submit(batcher, 2, 1, tenant="b"))
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(blocker, *flood, lone)
        await batcher.close()
        return [sorted(float(v) for v in batch["x"][:, 0]) for batch in model.batches]

    batches = run(body())
    assert batches[1] == [1.0, 1.0, 1.0, 2.0]  # B's request rides in the first batch after the blocker
    assert sum(len(batch) for batch in batches) == 22 and all(len(batch) <= 4 for batch in batches)


def test_shares_follow_the_weights_and_what_a_tenant_leaves_goes_to_the_others():
    from server.engine.fair_share import allocate

    assert allocate({"a": 100, "b": 100}, {"a": 1.0, "b": 3.0}, 32) == {"a": 8, "b": 24}
    assert allocate({"a": 100, "b": 2}, {"a": 1.0, "b": 1.0}, 32) == {"a": 30, "b": 2}
    assert allocate({"a": 5, "b": 6}, {"a": 1.0, "b": 1.0}, 32) == {"a": 5, "b": 6}


def test_a_request_prepared_by_one_batcher_and_queued_in_another_times_out_from_there():
    """A sequence's request can be prepared by a version's batcher and queued in its reload's: its
    timeout (or its caller leaving) takes it out of the queue it is in."""

    async def body():
        model = GatedModel()
        old, new = make_batcher(model, max_batch_size=4), make_batcher(model, max_batch_size=4)
        busy = asyncio.create_task(submit(new, 0, 1))  # the new one's only instance is busy
        await model.started.wait()
        item = old.prepare(rows(1, 1), 1, ("y",), timeout_us=20_000)
        new.admit(item)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(asyncio.shield(item.future), 2)
        depth = new.depth
        model.gate.set()
        await busy
        await new.close()
        await old.close()
        return depth

    assert run(body()) == 0
