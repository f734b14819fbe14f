"""The router's per-frame path in pure Python: the twin of ``_message.pyx``.

What runs for each message a router connection reads: parse and check the
12-byte header (``wire.py`` is the spec), find the route, check the
connection's protocol state, decode the body, call a plain handler inline or
take the first step of an ``async`` one (most finish in it: no task), and
encode the reply after its header in one allocation. Everything rarer (errors,
deadlines, handlers that suspend, control messages, the in-flight limit) is
the router's own Python (``router.py``), which both backends call, so they
behave the same by construction; the differential tests check the rest.
"""

from __future__ import annotations

import contextvars
import struct
from asyncio import CancelledError
from collections.abc import Callable
from operator import index
from typing import Any

from .errors import FrameTooLarge
from .wire import (
    CONTROL,
    HEADER_SIZE,
    REPLY,
    REQUEST,
    HeaderError,
    header_error,
    short_message,
)

__all__ = [
    "ALL_STATES",
    "Dispatcher",
    "Route",
    "Session",
    "encode_message",
    "error_body",
    "pack_header",
    "parse_error_body",
    "parse_header",
]

_HEADER = struct.Struct(">BBHII")
_pack = _HEADER.pack
_unpack_from = _HEADER.unpack_from
_CODE = struct.Struct(">H")

ALL_STATES = (1 << 64) - 1  # a route allowed in every protocol state


def pack_header(kind: int, type_: int, id_: int, deadline: int = 0) -> bytes:
    """The 12-byte header of a message (flags 0)."""
    _check_fields(kind, type_, id_, deadline)
    return _pack(kind, 0, type_, id_, deadline)


def encode_message(kind: int, type_: int, id_: int, deadline: int, body: Any) -> bytes:
    """Header and body as one ``bytes`` (the frame the router sends)."""
    _check_fields(kind, type_, id_, deadline)
    if body is None:
        raise TypeError("a message body must be bytes-like, not None")
    return _pack(kind, 0, type_, id_, deadline) + _flat(body)


def parse_header(frame: Any) -> tuple[int, int, int, int]:
    """``(kind, type, id, deadline)`` of a message; ``HeaderError`` if it breaks the format."""
    size = len(_flat(frame))
    if size < HEADER_SIZE:
        raise short_message(size)
    kind, flags, type_, id_, deadline = _unpack_from(frame)
    error = header_error(kind, flags, deadline, size, None)
    if error is not None:
        raise error
    return kind, type_, id_, deadline


def error_body(code: int, message: str) -> bytes:
    """The body of an error reply: the 2-byte code, then the message in UTF-8."""
    index(code)  # an int: a float is refused, not truncated (as in C)
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"an error code is 0-65535, got {code!r}")
    if not isinstance(message, str):
        raise TypeError(f"an error message is a str, not {type(message).__name__}")
    return _CODE.pack(code) + message.encode("utf-8", "replace")


def parse_error_body(body: Any) -> tuple[int, str]:
    """``(code, message)`` of an error reply's body (``HeaderError`` if under 2 bytes)."""
    data = bytes(body)
    if len(data) < 2:
        raise HeaderError(f"error reply body of {len(data)} bytes has no 2-byte error code")
    return _CODE.unpack_from(data)[0], data[2:].decode("utf-8", "replace")


def _flat(data: Any) -> memoryview:
    """The bytes of a bytes-like object; its errors worded as C's (``PyObject_GetBuffer``)."""
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise TypeError(str(exc).removeprefix("memoryview: ")) from None
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view.cast("B")


def _check_fields(kind: int, type_: int, id_: int, deadline: int) -> None:
    # Ints (or __index__): a float is refused, not truncated (as in C).
    index(kind)
    index(type_)
    index(id_)
    index(deadline)
    if not 1 <= kind <= CONTROL:
        raise ValueError(f"kind must be 1-4, got {kind!r}")
    if not 0 <= type_ <= 0xFFFF:
        raise ValueError(f"type must be 0-65535, got {type_!r}")
    if not 0 <= id_ <= 0xFFFFFFFF:
        raise ValueError(f"id must be 0-4294967295, got {id_!r}")
    if not 0 <= deadline <= 0xFFFFFFFF:
        raise ValueError(f"deadline must be 0-4294967295 ms, got {deadline!r}")
    if deadline and kind != REQUEST:
        raise ValueError("only a request carries a deadline")


class Route:
    """One message type's handler, as the per-frame path needs it.

    Attributes:
        type_id: the message type (1-65535).
        handler: ``handler(conn, msg)``, plain or ``async``.
        decode: the body codec's decoder for the type, or None (raw bytes).
        is_async: the handler is a coroutine function.
        allowed: bit ``n`` set if protocol state ``n`` accepts the type.
        name: how logs and errors name it.
    """

    __slots__ = ("allowed", "decode", "handler", "is_async", "name", "type_id")

    def __init__(
        self,
        type_id: int,
        handler: Callable[..., Any],
        decode: Callable[[bytes], Any] | None,
        is_async: bool,
        allowed: int,
        name: str,
    ) -> None:
        self.type_id = type_id
        self.handler = handler
        self.decode = decode
        self.is_async = is_async
        self.allowed = allowed
        self.name = name


class Session:
    """A router connection's own state: protocol state, requests in flight, backlog."""

    __slots__ = ("backlog", "draining", "failed", "in_flight", "state", "tasks")

    def __init__(self, state: int) -> None:
        self.state = state  # the protocol state's number
        self.in_flight = 0  # handlers suspended (tasks running)
        # Frames read while the in-flight limit was reached (reading paused),
        # waiting for a handler to finish; None when there are none.
        self.backlog: Any = None  # a deque of (frames, time read), or None
        self.failed = False  # a malformed header: nothing more is read
        self.draining = False  # a drain control message was sent
        self.tasks: set[Any] | None = None  # the tasks of suspended handlers


class Dispatcher:
    """A router's callback: ``dispatcher(conn, frames) -> replies``.

    Args:
        router: the ``Router``; its methods take every rare path.
        routes: a list indexed by message type, a ``Route`` or None.
        replies: the encoders of reply message classes, ``{cls: (type_id, encode)}``.
        max_in_flight: suspended handlers per connection before reading pauses.
        initial_state: the protocol state a new connection starts in.
    """

    __slots__ = ("_initial", "_limit", "_max_frame", "_replies", "_router", "_routes")

    def __init__(
        self,
        router: Any,
        routes: list[Route | None],
        replies: dict[type, tuple[int, Callable[[Any], Any]]],
        max_in_flight: int,
        initial_state: int,
        max_frame: int = -1,
    ) -> None:
        self._router = router
        self._routes = routes
        self._replies = replies
        self._limit = max_in_flight
        self._initial = initial_state
        self._max_frame = max_frame  # the largest reply frame the framing sends; -1: any

    def session(self, conn: Any) -> Session:
        """The connection's session, made on first use."""
        session = conn._session
        if session is None:
            session = conn._session = Session(self._initial)
        return session  # type: ignore[no-any-return]

    def __call__(self, conn: Any, frames: list[bytes]) -> list[bytes] | None:
        session = conn._session
        if session is None:
            session = conn._session = Session(self._initial)
        if session.failed:
            return None
        if session.backlog is not None:
            self._router._hold_more(conn, session, frames)  # a handler must finish first
            return None
        return self.run(conn, session, frames, 0, 0.0)

    def run(
        self, conn: Any, session: Session, frames: list[bytes], start: int, read_at: float
    ) -> list[bytes] | None:
        """Answer ``frames[start:]`` in order; the replies that are ready at once.

        ``read_at`` is when the frames were read (``time.monotonic()``), for
        frames held back at the in-flight limit; 0.0 for frames just read.
        """
        router = self._router
        routes = self._routes
        nroutes = len(routes)
        replies: list[bytes] = []
        append = replies.append
        count = len(frames)
        i = start
        while i < count:
            frame = frames[i]
            size = len(frame)
            if size < HEADER_SIZE:
                router._malformed(conn, session, replies, short_message(size))
                return None
            kind, flags, type_, id_, deadline = _unpack_from(frame)
            if kind != REQUEST or flags:
                if flags or deadline or kind != CONTROL:
                    error = header_error(kind, flags, deadline, size, True)
                    router._malformed(conn, session, replies, error)
                    return None
                reply = router._control(conn, session, type_, id_)
                if reply is not None:
                    append(reply)
                i += 1
                continue
            if session.in_flight >= self._limit:
                router._hold(conn, session, frames, i, read_at)
                break
            route = routes[type_] if type_ < nroutes else None
            if route is None or deadline or not (route.allowed >> session.state) & 1:
                reply = router._request(conn, session, route, type_, id_, deadline, frame, read_at)
            else:
                reply = self._call(conn, session, route, id_, frame)
            if reply is not None:
                append(reply)
            i += 1
        return replies

    def _call(
        self, conn: Any, session: Session, route: Route, id_: int, frame: bytes
    ) -> bytes | None:
        # The common path: no deadline, an allowed type. Decode, call, encode.
        router = self._router
        body = frame[HEADER_SIZE:]
        decode = route.decode
        if decode is not None:
            try:
                msg = decode(body)
            except Exception as exc:
                return router._decode_failed(conn, route, id_, exc)  # type: ignore[no-any-return]
        else:
            msg = body
        if route.is_async:
            context = contextvars.copy_context()
            try:
                coro = route.handler(conn, msg)
                yielded = context.run(coro.send, None)
            except StopIteration as stop:
                result = stop.value
            except (Exception, CancelledError) as exc:  # CancelledError: the handler's own
                return router._failed(conn, route, id_, exc)  # type: ignore[no-any-return]
            else:
                router._suspended(conn, session, route, id_, coro, yielded, context, None)
                return None
        else:
            try:
                result = route.handler(conn, msg)
            except (Exception, CancelledError) as exc:
                return router._failed(conn, route, id_, exc)  # type: ignore[no-any-return]
        if not id_:
            return None
        return self.reply(conn, route, id_, result)

    def reply(self, conn: Any, route: Route, id_: int, result: Any) -> bytes:
        """The reply frame for a handler's result (``INTERNAL`` error reply if it cannot be)."""
        frame = self._reply(conn, route, id_, result)
        limit = self._max_frame
        if limit >= 0 and len(frame) > limit:
            exc = FrameTooLarge(len(frame), limit)
            return self._router._unencodable(conn, route, id_, result, exc)  # type: ignore[no-any-return]
        return frame

    def _reply(self, conn: Any, route: Route, id_: int, result: Any) -> bytes:
        if result is None:
            return _pack(REPLY, 0, 0, id_, 0)
        if type(result) is bytes:
            return _pack(REPLY, 0, 0, id_, 0) + result
        entry = self._replies.get(type(result))
        if entry is not None:
            try:
                body = entry[1](result)
                if body is None:
                    raise TypeError("the codec's encoder returned None")
                return _pack(REPLY, 0, entry[0], id_, 0) + _flat(body)
            except Exception as exc:
                return self._router._unencodable(conn, route, id_, result, exc)  # type: ignore[no-any-return]
        try:
            return _pack(REPLY, 0, 0, id_, 0) + _flat(result)
        except (TypeError, BufferError) as exc:
            return self._router._unencodable(conn, route, id_, result, exc)  # type: ignore[no-any-return]
