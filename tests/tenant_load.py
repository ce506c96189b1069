"""Concurrent callers of one model on behalf of several tenants (tritonclient.grpc.aio), each
request with an id of its own, each answer checked (y = x + 1) and remembered by id."""

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel that shares no connection


@dataclass
class Result:
    outcome: str  # "ok", or the gRPC status of the error
    tenant: str = ""  # the onnxserve_tenant response parameter
    batch_id: int = 0
    cost: float = 0.0
    answered_at: float = 0.0  # time.monotonic()
    message: str = ""
    frontend: int = 0  # the onnxserve_frontend response parameter, with --frontends N > 1


@dataclass
class TenantLoad:
    url: str
    model: str
    headers: dict[str, dict[str, str]]  # caller group -> the headers its calls carry
    callers: int = 4  # per group
    requests: int = 0  # per caller; 0: until stopped
    own_connections: bool = False  # a connection per caller (grpc shares one per address otherwise)
    results: dict[str, Result] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)  # id -> time.monotonic() it was sent
    wrong: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def run(self) -> "TenantLoad":
        asyncio.run(self._run())
        return self

    def start(self) -> "TenantLoad":
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def ok(self) -> dict[str, Result]:
        return {key: result for key, result in self.results.items() if result.outcome == "ok"}

    async def _run(self) -> None:
        count = len(self.headers) * self.callers if self.own_connections else 1
        clients = [aioclient.InferenceServerClient(self.url, channel_args=OWN_CONNECTION) for _ in range(count)]
        try:
            callers = [
                self._call(clients[(number * self.callers + caller) % count], group, caller)
                for number, group in enumerate(self.headers)
                for caller in range(self.callers)
            ]
            await asyncio.gather(*callers)
        finally:
            for client in clients:
                await client.close()

    async def _call(self, client, group: str, caller: int) -> None:
        sent = 0
        while not self._stop.is_set() and (not self.requests or sent < self.requests):
            rows = 1 + (caller + sent) % 3
            x = (caller * 1000 + sent * 10 + np.arange(rows * 4, dtype=np.float32)).reshape(rows, 4)
            tensor = aioclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            request_id = f"{group}-{caller}-{sent}"
            sent += 1
            self.sent[request_id] = time.monotonic()
            try:
                result = await client.infer(self.model, [tensor], request_id=request_id, headers=self.headers[group])
            except InferenceServerException as err:
                self.results[request_id] = Result(
                    str(err.status()), answered_at=time.monotonic(), message=err.message()
                )
                await asyncio.sleep(0.005)
                continue
            if not np.array_equal(result.as_numpy("y"), x + 1):
                self.wrong.append(f"{request_id}: got {result.as_numpy('y')} for {x}")
            parameters = result.get_response().parameters
            self.results[request_id] = Result(
                "ok",
                parameters["onnxserve_tenant"].string_param,
                parameters["onnxserve_batch_id"].int64_param,
                parameters["onnxserve_cost_dollars"].double_param,
                time.monotonic(),
                frontend=parameters["onnxserve_frontend"].int64_param if "onnxserve_frontend" in parameters else 0,
            )
