"""``Server``: bind, accept, one task per connection, limits, timeouts, graceful shutdown.

Also ``serve`` (a coroutine that runs a server until SIGINT/SIGTERM) and
``run`` (the same, on a new event loop, uvloop when installed).

The accept loop is fastnet's own, not ``loop.create_server``, for one
reason: it takes a connection slot *before* it accepts. With
``max_connections`` connections open, the loop waits on the slot semaphore
and does not call accept(2); clients that arrive meanwhile wait in the
kernel's listen backlog instead of being accepted and dropped, and are
served, in order, as slots free up.

Shutdown, step by step (``shutdown()``, or the first SIGINT/SIGTERM):

1. Stop accepting at once: cancel the accept loop and close the listening
   socket, so new connections are refused.
2. Tell every connection: reading stops, frames already received stay
   queued, and ``conn.shutting_down`` turns true. A handler waiting for input
   sees the end of it (``async for`` ends, ``recv`` raises
   ``ConnectionClosedError``); a handler still working finishes its frames.
3. Each connection's task flushes the handler's replies and closes the
   transport when the handler returns.
4. After ``drain_timeout`` seconds, cancel the handlers that are still
   running and abort every transport left.
5. ``serve_forever`` returns (and ``run`` and the CLI, with status 0).

A second SIGINT/SIGTERM during that drain kills the process at once: the
first one restores the default dispositions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from .connection import Connection
from .errors import ConnectionBrokenError, ConnectionClosedError, FrameError
from .framing import Framing, LengthPrefixed
from ._tunables import DEFAULT_MAX_WRITE_BUFFER
from .framing import Buffer
from .protocol import FrameProtocol

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_CONNECTIONS",
    "CallbackHandler",
    "Handler",
    "Server",
    "callback_handler",
    "new_event_loop",
    "run",
    "serve",
]

logger = logging.getLogger("fastnet")

T = TypeVar("T")

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

    def __init__(self, fn: CallbackFunction) -> None:
        if not callable(fn):
            raise TypeError(f"a callback handler must be callable, not {type(fn).__name__}")
        self.fn = fn
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<fastnet.CallbackHandler {getattr(self.fn, '__qualname__', self.fn)!r}>"


def callback_handler(fn: CallbackFunction) -> CallbackHandler:
    """Decorate ``def handler(conn, frames) -> replies`` as a ``CallbackHandler``."""
    return CallbackHandler(fn)


Handler = Callable[[Connection], Awaitable[None]] | CallbackHandler

# 1000 connections keep a default-configured Linux process (soft limit of 1024
# file descriptors) out of EMFILE, with room for the listening socket, the
# event loop's own descriptors and a few files. Raise both together.
DEFAULT_MAX_CONNECTIONS = 1000

# Connections beyond max_connections wait in the kernel's accept queue, so it
# should hold a burst: 1024 (Linux caps it at net.core.somaxconn, 4096 by
# default since 5.4). asyncio's default of 100 is tuned for servers that
# accept everything at once.
DEFAULT_BACKLOG = 1024

# accept(2) errors, classified as trio's _highlevel_socket.py and
# _highlevel_serve_listeners.py do. These mean the process or the system is
# out of a resource (descriptors, memory, buffers): accepting again at once
# would fail again, so back off; connections already open will free some.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# These concern one connection that died (or was refused by a firewall)
# between the handshake and accept(2); the next one is fine: retry at once.
ACCEPT_IGNORABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
# Back-off after a capacity error: trio sleeps a fixed 100 ms; we start there
# and double up to 1 s while the errors persist, so a long outage costs one
# log line a second instead of ten.
ACCEPT_BACKOFF_MIN = 0.1
ACCEPT_BACKOFF_MAX = 1.0

# After the handler returns, the connection still writes what it buffers,
# sends FIN, and waits for the peer's FIN. A peer that never reads, or never
# closes, would keep it (and its slot) forever, so it is aborted after this
# many seconds: long enough for a slow client to take a large last reply.
# During shutdown, the drain timeout bounds it too.
CLOSE_LINGER = 30.0

# How often a lingering close looks at the connection: a fiftieth of a
# second keeps shutdown quick when clients hold idle connections open, for
# one ioctl per connection per poll.
LINGER_POLL = 0.02
# Without SIOCOUTQ, a lingering connection whose peer has sent nothing for
# this long is closed without waiting for its FIN (nginx waits 5 s by
# default; a shutdown waits for this, so it is shorter here).
LINGER_QUIET = 0.5

# After the drain timeout, cancelled handlers get this long to unwind
# (finally blocks, context managers) before shutdown stops waiting for them.
CANCEL_GRACE = 1.0


class _Counters:
    """The server's counters for connections that have closed (open ones are summed live)."""

    __slots__ = (
        "accept_errors",
        "accepted",
        "bytes_in",
        "bytes_out",
        "closed",
        "frame_errors",
        "frames_in",
        "frames_out",
        "handler_errors",
        "idle_timeouts",
        "writes",
    )

    def __init__(self) -> None:
        self.accept_errors = 0
        self.accepted = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = 0
        self.frame_errors = 0
        self.frames_in = 0
        self.frames_out = 0
        self.handler_errors = 0
        self.idle_timeouts = 0
        self.writes = 0


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
            kernel's backlog until one closes.
        idle_timeout: seconds a handler may wait for input with no byte
            arriving (a frame stuck half-sent included) before the
            connection is closed; None for no limit.
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
        drain_timeout: float = 30.0,
        backlog: int = DEFAULT_BACKLOG,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        unix: str | os.PathLike[str] | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        if not callable(handler) and not isinstance(handler, CallbackHandler):
            raise TypeError(f"handler must be an async callable, not {type(handler).__name__}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout must not be negative, got {drain_timeout}")
        if sock is not None and unix is not None:
            raise ValueError("give sock or unix, not both")
        self._handler = handler
        # One of the two is set: a task handler, or a callback handler's function.
        self._callback: CallbackFunction | None = None
        self._task_handler: Callable[[Connection], Awaitable[None]] | None = None
        if isinstance(handler, CallbackHandler):
            self._callback = handler.fn
        else:
            self._task_handler = handler
        self._host = host
        self._port = port
        self._framing: Framing = LengthPrefixed() if framing is None else framing
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._sock = sock
        self._unix = os.fspath(unix) if unix is not None else None
        self._unix_inode: tuple[int, int] | None = None
        self._max_write_buffer = max_write_buffer

        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._sockname: Any = None
        self._slots: asyncio.Semaphore | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[Connection] = set()
        self._counters = _Counters()
        self._stopping = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None

    def __repr__(self) -> str:
        state = "stopping" if self._stopping else "serving" if self._listener else "new"
        return f"<fastnet.Server {state} {self.address}>"

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
        self._slots = asyncio.Semaphore(self.max_connections)
        if self._sock is not None:
            listener = self._sock
        elif self._unix is not None:
            listener = self._bind_unix(self._unix)
        else:
            listener = await self._bind_tcp(loop)
        try:
            listener.setblocking(False)
            listener.listen(self._backlog)
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot listen on {self.address}: {exc.strerror}") from None
        self._listener = listener
        self._sockname = listener.getsockname()
        self._accept_task = loop.create_task(self._accept_loop(listener))
        if self.idle_timeout is not None:
            self._idle_task = loop.create_task(self._idle_loop(self.idle_timeout))
        logger.info("listening on %s", self.address)

    async def _bind_tcp(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        where = _format_address(self._host, self._port)
        try:
            infos = await loop.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot resolve {where}: {exc.strerror}") from None
        if not infos:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {where}")
        family, type_, proto, _, address = infos[0]  # one interface: the first address
        sock = socket.socket(family, type_, proto)
        try:
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                if not hasattr(socket, "SO_REUSEPORT"):
                    raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not supported here")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Bind IPv6 only: "::" must not also take the IPv4 port.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
        return sock

    def _bind_unix(self, path: str) -> socket.socket:
        where = f"unix:{path}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISSOCK(st.st_mode) and not _unix_socket_in_use(path):
                os.unlink(path)  # stale: left behind by a process that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
        st = os.stat(path)
        self._unix_inode = (st.st_dev, st.st_ino)
        return sock

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (one, or none before start and after shutdown)."""
        return () if self._listener is None else (self._listener,)

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
            return _format_address(name[0], name[1])
        if isinstance(name, (str, bytes)) and name:
            return f"unix:{os.fsdecode(name)}"
        if self._unix is not None:
            return f"unix:{self._unix}"
        return _format_address(self._host, self._port)

    @property
    def shutting_down(self) -> bool:
        """True once ``shutdown()`` has begun."""
        return self._stopping

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -------------------------------------------------------------- accepting

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        slots = self._slots
        assert slots is not None
        counters = self._counters
        backoff = ACCEPT_BACKOFF_MIN
        while True:
            # Step 1: take a slot first. At max_connections this waits, and
            # new clients queue in the kernel backlog rather than being
            # accepted and dropped.
            await slots.acquire()
            try:
                # Step 2: accept one connection; errors never end the loop.
                while True:
                    try:
                        sock = await self._accept(loop, listener)
                    except OSError as exc:
                        counters.accept_errors += 1
                        if exc.errno in ACCEPT_IGNORABLE_ERRNOS:
                            logger.debug("accept failed (%s); accepting the next one", exc)
                            continue
                        if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                            level = logging.ERROR
                        else:  # unknown: log loudly, but keep serving
                            level = logging.CRITICAL
                        logger.log(level, "accept failed (%s); retrying in %.1f s", exc, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                        continue
                    backoff = ACCEPT_BACKOFF_MIN
                    break
            except BaseException:
                slots.release()
                raise
            counters.accepted += 1
            # Step 3: the connection's own task takes it from here (and gives
            # the slot back when the connection is closed).
            task = loop.create_task(self._serve_connection(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _accept(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> socket.socket:
        # accept(2) is called here, synchronously, after waiting for the
        # listening socket to be readable; not through loop.sock_accept,
        # whose future may hold an accepted socket when the accept loop is
        # cancelled at shutdown, and then lose it (a descriptor leak in both
        # asyncio and uvloop). Cancellation can only strike while no
        # socket exists.
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                pass
            else:
                sock.setblocking(False)
                return sock
            waiter = loop.create_future()
            fd = listener.fileno()
            try:
                loop.add_reader(fd, _set_result, waiter)
            except NotImplementedError:  # Windows' proactor loop has no add_reader
                sock, _ = await loop.sock_accept(listener)
                return sock
            try:
                await waiter
            finally:
                loop.remove_reader(fd)

    async def _serve_connection(self, sock: socket.socket) -> None:
        # Supervises one connection: sets it up, runs the handler in a task
        # of its own, then closes the connection and frees the slot. The
        # handler gets its own task so that its await chain, resumed on
        # every read, is as short as possible: handler, recv_batch, wake-up.
        assert self._slots is not None and self._loop is not None
        conn: Connection | None = None
        try:
            try:
                _, conn = await self._loop.connect_accepted_socket(self._make_connection, sock)
            except OSError as exc:  # the peer vanished during setup
                logger.debug("could not set up an accepted connection: %s", exc)
                sock.close()
                self._counters.closed += 1
                return
            self._connections.add(conn)
            if self._stopping:
                conn._begin_shutdown()
            if self._callback is not None:
                # The callback runs inside buffer_updated; wait for the end of input.
                try:
                    await conn._wait_input_end()
                except asyncio.CancelledError:
                    conn.abort()
                    raise
                if conn._handler_error is not None:
                    self._handler_failed(conn, conn._handler_error)
            else:
                assert self._task_handler is not None
                run = self._task_handler(conn)
                if not asyncio.iscoroutine(run):  # an awaitable that is not a coroutine
                    run = _as_coroutine(run)
                handler_task = self._loop.create_task(run)
                try:
                    await asyncio.wait((handler_task,))
                except asyncio.CancelledError:
                    # Forced shutdown: stop the handler, drop what is unsent.
                    handler_task.cancel()
                    conn.abort()
                    await asyncio.wait((handler_task,), timeout=CANCEL_GRACE)
                    raise
                self._handler_done(conn, handler_task)
            # Tasks the handler spawned on the connection finish first (the
            # drain timeout bounds this wait as it bounds the handler's).
            try:
                await conn._wait_tasks()
            except asyncio.CancelledError:
                conn.abort()
                raise
            if conn._handler_error is not None and self._task_handler is not None:
                self._handler_failed(conn, conn._handler_error)  # a spawned task failed
            # Flush the replies, send FIN, and close once the peer has closed
            # too or gone quiet (a lingering close, see _linger). Wait for
            # that before freeing the slot, so max_connections counts open
            # sockets.
            conn._finish()
            await self._linger(conn)
        finally:
            if conn is not None:
                self._connections.discard(conn)
                self._add_closed(conn)
            self._slots.release()

    async def _linger(self, conn: Connection) -> None:
        # After our FIN, the peer may still be sending (a pipelining client
        # has not seen the FIN yet); its bytes are read and dropped. Closing
        # the socket while input keeps arriving makes the kernel reset the
        # connection, which throws away whatever of our replies it has not
        # delivered yet. So close when that cannot lose anything: the peer
        # closed too, or every byte we sent has been acknowledged (Linux:
        # SIOCOUTQ; elsewhere, the peer has sent nothing for LINGER_QUIET
        # seconds, as nginx's lingering_timeout). A peer that does neither
        # (it stopped reading) is aborted after CLOSE_LINGER seconds.
        if conn._lost:
            return
        loop = asyncio.get_running_loop()
        transport = conn._transport
        unacknowledged = _unacknowledged_probe(transport)
        deadline = loop.time() + CLOSE_LINGER
        closed = loop.create_task(conn.wait_closed())
        seen = conn.bytes_in
        quiet_since = loop.time()
        try:
            while True:
                done, _ = await asyncio.wait((closed,), timeout=LINGER_POLL)
                if done:
                    return
                now = loop.time()
                if now >= deadline:
                    logger.info(
                        "%s did not take its last replies; aborted", _format_peer(conn.peer)
                    )
                    conn.abort()
                    await asyncio.wait((closed,), timeout=1.0)
                    return
                if conn.bytes_in != seen:
                    seen = conn.bytes_in
                    quiet_since = now
                if transport.is_closing() or transport.get_write_buffer_size():
                    continue  # closing already, or replies still in our buffer
                if unacknowledged is not None:
                    safe = unacknowledged() == 0
                else:
                    safe = now - quiet_since >= LINGER_QUIET
                if safe:
                    transport.close()
        finally:
            closed.cancel()

    def _make_connection(self) -> Connection:
        conn = Connection(self._framing, server=self, max_write_buffer=self._max_write_buffer)
        conn._on_frames = self._callback
        return conn

    def _handler_done(self, conn: Connection, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, (ConnectionBrokenError, ConnectionClosedError)):
            return  # returned, or the peer went away / we closed: a normal end
        self._handler_failed(conn, exc)  # type: ignore[arg-type]

    def _handler_failed(self, conn: Connection, exc: Exception) -> None:
        self._counters.handler_errors += 1
        logger.error(
            "handler failed for %s: %s: %s",
            _format_peer(conn.peer),
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    def _add_closed(self, conn: Connection) -> None:
        c = self._counters
        c.closed += 1
        c.bytes_in += conn.bytes_in
        c.frames_in += conn.frames_in
        c.bytes_out += conn.bytes_out
        c.frames_out += conn.frames_out
        c.writes += conn.writes

    def _frame_error(self, conn: FrameProtocol, exc: FrameError) -> None:
        self._counters.frame_errors += 1
        logger.info("framing error from %s: %s; closing it", _format_peer(conn.peer), exc)

    async def _idle_loop(self, timeout: float) -> None:
        # One timer per server, not one per read: every tick, compare each
        # connection's byte counter with the last tick's. A connection whose
        # handler is waiting for input and whose counter has not moved for
        # `timeout` seconds is closed. Cost: O(connections) per tick, nothing
        # per read. Resolution: a connection is closed between `timeout` and
        # `timeout + 2 * tick` seconds after its last byte.
        tick = max(timeout / 8, 0.005)
        loop = asyncio.get_running_loop()
        seen: dict[Connection, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            current: dict[Connection, tuple[int, float]] = {}
            for conn in self._connections:
                received = conn.bytes_in
                last = seen.get(conn)
                if last is None or last[0] != received or not conn._idle:
                    current[conn] = (received, now)
                elif now - last[1] >= timeout:
                    self._counters.idle_timeouts += 1
                    logger.info("closing %s: idle for %.3g s", _format_peer(conn.peer), timeout)
                    conn._idle_timeout()
                else:
                    current[conn] = last
            seen = current

    # ------------------------------------------------------------- statistics

    def stats(self) -> dict[str, int]:
        """Return the server's counters.

        Keys: ``active`` (open connections), ``accepted``, ``closed``,
        ``frames_in``, ``frames_out``, ``bytes_in``, ``bytes_out``, ``writes``
        (transport writes: frames_out / writes is the coalescing factor),
        ``handler_errors``, ``frame_errors``, ``accept_errors``,
        ``idle_timeouts``. Counters are kept per read and per write, and
        summed here over the open connections.
        """
        c = self._counters
        result = {name: getattr(c, name) for name in _Counters.__slots__}
        for conn in self._connections:
            result["bytes_in"] += conn.bytes_in
            result["frames_in"] += conn.frames_in
            result["bytes_out"] += conn.bytes_out
            result["frames_out"] += conn.frames_out
            result["writes"] += conn.writes
        result["active"] = len(self._connections)
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
        # Step 1: stop accepting at once; the kernel refuses new connections
        # (and resets those waiting in the backlog) when the socket closes.
        # The accept loop must be gone first: it watches the socket's
        # descriptor, and closing a watched descriptor upsets uvloop.
        for task in (self._accept_task, self._idle_task):
            if task is not None:
                task.cancel()
        for task in (self._accept_task, self._idle_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._close_listener()
        # Step 2: no more input; handlers finish the frames they have.
        for conn in list(self._connections):
            conn._begin_shutdown()
        # Step 3: wait for the handlers; each task flushes and closes its
        # connection when its handler returns.
        tasks = set(self._tasks)
        if tasks:
            logger.info(
                "shutting down: waiting up to %.3g s for %d connections",
                drain_timeout,
                len(tasks),
            )
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
            # Step 4: out of patience: cancel the rest and close every transport.
            if pending:
                logger.warning(
                    "drain timeout (%.3g s): cancelling %d connections", drain_timeout, len(pending)
                )
                for task in pending:
                    task.cancel()
                for conn in list(self._connections):
                    conn.abort()
                _, stuck = await asyncio.wait(pending, timeout=CANCEL_GRACE)
                if stuck:
                    logger.error("%d handlers ignored cancellation", len(stuck))
        logger.info("shut down")
        self._done.set()

    def _close_listener(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._listener = None
        listener.close()
        path = self._unix
        if path is not None and self._unix_inode is not None:
            # Remove our socket file, unless another server replaced it since.
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._unix_inode:
                    os.unlink(path)
            except OSError:
                pass


def _unacknowledged_probe(transport: asyncio.BaseTransport) -> Callable[[], int] | None:
    """A function returning the bytes of the socket's send queue not yet acknowledged.

    Linux only (the SIOCOUTQ ioctl, which is TIOCOUTQ's number); None elsewhere
    or for sockets that are not TCP.
    """
    if not sys.platform.startswith("linux"):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    import fcntl
    import termios

    fd = sock.fileno()

    def unacknowledged() -> int:
        try:
            raw = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0  # the socket is gone: nothing left to lose
        return int.from_bytes(raw, sys.byteorder, signed=True)

    return unacknowledged


async def _as_coroutine(awaitable: Awaitable[None]) -> None:
    # create_task wants a coroutine; a handler may return another awaitable.
    # (Coroutines are not wrapped: a level more in the handler's await chain
    # would cost a frame switch on every read.)
    await awaitable


def _set_result(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _unix_socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _format_address(host: str, port: int | None) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return _format_address(str(peer[0]), peer[1])
    return str(peer) if peer else "unix peer"


# ------------------------------------------------------------------- running


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
            kills the process at once (main thread only).

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

    def restore() -> None:
        uninstall()
        for sig, handler in previous.items():
            if handler is not None:
                with contextlib.suppress(ValueError):  # not the main thread
                    signal.signal(sig, handler)

    return restore
