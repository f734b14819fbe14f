#!/usr/bin/env python3
"""Differential fuzzer of the router's message codec: ``fastnet._message`` against its twin.

Each input is read as a connection's life: a router configuration (the
in-flight limit, debug texts), then steps: batches of frames as the
connection would read them, resumptions of handlers that suspended, and a
graceful shutdown (the drain message). Frames are raw bytes chosen by the
fuzzer, or requests built from a few input bytes (a known message type, an
id, a deadline, a body) so that every handler is reached without the fuzzer
having to discover the header first.

Every frame goes through both backends' ``parse_header``: the results must be
equal, agree with ``wire.header_error`` (the same ``HeaderError`` text), and a
header that parses must be re-encoded by ``encode_message`` to the same
frame; ``parse_error_body`` of the frame's body must agree too. Then the
steps drive two ``fastnet.Router`` instances with the same handlers, one bound
to each backend's ``Dispatcher`` (``fastnet.framing``'s names switched as the
tests' ``codec`` fixture does), each through a fake connection that records
every call the router makes (``send``, ``send_many``, ``_framing_failed``,
pausing, ``spawn``): the router, its handlers, the fake connection and the
clock are ``router_driver.py``'s, which tests/test_message_codec.py uses
too. After each step the two records, the routers' ``stats()``, the sessions
and the log lines must be equal.

The only exceptions allowed are the documented ones (``HeaderError`` from
``parse_header`` and ``parse_error_body``); anything else escapes and atheris
reports it with the input, as it does an ``AssertionError`` for a difference.
The router's clock ticks 2 ms per reading, so deadlines are deterministic
(a 1 ms deadline has passed when its handler returns, 2 ms has not). A
request with a deadline to a handler that suspends is given none: its timer
needs a running event loop, which this harness does not have.

``check(data)`` runs without atheris too (tests/test_fuzz_regressions.py
replays the corpus through it).

Run (see the Makefile's ``fuzz`` target for the sanitizer environment):
    python fuzz/fuzz_message.py -max_total_time=60 fuzz/corpus/message
"""

from __future__ import annotations

import contextlib
import logging
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

try:
    import atheris
except ImportError:  # check() alone (the corpus replay test)
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["fastnet"]):
        import fastnet
        from fastnet import _message, _message_py, framing
        from fastnet import router as router_module
        from fastnet.wire import HeaderError, header_error, short_message
else:
    import fastnet
    from fastnet import _message, _message_py, framing
    from fastnet import router as router_module
    from fastnet.wire import HeaderError, header_error, short_message

from differential import Reader
from router_driver import (
    GREET,
    MESSAGE_NAMES,
    POINT,
    SUSPENDING,
    TYPES,
    FakeConn,
    Greeting,
    TickingClock,
    make_router,
)

# Bounds that keep one input to a few milliseconds.
MAX_STEPS = 16
MAX_BATCH = 8
MAX_RAW = 63

HEADER = struct.Struct(">BBHII")
LIMITS = (1, 2, 3, 64)


# --- the router: fuzz/router_driver.py's, shared with tests/test_message_codec.py ----


# Routers by (backend, max_in_flight, debug): made and bound once, their
# counters reset for each input (a connection's state is in its session).
ROUTERS: dict[tuple[str, int, bool], fastnet.Router] = {}


class Side:
    """One backend: its router (made once per configuration), clock, connection and log."""

    def __init__(self, module: Any, max_in_flight: int, debug: bool) -> None:
        self.module = module
        self.clock = TickingClock()
        self.conn = FakeConn()
        self.logs: list[str] = []
        key = (module.__name__, max_in_flight, debug)
        router = ROUTERS.get(key)
        if router is None:
            with self.using():
                router = ROUTERS[key] = make_router(max_in_flight, debug)
                router._bind()
        router._counts = dict.fromkeys(router._counts, 0)
        router._internal_log = None
        self.router = router
        self.dispatcher = router._dispatcher
        assert type(self.dispatcher) is module.Dispatcher

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        saved = {name: getattr(framing, name) for name in MESSAGE_NAMES}
        saved_time = router_module.time
        try:
            for name in MESSAGE_NAMES:
                setattr(framing, name, getattr(self.module, name))
            router_module.time = self.clock  # type: ignore[assignment]
            yield
        finally:
            for name, value in saved.items():
                setattr(framing, name, value)
            router_module.time = saved_time

    def step(self, step: tuple[Any, ...]) -> None:
        with self.using():
            if step[0] == "frames":
                replies = self.dispatcher(self.conn, list(step[1]))
                self.conn.events.append(("returned", None if replies is None else list(replies)))
            elif step[0] == "resume":
                self.conn.resume(step[1])
            else:
                self.router._shutdown(self.conn)

    def state(self) -> tuple[Any, ...]:
        session = self.conn._session
        snapshot = None
        if session is not None:
            backlog = None if session.backlog is None else list(session.backlog)
            snapshot = (session.state, session.in_flight, backlog, session.failed, session.draining)
        return self.router.stats(), snapshot, len(self.conn.tasks), self.logs


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.target: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is not None:
            self.target.append(record.getMessage())


# --- reading the input ----------------------------------------------------------


def read_frame(r: Reader) -> bytes:
    mode = r.byte()
    if not mode & 0x80:
        return r.take(mode % (MAX_RAW + 1))  # raw bytes, any header
    # A request: mode's bits 0-1 choose the id (0, 1, 2, or 4 more bytes), bits
    # 2-4 the deadline, bit 6 a well-formed body for the typed messages.
    type_ = TYPES[r.byte() % len(TYPES)]
    id_ = r.u32() if mode & 3 == 3 else mode & 3
    choice = (mode >> 2) & 7
    deadline = r.u32() if choice == 7 else (0, 0, 1, 2, 60_000, 0, 0)[choice]
    size = r.byte() % 24
    body = r.take(size)
    if type_ == GREET and mode & 0x40:
        body = msgspec.msgpack.encode(Greeting(body.decode("latin-1")))
    elif type_ == POINT and mode & 0x40:
        body = body[:8].ljust(8, b"\x00")
    return HEADER.pack(1, 0, type_, id_, deadline) + body


def no_suspended_deadline(frame: bytes) -> bytes:
    """A request with a deadline to a handler that suspends: the same without the deadline."""
    if len(frame) >= 12:
        kind, flags, type_, _, deadline = HEADER.unpack_from(frame)
        if kind == 1 and not flags and type_ in SUSPENDING and deadline:
            return frame[:8] + bytes(4) + frame[12:]
    return frame


def read_steps(r: Reader) -> list[tuple[Any, ...]]:
    steps: list[tuple[Any, ...]] = []
    while r.more() and len(steps) < MAX_STEPS:
        op = r.byte()
        if op < 0xC0:
            frames = [read_frame(r) for _ in range(op % MAX_BATCH + 1)]
            steps.append(("frames", [no_suspended_deadline(f) for f in frames]))
        elif op < 0xF8:
            steps.append(("resume", r.byte()))
        else:
            steps.append(("shutdown",))
    return steps


# --- the checks -----------------------------------------------------------------


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except HeaderError as exc:
        return ("error", type(exc), str(exc), exc.args)


def check_codec(frame: bytes) -> None:
    """parse_header, its re-encoding and parse_error_body: equal in both, and as wire.py says."""
    c_out = outcome(lambda: _message.parse_header(frame))
    py_out = outcome(lambda: _message_py.parse_header(frame))
    assert c_out == py_out, (frame, c_out, py_out)
    if len(frame) < 12:
        expected: HeaderError | None = short_message(len(frame))
    else:
        kind, flags, _, _, deadline = HEADER.unpack_from(frame)
        expected = header_error(kind, flags, deadline, len(frame), None)
    if expected is not None:
        assert c_out[0] == "error" and c_out[3] == expected.args, (frame, c_out, expected)
    else:
        assert c_out[0] == "ok", (frame, c_out)
        assert c_out[1] == HEADER.unpack_from(frame)[:1] + HEADER.unpack_from(frame)[2:]
        for module in (_message, _message_py):
            again = module.encode_message(*c_out[1], memoryview(frame)[12:])
            assert again == frame, (module.__name__, frame, again)
    body = frame[12:]
    c_body = outcome(lambda: _message.parse_error_body(body))
    py_body = outcome(lambda: _message_py.parse_error_body(body))
    assert c_body == py_body, (body, c_body, py_body)


def check(data: bytes) -> None:
    """One input: its frames through both codecs, its steps through both dispatchers."""
    if not data:
        return
    r = Reader(data)
    config = r.byte()
    max_in_flight, debug = LIMITS[config & 3], bool(config & 4)
    steps = read_steps(r)
    for step in steps:
        if step[0] == "frames":
            for frame in step[1]:
                check_codec(frame)
    c = Side(_message, max_in_flight, debug)
    py = Side(_message_py, max_in_flight, debug)
    logger = logging.getLogger("fastnet")
    lines = LogLines()
    propagate = logger.propagate
    logger.addHandler(lines)
    logger.propagate = False  # the internal errors' tracebacks are not printed
    try:
        for number, step in enumerate(steps):
            for side in (c, py):
                lines.target = side.logs
                side.step(step)
            if c.conn.events != py.conn.events or c.state() != py.state():
                raise AssertionError(
                    f"step {number} ({step!r}) of {steps!r}: the backends differ\n"
                    f"C:  {c.conn.events!r}\n    {c.state()!r}\n"
                    f"py: {py.conn.events!r}\n    {py.state()!r}"
                )
    finally:
        lines.target = None
        logger.removeHandler(lines)
        logger.propagate = propagate
        c.conn.close()
        py.conn.close()


def main() -> None:
    assert atheris is not None, "pip install atheris"
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
