"""The router's message codec on both backends: headers, error bodies, the dispatcher.

``fastnet._message`` (id ``c``) and ``fastnet._message_py`` (id ``py``) must
behave the same byte for byte and error for error. The tests here run on each
backend (``message_impl``), checking what ``wire.py`` specifies: the 12-byte
header's layout, every rule a header can break and the exact message of the
``HeaderError`` it raises, the error reply's body, the arguments the packers
refuse. The differential tests (``c_extension``) then run the same inputs
through both backends side by side, including whole sequences of frames fed to
a real ``Router``'s dispatcher through a fake connection: the replies, what was
sent, the framing failure, the router's counters, the session and the log must
be equal.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import msgspec
import pytest
from conftest import MESSAGE_NAMES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastnet import framing
from fastnet import router as router_module
from fastnet.wire import (
    CONTROL,
    DRAIN,
    ERROR,
    HEADER_SIZE,
    MAX_ID,
    PING,
    PONG,
    REPLY,
    REQUEST,
    ErrorCode,
    HeaderError,
    header_error,
    short_message,
)

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
if str(FUZZ_DIR) not in sys.path:
    sys.path.insert(0, str(FUZZ_DIR))  # the router driver the fuzzer shares

from router_driver import (  # noqa: E402  (fuzz/ is put on sys.path first)
    ARRAY,
    ASYNC_CRASH,
    BAD_POINT,
    CRASH,
    CTX_PEEK,
    CTX_SET,
    ECHO,
    GONE,
    GREET,
    LOGIN,
    LOGOUT,
    NOTHING,
    POINT,
    QUICK,
    REFUSE,
    SECRET,
    SLOW,
    SLOW_FAIL,
    STRANGE,
    STRIDED,
    SUSPENDING,
    TYPES,
    UNKNOWN,
    VAR,
    VIEW,
    WELCOME,
    FakeConn,
    Greeting,
    TickingClock,
    Welcome,
    make_router,
)

HEADER = struct.Struct(">BBHII")

# message_impl is a function-scoped fixture that returns a module: safe to
# reuse across the examples of one test.
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

kinds = st.integers(REQUEST, CONTROL)
types = st.integers(0, 0xFFFF)
ids = st.integers(0, MAX_ID)
deadlines = st.integers(0, 0xFFFFFFFF)


def raw_header(kind: int, type_: int, id_: int, deadline: int = 0, flags: int = 0) -> bytes:
    """A header written with ``struct``, independent of both backends."""
    return HEADER.pack(kind, flags, type_, id_, deadline)


def as_buffers(data: bytes) -> list[Any]:
    """``data`` as each kind of bytes-like object a caller may pass."""
    return [
        data,
        bytearray(data),
        memoryview(data),
        memoryview(b"\xee" + data + b"\xee")[1:-1],  # a slice: not at the buffer's start
    ]


@st.composite
def headers(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """Valid (kind, type, id, deadline): a deadline on requests only."""
    kind = draw(kinds)
    deadline = draw(deadlines) if kind == REQUEST else 0
    return kind, draw(types), draw(ids), deadline


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What ``call`` did, in a form that compares across backends: result, or error and text."""
    try:
        return ("ok", call())
    except Exception as exc:
        return ("error", type(exc), str(exc), exc.args)


def c_and_py() -> tuple[ModuleType, ModuleType]:
    """Both backends (the differential tests are marked c_extension)."""
    return importlib.import_module("fastnet._message"), importlib.import_module(
        "fastnet._message_py"
    )


# --- pack_header, encode_message, parse_header --------------------------------


@SETTINGS
@given(fields=headers())
def test_pack_header_layout(message_impl: ModuleType, fields: tuple[int, int, int, int]) -> None:
    kind, type_, id_, deadline = fields
    header = message_impl.pack_header(kind, type_, id_, deadline)
    assert type(header) is bytes
    assert header == raw_header(kind, type_, id_, deadline)
    if deadline == 0:
        assert message_impl.pack_header(kind, type_, id_) == header  # the default
    # An error reply needs its 2-byte code after the header to parse.
    frame = header + b"\x00\x07" if kind == ERROR else header
    assert message_impl.parse_header(frame) == fields


@SETTINGS
@given(fields=headers(), body=st.binary(max_size=300), form=st.integers(0, 3))
def test_encode_message_round_trip(
    message_impl: ModuleType, fields: tuple[int, int, int, int], body: bytes, form: int
) -> None:
    kind, type_, id_, deadline = fields
    frame = message_impl.encode_message(kind, type_, id_, deadline, as_buffers(body)[form])
    assert type(frame) is bytes
    assert frame == raw_header(kind, type_, id_, deadline) + body
    if kind == ERROR and len(body) < 2:
        with pytest.raises(HeaderError) as info:
            message_impl.parse_header(frame)
        assert str(info.value) == "error reply without its 2-byte error code"
        return
    for buffer in as_buffers(frame):
        assert message_impl.parse_header(buffer) == fields


def test_encode_message_takes_other_buffers(message_impl: ModuleType) -> None:
    from array import array

    values = array("H", [1, 2, 3])
    frame = message_impl.encode_message(REPLY, 9, 1, 0, values)
    assert frame == raw_header(REPLY, 9, 1) + values.tobytes()
    grid = memoryview(b"abcdef").cast("B", (2, 3))  # C-contiguous, two dimensions
    assert message_impl.encode_message(REPLY, 0, 1, 0, grid) == raw_header(REPLY, 0, 1) + b"abcdef"
    assert message_impl.encode_message(REQUEST, 1, 0, 0, b"") == raw_header(REQUEST, 1, 0)


@SETTINGS
@given(data=st.binary(max_size=40))
def test_parse_header_of_any_bytes(message_impl: ModuleType, data: bytes) -> None:
    # Either the fields struct reads, or the HeaderError wire.py words for the
    # first rule the header breaks.
    if len(data) < HEADER_SIZE:
        expected: HeaderError | None = short_message(len(data))
    else:
        kind, flags, type_, id_, deadline = HEADER.unpack_from(data)
        expected = header_error(kind, flags, deadline, len(data), None)
    try:
        fields = message_impl.parse_header(data)
    except HeaderError as exc:
        assert expected is not None, data
        assert str(exc) == str(expected)
        assert exc.args == expected.args
        return
    assert expected is None, (data, expected)
    assert fields == (kind, type_, id_, deadline)


# --- malformed headers ----------------------------------------------------------


def malformed_headers() -> Iterator[tuple[str, bytes, str]]:
    """(case id, frame, the exact HeaderError message) for every rule a header can break."""
    valid = raw_header(REQUEST, 7, 1)
    for size in range(HEADER_SIZE):
        yield (
            f"short-{size}",
            valid[:size],
            f"message of {size} bytes is shorter than the 12-byte header",
        )
    for kind in (0, *range(5, 256)):
        yield f"kind-{kind}", raw_header(kind, 1, 1) + b"body", f"unknown message kind {kind}"
    for kind in (REQUEST, REPLY, ERROR, CONTROL):
        for flags in (0x01, 0x02, 0x80, 0xFF):
            yield (
                f"flags-{flags:02x}-kind-{kind}",
                raw_header(kind, 1, 1, flags=flags) + b"\x00\x01",
                f"reserved header flags set: 0x{flags:02x}",
            )
    for kind in (REPLY, ERROR, CONTROL):
        for deadline in (1, 1000, 0xFFFFFFFF):
            yield (
                f"deadline-{deadline}-kind-{kind}",
                raw_header(kind, 1, 1, deadline) + b"\x00\x01",
                f"a message of kind {kind} carries a deadline",
            )
    for body in (b"", b"\x01"):
        yield (
            f"error-body-{len(body)}",
            raw_header(ERROR, 1, 1) + body,
            "error reply without its 2-byte error code",
        )
    # Several rules broken at once: the first one in wire.py's order is named.
    yield "kind-and-flags", raw_header(9, 1, 1, 5, flags=3), "unknown message kind 9"
    yield (
        "flags-and-deadline",
        raw_header(CONTROL, 1, 1, 5, flags=3),
        "reserved header flags set: 0x03",
    )
    yield (
        "deadline-and-no-code",
        raw_header(ERROR, 1, 1, 5),
        "a message of kind 3 carries a deadline",
    )


MALFORMED = list(malformed_headers())


@pytest.mark.parametrize(
    ("frame", "message"),
    [pytest.param(frame, message, id=case) for case, frame, message in MALFORMED],
)
def test_malformed_header(message_impl: ModuleType, frame: bytes, message: str) -> None:
    for buffer in as_buffers(frame):
        with pytest.raises(HeaderError) as info:
            message_impl.parse_header(buffer)
        assert type(info.value) is HeaderError
        assert str(info.value) == message
        assert info.value.args == (message,)
        assert info.value.frames == []


@pytest.mark.parametrize("kind", [REPLY, ERROR, CONTROL])
def test_valid_kinds_other_than_requests(message_impl: ModuleType, kind: int) -> None:
    # parse_header reads for neither side: replies and control messages parse.
    frame = raw_header(kind, 513, 0xFFFFFFFF) + b"\x01\x02"
    assert message_impl.parse_header(frame) == (kind, 513, 0xFFFFFFFF, 0)


@pytest.mark.c_extension
def test_malformed_headers_same_in_both() -> None:
    c, py = c_and_py()
    for case, frame, _ in MALFORMED:
        for buffer in as_buffers(frame):
            c_out = outcome(lambda m=c, b=buffer: m.parse_header(b))
            py_out = outcome(lambda m=py, b=buffer: m.parse_header(b))
            assert c_out == py_out, case


@pytest.mark.c_extension
@SETTINGS
@given(data=st.binary(max_size=40), form=st.integers(0, 3))
def test_parse_header_same_in_both(data: bytes, form: int) -> None:
    c, py = c_and_py()
    buffer = as_buffers(data)[form]
    assert outcome(lambda: c.parse_header(buffer)) == outcome(lambda: py.parse_header(buffer))


# --- error bodies ---------------------------------------------------------------


@SETTINGS
@given(code=st.integers(0, 0xFFFF), text=st.text(max_size=60))
def test_error_body_round_trip(message_impl: ModuleType, code: int, text: str) -> None:
    body = message_impl.error_body(code, text)
    assert body == struct.pack(">H", code) + text.encode("utf-8")
    for buffer in as_buffers(body):
        assert message_impl.parse_error_body(buffer) == (code, text)


def test_error_body_replaces_what_utf8_cannot_encode(message_impl: ModuleType) -> None:
    body = message_impl.error_body(ErrorCode.INTERNAL, "a\udc80b")  # a lone surrogate
    assert body == b"\x00\x04a?b"
    assert message_impl.parse_error_body(body) == (4, "a?b")


@SETTINGS
@given(data=st.binary(max_size=40))
def test_parse_error_body_of_any_bytes(message_impl: ModuleType, data: bytes) -> None:
    if len(data) < 2:
        with pytest.raises(HeaderError) as info:
            message_impl.parse_error_body(data)
        assert str(info.value) == (
            f"error reply body of {len(data)} bytes has no 2-byte error code"
        )
        return
    code, text = message_impl.parse_error_body(bytearray(data))
    assert code == int.from_bytes(data[:2], "big")
    assert text == data[2:].decode("utf-8", "replace")


@pytest.mark.c_extension
@SETTINGS
@given(code=st.integers(-2, 0x10001), text=st.text(max_size=20), data=st.binary(max_size=20))
def test_error_bodies_same_in_both(code: int, text: str, data: bytes) -> None:
    c, py = c_and_py()
    assert outcome(lambda: c.error_body(code, text)) == outcome(lambda: py.error_body(code, text))
    assert outcome(lambda: c.parse_error_body(data)) == outcome(lambda: py.parse_error_body(data))


# --- arguments the packers refuse ----------------------------------------------


class BadCall(NamedTuple):
    call: Callable[[ModuleType], Any]
    error: type[Exception]
    message: str


NOT_INT = "'{}' object cannot be interpreted as an integer"
NOT_CONTIGUOUS = "memoryview: underlying buffer is not C-contiguous"
NOT_BYTES = "a bytes-like object is required, not '{}'"

BAD_CALLS = {
    "kind-0": BadCall(lambda m: m.pack_header(0, 1, 1), ValueError, "kind must be 1-4, got 0"),
    "kind-5": BadCall(lambda m: m.pack_header(5, 1, 1), ValueError, "kind must be 1-4, got 5"),
    "kind-neg": BadCall(lambda m: m.pack_header(-1, 1, 1), ValueError, "kind must be 1-4, got -1"),
    "kind-huge": BadCall(
        lambda m: m.pack_header(1 << 70, 1, 1), ValueError, f"kind must be 1-4, got {1 << 70}"
    ),
    "type-neg": BadCall(
        lambda m: m.pack_header(1, -1, 1), ValueError, "type must be 0-65535, got -1"
    ),
    "type-65536": BadCall(
        lambda m: m.encode_message(2, 65536, 1, 0, b""),
        ValueError,
        "type must be 0-65535, got 65536",
    ),
    "id-neg": BadCall(
        lambda m: m.pack_header(1, 1, -1), ValueError, "id must be 0-4294967295, got -1"
    ),
    "id-2**32": BadCall(
        lambda m: m.encode_message(1, 1, 1 << 32, 0, b"x"),
        ValueError,
        "id must be 0-4294967295, got 4294967296",
    ),
    "deadline-neg": BadCall(
        lambda m: m.pack_header(1, 1, 1, -1),
        ValueError,
        "deadline must be 0-4294967295 ms, got -1",
    ),
    "deadline-2**32": BadCall(
        lambda m: m.encode_message(1, 1, 1, 1 << 32, b""),
        ValueError,
        "deadline must be 0-4294967295 ms, got 4294967296",
    ),
    "deadline-on-reply": BadCall(
        lambda m: m.pack_header(REPLY, 1, 1, 5), ValueError, "only a request carries a deadline"
    ),
    "deadline-on-error": BadCall(
        lambda m: m.encode_message(ERROR, 1, 1, 5, b"\x00\x01"),
        ValueError,
        "only a request carries a deadline",
    ),
    "deadline-on-control": BadCall(
        lambda m: m.pack_header(CONTROL, PING, 1, 1),
        ValueError,
        "only a request carries a deadline",
    ),
    # Not ints: refused (a C int conversion would truncate a float).
    "kind-float": BadCall(lambda m: m.pack_header(1.0, 1, 1), TypeError, NOT_INT.format("float")),
    "type-float": BadCall(lambda m: m.pack_header(1, 2.5, 1), TypeError, NOT_INT.format("float")),
    "id-str": BadCall(lambda m: m.pack_header(1, 1, "1"), TypeError, NOT_INT.format("str")),
    "deadline-none": BadCall(
        lambda m: m.encode_message(1, 1, 1, None, b""), TypeError, NOT_INT.format("NoneType")
    ),
    "body-none": BadCall(
        lambda m: m.encode_message(1, 1, 1, 0, None),
        TypeError,
        "a message body must be bytes-like, not None",
    ),
    "body-str": BadCall(
        lambda m: m.encode_message(1, 1, 1, 0, "text"), TypeError, NOT_BYTES.format("str")
    ),
    "body-int": BadCall(
        lambda m: m.encode_message(1, 1, 1, 0, 12), TypeError, NOT_BYTES.format("int")
    ),
    "body-strided": BadCall(
        lambda m: m.encode_message(1, 1, 1, 0, memoryview(b"abcdef")[::2]),
        BufferError,
        NOT_CONTIGUOUS,
    ),
    "fields-before-body": BadCall(
        lambda m: m.encode_message(0, 1, 1, 0, None), ValueError, "kind must be 1-4, got 0"
    ),
    "code-neg": BadCall(
        lambda m: m.error_body(-1, "x"), ValueError, "an error code is 0-65535, got -1"
    ),
    "code-65536": BadCall(
        lambda m: m.error_body(65536, "x"), ValueError, "an error code is 0-65535, got 65536"
    ),
    "code-float": BadCall(lambda m: m.error_body(3.0, "x"), TypeError, NOT_INT.format("float")),
    "code-none": BadCall(lambda m: m.error_body(None, "x"), TypeError, NOT_INT.format("NoneType")),
    "message-bytes": BadCall(
        lambda m: m.error_body(3, b"x"), TypeError, "an error message is a str, not bytes"
    ),
    "message-none": BadCall(
        lambda m: m.error_body(3, None), TypeError, "an error message is a str, not NoneType"
    ),
    "code-before-message": BadCall(
        lambda m: m.error_body(-1, b"x"), ValueError, "an error code is 0-65535, got -1"
    ),
    "parse-str": BadCall(lambda m: m.parse_header("x" * 12), TypeError, NOT_BYTES.format("str")),
    "parse-none": BadCall(lambda m: m.parse_header(None), TypeError, NOT_BYTES.format("NoneType")),
    "parse-strided": BadCall(
        lambda m: m.parse_header(memoryview(bytes(30))[::2]), BufferError, NOT_CONTIGUOUS
    ),
    "parse-error-body-none": BadCall(
        lambda m: m.parse_error_body(None), TypeError, "cannot convert 'NoneType' object to bytes"
    ),
    "parse-error-body-str": BadCall(
        lambda m: m.parse_error_body("ab"), TypeError, "string argument without an encoding"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_packers_refuse(message_impl: ModuleType, case: str) -> None:
    bad = BAD_CALLS[case]
    with pytest.raises(bad.error) as info:
        bad.call(message_impl)
    assert type(info.value) is bad.error
    assert str(info.value) == bad.message


@pytest.mark.c_extension
def test_packers_refuse_alike_in_both() -> None:
    c, py = c_and_py()
    for case, bad in BAD_CALLS.items():
        c_out = outcome(lambda b=bad: b.call(c))
        py_out = outcome(lambda b=bad: b.call(py))
        assert c_out == py_out, case


# --- the dispatcher: a real Router, a fake connection ---------------------------


# The router, its fake connection and clock: fuzz/router_driver.py (the fuzzer uses them too).


@contextlib.contextmanager
def using(module: ModuleType) -> Iterator[None]:
    """``fastnet.framing``'s router names from ``module`` (as the ``codec`` fixture does).

    And the router's clock is a ``TickingClock``.
    """
    with pytest.MonkeyPatch.context() as mp:
        for name in MESSAGE_NAMES:
            mp.setattr(framing, name, getattr(module, name))
        mp.setattr(router_module, "time", TickingClock())
        yield


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Run:
    """Everything observable of one script's run on one backend."""

    events: list[tuple[Any, ...]]
    stats: dict[str, int]
    session: tuple[Any, ...] | None
    waiting: int
    logs: list[str]


Step = tuple[Any, ...]  # ("frames", [bytes, ...]) | ("resume", int) | ("shutdown",)


def run_script(
    module: ModuleType, script: list[Step], max_in_flight: int = 2, debug: bool = False
) -> Run:
    """Feed ``script`` to a fresh router bound to ``module``'s dispatcher."""
    records = LogRecords()
    logger = logging.getLogger("fastnet")
    logger.addHandler(records)
    conn = FakeConn()
    try:
        with using(module):
            router = make_router(max_in_flight, debug)
            dispatcher = router._bind()
            assert type(dispatcher) is module.Dispatcher
            for step in script:
                if step[0] == "frames":
                    conn.deliver(dispatcher, list(step[1]))
                elif step[0] == "resume":
                    conn.resume(step[1])
                else:
                    router._shutdown(conn)
            session = conn._session
            snapshot = None
            if session is not None:
                backlog = None if session.backlog is None else list(session.backlog)
                snapshot = (
                    session.state,
                    session.in_flight,
                    backlog,
                    session.failed,
                    session.draining,
                )
            return Run(conn.events, router.stats(), snapshot, len(conn.tasks), records.messages)
    finally:
        conn.close()
        logger.removeHandler(records)


def request(type_: int, id_: int, body: bytes = b"", deadline: int = 0) -> bytes:
    return raw_header(REQUEST, type_, id_, deadline) + body


def ping(id_: int) -> bytes:
    return raw_header(CONTROL, PING, id_)


def read(frame: bytes) -> tuple[int, int, int, Any]:
    """(kind, type, id, body) of a frame the router sent; an error's body as (code, text)."""
    kind, flags, type_, id_, deadline = HEADER.unpack_from(frame)
    assert flags == 0 and deadline == 0, frame
    body: Any = frame[HEADER_SIZE:]
    if kind == ERROR:
        body = (int.from_bytes(body[:2], "big"), body[2:].decode())
    return kind, type_, id_, body


def only_replies(run: Run) -> list[tuple[int, int, int, Any]]:
    """The frames the dispatcher returned or sent, in order, read."""
    out = []
    for event in run.events:
        if (event[0] == "returned" and event[1]) or event[0] in ("send_many", "send_replies"):
            out.extend(read(f) for f in event[1])
        elif event[0] == "send":
            out.append(read(event[1]))
    return out


INTERNAL = (ErrorCode.INTERNAL, "internal error")


def test_dispatcher_answers_every_handler(codec: ModuleType, message_impl: ModuleType) -> None:
    greeting = msgspec.msgpack.encode(Greeting("ada"))
    frames = [
        request(ECHO, 1, b"hi"),
        request(REFUSE, 2, b"abc"),
        request(CRASH, 3),
        request(QUICK, 4, b"q"),
        request(POINT, 5, struct.pack("!ii", 1, -2)),
        request(POINT, 6, b"short"),
        request(GREET, 7, greeting),
        request(NOTHING, 8, b"ignored"),
        request(ARRAY, 9, b"a"),
        request(VIEW, 10, b"v"),
        request(STRANGE, 11),
        request(STRIDED, 12, b"abc"),
        request(BAD_POINT, 13),
        request(ASYNC_CRASH, 14),
        request(GONE, 15),
        request(UNKNOWN, 16),
        request(WELCOME, 17),
        request(SECRET, 18, b"s"),
        ping(19),
        raw_header(CONTROL, PONG, 5),
        raw_header(CONTROL, DRAIN, 0),
        raw_header(CONTROL, 200, 0),
        request(ECHO, 0, b"one-way"),
        request(CRASH, 0),
        request(ECHO, 20, b"deadline", deadline=60_000),
    ]
    run = run_script(message_impl, [("frames", frames)])
    assert run.events[-1][0] == "returned"
    assert only_replies(run) == [
        (REPLY, 0, 1, b"hi"),
        (ERROR, REFUSE, 2, (300, "refused 3 bytes")),
        (ERROR, CRASH, 3, INTERNAL),
        (REPLY, 0, 4, b"quick:q"),
        (REPLY, POINT, 5, struct.pack("!ii", -2, 1)),
        (
            ERROR,
            POINT,
            6,
            (
                ErrorCode.DECODE_ERROR,
                "cannot decode Point (5): unpack requires a buffer of 8 bytes",
            ),
        ),
        (REPLY, WELCOME, 7, msgspec.msgpack.encode(Welcome("hello ada"))),
        (REPLY, 0, 8, b""),
        (REPLY, 0, 9, b"a!"),
        (REPLY, 0, 10, b"v"),
        (ERROR, STRANGE, 11, INTERNAL),
        (ERROR, STRIDED, 12, INTERNAL),
        (ERROR, BAD_POINT, 13, INTERNAL),
        (ERROR, ASYNC_CRASH, 14, INTERNAL),
        (ERROR, UNKNOWN, 16, (ErrorCode.UNKNOWN_TYPE, "no handler for message type 300")),
        (ERROR, WELCOME, 17, (ErrorCode.UNKNOWN_TYPE, "no handler for message type 7")),
        (
            ERROR,
            SECRET,
            18,
            (ErrorCode.FORBIDDEN, "message type 18 is not allowed in state 'new'"),
        ),
        (CONTROL, PONG, 19, b""),
        (REPLY, 0, 20, b"deadline"),
    ]
    assert run.stats == {
        "unknown_type": 2,
        "decode_errors": 1,
        "request_errors": 1,
        "internal_errors": 6,
        "deadline_exceeded": 0,
        "forbidden": 1,
        "malformed": 0,
        "suspended": 0,
        "held": 0,
        "pings": 1,
        "drains_sent": 0,
    }
    assert run.session == (0, 0, None, False, False)


def test_dispatcher_debug_texts(codec: ModuleType, message_impl: ModuleType) -> None:
    frames = [request(CRASH, 1, b"x"), request(STRANGE, 2), request(ASYNC_CRASH, 3)]
    run = run_script(message_impl, [("frames", frames)], debug=True)
    assert only_replies(run) == [
        (ERROR, CRASH, 1, (ErrorCode.INTERNAL, "ValueError: boom b'x'")),
        (ERROR, STRANGE, 2, (ErrorCode.INTERNAL, "unencodable reply Unencodable")),
        (ERROR, ASYNC_CRASH, 3, (ErrorCode.INTERNAL, "ValueError: async boom")),
    ]


def test_protocol_states(codec: ModuleType, message_impl: ModuleType) -> None:
    run = run_script(
        message_impl,
        [
            ("frames", [request(SECRET, 1), request(LOGIN, 2), request(SECRET, 3, b"x")]),
            ("frames", [request(LOGIN, 4), request(LOGOUT, 5), request(SECRET, 6)]),
        ],
    )
    forbidden = ErrorCode.FORBIDDEN
    assert only_replies(run) == [
        (ERROR, SECRET, 1, (forbidden, "message type 18 is not allowed in state 'new'")),
        (REPLY, 0, 2, b"welcome"),
        (REPLY, 0, 3, b"secret:x"),
        (ERROR, LOGIN, 4, (forbidden, "message type 17 is not allowed in state 'authed'")),
        (REPLY, 0, 5, b""),
        (ERROR, SECRET, 6, (forbidden, "message type 18 is not allowed in state 'new'")),
    ]
    assert run.stats["forbidden"] == 3
    assert run.session is not None and run.session[0] == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        pytest.param(
            b"\x01\x00\x00", "message of 3 bytes is shorter than the 12-byte header", id="short"
        ),
        pytest.param(raw_header(9, 1, 1), "unknown message kind 9", id="kind"),
        pytest.param(
            raw_header(REQUEST, ECHO, 1, flags=4), "reserved header flags set: 0x04", id="flags"
        ),
        pytest.param(
            raw_header(CONTROL, PING, 1, 5),
            "a message of kind 4 carries a deadline",
            id="deadline",
        ),
        pytest.param(
            raw_header(ERROR, 1, 1) + b"\x00",
            "error reply without its 2-byte error code",
            id="error-without-code",
        ),
        pytest.param(
            raw_header(ERROR, 1, 1) + b"\x00\x01",
            "a server does not accept messages of kind 3 (replies)",
            id="error-reply",
        ),
        pytest.param(
            raw_header(REPLY, 0, 1),
            "a server does not accept messages of kind 2 (replies)",
            id="reply",
        ),
    ],
)
def test_malformed_header_in_a_batch(
    codec: ModuleType, message_impl: ModuleType, bad: bytes, message: str
) -> None:
    # The answers before the bad header are sent, then the connection fails
    # with the HeaderError; nothing after it, in this batch or later, is run.
    run = run_script(
        message_impl,
        [
            ("frames", [request(ECHO, 1, b"a"), ping(2), request(ECHO, 0), bad, request(ECHO, 3)]),
            ("frames", [request(ECHO, 4), ping(5)]),
        ],
    )
    assert run.events == [
        ("send_replies", [raw_header(REPLY, 0, 1) + b"a", raw_header(CONTROL, PONG, 2)]),
        ("framing_failed", HeaderError, message, (message,)),
        ("returned", None),
        ("returned", None),
    ]
    assert run.stats["malformed"] == 1
    assert run.stats["pings"] == 1
    assert run.session == (0, 0, None, True, False)


def test_malformed_header_first(codec: ModuleType, message_impl: ModuleType) -> None:
    # Nothing answered before it: no send, only the failure.
    run = run_script(message_impl, [("frames", [b"", request(ECHO, 1)])])
    message = "message of 0 bytes is shorter than the 12-byte header"
    assert run.events == [
        ("framing_failed", HeaderError, message, (message,)),
        ("returned", None),
    ]


def test_suspended_handlers_hold_reading(codec: ModuleType, message_impl: ModuleType) -> None:
    # max_in_flight=2: a third suspended handler waits; the frames after the
    # limit are held (reading paused) until a handler finishes.
    run = run_script(
        message_impl,
        [
            (
                "frames",
                [request(SLOW, 1, b"a"), request(SLOW_FAIL, 2), request(ECHO, 3), request(SLOW, 4)],
            ),
            ("frames", [request(ECHO, 5)]),  # read before the pause took effect: held too
            ("resume", 0),
            ("resume", 0),
            ("resume", 0),
        ],
        max_in_flight=2,
    )
    assert [e for e in run.events if e[0] != "returned"] == [
        ("spawn",),
        ("spawn",),
        ("pause", 32),  # ECHO 3 and what follows are held
        ("resume",),
        ("send_replies", [raw_header(REPLY, 0, 1) + b"slow:a"]),
        # Below the limit again: the held frames run, up to the limit again.
        ("spawn",),
        ("pause", 32),
        ("send_replies", [raw_header(REPLY, 0, 3)]),
        ("resume",),
        ("send_replies", [raw_header(ERROR, SLOW_FAIL, 2) + b"\x01\x2dtoo late"]),
        ("send_replies", [raw_header(REPLY, 0, 5)]),
        ("unpause", 32),  # nothing held any more
        ("resume",),
        ("send_replies", [raw_header(REPLY, 0, 4) + b"slow:"]),
    ]
    assert [e[1] for e in run.events if e[0] == "returned"] == [[], None]
    assert run.stats["suspended"] == 3
    assert run.stats["held"] == 2
    assert run.stats["request_errors"] == 1
    assert run.session == (0, 0, None, False, False)
    assert run.waiting == 0


def test_handler_context(codec: ModuleType, message_impl: ModuleType) -> None:
    # An async handler's first step runs in a copy of the context: what it
    # sets is not seen by the next handler, but is by its own rest (the task).
    run = run_script(
        message_impl,
        [
            ("frames", [request(CTX_SET, 1, b""), request(CTX_PEEK, 2)]),
            ("frames", [request(CTX_SET, 3, b"x"), request(CTX_PEEK, 4)]),
            ("resume", 0),
        ],
    )
    assert only_replies(run) == [
        (REPLY, 0, 1, b"var:"),
        (REPLY, 0, 2, b"var:unset"),
        (REPLY, 0, 4, b"var:unset"),
        (REPLY, 0, 3, b"var:x"),
    ]
    assert VAR.get(None) is None


def test_deadlines(codec: ModuleType, message_impl: ModuleType) -> None:
    # The clock ticks 2 ms per reading: a 1 ms deadline has passed when the
    # handler returns, a 2 ms one has not.
    exceeded = ErrorCode.DEADLINE_EXCEEDED
    run = run_script(
        message_impl,
        [
            (
                "frames",
                [
                    request(ECHO, 1, b"a", deadline=1),
                    request(ECHO, 2, b"b", deadline=2),
                    request(QUICK, 3, b"c", deadline=1),
                    request(REFUSE, 4, deadline=1),  # its error, not the deadline's
                    request(ECHO, 0, deadline=1),  # one-way: counted, not answered
                    request(POINT, 5, b"bad", deadline=1),  # undecodable: no deadline check
                    request(UNKNOWN, 6, deadline=1),
                ],
            )
        ],
    )
    assert only_replies(run) == [
        (ERROR, ECHO, 1, (exceeded, "message type 1: deadline exceeded")),
        (REPLY, 0, 2, b"b"),
        (ERROR, QUICK, 3, (exceeded, "message type 4: deadline exceeded")),
        (ERROR, REFUSE, 4, (300, "refused 0 bytes")),
        (
            ERROR,
            POINT,
            5,
            (
                ErrorCode.DECODE_ERROR,
                "cannot decode Point (5): unpack requires a buffer of 8 bytes",
            ),
        ),
        (ERROR, UNKNOWN, 6, (ErrorCode.UNKNOWN_TYPE, "no handler for message type 300")),
    ]
    assert run.stats["deadline_exceeded"] == 3


def test_shutdown_sends_drain(codec: ModuleType, message_impl: ModuleType) -> None:
    run = run_script(message_impl, [("shutdown",), ("shutdown",), ("frames", [ping(1)])])
    assert run.events == [
        ("send", raw_header(CONTROL, DRAIN, 0)),
        ("begin_shutdown",),
        ("returned", [raw_header(CONTROL, PONG, 1)]),
    ]
    assert run.stats["drains_sent"] == 1
    assert run.session == (0, 0, None, False, True)


# --- the dispatcher, differential ----------------------------------------------


def assert_same_runs(script: list[Step], max_in_flight: int = 2, debug: bool = False) -> Run:
    c, py = c_and_py()
    c_run = run_script(c, script, max_in_flight, debug)
    py_run = run_script(py, script, max_in_flight, debug)
    for index, (c_event, py_event) in enumerate(zip(c_run.events, py_run.events, strict=False)):
        assert c_event == py_event, f"event {index} differs; script: {script!r}"
    assert c_run == py_run, f"script: {script!r}"
    return c_run


FIXED_SCRIPT: list[Step] = [
    (
        "frames",
        [
            request(t, i + 1, b"body", deadline=60_000 if i % 3 == 0 and t not in SUSPENDING else 0)
            for i, t in enumerate(TYPES)
        ],
    ),
    ("resume", 1),
    ("frames", [request(LOGIN, 100), request(SECRET, 101, b"s"), ping(102), request(POINT, 0)]),
    ("resume", 0),
    ("frames", [request(GREET, 103, msgspec.msgpack.encode(Greeting("bob"))), request(GREET, 104)]),
    ("resume", 0),
    ("shutdown",),
    ("frames", [request(SLOW, 105), request(ECHO, 106), raw_header(REPLY, 0, 1), ping(107)]),
    ("frames", [request(ECHO, 108)]),
    ("resume", 0),
]


@pytest.mark.c_extension
@pytest.mark.parametrize("debug", [False, True])
def test_dispatcher_same_in_both_fixed_script(debug: bool) -> None:
    run = assert_same_runs(FIXED_SCRIPT, debug=debug)
    assert run.stats["malformed"] == 1
    assert run.stats["internal_errors"] >= 5
    assert run.logs  # the internal errors were logged, alike


@st.composite
def random_frames(draw: st.DrawFn) -> bytes:
    """A frame a client may send: mostly requests, some control, some malformed."""
    what = draw(st.sampled_from(["request"] * 6 + ["control", "malformed", "raw"]))
    if what == "request":
        type_ = draw(st.sampled_from(TYPES))
        id_ = draw(st.sampled_from([0, 1, 2, 3, MAX_ID]) | ids)
        deadline = 0
        if type_ not in SUSPENDING:  # a suspended deadline needs a running loop
            deadline = draw(st.sampled_from([0, 0, 0, 1, 2, 60_000]))
        if type_ == POINT:
            body = draw(
                st.builds(
                    struct.pack,
                    st.just("!ii"),
                    st.integers(-(2**31), 2**31 - 1),
                    st.integers(-(2**31), 2**31 - 1),
                )
                | st.binary(max_size=12)
            )
        elif type_ == GREET:
            body = draw(
                st.builds(lambda name: msgspec.msgpack.encode(Greeting(name)), st.text(max_size=8))
                | st.binary(max_size=12)
            )
        else:
            body = draw(st.binary(max_size=12))
        return request(type_, id_, body, deadline)
    if what == "control":
        code = draw(st.sampled_from([PING, PING, PONG, DRAIN, 0, 200]))
        return raw_header(CONTROL, code, draw(ids)) + draw(st.sampled_from([b"", b"x"]))
    if what == "malformed":
        return draw(malformed_frames())
    data = draw(st.binary(min_size=0, max_size=20))
    if len(data) >= HEADER_SIZE:
        kind, flags, type_, _, deadline = HEADER.unpack_from(data)
        if kind == REQUEST and not flags and type_ in SUSPENDING and deadline:
            data = data[:8] + bytes(4) + data[12:]  # as above: no deadline on those
    return data


@st.composite
def malformed_frames(draw: st.DrawFn) -> bytes:
    """A frame a server refuses: each rule of wire.py broken, and the kinds it never accepts."""
    rule = draw(st.sampled_from(["short", "kind", "flags", "deadline", "error", "reply"]))
    type_, id_ = draw(st.sampled_from(TYPES)), draw(ids)
    if rule == "short":
        return draw(st.binary(max_size=HEADER_SIZE - 1))
    if rule == "kind":
        kind = draw(st.sampled_from([0, 5, 6, 0x80, 0xFF]) | st.integers(5, 255))
        return raw_header(kind, type_, id_)
    if rule == "flags":
        kind = draw(kinds)
        flags = draw(st.integers(1, 255))
        return raw_header(kind, type_, id_, flags=flags) + b"\x00\x01"
    if rule == "deadline":
        kind = draw(st.sampled_from([REPLY, ERROR, CONTROL]))
        return raw_header(kind, type_, id_, draw(st.integers(1, 0xFFFFFFFF))) + b"\x00\x01"
    if rule == "error":  # without its 2-byte code, or with it (a server takes no replies)
        return raw_header(ERROR, type_, id_) + draw(st.binary(max_size=4))
    return raw_header(REPLY, type_, id_) + draw(st.binary(max_size=4))


steps = st.one_of(
    st.tuples(st.just("frames"), st.lists(random_frames(), min_size=1, max_size=6)),
    st.tuples(st.just("resume"), st.integers(0, 3)),
    st.tuples(st.just("shutdown")),
)


@pytest.mark.c_extension
@SETTINGS
@given(
    script=st.lists(steps, min_size=1, max_size=8),
    max_in_flight=st.sampled_from([1, 2, 64]),
)
def test_dispatcher_same_in_both_random_scripts(script: list[Step], max_in_flight: int) -> None:
    assert_same_runs(script, max_in_flight)


@pytest.mark.c_extension
@SETTINGS
@given(
    before=st.lists(random_frames(), max_size=6),
    bad=malformed_frames(),
    after=st.lists(random_frames(), max_size=3),
)
def test_dispatcher_same_in_both_malformed_in_a_batch(
    before: list[bytes], bad: bytes, after: list[bytes]
) -> None:
    # Whatever came before it, a malformed header fails the connection alike
    # (unless an earlier malformed frame of `before` did): the same answers
    # sent, the same HeaderError, the same counters.
    run = assert_same_runs([("frames", [*before, bad, *after]), ("frames", [ping(1)])], 64)
    assert run.stats["malformed"] == 1
    assert run.events[-1] == ("returned", None)
    failures = [e for e in run.events if e[0] == "framing_failed"]
    assert len(failures) == 1 and failures[0][1] is HeaderError
