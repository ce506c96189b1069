"""The gRPC server: the inference service, the standard health service (which follows
readiness) and reflection, on one port with the server's bounds, started in the running loop.
REST's counterpart is http_service.start_http."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import protocol
from server.config import ServerSettings
from server.frontend.backend import Backend
from server.frontend.grpc_service import InferenceService
from server.frontend.process_limits import grpc_options
from server.frontend.tls import grpc_credentials

if TYPE_CHECKING:  # named, not imported: see backend.py
    from server.engine.inference import InferenceCore


LIVENESS_SERVICE = "liveness"  # SERVING while the process runs, loading included: for liveness probes
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    core: InferenceCore

    async def start(self) -> None:
        await self.server.start()

    async def serving(self, ready: bool) -> None:
        """Health says whether the server is ready (app.py follows readiness)."""
        await self.set_health(SERVING if ready else NOT_SERVING)

    async def mirror_readiness(self, changed: asyncio.Event) -> None:
        """In a front-end process: health follows the engine's readiness as the link tells it (the
        engine's process says when the server is ready). Stops only when cancelled."""
        serving = None
        while True:
            if self.core.ready() != serving:
                serving = self.core.ready()
                await self.set_health(SERVING if serving else NOT_SERVING)
            await changed.wait()
            changed.clear()

    async def set_health(self, status) -> None:
        for name in ("", protocol.SERVICE_NAME):
            await self.health.set(name, status)


async def start_grpc(settings: ServerSettings, backend: Backend) -> GrpcServer:
    """Bound, health NOT_SERVING (liveness SERVING) until readiness (app.py) says otherwise; it serves
    once `start()` is called, after /metrics is up, as a failed start then leaves nothing serving."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
            ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
            *grpc_options(settings),  # connections, idle time, calls per connection, the wait for HTTP/2
        ]
    )
    server.add_generic_rpc_handlers((InferenceService(backend, settings.grpc_restricted_protocol).handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (protocol.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=protocol.POOL
    )
    target, credentials = f"{settings.grpc_address}:{settings.grpc_port}", grpc_credentials(settings)
    port = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    bound = GrpcServer(server, port, health_servicer, backend.core)
    await bound.set_health(NOT_SERVING)
    await health_servicer.set(LIVENESS_SERVICE, SERVING)
    return bound
