"""A model version's load within its time limit (--model-load-timeout-secs), and given up on an
unload or at shutdown.

A load's blocking steps (opening sessions, building a TensorRT engine, calibration, warm-up) run
in threads, and a thread cannot be killed. So each step runs in a daemon thread of its own, never
in the loop's default executor, whose threads asyncio.run joins at exit: when the load is given up
the loop stops waiting at once and the load fails, naming why; the thread stops by itself at its
next check (calibration and warm-up check between two runs of the model) and then frees what the
load built. A step that never checks (one run that takes hours) only keeps its thread; shutdown
reports it and exits without waiting for it (app.py).
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from server.errors import ConfigError

log = logging.getLogger(__name__)


class LoadGivenUp(ConfigError):
    """The load ran past its time limit, its model was unloaded, or the server is stopping."""


class LoadThreads:
    """The step threads of every load, for shutdown to say what is still running."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self._threads: set[threading.Thread] = set()
        self.loads: set[LoadDeadline] = set()  # under way

    def deadline(self, model: str, label: str) -> "LoadDeadline":
        """A version's load deadline, which stop() finds while it is entered (`with`)."""
        return LoadDeadline(model, label, self.timeout_seconds, self)

    def started(self, thread: threading.Thread) -> None:
        self._threads.add(thread)

    def ended(self, thread: threading.Thread) -> None:
        self._threads.discard(thread)

    def stop(self, why: str, model: str | None = None) -> None:
        """Give up the loads under way of `model`, or of every model."""
        for deadline in list(self.loads):
            if model is None or deadline.model == model:
                deadline.stop(why)

    def running(self) -> list[str]:
        """The names of step threads still running (a given-up step that has not stopped yet)."""
        return sorted(thread.name for thread in list(self._threads) if thread.is_alive())

    async def settled(self, timeout: float) -> list[str]:
        """Shutdown: wait up to `timeout` seconds for given-up steps to stop (each does at its next
        check); the names of those still running then."""
        ends = time.monotonic() + timeout
        while (running := self.running()) and time.monotonic() < ends:
            await asyncio.sleep(0.05)
        return running


class LoadDeadline:
    """One version's load: its time limit, whether it was given up and why, and the step running now."""

    def __init__(self, model: str, label: str, seconds: float, registry: LoadThreads) -> None:
        self.model, self.label, self.seconds = model, label, seconds
        self._registry = registry
        self._expires = time.monotonic() + seconds
        self._why = ""  # why the load was given up, once it was
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # the handover between the loop and a step's thread
        self._step: threading.Thread | None = None  # running now
        self._abandoned = False  # the loop no longer waits for self._step
        self._then: list[Callable[[], None]] = []  # to run in the abandoned step's thread as it ends
        self._wake: asyncio.Future | None = None

    def __enter__(self) -> "LoadDeadline":
        self._registry.loads.add(self)
        return self

    def __exit__(self, *exc) -> None:
        self._registry.loads.discard(self)

    def check(self) -> None:
        """LoadGivenUp once the load is given up. Called by a step's thread between two runs."""
        if not self._stopped.is_set() and time.monotonic() >= self._expires:
            self._give_up(f"it took longer than --model-load-timeout-secs {self.seconds:g}")
        if self._stopped.is_set():
            raise LoadGivenUp(f"{self.label}: the load was given up: {self._why}")

    def stop(self, why: str) -> None:
        """Give the load up now (on the loop): an unload, shutdown."""
        self._give_up(why)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _give_up(self, why: str) -> None:
        with self._lock:
            if not self._stopped.is_set():
                self._why = why
                self._stopped.set()

    async def run(self, step: str, function: Callable, *args, cleanup: Callable | None = None):
        """function(*args) in a thread of its own. LoadGivenUp when the load is given up first: the
        thread is then left to stop by itself and hand what it returns to `cleanup`."""
        self.check()
        loop = asyncio.get_running_loop()
        done, self._wake = loop.create_future(), loop.create_future()
        thread = threading.Thread(
            target=self._work, args=(loop, done, function, args, cleanup), daemon=True, name=f"{self.label}: {step}"
        )
        with self._lock:
            self._step, self._abandoned = thread, False
        self._registry.started(thread)
        thread.start()
        try:
            await asyncio.wait(
                (done, self._wake),
                timeout=max(0.0, self._expires - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:  # the thread must not hand a result to nobody
            if self._abandon(step):
                self._give_up(f"it was cancelled during {step}")
            raise
        if done.done():
            return done.result()
        self._give_up(f"it took longer than --model-load-timeout-secs {self.seconds:g}")  # unless stop() did
        if self._abandon(step):
            self.check()
        return await done  # it finished as the load was given up: the next check fails the load

    def _abandon(self, step: str) -> bool:
        """Stop waiting for the running step; False when it has already handed its result over."""
        with self._lock:
            if self._step is None:
                return False
            self._abandoned = True
        log.warning(
            "%s: the load was given up during %s, which is still running; its thread will free what the "
            "load built when the step stops",
            self.label,
            step,
        )
        return True

    async def release(self, close: Callable[[], None]) -> None:
        """close() once no step uses what it frees: now, in a worker thread, or when the abandoned step ends."""
        with self._lock:
            if self._step is not None and self._abandoned:
                self._then.append(close)
                return
        await asyncio.shield(asyncio.to_thread(close))

    def _work(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future, function, args, cleanup) -> None:
        try:
            outcome = (function(*args), None)
        except BaseException as err:  # handed to the load, or dropped below when the load was given up
            outcome = (None, err)
        with self._lock:
            abandoned, self._step = self._abandoned, None
            then, self._then = (self._then, []) if abandoned else ([], self._then)
        if not abandoned:
            try:
                loop.call_soon_threadsafe(settle, done, *outcome)
            except RuntimeError:  # the loop is closed: the server stopped while this step ran
                abandoned = True
        if abandoned:
            self._free(outcome, cleanup, then)
        self._registry.ended(threading.current_thread())

    def _free(self, outcome: tuple, cleanup: Callable | None, then: list[Callable[[], None]]) -> None:
        result, error = outcome
        try:
            if cleanup is not None and error is None:
                cleanup(result)
            for close in then:
                close()
        except Exception:  # noqa: BLE001 - nobody waits for this thread: the log is where it ends
            log.exception("%s: freeing what the given-up load built failed", self.label)
            return
        log.info(
            "%s: the given-up load's step has stopped (%s); what it built is freed",
            self.label,
            f"{type(error).__name__}" if error is not None else "it finished",
        )


def settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    """A future set from another thread (through call_soon_threadsafe), unless it is done already."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
