"""Calibration's decisions, driven by a stand-in clock: each run advances it by what a model of
the given threads, spinning and batch would take, so every choice follows from known timings."""

import pytest

from server.engine import calibration
from server.engine.calibration import Fixed, Stopwatch, calibrate, fallback


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeModel:
    """seconds(threads, spinning, batch) per run; records which sessions were opened."""

    def __init__(self, clock: FakeClock, seconds, handoff: float = 80e-6) -> None:
        self.clock, self.seconds, self.handoff_seconds = clock, seconds, handoff
        self.opened: list[tuple[int, bool]] = []
        self.batches: set[int] = set()

    def open_run(self, threads: int, spinning: bool):
        self.opened.append((threads, spinning))

        def run(batch: int) -> None:
            self.batches.add(batch)
            self.clock.advance(self.seconds(threads, spinning, batch))

        return run

    def handoff(self) -> None:
        self.clock.advance(self.handoff_seconds)


def choose(seconds, fixed=Fixed(), cores=2, instances=1, max_batch_size=32, handoff=80e-6, budget=2.0):
    clock = FakeClock()
    model = FakeModel(clock, seconds, handoff)
    choice = calibrate(model.open_run, model.handoff, fixed, cores, instances, max_batch_size, Stopwatch(clock, budget))
    return choice, model, clock


def tiny(threads, spinning, batch):
    """A small MLP: more threads only add synchronisation."""
    return (8 + batch * 0.5 + 3 * (threads - 1)) * 1e-6


def convnet(threads, spinning, batch):
    """Compute-bound: scales with threads, spinning saves a little per run."""
    return batch * 0.040 / threads * (0.8 if spinning else 1.0)


def test_a_tiny_model_gets_one_thread_no_spinning_and_runs_on_the_loop():
    choice, model, _ = choose(tiny, cores=8)
    assert choice.intra_op_threads == 1
    assert not choice.allow_spinning
    assert choice.inline_run_below_us == calibration.INLINE_STALL_LIMIT_US
    assert choice.handoff_us == pytest.approx(80)
    assert set(choice.measured) == {"intra_op_thread_count", "allow_spinning", "inline_run_below_us"}
    assert model.batches == {1, 8}, "batch 1 and a larger batch are timed"


def test_a_compute_bound_model_takes_every_core_and_its_own_thread():
    choice, model, _ = choose(convnet, cores=4, budget=100.0)
    assert choice.intra_op_threads == 4
    assert choice.inline_run_below_us == 0, "a 40 ms batch must not hold the event loop"
    assert [threads for threads, _ in model.opened[:3]] == [1, 2, 4]


def light(threads, spinning, batch):
    """Between tiny and compute-bound: a millisecond a row, helped by threads and by spinning."""
    return batch * 0.001 / threads * (0.8 if spinning else 1.0)


def test_a_heavy_model_spins_as_onnxruntime_does_by_default():
    choice, model, _ = choose(convnet, cores=2, budget=100.0)
    assert choice.intra_op_threads == 2 and choice.allow_spinning
    assert all(not spinning for _, spinning in model.opened), "no trial needed: its batches run for tens of ms"


def test_a_light_model_spins_only_where_a_core_is_spare_and_spinning_pays():
    crowded, _, _ = choose(light, fixed=Fixed(intra_op_threads=2), cores=2, budget=100.0)
    assert not crowded.allow_spinning, "2 threads on 2 cores leave none for the event loop"
    spare, model, _ = choose(light, fixed=Fixed(intra_op_threads=2), cores=8, budget=100.0)
    assert spare.allow_spinning, "20% faster with 6 cores spare: spinning pays"
    assert (2, True) in model.opened
    flat = lambda threads, spinning, batch: 0.001 * batch  # noqa: E731
    unhelped, _, _ = choose(flat, fixed=Fixed(intra_op_threads=2), cores=8, budget=100.0)
    assert not unhelped.allow_spinning, "no faster: not worth the CPU it burns"
    single, _, _ = choose(light, fixed=Fixed(intra_op_threads=1), cores=8, budget=100.0)
    assert not single.allow_spinning, "one thread has no pool to spin"


def test_another_thread_must_pay_for_its_core():
    barely = lambda threads, spinning, batch: 0.001 * batch * (0.9 if threads > 1 else 1.0)  # noqa: E731
    choice, _, _ = choose(barely, cores=2)
    assert choice.intra_op_threads == 1, "10% faster is below the 15% a second thread must buy"
    microseconds = lambda threads, spinning, batch: (10e-6 if threads > 1 else 14e-6) * batch  # noqa: E731
    choice, _, _ = choose(microseconds, cores=2)
    assert choice.intra_op_threads == 1, "30% faster, but by microseconds: not worth a core"


def test_inline_only_below_the_measured_handoff():
    choice, _, _ = choose(tiny, handoff=5e-6)
    assert choice.inline_run_below_us == 0, "the handoff is cheaper than the run: use the thread"


def test_configured_values_are_kept_and_not_measured():
    fixed = Fixed(intra_op_threads=3, allow_spinning=True, inline_run_below_us=0)
    choice, model, _ = choose(tiny, fixed=fixed, cores=8)
    assert (choice.intra_op_threads, choice.allow_spinning, choice.inline_run_below_us) == (3, True, 0)
    assert choice.measured == ()
    assert model.opened == [], "nothing left to measure: no trial session is opened"
    assert "configured" in choice.describe() and "measured" not in choice.describe()


def test_calibration_stays_within_its_budget():
    slow = lambda threads, spinning, batch: 0.5 * batch / threads  # noqa: E731
    choice, _, clock = choose(slow, cores=4, budget=2.0)
    # Past the budget each thread count still gets its untimed and one timed run: batch 1, 0.5 s / threads.
    assert clock.now < 2.0 + 2 * (0.5 + 0.25 + 0.125)
    assert choice.intra_op_threads in (1, 2, 4)


def test_a_model_that_cannot_run_keeps_the_previous_defaults():
    choice = fallback(Fixed(), cores=4, instances=2, reason="input 'ids' must not be zero")
    assert (choice.intra_op_threads, choice.allow_spinning, choice.inline_run_below_us) == (2, True, 0)
    assert "input 'ids' must not be zero" in choice.describe()
    assert choice.measured == ()


def test_thread_candidates_never_oversubscribe():
    assert calibration.thread_candidates(2, 1) == [1, 2]
    assert calibration.thread_candidates(6, 1) == [1, 2, 4, 6]
    assert calibration.thread_candidates(8, 4) == [1, 2]
    assert calibration.thread_candidates(2, 4) == [1]


def test_a_heavy_model_is_timed_at_batch_1_on_every_thread_count_even_past_the_budget():
    choice, model, _ = choose(convnet, cores=4, budget=0.01)
    assert [threads for threads, _ in model.opened] == [1, 2, 4]
    assert model.batches == {1}, "a 40 ms batch 1 says all a batch of 8 would"
    assert choice.intra_op_threads == 4


def test_threads_are_timed_with_the_configured_spinning():
    choice, model, _ = choose(convnet, fixed=Fixed(allow_spinning=True), cores=4, budget=100.0)
    assert [spinning for _, spinning in model.opened] == [True, True, True]
    assert choice.allow_spinning and choice.intra_op_threads == 4
