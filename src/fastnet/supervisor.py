"""The supervisor: the life of every connection a server accepts, from set-up to close.

It sets each connection up on an accepted socket, runs its handler (either
kind: a task, or a callback inside the read), accounts for its errors,
closes it gracefully (the lingering close), enforces the idle timeout and
the frame deadline with one timer for all connections, and, at shutdown,
ends input, waits for handlers and aborts what outlives the drain timeout.
It is each connection's observer (``_observer.ConnectionObserver``): framing
errors are reported here, and ``conn.shutting_down`` is read from here.

Strategy: nothing here runs per read. Per connection there is one task
(set-up, handler, close); per server one timer task that visits every
connection each tick (O(connections) per tick); a lingering close is a
timer callback that backs off, not a poll.

Connection internals used here (to become documented hooks; nowhere else
in the server layer touches them):

- ``_on_frames``: set in the protocol factory to a callback handler's function.
- ``_wait_input_end()``: waits until no more frames will come (callback handlers).
- ``_handler_error``: the exception a callback handler or a spawned task raised, if any.
- ``_wait_tasks()``: waits until the tasks spawned on the connection are done.
- ``_finish()``: flush, send FIN, read and discard until the peer's FIN.
- ``_begin_shutdown()``: stop reading, end the input after the queued frames.
- ``_idle``: the handler is waiting for frames.
- ``_idle_timeout()``: end the input as "idle" and abort.
- ``_lost``: ``connection_lost`` has run.
- ``_transport``: the transport (None until ``connection_made``).
- Hooks added for this module at the end of ``FrameProtocol`` (the block
  "supervisor hooks"): ``_frame_pending``, ``_backpressured``,
  ``_write_backpressured``, ``_timed_out(message)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ._proxy_io import read_proxy_header
from ._tunables import DEFAULT_MAX_WRITE_BUFFER
from .connection import Connection
from .errors import ConnectionBrokenError, ConnectionClosedError, FrameError
from .framing import Buffer, Framing
from .limits import Limits, OverloadGate, PeerLimiter, peer_key
from .lingering import CLOSE_LINGER, Lingering, send_queue
from .listener import format_peer
from .metrics import CloseInfo, Hooks, ServerMetrics, frame_error_kind, handshake_error_cause
from .proxy import ProxyHeader, ProxyHeaderError, ProxySettings
from .tls import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT
from .transports import extra_info

__all__ = [
    "CLOSE_LINGER",
    "DEFAULT_FRAME_TIMEOUT",
    "CallbackHandler",
    "Handler",
    "Supervisor",
    "callback_handler",
]

logger = logging.getLogger("fastnet")

CallbackFunction = Callable[[Connection, list[bytes]], Iterable[Buffer] | None]


class CallbackHandler:
    """A handler that is a plain function, called with each batch of frames as it is read.

    ``fn(conn, frames)`` runs inside the connection's read callback, with no
    task and no wake-up: what a hand-written ``asyncio.Protocol`` costs, for
    handlers that answer without awaiting anything (echo, in-memory lookups,
    routing). It returns the frames to send in reply (a list, or any
    iterable), or None; it may also call ``conn.send``/``send_many`` (those
    frames go first), ``conn.close()``, and read ``conn.peer`` and the like.
    Everything it sends leaves as one write when it returns. It must not
    block. The connection closes after the peer's last
    frames (or at shutdown, or after the idle timeout), once their replies
    are flushed. An exception is logged with the peer's address, counted as
    a handler error, and closes that connection only.

    Write it with the ``fastnet.callback_handler`` decorator. Handlers that
    need to await (a database, another connection, a timer) are ordinary
    ``async def handler(conn)`` functions instead, run in a task per
    connection.
    """

    __slots__ = ("__wrapped__", "fn")

    # The framing the handler speaks, for a server given none (a Router's).
    framing: Framing | None = None

    def __init__(self, fn: CallbackFunction) -> None:
        if not callable(fn):
            raise TypeError(f"a callback handler must be callable, not {type(fn).__name__}")
        self.fn = fn
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<fastnet.CallbackHandler {getattr(self.fn, '__qualname__', self.fn)!r}>"

    def _bind(self, framing: Framing | None = None) -> CallbackFunction:
        """The function a server calls with each batch (once, when the server is made).

        ``framing`` is the server's (a Router bounds its replies by it).
        """
        return self.fn

    def _shutdown(self, conn: Connection) -> None:
        """A graceful shutdown reaches ``conn``: end its input (a Router sends drain first)."""
        conn._begin_shutdown()

    def stats(self) -> dict[str, int]:
        """Events the handler counts, by name (a Router's; none for a plain function).

        A server with metrics exports them as ``fastnet_handler_events_total{event}``.
        """
        return {}


def callback_handler(fn: CallbackFunction) -> CallbackHandler:
    """Decorate ``def handler(conn, frames) -> replies`` as a ``CallbackHandler``."""
    return CallbackHandler(fn)


Handler = Callable[[Connection], Awaitable[None]] | CallbackHandler

# After the drain timeout, cancelled handlers get this long to unwind
# (finally blocks, context managers) before shutdown stops waiting for them.
CANCEL_GRACE = 1.0

# Seconds a frame may take from its first byte to its last. Generous: the
# largest default frame (8 MiB) gets through at 280 KB/s, a small request at
# any rate a real client has, while a slowloris client trickling one byte a
# second holds its slot 30 s instead of forever (HAProxy's usual
# `timeout http-request` is 10 s for headers alone; nginx's body timeout is
# 60 s, but between reads, which a trickle resets).
DEFAULT_FRAME_TIMEOUT = 30.0

# The idle/frame timer looks at every connection this many times per
# (shortest) timeout, so a connection is closed within 1/8 of its timeout
# after it expires; no more often than every 5 ms, no less than every 1 s.
TIMER_DIVISIONS = 8
TIMER_TICK_MIN = 0.005
TIMER_TICK_MAX = 1.0

# Framing errors are logged one line each up to this many per interval;
# beyond that they are counted and summed up in one line when the interval
# ends (4,000 bad connections make 11 lines, not 4,000).
FRAME_ERROR_LOG_BURST = 10
FRAME_ERROR_LOG_INTERVAL = 10.0
# Connections refused by the limits (fastnet.limits) are logged the same
# way, at DEBUG: a flood from one address makes a line or two per interval.
REJECT_LOG_BURST = 10
REJECT_LOG_INTERVAL = 10.0

_SO_LINGER_RESET = struct.pack("ii", 1, 0)  # linger on, 0 s: close(2) sends RST


class _Counters:
    """The server's counters for connections that have closed (open ones are summed live)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closed",
        "frame_errors",
        "frame_timeouts",
        "frames_in",
        "frames_out",
        "handler_errors",
        "idle_timeouts",
        "lines_skipped",
        "overload_episodes",
        "proxy_header_errors",
        "proxy_header_timeouts",
        "proxy_untrusted",
        "rejected_concurrency",
        "rejected_overload",
        "rejected_rate",
        "resets",
        "tls_handshake_errors",
        "tls_handshake_timeouts",
        "tls_handshakes",
        "writes",
    )

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = 0
        self.frame_errors = 0
        self.frame_timeouts = 0
        self.frames_in = 0
        self.frames_out = 0
        self.handler_errors = 0
        self.idle_timeouts = 0
        self.lines_skipped = 0  # over-long lines a Lines(on_too_long="skip") decoder dropped
        self.overload_episodes = 0  # times the buffered bytes went over Limits.overload_high
        self.proxy_header_errors = 0  # PROXY headers rejected (by cause: ServerMetrics)
        self.proxy_header_timeouts = 0  # no complete PROXY header within the timeout
        self.proxy_untrusted = 0  # closed at once: not from a trusted proxy
        self.rejected_concurrency = 0  # refused: the peer had conns_per_peer open (Limits)
        self.rejected_overload = 0  # refused: accepted as an overload episode began
        self.rejected_rate = 0  # refused: the peer was over its conn_rate
        self.resets = 0  # connections that ended in a socket error (a reset, mostly)
        self.tls_handshake_errors = 0  # failed: not TLS, bad certificate, reset...
        self.tls_handshake_timeouts = 0
        self.tls_handshakes = 0  # completed
        self.writes = 0


class _LogLimiter:
    """Log the first ``burst`` events of each ``interval`` s; sum up the rest in one line."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        what: str,
        burst: int,
        interval: float,
        level: int = logging.INFO,
    ):
        self._loop = loop
        self._level = level
        self._what = what
        self._burst = burst
        self._interval = interval
        self._start = -interval  # the current interval's start
        self._logged = 0
        self._suppressed = 0
        self._summary: asyncio.TimerHandle | None = None

    def allow(self) -> bool:
        """True: log this event. False: it is counted for the summary line."""
        now = self._loop.time()
        if now - self._start >= self._interval and self._summary is None:
            self._start = now
            self._logged = 0
        if self._logged < self._burst:
            self._logged += 1
            return True
        self._suppressed += 1
        if self._summary is None:
            delay = max(self._start + self._interval - now, 0.0)
            self._summary = self._loop.call_later(delay, self.flush)
        return False

    def flush(self) -> None:
        """Log the summary line now, if events were left out; start a new interval."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if self._suppressed:
            now = self._loop.time()
            logger.log(
                self._level,
                "%d more %s in the last %.3g s",
                self._suppressed,
                self._what,
                now - self._start,
            )
            self._suppressed = 0
            self._start = now
            self._logged = 0


def _abort_with_reset(conn: Connection) -> None:
    """Abort ``conn`` so that the peer sees a reset (RST), not an orderly close.

    (``Connection.abort`` does so too; this also covers a connection whose
    transport is being set up.)
    """
    transport = conn._transport
    if transport is None:
        return
    sock = None if conn._lost else extra_info(transport, "socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Closed already: OSError, or ValueError from uvloop's stand-in
        # socket for a closed handle (fd -1).
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _SO_LINGER_RESET)
    conn.abort()


class Supervisor:
    """Every connection of one server: set-up, handler, errors, timers, close, shutdown.

    Args:
        handler: a task handler (``async def handler(conn)``) or a ``CallbackHandler``.
        framing: the wire layout.
        max_write_buffer: each connection's hard write-buffer limit.
        idle_timeout: seconds with no byte received and no output taken
            while the handler waits for input; None for no limit.
        frame_timeout: seconds a frame may take from its first byte to its
            last; None for no limit.
        ssl: a server ``SSLContext``: every connection is TLS. The attribute
            may be replaced at any time (``Server.reload_tls``); new
            handshakes use the new context.
        tls_handshake_timeout: seconds a TLS handshake may take (it holds a
            connection slot meanwhile).
        tls_shutdown_timeout: seconds a closing TLS connection may take to
            flush, send close_notify and see the peer's answer, then aborted.
        metrics: where the labelled counters and histograms go (metrics on),
            or None (metrics off: nothing is timed per read).
        hooks: the event hooks, or None.
        proxy: read a PROXY protocol header first on every connection
            (``fastnet.proxy.ProxySettings``), or None.
        limits: per-peer, per-connection and overload limits
            (``fastnet.limits.Limits``), or None.

    Attributes:
        connections: the connections open (registered before any frame of
            theirs can be delivered).
        tasks: the per-connection tasks.
        counters: counters of the connections that have closed.
        shutting_down: True once the server began a graceful shutdown.
        on_overload: called with True when an overload episode begins and
            False when it ends (the server pauses and resumes its listener).
    """

    def __init__(
        self,
        handler: Handler,
        framing: Framing,
        *,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        idle_timeout: float | None = None,
        frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
        ssl: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        tls_shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        metrics: ServerMetrics | None = None,
        hooks: Hooks | None = None,
        proxy: ProxySettings | None = None,
        limits: Limits | None = None,
    ) -> None:
        # One of the two is set: a task handler, or a callback handler's function.
        self._callback: CallbackFunction | None = None
        self._task_handler: Callable[[Connection], Awaitable[None]] | None = None
        self._shutdown_connection: Callable[[Connection], None] = Connection._begin_shutdown
        if isinstance(handler, CallbackHandler):
            self._callback = handler._bind(framing)
            self._shutdown_connection = handler._shutdown
        else:
            self._task_handler = handler
        self._framing = framing
        self._max_write_buffer = max_write_buffer
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.ssl = ssl
        self.tls_handshake_timeout = tls_handshake_timeout
        self.tls_shutdown_timeout = tls_shutdown_timeout
        self.metrics = metrics
        self.hooks = hooks
        self.proxy = proxy
        self.limits = limits
        self._peers: PeerLimiter | None = None
        self._overload: OverloadGate | None = None
        if limits is not None:
            if limits.per_peer:
                self._peers = PeerLimiter(limits)
            if limits.overload_high is not None:
                low = limits.overload_resume
                assert low is not None
                self._overload = OverloadGate(limits.overload_high, low)
        self.on_overload: Callable[[bool], None] | None = None
        self._overload_task: asyncio.Task[None] | None = None
        self._overload_since = 0.0
        self._reject_log: _LogLimiter | None = None
        # Why a connection is being closed, when it is not its handler's end
        # (for Hooks.on_close): set by the event, popped at close.
        self._close_reasons: dict[Connection, str] = {}
        # The tasks of connections still in their PROXY header or TLS
        # handshake: no request of theirs is in flight, so a shutdown
        # cancels them at once.
        self._handshaking: set[asyncio.Task[None]] = set()
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.counters = _Counters()
        self.shutting_down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Task[None] | None = None
        self._frame_log: _LogLimiter | None = None

    def start(self) -> None:
        """Start the idle/frame timer (if either timeout is set); call from the loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._frame_log = _LogLimiter(
            loop, "framing errors", FRAME_ERROR_LOG_BURST, FRAME_ERROR_LOG_INTERVAL
        )
        self._reject_log = _LogLimiter(
            loop, "rejected connections", REJECT_LOG_BURST, REJECT_LOG_INTERVAL, logging.DEBUG
        )
        if self.idle_timeout is not None or self.frame_timeout is not None:
            self._timer = loop.create_task(self._timer_loop())
        if self._overload is not None:
            self._overload_task = loop.create_task(self._overload_loop())

    async def stop_timer(self) -> None:
        """Stop the idle/frame timer and the overload watch."""
        for name in ("_timer", "_overload_task"):
            timer = getattr(self, name)
            setattr(self, name, None)
            if timer is not None:
                timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timer

    # --------------------------------------------------------- one connection

    def spawn(self, sock: socket.socket, peer: Any, release: Callable[[], None]) -> None:
        """Serve an accepted socket in a task of its own; ``release()`` when it is closed.

        With the PROXY protocol on, a socket whose peer is not a trusted
        proxy is closed here, before a byte of it is read.
        """
        assert self._loop is not None
        proxy = self.proxy
        if proxy is not None and not proxy.trusts(peer):
            self.counters.proxy_untrusted += 1
            self.counters.closed += 1
            where = format_peer(peer)
            logger.debug(
                "%s is not a trusted proxy; closed",
                where,
                extra={"peer": where, "event": "proxy_untrusted"},
            )
            sock.close()
            release()
            return
        key = None
        if proxy is None and (self._peers is not None or self._overload is not None):
            # Limits on the accept-time address (with the PROXY protocol on,
            # on the header's, in _serve).
            key, cause = self._limit(peer)
            if cause is not None:
                self.counters.closed += 1
                self._reject(peer, cause)
                sock.close()
                release()
                return
        task = self._loop.create_task(self._serve(sock, release, peer, key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(
        self, sock: socket.socket, release: Callable[[], None], peer: Any, key: str | None = None
    ) -> None:
        # Supervises one connection: sets it up, runs the handler in a task
        # of its own, then closes the connection and frees the slot. The
        # handler gets its own task so that its await chain, resumed on
        # every read, is as short as possible: handler, recv_batch, wake-up.
        loop = self._loop
        assert loop is not None
        made: list[Connection] = []
        opened: float | None = None  # set once the connection is set up
        header: ProxyHeader | None = None  # the PROXY header, when the protocol is on

        metrics = self.metrics
        limits = self.limits
        frame_rate = None if limits is None else limits.frame_rate

        def factory() -> Connection:
            conn = Connection(self._framing, server=self, max_write_buffer=self._max_write_buffer)
            conn._on_frames = self._callback
            # Before connection_made, which takes conn.peer from it.
            conn.proxy = header
            if metrics is not None:
                if metrics.read_stats is None:
                    metrics.read_stats = conn._new_read_stats()
                conn._read_stats = metrics.read_stats
            if frame_rate is not None:
                assert limits is not None and limits.frame_bucket is not None
                conn._frame_rate = conn._new_frame_rate(frame_rate, limits.frame_bucket)
            # Registered now, before connection_made: uvloop may deliver the
            # first frames before connect_accepted_socket returns.
            self.connections.add(conn)
            made.append(conn)
            return conn

        try:
            if self.proxy is not None:
                # Step 0: the PROXY header, read byte-exact from the raw
                # socket before any transport (and TLS) exists.
                header = await self._proxy_header(loop, sock, peer)
                if header is None:
                    return
                if self._peers is not None or self._overload is not None:
                    # Limits on the client's address, as the header names
                    # it (a LOCAL header, a proxy's health check, names
                    # none: not limited per peer).
                    key, cause = self._limit(header.peer)
                    if cause is not None:
                        self._reject(header.peer, cause)
                        sock.close()
                        return
            context = self.ssl
            if context is None:
                try:
                    _, conn = await loop.connect_accepted_socket(factory, sock)
                except OSError as exc:  # the peer vanished during setup
                    logger.debug("could not set up an accepted connection: %s", exc)
                    sock.close()
                    return
            else:
                made_conn = await self._handshake(loop, factory, made, sock, context, header, peer)
                if made_conn is None:
                    return
                conn = made_conn
            opened = time.monotonic()  # not loop.time(): uvloop's counts milliseconds
            hooks = self.hooks
            if hooks is not None:
                hooks.call("on_open", conn)
            if self.shutting_down:
                self._shutdown_connection(conn)
            await self._run_handler(conn)
            # Tasks the handler spawned on the connection (Connection.spawn)
            # finish first; the drain timeout bounds this wait as it bounds
            # the handler's.
            try:
                await conn._wait_tasks()
            except asyncio.CancelledError:
                _abort_with_reset(conn)
                raise
            # A callback handler's exception, or a spawned task's.
            if conn._handler_error is not None:
                self._handler_failed(conn, conn._handler_error)
            _stop_frame_rate(conn)  # whatever the peer still sends is read and dropped
            # Flush the replies, send FIN, and close once the peer has closed
            # too or every reply is acknowledged (a lingering close, see
            # lingering.py). Wait for that before freeing the slot, so
            # max_connections counts open sockets.
            conn._finish()
            await self._linger(conn)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Nothing may escape a connection's task ("Task exception was
            # never retrieved", and a transport never closed).
            peer = format_peer(made[0].peer) if made else "an accepted socket"
            logger.exception("supervising the connection to %s failed; aborted", peer)
            if made:
                self._close_reasons[made[0]] = "error"
            if made and made[0]._transport is not None:
                made[0].abort()
            else:
                sock.close()
        finally:
            if key is not None:
                assert self._peers is not None
                self._peers.release(key)
            if made:
                conn = made[0]
                _stop_frame_rate(conn)
                self.connections.discard(conn)
                self._add_closed(conn)
                reason = self._close_reasons.pop(conn, None)
                if reason is None and conn._lost_error is not None:
                    reason = "reset"  # the socket failed: a reset, mostly
                    self.counters.resets += 1
                if opened is not None:
                    self._closed(conn, time.monotonic() - opened, reason or "closed")
            else:
                self.counters.closed += 1
            release()

    async def _handshake(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], Connection],
        made: list[Connection],
        sock: socket.socket,
        context: ssl.SSLContext,
        header: ProxyHeader | None = None,
        accepted_peer: Any = None,
    ) -> Connection | None:
        # The TLS handshake, within tls_handshake_timeout (fastnet's own
        # timer: the loop's ssl_handshake_timeout is a backstop, and its
        # expiry is not told apart from other aborts). Returns the
        # connection, or None after a failure (counted, logged at debug
        # level with the peer, the socket closed). After a PROXY header,
        # the peer named is the client, not the proxy.
        timeout = self.tls_handshake_timeout
        if header is not None and header.peer is not None:
            peer = format_peer(header.peer)
        elif accepted_peer is not None:
            peer = format_peer(accepted_peer)  # as accept(2) gave it: a reset leaves no other
        else:
            peer = _peer_of(sock)
        options: dict[str, Any] = {"ssl": context, "ssl_handshake_timeout": timeout + 1.0}
        if _loop_has_tls_shutdown_timeout(loop):
            options["ssl_shutdown_timeout"] = self.tls_shutdown_timeout
        began = time.monotonic()
        metrics = self.metrics
        hooks = self.hooks
        task = asyncio.current_task()
        assert task is not None
        self._handshaking.add(task)
        try:
            await asyncio.wait_for(loop.connect_accepted_socket(factory, sock, **options), timeout)
        except asyncio.TimeoutError:
            self.counters.tls_handshake_timeouts += 1
            logger.debug(
                "TLS handshake with %s timed out after %.3g s",
                peer,
                timeout,
                extra={"peer": peer, "event": "tls_handshake_timeout"},
            )
            if hooks is not None:
                hooks.call("on_tls_error", peer, "timeout", None)
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            self.counters.tls_handshake_errors += 1
            cause = handshake_error_cause(exc)
            logger.debug(
                "TLS handshake with %s failed: %s",
                peer,
                _handshake_error(exc),
                extra={"peer": peer, "event": "tls_handshake_error", "cause": cause},
            )
            if metrics is not None:
                metrics.count(metrics.tls_errors, cause)
            if hooks is not None:
                hooks.call("on_tls_error", peer, cause, exc)
        else:
            self.counters.tls_handshakes += 1
            # The protocol the factory made: uvloop returns its own
            # SSLProtocol from connect_accepted_socket, not ours.
            conn = made[-1]
            seconds = time.monotonic() - began
            if metrics is not None:
                metrics.handshake_seconds.observe(seconds)
            if hooks is not None:
                hooks.call("on_tls_handshake", conn, seconds)
            return conn
        finally:
            self._handshaking.discard(task)
        sock.close()  # closed already by the transport, except on some early errors
        return None

    async def _proxy_header(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, peer: Any
    ) -> ProxyHeader | None:
        # The PROXY header, within proxy_header_timeout, read without taking
        # a byte past it (_proxy_io). Returns it (with the proxy's address),
        # or None: the header was bad or late (counted, one debug line with
        # the peer) or the peer left first; the socket is closed then, and
        # the caller frees the slot.
        settings = self.proxy
        assert settings is not None
        where = format_peer(peer)
        if self.shutting_down:  # accepted just before the listener stopped
            sock.close()
            return None
        parser = settings.parser()
        task = asyncio.current_task()
        assert task is not None
        self._handshaking.add(task)
        try:
            header = await asyncio.wait_for(read_proxy_header(loop, sock, parser), settings.timeout)
        except asyncio.TimeoutError:
            self.counters.proxy_header_timeouts += 1
            logger.debug(
                "no PROXY header from %s within %.3g s (%d bytes of it); closed",
                where,
                settings.timeout,
                parser.received,
                extra={"peer": where, "event": "proxy_header_timeout"},
            )
        except ProxyHeaderError as exc:
            if exc.cause == "truncated" and not parser.received:
                # Connected and closed without a byte: a TCP health check
                # or a port probe, not a broken header.
                logger.debug(
                    "%s closed before sending a PROXY header",
                    where,
                    extra={"peer": where, "event": "proxy_header_none"},
                )
            else:
                self.counters.proxy_header_errors += 1
                metrics = self.metrics
                if metrics is not None:
                    metrics.count(metrics.proxy_errors, exc.cause)
                logger.debug(
                    "bad PROXY header from %s (%s): %s; closed",
                    where,
                    exc.cause,
                    exc,
                    extra={"peer": where, "event": "proxy_header_error", "cause": exc.cause},
                )
        except BaseException:  # cancelled (shutdown): nothing of it in flight
            sock.close()
            raise
        else:
            return dataclasses.replace(header, proxy_address=peer)
        finally:
            self._handshaking.discard(task)
        sock.close()
        return None

    # ----------------------------------------------------------------- limits

    def _limit(self, address: Any) -> tuple[str | None, str | None]:
        # The limits on a new connection from ``address``: (key, cause).
        # cause: None admits it, else "overload", "concurrency" or "rate".
        # key: the peer's key to release at close (None: nothing to release).
        gate = self._overload
        if gate is not None and gate.overloaded:
            return None, "overload"
        peers = self._peers
        if peers is None:
            return None, None
        assert self.limits is not None
        key = peer_key(address, self.limits.ipv6_prefix)
        if key is None:  # a Unix-socket peer, a LOCAL header: not limited per peer
            return None, None
        cause = peers.admit(key)
        if cause is not None:
            return None, cause
        return key, None

    def _reject(self, address: Any, cause: str) -> None:
        # Count a connection refused by the limits; log it at DEBUG (the
        # first few per interval, then a summary). The caller closes it.
        name = f"rejected_{cause}"
        setattr(self.counters, name, getattr(self.counters, name) + 1)
        limiter = self._reject_log
        if logger.isEnabledFor(logging.DEBUG) and (limiter is None or limiter.allow()):
            where = format_peer(address)
            logger.debug(
                "refused a connection from %s: %s limit; closed",
                where,
                cause,
                extra={"peer": where, "event": "rejected", "cause": cause},
            )

    async def _overload_loop(self) -> None:
        # Every overload_interval, sum the bytes the connections buffer
        # (O(connections), nothing per read) and flip the gate at the marks.
        gate = self._overload
        limits = self.limits
        assert gate is not None and limits is not None
        while True:
            await asyncio.sleep(limits.overload_interval)
            try:
                if gate.update(self._buffered_bytes()):
                    self._overload_changed(gate)
            except Exception:  # never let the watch die: log, and look again
                logger.exception("the overload watch failed; retrying")

    def _buffered_bytes(self) -> int:
        # What the open connections buffer now (O(connections)): the overload
        # watch's sum, and stats()'s buffered_bytes. Over a copy taken in one
        # step: a scrape may come from another thread (prometheus_client's).
        total = 0
        for conn in tuple(self.connections):
            if conn._transport is not None and not conn._lost:
                total += conn._buffered
        return total

    def _overload_changed(self, gate: OverloadGate) -> None:
        now = time.monotonic()
        if gate.overloaded:
            self.counters.overload_episodes += 1
            self._overload_since = now
            logger.warning(
                "overloaded: %d bytes buffered (over %d); not accepting until %d or less",
                gate.buffered,
                gate.high,
                gate.low,
                extra={"event": "overload_start", "buffered": gate.buffered},
            )
        else:
            logger.warning(
                "overload over after %.3g s: %d bytes buffered (%d or less); accepting again",
                now - self._overload_since,
                gate.buffered,
                gate.low,
                extra={"event": "overload_end", "buffered": gate.buffered},
            )
        if self.on_overload is not None:
            self.on_overload(gate.overloaded)

    @property
    def overloaded(self) -> bool:
        """True during an overload episode (``Limits.overload_high``)."""
        return self._overload is not None and self._overload.overloaded

    # ---------------------------------------------------------------- handlers

    async def _run_handler(self, conn: Connection) -> None:
        loop = self._loop
        assert loop is not None
        if self._callback is not None:
            # The callback runs inside buffer_updated; wait for the end of input.
            try:
                await conn._wait_input_end()
            except asyncio.CancelledError:
                _abort_with_reset(conn)
                raise
            return
        assert self._task_handler is not None
        run = self._task_handler(conn)
        if not asyncio.iscoroutine(run):  # an awaitable that is not a coroutine
            run = _as_coroutine(run)
        handler_task = loop.create_task(run)
        try:
            await asyncio.wait((handler_task,))
        except asyncio.CancelledError:
            # Forced shutdown: stop the handler, drop what is unsent.
            handler_task.cancel()
            _abort_with_reset(conn)
            await asyncio.wait((handler_task,), timeout=CANCEL_GRACE)
            raise
        if handler_task.cancelled():
            return
        exc = handler_task.exception()
        if exc is None or isinstance(exc, (ConnectionBrokenError, ConnectionClosedError)):
            return  # returned, or the peer went away / we closed: a normal end
        self._handler_failed(conn, exc)  # type: ignore[arg-type]

    def _handler_failed(self, conn: Connection, exc: Exception) -> None:
        self.counters.handler_errors += 1
        self._close_reasons[conn] = "handler_error"
        if self.hooks is not None:
            self.hooks.call("on_handler_error", conn, exc)
        peer = format_peer(conn.peer)
        logger.error(
            "handler raised %s: %s; closing the connection to %s",
            type(exc).__name__,
            exc,
            peer,
            exc_info=exc,
            extra={"peer": peer, "event": "handler_error"},
        )

    async def _linger(self, conn: Connection) -> None:
        # After our FIN, the peer may still be sending (a pipelining client
        # has not seen the FIN yet); its bytes are read and dropped. Closing
        # the socket while input keeps arriving makes the kernel reset the
        # connection, which throws away whatever of our replies it has not
        # delivered yet. So close when that cannot lose anything: the peer
        # closed too (its FIN closes the transport at once), or every byte
        # we sent has been acknowledged (Linux: SIOCOUTQ; elsewhere, the
        # peer has sent nothing for LINGER_QUIET seconds, as nginx's
        # lingering_timeout). A peer that does neither (it stopped reading)
        # is aborted after CLOSE_LINGER seconds.
        #
        # TLS cannot half-close: there the loop's TLS layer flushes, sends
        # close_notify and waits for the peer's (or its EOF), aborting after
        # its ssl_shutdown_timeout; the same timer aborts after
        # tls_shutdown_timeout (plus a second) where the loop has no such
        # timeout of its own (CPython 3.10).
        if conn._lost:
            return
        assert self._loop is not None
        if conn.strategy == "tls":
            lingering = Lingering(conn, self._loop, self.tls_shutdown_timeout + 1.0)
        else:
            lingering = Lingering(conn, self._loop)
        try:
            await conn.wait_closed()
        finally:
            lingering.cancel()

    def _closed(self, conn: Connection, duration: float, reason: str) -> None:
        # Once per connection, after close: the duration histogram and the hook.
        metrics = self.metrics
        if metrics is not None:
            metrics.connection_seconds.observe(duration)
        hooks = self.hooks
        if hooks is not None and hooks.on_close is not None:
            info = CloseInfo(
                peer=conn.peer,
                duration=duration,
                bytes_in=conn.bytes_in,
                bytes_out=conn.bytes_out,
                frames_in=conn.frames_in,
                frames_out=conn.frames_out,
                reason=reason,
            )
            hooks.call("on_close", conn, info)

    def _add_closed(self, conn: Connection) -> None:
        c = self.counters
        c.closed += 1
        c.bytes_in += conn.bytes_in
        c.frames_in += conn.frames_in
        c.bytes_out += conn.bytes_out
        c.frames_out += conn.frames_out
        c.writes += conn.writes
        skipped = _lines_skipped(conn)
        if skipped:
            c.lines_skipped += skipped
            logger.info("%s sent %d over-long lines; skipped", format_peer(conn.peer), skipped)

    # ------------------------------------------ the connection's observer role

    def frame_error(self, conn: Any, exc: FrameError) -> None:
        """Count a framing error; log it (the first few per interval, then a summary)."""
        self.counters.frame_errors += 1
        self._close_reasons[conn] = "frame_error"
        if self.metrics is not None:
            self.metrics.count(self.metrics.frame_errors, frame_error_kind(exc))
        if self.hooks is not None:
            self.hooks.call("on_frame_error", conn, exc)
        limiter = self._frame_log
        if limiter is None or limiter.allow():
            peer = format_peer(conn.peer)
            logger.info(
                "framing error from %s: %s; closing it",
                peer,
                exc,
                extra={"peer": peer, "event": "frame_error", "kind": frame_error_kind(exc)},
            )

    # ------------------------------------------------------ the one timer

    async def _timer_loop(self) -> None:
        # One timer per server, not one per read: every tick, each
        # connection's counters are compared with the last tick's. Cost:
        # O(connections) per tick, nothing per read. Resolution: a
        # connection is closed between `timeout` and `timeout + 2 * tick`
        # seconds after the fact.
        #
        # Idle: the handler waits for input, no byte arrived, and the peer
        # took none of our output (bytes_out, the transport's write buffer
        # and, on Linux, the socket's unacknowledged bytes unchanged): a
        # client reading replies slowly while reading is paused by our
        # write backpressure is busy, not idle. A handler that is working
        # (not waiting for input) is never idle.
        #
        # Frame deadline: part of a frame is buffered (the decoder's
        # `pending`) and no frame has completed since the part began.
        # Skipped while reading is paused by our own backpressure: the
        # frame cannot progress then through no fault of the peer.
        #
        # A frames-per-second pause (Limits.frame_rate) counts as our
        # backpressure for both timers, though the peer caused it by
        # sending fast: it ends by itself once the bucket refills, its
        # length is the debt the peer ran up (not a time the peer can
        # stretch by sending slowly, which is what the deadline is for),
        # and a rate limit is meant to slow a peer down, not disconnect it.
        idle_timeout = self.idle_timeout
        frame_timeout = self.frame_timeout
        shortest = min(t for t in (idle_timeout, frame_timeout) if t is not None)
        tick = min(max(shortest / TIMER_DIVISIONS, TIMER_TICK_MIN), TIMER_TICK_MAX)
        loop = asyncio.get_running_loop()
        idle_seen: dict[Connection, tuple[int, int, int, int, float]] = {}
        frame_seen: dict[Connection, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            idle_now: dict[Connection, tuple[int, int, int, int, float]] = {}
            frame_now: dict[Connection, tuple[int, float]] = {}
            for conn in list(self.connections):
                transport = conn._transport
                if transport is None or conn._lost or transport.is_closing():
                    continue
                if frame_timeout is not None and conn._frame_pending and not conn._backpressured:
                    began = frame_seen.get(conn)
                    if began is None or began[0] != conn.frames_in:
                        frame_now[conn] = (conn.frames_in, now)
                    elif now - began[1] >= frame_timeout:
                        self._frame_timed_out(conn, frame_timeout)
                        continue
                    else:
                        frame_now[conn] = began
                if idle_timeout is not None:
                    activity = (conn.bytes_in, conn.bytes_out, transport.get_write_buffer_size())
                    last = idle_seen.get(conn)
                    if (
                        last is None
                        or last[:3] != activity
                        or not conn._idle
                        or (conn._backpressured and not conn._write_backpressured)
                    ):
                        idle_now[conn] = (*activity, -1, now)
                        continue
                    # Nothing changed that the transport shows; our replies
                    # may still be leaving the kernel's send queue for a
                    # peer that reads them slowly (a probe saw 8 MiB take
                    # 5 s): that queue shrinking is the peer taking output.
                    queued = send_queue(transport) if activity[1] else 0
                    if last[3] >= 0 and queued != last[3]:
                        idle_now[conn] = (*activity, queued, now)
                    elif now - last[4] >= idle_timeout:
                        self.counters.idle_timeouts += 1
                        self._close_reasons[conn] = "idle_timeout"
                        peer = format_peer(conn.peer)
                        logger.info(
                            "closing %s: idle for %.3g s",
                            peer,
                            idle_timeout,
                            extra={"peer": peer, "event": "idle_timeout"},
                        )
                        conn._idle_timeout()
                    else:
                        idle_now[conn] = (*activity, queued, last[4])
            idle_seen = idle_now
            frame_seen = frame_now

    def _frame_timed_out(self, conn: Connection, timeout: float) -> None:
        self.counters.frame_timeouts += 1
        self._close_reasons[conn] = "frame_timeout"
        peer = format_peer(conn.peer)
        logger.info(
            "closing %s: a frame took longer than %.3g s (%d bytes of it received)",
            peer,
            timeout,
            conn._frame_pending,
            extra={"peer": peer, "event": "frame_timeout"},
        )
        conn._timed_out(f"closed after the frame timeout ({timeout:.3g} s)")

    # --------------------------------------------------------------- shutdown

    def has_fresh_connections(self) -> bool:
        """True if a connection is still being set up or has received nothing yet."""
        if len(self.tasks) > len(self.connections):
            return True  # a PROXY header or a set-up in progress
        return any(conn.bytes_in == 0 for conn in self.connections)

    def begin_shutdown(self) -> None:
        """Step 2 of a shutdown: no more input; handlers finish the frames they have."""
        self.shutting_down = True
        for task in list(self._handshaking):
            task.cancel()  # its socket is closed as the handshake unwinds
        for conn in list(self.connections):
            if conn._transport is not None:
                self._shutdown_connection(conn)

    async def drain(self, timeout: float) -> None:
        """Steps 3 and 4 of a shutdown: wait for the connections, then abort the rest.

        Each connection's task flushes and closes its connection when its
        handler returns. After ``timeout`` seconds, the tasks left are
        cancelled and every transport left is aborted with a reset.
        """
        tasks = set(self.tasks)
        if tasks:
            logger.info(
                "shutting down: waiting up to %.3g s for %d connections", timeout, len(tasks)
            )
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                logger.warning(
                    "drain timeout (%.3g s): cancelling %d connections", timeout, len(pending)
                )
                for task in pending:
                    task.cancel()
                for conn in list(self.connections):
                    self._close_reasons[conn] = "drain_timeout"
                    _abort_with_reset(conn)
                _, stuck = await asyncio.wait(pending, timeout=CANCEL_GRACE)
                if stuck:
                    logger.error("%d handlers ignored cancellation", len(stuck))
        if self._frame_log is not None:
            self._frame_log.flush()

    # ------------------------------------------------------------- statistics

    def stats(self) -> dict[str, int]:
        """The counters of closed connections plus the live ones, and ``active``."""
        c = self.counters
        result = {name: getattr(c, name) for name in _Counters.__slots__}
        for conn in tuple(self.connections):
            result["bytes_in"] += conn.bytes_in
            result["frames_in"] += conn.frames_in
            result["bytes_out"] += conn.bytes_out
            result["frames_out"] += conn.frames_out
            result["writes"] += conn.writes
            result["lines_skipped"] += _lines_skipped(conn)
        result["active"] = len(self.connections)
        peers = self._peers
        result["peer_table_evictions"] = 0 if peers is None else peers.evictions
        gate = self._overload
        result["overloaded"] = int(gate is not None and gate.overloaded)
        result["buffered_bytes"] = self._buffered_bytes()
        return result


def _stop_frame_rate(conn: Connection) -> None:
    # The frames-per-second limit ends with the handler: the lingering close
    # reads and drops at full speed, and no resume timer outlives the close.
    limiter = conn._frame_rate
    if limiter is not None:
        conn._frame_rate = None
        limiter.cancel()


def _peer_of(sock: socket.socket) -> str:
    try:
        return format_peer(sock.getpeername())
    except OSError:
        return "a peer that has gone"


def _handshake_error(exc: BaseException) -> str:
    # One line: OpenSSL's reason ("wrong version number", "certificate
    # verify failed"...) rather than the whole SSLError repr.
    if isinstance(exc, ssl.SSLError) and exc.reason:
        detail = getattr(exc, "verify_message", None)
        reason = exc.reason.replace("_", " ").lower()
        return f"{reason} ({detail})" if detail else reason
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _loop_has_tls_shutdown_timeout(loop: asyncio.AbstractEventLoop) -> bool:
    # connect_accepted_socket takes ssl_shutdown_timeout on CPython 3.11+
    # and on uvloop (0.15+); CPython 3.10's does not.
    return sys.version_info >= (3, 11) or type(loop).__module__.startswith("uvloop")


def _lines_skipped(conn: Connection) -> int:
    # Over-long lines the connection's line decoder skipped without an error
    # (Lines(on_too_long="skip")); 0 for other framings.
    if getattr(conn._framing, "on_too_long", None) != "skip":
        return 0
    return int(conn._decoder.skipped)


async def _as_coroutine(awaitable: Awaitable[None]) -> None:
    # create_task wants a coroutine; a handler may return another awaitable.
    # (Coroutines are not wrapped: a level more in the handler's await chain
    # would cost a frame switch on every read.)
    await awaitable
