"""Triton's ModelStreamInfer: a stream's requests run concurrently (so they batch with everyone's),
each answered on the stream as it completes, in the unary path's steps (grpc_infer.GrpcInference:
parse, decode, encode) and through the core's request lifecycle (start, end). A request has no task
of its own: a callback on its queued item answers it."""

import asyncio
import collections
import logging
from dataclasses import dataclass, field

import grpc

from server import protocol
from server.engine.call import GRPC, Call, Identity
from server.errors import ServingError, Unauthenticated
from server.frontend.grpc_codec import RequestHead, response_weight
from server.frontend.grpc_infer import GrpcInference
from server.frontend.request_limits import OFFLOAD_BYTES
from server.frontend.shared_regions import names_regions

log = logging.getLogger(__name__)
# A stream's requests queued, running or answered but not yet sent, and the bytes of those answers,
# before its next message is read: far more than a client that reads its answers ever has in flight
# (so one that writes a burst before reading is not held back), while answers a client does not read
# cannot pile up without end.
STREAM_WINDOW = 4096
STREAM_WINDOW_BYTES = 64 << 20


@dataclass(slots=True)
class Stream:
    """One ModelStreamInfer call: answers to send, and its requests still queued or running.

    A client may send faster than it reads its answers, or than the model serves them: past
    STREAM_WINDOW requests queued or answered but unsent (or STREAM_WINDOW_BYTES of unsent answers),
    the stream's next message is not read until answers are sent, so HTTP/2's flow control holds
    the client back instead of our memory."""

    answers: collections.deque = field(default_factory=collections.deque)  # None ends the stream
    wakeup: asyncio.Future | None = None  # while the writer waits for the next answer
    queued: dict = field(default_factory=dict)  # QueuedRequest -> (Call, its encoding task or None)
    idle: asyncio.Future | None = None  # resolved once the last request read is answered
    roomy: asyncio.Future | None = None  # while the reader waits for the window to open
    unsent: int = 0  # bytes of the answers waiting to be sent

    def put(self, answer) -> None:
        self.answers.append(answer)
        self.unsent += len(answer) if isinstance(answer, bytes) else 0
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def get(self):
        while not self.answers:
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        answer = self.answers.popleft()
        self.unsent -= len(answer) if isinstance(answer, bytes) else 0
        if self.roomy is not None and not self.roomy.done():
            self.roomy.set_result(None)
        return answer

    async def room(self) -> None:
        """Back once fewer than STREAM_WINDOW requests are queued, running or answered but unsent."""
        while len(self.queued) + len(self.answers) >= STREAM_WINDOW or self.unsent >= STREAM_WINDOW_BYTES:
            self.roomy = asyncio.get_running_loop().create_future()
            await self.roomy


class StreamInfer:
    """The ModelStreamInfer RPC, over the unary path's steps."""

    def __init__(self, inference: GrpcInference) -> None:
        self.inference, self.core = inference, inference.core

    async def serve(self, requests, context):
        """Triton's stream: requests run concurrently (so they batch), and each is answered on
        the stream as it completes; a failure is that answer's error_message, not the stream's.
        A caller whose key leaves the keys file is the exception: the stream ends UNAUTHENTICATED."""
        stream, reader = Stream(), None
        try:
            identity = self.inference.identity(context)
            reader = asyncio.create_task(self._answer_each(requests, stream, context, identity))
            while (answer := await stream.get()) is not None:
                yield answer
            await reader  # raises what broke the reading, if anything did
        except Unauthenticated as err:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        finally:
            if reader is not None:
                reader.cancel()  # the client went away: its requests still queued are dropped

    async def _answer_each(self, requests, stream: Stream, context, identity: Identity) -> None:
        """Queue each request as it arrives, without a task of its own: a callback answers it when
        its batch is done. Returns once every request read is answered; raises Unauthenticated
        after that when the caller's key was revoked meanwhile."""
        try:
            refused = await self._read_each(requests, stream, context, identity)
            if stream.queued:
                stream.idle = asyncio.get_running_loop().create_future()
                await stream.idle
        finally:
            for call, _ in list(stream.queued.values()):
                self.core.cancel(call)
            stream.put(None)
        if refused is not None:
            raise refused

    async def _read_each(self, requests, stream: Stream, context, identity: Identity) -> Unauthenticated | None:
        """Queue the stream's requests; stop at the first one whose caller the current keys refuse.

        A stream lives for hours, and its metadata was checked as it opened: each message is checked
        again once the keys file has been re-read (Authenticator.follow swaps in a new KeyFile), so
        a revoked key stops at its next message, which is neither run nor billed. The requests
        accepted before it were authorised when they arrived, and are answered."""
        keys, trace_parent = self.inference.auth.keys, self.inference.trace_parent(context)
        async for request in requests:
            if self.inference.auth.keys is not keys:
                keys = self.inference.auth.keys
                try:
                    identity = self.inference.identity(context)  # the tenant too may have changed
                except Unauthenticated as err:
                    return err
            call = self.core.start(GRPC, identity)
            call.trace_parent = trace_parent
            await self._queue_one(request, call, stream)
            await stream.room()
        return None

    async def _queue_one(self, request: bytes, call: Call, stream: Stream) -> None:
        """Decode and queue one of the stream's requests (a big one in a codec thread, while the
        stream's next message waits: a stream's requests are read one after another anyway)."""
        head = None
        try:
            message, raw, head = await self.inference.parsed(request, call)
            decoded = await self.inference.decoded(message, raw, head, call)
            placed = await self.inference.placements(message, call) if names_regions(message.outputs) else {}
            item = self.core.enqueue(call, decoded, head.parameters)
        except asyncio.CancelledError as err:  # the stream went away while its request was being decoded
            self.core.end(call, err)
            raise
        except Exception as err:  # one bad request must not end the stream, nor its neighbours
            self._error(head, call, stream, err)
            return
        stream.queued[item] = (call, None)
        item.future.add_done_callback(lambda done: self._done(head, call, stream, item, done, placed))

    def _done(self, head: RequestHead, call: Call, stream: Stream, item, done: asyncio.Future, placed: dict) -> None:
        if done.cancelled():  # the stream went away; nobody is left to answer
            self.core.end(call, asyncio.CancelledError())
        elif (error := done.exception()) is not None:
            self._error(head, call, stream, error)
        else:
            try:
                call.answer = done.result()
                outputs, said = self.inference.outputs(call, call.answer)
                if response_weight(outputs) > OFFLOAD_BYTES:  # encoded in a codec thread; stays queued till then
                    encoding = asyncio.ensure_future(self._encoded(head, call, stream, item, outputs, said, placed))
                    stream.queued[item] = (call, encoding)
                    return
                answer = self.inference.respond(call, head.id, outputs, said, placed, stream=True)
            except Exception as err:
                self._error(head, call, stream, err)
            else:
                stream.put(answer)
                self.core.end(call)
        self._settled(stream, item)

    async def _encoded(self, head: RequestHead, call: Call, stream: Stream, item, outputs, said, placed) -> None:
        try:
            answer = await self.inference.offload.in_thread(
                self.inference.respond, call, head.id, outputs, said, placed, True
            )  # weighed already; outputs asked for in shared memory written there in the same thread
        except Exception as err:
            self._error(head, call, stream, err)
        else:
            stream.put(answer)
            self.core.end(call)
        finally:
            self._settled(stream, item)

    @staticmethod
    def _settled(stream: Stream, item) -> None:
        stream.queued.pop(item, None)
        if not stream.queued and stream.idle is not None and not stream.idle.done():
            stream.idle.set_result(None)

    def _error(self, head: RequestHead | None, call: Call, stream: Stream, error: Exception) -> None:
        """Answer a refused or failed request with its error message; the stream goes on. A failure
        that is no ServingError is a bug: the log has it, the caller a message without its details."""
        message = str(error)
        if not isinstance(error, ServingError):
            log.error("ModelStreamInfer failed", exc_info=error)
            message = "ModelStreamInfer: internal error; the server log has details"
        echo = protocol.ModelInferResponse()
        if head is not None:  # else the message did not parse, or broke a bound: nothing of it is echoed
            echo.model_name, echo.model_version, echo.id = head.model_name, head.model_version, head.id
        stream.put(protocol.ModelStreamInferResponse(error_message=message, infer_response=echo))
        self.core.end(call, error)
