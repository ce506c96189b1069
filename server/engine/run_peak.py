"""Where an instance's next batch runs: on the event loop while the batches measured lately ran
shorter than a handoff to the instance's thread and this one is no bigger than a batch measured
so, else in the thread. Whatever was measured, a batch of more than a few strings never runs on
the loop: onnxruntime converts each one inside session.run, work its byte count does not show."""

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Per batch: a preempted run (hundreds of us on a busy VM) is forgotten within about 20 batches.
RUN_PEAK_DECAY = 0.9
SWITCH_LOG_SECONDS = 60.0
# BYTES elements, all inputs together, a batch may hold and still run on the loop: each is a Python
# str onnxruntime copies into a std::string, and calibration timed empty ones.
INLINE_STRINGS = 16


def batch_bytes(feeds: dict[str, np.ndarray]) -> int | None:
    """A batch's input bytes, strings counted by their length; None past INLINE_STRINGS strings."""
    size = strings = 0
    for array in feeds.values():
        if array.dtype != object:
            size += array.nbytes
            continue
        strings += array.size
        if strings > INLINE_STRINGS:
            return None
        size += sum(len(item) for item in array.reshape(-1))
    return size


@dataclass
class RunPeak:
    """A decaying peak of one instance's session.run times, and the biggest batch (input bytes)
    measured shorter than `limit` seconds: the next batch runs on the event loop while the peak
    stays below the limit and the batch is no bigger. Without a calibrated time the first batch runs
    in the thread, to be measured; a bigger batch than any measured runs there too, to be measured,
    so that a first request of megabytes is never run on the loop because one-row zeros were quick."""

    limit: float
    seconds: float | None = None
    inline: bool = False
    measured_bytes: int = 0  # the biggest batch whose run was shorter than `limit`
    announced: float = 0.0  # time.monotonic() the log last said where batches run
    switches: int = 0

    @classmethod
    def starting(cls, limit: float, calibrated_seconds: float | None, calibrated_bytes: int = 0) -> "RunPeak":
        peak = cls(limit)
        if calibrated_seconds is not None:
            peak.record(calibrated_seconds, calibrated_bytes)
        return peak

    def runs_inline(self, size: int | None) -> bool:
        """Whether a batch of `size` input bytes (batch_bytes) runs on the event loop."""
        return self.inline and size is not None and size <= self.measured_bytes

    def record(self, seconds: float, size: int | None = 0) -> None:
        self.seconds = seconds if self.seconds is None else max(seconds, self.seconds * RUN_PEAK_DECAY)
        self.inline = self.seconds < self.limit
        if size is not None and seconds < self.limit:
            self.measured_bytes = max(self.measured_bytes, size)

    def observe(self, seconds: float, size: int | None, label: str, instance: int) -> None:
        """record(), and a log line when batches change where they run (at most one a minute)."""
        was_inline = self.inline
        self.record(seconds, size)
        if self.inline != was_inline:
            self.switches += 1
        elif self.announced or not self.inline:
            return  # nothing new: only a switch, or the first batch on the loop, is worth a line
        now = time.monotonic()
        if self.announced and now - self.announced < SWITCH_LOG_SECONDS:
            return  # a busy machine can flip it often: the log says so at most once a minute
        where = "on the event loop" if self.inline else "in the instance's thread"
        log.info(
            "%s instance %d: batches run in %.0f us (limit %.0f us): they run %s (%d switches so far)",
            label,
            instance,
            self.seconds * 1e6,
            self.limit * 1e6,
            where,
            self.switches,
        )
        self.announced = now
