"""Composition root and lifecycle: build, serve, become ready, drain on a signal."""

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector

from server import processes, shutdown
from server.config import ServerSettings
from server.engine.costs import CostLedger, resolve_prices
from server.engine.cpus import cpu_cores
from server.engine.energy import SampledMeters
from server.engine.fair_share import WEIGHTS
from server.engine.governor import Governor, limits_snapshot
from server.engine.inference import InferenceCore
from server.engine.placement import CPU, GpuPolicy
from server.engine.tenant_limits import LimitsFollower
from server.engine.usage_log import UsageLog, spend_records
from server.errors import ConfigError
from server.frontend.backend import Backend
from server.frontend.connection_limits import ConnectionMetrics
from server.frontend.cuda_regions import CudaRegions
from server.frontend.grpc_server import start_grpc
from server.frontend.identity import Authenticator
from server.frontend.link_server import LinkServer
from server.frontend.metrics_server import start_metrics_server
from server.frontend.model_info import ModelInfo
from server.frontend.process_limits import ensure_open_files
from server.frontend.request_limits import Offload, RequestLimits
from server.frontend.shared_regions import SharedRegions
from server.frontend.tls import describe, tls_files
from server.frontends import Frontends, listen_http, reserve_grpc_port, scratch_directory
from server.models.control import RepositoryControl
from server.models.polling import RepositoryPoller
from server.models.repository import ModelRepository
from server.observe import log_limits
from server.observe.events import (
    BatchExecuted,
    BatchStarted,
    EventBus,
    ModelStateChanged,
    RepositoryChanged,
    RequestFinished,
)
from server.observe.frontend_metrics import FrontendSeries
from server.observe.metrics import CostCollector, GpuCollector, GpuReader, MetricsObserver
from server.observe.sequence_metrics import SequenceMetrics
from server.observe.statistics import StatisticsRecorder
from server.observe.tenant_metrics import TenantCollector, TenantLimitsCollector, TenantRequests, UsageLogCollector
from server.observe.trace_config import trace_config
from server.observe.trace_settings import TraceSettings

log = logging.getLogger("onnxserve")
FORCED_EXIT_CODE = 130
FRONTEND_START_SECONDS = 60.0  # each front end imports, binds and connects in about a second


@dataclass
class Engine:
    """What the engine owns, built once: the models and their batchers, the core, the bill
    (ledger, GPU energy, usage log) and the observers that watch them, on one registry."""

    bus: EventBus
    registry: CollectorRegistry
    gpus: GpuReader | None
    ledger: CostLedger
    energy: SampledMeters
    statistics: StatisticsRecorder
    usage: UsageLog | None
    repository: ModelRepository
    core: InferenceCore
    traces: TraceSettings  # Triton's trace settings, read and changed while serving
    limits: LimitsFollower | None  # --tenant-limits, followed while serving


def build_engine(settings: ServerSettings, auth: Authenticator) -> Engine:
    """The engine and its observers (`auth`: whose tenants' series /metrics shows); no model loaded yet."""
    bus, registry = EventBus(), CollectorRegistry()
    gpus = GpuReader.open()
    if gpus is None:
        log.warning("no GPU is visible: every model runs on onnxruntime's %s", CPU)
    ledger, energy = _cost_ledger(settings, gpus)
    statistics, usage = StatisticsRecorder(), _usage_log(settings)
    _observe(bus, registry, ledger, statistics, auth, usage, gpus)
    repository = _repository(settings, bus, gpus)
    core = InferenceCore(repository, bus, ledger, settings.strict_readiness, usage)
    traces = _tracing(settings, core, bus, registry, ledger)
    limits = _tenant_limits(settings, core, registry)
    return Engine(bus, registry, gpus, ledger, energy, statistics, usage, repository, core, traces, limits)


def _tenant_limits(settings: ServerSettings, core: InferenceCore, registry) -> LimitsFollower | None:
    """--tenant-limits: the governor on the core, its spend so far this month from the usage log."""
    if not settings.tenant_limits:
        return None
    follower = LimitsFollower(settings.tenant_limits)  # a bad file stops the start, naming file and field
    governor = core.governor = Governor(lambda: follower.current)
    WEIGHTS.use(lambda tenant: follower.current.of(tenant).weight)  # full batches shared by weight
    if settings.usage_log:
        counted = governor.rebuild(spend_records(settings.usage_log))
        log.info("tenant limits: this month's spend rebuilt from %d usage records", counted)
    registry.register(TenantLimitsCollector(lambda: limits_snapshot(governor)))
    log.info("tenant limits: %d tenants and a default from %s", len(follower.current.tenants), settings.tenant_limits)
    return follower


def _follow(engine: Engine) -> list[asyncio.Task]:
    """The files the engine re-reads while serving, as tasks the stop cancels."""
    return [asyncio.create_task(engine.limits.follow())] if engine.limits is not None else []


def _tracing(settings: ServerSettings, core: InferenceCore, bus: EventBus, registry, ledger: CostLedger):
    """Traces where an OTLP endpoint is configured (the SDK is imported only then); the settings always."""
    config = trace_config(settings.trace_config, os.environ)
    if not config.endpoint:
        return TraceSettings(config)
    from server.observe.tracing import Tracing  # imports OpenTelemetry's SDK

    def batch_cost(batch_id: int, rows: int) -> float | None:
        share = ledger.share(batch_id, rows)
        return None if share is None else share.dollars

    tracing = core.tracing = Tracing(config, registry, batch_cost)
    for event_type, handler in tracing.handlers().items():
        bus.subscribe(handler, event_type)  # after the ledger: a batch's span says what it cost
    return tracing.settings


async def serve(settings: ServerSettings) -> int:
    asyncio.get_running_loop().set_exception_handler(log_limits.install(settings.log_repeat_secs))
    ensure_open_files(settings)
    if settings.frontends > 1:
        return await serve_frontends(settings)
    auth = _authenticator(settings)
    engine = build_engine(settings, auth)
    backend = _backend(settings, engine, auth)
    following = _follow(engine)

    grpc = await start_grpc(settings, backend)
    connections = ConnectionMetrics(engine.registry)
    metrics_httpd = start_metrics_server(engine.registry, settings, connections)
    await grpc.start()
    http, http_bound = None, 0
    if settings.http_port >= 0:  # imported only then: a gRPC-only install needs no HTTP stack
        from server.frontend.http_service import HttpApi, http_port, start_http

        api = HttpApi(backend, settings.http_restricted_api, settings.http_max_body_bytes)
        http = await start_http(settings, api, connections)
        http_bound = http_port(http)
    ports = _log_listening(settings, grpc.port, metrics_httpd.server_port, http_bound if http else None)
    followers = await _serve_until_signal(
        settings,
        engine.bus,
        engine.repository,
        auth,
        lambda changed: _follow_readiness(engine.core, changed, ports, grpc.serving),
    )
    return await _stop(settings, engine, backend, grpc, http, metrics_httpd, [*followers, *following])


async def serve_frontends(settings: ServerSettings) -> int:
    """--frontends N > 1: this process is the engine (models, batching, the bill, /metrics), and N
    front-end processes serve gRPC and REST over the link (server/frontends.py). The stop takes
    --exit-timeout-secs in all: the front ends drain first, the engine gets what is left."""
    processes.set_title("engine")
    auth = _authenticator(settings)
    engine = build_engine(settings, auth)
    backend = _backend(settings, engine, auth)
    following = _follow(engine)
    reserved = reserve_grpc_port(settings)
    http_socket = listen_http(settings) if settings.http_port >= 0 else None
    loop = asyncio.get_running_loop()
    with scratch_directory() as scratch:
        link = LinkServer(backend)
        await link.start(os.path.join(scratch, "engine.sock"))
        engine.bus.subscribe(lambda _: link.broadcast(), RepositoryChanged)
        frontends = Frontends(settings.frontends, sys.argv[1:], reserved.getsockname()[1], http_socket, link.path)
        metrics_httpd = start_metrics_server(engine.registry, settings, _frontend_series(engine.registry, frontends))
        frontends.start()
        try:
            await frontends.listening(link.listening, link.greeted, FRONTEND_START_SECONDS)
            http_bound = http_socket.getsockname()[1] if http_socket else None
            ports = _log_listening(settings, reserved.getsockname()[1], metrics_httpd.server_port, http_bound)
            supervising = asyncio.create_task(frontends.supervise())
            followers = await _serve_until_signal(
                settings,
                engine.bus,
                engine.repository,
                auth,
                lambda changed: _follow_readiness(engine.core, changed, ports, _broadcasting(link)),
            )
            stopping = loop.time()
            engine.core.shutting_down = True  # the front ends answer what they accepted, then stop
            link.broadcast()
            supervising.cancel()
        finally:
            await frontends.stop(settings.exit_timeout_secs)
            link.close()
    reserved.close()
    if http_socket is not None:
        http_socket.close()
    left = max(0.0, settings.exit_timeout_secs - (loop.time() - stopping))
    return await _stop(
        settings, engine, backend, None, None, metrics_httpd, [*followers, supervising, *following], left
    )


def _frontend_series(registry: CollectorRegistry, frontends: Frontends) -> ConnectionMetrics:
    """The front ends' series on the engine's registry, summed with the engine's own connection
    series (which this returns, for its /metrics listener)."""
    own = CollectorRegistry()
    registry.register(FrontendSeries(frontends.metrics_directory, own, frontends.pids, lambda: frontends.restarted))
    return ConnectionMetrics(own)


def _broadcasting(link: LinkServer):
    async def publish(ready: bool) -> None:
        link.broadcast()

    return publish


def _backend(settings: ServerSettings, engine: Engine, auth: Authenticator) -> Backend:
    return Backend(
        engine.core,
        ModelInfo(engine.repository, engine.statistics, engine.ledger),
        RepositoryControl(engine.repository, settings.model_control_mode),
        auth,
        RequestLimits.from_settings(settings),
        Offload(),
        SharedRegions(cuda=CudaRegions()),  # with front ends in processes of their own, the registry they all ask
        engine.traces,
        settings.id,
    )


async def _stop(
    settings, engine: Engine, backend: Backend, grpc, http, metrics_httpd, followers, timeout: float | None = None
) -> int:
    serving = shutdown.Serving(
        grpc,
        http,
        engine.core,
        backend.offload,
        engine.repository,
        engine.usage,
        metrics_httpd,
        engine.energy,
        engine.gpus,
        followers,
    )
    status = await shutdown.stop(serving, settings.exit_timeout_secs if timeout is None else timeout)
    if engine.core.tracing is not None:
        await asyncio.to_thread(engine.core.tracing.close)  # what is buffered is exported, a few seconds at most
    return status


async def _follow_readiness(core: InferenceCore, changed: asyncio.Event, ports: str, publish) -> None:
    """Readiness, published (`publish(ready)`: gRPC health, or the front ends): once the start-up
    loads are done, then after every load or unload (`changed`), until the stop turns it off.
    Stops only when cancelled."""
    serving = core.ready()
    if serving:
        await publish(True)
        log.info("ready: %s", ports)  # server/tools/launcher.py's READY_LINE reads it
    else:
        log.error("not ready: some models failed to load (--strict-readiness is on); see the errors above")
    while True:
        await changed.wait()
        changed.clear()
        if core.ready() != serving and not core.shutting_down:
            serving = not serving
            await publish(serving)
            log.info("readiness is now %s", "SERVING" if serving else "NOT_SERVING")


def _authenticator(settings: ServerSettings) -> Authenticator:
    mutual_tls = settings.grpc_use_ssl_mutual or settings.http_use_ssl_mutual
    return Authenticator(settings.api_keys, settings.trust_tenant_header, mutual_tls, settings.max_tenant_series)


def _repository(settings: ServerSettings, bus: EventBus, gpus: GpuReader | None) -> ModelRepository:
    gpu = GpuPolicy(
        settings.require_gpu,
        Path(settings.tensorrt_cache_dir) if settings.tensorrt_cache_dir else None,
        hardware=",".join(sorted(set(gpus.names().values()))) if gpus else "",
    )
    return ModelRepository(
        settings.model_repository,
        settings.default_max_batch_size,
        bus,
        gpu,
        settings.model_load_timeout_secs,
        settings.default_max_queue_size,
        names_in_errors=not settings.api_keys,
    )


async def _serve_until_signal(
    settings: ServerSettings, bus: EventBus, repository: ModelRepository, auth: Authenticator, follow_readiness
) -> list[asyncio.Task]:
    """Load the start-up models, then follow readiness (`follow_readiness(changed)`), the keys file
    and the repository, until the first SIGTERM/SIGINT. Returns the tasks for the stop to cancel."""
    stop = _install_signal_handlers()
    poller = RepositoryPoller(repository, settings.repository_poll_secs)
    if settings.model_control_mode == "poll":
        poller.start(await asyncio.to_thread(poller.scan))  # before loading: changes made meanwhile count
    changed = asyncio.Event()
    bus.subscribe(lambda _: changed.set(), RepositoryChanged)
    loading = asyncio.create_task(repository.load_all(_startup_models(settings, repository)))
    followers = [asyncio.create_task(auth.follow())] if settings.api_keys else []
    await asyncio.wait((loading, asyncio.create_task(stop.wait())), return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        loading.result()
        processes.settle_heap()
        followers.append(asyncio.create_task(follow_readiness(changed)))
        if settings.model_control_mode == "poll":
            followers.append(asyncio.create_task(poller.run()))
        await stop.wait()
    return [loading, *followers]


def _observe(
    bus: EventBus,
    registry: CollectorRegistry,
    ledger: CostLedger,
    statistics: StatisticsRecorder,
    auth: Authenticator,
    usage: UsageLog | None,
    gpus: GpuReader | None,
) -> None:
    """Metrics, cost, statistics and tenants follow the bus; /metrics collects from them."""
    for observer in (MetricsObserver(registry), TenantRequests(registry), SequenceMetrics(registry)):
        for event_type, handler in observer.handlers().items():
            bus.subscribe(handler, event_type, deferred=True)
    bus.subscribe(ledger.observe, BatchStarted, BatchExecuted, ModelStateChanged)
    bus.subscribe(statistics.observe, RequestFinished, BatchExecuted, deferred=True)
    registry.register(CostCollector(ledger.snapshot))
    registry.register(TenantCollector(auth))
    if usage is not None:
        registry.register(UsageLogCollector(usage))
    if gpus:
        registry.register(GpuCollector(gpus))
    ProcessCollector(registry=registry)


def _log_listening(settings: ServerSettings, grpc_port: int, metrics_port: int, http_port: int | None) -> str:
    """Logs where the server listens; returns the ports, for the ready line."""
    http_tls = describe(tls_files(settings, "http"))
    http_where = (
        f"HTTP on {settings.http_address}:{http_port}{http_tls}"
        if http_port is not None
        else "HTTP off (--http-port -1)"
    )
    log.info(  # bench/serving.py parses this line: keep its regexes in step
        "listening: gRPC on %s:%d%s, metrics on %s://%s:%d/metrics, %s; loading models from %s",
        settings.grpc_address,
        grpc_port,
        describe(tls_files(settings, "grpc")),
        "https" if settings.metrics_use_ssl else "http",
        settings.metrics_address,
        metrics_port,
        http_where,
        settings.model_repository,
    )
    return f"gRPC port {grpc_port}, metrics port {metrics_port}" + (f", HTTP port {http_port}" if http_port else "")


def _usage_log(settings: ServerSettings) -> UsageLog | None:
    if not settings.usage_log:
        return None
    usage = UsageLog(
        settings.usage_log, settings.usage_log_fsync_ms, settings.usage_log_max_bytes, settings.usage_log_buffer_records
    )
    try:
        usage.open()
    except OSError as err:
        raise ConfigError(
            f"--usage-log: {settings.usage_log}: cannot be opened for appending: {err.strerror}"
        ) from None
    return usage


def _startup_models(settings: ServerSettings, repository: ModelRepository) -> list[str]:
    """none and poll: every model; explicit: those named by --load-model ('*' = every one)."""
    if settings.model_control_mode != "explicit" or "*" in settings.load_model:
        return repository.discover()
    return list(dict.fromkeys(settings.load_model))


def _cost_ledger(settings: ServerSettings, gpus: GpuReader | None) -> tuple[CostLedger, SampledMeters]:
    configured = {p.device: (p.dollars_per_hour, p.source) for p in settings.device_price}
    prices = resolve_prices(configured, gpus.names() if gpus else {}, cpu_cores())
    meters = {}
    for device in gpus.handles if gpus else ():
        if (meter := gpus.energy_meter(device)) is not None:
            meters[device] = meter
    log.info(
        "cost: %s; energy measured on %s",
        ", ".join(f"{device} ${p.dollars_per_hour:g}/h ({p.source})" for device, p in sorted(prices.items())),
        ", ".join(sorted(meters)) or "no device (no GPU energy counter)",
    )
    energy = SampledMeters(meters)  # NVML is read by a thread of its own, never on the loop
    return CostLedger(prices, {device: energy.meter(device) for device in energy.devices}), energy


def _install_signal_handlers() -> asyncio.Event:
    """First SIGTERM/SIGINT: graceful drain. Second: exit at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now without draining", signal.Signals(signum).name)
            os._exit(FORCED_EXIT_CODE)
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop
