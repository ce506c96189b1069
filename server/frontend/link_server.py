"""The engine's end of the link: serves a Backend to front-end processes (link_client.py is the
other end). Runs in the engine's process, on its loop, over the core, model information and
control that a single-process server hands its transports.

Each request lives here as the core's Call from RESOLVE to END, as it would in one process: the
core resolves it (and reserves its usage record), queues it, bills it and settles it. A front end
that goes away has its requests cancelled and ended here, each once."""

import asyncio
import base64
import itertools
import logging
import os
import socket
import struct

from server import errors
from server.engine.call import Identity, outcome_of
from server.frontend import link, link_shm
from server.frontend.backend import Backend
from server.frontend.link_shm import SharedTensors
from server.tensors import DecodedRequest

log = logging.getLogger(__name__)

DRAIN_BYTES = 1 << 20  # answers unsent to a front end past which its next request waits
IDENTITIES_KEPT = 4096  # callers' identities kept per front end; past it, the cache starts afresh
REGIONS_WAIT = 5.0  # seconds for every front end to confirm it forgot unregistered shared memory


PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(transport: asyncio.BaseTransport) -> int:
    """The process at the other end of a Unix socket (SO_PEERCRED); 0 where the kernel does not say."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return 0
    pid, _, _ = PEER_CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size))
    return pid


class LinkServer:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.connections: set[_Connection] = set()
        self.listening: dict[int, int] = {}  # front end's index -> its pid, once it listens
        self.signature_ids: dict = {}  # Signature -> its number on the link: equal signatures, one number
        self.greeted = asyncio.Event()  # set at each front end's hello
        self._server: asyncio.Server | None = None
        self._notices = itertools.count(1)

    async def start(self, path: str) -> None:
        self.path = path
        self._server = await asyncio.get_running_loop().create_unix_server(self._accept, path)
        os.chmod(path, 0o600)  # this user's processes only: the link carries requests unauthenticated

    def signature_id(self, signature) -> int:
        """The signature's number on the link; a version reloaded with the same one keeps it."""
        return self.signature_ids.setdefault(signature, len(self.signature_ids) + 1)

    def state(self) -> dict:
        core = self.backend.core
        return {"ready": core.ready(), "down": core.shutting_down}

    def broadcast(self) -> None:
        """Readiness or the repository changed: every front end is told."""
        for connection in self.connections:
            connection.send(link.STATE, 0, self.state())

    async def regions_gone(self, names: list[str]) -> None:
        """Every front end forgets these shared memory regions before this returns (a front end that
        does not say so within REGIONS_WAIT is stuck or going, and serves nothing meanwhile)."""
        if not names:
            return
        number = next(self._notices)
        waits = [connection.notice(link.REGIONS_GONE, number, names) for connection in self.connections]
        if waits:
            _, late = await asyncio.wait(waits, timeout=REGIONS_WAIT)
            if late:
                log.warning("%d front end(s) did not confirm unregistering %s in time", len(late), names)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accept(self) -> link.Frames:
        return _Connection(self).frames


class _Connection:
    """One front end's requests and calls."""

    def __init__(self, server: LinkServer) -> None:
        self.server, self.backend = server, server.backend
        self.frames = link.Frames(self._received, self._lost, DRAIN_BYTES, self._connected)
        self.pid, self.shared = 0, None  # the front end's process, once connected; where big answers go
        self.identities: dict[tuple[str, str], Identity] = {}  # (tenant, source) -> the requests' Identity
        self.last_signature: tuple = (None, 0)  # the signature last checked, and its number
        self.calls: dict = {}  # number -> the core's Call, until it is answered or ended
        self.signatures_sent: set[int] = set()  # the numbers of the signatures this front end holds
        self.tasks: set[asyncio.Task] = set()  # calls under way (a load may take minutes)
        self.handlers = {
            link.REQUEST: self._request,
            link.RESOLVE: self._resolve,
            link.INFER: self._infer,
            link.END: self._end,
            link.REFUSED: self._refused,
            link.CANCEL: self._cancel,
            link.CALL: self._call,
            link.FORGOTTEN: self._forgotten,
        }
        self.notices: dict[int, asyncio.Future] = {}  # what the engine told this front end, until it confirms
        self.loop = asyncio.get_running_loop()

    def _connected(self) -> None:
        self.server.connections.add(self)
        self.pid = peer_pid(self.frames.transport)
        self.shared = SharedTensors(self.pid, "e") if self.pid else None
        self.send(link.STATE, 0, self.server.state())

    def send(self, kind: int, number: int, head: object = None, body=()) -> None:
        self.frames.send(kind, number, head, body)

    def notice(self, kind: int, number: int, head: object) -> asyncio.Future:
        """Tell the front end something it must act on before the engine goes on: resolved when it confirms."""
        confirmed = self.notices[number] = self.loop.create_future()
        self.send(kind, number, head)
        return confirmed

    def _forgotten(self, number: int, head, body) -> None:
        confirmed = self.notices.pop(number, None)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(None)

    def _received(self, kind: int, number: int, head, body) -> None:
        handler = self.handlers.get(kind)
        if handler is None:
            log.error("a front end sent a frame of unknown kind %d: closing its link", kind)
            self.frames.close(f"a frame of unknown kind {kind}")
            return
        try:
            result = handler(number, head, body)
        except Exception as err:  # a bug, or a frame that does not decode: that request fails, the link stays
            log.exception("a front end's frame of kind %d failed", kind)
            if kind in (link.REQUEST, link.INFER) and isinstance(head, dict):
                link.discard_tensors(head.get("inputs"))
            self.error(number, err)
            return
        if result is not None:  # a coroutine: calls may wait (a load); requests never do
            task = self.loop.create_task(result)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _lost(self, why: link.LinkBroken) -> None:
        self.server.connections.discard(self)
        for confirmed in self.notices.values():  # gone: it forgot everything
            if not confirmed.done():
                confirmed.set_result(None)
        self.drop()
        if self.pid and (left := link_shm.remove_of(self.pid)):
            log.info("front end (pid %d) left %d tensor(s) in shared memory: removed", self.pid, left)

    def drop(self) -> None:
        """The front end is gone: its requests leave the queues and end, cancelled, once each."""
        core = self.backend.core
        for task in self.tasks:
            task.cancel()
        for call in self.calls.values():
            core.cancel(call)
            core.finish(call, "cancelled")
        if self.calls:
            log.warning("a front end went away with %d request(s) in flight: cancelled", len(self.calls))
        self.calls.clear()

    def error(self, number: int, err: BaseException) -> None:
        kind = type(err).__name__ if isinstance(err, (errors.ServingError, errors.ExecutionFailed)) else "Internal"
        head = {"type": kind, "message": str(err)}
        if isinstance(err, errors.TenantRefused):  # REST's Retry-After, in the front end
            head.update(reason=err.reason, retry_after=err.retry_after)
        self.send(link.ERROR, number, head)

    def model_head(self, model) -> dict:
        """The version that answers, with its signature unless this front end holds it already."""
        key = self.server.signature_id(model.signature)
        head = {"name": model.name, "version": model.version, "signature_id": key}
        if key not in self.signatures_sent:
            self.signatures_sent.add(key)
            head["signature"] = link.signature_head(model.signature)
        return head

    # --- requests ---------------------------------------------------------------------------------
    # A request whose version the front end knows comes as one REQUEST (resolve and queue) and is
    # ended here when its answer or error goes back: a frame each way. Otherwise RESOLVE first
    # (the front end needs the signature to decode), then INFER, or END if decoding failed.

    def _start(self, number: int, head: dict):
        tenant, source = head["tenant"], head["source"]
        identity = self.identities.get((tenant, source))
        if identity is None:  # a tenant's label, once given, stays: the identity can be kept
            if len(self.identities) >= IDENTITIES_KEPT:
                self.identities.clear()
            identity = Identity(tenant, self.backend.auth.labels.label(tenant), source)
            self.identities[tenant, source] = identity
        call = self.backend.core.start(head["protocol"], identity)
        call.started -= head["elapsed"]  # the front end received it that long ago
        call.request_id = head.get("id", "")
        if "trace" in head:
            call.trace_parent = tuple(head["trace"])
        return call

    def _signature_id(self, signature) -> int:
        """LinkServer.signature_id, without hashing the signature on every request."""
        known, key = self.last_signature
        if known is not signature:
            key = self.server.signature_id(signature)
            self.last_signature = (signature, key)
        return key

    def _resolve(self, number: int, head: dict, body) -> None:
        call = self._start(number, head)
        try:  # at once, in the frames' order: the INFER or END that follows finds it resolved
            model = self.backend.core.resolve_now(call, head["model"], head["version"])
        except Exception as err:
            self._failed(number, call, err)
        else:
            self.calls[number] = call
            self.send(link.REPLY, number, self.model_head(model))

    def _request(self, number: int, head: dict, body) -> None:
        call = self._start(number, head)
        try:
            model = self.backend.core.resolve_now(call, head["model"], head["version"])
            if self._signature_id(model.signature) != head["signature_id"]:
                raise errors.ModelNotReady(f"{model.label} changed while the request was on its way; retry it")
        except Exception as err:
            link.discard_tensors(head["inputs"])
            self._failed(number, call, err)
            return
        self._queue(number, call, head, body)

    def _infer(self, number: int, head: dict, body) -> None:
        call = self.calls.pop(number, None)
        if call is None:  # cancelled meanwhile
            link.discard_tensors(head["inputs"])
            return
        call.request_id = head["id"]
        self._queue(number, call, head, body)

    def _queue(self, number: int, call, head: dict, body) -> None:
        try:
            decoded = DecodedRequest(link.unpack_tensors(head["inputs"], body), head["rows"], tuple(head["outputs"]))
            item = self.backend.core.enqueue(call, decoded, head["parameters"])
        except Exception as err:
            self._failed(number, call, err)
            return
        self.calls[number] = call
        item.future.add_done_callback(lambda done: self._answered(number, call, done))

    def _answered(self, number: int, call, done: asyncio.Future) -> None:
        if done.cancelled() or self.calls.pop(number, None) is None:
            return  # cancelled by the front end, or it went away: ended already
        if (err := done.exception()) is not None:
            self._failed(number, call, err)
            return
        answer = call.answer = done.result()
        core = self.backend.core
        try:
            said = core.accounting(call, answer)
            specs, tensors = link.pack_tensors({name: answer.outputs[name] for name in call.outputs}, self.shared)
            times = answer.queue_seconds, answer.compute_seconds
            frame = [specs, said, answer.batch_id, answer.batch_rows, answer.device, *times]
            self.send(link.ANSWER, number, frame, tensors)
        except Exception as err:  # a bug: the log has it, the front end an error
            log.exception("answering a front end's request failed")
            self._failed(number, call, err)
            return
        core.finish(call, "ok")  # answered: the front end encodes it and sends it

    def _failed(self, number: int, call, err: BaseException) -> None:
        self.error(number, err)
        self.backend.core.finish(call, outcome_of(err))

    def _end(self, number: int, head: dict, body) -> None:
        """A request resolved by RESOLVE that ended in the front end (its decoding failed)."""
        call = self.calls.pop(number, None)
        if call is not None:
            self.backend.core.finish(call, head["outcome"])

    def _refused(self, number: int, head: dict, body) -> None:
        """A request the front end refused after resolving it from what it knew (its decoding
        failed): counted and logged as it would be in one process."""
        call = self._start(number, head)
        try:
            self.backend.core.resolve_now(call, head["model"], head["version"])
        except errors.ServingError as err:
            log.debug("a refused request's model does not resolve (%s): it is counted without one", err)
        self.backend.core.finish(call, head["outcome"])

    def _cancel(self, number: int, head, body) -> None:
        call = self.calls.pop(number, None)
        if call is not None:
            self.backend.core.cancel(call)
            self.backend.core.finish(call, "cancelled")

    # --- calls ------------------------------------------------------------------------------------

    async def _call(self, number: int, head: dict, body) -> None:
        try:
            reply, data = await self._answer_call(head["op"], head.get("args", []), head, body)
        except (errors.ServingError, errors.ExecutionFailed) as err:
            self.error(number, err)
        except Exception as err:  # a bug: the log has it; the front end answers with an internal error
            log.exception("a front end's call %r failed", head.get("op"))
            self.error(number, err)
        else:
            self.send(link.REPLY, number, reply, [data] if data else ())

    async def _region_call(self, op: str, args: list):
        """Triton's system shared memory, one registry for every front end (link_regions.py)."""
        regions = self.backend.regions
        if op == "region_register":
            return await regions.register(*args)
        if op == "region_unregister":
            await self.server.regions_gone(await regions.unregister(*args))
            return None
        if op == "region_status":
            return [[r.name, r.key, r.offset, r.byte_size] for r in await regions.status(*args)]
        if op == "region_get":
            region = regions.get(*args)
            if hasattr(region, "device_id"):  # a CUDA region: the front end opens its handle too
                return ["cuda", base64.b64encode(region.raw_handle).decode(), region.device_id, region.byte_size]
            return ["system", region.key, region.offset, region.byte_size]
        if op == "region_register_cuda":
            name, handle, device_id, byte_size, tenant = args
            return await regions.register_cuda(name, base64.b64decode(handle), device_id, byte_size, tenant)
        if op == "region_unregister_cuda":
            await self.server.regions_gone(await regions.unregister_cuda(*args))
            return None
        if op == "region_status_cuda":
            return [[r.name, r.device_id, r.byte_size] for r in await regions.status_cuda(*args)]
        raise errors.InvalidInput(f"unknown call {op!r} on the link")

    async def _answer_call(self, op: str, args: list, head: dict, body) -> tuple[object, bytes]:
        core, info, control = self.backend.core, self.backend.info, self.backend.control
        if op == "hello":
            index, pid = args
            self.server.listening[index] = pid
            self.server.greeted.set()
            return None, b""
        if op == "model_ready":
            return await core.model_ready(*args), b""
        if op == "model":
            return self.model_head(await info.model(*args)), b""
        if op == "ready_versions":
            return await info.ready_versions(*args), b""
        if op == "config":
            return None, (await info.config(*args)).SerializeToString()
        if op == "statistics":
            return None, (await info.statistics(*args)).SerializeToString()
        if op == "index":
            return await control.index(*args), b""
        if op == "load":
            files, offset = {}, 0
            for key, size in head["files"]:
                files[key], offset = bytes(body[offset : offset + size]), offset + size
            await control.load(args[0], {**head["strings"], **files})
            return None, b""
        if op == "unload":
            await control.unload(*args)
            return None, b""
        if op.startswith("region_"):
            return await self._region_call(op, args), b""
        if op == "trace_view":
            return await self.backend.traces.view(*args), b""
        if op == "trace_update":
            return await self.backend.traces.update(*args), b""
        raise errors.InvalidInput(f"unknown call {op!r} on the link")
