"""GPU energy is sampled by a thread of its own: a reading at a batch boundary never calls the
driver on the event loop, and the samples only ever go up."""

import threading
import time

from server.engine.energy import SampledMeters
from tests.conftest import wait_until


class Counter:
    """An energy counter that records which threads read it."""

    def __init__(self) -> None:
        self.joules, self.readers = 0.0, set()

    def __call__(self) -> float:
        self.readers.add(threading.current_thread().name)
        self.joules += 1.5
        return self.joules


def test_readings_come_from_the_sampler_thread_and_never_go_back():
    counter = Counter()
    meters = SampledMeters({"cuda:0": counter}, interval=0.005)
    try:
        read = meters.meter("cuda:0")
        first = read()
        counter.readers.clear()
        assert wait_until(lambda: read() > first + 3, timeout=5)
        values = [read() for _ in range(1000)]
        assert values == sorted(values)
        assert counter.readers == {"energy-sampler"}, "the caller's thread never reads the driver"
    finally:
        meters.close()
    stopped = read()
    time.sleep(0.05)
    assert read() == stopped


def test_a_failing_counter_keeps_its_last_sample():
    calls = []

    def flaky() -> float:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return 10.0 * len(calls)

    meters = SampledMeters({"cuda:0": flaky}, interval=0.005)
    try:
        assert wait_until(lambda: len(calls) > 5, timeout=5)
        assert meters.meter("cuda:0")() == 20.0
    finally:
        meters.close()
