"""``Connection``, what a handler sees of one framed connection; ``connect``.

The mechanics underneath (receive path, handler wake-up, coalesced writes,
flow control) live in ``FrameProtocol`` (protocol.py), which ``Connection``
extends; read that module's docstring for the design. This module is the
API: receive, send, drain, close.

The receive methods are written out in full rather than sharing a helper
coroutine: every extra coroutine level in the handler's await chain costs a
frame switch on every read, in both directions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import ConnectionBusyError
from .framing import Framing, LengthPrefixed
from .protocol import (
    _EMPTY,
    _PAUSE_INBOX,
    DEFAULT_MAX_WRITE_BUFFER,
    Buffer,
    FrameProtocol,
    WriteBufferFull,
    _write_buffer_full,
)

if TYPE_CHECKING:
    from ._observer import ConnectionObserver

__all__ = ["Connection", "WriteBufferFull", "connect"]


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
        peer: the peer's address (``(host, port)`` for TCP).
        local: this side's address.
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
        ``ConnectionBrokenError`` after the connection broke; ``send`` and
        ``send_many`` raise ``WriteBufferFull`` while the transport holds
        more than ``max_write_buffer`` unsent bytes (a handler that never
        drains cannot grow memory without bound). These are checked when a
        batch starts (the first send after a flush). A frame the framing
        cannot encode (over ``max_frame``, a line containing its delimiter,
        not bytes-like) fails the connection when its batch is flushed: the
        frames before it are written, the error is raised by the call that
        flushed or by the next call on the connection, and the connection is
        closed.
    """

    __slots__ = ()

    def __init__(
        self,
        framing: Framing,
        *,
        server: ConnectionObserver | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        super().__init__(framing, server=server, max_write_buffer=max_write_buffer)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<fastnet.Connection {state} peer={self.peer!r} local={self.local!r}>"

    # ---------------------------------------------------------------- receive

    async def recv_batch(self) -> list[bytes]:
        """Return every frame received and not yet consumed: at least one.

        Waits when none is queued (flushing queued sends first). The list
        belongs to the caller.

        Raises:
            ConnectionBrokenError: the peer has gone and every frame was consumed.
            ConnectionClosedError: this side closed the connection, or the
                server is shutting down or timed the connection out.
            ConnectionBusyError: another task is receiving on this connection.
        """
        while True:
            inbox = self._inbox
            pos = self._pos
            if pos < len(inbox):
                self._inbox = _EMPTY
                self._pos = 0
                if self._read_paused & _PAUSE_INBOX:
                    self._caught_up()
                return inbox if pos == 0 else inbox[pos:]  # type: ignore[return-value]
            # Nothing queued. The handler is about to wait for the peer, so
            # everything it sent in reply goes out now, as one write.
            self._inbox = _EMPTY
            self._pos = 0
            if self._out:
                self._flush()
            wakeup = self._wakeup
            if self._end is not None or wakeup._callback is not None or self._read_paused:
                self._before_wait()
            wakeup._asyncio_future_blocking = True
            await self._await_wakeup

    async def recv(self) -> bytes:
        """Return the next frame, waiting for one if none is queued.

        Raises:
            as ``recv_batch``.
        """
        while True:
            inbox = self._inbox
            pos = self._pos
            if pos < len(inbox):
                self._pos = pos + 1
                if self._read_paused:
                    self._consumed_one(inbox[pos])
                return inbox[pos]
            self._inbox = _EMPTY
            self._pos = 0
            if self._out:
                self._flush()
            wakeup = self._wakeup
            if self._end is not None or wakeup._callback is not None or self._read_paused:
                self._before_wait()
            wakeup._asyncio_future_blocking = True
            await self._await_wakeup

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> bytes:
        while True:
            inbox = self._inbox
            pos = self._pos
            if pos < len(inbox):
                self._pos = pos + 1
                if self._read_paused:
                    self._consumed_one(inbox[pos])
                return inbox[pos]
            self._inbox = _EMPTY
            self._pos = 0
            if self._out:
                self._flush()
            wakeup = self._wakeup
            if self._end is not None or wakeup._callback is not None or self._read_paused:
                if self._end is not None and self._end_quiet:
                    raise StopAsyncIteration
                self._before_wait()
            wakeup._asyncio_future_blocking = True
            await self._await_wakeup

    def _before_wait(self) -> None:
        """The rare checks before waiting for input: end of input, busy, paused."""
        end = self._end
        if end is not None:
            raise end()
        if self._wakeup._callback is not None:
            raise ConnectionBusyError("another task is already receiving on this connection")
        # The handler has caught up: resume reading if backpressure paused it.
        if self._read_paused & _PAUSE_INBOX:
            self._caught_up()

    # ------------------------------------------------------------------- send

    def send(self, frame: Buffer) -> None:
        """Queue one frame; it is written with the rest of its batch.

        Raises:
            ConnectionClosedError, ConnectionBrokenError, WriteBufferFull:
                see the class docstring.
        """
        out = self._out
        if not out:
            block = self._send_block
            if block is not None:
                raise block()
            if not self._delivering and not self._flush_scheduled:
                self._schedule_flush()
        out.append(frame)

    def send_many(self, frames: Iterable[Buffer]) -> None:
        """Queue several frames, in order; they are written with the rest of their batch.

        Raises:
            as ``send``.
        """
        out = self._out
        if not out:
            block = self._send_block
            if block is not None:
                raise block()
            if not self._delivering and not self._flush_scheduled:
                self._schedule_flush()
        out.extend(frames)

    async def drain(self) -> None:
        """Flush queued frames, then wait while the write buffer is over its high-water mark.

        Raises:
            ConnectionClosedError, ConnectionBrokenError: the connection is
                closed or broke.
            FrameError: a queued frame cannot be encoded (see the class docstring).
        """
        if self._out:
            self._flush()
        block = self._send_block
        if block is not None and block is not _write_buffer_full:
            raise block()
        if not self._write_paused:
            return
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    # ------------------------------------------------------------------ close

    @property
    def closing(self) -> bool:
        """True once the connection is closing or closed, by either side's doing."""
        return self._closing or self._lost

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
        Receiving and sending raise ``ConnectionClosedError`` afterwards.
        """
        if self._closing:
            return
        if self._out and not self._lost:
            try:
                self._flush()
            except Exception:  # the flush failed the connection and closed it
                return
        self._mark_closing()
        self._transport.close()

    def abort(self) -> None:
        """Close the connection at once, discarding unsent data."""
        self._abort()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (the transport called ``connection_lost``)."""
        if self._lost:
            return
        waiter = self._loop.create_future()
        self._closed_waiters.append(waiter)
        await waiter

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    @property
    def transport(self) -> asyncio.Transport:
        """The asyncio transport underneath (for ``get_extra_info`` and the like)."""
        return self._transport


async def connect(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    framing: Framing | None = None,
    unix: str | None = None,
    max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    **kwargs: Any,
) -> Connection:
    """Open a client connection and return its ``Connection``.

    Args:
        host, port: the server's address (not used with ``unix``).
        framing: the wire layout; ``LengthPrefixed()`` by default.
        unix: the path of a Unix domain socket to connect to instead.
        max_write_buffer: the hard limit of unsent bytes (see ``Connection``).
        **kwargs: passed to ``loop.create_connection`` (``ssl``,
            ``local_addr``, ``happy_eyeballs_delay``...).

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
        return Connection(spec, max_write_buffer=max_write_buffer)

    if unix is not None:
        _, conn = await loop.create_unix_connection(factory, unix, **kwargs)
    else:
        if port is None:
            raise TypeError("connect() needs a port, or unix=PATH")
        _, conn = await loop.create_connection(factory, host, port, **kwargs)
    return conn
