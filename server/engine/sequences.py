"""Triton's sequence batcher, in front of a model's Batcher: requests that carry a correlation id
(`sequence_id`, with `sequence_start` and `sequence_end`) run one at a time per sequence and in
order, with the control inputs config.pbtxt names (START, END, READY, CORRID) and the model's
implicit state carried from each request's state output to the next request's state input.

Live sequences are bounded: `direct` binds each to a slot of one instance (max_batch_size slots per
instance, so a sequence always runs where its slot is); `oldest` keeps max_candidate_sequences live
and lets the batcher batch their next requests dynamically. A sequence beyond the bound waits, in
arrival order, for a live one to end (its END request, or max_sequence_idle_microseconds without a
request). Batches form as for any model: a sequence has at most one request in the batcher at a
time, which is what keeps its order.

The table outlives a reload whose new version has the same state signature (controls and states):
its sequences go on with their state on the new version (`adopt`)."""

import asyncio
import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from server.engine.batching import Batcher
from server.engine.device_state import held, to_host
from server.engine.queued import Feeds, QueuedRequest, fail
from server.engine.sequence_state import Key, control_feeds, parse_sequence, state_key
from server.errors import InvalidInput, Overloaded, ShuttingDown
from server.models.sequence_config import DIRECT, SequenceSettings
from server.observe.events import EventBus, SequenceChanged

log = logging.getLogger(__name__)

ENDED_MEMORY = 1024  # why recent sequences ended, for the error a late request of one gets


@dataclass(eq=False, slots=True)
class Pending:
    item: QueuedRequest
    start: bool
    end: bool
    controls: Feeds  # its control inputs, known from its flags when it arrives


@dataclass(eq=False, slots=True)
class Sequence:
    key: Key
    backlog: collections.deque = field(default_factory=collections.deque)  # of Pending, in arrival order
    state: dict[str, np.ndarray] = field(default_factory=dict)  # by state input name
    instance: int = -1  # direct: the instance whose slot it holds
    live: bool = False  # holds a slot; else it waits for one
    running: bool = False  # one of its requests is in the batcher
    over: bool = False  # ended: what still runs of it finishes, nothing more starts
    idle: asyncio.TimerHandle | None = None


class Sequences:
    """The live and waiting sequences of one model version (and of its reloads with the same state)."""

    def __init__(self, settings: SequenceSettings, batcher: Batcher, initial: dict[str, np.ndarray], bus: EventBus):
        self.settings, self.initial, self.bus = settings, initial, bus
        self.batcher: Batcher = batcher
        self._sequences: dict[Key, Sequence] = {}
        self._waiting: collections.deque[Sequence] = collections.deque()  # for a slot, in order
        self._slots = [0] * batcher.instances  # live sequences per instance
        self._ended: collections.OrderedDict[Key, str] = collections.OrderedDict()
        self._pending = 0  # requests in backlogs, not yet in the batcher
        self._closed = ""

    @property
    def label(self) -> str:
        return self.batcher.label

    @property
    def capacity(self) -> int:
        """Live sequences at once: a slot per batch row of every instance (direct), or the candidates (oldest)."""
        if self.settings.strategy == DIRECT:
            return max(1, self.batcher.settings.max_batch_size) * self.batcher.instances
        return self.settings.max_candidate_sequences

    @property
    def live(self) -> int:
        return sum(self._slots)

    def adopt(self, batcher: Batcher, initial: dict[str, np.ndarray]) -> None:
        """A reload with the same state signature: the sequences go on, on the new version."""
        old_instances = self.batcher.instances
        self.batcher, self.initial = batcher, initial
        for sequence in self._sequences.values():  # the new instances' devices may be others
            sequence.state = {name: to_host(value) for name, value in sequence.state.items()}
        if batcher.instances != old_instances:  # the slots' instances moved: rebind them in order
            self._slots = [0] * batcher.instances
            for sequence in self._sequences.values():
                if sequence.live:
                    sequence.instance = self._free_instance() if self.settings.strategy == DIRECT else -1
                    self._slots[max(sequence.instance, 0)] += 1

    def enqueue(
        self, feeds: Feeds, rows: int, outputs: tuple[str, ...], parameters: Mapping, **options
    ) -> QueuedRequest:
        """Queue one request of a sequence; its future resolves as Batcher.enqueue's does."""
        key, start, end = parse_sequence(parameters, self.label)
        if self._closed:
            raise ShuttingDown(f"{self.label}: {self._closed}; retry")
        if self.batcher.settings.max_batch_size and rows != 1:
            raise InvalidInput(
                f"inference request to {self.label} must specify batch-size 1 due to requirements of sequence "
                f"batcher; got {rows}"
            )
        sequence = self._sequences.get(key)
        if sequence is None and not start:
            raise InvalidInput(self._unknown(key))
        controls = control_feeds(self.settings, key, start, end, self.batcher.settings.max_batch_size)
        self._check_room()
        item = self.batcher.prepare(feeds, rows, outputs + self.settings.state_outputs, **options)
        if sequence is None:
            sequence = self._sequences[key] = Sequence(key)
            self._ended.pop(key, None)
            self._give_slot(sequence)
        sequence.backlog.append(Pending(item, start, end, controls))
        self._pending += 1
        self._pump(sequence)
        return item

    def keys(self) -> list[Key]:
        return list(self._sequences)

    def inherit_ended(self, keys: list[Key], reason: str) -> None:
        """Sequences of a replaced version that end with it: a late request of one is told why."""
        for key in keys:
            self._remember_ended(key, reason)

    def _remember_ended(self, key: Key, reason: str) -> None:
        self._ended[key] = reason
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def close(self, reason: str) -> None:
        """The version is going and no reload adopted these sequences: each ends, and what waits fails."""
        self._closed = reason
        for sequence in list(self._sequences.values()):
            self._end(sequence, reason, "aborted")
        self._waiting.clear()

    def _check_room(self) -> None:
        limit = self.batcher.settings.queue_policy.max_queue_size
        if limit and self._pending + self.batcher.depth >= limit:
            raise Overloaded(f"{self.label}: queue is full ({limit} sequence requests waiting); retry later")

    def _unknown(self, key: Key) -> str:
        said = (
            f"inference request for sequence {key!r} to {self.label} must specify the START flag on the first "
            "request of the sequence"
        )
        reason = self._ended.get(key)
        return f"{said}; the sequence ended: {reason}" if reason else said

    # --- slots --------------------------------------------------------------------------------

    def _give_slot(self, sequence: Sequence) -> None:
        if self.live >= self.capacity:
            self._waiting.append(sequence)
            self._publish("waiting")
            return
        sequence.instance = self._free_instance() if self.settings.strategy == DIRECT else -1
        self._slots[max(sequence.instance, 0)] += 1
        sequence.live = True
        self._publish("started")

    def _free_instance(self) -> int:
        """The instance with the fewest live sequences (direct); each has max_batch_size slots."""
        return min(range(len(self._slots)), key=self._slots.__getitem__)

    def _release(self, sequence: Sequence) -> None:
        if sequence.live:
            sequence.live = False
            self._slots[max(sequence.instance, 0)] -= 1
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        while self._waiting and self.live < self.capacity and not self._closed:
            waiting = self._waiting.popleft()
            self._give_slot(waiting)
            self._pump(waiting)

    # --- running ------------------------------------------------------------------------------

    def _pump(self, sequence: Sequence) -> None:
        """Send the sequence's next request to the batcher, if it holds a slot and none of its runs."""
        if not sequence.live or sequence.running or sequence.over:
            return
        if sequence.idle is not None:
            sequence.idle.cancel()
            sequence.idle = None
        while sequence.backlog:
            pending = sequence.backlog.popleft()
            self._pending -= 1
            item = pending.item
            if item.future.done():  # its caller left, or it timed out, while it waited
                continue
            if pending.start:
                sequence.state = dict(self.initial)
            item.feeds.update(pending.controls)
            item.feeds.update(sequence.state)
            item.instance, sequence.running = sequence.instance, True
            item.after = lambda outputs: self._ran(sequence, pending, outputs)
            item.future.add_done_callback(lambda _: self._settled(sequence, pending))
            self.batcher.admit(item)
            return
        self._idle(sequence)

    def _ran(self, sequence: Sequence, pending: Pending, outputs: Feeds | None) -> None:
        """Its batch ran: keep the state it produced (a failed run keeps the state before it)."""
        if outputs is not None:
            for spec in self.settings.states:
                sequence.state[spec.input_name] = held(outputs.pop(spec.output_name))
        sequence.running = False
        if pending.end:
            self._end(sequence, "its END request ran", "ended")
        else:
            self._pump(sequence)

    def _settled(self, sequence: Sequence, pending: Pending) -> None:
        """Its future is done. If it never ran (its caller left, or it timed out, in the queue), the
        sequence goes on from here, not ended even by an END that did not run; a run goes on in `_ran`."""
        if sequence.running and not pending.item.batch_id:
            sequence.running = False
            self._pump(sequence)

    def _idle(self, sequence: Sequence) -> None:
        seconds = self.settings.max_sequence_idle_us / 1e6
        loop = asyncio.get_running_loop()
        sequence.idle = loop.call_later(seconds, self._timed_out, sequence)

    def _timed_out(self, sequence: Sequence) -> None:
        if sequence.running or sequence.backlog or self._sequences.get(sequence.key) is not sequence:
            return
        idle_us = self.settings.max_sequence_idle_us
        log.info("%s: sequence %r ended after %d us without a request", self.label, sequence.key, idle_us)
        self._end(sequence, f"no request for {idle_us} us (max_sequence_idle_microseconds)", "timed_out")

    def _end(self, sequence: Sequence, reason: str, change: str) -> None:
        """The sequence is over: its slot and state are freed; what still waits in it fails."""
        if sequence.over:
            return
        sequence.over = True
        if sequence.idle is not None:
            sequence.idle.cancel()
        if self._sequences.get(sequence.key) is sequence:
            del self._sequences[sequence.key]
        self._remember_ended(sequence.key, reason)
        sequence.state = {}
        leftover = list(sequence.backlog)
        sequence.backlog.clear()
        self._pending -= len(leftover)
        self._release(sequence)
        self._publish(change)
        self._restart_or_fail(sequence.key, leftover)

    def _restart_or_fail(self, key: Key, leftover: list[Pending]) -> None:
        """Requests that came after the END: a START begins the sequence anew; those before it fail
        (all of them once the version is closing)."""
        while leftover and (self._closed or not leftover[0].start):
            item = leftover.pop(0).item
            error = ShuttingDown(f"{self.label}: {self._closed}") if self._closed else InvalidInput(self._unknown(key))
            fail(item.future, error)
        if not leftover:
            return
        sequence = self._sequences[key] = Sequence(key)
        sequence.backlog.extend(leftover)
        self._pending += len(leftover)
        self._give_slot(sequence)
        self._pump(sequence)

    def _publish(self, change: str) -> None:
        self.bus.publish(
            SequenceChanged(self.batcher.model, self.batcher.version, change, self.live, len(self._waiting))
        )


def same_state(old: SequenceSettings, new: SequenceSettings) -> bool:
    """Whether a reload keeps the sequences: the same controls and states, so state carries over."""
    return state_key(old) == state_key(new)
