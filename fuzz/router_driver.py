"""The router driven without a socket, shared by tests/test_message_codec.py and fuzz_message.py.

A real ``fastnet.Router`` with handlers that reach every path of the
per-frame code (both body codecs, plain and async handlers, suspending ones,
errors of every kind, protocol states, context variables), a fake
connection that records every call the router makes on it, and a clock that
ticks 2 ms per reading so deadlines are deterministic. The differential
tests and the fuzzer drive the C dispatcher and its twin through them and
compare the records.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import msgspec

import fastnet
from fastnet import bodies
from fastnet.errors import ConnectionClosedError
from fastnet.lifecycle import CLOSING, OPEN
from fastnet.wire import RequestError

# fastnet.framing's names for the router's backend (tests/conftest.py's MESSAGE_NAMES).
MESSAGE_NAMES = (
    "ALL_STATES",
    "Dispatcher",
    "Route",
    "encode_message",
    "error_body",
    "pack_header",
    "parse_error_body",
    "parse_header",
)


class Point(NamedTuple):
    """A Packed message: two big-endian int32."""

    x: int
    y: int
    layout = "!ii"


class Greeting(msgspec.Struct):
    """A Msgpack message."""

    name: str


class Welcome(msgspec.Struct):
    """A Msgpack reply."""

    text: str


class PerClass:
    """Both body codecs on one router: Packed for classes with a layout, Msgpack otherwise."""

    def __init__(self) -> None:
        self.packed = bodies.Packed()
        self.msgpack = bodies.Msgpack()

    def _codec(self, cls: type) -> Any:
        return self.packed if hasattr(cls, "layout") else self.msgpack

    def decoder(self, cls: type) -> Callable[[bytes], Any]:
        return self._codec(cls).decoder(cls)  # type: ignore[no-any-return]

    def encoder(self, cls: type) -> Callable[[Any], Any]:
        return self._codec(cls).encoder(cls)  # type: ignore[no-any-return]


class Unencodable:
    """A result that is neither bytes-like nor a declared message."""


class _Yield:
    """Suspend a coroutine once (what awaiting an unfinished future does)."""

    def __await__(self) -> Iterator[None]:
        yield None


# Message types of the test router.
ECHO = 1  # plain handler, raw body: the body back
REFUSE = 2  # raises RequestError (code 300)
CRASH = 3  # raises ValueError: an internal error
QUICK = 4  # async, finishes without awaiting
POINT = 5  # Packed: Point(x, y) -> Point(y, x)
GREET = 6  # Msgpack: Greeting -> Welcome (type 7, reply only)
WELCOME = 7
NOTHING = 8  # returns None: an empty reply
ARRAY = 9  # returns a bytearray
VIEW = 10  # returns a memoryview slice
STRANGE = 11  # returns what cannot be encoded
STRIDED = 12  # returns a non-contiguous memoryview
BAD_POINT = 13  # returns a Point the Packed encoder refuses
SLOW = 14  # async, suspends once
SLOW_FAIL = 15  # async, suspends once, then raises RequestError
ASYNC_CRASH = 16  # async, raises ValueError without awaiting
LOGIN = 17  # state "new" only: moves to "authed"
SECRET = 18  # state "authed" only
LOGOUT = 19  # state "authed" only: back to "new"
GONE = 20  # raises ConnectionClosedError: no answer at all
CTX_SET = 21  # async: sets VAR to the body, suspends if it is not empty, returns VAR
CTX_PEEK = 22  # returns VAR: the handlers' context changes do not leak to the connection's
UNKNOWN = 300
SUSPENDING = (SLOW, SLOW_FAIL, CTX_SET)
TYPES = (0, *range(1, 24), UNKNOWN, 65535)  # unknown: 0, 7 (reply only), 23, 300, 65535

VAR: contextvars.ContextVar[bytes] = contextvars.ContextVar("VAR")


def make_router(max_in_flight: int = 2, debug: bool = False) -> fastnet.Router:
    router = fastnet.Router(
        codec=PerClass(),
        states=("new", "authed"),
        max_in_flight=max_in_flight,
        drain_grace=0,
        debug=debug,
    )
    router.message(POINT)(Point)
    router.message(GREET)(Greeting)
    router.message(WELCOME, reply_only=True)(Welcome)

    @router.handler(ECHO)
    def echo(conn: Any, msg: bytes) -> bytes:
        return msg

    @router.handler(REFUSE)
    def refuse(conn: Any, msg: bytes) -> bytes:
        raise RequestError(f"refused {len(msg)} bytes", code=300)

    @router.handler(CRASH)
    def crash(conn: Any, msg: bytes) -> bytes:
        raise ValueError(f"boom {msg!r}")

    @router.handler(QUICK)
    async def quick(conn: Any, msg: bytes) -> bytes:
        return b"quick:" + msg

    @router.handler(Point)
    def swap(conn: Any, msg: Point) -> Point:
        return Point(msg.y, msg.x)

    @router.handler(Greeting)
    def greet(conn: Any, msg: Greeting) -> Welcome:
        return Welcome(f"hello {msg.name}")

    @router.handler(NOTHING)
    def nothing(conn: Any, msg: bytes) -> None:
        return None

    @router.handler(ARRAY)
    def array(conn: Any, msg: bytes) -> bytearray:
        return bytearray(msg) + b"!"

    @router.handler(VIEW)
    def view(conn: Any, msg: bytes) -> memoryview:
        return memoryview(b"<" + msg + b">")[1:-1]

    @router.handler(STRANGE)
    def strange(conn: Any, msg: bytes) -> Unencodable:
        return Unencodable()

    @router.handler(STRIDED)
    def strided(conn: Any, msg: bytes) -> memoryview:
        return memoryview(msg + msg)[::2]  # empty: a contiguous empty view

    @router.handler(BAD_POINT)
    def bad_point(conn: Any, msg: bytes) -> Point:
        return Point(1 << 40, 0)

    @router.handler(SLOW)
    async def slow(conn: Any, msg: bytes) -> bytes:
        await _Yield()
        return b"slow:" + msg

    @router.handler(SLOW_FAIL)
    async def slow_fail(conn: Any, msg: bytes) -> bytes:
        await _Yield()
        raise RequestError("too late", code=301)

    @router.handler(ASYNC_CRASH)
    async def async_crash(conn: Any, msg: bytes) -> bytes:
        raise ValueError("async boom")

    @router.handler(LOGIN, states="new")
    def login(conn: Any, msg: bytes) -> bytes:
        router.set_state(conn, "authed")
        return b"welcome"

    @router.handler(SECRET, states=["authed"])
    def secret(conn: Any, msg: bytes) -> bytes:
        return b"secret:" + msg

    @router.handler(LOGOUT, states="authed")
    def logout(conn: Any, msg: bytes) -> None:
        router.set_state(conn, "new")

    @router.handler(GONE)
    def gone(conn: Any, msg: bytes) -> bytes:
        raise ConnectionClosedError("closed")

    @router.handler(CTX_SET)
    async def ctx_set(conn: Any, msg: bytes) -> bytes:
        VAR.set(msg)
        if msg:
            await _Yield()
        return b"var:" + VAR.get()

    @router.handler(CTX_PEEK)
    def ctx_peek(conn: Any, msg: bytes) -> bytes:
        return b"var:" + VAR.get(b"unset")

    return router


class FakeConn:
    """What the router uses of a ``Connection``, recording every call in ``events``.

    ``spawn`` keeps the task's coroutine instead of starting it; ``resume``
    runs one to its end, as the event loop would.
    """

    def __init__(self) -> None:
        self._session: Any = None
        self._lifecycle = OPEN
        self.peer = ("192.0.2.1", 40000)
        self.events: list[tuple[Any, ...]] = []
        self.tasks: list[Any] = []

    def send(self, frame: bytes) -> None:
        self.events.append(("send", bytes(frame)))

    def send_many(self, frames: list[bytes]) -> None:
        self.events.append(("send_many", [bytes(f) for f in frames]))

    def _send_replies(self, frames: list[bytes]) -> None:
        self.events.append(("send_replies", [bytes(f) for f in frames]))

    def _framing_failed(self, exc: BaseException) -> None:
        self.events.append(("framing_failed", type(exc), str(exc), exc.args))

    def _pause_reading(self, reason: int) -> None:
        self.events.append(("pause", reason))

    def _unpause_reading(self, reason: int) -> None:
        self.events.append(("unpause", reason))

    def _begin_shutdown(self) -> None:
        self.events.append(("begin_shutdown",))

    def spawn(self, coro: Any, *, name: str | None = None) -> Any:
        # A task runs in a copy of the context it was made in (the handler's).
        self.events.append(("spawn",))
        self.tasks.append((coro, contextvars.copy_context()))
        return coro

    def deliver(self, dispatcher: Any, frames: list[bytes]) -> list[bytes] | None:
        """One read: the dispatcher's replies are what the connection would send."""
        replies = dispatcher(self, frames)
        self.events.append(("returned", None if replies is None else list(replies)))
        return replies  # type: ignore[no-any-return]

    def resume(self, which: int) -> None:
        """Run the ``which``-th waiting task (modulo their number) to its end."""
        if not self.tasks:
            self.events.append(("nothing to resume",))
            return
        coro, context = self.tasks.pop(which % len(self.tasks))
        self.events.append(("resume",))
        with contextlib.suppress(StopIteration):
            while True:
                context.run(coro.send, None)

    def close(self) -> None:
        """Drop the tasks still waiting (closed, so no 'never awaited' warning)."""
        self._lifecycle = CLOSING
        for coro, _ in self.tasks:
            coro.close()
        self.tasks.clear()


class TickingClock:
    """``time`` for the router: each reading is 2 ms after the one before.

    Deadlines become deterministic: a request with a 1 ms deadline has
    expired when its handler returns, one with 2 ms or more has not.
    """

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        self.now += 0.002
        return self.now
