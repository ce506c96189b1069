"""The transport-neutral request path, one for gRPC and HTTP: resolve the model version,
admit a decoded request into its batcher, say what the answer cost, and report how the
request ended. The transports decode before it and encode after it.

What a front end hands in is this module's vocabulary and the shared modules' (a DecodedRequest,
an Identity, request parameters); what it gets back is an Answer and the accounting parameters."""

import contextlib
import logging
import time
from collections.abc import Mapping

from server.engine.call import Call, Identity, outcome_of, request_scope
from server.engine.costs import CostLedger, Share
from server.engine.queued import Answer, QueuedRequest
from server.engine.usage_log import UsageLog
from server.errors import InvalidInput, Overloaded, ShuttingDown
from server.models.repository import ModelRepository, ModelVersion
from server.observe.events import EventBus, RequestFinished, RequestStarted
from server.tensors import DecodedRequest

# Response parameters that tell a caller what its own request went through and cost.
COST_PARAMETER = "onnxserve_cost_dollars"
ENERGY_PARAMETER = "onnxserve_energy_joules"
DEVICE_PARAMETER = "onnxserve_device"
QUEUE_PARAMETER = "onnxserve_queue_us"
COMPUTE_PARAMETER = "onnxserve_compute_us"
BATCH_PARAMETER = "onnxserve_batch_rows"
BATCH_ID_PARAMETER = "onnxserve_batch_id"
TENANT_PARAMETER = "onnxserve_tenant"
TRACE_PARAMETER = "onnxserve_trace_id"  # where the request was traced: find its trace by this id

log = logging.getLogger(__name__)


class InferenceCore:
    """The engine's request API: admit a decoded request, answer its own rows, say what it cost,
    and report how it ended. The transports decode before it and encode after it; a request's
    life is `request()` around one coroutine, or `start()` then `end()` where the answer comes
    back through a callback (a stream's requests have no task of their own)."""

    def __init__(
        self,
        repository: ModelRepository,
        bus: EventBus,
        ledger: CostLedger,
        strict_readiness: bool,
        usage: UsageLog | None = None,
    ) -> None:
        self._repository, self._bus, self._ledger, self._usage = repository, bus, ledger, usage
        self._strict_readiness = strict_readiness
        self.shutting_down = False  # set by the stop: new requests are refused, readiness is off
        self.tracing = None  # server/observe/tracing.Tracing, where an exporter endpoint is configured
        self.governor = None  # server/engine/governor.Governor, with --tenant-limits

    def ready(self) -> bool:
        if self.shutting_down or not self._repository.loaded:
            return False
        return self._repository.all_ready() or not self._strict_readiness

    async def model_ready(self, name: str, version: str) -> bool:
        return not self.shutting_down and self._repository.is_ready(name, version)

    def start(self, protocol: str, identity: Identity) -> Call:
        return Call(time.perf_counter(), protocol, identity)

    def request(self, protocol: str, identity: Identity) -> contextlib.AbstractContextManager[Call]:
        """One request from receipt to response: its outcome is reported however the block ends."""
        return request_scope(self, protocol, identity)

    def end(self, call: Call, error: BaseException | None = None) -> None:
        """The request is over: answered (no error), refused or failed (`error`), or its caller
        went away (CancelledError)."""
        self.finish(call, outcome_of(error))

    async def resolve(self, call: Call, name: str, version: str) -> ModelVersion:
        """The version that will answer; raises ShuttingDown, ModelNotFound or ModelNotReady. A
        coroutine because a front end in a process of its own asks the engine (link_client.py)."""
        return self.resolve_now(call, name, version)

    def resolve_now(self, call: Call, name: str, version: str) -> ModelVersion:
        """resolve(), here and at once: the link's engine end resolves in the order frames arrive."""
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self._usage is not None:
            if not self._usage.reserve():  # rather refused than served unbilled
                raise Overloaded(self._usage.behind_message())
            call.reserved, call.requested = True, (name, version)
        if self.governor is not None:  # before any decoding: a tenant over its limits costs little
            self.governor.admit(call.identity.tenant, call.identity.label)
            call.governed = True
        model = call.model = self._repository.get(name, version)
        self._bus.publish(RequestStarted(model.name, model.version))
        if self.tracing is not None:
            self._traced(lambda: self.tracing.begin(call, *(call.trace_parent or (None, None))))
        return model

    def cancel(self, call: Call) -> None:
        """The caller went away: its request leaves the queue, or its rows are dropped if its batch runs."""
        if call.item is not None:
            call.model.batcher.cancel(call.item)

    def enqueue(self, call: Call, decoded: DecodedRequest, parameters: Mapping[str, object]) -> QueuedRequest:
        """Queue a decoded request on its version's batcher; its future resolves with the Answer."""
        call.rows, call.outputs = decoded.rows, decoded.outputs
        priority, timeout_us = request_options(parameters, call.model)
        if call.governed:
            self.governor.admit_rows(call.identity.tenant, decoded.rows)
            priority = priority or self._tenant_priority(call)
        model, tenant = call.model, call.identity.label
        if model.sequences is None:
            call.item = model.batcher.enqueue(
                decoded.feeds, decoded.rows, decoded.outputs, priority=priority, timeout_us=timeout_us, tenant=tenant
            )
        else:
            call.item = model.sequences.enqueue(
                decoded.feeds,
                decoded.rows,
                decoded.outputs,
                parameters,
                priority=priority,
                timeout_us=timeout_us,
                tenant=tenant,
            )
        if call.span is not None:
            call.item.span = call.span.context
        return call.item

    async def infer(self, call: Call, decoded: DecodedRequest, parameters: Mapping[str, object]) -> Answer:
        """Queue a decoded request and wait for its own rows; a cancelled caller leaves the queue."""
        call.answer = await call.model.batcher.collect(self.enqueue(call, decoded, parameters))
        return call.answer

    def accounting(self, call: Call, answer: Answer) -> list[tuple[str, int | float | str]]:
        """The response parameters that say what this request went through, cost, and who paid."""
        said: list[tuple[str, int | float | str]] = [
            (QUEUE_PARAMETER, round(answer.queue_seconds * 1e6)),
            (COMPUTE_PARAMETER, round(answer.compute_seconds * 1e6)),
            (BATCH_PARAMETER, answer.batch_rows),
            (BATCH_ID_PARAMETER, answer.batch_id),
            (DEVICE_PARAMETER, answer.device),
            (TENANT_PARAMETER, call.identity.tenant),
        ]
        share = self._ledger.share(answer.batch_id, call.rows)
        if share is None:  # never: a batch's cost stays until its requests have settled
            log.error("cost of batch %d is unknown when its response is sent", answer.batch_id)
            return said
        said.append((COST_PARAMETER, share.dollars))
        if share.joules is not None:
            said.append((ENERGY_PARAMETER, share.joules))
        if call.span is not None:
            said.append((TRACE_PARAMETER, call.span.trace_id))
        return said

    def _tenant_priority(self, call: Call) -> int:
        """The tenant's priority level (--tenant-limits), within the model's levels; 0: the model's default."""
        levels = call.model.settings.batching.priority_levels
        wanted = self.governor.priority(call.identity.tenant)
        return min(wanted, levels) if wanted and levels else 0

    def finish(self, call: Call, outcome: str) -> None:
        """Report how the request ended; settle its cost (and write its usage record) once its
        batch, if it had one, is over: a caller gone while its batch runs still pays for its rows."""
        if call.model is not None:  # unknown names would make unbounded label values
            model = call.model
            seconds = time.perf_counter() - call.started
            label, traced = call.identity.label, call.span.trace_id if call.span is not None else ""
            self._bus.publish(
                RequestFinished(model.name, model.version, outcome, call.rows, seconds, call.protocol, label, traced)
            )
        if call.governed:
            self.governor.release(call.identity.tenant)
        item = call.item
        if item is not None and item.batch_id and not item.executed:
            item.on_executed = lambda: self._settle(call, outcome)
        else:
            self._settle(call, outcome)

    def _settle(self, call: Call, outcome: str) -> None:
        item = call.item
        share = self._ledger.settle(item.batch_id, item.rows) if item is not None and item.batch_id else None
        if share is not None and self.governor is not None:
            self.governor.charge(call.identity.tenant, share.dollars)
        if call.reserved:
            self._usage.append(self._usage_record(call, outcome, share))
        if call.span is not None:
            self._traced(lambda: self.tracing.end(call, outcome, share))

    @staticmethod
    def _traced(step) -> None:
        """A tracing step: its failure is logged, never the request's."""
        try:
            step()
        except Exception:  # noqa: BLE001 - traces observe; they must not fail what they observe
            log.exception("tracing a request failed")

    def _usage_record(self, call: Call, outcome: str, share: Share | None) -> tuple:
        """usage_log.FIELDS, in order."""
        model, version = (call.model.name, call.model.version) if call.model is not None else call.requested
        answer, item, identity = call.answer, call.item, call.identity
        queue_us = compute_us = batch_rows = None
        if answer is not None:
            queue_us, compute_us = round(answer.queue_seconds * 1e6), round(answer.compute_seconds * 1e6)
            batch_rows = answer.batch_rows
        elif item is not None and item.taken:
            queue_us = round((item.taken - item.arrival) * 1e6)
        dollars = joules = price = source = device = None
        if share is not None:
            device, dollars, joules = share.device, share.dollars, share.joules
            price = self._ledger.price(device)
            price, source = price.dollars_per_hour, price.source
        batch_id = item.batch_id if item is not None and item.batch_id else None
        return (
            time.time(),
            call.request_id,
            identity.tenant,
            identity.source,
            model,
            version,
            call.protocol,
            outcome,
            call.rows,
            device,
            batch_id,
            batch_rows,
            queue_us,
            compute_us,
            dollars,
            joules,
            price,
            source,
        )


def request_options(parameters: Mapping[str, object], model: ModelVersion) -> tuple[int, int]:
    """The reserved `priority` and `timeout` (microseconds) request parameters."""
    if not parameters:
        return 0, 0
    values = []
    for key in ("priority", "timeout"):
        value = parameters.get(key)
        if value is None:
            values.append(0)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(
                f"{model.signature.label}: parameter '{key}' must be a non-negative integer; got {type(value).__name__} {value!r}"
            )
        values.append(value)
    return values[0], values[1]
