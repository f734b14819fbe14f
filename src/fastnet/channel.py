"""Channel: the client side of the router's wire format, on one connection.

    async with await fastnet.open_channel("127.0.0.1", 8080, router=router) as channel:
        reply = await channel.call(Put(key="a", value=b"1"), timeout=1.0)
        channel.send(Log(line="one-way"))           # no reply, not even an error

Calls are multiplexed: each request carries an id, many are in flight at once,
and each reply finds its caller by id whatever order the server answers in. A
timeout is sent as the request's deadline (the server stops working on it and
answers ``DEADLINE_EXCEEDED``); the caller gets ``DeadlineExceeded`` when it
expires, its id is freed and a late reply is dropped. An error reply raises
the ``RequestError`` subclass of its code. When the server sends drain (it is
shutting down), the channel takes no new calls (``Draining``), collects the
replies still due, then closes.

The message classes and the body codec come from the server's ``Router``
(pass the same object, or one declaring the same messages); handlers are not
needed on the client. A pool of channels over several servers, with retries
and circuit breaking, is built on this (see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import Any

from . import framing
from .connection import Connection, WriteBufferFull, connect
from .errors import ConnectionBrokenError, ConnectionClosedError
from .router import Router
from .wire import (
    CONTROL,
    DRAIN,
    ERROR,
    MAX_DEADLINE_MS,
    MAX_ID,
    PING,
    PONG,
    REPLY,
    REQUEST,
    DeadlineExceeded,
    DecodeFailed,
    HeaderError,
    RequestError,
    header_error,
)

__all__ = ["Channel", "Draining", "NoReply", "open_channel"]


class Draining(ConnectionClosedError):
    """The server asked this connection to drain (it is shutting down): call another."""


class NoReply(DeadlineExceeded):
    """A call's timeout passed on the client with no answer from the server.

    A ``DeadlineExceeded`` (and so a ``TimeoutError``) raised locally, where
    a ``DeadlineExceeded`` error reply is the server's own answer: a client
    balancing over several servers counts this one against the server.
    """


class Channel:
    """Calls over one connection in the router's wire format (see the module docstring).

    Made by ``open_channel``; or ``Channel(conn, router)`` on a connection
    opened with ``fastnet.connect(..., framing=router.framing)``.
    """

    def __init__(self, conn: Connection, router: Router | None = None) -> None:
        self._conn = conn
        self._router = Router() if router is None else router
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._next = 0
        self._draining = False
        self._closed: BaseException | None = None  # why no call can be made any more
        self._encoders: dict[type, tuple[int, Callable[[Any], Any]]] = {}
        self._decoders: dict[int, Callable[[bytes], Any]] = {}
        self._reader = self._loop.create_task(self._read())
        self.drained = self._loop.create_future()  # done when a drain message arrives

    def __repr__(self) -> str:
        state = "draining" if self._draining else "closed" if self._closed else "open"
        return f"<fastnet.Channel {state} {len(self._pending)} in flight>"

    @property
    def connection(self) -> Connection:
        """The connection under the channel."""
        return self._conn

    @property
    def draining(self) -> bool:
        """True once the server sent drain: no new calls, the replies due still come."""
        return self._draining

    @property
    def closed(self) -> bool:
        """True once no call can be made (closed, broken, or drained to the end)."""
        return self._closed is not None

    @property
    def in_flight(self) -> int:
        """Calls waiting for their reply."""
        return len(self._pending)

    # ------------------------------------------------------------- calling

    async def call(self, msg: Any, *, type: int | None = None, timeout: float | None = None) -> Any:
        """Send a request and return its reply, decoded.

        Args:
            msg: a message declared on the router, or bytes-like with ``type``.
            type: the message type, for a raw body (or to override the class's).
            timeout: seconds to wait; sent to the server as the deadline.

        Returns:
            The reply: a declared message, bytes for an untyped reply (an
            empty reply is ``b""``).

        Raises:
            RequestError: an error reply (its subclass: ``DeadlineExceeded``,
                ``Overloaded``, ``Forbidden``...); ``DeadlineExceeded`` is
                also a ``TimeoutError``, and is raised when ``timeout`` passes.
            Draining: the server is shutting down this connection.
            ConnectionBrokenError, ConnectionClosedError: the connection ended.
        """
        call = self._begin(msg, type, timeout)
        if call.unsent is not None:
            await self._send(call)
        return await self._wait(call)

    def send(self, msg: Any, *, type: int | None = None) -> None:
        """Send a one-way message: no reply, not even an error reply.

        Raises:
            WriteBufferFull: too much is unsent; ``await channel.drain()``.
        """
        self._check_open()
        self._conn.send(self._encode(msg, type, 0, 0))

    async def drain(self) -> None:
        """Wait until the connection's write buffer is below its high-water mark."""
        await self._conn.drain()

    async def ping(self, timeout: float | None = None) -> float:
        """Send a ping and return the seconds its pong took."""
        self._check_open()
        id_ = self._new_id()
        future: asyncio.Future[None] = self._loop.create_future()
        self._pings[id_] = future
        began = self._loop.time()
        try:
            frame = framing.pack_header(CONTROL, PING, id_, 0)
            try:
                self._conn.send(frame)
            except WriteBufferFull:
                await self._conn.drain()
                self._conn.send(frame)
            await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(id_, None)
        return self._loop.time() - began

    async def close(self) -> None:
        """Close the connection; calls still waiting get ``ConnectionClosedError``."""
        if self._closed is None:
            self._closed = ConnectionClosedError("the channel was closed")
        self._conn.close()
        with contextlib.suppress(Exception):
            await self._conn.wait_closed()
        await asyncio.wait((self._reader,))

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (after a drain, once its replies are in)."""
        await asyncio.wait((self._reader,))
        with contextlib.suppress(Exception):
            await self._conn.wait_closed()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------ internals

    def _begin(self, msg: Any, type_: int | None, timeout: float | None) -> _Call:
        """Register a call and send its request, or raise having sent nothing.

        Raises (nothing was sent): ``Draining``, ``ConnectionClosedError`` or
        ``ConnectionBrokenError`` (the channel cannot take calls), TypeError
        or ValueError (the message). Once this returns, the request is the
        server's (``call.unsent`` is only bytes that wait for the write
        buffer to drain, and ``_send`` writes them).
        """
        self._check_open()
        deadline = 0
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be positive, got {timeout!r}")
            deadline = min(max(math.ceil(timeout * 1000), 1), MAX_DEADLINE_MS)
        id_ = self._new_id()
        frame = self._encode(msg, type_, id_, deadline)
        future: asyncio.Future[Any] = self._loop.create_future()
        call = _Call(id_, future)
        try:
            self._conn.send(frame)
        except WriteBufferFull:
            call.unsent = frame  # the server has not got it yet, but it is queued next
        self._pending[id_] = future
        if timeout is not None:
            call.timer = self._loop.call_later(timeout, _expire, future, timeout)
        return call

    async def _send(self, call: _Call) -> None:
        # A request that met a full write buffer: wait for room, then write it.
        frame = call.unsent
        assert frame is not None
        call.unsent = None
        try:
            while True:
                await self._conn.drain()
                try:
                    self._conn.send(frame)
                    return
                except WriteBufferFull:
                    continue
        except BaseException:
            self._done(call)
            raise

    async def _wait(self, call: _Call) -> Any:
        """The reply of a call ``_begin`` sent (or its error)."""
        try:
            return await call.future
        finally:
            self._done(call)

    def _done(self, call: _Call) -> None:
        if call.timer is not None:
            call.timer.cancel()
        if self._pending.get(call.id) is call.future:
            del self._pending[call.id]
        if self._draining and not self._pending:
            self._finish_drain()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed_error()
        if self._draining:
            raise Draining("the server is draining this connection: no new calls")

    def _closed_error(self) -> BaseException:
        exc = self._closed
        assert exc is not None
        if isinstance(exc, (ConnectionClosedError, ConnectionBrokenError)):
            return type(exc)(*exc.args)
        error = ConnectionBrokenError(str(exc))
        error.__cause__ = exc
        return error

    def _new_id(self) -> int:
        pending = self._pending
        while True:
            id_ = self._next + 1
            if id_ > MAX_ID:
                id_ = 1
            self._next = id_
            if id_ not in pending and id_ not in self._pings:
                return id_

    def _encode(self, msg: Any, type_: int | None, id_: int, deadline: int) -> bytes:
        cls = msg.__class__
        if type_ is None and cls not in (bytes, bytearray, memoryview):
            entry = self._encoders.get(cls)
            if entry is None:
                type_id = self._router._types.get(cls)
                if type_id is None:
                    raise TypeError(
                        f"{cls.__qualname__} is not a message declared on the router "
                        f"(pass type= for a raw body)"
                    )
                if cls in self._router._reply_only:
                    raise TypeError(f"{cls.__qualname__} is declared reply_only: not a request")
                entry = self._encoders[cls] = (type_id, self._router.codec.encoder(cls))
            return framing.encode_message(REQUEST, entry[0], id_, deadline, entry[1](msg))
        if type_ is None:
            raise TypeError("a raw body needs its message type: call(body, type=N)")
        if not 1 <= type_ <= 0xFFFF:
            raise ValueError(f"a message type is 1-65535, got {type_!r}")
        return framing.encode_message(REQUEST, type_, id_, deadline, msg)

    def _decode(self, type_: int, body: bytes) -> Any:
        if type_ == 0:
            return body
        decode = self._decoders.get(type_)
        if decode is None:
            cls = self._router._classes.get(type_)
            if cls is None:
                raise DecodeFailed(f"reply of undeclared message type {type_}")
            decode = self._decoders[type_] = self._router.codec.decoder(cls)
        try:
            return decode(body)
        except Exception as exc:
            raise DecodeFailed(f"cannot decode the reply ({type_}): {exc}") from exc

    async def _read(self) -> None:
        conn = self._conn
        try:
            while True:
                for frame in await conn.recv_batch():
                    self._received(frame)
        except (ConnectionBrokenError, ConnectionClosedError) as exc:
            if self._closed is None:
                self._closed = exc
        except HeaderError as exc:
            self._closed = exc
            conn.abort()
        except Exception as exc:  # a bug here must not leave callers waiting forever
            self._closed = exc
            conn.abort()
            raise
        finally:
            self._fail_pending()

    def _received(self, frame: bytes) -> None:
        kind, type_, id_, _ = framing.parse_header(frame)
        error = header_error(kind, 0, 0, len(frame), False)
        if error is not None:
            raise error
        if kind == REPLY:
            future = self._pending.pop(id_, None)
            if future is not None and not future.done():
                try:
                    future.set_result(self._decode(type_, frame[12:]))
                except RequestError as exc:
                    future.set_exception(exc)
        elif kind == ERROR:
            future = self._pending.pop(id_, None)
            if future is not None and not future.done():
                code, message = framing.parse_error_body(frame[12:])
                future.set_exception(RequestError.from_reply(code, message))
        else:  # CONTROL
            if type_ == PONG:
                ping = self._pings.pop(id_, None)
                if ping is not None and not ping.done():
                    ping.set_result(None)
            elif type_ == PING:
                with contextlib.suppress(ConnectionClosedError, ConnectionBrokenError):
                    self._conn.send(framing.pack_header(CONTROL, PONG, id_, 0))
            elif type_ == DRAIN and not self._draining:
                self._draining = True
                if not self.drained.done():
                    self.drained.set_result(None)
                if not self._pending:
                    self._finish_drain()

    def _finish_drain(self) -> None:
        # Drained and no reply due: close (the server sees our FIN and goes).
        if self._closed is None:
            self._closed = Draining("the server drained this connection")
            self._conn.close()

    def _fail_pending(self) -> None:
        pending = list(self._pending.values()) + list(self._pings.values())
        self._pending.clear()
        self._pings.clear()
        for future in pending:
            if not future.done():
                future.set_exception(self._closed_error())
        if not self.drained.done():
            self.drained.cancel()


class _Call:
    """One call in flight: its id, the future its reply completes, its timer."""

    __slots__ = ("future", "id", "timer", "unsent")

    def __init__(self, id_: int, future: asyncio.Future[Any]) -> None:
        self.id = id_
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        self.unsent: bytes | None = None


def _expire(future: asyncio.Future[Any], timeout: float) -> None:
    if not future.done():
        future.set_exception(NoReply(f"no reply within {timeout:.3g} s"))


async def open_channel(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    router: Router | None = None,
    **kwargs: Any,
) -> Channel:
    """Connect to a router server and return a ``Channel``.

    Args:
        host, port: the server's address.
        router: declares the message classes and the body codec (handlers
            are not needed); a raw-bytes router by default.
        **kwargs: passed to ``fastnet.connect``: ``unix``, ``ssl``,
            ``server_hostname``, ``max_write_buffer``...
    """
    router = Router() if router is None else router
    conn = await connect(host, port, framing=router.framing, **kwargs)
    return Channel(conn, router)
