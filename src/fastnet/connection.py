"""``Connection``, what a handler sees of one framed connection; ``connect``.

The mechanics underneath (receive path, handler wake-up, coalesced writes,
flow control) live in ``FrameProtocol`` (protocol.py), which ``Connection``
extends; read that module's docstring for the design. This module is the
API: receive, send, drain, close.

The receive coroutines (``recv_batch``, ``recv``, ``async for``) belong to
the connection core, with the rest of the per-read path: the extension
compiles them, so a handler's ``await conn.recv_batch()`` runs no Python
frame of fastnet's.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _reasons, framing, lingering
from ._tunables import DEFAULT_MAX_WRITE_BUFFER, PAUSE_WRITE
from .errors import ConnectionBrokenError, ConnectionClosedError, WriteBufferFull
from .framing import Buffer, Framing, LengthPrefixed
from .lifecycle import CLOSED, CLOSING, PEER_CLOSED, Lifecycle
from .protocol import FrameProtocol
from .tls import TLSInfo, tls_info
from .transports import extra_info

if TYPE_CHECKING:
    import ssl

    from ._observer import ConnectionObserver
    from .proxy import ProxyHeader

__all__ = ["Connection", "Lifecycle", "WriteBufferFull", "connect"]

T = TypeVar("T")


class Connection(FrameProtocol):
    """One framed connection, as a handler sees it.

    A handler receives it as its only argument (``async def handler(conn)``);
    ``fastnet.connect`` returns one for the client side. It is also the
    connection's asyncio protocol; its protocol methods (``buffer_updated``
    and the like) are for the transport only.

    Receiving: ``async for frame in conn``, ``await conn.recv()``, or
    ``await conn.recv_batch()``, every frame already decoded, at least one:
    the fast path, one task wake-up per read. One task receives at a time.

    Sending: ``conn.send(frame)`` and ``conn.send_many(frames)`` queue frames
    and return at once. Everything queued while the handler works on one
    batch goes out in one transport write: when it next waits for input or
    calls ``drain``, when the connection closes, or on the loop's next
    iteration. A frame must not be mutated after it is sent. ``await
    conn.drain()`` flushes and waits while the transport's write buffer is
    over its high-water mark.

    Closing: ``conn.close()`` (idempotent) flushes and closes, and
    ``await conn.wait_closed()`` waits until the socket is closed. A
    Connection is an async context manager that does both on exit.

    Attributes:
        peer: the peer's address (``(host, port)`` for TCP). Behind a proxy
            that sends the PROXY protocol (``Server(proxy_protocol=...)``),
            the client's address from the header (``proxy.peer``), or the
            proxy's (``proxy.proxy_address``) when the header names none
            (``LOCAL``, ``UNKNOWN``).
        local: this side's address (the socket's, with the PROXY protocol too;
            the address the client connected to is ``proxy.destination``).
        proxy: the ``fastnet.proxy.ProxyHeader`` the connection began with
            (``proxy_address`` is the proxy's own address), or None when the
            server does not read the PROXY protocol. Set by the server
            before the transport is made (see ``connection_made``).
        shutting_down: True once the server began a graceful shutdown.

    Error handling:
        Once the queued frames are consumed, ``recv`` and ``recv_batch``
        raise ``ConnectionBrokenError`` when the peer closed its side, the
        connection broke or the peer broke the framing (chained ``from`` the
        ``OSError`` or ``FrameError``), and ``ConnectionClosedError`` when
        this side ended it (``close()``, the idle timeout, a server shutdown).
        ``async for`` ends quietly in all those cases, except after the
        handler's own ``close()``. ``send``, ``send_many`` and ``drain`` raise
        ``ConnectionClosedError`` after ``close()`` and
        ``ConnectionBrokenError`` after the connection broke or, on a client,
        after the server closed its side. Each frame is checked when it is
        sent: ``send`` and ``send_many`` raise ``WriteBufferFull`` when the
        frame would take the unsent bytes (queued, and in the transport's
        buffer) past ``max_write_buffer`` (a handler that never drains cannot
        grow memory without bound; ``try_send`` returns False instead), and
        ``FrameError``/``TypeError`` for a frame the framing cannot encode
        (over ``max_frame``, a line containing its delimiter, not
        bytes-like). Either way nothing is queued and the connection stays
        usable.

    Args:
        framing: the wire layout.
        server: the observer of a server-side connection (the server's
            supervisor, see ``_observer.ConnectionObserver``), or None.
        max_write_buffer: the hard limit of unsent bytes.
    """

    if TYPE_CHECKING:
        # The `proxy` slot is added by _implementation, to the class that
        # joins the core and this one (a slot here would clash with the
        # core's layout); type checkers see it here.
        __slots__ = ("proxy",)
    else:
        __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every connection's class puts the connection core first (see
        # __new__), so a subclass's own version of anything the core
        # implements (recv, send, __init__, ...) would be skipped without a
        # word: refuse the class instead.
        super().__init_subclass__(**kwargs)
        core = framing.ConnectionCore
        if issubclass(cls, core):  # the class _implementation makes
            return
        clash = sorted(set(vars(cls)) & set(vars(core)) - _CLASS_ATTRIBUTES)
        if clash:
            raise TypeError(
                f"{cls.__qualname__} defines {', '.join(clash)}, which fastnet's connection "
                "core implements: a Connection subclass cannot replace them (wrap the "
                "connection, or add methods of other names)"
            )

    def __new__(cls, *args: Any, **kwargs: Any) -> Connection:
        # Every connection's class puts the connection core of the backend
        # in use (fastnet._core or _core_py, chosen by fastnet.framing)
        # first, so the transport calls the core's methods directly.
        core = framing.ConnectionCore
        if issubclass(cls, core):
            self = super().__new__(cls)
        else:
            self = core.__new__(_implementation(core, cls))
        self.proxy = None
        self._lost_error = None
        self._leftover = None
        self._session = None
        return self

    if TYPE_CHECKING:
        proxy: ProxyHeader | None  # a slot of the class _implementation makes
        _session: Any  # likewise: a Router's per-connection state, or None

        def __init__(
            self,
            framing: Framing,
            *,
            server: ConnectionObserver | None = None,
            max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        ) -> None: ...

    def __repr__(self) -> str:
        state = Lifecycle(self._lifecycle).name.lower().replace("_", "-")
        return f"<fastnet.Connection {state} peer={self.peer!r} local={self.local!r}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The hook for the PROXY protocol: the server sets `proxy` in its
        # protocol factory, before the loop calls this, so `peer` is the
        # client's from the first frame on (uvloop may deliver frames before
        # connect_accepted_socket returns to the server).
        # Without a client address in the header (LOCAL, UNKNOWN), the peer
        # is the proxy, as accept(2) gave it: a health check that closes at
        # once has no peer left for the transport to ask by now.
        super().connection_made(transport)
        header = self.proxy
        if header is not None:
            peer = header.peer
            if peer is None:
                peer = header.proxy_address
            if peer is not None:
                self.peer = peer

    # ---------------------------------------------------------------- receive

    if TYPE_CHECKING:  # implemented by the connection core (_core_py.py documents them)

        async def recv_batch(self) -> list[bytes]: ...
        async def recv(self) -> bytes: ...
        async def __anext__(self) -> bytes: ...

    def __aiter__(self) -> Connection:
        return self

    # ------------------------------------------------------------------- send

    if TYPE_CHECKING:  # implemented by the connection core (_core_py.py documents them)

        def send(self, frame: Buffer) -> None: ...
        def send_many(self, frames: Iterable[Buffer]) -> None: ...
        def try_send(self, frame: Buffer) -> bool: ...
        @property
        def write_buffer_size(self) -> int: ...
        @property
        def writable(self) -> bool: ...

    async def drain(self) -> None:
        """Flush queued frames, then wait while the write buffer is over its high-water mark.

        Any number of tasks may wait in ``drain()`` at once; cancelling one
        of them leaves the others waiting.

        Raises:
            ConnectionClosedError, ConnectionBrokenError: the connection is
                closed or broke.
            FrameError: a queued frame cannot be encoded (see the class docstring).
        """
        if self._out:
            self._flush()
        block = self._send_block
        if block is not None:
            raise block()
        if not self._write_paused:
            return
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self._loop.create_future()
        # Shared by every task draining this connection: a task cancelled
        # while awaiting a future cancels that future, which would cancel
        # the others' drain too. The shield takes only the cancelled one out.
        await asyncio.shield(waiter)

    # ---------------------------------------------------- state and tasks

    @property
    def state(self) -> types.SimpleNamespace:
        """The application's own state for this connection: a namespace as long-lived as it is.

        ``conn.state.user = name`` in a handler, read back anywhere the
        connection is at hand (another connection's handler broadcasting to
        it, a spawned task). Empty until first used.
        """
        state = self._user_state
        if state is None:
            state = self._user_state = types.SimpleNamespace()
        return state  # type: ignore[no-any-return]

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` in a task tied to this connection, and return the task.

        The way to serve requests concurrently (a task per request, each
        awaiting a database, say). While such tasks run, the connection is
        not idle (the idle timeout waits), ``close()`` closes the connection
        only once they have finished (their sends still go out), and a
        server's graceful shutdown waits for them as it waits for the
        handler, within its ``drain_timeout``; ``abort()`` and the end of
        that timeout cancel them.

        An exception in one of them (other than the connection closing or
        breaking) is a handler error: the other tasks are cancelled, the
        connection is closed, and the server logs and counts it.

        Raises:
            ConnectionClosedError, ConnectionBrokenError: the connection is
                closing or closed; ``coro`` is closed unrun.
        """
        if self._lifecycle >= CLOSING:
            coro.close()
            block = self._send_block
            raise block() if block is not None else _reasons.closed_by_us()
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        tasks = self._tasks
        tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(
                exc, (ConnectionBrokenError, ConnectionClosedError)
            ):
                self._task_failed(exc)  # type: ignore[arg-type]
        if not tasks and self._close_pending:
            self._close_pending = False
            self.close()

    def _close_after_callback(self) -> None:
        # The core calls this after a callback handler's replies are written
        # when _close_pending is set: by the handler's close() (then no task
        # runs), or by a close() that waits for spawned tasks (_task_done).
        if not self._tasks:
            self._close_pending = False
            self.close()

    def _task_failed(self, exc: Exception) -> None:
        if self._handler_error is None:
            self._handler_error = exc
        for other in list(self._tasks):
            other.cancel()
        self._close_pending = False
        self.close()  # the handler's receive raises ConnectionClosedError; the server reports exc

    async def _wait_tasks(self) -> None:
        """Wait until every spawned task has finished (for the server's supervisor)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    # ------------------------------------------------------------ flow control

    @property
    def read_pauses_on_write(self) -> bool:
        """Whether reading pauses while this side's write buffer is over its high-water mark.

        True on a server's connections: a handler that answers what it reads
        then stops reading a peer that sends requests without reading the
        replies. False on client connections (``fastnet.connect``): a client
        that sends from one task while another receives must keep reading,
        or it and its server would each wait for the other to read. A server
        handler that sends independently of what it reads (a feed, a
        duplex stream) sets it to False; its read backpressure still bounds
        what it holds: reading pauses once ``READ_HIGH_FRAMES`` frames or
        ``READ_HIGH_BYTES`` bytes wait unconsumed.
        """
        return self._read_pauses_on_write

    @read_pauses_on_write.setter
    def read_pauses_on_write(self, value: bool) -> None:
        value = bool(value)
        self._read_pauses_on_write = value
        if value and self._write_paused:
            self._pause_reading(PAUSE_WRITE)
        elif not value:
            self._unpause_reading(PAUSE_WRITE)
            if self._pos < len(self._inbox):
                # A handler waiting for the peer to read before it takes the
                # next queued frame (see _wait_writing) waits no more.
                self._wakeup.wake_soon()

    # ------------------------------------------------------------------ close

    @property
    def lifecycle(self) -> Lifecycle:
        """Where the connection is: ``OPEN``, ``PEER_CLOSED``, ``CLOSING`` or ``CLOSED``."""
        return Lifecycle(self._lifecycle)

    @property
    def peer_closed(self) -> bool:
        """True once the peer has closed its side (sent FIN) or the connection is gone.

        No frame arrives after what is already queued. On a client
        connection the transport then closes: ``send`` raises
        ``ConnectionBrokenError`` and ``wait_closed()`` returns. On a
        server's connection, writing stays possible, so the handler can
        still answer the last requests of a peer that half-closed.
        """
        return self._lifecycle == PEER_CLOSED or self._lifecycle == CLOSED

    @property
    def closing(self) -> bool:
        """True once the connection is closing or closed, by either side's doing.

        That includes a client connection whose server closed its side, and
        a ``close()`` that waits for the callback handler calling it to
        return, or for spawned tasks.
        """
        return (
            self._lifecycle >= CLOSING
            or self._close_pending
            or (self._lifecycle == PEER_CLOSED and not self._half_close)
        )

    @property
    def shutting_down(self) -> bool:
        """True once the server serving this connection has begun shutting down.

        Handlers that run long loops of their own (not waiting on ``recv``)
        can poll it; waiting receivers learn it from the end of their input.
        """
        server = self._server
        return server is not None and server.shutting_down

    def close(self) -> None:
        """Flush queued frames and close the connection. Idempotent.

        The transport still writes what it buffers before closing the socket.
        Receiving and sending raise ``ConnectionClosedError`` afterwards. The
        close is the one a server handler's return makes, on both sides: FIN
        after our data, then whatever the peer still sends is read and
        dropped until it closes too or has acknowledged all our data, so a
        peer that was still sending gets everything instead of a reset. A
        server's connection waits within the server's lingering bound. A
        client with nothing in flight closes at once; one still lingering
        after 30 s closes if all its data is in the kernel, else resets
        (``abort()`` resets at once). ``wait_closed()`` returns when the
        socket is closed: await it before the event loop ends.
        Called by a callback handler, the close takes effect when it
        returns: what it sent until then and the replies it returns go out
        first.
        """
        if self._lifecycle >= CLOSING:
            if self._leftover is not None:
                # Lost, and the input its socket still held is being read
                # (leftover.py): no more of it, and receiving raises as after
                # any close.
                self._input_ended(_reasons.closed_by_us, quiet=False, pause=False)
            return
        if self._tasks:
            # Spawned tasks still run: no more input, and the close happens
            # when the last of them is done (_task_done), after their sends.
            self._close_pending = True
            self._input_ended(_reasons.closed_by_us, quiet=False)
            return
        if self._delivering and self._on_frames is not None:
            # A callback handler closes: the close happens when it returns
            # (_close_after_callback), after the replies it returns.
            self._close_pending = True
            return
        if self._out and self._lifecycle != CLOSED:
            try:
                self._flush()
            except Exception:  # the flush failed the connection and closed it
                return
        # FIN after what we sent, then what the peer still sends is read and
        # dropped until the close cannot lose our data (lingering.py).
        # Closing the socket with input unread, or input arriving after the
        # close, would make the kernel reset the connection and drop what
        # it has not delivered yet: a server's replies to a pipelining
        # client, a client's last requests while replies came in unread.
        # The supervisor bounds a server connection's wait; a client's is
        # bounded here.
        if self._server is None and lingering.nothing_in_flight(self._transport):
            self._mark_closing()  # a client that read every reply: nothing to linger for
            self._transport.close()
            return
        self._finish()
        if self._server is None:
            self._linger()

    def _linger(self) -> None:
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            return  # closed at once: the peer had closed, TLS (close_notify), or it failed
        closer = lingering.Lingering(
            self,
            self._loop,
            lingering.CLOSE_LINGER,
            what="the last data sent to it",
            graceful_deadline=True,
        )
        done = self._loop.create_future()  # resolved by connection_lost
        done.add_done_callback(lambda _: closer.cancel())
        self._closed_waiters.append(done)

    def abort(self) -> None:
        """Close the connection at once, discarding unsent data; cancel its spawned tasks.

        The peer sees a reset (RST), not an orderly close: it cannot take an
        aborted exchange for a complete one.
        """
        for task in list(self._tasks):
            task.cancel()
        self._close_pending = False
        self._abort(reset=True)

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (the transport called ``connection_lost``)."""
        if self._lifecycle == CLOSED:
            return
        waiter = self._loop.create_future()
        self._closed_waiters.append(waiter)
        await waiter

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    async def start_tls(
        self,
        sslcontext: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        """Upgrade the connection to TLS in place (STARTTLS), after the frames exchanged so far.

        Queued frames are flushed first. Call it when the peer is about to
        start its handshake (typically after a frame that says so): bytes
        of the handshake that arrived before the call would be read as
        frames. The connection then reads and writes through the TLS
        transport, with the transport strategy chosen again for it (joined
        writes, no reading on), so no fast path of the plain socket outlives
        it.

        Raises:
            ssl.SSLError, OSError: the handshake failed; the connection is closed.
            ConnectionClosedError, ConnectionBrokenError: the connection is
                closed or broke.
        """
        await self.drain()
        # From now on, plain joined writes and the transport's own reads: the
        # TLS layer takes (and keeps) our get_buffer/buffer_updated when it
        # is made, and must never meet a fast path of the raw socket.
        self._plain_strategy_for_tls()
        server_side = self._server is not None
        transport = await self._loop.start_tls(
            self._transport,
            self,
            sslcontext,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
        )
        if transport is None:  # the connection was lost during the handshake
            raise _reasons.broken_factory(None)()
        self._set_transport(transport)

    @property
    def tls(self) -> TLSInfo | None:
        """The TLS session (version, cipher, ALPN protocol, peer certificate); None on plain TCP."""
        transport = self._transport
        if transport is None:
            return None
        return tls_info(extra_info(transport, "ssl_object"))

    @property
    def strategy(self) -> str:
        """How fastnet drives the transport: ``selector``, ``uvloop``, ``tls`` or ``plain``.

        See ``fastnet.transports``; chosen again when the transport changes.
        """
        return self._strategy.kind if self._strategy is not None else "plain"

    @property
    def transport(self) -> asyncio.Transport:
        """The asyncio transport underneath (for ``get_extra_info`` and the like).

        On uvloop its ``get_protocol()`` is, between large frames, an internal
        object that reads for this connection (docs/design.md §0), not the
        connection itself.
        """
        transport: asyncio.Transport = self._transport
        return transport


async def connect(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    framing: Framing | None = None,
    unix: str | None = None,
    max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    half_close: bool = False,
    **kwargs: Any,
) -> Connection:
    """Open a client connection and return its ``Connection``.

    Args:
        host, port: the server's address (not used with ``unix``).
        framing: the wire layout; ``LengthPrefixed()`` by default.
        unix: the path of a Unix domain socket to connect to instead.
        max_write_buffer: the hard limit of unsent bytes (see ``Connection``).
        half_close: keep the connection open for sending after the server
            closed its side (False: the connection closes, see ``peer_closed``).
        **kwargs: passed to ``loop.create_connection``: ``ssl`` (an
            ``ssl.SSLContext``, e.g. ``fastnet.tls.client_context(ca=...)``;
            ``conn.tls`` then describes the session), ``server_hostname``
            (the name the server's certificate must carry; by default
            ``host``), ``ssl_handshake_timeout``, ``local_addr``...

    Returns:
        The connected ``Connection``; close it, or use it as an async
        context manager.

    Raises:
        OSError: the connection could not be made (refused, unreachable...).
        TypeError: neither a port nor ``unix`` was given.
    """
    loop = asyncio.get_running_loop()
    spec: Framing = LengthPrefixed() if framing is None else framing

    def factory() -> Connection:
        conn = Connection(spec, max_write_buffer=max_write_buffer)
        conn._half_close = half_close
        return conn

    if unix is not None:
        _, conn = await loop.create_unix_connection(factory, unix, **kwargs)
    else:
        if port is None:
            raise TypeError("connect() needs a port, or unix=PATH")
        _, conn = await loop.create_connection(factory, host, port, **kwargs)
    return conn


# The methods the core implements, visible on Connection itself for help()
# and documentation tools (each connection's class finds the core's first).
for _name in (
    "recv_batch",
    "recv",
    "__anext__",
    "send",
    "send_many",
    "try_send",
    "write_buffer_size",
    "writable",
):
    setattr(Connection, _name, getattr(framing.ConnectionCore, _name))
del _name

_implementations: dict[tuple[type, type], type] = {}

# What every class has of its own, the core included: not an override.
_CLASS_ATTRIBUTES = frozenset(
    ("__dict__", "__doc__", "__module__", "__qualname__", "__slots__", "__weakref__",
     "__annotations__", "__firstlineno__", "__static_attributes__", "__orig_bases__",
     "__parameters__")
)  # fmt: skip


def _implementation(core: type, cls: type) -> type:
    """The class of a connection of class ``cls`` on ``core``: ``(core, cls)``, made once."""
    impl = _implementations.get((core, cls))
    if impl is None:
        # The slots a connection has beyond its core's fields, set once per
        # connection: `proxy`, `_lost_error`, `_leftover` (protocol.py), and
        # `_session` (a Router's per-connection state; the cores stay as they are).
        slots = ("_leftover", "_lost_error", "_session", "proxy")
        impl = type(cls.__name__, (core, cls), {"__slots__": slots, "__module__": cls.__module__})
        impl.__qualname__ = cls.__qualname__
        impl.__doc__ = cls.__doc__
        _implementations[core, cls] = impl
    return impl
