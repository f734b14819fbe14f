"""Running servers: the event loop choice, ``run_coroutine``, ``serve``/``run``, signals.

``serve`` runs a ``Server`` until SIGINT/SIGTERM; ``run`` does the same on a
new event loop (uvloop when installed, as uvicorn does). The first signal
starts a graceful shutdown and restores the default dispositions, so a
second one kills the process at once, even if a handler blocks the loop.
With a ``drain_delay``, the first signal only announces the drain
(``Server.announce_drain``: ``/readyz`` answers 503) and the server keeps
accepting and serving for that many seconds before the graceful shutdown, so
a load balancer sees it leave before connections are refused. On a server
given its TLS files (``ssl=TLSFiles(...)``), SIGHUP reloads them
(``Server.reload_tls``); elsewhere it is logged and ignored. With a
``metrics_address``, ``serve`` also runs the metrics and health endpoint
(``fastnet.health``) on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .health import HealthEndpoint, default_registry
from .server import Server
from .supervisor import Handler

__all__ = ["new_event_loop", "run", "run_coroutine", "serve"]

logger = logging.getLogger("fastnet")

T = TypeVar("T")


def new_event_loop(loop: str = "auto") -> asyncio.AbstractEventLoop:
    """Return a new event loop: ``"uvloop"``, ``"asyncio"``, or ``"auto"`` (uvloop if installed).

    Raises:
        RuntimeError: ``"uvloop"`` was asked for and is not installed.
        ValueError: an unknown loop name.
    """
    if loop not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"loop must be 'auto', 'asyncio' or 'uvloop', got {loop!r}")
    if loop != "asyncio":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if loop == "uvloop":
                raise RuntimeError("uvloop is not installed (pip install uvloop)") from None
        else:
            new_loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return new_loop
    return asyncio.new_event_loop()


def run_coroutine(coro: Coroutine[Any, Any, T], *, loop: str = "auto") -> T:
    """Run ``coro`` on a new event loop and close the loop: ``asyncio.run`` with a loop choice.

    (asyncio.Runner's loop_factory does this from Python 3.11; fastnet supports 3.10.)
    """
    ev = new_event_loop(loop)
    try:
        asyncio.set_event_loop(ev)
        return ev.run_until_complete(coro)
    finally:
        try:
            _cancel_all_tasks(ev)
            ev.run_until_complete(ev.shutdown_asyncgens())
            ev.run_until_complete(ev.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            ev.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )


async def serve(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_ready: Callable[[Server], object] | None = None,
    handle_signals: bool = True,
    drain_delay: float = 0.0,
    metrics_address: tuple[str, int] | None = None,
    on_metrics_ready: Callable[[HealthEndpoint], object] | None = None,
    **kwargs: Any,
) -> None:
    """Run a ``Server`` until it is shut down; with signals, until SIGINT/SIGTERM.

    Args:
        handler, host, port, **kwargs: as ``Server``.
        on_ready: called with the server once it is listening (and the
            metrics endpoint too, when there is one).
        handle_signals: the first SIGINT or SIGTERM starts a graceful
            shutdown and restores the default dispositions, so a second one
            kills the process at once (main thread only); SIGHUP reloads
            the TLS files of a server given ``ssl=TLSFiles(...)`` and is
            ignored (logged) by any other.
        drain_delay: seconds between the first SIGINT/SIGTERM and the
            shutdown. The signal calls ``server.announce_drain()`` at once
            (``/readyz`` answers 503, ``server.draining`` is True), and the
            server keeps accepting and serving meanwhile, so a load balancer
            probing ``/readyz`` takes it out of rotation before its listener
            closes. 0 (the default) shuts down at once. A second signal
            still exits at once.
        metrics_address: ``(host, port)`` of the metrics and health endpoint
            (``fastnet.health.HealthEndpoint``: ``/metrics``, ``/healthz``,
            ``/readyz``), on this event loop; port 0 picks a free one. It
            turns the collector on: ``metrics`` defaults to True
            (prometheus_client's global ``REGISTRY``), or give
            ``metrics=registry`` and the endpoint serves that registry;
            ``metrics=False`` serves only ``/healthz`` and ``/readyz``
            (``/metrics`` is 404) and needs no prometheus_client. Bind it to
            an interface your scraper reaches and the public does not.
        on_metrics_ready: called with the ``HealthEndpoint`` once it listens
            (its ``address`` and ``port`` are the real ones), after ``on_ready``.

    Raises:
        OSError: an address (the server's or the endpoint's) cannot be bound.
        RuntimeError: metrics are on (``metrics_address`` alone turns them
            on) and prometheus_client is not installed (``pip install
            'fastnet[metrics]'``).
        ValueError: ``drain_delay`` is negative or not finite.
    """
    if not (math.isfinite(drain_delay) and drain_delay >= 0):
        raise ValueError(f"drain_delay must be a finite number >= 0, got {drain_delay}")
    registry = None
    if metrics_address is not None:
        metrics = kwargs.get("metrics", True)
        if metrics is True:
            registry = kwargs["metrics"] = default_registry()
        elif metrics is not None and metrics is not False:
            registry = metrics
    server = Server(handler, host, port, **kwargs)
    await server.start()
    endpoint: HealthEndpoint | None = None
    try:
        if metrics_address is not None:
            endpoint = HealthEndpoint(server, *metrics_address, registry=registry)
            try:
                await endpoint.start()
            except BaseException:
                endpoint = None
                await server.shutdown(drain_timeout=0)
                raise
        restore = _install_signal_handlers(server, drain_delay) if handle_signals else None
        try:
            if on_ready is not None:
                on_ready(server)
            if on_metrics_ready is not None and endpoint is not None:
                on_metrics_ready(endpoint)
            await server.serve_forever()
        finally:
            if restore is not None:
                restore()
    finally:
        # The endpoint outlives the drain (/readyz says 503 until the end).
        if endpoint is not None:
            await endpoint.close()


def run(
    handler: Handler | str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    loop: str = "auto",
    workers: int | None = None,
    **kwargs: Any,
) -> None:
    """Serve ``handler`` on a new event loop until SIGINT/SIGTERM, then return.

    Args:
        loop: ``"auto"`` (uvloop when installed), ``"uvloop"`` or ``"asyncio"``.
        workers: run that many worker processes under a supervisor
            (``fastnet.workers.run_workers``: SIGHUP rolls them, SIGTTIN and
            SIGTTOU add and remove one); ``handler`` must then be given by
            name, ``"module:function"`` or a built-in app, which each worker
            imports, and ``kwargs`` must be picklable. None: this process
            serves.
        handler, host, port, **kwargs: as ``serve`` (``drain_delay``,
            ``metrics_address=(host, port)`` for the metrics and health
            endpoint, ``on_ready``, ...) and ``Server``.

    Raises:
        OSError: an address cannot be bound.
        RuntimeError: ``metrics_address`` without prometheus_client;
            ``fastnet.workers.WorkerStartError`` when a worker fails to start.
        TypeError: ``handler`` is a name without ``workers``, or an object with.
    """
    if workers is not None:
        # Imported by name: fastnet.workers imports this module (run_coroutine), and
        # a static import both ways leaves mypy's view of the import cycle unresolved.
        run_workers = importlib.import_module("fastnet.workers").run_workers
        if not isinstance(handler, str):
            raise TypeError(
                "with workers, give the handler by name ('module:function' or a built-in "
                f"app): each worker imports it; got {type(handler).__name__}"
            )
        run_workers(handler, host, port, workers=workers, loop=loop, **kwargs)
        return
    if isinstance(handler, str):
        raise TypeError("a handler given by name needs workers=N; give the function itself")
    run_coroutine(serve(handler, host, port, **kwargs), loop=loop)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _install_signal_handlers(server: Server, drain_delay: float = 0.0) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    shutdown_task: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if shutdown_task:  # only reachable where dispositions cannot be reset
            logger.warning("%s again: exiting now", name)
            os._exit(128 + signum)
        if drain_delay > 0:
            logger.info(
                "%s received: draining for %g s, then shutting down "
                "(a second signal exits at once)",
                name,
                drain_delay,
            )
        else:
            logger.info("%s received: shutting down (a second signal exits at once)", name)
        uninstall()
        # Default dispositions: a second SIGINT/SIGTERM ends the process at
        # once, even if a handler blocks the event loop (or during the delay).
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        shutdown_task.append(loop.create_task(_drain_then_shut_down(server, drain_delay)))

    installed: list[int] = []

    def uninstall() -> None:
        while installed:
            sig = installed.pop()
            loop.remove_signal_handler(sig)

    for sig in _SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            # Windows, or not the main thread: no signal handling.
            continue
        installed.append(sig)

    # SIGHUP reloads the TLS files; on any other server it is logged and
    # ignored, rather than ending the process as its default does (an
    # operator's `kill -HUP` meant for a TLS server must not stop this one).
    if hasattr(signal, "SIGHUP"):
        previous[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
        try:
            loop.add_signal_handler(signal.SIGHUP, _reload_tls, server)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        else:
            installed.append(signal.SIGHUP)

    def restore() -> None:
        uninstall()
        # The server was shut down some other way during the drain delay.
        for task in shutdown_task:
            task.cancel()
        for sig, handler in previous.items():
            if handler is not None:
                with contextlib.suppress(ValueError):  # not the main thread
                    signal.signal(sig, handler)

    return restore


async def _drain_then_shut_down(server: Server, drain_delay: float) -> None:
    # Step 0 of the shutdown: readiness goes first (/readyz answers 503), while
    # the listener still accepts and every connection is served as before, so
    # the load balancer's probe, not a refused connection, takes the server
    # out of rotation. Then the graceful drain (server.py, steps 1-5).
    server.announce_drain()
    if drain_delay > 0:
        await asyncio.sleep(drain_delay)
        logger.info("drain delay over: shutting down")
    await server.shutdown()


def _reload_tls(server: Server) -> None:
    if server.tls_files is None:
        logger.info("SIGHUP received: nothing to reload (no TLS files); ignored")
        return
    logger.info("SIGHUP received: reloading the TLS certificate")
    server.reload_tls()  # logs the outcome; the old context stays on failure
