"""Router: typed messages on frames, one handler per message type.

A ``Router`` is a handler (``fastnet.run(router, ...)``, ``fastnet serve
module:router``). It speaks the wire format of ``wire.py``: each frame holds
a 12-byte header (kind, message type, request id, deadline) and a body that a
body codec (``bodies.py``) turns into a message object. It decodes each
request, calls the handler of its type, and sends the reply with the
request's id; replies to pipelined requests may leave out of order.

    router = fastnet.Router(codec=fastnet.bodies.Msgpack())

    @router.message(1)
    class Put(msgspec.Struct):
        key: str
        value: bytes

    @router.handler(Put)
    def put(conn, msg: Put) -> None: ...          # runs inline, in the read callback

    @router.handler(Get)
    async def get(conn, msg: Get) -> Value: ...   # may await; bounded per connection

What runs per message is in ``_message.pyx`` (twin ``_message_py.py``);
everything rarer is here, and both backends call it: error replies,
deadlines, handlers that suspend (a task each, at most ``max_in_flight`` per
connection, beyond which reading pauses), control messages, protocol states
and the drain at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from typing import Any, TypeVar

from . import bodies, framing
from ._tunables import PAUSE_BUSY
from .connection import Connection
from .errors import ConnectionBrokenError, ConnectionClosedError
from .framing import DEFAULT_MAX_FRAME_SIZE, LengthPrefixed
from .lifecycle import CLOSING
from .listener import format_peer
from .supervisor import CallbackHandler
from .wire import (
    CONTROL,
    DRAIN,
    ERROR,
    HEADER_SIZE,
    MAX_TYPE,
    PING,
    PONG,
    ErrorCode,
    HeaderError,
    RequestError,
)

__all__ = ["Router"]

logger = logging.getLogger("fastnet")

T = TypeVar("T")

# Seconds a connection keeps being read after the drain message, for a
# client that does not close it once its answers are in.
DEFAULT_DRAIN_GRACE = 5.0
DEFAULT_MAX_IN_FLIGHT = 64

# Internal errors are logged with their traceback this many times per
# interval; the rest are counted (router.stats()).
INTERNAL_LOG_BURST = 10
INTERNAL_LOG_INTERVAL = 10.0

# An error reply's text is cut to this many characters (at most 4 KiB of
# UTF-8 with the header): a RequestError carrying a whole document must not
# make a reply larger than the frame limit, which would fail the connection.
MAX_ERROR_TEXT = 1000

_DRAIN_FRAME = framing.pack_header(CONTROL, DRAIN, 0, 0)


class Router(CallbackHandler):
    """Dispatch typed messages to one handler per message type.

    Args:
        codec: the body codec (``fastnet.bodies``): ``Raw()`` (the default),
            ``Packed()``, ``Msgpack()``, or any object with ``decoder(cls)``
            and ``encoder(cls)``.
        states: the names of the connection's protocol states, the first
            one initial (``("new", "authenticated")``); None: one state,
            every message type allowed.
        max_in_flight: handlers that have suspended (awaiting something)
            per connection; when that many run, the connection is not read
            until one finishes.
        max_message_size: the largest body (the frame limit is 12 bytes more).
        drain_grace: seconds a connection keeps being read after a
            shutdown sent it the drain message, for a client that does not
            close it once its answers are in.
        debug: send an internal error's exception text to the client (by
            default only "internal error"; it is logged either way).
    """

    def __init__(
        self,
        codec: bodies.BodyCodec | None = None,
        *,
        states: Iterable[str] | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_message_size: int = DEFAULT_MAX_FRAME_SIZE - HEADER_SIZE,
        drain_grace: float = DEFAULT_DRAIN_GRACE,
        debug: bool = False,
    ) -> None:
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if drain_grace < 0:
            raise ValueError(f"drain_grace must not be negative, got {drain_grace!r}")
        self.codec: bodies.BodyCodec = bodies.Raw() if codec is None else codec
        names = ("default",) if states is None else tuple(states)
        if not names or len(set(names)) != len(names) or len(names) > 64:
            raise ValueError(f"states must be 1 to 64 distinct names, got {names!r}")
        self.states = names
        self._state_numbers = {name: n for n, name in enumerate(names)}
        self.max_in_flight = max_in_flight
        self.drain_grace = drain_grace
        self.debug = debug
        self.framing = LengthPrefixed(max_frame=max_message_size + HEADER_SIZE)
        # Declarations: message classes by type, and the handlers.
        self._classes: dict[int, type] = {}
        self._types: dict[type, int] = {}
        self._reply_only: set[type] = set()
        self._handlers: dict[int, tuple[Callable[..., Any], int]] = {}  # type -> (fn, allowed)
        self._dispatcher: Any = None
        self._counts = dict.fromkeys(_COUNTED, 0)
        self._internal_log: _RateLimit | None = None
        super().__init__(self._not_bound)

    def __repr__(self) -> str:
        return f"<fastnet.Router {len(self._handlers)} handlers, codec={self.codec!r}>"

    # ------------------------------------------------------------ declaring

    def message(self, type_id: int, *, reply_only: bool = False) -> Callable[[type[T]], type[T]]:
        """Class decorator: the message class of type ``type_id`` (1-65535).

        ``reply_only=True`` for a class only ever sent as a reply (it needs no handler).
        """
        _check_type_id(type_id)

        def declare(cls: type[T]) -> type[T]:
            self._not_frozen()
            other = self._classes.get(type_id)
            if other is not None:
                raise ValueError(
                    f"message type {type_id} is declared twice: "
                    f"{other.__qualname__} and {cls.__qualname__}"
                )
            if cls in self._types:
                raise ValueError(
                    f"{cls.__qualname__} is declared twice: types {self._types[cls]} and {type_id}"
                )
            self._classes[type_id] = cls
            self._types[cls] = type_id
            if reply_only:
                self._reply_only.add(cls)
            return cls

        return declare

    def handler(
        self, message: type | int, *, states: Iterable[str] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the handler of ``message`` (a declared class, or a type id for raw bytes).

        ``handler(conn, msg)`` returns the reply: a declared message, bytes
        (an untyped body), or None (an empty reply); or raises
        ``RequestError`` for an error reply. An ``async def`` handler may
        await; a plain one runs inline and must not block. ``states`` limits
        the protocol states in which the type is accepted (all by default).
        """
        if isinstance(message, int) and not isinstance(message, bool):
            _check_type_id(message)
            type_id = message
        elif isinstance(message, type) and message in self._types:
            type_id = self._types[message]
        else:
            raise TypeError(
                f"router.handler takes a class declared with router.message() or a type id, "
                f"not {message!r}"
            )
        allowed = self._allowed(states)

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._not_frozen()
            if not callable(fn):
                raise TypeError(f"a handler must be callable, not {type(fn).__name__}")
            if type_id in self._handlers:
                raise ValueError(
                    f"message type {self._name(type_id)} has two handlers: "
                    f"{_qualname(self._handlers[type_id][0])} and {_qualname(fn)}"
                )
            self._handlers[type_id] = (fn, allowed)
            return fn

        return register

    def _allowed(self, states: Iterable[str] | None) -> int:
        if states is None:
            return framing.ALL_STATES
        if isinstance(states, str):
            states = (states,)
        mask = 0
        for name in states:
            mask |= 1 << self._state_number(name)
        return mask

    def _state_number(self, name: str) -> int:
        try:
            return self._state_numbers[name]
        except KeyError:
            raise ValueError(
                f"unknown protocol state {name!r}; the router's states are {self.states!r}"
            ) from None

    def _not_frozen(self) -> None:
        if self._dispatcher is not None:
            raise RuntimeError("the router is in use by a server: declare everything before")

    def _name(self, type_id: int) -> str:
        cls = self._classes.get(type_id)
        return f"{cls.__qualname__} ({type_id})" if cls is not None else f"message type {type_id}"

    # ------------------------------------------------------------ setting up

    def check(self) -> None:
        """Check the declarations (a server does it when it is made); errors name the type.

        Every declared message class has a handler or is reply-only, and the
        codec can decode and encode each.
        """
        for type_id, cls in self._classes.items():
            if cls not in self._reply_only and type_id not in self._handlers:
                raise ValueError(
                    f"message type {cls.__qualname__} ({type_id}) has no handler "
                    f"(declare it with reply_only=True if it is only sent as a reply)"
                )
            try:
                if cls not in self._reply_only:
                    self.codec.decoder(cls)
                self.codec.encoder(cls)
            except Exception as exc:
                raise TypeError(
                    f"the codec {self.codec!r} cannot handle message type "
                    f"{cls.__qualname__} ({type_id}): {exc}"
                ) from exc

    def check_framing(self, spec: Any) -> None:
        """Raise ValueError unless ``spec`` carries the wire format's frames.

        The router's frames are ``LengthPrefixed()``'s: a 4-byte big-endian
        length of what follows it; only ``max_frame`` may differ (at least the
        12-byte header).
        """
        if not isinstance(spec, LengthPrefixed) or (
            spec.length_size,
            spec.byteorder,
            spec.offset,
            spec.adjustment,
            spec.strip,
        ) != (4, "big", 0, 0, None):
            raise ValueError(
                f"a Router speaks 4-byte big-endian length-prefixed frames "
                f"(fastnet.LengthPrefixed()), not {spec!r}"
            )
        if spec.max_frame < HEADER_SIZE:
            raise ValueError(
                f"a Router's frames hold at least a {HEADER_SIZE}-byte header; "
                f"max_frame {spec.max_frame} is too small"
            )

    def _bind(self, framing_: Any = None) -> Any:
        """Check, then freeze the declarations into the per-frame dispatcher.

        ``framing_`` is the server's (its ``max_frame`` bounds the replies:
        a larger one is answered ``INTERNAL`` instead); the router's own
        when None.
        """
        if framing_ is not None:
            self.check_framing(framing_)
        if self._dispatcher is None:
            self.check()
            top = max(self._handlers, default=0)
            routes: list[Any] = [None] * (top + 1)
            for type_id, (fn, allowed) in self._handlers.items():
                cls = self._classes.get(type_id)
                decode = None if cls is None else self.codec.decoder(cls)
                routes[type_id] = framing.Route(
                    type_id,
                    fn,
                    decode,
                    _is_async(fn),
                    allowed,
                    self._name(type_id),
                )
            replies = {cls: (t, self.codec.encoder(cls)) for t, cls in self._classes.items()}
            spec = self.framing if framing_ is None else framing_
            max_frame = getattr(spec, "max_frame", -1)
            self._dispatcher = framing.Dispatcher(
                self, routes, replies, self.max_in_flight, 0, max_frame
            )
            self.fn = self._dispatcher
        return self._dispatcher

    def _not_bound(self, conn: Connection, frames: list[bytes]) -> None:
        raise RuntimeError("a Router runs in a server (fastnet.run, Server, fastnet serve)")

    # ------------------------------------------------------- protocol states

    def state_of(self, conn: Connection) -> str:
        """The connection's protocol state."""
        return str(self.states[self._session(conn).state])

    def set_state(self, conn: Connection, state: str) -> None:
        """Move the connection to protocol ``state``; its next messages are checked against it."""
        self._session(conn).state = self._state_number(state)

    def in_flight(self, conn: Connection) -> int:
        """Handlers of the connection that have suspended and not finished."""
        return int(self._session(conn).in_flight)

    def _session(self, conn: Connection) -> Any:
        dispatcher = self._dispatcher
        if dispatcher is None:
            raise RuntimeError("the router serves no connection yet (no server uses it)")
        return dispatcher.session(conn)

    # ------------------------------------------------------------ statistics

    def stats(self) -> dict[str, int]:
        """Counts of the router's rarer events, over every connection.

        ``unknown_type``, ``decode_errors``, ``request_errors`` (RequestError
        raised), ``internal_errors``, ``deadline_exceeded``, ``forbidden``,
        ``malformed`` (framing errors in a header), ``suspended`` (handlers
        that awaited: a task each), ``held`` (reads paused at
        ``max_in_flight``), ``pings``, ``drains_sent``.
        """
        return dict(self._counts)

    # ------------------------------------------------- the per-frame path's rare cases
    # Called by the dispatcher of either backend; each returns the frame to
    # send (an error reply, a pong) or None.

    def _request(
        self,
        conn: Connection,
        session: Any,
        route: Any,
        type_id: int,
        id_: int,
        deadline: int,
        frame: bytes,
        read_at: float = 0.0,
    ) -> bytes | None:
        # A request the fast path does not take: no route, a state that
        # forbids it, or a deadline (counted from read_at, when the frame
        # was read, for one held back at the in-flight limit).
        counts = self._counts
        if route is None:
            counts["unknown_type"] += 1
            return self._error(
                type_id, id_, ErrorCode.UNKNOWN_TYPE, f"no handler for message type {type_id}"
            )
        if not (route.allowed >> session.state) & 1:
            counts["forbidden"] += 1
            return self._error(
                type_id,
                id_,
                ErrorCode.FORBIDDEN,
                f"{route.name} is not allowed in state {self.states[session.state]!r}",
            )
        # A deadline: the same call, timed.
        expires = (read_at or time.monotonic()) + deadline / 1000.0
        body = frame[HEADER_SIZE:]
        msg: Any = body
        if route.decode is not None:
            try:
                msg = route.decode(body)
            except Exception as exc:
                return self._decode_failed(conn, route, id_, exc)
        # A CancelledError here is the handler's own (it awaited something
        # cancelled): no task runs it yet, so nothing is cancelling it.
        if route.is_async:
            context = contextvars.copy_context()
            try:
                coro = route.handler(conn, msg)
                yielded = context.run(coro.send, None)
            except StopIteration as stop:
                result = stop.value
            except (Exception, asyncio.CancelledError) as exc:
                return self._failed(conn, route, id_, exc)
            else:
                self._suspended(conn, session, route, id_, coro, yielded, context, expires)
                return None
        else:
            try:
                result = route.handler(conn, msg)
            except (Exception, asyncio.CancelledError) as exc:
                return self._failed(conn, route, id_, exc)
        if time.monotonic() > expires:
            return self._expired(route, id_)
        if not id_:
            return None
        return self._dispatcher.reply(conn, route, id_, result)  # type: ignore[no-any-return]

    def _expired(self, route: Any, id_: int) -> bytes | None:
        self._counts["deadline_exceeded"] += 1
        return self._error(
            route.type_id, id_, ErrorCode.DEADLINE_EXCEEDED, f"{route.name}: deadline exceeded"
        )

    def _decode_failed(
        self, conn: Connection, route: Any, id_: int, exc: Exception
    ) -> bytes | None:
        self._counts["decode_errors"] += 1
        return self._error(
            route.type_id, id_, ErrorCode.DECODE_ERROR, f"cannot decode {route.name}: {exc}"
        )

    def _failed(self, conn: Connection, route: Any, id_: int, exc: BaseException) -> bytes | None:
        # The handler raised: a RequestError is its answer; anything else is
        # a bug, logged (rate-limited) and answered "internal error".
        if isinstance(exc, RequestError):
            self._counts["request_errors"] += 1
            message = exc.message if isinstance(exc.message, str) else str(exc.message)
            return self._error(route.type_id, id_, exc.code, message)
        if isinstance(exc, (ConnectionClosedError, ConnectionBrokenError)):
            return None  # the connection is going away: nobody to answer
        self._counts["internal_errors"] += 1
        self._log_internal(conn, id_, f"the handler of {route.name} raised", exc)
        text = f"{type(exc).__name__}: {exc}" if self.debug else "internal error"
        return self._error(route.type_id, id_, ErrorCode.INTERNAL, text)

    def _unencodable(
        self, conn: Connection, route: Any, id_: int, result: Any, exc: Exception
    ) -> bytes | None:
        self._counts["internal_errors"] += 1
        self._log_internal(
            conn,
            id_,
            f"the handler of {route.name} returned {type(result).__qualname__}, "
            "which cannot be encoded",
            exc,
        )
        text = f"unencodable reply {type(result).__qualname__}" if self.debug else "internal error"
        return self._error(route.type_id, id_, ErrorCode.INTERNAL, text)

    def _error(self, type_id: int, id_: int, code: int, message: str) -> bytes | None:
        if not id_:
            return None  # a one-way message gets no answer, not even an error
        if len(message) > MAX_ERROR_TEXT:  # a reply must fit any sane frame limit
            message = message[:MAX_ERROR_TEXT] + "..."
        return framing.encode_message(ERROR, type_id, id_, 0, framing.error_body(code, message))

    def _log_internal(self, conn: Connection, id_: int, what: str, exc: BaseException) -> None:
        limit = self._internal_log
        if limit is None:
            limit = self._internal_log = _RateLimit(INTERNAL_LOG_BURST, INTERNAL_LOG_INTERVAL)
        if limit.allow():
            peer = format_peer(conn.peer)
            answer = "answered with an internal error" if id_ else "one-way: no answer"
            logger.error(
                "%s %s: %s (peer %s; %s)",
                what,
                type(exc).__name__,
                exc,
                peer,
                answer,
                exc_info=exc,
                extra={"peer": peer, "event": "router_internal_error"},
            )

    def _control(self, conn: Connection, session: Any, code: int, id_: int) -> bytes | None:
        if code == PING:
            self._counts["pings"] += 1
            return framing.pack_header(CONTROL, PONG, id_, 0)
        return None  # a pong, a drain (a client has nothing to drain), an unknown code

    def _malformed(
        self, conn: Connection, session: Any, replies: list[bytes], exc: HeaderError
    ) -> None:
        # A header that breaks the format: answer what came before it, then
        # fail the connection as a framing error (counted, closed).
        self._counts["malformed"] += 1
        session.failed = True
        session.backlog = None
        if replies:
            _send_replies(conn, replies)
        conn._framing_failed(exc)

    # ------------------------------------------------- handlers that suspend

    def _hold(
        self, conn: Connection, session: Any, frames: list[bytes], start: int, read_at: float
    ) -> None:
        # max_in_flight handlers are running: keep the rest of the batch, with
        # when it was read (deadlines count from then), and stop reading
        # until one finishes.
        self._counts["held"] += 1
        session.backlog = deque([(frames[start:], read_at or time.monotonic())])
        conn._pause_reading(PAUSE_BUSY)

    def _hold_more(self, conn: Connection, session: Any, frames: list[bytes]) -> None:
        # Frames read while some are held (the rest of a read under way).
        session.backlog.append((frames, time.monotonic()))

    def _suspended(
        self,
        conn: Connection,
        session: Any,
        route: Any,
        id_: int,
        coro: Coroutine[Any, Any, Any],
        yielded: Any,
        context: contextvars.Context,
        expires: float | None,
    ) -> None:
        # The handler awaited something: run the rest of it in a task tied
        # to the connection (shutdown and close wait for it).
        self._counts["suspended"] += 1
        session.in_flight += 1
        rest = self._rest(conn, session, route, id_, coro, yielded, expires)
        try:
            context.run(conn.spawn, rest)
        except (ConnectionClosedError, ConnectionBrokenError):
            coro.close()
            session.in_flight -= 1

    async def _rest(
        self,
        conn: Connection,
        session: Any,
        route: Any,
        id_: int,
        coro: Coroutine[Any, Any, Any],
        yielded: Any,
        expires: float | None,
    ) -> None:
        timer = None
        expired = False
        if expires is not None:
            task = asyncio.current_task()
            assert task is not None

            def expire() -> None:
                nonlocal expired
                expired = True
                task.cancel()

            timer = asyncio.get_running_loop().call_later(
                max(expires - time.monotonic(), 0.0), expire
            )
        try:
            reply: bytes | None
            try:
                result = await _Resumed(coro, yielded)
            except asyncio.CancelledError as exc:
                if expired:
                    reply = self._expired(route, id_)
                elif _cancel_requested(asyncio.current_task()):
                    raise  # the connection is being aborted
                else:
                    # The handler's own: something it awaited was cancelled,
                    # not this task. A failure like any other (answered).
                    reply = self._failed(conn, route, id_, exc)
            except Exception as exc:
                reply = self._failed(conn, route, id_, exc)
            else:
                if expires is not None and time.monotonic() > expires:
                    reply = self._expired(route, id_)
                else:
                    reply = self._dispatcher.reply(conn, route, id_, result) if id_ else None
            if reply is not None:
                _send_replies(conn, [reply])
        finally:
            if timer is not None:
                timer.cancel()
            session.in_flight -= 1
        if session.backlog is not None and session.in_flight < self.max_in_flight:
            self._release(conn, session)

    def _release(self, conn: Connection, session: Any) -> None:
        # A handler finished below the limit: answer the frames held back,
        # each run with the time it was read; resume reading once none is left.
        backlog = session.backlog
        session.backlog = None
        if session.failed or conn._lifecycle >= CLOSING:
            return
        replies: list[bytes] = []
        while backlog:
            frames, read_at = backlog.popleft()
            done = self._dispatcher.run(conn, session, frames, 0, read_at)
            if done is None:  # a malformed header: the connection is failing
                return
            replies += done
            if session.backlog is not None:  # the limit again: keep the rest in order
                session.backlog.extend(backlog)
                break
        if replies:
            _send_replies(conn, replies)
        if session.backlog is None and not session.failed:
            conn._unpause_reading(PAUSE_BUSY)

    # ------------------------------------------------------------ shutdown

    def _shutdown(self, conn: Connection) -> None:
        # A graceful shutdown: tell the client (drain), keep answering what
        # it still sends until it closes, or until drain_grace.
        session = self._session(conn)
        if session.draining:
            return
        session.draining = True
        self._counts["drains_sent"] += 1
        try:
            conn.send(_DRAIN_FRAME)
        except (ConnectionClosedError, ConnectionBrokenError):
            conn._begin_shutdown()
            return
        if self.drain_grace == 0:
            conn._begin_shutdown()
        else:
            asyncio.get_running_loop().call_later(self.drain_grace, conn._begin_shutdown)


_COUNTED = (
    "unknown_type",
    "decode_errors",
    "request_errors",
    "internal_errors",
    "deadline_exceeded",
    "forbidden",
    "malformed",
    "suspended",
    "held",
    "pings",
    "drains_sent",
)


class _Resumed:
    """Await the rest of a coroutine whose first step already ran (it yielded ``yielded``).

    The handler's first step runs inline in the read callback (most finish
    there); one that suspends continues in a task, which must wait for what
    the first step yielded before sending the coroutine anything. This is
    what an eager task does (CPython 3.12's ``eager_task_factory``),
    written for every version fastnet supports.
    """

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        yielded = self._yielded
        self._yielded = None
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task: cancellation
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class _RateLimit:
    """True for the first ``burst`` calls of each ``interval`` seconds."""

    __slots__ = ("_burst", "_count", "_interval", "_start")

    def __init__(self, burst: int, interval: float) -> None:
        self._burst = burst
        self._interval = interval
        self._start = -interval
        self._count = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._start >= self._interval:
            self._start = now
            self._count = 0
        self._count += 1
        return self._count <= self._burst


def _send_replies(conn: Connection, frames: list[bytes]) -> None:
    # Replies whose number max_in_flight bounds: queued as a callback
    # handler's are, past max_write_buffer (reading pauses under write
    # pressure instead); nothing to do once the connection is going.
    with contextlib.suppress(ConnectionClosedError, ConnectionBrokenError):
        conn._send_replies(frames)


def _check_type_id(type_id: int) -> None:
    if not isinstance(type_id, int) or isinstance(type_id, bool) or not 1 <= type_id <= MAX_TYPE:
        raise ValueError(f"a message type is an int from 1 to {MAX_TYPE}, got {type_id!r}")


def _cancel_requested(task: asyncio.Task[Any] | None) -> bool:
    # Whether task.cancel() was called (CPython 3.11+ counts the requests);
    # on 3.10 a cancellation cannot be told from a CancelledError the
    # coroutine raised itself, so every one is taken for the task's.
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _is_async(fn: Callable[..., Any]) -> bool:
    # A coroutine function, or an object whose __call__ is one.
    if inspect.iscoroutinefunction(fn):
        return True
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def _qualname(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", fn))
