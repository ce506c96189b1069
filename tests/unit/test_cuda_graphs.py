"""CUDA graphs' run path, exercised on the CPU fallback with real onnxruntime (which binds CPU
OrtValues and ignores the gpu_graph_id run option): padded batch sizes, a fixed binding per size,
zeroed padding, only the real rows back, every run on the instance's own thread (warm-up and
calibration included), and batches billed by their real rows."""

import asyncio
import logging
import threading

import numpy as np
import onnxruntime as ort
import pytest

from server.engine.batching import Batcher
from server.engine.binding import GRAPH_CAPTURE_RUNS, GRAPH_ID, GRAPH_PRIME_RUNS, GRAPH_THREAD, padded_sizes
from server.engine.costs import CostLedger, DevicePrice
from server.engine.runtime import InstancePool
from server.errors import ConfigError
from server.models import warmup
from server.models.loading import complete_settings
from server.models.model_config import Accelerator, BatchingSettings, ModelSettings, SessionSettings
from server.observe.events import BatchExecuted, BatchStarted, EventBus
from tests import onnx_models

LABEL = "model 'm' version 1"
GRAPHS = (Accelerator("cuda", (("enable_cuda_graph", "1"),)),)


class WatchedSession:
    """A real onnxruntime session that notes the thread of every run it is asked for."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session, self.threads = session, []

    def run(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def open_pool(tmp_path):
    """open_pool(model, max_batch_size, ...) -> (pool, completed settings, signature), as loading.py
    builds them: the pool, the config completed from the graph, then the padded bindings."""
    pools = []

    def _open(model, max_batch_size=8, preferred=(), instances=1, watch=False, **session):
        path = tmp_path / "model.onnx"
        path.write_bytes(model.SerializeToString())
        settings = ModelSettings(
            name="m",
            source="(test)",
            max_batch_size=max_batch_size,
            batching=BatchingSettings(max_batch_size=max_batch_size, preferred_batch_sizes=preferred),
            session=SessionSettings(instance_count=instances, gpu_accelerators=GRAPHS, **session),
        )
        pool = InstancePool(path, settings.session, LABEL)
        pools.append(pool)
        if watch:  # before the bindings are built, so that they run through it
            pool._sessions = [WatchedSession(session) for session in pool._sessions]
        completed, signature = complete_settings(settings, pool, 8, "1")
        pool.bind_batch_sizes(completed.batching, signature)
        return pool, completed, signature

    yield _open
    for pool in pools:
        pool.close()


def own_thread(instance: int) -> str:
    return f"ort-{LABEL}-{instance}_"  # ThreadPoolExecutor names its one thread <prefix>_0


def reference(tmp_path, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_batch(pool: InstancePool, feeds: dict, names=("y",), instance: int = 0) -> dict:
    async def run():
        outcome = pool.run(feeds, list(names), instance)
        assert asyncio.iscoroutine(outcome), "a graph model's batch never runs on the event loop"
        return await outcome

    return asyncio.run(run())


def test_padded_sizes_are_the_preferred_ones_else_powers_of_two_always_with_the_maximum():
    assert padded_sizes(8) == (1, 2, 4, 8)
    assert padded_sizes(12) == (1, 2, 4, 8, 12)
    assert padded_sizes(1) == (1,)
    assert padded_sizes(8, (3, 6)) == (3, 6, 8)
    assert padded_sizes(8, (8,)) == (8,)
    assert padded_sizes(0) == () and padded_sizes(0, (4,)) == ()


def test_each_padded_size_has_its_own_binding_shapes_and_graph_id(open_pool):
    pool, _, _ = open_pool(onnx_models.add_one(), instances=2)
    assert pool.graph_shapes.sizes == (1, 2, 4, 8) and pool.io_binding
    bindings = pool.graph_bindings
    assert len(bindings) == 2 and bindings[0] is not bindings[1]
    addresses = set()
    for instance in bindings:
        assert list(instance.bindings) == [1, 2, 4, 8]
        for graph_id, (size, binding) in enumerate(instance.bindings.items()):
            assert binding.inputs["x"].shape() == [size, 4] and binding.outputs["y"].shape() == [size, 4]
            assert binding.run_options.get_run_config_entry(GRAPH_ID) == str(graph_id)
            addresses |= {binding.inputs["x"].data_ptr(), binding.outputs["y"].data_ptr()}
    assert len(addresses) == 2 * 4 * 2, "every size of every instance has buffers of its own"


def test_a_batch_of_3_runs_on_the_size_4_binding_zero_padded_and_returns_exactly_its_rows(open_pool, tmp_path):
    pool, _, _ = open_pool(onnx_models.add_one())
    (bindings,) = pool.graph_bindings
    full = np.full((4, 4), 7, np.float32)  # a batch of 4 leaves its rows in the size-4 buffer
    np.testing.assert_array_equal(run_batch(pool, {"x": full})["y"], full + 1)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    answer = run_batch(pool, {"x": x})["y"]
    assert answer.shape == (3, 4)
    np.testing.assert_array_equal(answer, reference(tmp_path, {"x": x})[0])
    assert bindings.runs == {4: 2}
    padded = bindings.bindings[4].inputs["x"].numpy()
    np.testing.assert_array_equal(padded[:3], x)
    np.testing.assert_array_equal(padded[3], np.zeros(4, np.float32))  # zeros, not the last batch's 7s
    # a padded batch after a longer padded one on the same size: its padding is zeros again
    run_batch(pool, {"x": np.full((7, 4), 7, np.float32)})
    five = np.arange(20, dtype=np.float32).reshape(5, 4)
    np.testing.assert_array_equal(run_batch(pool, {"x": five})["y"], five + 1)
    assert bindings.runs == {4: 2, 8: 2}
    np.testing.assert_array_equal(bindings.bindings[8].inputs["x"].numpy()[5:], np.zeros((3, 4), np.float32))
    assert set(bindings.threads) == {own_thread(0) + "0"}


@pytest.mark.parametrize("preferred", [(), (3, 6)])
def test_every_batch_size_gets_session_runs_answer_for_its_own_rows(open_pool, tmp_path, preferred):
    pool, _, _ = open_pool(onnx_models.two_in_two_out(), preferred=preferred)
    assert pool.graph_shapes.sizes == padded_sizes(8, preferred)
    generator = np.random.default_rng(0)
    for rows in range(1, 9):
        feeds = {
            "a": generator.standard_normal((rows, 2), np.float32),
            "b": generator.standard_normal((rows, 2), np.float32),
            "count": np.arange(rows, dtype=np.int64).reshape(rows, 1),
        }
        answer = run_batch(pool, feeds, ("sum", "difference", "count_out"))
        for name, expected in zip(("sum", "difference", "count_out"), reference(tmp_path, feeds)):
            assert answer[name].shape[0] == rows
            np.testing.assert_array_equal(answer[name], expected)
    (bindings,) = pool.graph_bindings
    assert set(bindings.runs) == set(pool.graph_shapes.sizes)  # every size served some batch


def test_graph_runs_refuse_any_thread_but_their_instances(open_pool):
    pool, _, _ = open_pool(onnx_models.add_one())
    (bindings,) = pool.graph_bindings
    with pytest.raises(RuntimeError, match="replay on the instance's own thread; called on MainThread"):
        bindings(pool._sessions[0], ["y"], {"x": np.zeros((2, 4), np.float32)})
    assert not bindings.runs


def test_warm_up_and_calibration_run_only_on_each_instances_thread(open_pool, caplog):
    pool, completed, signature = open_pool(onnx_models.add_one(), instances=2, watch=True)
    with caplog.at_level(logging.INFO, logger="server.models.warmup"):
        choice = pool.calibrate(signature.inputs, completed.batching.max_batch_size)
        warmup.warm_up(pool, completed, signature, pool.model_path.parent)
    for instance, (session, bindings) in enumerate(zip(pool._sessions, pool.graph_bindings)):
        assert session.threads and all(name.startswith(own_thread(instance)) for name in session.threads)
        # every size captured (3 runs each), then the automatic warm-up's batch of 1
        assert dict(bindings.runs) == {
            1: GRAPH_CAPTURE_RUNS + 1,
            2: GRAPH_CAPTURE_RUNS,
            4: GRAPH_CAPTURE_RUNS,
            8: GRAPH_CAPTURE_RUNS,
        }
        # each size first ran without a graph id, so its capture is not its first run (GRAPH_PRIME_RUNS)
        assert dict(bindings.primed) == {
            1: GRAPH_PRIME_RUNS,
            2: GRAPH_PRIME_RUNS,
            4: GRAPH_PRIME_RUNS,
            8: GRAPH_PRIME_RUNS,
        }
        assert len(session.threads) == sum(bindings.runs.values()) + sum(
            bindings.primed.values()
        )  # nothing ran around them
    assert "4 padded batch size(s) [1, 2, 4, 8] warmed on each CPU instance, no CUDA graph captured" in caplog.text
    assert choice.inline_run_below_us == 0 and choice.sources["inline_run_below_us"] == GRAPH_THREAD
    # a trial run of calibration, asked for from this thread, runs on instance 0's thread
    before = sum(pool.graph_bindings[0].runs.values())
    pool._trial_runner(signature.inputs)(choice.intra_op_threads, choice.allow_spinning)(3)
    assert sum(pool.graph_bindings[0].runs.values()) == before + 1
    assert all(name.startswith(own_thread(0)) for name in pool._sessions[0].threads)
    with pytest.raises(RuntimeError, match="only the instances' own sessions run"):
        pool._trial_runner(signature.inputs)(choice.intra_op_threads + 1, choice.allow_spinning)


def test_a_graph_model_never_runs_on_the_event_loop_even_if_configured_to(open_pool):
    pool, completed, signature = open_pool(onnx_models.add_one(), inline_run_below_us=500)
    fixed = pool.fixed()
    assert fixed.inline_run_below_us == 0 and fixed.source("inline_run_below_us") == GRAPH_THREAD
    pool.calibrate(signature.inputs, completed.batching.max_batch_size)
    assert pool.choice.inline_run_below_us == 0
    for _ in range(5):  # short batches: any other model would move onto the loop
        run_batch(pool, {"x": np.zeros((1, 4), np.float32)})


def test_a_model_that_does_not_batch_keeps_one_binding_on_graph_0(open_pool, tmp_path):
    pool, _, signature = open_pool(onnx_models.add_one(shape=(2, 4)), max_batch_size=0)
    (bindings,) = pool.graph_bindings
    assert pool.graph_shapes.sizes == () and list(bindings.bindings) == [0]
    assert bindings.bindings[0].run_options.get_run_config_entry(GRAPH_ID) == "0"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(run_batch(pool, {"x": x})["y"], x + 1)
    assert pool.capture_graphs() == () and bindings.runs[0] == 1 + GRAPH_CAPTURE_RUNS


def test_what_cannot_be_graphed_is_refused_at_load(open_pool):
    with pytest.raises(ConfigError, match=r"replays one fixed launch per batch size, .*tensor 'input' has dims \[-1\]"):
        open_pool(onnx_models.identity("FP32", shape=("batch", "width")))
    with pytest.raises(ConfigError, match=r"tensor 'x' has dims \[-1, 4\] and max_batch_size is 0"):
        open_pool(onnx_models.add_one(), max_batch_size=0)
    with pytest.raises(ConfigError, match=r"needs IO binding at fixed addresses; parameters\['io_binding'\] is 0"):
        open_pool(onnx_models.add_one(), io_binding=False)
    with pytest.raises(
        ConfigError, match=r"needs IO binding, and onnxruntime cannot bind string tensors \(input, output\)"
    ):
        open_pool(onnx_models.identity("BYTES"))


def test_batches_are_billed_and_counted_by_their_real_rows(open_pool):
    pool, completed, _ = open_pool(onnx_models.add_one())
    bus, events = EventBus(), []
    ledger = CostLedger({"cpu": DevicePrice(36.0, "flag")})
    bus.subscribe(ledger.observe)
    bus.subscribe(events.append, BatchStarted, BatchExecuted)
    a, b = np.full((1, 4), 10, np.float32), np.full((2, 4), 20, np.float32)

    async def serve():
        batcher = Batcher(pool.run, completed.batching, pool.instance_count, "m", "1", bus, pool.devices)
        batcher.start()
        first = batcher.enqueue({"x": a}, 1, ("y",), tenant="team-a")
        second = batcher.enqueue({"x": b}, 2, ("y",), tenant="team-b")  # the same loop turn: one batch
        return await asyncio.gather(batcher.collect(first), batcher.collect(second))

    answer_a, answer_b = asyncio.run(serve())
    np.testing.assert_array_equal(answer_a.outputs["y"], a + 1)
    np.testing.assert_array_equal(answer_b.outputs["y"], b + 1)
    assert answer_a.batch_id == answer_b.batch_id and answer_a.batch_rows == answer_b.batch_rows == 3
    assert pool.graph_bindings[0].runs == {4: 1}  # it ran padded to 4 rows
    started, executed = events
    assert dict(started.tenants) == {"team-a": 1, "team-b": 2} and executed.rows == 3
    share_a, share_b = ledger.settle(answer_a.batch_id, 1), ledger.settle(answer_b.batch_id, 2)
    (model,) = ledger.snapshot().models
    assert share_a.dollars > 0 and share_b.dollars == pytest.approx(2 * share_a.dollars, rel=1e-9)
    assert share_a.dollars + share_b.dollars == pytest.approx(model.dollars, rel=1e-9)
    tenants = {account.tenant: account.dollars for account in ledger.snapshot().tenants}
    assert tenants["team-b"] == pytest.approx(2 * tenants["team-a"], rel=1e-9)
