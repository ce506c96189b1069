"""The front end's end of the link (link_server.py is the engine's): a core, model information and
model control that the transports use as they use the engine's own in one process, each call a
frame to the engine and, where it answers, a frame back.

What a request keeps here: its Call (timing, identity, the version it resolved to, its rows and
outputs) and the engine's answer. Everything billed or counted is the engine's."""

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from server import errors, protocol
from server.engine.call import Call, Identity, outcome_of, request_scope
from server.engine.queued import Answer
from server.frontend import link
from server.frontend.link_shm import SharedTensors
from server.tensors import DecodedRequest, Signature

log = logging.getLogger(__name__)

# What the engine may raise, by name; anything else arrives as an internal error.
ERRORS = {cls.__name__: cls for cls in (*errors.ServingError.__subclasses__(), errors.ExecutionFailed)}
STALE = "changed while the request was on its way"  # the engine's refusal of a stale signature


@dataclass(frozen=True)
class RemoteModel:
    """The version a request resolved to, as the transports read it."""

    name: str
    version: str
    signature: Signature
    signature_id: int  # the engine's name for the signature: a REQUEST says which it decoded against

    @property
    def label(self) -> str:
        return self.signature.label


@dataclass(eq=False)
class RemoteItem:
    """A request queued in the engine: its future resolves with the Answer."""

    future: asyncio.Future
    said: list = field(default_factory=list)  # the accounting parameters the engine sent


def error_of(head: dict) -> BaseException:
    """The engine's error, as the engine raised it."""
    cls = ERRORS.get(head["type"], RuntimeError)
    if cls is errors.TenantRefused:
        return cls(head["message"], head.get("reason", ""), head.get("retry_after", 1.0))
    return cls(head["message"])


class Link:
    """The connection to the engine, its state as last told, and the replies awaited."""

    def __init__(self) -> None:
        self.frames = link.Frames(self._received, self._lost)  # always read: only the engine pauses reading
        self.shared = SharedTensors(os.getpid(), "f")  # requests' big tensors
        self.numbers = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.signatures: dict[int, Signature] = {}
        self.models: dict[tuple[str, str], RemoteModel] = {}  # (name, version asked) -> what answers, till a change
        self.generation = 0  # STATE frames seen: a model resolved before the last one is not kept
        self.state = {"ready": False, "down": False}
        self.changed = asyncio.Event()  # readiness or the repository changed
        self.broken = asyncio.get_running_loop().create_future()  # resolved when the engine is gone
        self.closing = False  # closed from this side: its end is no error
        self.on_regions_gone = lambda names: None  # shared memory regions unregistered (link_regions.py)

    @classmethod
    async def connect(cls, path: str) -> "Link":
        connected = cls()
        await asyncio.get_running_loop().create_unix_connection(lambda: connected.frames, path)
        return connected

    def close(self) -> None:
        self.closing = True
        self.frames.transport.close()

    def send(self, kind: int, number: int, head: object = None, body=()) -> None:
        if self.broken.done():
            raise errors.ShuttingDown("the engine is gone; retry on another replica")
        self.frames.send(kind, number, head, body)

    def expect(self, number: int) -> asyncio.Future:
        future = self.waiting[number] = asyncio.get_running_loop().create_future()
        return future

    async def call(self, op: str, *args, head: dict | None = None, body=()) -> tuple[object, memoryview]:
        number = next(self.numbers)
        future = self.expect(number)
        self.send(link.CALL, number, {"op": op, "args": list(args), **(head or {})}, body)
        return await future

    def _received(self, kind: int, number: int, head, body: memoryview) -> None:
        if kind == link.REGIONS_GONE:  # forgotten before the engine answers the unregistration
            self.on_regions_gone(head)
            self.send(link.FORGOTTEN, number)
            return
        if kind == link.STATE:
            self.state = head
            self.models.clear()  # a version loaded or unloaded: ask again
            self.generation += 1
            self.changed.set()
            return
        future = self.waiting.pop(number, None)
        if future is None or future.done():  # a cancelled caller's answer
            if kind == link.ANSWER:
                link.discard_tensors(head[0])
            return
        if kind == link.ERROR:
            future.set_exception(error_of(head))
        else:
            future.set_result((head, body))

    def _lost(self, why: link.LinkBroken) -> None:
        if not self.closing:
            log.error("the link to the engine broke: %s", why)
        self.state = {"ready": False, "down": True}
        self.changed.set()
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(errors.ShuttingDown("the engine is gone; retry on another replica"))
        self.waiting.clear()
        self.broken.set_result(None)


# The request parameters the engine reads: inference.request_options and sequence_state.parse_sequence.
ENGINE_PARAMETERS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")
FRONTEND_PARAMETER = "onnxserve_frontend"  # which front-end process answered: the rest the engine says


class RemoteCore:
    """InferenceCore's interface, over the link.

    A version it has resolved before (since the repository last changed) it resolves here, and the
    request goes to the engine as one REQUEST frame; otherwise it asks the engine first (RESOLVE).
    The engine ends each request it answers; the front end tells it only of those it ends itself:
    decoding refused (END, or REFUSED when the engine never heard of it), or cancelled (CANCEL)."""

    def __init__(self, connection: Link, index: int) -> None:
        self.link, self.index = connection, index
        self.open: dict[int, str] = {}  # requests the engine holds: number -> the frame that ends them here

    @property
    def shutting_down(self) -> bool:
        return self.link.state["down"]

    def ready(self) -> bool:
        return self.link.state["ready"] and not self.link.state["down"]

    async def model_ready(self, name: str, version: str) -> bool:
        ready, _ = await self.link.call("model_ready", name, version)
        return ready

    def start(self, protocol_name: str, identity: Identity) -> Call:
        return Call(time.perf_counter(), protocol_name, identity)

    def request(self, protocol_name: str, identity: Identity) -> contextlib.AbstractContextManager[Call]:
        return request_scope(self, protocol_name, identity)

    def end(self, call: Call, error: BaseException | None = None) -> None:
        if error is None or not call.link or self.link.broken.done():
            return  # answered: the engine ended it as it sent the answer
        number, outcome = call.link, outcome_of(error)
        if self.open.pop(number, None) == "END":
            self.link.send(link.END, number, {"outcome": outcome})
        elif call.item is None and call.model is not None and number not in self.link.waiting:
            self.link.send(link.REFUSED, number, {**self._head(call, *call.requested), "outcome": outcome})

    def _head(self, call: Call, name: str, version: str) -> dict:
        identity = call.identity
        head = {
            "protocol": call.protocol,
            "tenant": identity.tenant,
            "source": identity.source,
            "model": name,
            "version": version,
            "id": call.request_id,
            "elapsed": time.perf_counter() - call.started,
        }
        if call.trace_parent:
            head["trace"] = call.trace_parent
        return head

    async def resolve(self, call: Call, name: str, version: str) -> RemoteModel:
        call.link, call.requested = next(self.link.numbers), (name, version)
        known = self.link.models.get((name, version))
        if known is not None:
            call.model = known
            return known
        generation, frame = self.link.generation, self._head(call, name, version)
        future = self.link.expect(call.link)
        self.link.send(link.RESOLVE, call.link, frame)
        self.open[call.link] = "END"
        try:
            reply, _ = await future
        except asyncio.CancelledError:
            raise  # the engine holds it: end() tells it
        except BaseException:
            self.open.pop(call.link, None)  # refused there, and ended there
            raise
        call.model = model_from(self.link, reply)
        if self.link.generation == generation:  # else the repository changed meanwhile: ask again next time
            self.link.models[(name, version)] = call.model
        return call.model

    def enqueue(self, call: Call, decoded: DecodedRequest, parameters: Mapping[str, object]) -> RemoteItem:
        call.rows, call.outputs = decoded.rows, decoded.outputs
        specs, body = link.pack_tensors(decoded.feeds, self.link.shared)
        wanted = {key: parameters[key] for key in ENGINE_PARAMETERS if key in parameters}
        head = {"rows": decoded.rows, "outputs": list(decoded.outputs), "parameters": wanted, "inputs": specs}
        resolved_there = self.open.get(call.link) == "END"
        if resolved_there:  # the engine holds it
            kind, head["id"] = link.INFER, call.request_id
        else:
            kind = link.REQUEST
            head.update(self._head(call, *call.requested), signature_id=call.model.signature_id)
        try:
            self.link.send(kind, call.link, head, body)  # first: what follows assumes it went
        except errors.ShuttingDown:
            link.discard_tensors(specs)
            raise
        item = call.item = RemoteItem(asyncio.get_running_loop().create_future())
        replied = self.link.expect(call.link)
        self.open[call.link] = "CANCEL"
        replied.add_done_callback(lambda done: self._answered(call, item, done))
        return item

    def _answered(self, call: Call, item: RemoteItem, done: asyncio.Future) -> None:
        self.open.pop(call.link, None)  # the engine ended it as it answered
        if (
            not done.cancelled()
            and isinstance(done.exception(), errors.ModelNotReady)
            and STALE in str(done.exception())
        ):
            self.link.models.pop(call.requested, None)  # resolved from what changed since
        try:
            _settle_item(item, done)
        except Exception as err:  # an answer that does not unpack: the caller gets an internal error
            if not item.future.done():
                item.future.set_exception(err)

    async def infer(self, call: Call, decoded: DecodedRequest, parameters: Mapping[str, object]) -> Answer:
        item = self.enqueue(call, decoded, parameters)
        try:
            call.answer = await item.future
        except asyncio.CancelledError:
            self.cancel(call)
            raise
        return call.answer

    def accounting(self, call: Call, answer: Answer) -> list:
        return [*(tuple(pair) for pair in call.item.said), (FRONTEND_PARAMETER, self.index)]

    def cancel(self, call: Call) -> None:
        if call.item is not None and not call.item.future.done():
            call.item.future.cancel()
        self.link.waiting.pop(call.link, None)
        if self.open.pop(call.link, None) == "CANCEL" and not self.link.broken.done():
            self.link.send(link.CANCEL, call.link)


def _settle_item(item: RemoteItem, done: asyncio.Future) -> None:
    if item.future.done():  # cancelled here first
        if not done.cancelled() and done.exception() is None:
            link.discard_tensors(done.result()[0][0])
        return
    if done.cancelled():
        item.future.cancel()
    elif (err := done.exception()) is not None:
        item.future.set_exception(err)
    else:
        (specs, said, batch_id, batch_rows, device, queue_seconds, compute_seconds), body = done.result()
        item.said = said
        outputs = link.unpack_tensors(specs, body)
        item.future.set_result(Answer(outputs, batch_id, batch_rows, device, queue_seconds, compute_seconds))


def model_from(connection: Link, head: dict) -> RemoteModel:
    key = head["signature_id"]
    if "signature" in head:
        connection.signatures[key] = link.signature_from(head["signature"])
    return RemoteModel(head["name"], head["version"], connection.signatures[key], key)


class RemoteInfo:
    """ModelInfo's interface, over the link."""

    def __init__(self, connection: Link) -> None:
        self.link = connection

    async def model(self, name: str, version: str) -> RemoteModel:
        head, _ = await self.link.call("model", name, version)
        return model_from(self.link, head)

    async def ready_versions(self, name: str) -> list[str]:
        versions, _ = await self.link.call("ready_versions", name)
        return versions

    async def config(self, name: str, version: str):
        _, body = await self.link.call("config", name, version)
        return protocol.ModelConfig.FromString(bytes(body))

    async def statistics(self, name: str, version: str):
        _, body = await self.link.call("statistics", name, version)
        return protocol.ModelStatisticsResponse.FromString(bytes(body))


class RemoteControl:
    """RepositoryControl's interface, over the link."""

    def __init__(self, connection: Link) -> None:
        self.link = connection

    async def index(self, ready_only: bool) -> list[dict[str, str]]:
        rows, _ = await self.link.call("index", ready_only)
        return rows

    async def load(self, name: str, parameters: dict[str, object]) -> None:
        strings = {key: value for key, value in parameters.items() if not isinstance(value, bytes)}
        files = [(key, value) for key, value in parameters.items() if isinstance(value, bytes)]
        head = {"strings": strings, "files": [(key, len(value)) for key, value in files]}
        await self.link.call("load", name, head=head, body=[value for _, value in files])

    async def unload(self, name: str) -> None:
        await self.link.call("unload", name)


class RemoteTraces:
    """TraceSettings' interface, over the link: the engine decides which requests are traced."""

    def __init__(self, connection: Link, exporting: bool) -> None:
        self.link, self.exporting = connection, exporting

    async def view(self, model: str) -> dict[str, list[str]]:
        settings, _ = await self.link.call("trace_view", model)
        return settings

    async def update(self, model: str, given: dict[str, list[str]]) -> dict[str, list[str]]:
        settings, _ = await self.link.call("trace_update", model, given)
        return settings
