"""/metrics on an event loop of its own, in one daemon thread.

prometheus_client's start_http_server is a ThreadingWSGIServer: a thread per connection, with no
timeout, so 200 idle sockets held 200 threads. Here every connection is a protocol object of one
loop, with REST's bounds (server/frontend/connection_limits.py: header size, a timeout for a request that
does not arrive, TLS handshake included, and a cap on open connections). Not the server's main loop:
a scrape's text is CPU work (prometheus_client's generate_latest), and inference should not wait on it.
"""

import asyncio
import concurrent.futures
import logging
import threading

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app

from server.config import ServerSettings
from server.frontend.connection_limits import ConnectionMetrics, LimitedHttpToolsProtocol, Listener, http_limits, listen
from server.frontend.tls import metrics_cert_and_key
from server.observe.log_limits import Repeats, loop_exception_handler

log = logging.getLogger(__name__)

START_SECONDS = 30.0  # binding a port takes milliseconds; this only bounds a wedged start
CLOSE_SECONDS = 1.0  # scrapes in flight at shutdown: they are quick, and nobody waits for them


class MetricsServer:
    """The running /metrics endpoint: its bound port, and shutdown()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: uvicorn.Server) -> None:
        self._loop, self._thread, self._server = loop, thread, server

    @property
    def server_port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    def shutdown(self) -> None:
        """Stop listening, close the connections and end the thread; blocks for about a second at most."""
        if not self._thread.is_alive():
            return
        closed = asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
        try:
            closed.result(CLOSE_SECONDS + 2)
        except (concurrent.futures.TimeoutError, OSError) as err:
            log.warning("/metrics did not close in time (%s); its thread ends with the process", err)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_SECONDS)


def start_metrics_server(
    registry: CollectorRegistry, settings: ServerSettings, connections: ConnectionMetrics | None = None
) -> MetricsServer:
    """Serve the registry on --metrics-address/--metrics-port (TLS with --metrics-use-ssl, plain
    otherwise); returns once it listens, or raises what binding raised (a port in use)."""
    certfile, keyfile = metrics_cert_and_key(settings)
    config = uvicorn.Config(
        make_asgi_app(registry),
        host=settings.metrics_address,
        port=settings.metrics_port,
        http=LimitedHttpToolsProtocol,
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=75,  # as REST: a scraper's kept-alive connection outlives a 60 s scrape interval
        timeout_graceful_shutdown=CLOSE_SECONDS,
        ssl_certfile=certfile or None,
        ssl_keyfile=keyfile or None,
    )
    listener = Listener("metrics", http_limits(settings, "metrics"), connections)
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future = concurrent.futures.Future()
    handler = loop_exception_handler(Repeats(settings.log_repeat_secs))
    thread = threading.Thread(target=_run, args=(loop, config, listener, started, handler), name="metrics", daemon=True)
    thread.start()
    return MetricsServer(loop, thread, started.result(START_SECONDS))


def _run(loop: asyncio.AbstractEventLoop, config: uvicorn.Config, listener: Listener, started, handler) -> None:
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(handler)
    try:
        server = loop.run_until_complete(listen(config, listener))
    except Exception as err:  # the caller raises it, in the main thread
        started.set_exception(err)
        loop.close()
        return
    started.set_result(server)
    try:
        loop.run_forever()
    finally:
        pending = asyncio.all_tasks(loop)  # TLS handshakes under way
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
