"""Running servers: the event loop choice, ``run_coroutine``, ``serve``/``run``, signals.

``serve`` runs a ``Server`` until SIGINT/SIGTERM; ``run`` does the same on a
new event loop (uvloop when installed, as uvicorn does). The first signal
starts a graceful shutdown and restores the default dispositions, so a
second one kills the process at once, even if a handler blocks the loop.
On a server given its TLS files (``ssl=TLSFiles(...)``), SIGHUP reloads them
(``Server.reload_tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

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
    **kwargs: Any,
) -> None:
    """Run a ``Server`` until it is shut down; with signals, until SIGINT/SIGTERM.

    Args:
        handler, host, port, **kwargs: as ``Server``.
        on_ready: called with the server once it is listening.
        handle_signals: the first SIGINT or SIGTERM starts a graceful
            shutdown and restores the default dispositions, so a second one
            kills the process at once (main thread only); SIGHUP reloads
            the TLS files of a server given ``ssl=TLSFiles(...)``.

    Raises:
        OSError: the address cannot be bound.
    """
    server = Server(handler, host, port, **kwargs)
    await server.start()
    restore = _install_signal_handlers(server) if handle_signals else None
    try:
        if on_ready is not None:
            on_ready(server)
        await server.serve_forever()
    finally:
        if restore is not None:
            restore()


def run(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    loop: str = "auto",
    **kwargs: Any,
) -> None:
    """Serve ``handler`` on a new event loop until SIGINT/SIGTERM, then return.

    Args:
        loop: ``"auto"`` (uvloop when installed), ``"uvloop"`` or ``"asyncio"``.
        handler, host, port, **kwargs: as ``serve`` and ``Server``.

    Raises:
        OSError: the address cannot be bound.
    """
    run_coroutine(serve(handler, host, port, **kwargs), loop=loop)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _install_signal_handlers(server: Server) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    shutdown_task: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if shutdown_task:  # only reachable where dispositions cannot be reset
            logger.warning("%s again: exiting now", name)
            os._exit(128 + signum)
        logger.info("%s received: shutting down (a second signal exits at once)", name)
        uninstall()
        # Default dispositions: a second SIGINT/SIGTERM ends the process at
        # once, even if a handler blocks the event loop.
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        shutdown_task.append(loop.create_task(server.shutdown()))

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

    if server.tls_files is not None and hasattr(signal, "SIGHUP"):
        previous[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
        try:
            loop.add_signal_handler(signal.SIGHUP, _reload_tls, server)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        else:
            installed.append(signal.SIGHUP)

    def restore() -> None:
        uninstall()
        for sig, handler in previous.items():
            if handler is not None:
                with contextlib.suppress(ValueError):  # not the main thread
                    signal.signal(sig, handler)

    return restore


def _reload_tls(server: Server) -> None:
    logger.info("SIGHUP received: reloading the TLS certificate")
    server.reload_tls()  # logs the outcome; the old context stays on failure
