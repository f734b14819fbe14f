"""``Server``: the public facade over the listener, the supervisor and the runner.

Also re-exported here, as before the split: ``serve`` and ``run`` (runner.py),
``CallbackHandler``/``callback_handler`` (supervisor.py).

Layout of the server layer (no module imports one above it):

    listener.py     bind (TCP v4/v6, Unix, a given socket); the accept loop
                    (a slot before each accept, error classes, back-off, a
                    bounded batch per loop iteration); the admission hook
    supervisor.py   one connection's life: set-up, both handler kinds, error
                    accounting, the lingering close, the idle timeout and the
                    frame deadline (one timer for all); the drain at shutdown
    server.py       Server: wires them together, stats, shutdown
    runner.py       loop choice, run_coroutine, serve/run, signals

Shutdown, step by step (``shutdown()``, or the first SIGINT/SIGTERM):

1. Stop accepting at once: cancel the accept loop and close the listening
   socket, so new connections are refused (and those waiting in the
   kernel's backlog, beyond ``max_connections``, are reset). Connections
   that have received nothing yet (accepted a moment before) get
   ``ACCEPT_GRACE`` (0.25 s) to read the request their client sent.
2. Tell every connection: reading stops, frames already received stay
   queued, and ``conn.shutting_down`` turns true. A handler waiting for input
   sees the end of it (``async for`` ends, ``recv`` raises
   ``ConnectionClosedError``); a handler still working finishes its frames.
3. Each connection's task flushes the handler's replies and closes the
   transport when the handler returns.
4. After ``drain_timeout`` seconds, cancel the handlers that are still
   running and abort every transport left, with a reset (RST) the client
   sees as ``ECONNRESET``.
5. ``serve_forever`` returns (and ``run`` and the CLI, with status 0).

A second SIGINT/SIGTERM during that drain kills the process at once: the
first one restores the default dispositions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as _ssl
from collections.abc import Iterable
from typing import Any

from ._tunables import DEFAULT_MAX_WRITE_BUFFER
from .connection import Connection
from .framing import Framing, LengthPrefixed
from .limits import Limits
from .listener import (
    ACCEPT_CAPACITY_ERRNOS,
    ACCEPT_IGNORABLE_ERRNOS,
    DEFAULT_BACKLOG,
    Admission,
    Listener,
    bind_tcp,
    bind_unix,
    format_address,
)
from .metrics import Hooks, ServerMetrics
from .metrics import register as register_metrics
from .proxy import DEFAULT_PROXY_HEADER_TIMEOUT, ProxySettings
from .supervisor import (
    DEFAULT_FRAME_TIMEOUT,
    CallbackHandler,
    Handler,
    Supervisor,
    callback_handler,
)
from .tls import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT, TLSConfigError, TLSFiles

__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "ACCEPT_IGNORABLE_ERRNOS",
    "DEFAULT_BACKLOG",
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "CallbackHandler",
    "Handler",
    "Server",
    "callback_handler",
]

# 1000 connections keep a default-configured Linux process (soft limit of 1024
# file descriptors) out of EMFILE, with room for the listening socket, the
# event loop's own descriptors and a few files. Raise both together.
DEFAULT_MAX_CONNECTIONS = 1000

# Seconds a shutdown waits, after it stops accepting, for connections that
# have received nothing yet (accepted just before) to read what their
# clients sent with the connect, before their input ends (step 1b below).
ACCEPT_GRACE = 0.25

# What runner.py defines, still importable from here (``from fastnet.server
# import run``); runner.py imports this module, so they are looked up when
# first asked for (PEP 562) rather than imported here, and are not in
# __all__.
_FROM_RUNNER = frozenset({"new_event_loop", "run", "run_coroutine", "serve"})


def __getattr__(name: str) -> Any:
    if name in _FROM_RUNNER:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logger = logging.getLogger("fastnet")

_NO_STATS = {"accepted": 0, "accept_errors": 0, "rejected": 0}


class Server:
    """A framed TCP (or Unix socket) server that runs ``handler(conn)`` per connection.

    Args:
        handler: ``async def handler(conn: Connection) -> None``, run in its
            own task for each connection; the connection is closed (after its
            replies are flushed) when the handler returns or raises. Or a
            ``CallbackHandler``, called with each batch as it is read.
        host: the interface to bind: an IPv4 or IPv6 address or a name (the
            first address it resolves to). Only that interface is bound.
        port: the TCP port; 0 picks a free one (see ``port``).
        framing: the wire layout, ``LengthPrefixed()`` by default.
        max_connections: connections served at once; more wait in the
            kernel's backlog until one closes (unanswered, and not covered
            by the timeouts, until then).
        idle_timeout: seconds a handler may wait for input with no byte
            arriving (a frame stuck half-sent included) and none of its
            output taken by the peer, before the connection is closed; None
            for no limit.
        frame_timeout: seconds a frame may take from its first byte to its
            last (``DEFAULT_FRAME_TIMEOUT``, 30 s, by default), so a client
            trickling a frame cannot hold its slot forever; None for no
            limit. Counted as ``frame_timeouts``.
        drain_timeout: seconds that shutdown waits for handlers to finish
            before cancelling them.
        backlog: the listen(2) backlog.
        reuse_port: set SO_REUSEPORT, so several processes can share the port.
        sock: an already bound socket (listening or not) to serve instead of
            binding ``host``/``port``. The server closes it when shut down.
        unix: the path of a Unix domain socket to bind instead of TCP. A
            stale socket file (nothing accepting on it) is replaced.
        max_write_buffer: each connection's hard write-buffer limit (see
            ``Connection``).
        admit: the admission hook, ``admit(sock, peer) -> bool``, called
            with each accepted socket before a connection is set up; False
            closes the socket (counted as ``rejected``). None admits all.
        ssl: serve TLS: a server ``ssl.SSLContext`` (see
            ``fastnet.tls.server_context``), or a ``fastnet.tls.TLSFiles``,
            loaded now and again by ``reload_tls()``.
        tls_handshake_timeout: seconds a TLS handshake may take, holding a
            connection slot; a stalled or failed handshake is aborted and
            counted (``tls_handshake_timeouts``, ``tls_handshake_errors``).
        tls_shutdown_timeout: seconds a closing TLS connection may take to
            flush its last replies, send close_notify and see the peer's
            answer (or EOF) before it is aborted: TLS cannot half-close, so
            this replaces the lingering close there (30 s, as that).
        metrics: Prometheus metrics (``pip install 'fastnet[metrics]'``):
            True registers fastnet's collector in prometheus_client's global
            registry, a ``CollectorRegistry`` in that one; None/False: off
            (``stats()`` still counts). See ``fastnet.metrics``.
        hooks: a ``fastnet.metrics.Hooks`` of callables for connection
            events (open, close, handler and framing errors, TLS).
        proxy_protocol: ``"v1"``, ``"v2"`` or ``"any"``: every connection
            must begin with a PROXY protocol header of that version (sent by
            HAProxy and the like), read before TLS and framing; ``conn.peer``
            is then the client's address and ``conn.proxy`` the header. A
            connection without a valid header is closed (never a guess).
            None (the default): off.
        trusted_proxies: the proxies' addresses or networks (CIDR strings
            such as ``"10.0.0.0/8"``): required with ``proxy_protocol`` on a
            TCP listener; a connection from elsewhere is closed before a
            byte is read (``proxy_untrusted``). Unix-socket peers are trusted.
        proxy_header_timeout: seconds a connection may take to send its
            whole PROXY header (``proxy_header_timeouts``), holding a slot.
        limits: a ``fastnet.Limits``: per-peer connection rate and
            concurrency (on the PROXY header's address when the protocol is
            on), per-connection frames per second (reading pauses), and the
            overload marks (the listener pauses). None (the default): off.

    Use ``async with Server(...) as server`` (or ``await server.start()``),
    then ``await server.serve_forever()``; ``await server.shutdown()`` stops
    it gracefully.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        framing: Framing | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float | None = None,
        frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
        drain_timeout: float = 30.0,
        backlog: int = DEFAULT_BACKLOG,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        unix: str | os.PathLike[str] | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        admit: Admission | None = None,
        ssl: _ssl.SSLContext | TLSFiles | None = None,
        tls_handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        tls_shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        metrics: Any = None,
        hooks: Hooks | None = None,
        proxy_protocol: str | None = None,
        trusted_proxies: Iterable[str] | None = None,
        proxy_header_timeout: float = DEFAULT_PROXY_HEADER_TIMEOUT,
        limits: Limits | None = None,
    ) -> None:
        if not callable(handler) and not isinstance(handler, CallbackHandler):
            raise TypeError(f"handler must be an async callable, not {type(handler).__name__}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        if frame_timeout is not None and frame_timeout <= 0:
            raise ValueError(f"frame_timeout must be positive or None, got {frame_timeout}")
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout must not be negative, got {drain_timeout}")
        if sock is not None and unix is not None:
            raise ValueError("give sock or unix, not both")
        if admit is not None and not callable(admit):
            raise TypeError(f"admit must be callable, not {type(admit).__name__}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a fastnet.Limits, not {type(limits).__name__}")
        if tls_handshake_timeout <= 0 or tls_shutdown_timeout <= 0:
            raise ValueError("tls_handshake_timeout and tls_shutdown_timeout must be positive")
        self._tls_files = ssl if isinstance(ssl, TLSFiles) else None
        proxy = None
        if proxy_protocol is not None:
            if isinstance(trusted_proxies, str):
                trusted_proxies = [trusted_proxies]
            networks = [] if trusted_proxies is None else list(trusted_proxies)
            if not networks and unix is None:
                raise ValueError(
                    "proxy_protocol needs trusted_proxies: the addresses or networks of the "
                    'proxies allowed to send the header (e.g. ["10.0.0.0/8"])'
                )
            proxy = ProxySettings.make(proxy_protocol, networks, proxy_header_timeout)
        elif trusted_proxies is not None:
            raise ValueError("trusted_proxies is for proxy_protocol, which is off")
        context = ssl.load() if isinstance(ssl, TLSFiles) else ssl
        if context is not None and not isinstance(context, _ssl.SSLContext):
            raise TypeError(f"ssl must be an SSLContext or TLSFiles, not {type(ssl).__name__}")
        self._handler = handler
        self._host = host
        self._port = port
        if framing is None:
            framing = getattr(handler, "framing", None) or LengthPrefixed()
        self._framing: Framing = framing
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._sock = sock
        self._unix = os.fspath(unix) if unix is not None else None
        self._unix_inode: tuple[int, int] | None = None
        self._admit = admit
        self._supervisor = Supervisor(
            handler,
            self._framing,
            max_write_buffer=max_write_buffer,
            idle_timeout=idle_timeout,
            frame_timeout=frame_timeout,
            ssl=context,
            tls_handshake_timeout=tls_handshake_timeout,
            tls_shutdown_timeout=tls_shutdown_timeout,
            metrics=ServerMetrics() if metrics else None,
            hooks=hooks,
            proxy=proxy,
            limits=limits,
        )
        if metrics:
            register_metrics(self, None if metrics is True else metrics)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._sockname: Any = None
        self._stopping = False
        self._draining = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None

    def __repr__(self) -> str:
        state = "stopping" if self._stopping else "serving" if self._listener else "new"
        return f"<fastnet.Server {state} {self.address}>"

    @property
    def idle_timeout(self) -> float | None:
        """The idle timeout in seconds, or None (set it before ``start``)."""
        return self._supervisor.idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, value: float | None) -> None:
        self._supervisor.idle_timeout = value

    @property
    def frame_timeout(self) -> float | None:
        """The frame deadline in seconds, or None (set it before ``start``)."""
        return self._supervisor.frame_timeout

    @frame_timeout.setter
    def frame_timeout(self, value: float | None) -> None:
        self._supervisor.frame_timeout = value

    @property
    def _connections(self) -> set[Connection]:
        # The open connections (tests and debugging look at them).
        return self._supervisor.connections

    # ---------------------------------------------------------------- binding

    async def start(self) -> None:
        """Bind (unless ``sock`` was given), listen, and start accepting.

        Raises:
            OSError: the address cannot be bound; the message names it.
            RuntimeError: the server was already started.
        """
        if self._loop is not None:
            raise RuntimeError("the server was already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = asyncio.Event()
        if self._sock is not None:
            sock = self._sock
        elif self._unix is not None:
            sock, self._unix_inode = bind_unix(self._unix)
        else:
            sock = await bind_tcp(loop, self._host, self._port, reuse_port=self._reuse_port)
        try:
            sock.setblocking(False)
            sock.listen(self._backlog)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {self.address}: {exc.strerror}") from None
        self._sockname = sock.getsockname()
        supervisor = self._supervisor
        supervisor.start()
        slots = asyncio.Semaphore(self.max_connections)
        metrics = supervisor.metrics
        self._listener = Listener(
            sock,
            slots,
            supervisor.spawn,
            admit=self._admit,
            error_counts=None if metrics is None else metrics.accept_errors,
        )
        supervisor.on_overload = self._overload_changed
        self._listener.start()
        logger.info("listening on %s", self.address)

    def _overload_changed(self, overloaded: bool) -> None:
        # The supervisor's overload watch: stop accepting above the high
        # mark, accept again at the low one (fastnet.limits).
        listener = self._listener
        if listener is None:
            return
        if overloaded:
            listener.pause_accepting()
        else:
            listener.resume_accepting()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (one, or none before start and after shutdown)."""
        listener = self._listener
        if listener is None or listener.sock.fileno() < 0:
            return ()
        return (listener.sock,)

    @property
    def port(self) -> int | None:
        """The bound TCP port (the real one when 0 was asked for); None for Unix sockets."""
        name = self._sockname
        if isinstance(name, tuple):
            return int(name[1])
        return None

    @property
    def address(self) -> str:
        """The listening address as ``HOST:PORT`` (``[V6]:PORT``) or ``unix:PATH``."""
        name = self._sockname
        if isinstance(name, tuple):
            return format_address(name[0], name[1])
        if isinstance(name, (str, bytes)) and name:
            return f"unix:{os.fsdecode(name)}"
        if self._unix is not None:
            return f"unix:{self._unix}"
        return format_address(self._host, self._port)

    @property
    def shutting_down(self) -> bool:
        """True once ``shutdown()`` has begun."""
        return self._stopping

    @property
    def metrics(self) -> ServerMetrics | None:
        """The labelled counters and histograms kept with ``metrics=`` on; None otherwise."""
        return self._supervisor.metrics

    @property
    def draining(self) -> bool:
        """True from ``announce_drain()`` or the start of ``shutdown()``: not ready for new work.

        Health checks (``/readyz``) report it, so a load balancer stops
        sending new connections before the listener closes.
        """
        return self._draining or self._stopping

    def announce_drain(self) -> None:
        """Mark the server as draining, while it still accepts (a drain delay before shutdown)."""
        if not self._draining:
            self._draining = True
            logger.info("draining: no longer ready for new connections")

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -------------------------------------------------------------------- TLS

    @property
    def ssl(self) -> _ssl.SSLContext | None:
        """The server context new TLS handshakes use; None for a plain TCP server."""
        return self._supervisor.ssl

    @property
    def tls_files(self) -> TLSFiles | None:
        """The files ``reload_tls()`` loads (given as ``ssl=TLSFiles(...)``), or None."""
        return self._tls_files

    def reload_tls(self, context: _ssl.SSLContext | None = None) -> bool:
        """Use a new server context for new handshakes; established connections keep theirs.

        Without ``context``, the files the server was given (``TLSFiles``)
        are loaded again into a new context. On any error the old context
        stays in force, the error is logged in one line, and False is
        returned. ``fastnet serve`` calls this on SIGHUP.

        Raises:
            RuntimeError: the server does not serve TLS, or was given a
                context and no files to load a new one from.
        """
        if self._supervisor.ssl is None:
            raise RuntimeError("reload_tls(): this server does not serve TLS")
        if context is None:
            files = self._tls_files
            if files is None:
                raise RuntimeError("reload_tls(): pass a context; the server has no files to load")
            try:
                context = files.load()
            except TLSConfigError as exc:
                logger.error("TLS reload failed, the old certificate stays in use: %s", exc)
                return False
        elif not isinstance(context, _ssl.SSLContext):
            raise TypeError(f"context must be an SSLContext, not {type(context).__name__}")
        self._supervisor.ssl = context
        logger.info("TLS reloaded: new handshakes use the new context")
        return True

    # ------------------------------------------------------------- statistics

    def handler_stats(self) -> dict[str, int]:
        """The handler's own counters (a Router's ``stats()``), empty for a plain handler."""
        handler = self._handler
        return handler.stats() if isinstance(handler, CallbackHandler) else {}

    def stats(self) -> dict[str, int]:
        """Return the server's counters.

        Keys: ``active`` (open connections), ``accepted``, ``closed``,
        ``frames_in``, ``frames_out``, ``bytes_in``, ``bytes_out``, ``writes``
        (transport writes: frames_out / writes is the coalescing factor),
        ``handler_errors``, ``frame_errors``, ``accept_errors``,
        ``idle_timeouts``, ``frame_timeouts``, ``rejected`` (by the
        admission hook), ``lines_skipped`` (over-long lines dropped by
        ``Lines(on_too_long="skip")``), ``tls_handshakes`` (completed),
        ``tls_handshake_errors`` and ``tls_handshake_timeouts``,
        ``proxy_header_errors`` (PROXY headers rejected; by cause in the
        metrics), ``proxy_header_timeouts`` and ``proxy_untrusted``
        (connections closed for not coming from a trusted proxy);
        with ``limits``: ``rejected_rate``, ``rejected_concurrency`` and
        ``rejected_overload`` (connections closed at once by the limits),
        ``peer_table_evictions``, ``overloaded`` (1 during an overload
        episode), ``overload_episodes``; and ``buffered_bytes``, summed when
        asked, with or without limits: the bytes the open connections buffer
        (unsent replies, queued or in the transports, and input not yet taken
        by the handlers), the sum the overload watch compares. Counters are
        kept per read and per write, and summed here over the open connections.
        """
        result = self._supervisor.stats()
        listener = self._listener
        result.update(
            _NO_STATS
            if listener is None
            else {
                "accepted": listener.accepted,
                "accept_errors": listener.accept_errors,
                "rejected": listener.rejected,
            }
        )
        return dict(sorted(result.items()))

    # --------------------------------------------------------------- shutdown

    async def serve_forever(self) -> None:
        """Serve until ``shutdown()`` completes (starting the server if needed).

        Cancelling it shuts the server down (gracefully, within
        ``drain_timeout``) before the cancellation propagates.
        """
        if self._loop is None:
            await self.start()
        assert self._done is not None
        try:
            await self._done.wait()
        except asyncio.CancelledError:
            await self.shutdown()
            raise

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let handlers finish, close everything. Idempotent.

        Args:
            drain_timeout: overrides the server's ``drain_timeout``; 0 cancels
                the handlers at once.
        """
        if self._loop is None:
            return
        if self._shutdown_task is None:
            timeout = self.drain_timeout if drain_timeout is None else drain_timeout
            self._shutdown_task = self._loop.create_task(self._shutdown(timeout))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, drain_timeout: float) -> None:
        assert self._done is not None
        self._stopping = True
        supervisor = self._supervisor
        # Step 1: stop accepting at once; the kernel refuses new connections
        # (and resets those waiting in the backlog) when the socket closes.
        listener = self._listener
        if listener is not None:
            await listener.stop()
        await supervisor.stop_timer()
        self._close_listener()
        # Step 1b: a connection accepted in the last moments has not read
        # the request its client sent with the connect yet; stopping its
        # input now would close it unanswered (a rolling restart of workers
        # met this). Such connections get ACCEPT_GRACE to deliver it.
        if supervisor.has_fresh_connections():
            await asyncio.sleep(ACCEPT_GRACE)
        # Step 2: no more input; handlers finish the frames they have.
        supervisor.shutting_down = True
        supervisor.begin_shutdown()
        # Steps 3 and 4: wait for the handlers (each connection's task
        # flushes and closes it when its handler returns); after the drain
        # timeout, cancel the rest and abort every transport left.
        await supervisor.drain(drain_timeout)
        logger.info("shut down")
        self._done.set()

    def _close_listener(self) -> None:
        listener = self._listener
        if listener is None or listener.sock.fileno() < 0:
            return
        listener.sock.close()
        path = self._unix
        if path is not None and self._unix_inode is not None:
            # Remove our socket file, unless another server replaced it since.
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._unix_inode:
                    os.unlink(path)
            except OSError:
                pass
