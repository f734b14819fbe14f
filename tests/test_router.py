"""The router as a user sees it: typed messages, ids, states, deadlines, errors, drain.

Servers are ``fastnet.Server(router, ...)`` in-process on 127.0.0.1 port 0;
clients are ``fastnet.open_channel`` (a ``Channel``) or, where a test needs
byte-level control, a raw ``fastnet.connect(..., framing=router.framing)``
with hand-built frames. Every in-process test runs on both codec backends and
both event loops (``arun``; the router's per-frame path follows the backend);
the process test runs ``fastnet serve router_app:router`` on both as well
(``process_variant``). The pipelined and drain tests also run over TLS.

Routers are made inside each scenario: a router binds its per-frame path
(C or Python) when its server is made, under the ``codec`` fixture.

Four tests began as strict xfails, each a bug this file found (a handler's own
CancelledError in its first step, the deadline of a request held at
max_in_flight, a reply over the frame limit, a slow reader of suspended
handlers' replies); they are fixed and pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import msgspec
import pytest
import router_app
from test_server_support import Runner, server_process, wait_until
from tls_support import TLSCerts, make_certs

import fastnet
from fastnet import ConnectionBrokenError, framing, wire
from fastnet.bodies import Msgpack, Packed

# The loop/backend fixtures (arun, loop_name, process_variant) live there.
pytest_plugins = ["test_server_support"]

# Bound on any single wait for an answer.
READ_TIMEOUT = 5.0

# Message types of the raw-bodied routers the tests build.
ECHO = 1
SLEEP = 2  # async: sleeps float(body) seconds, answers b"slept " + body
SLEEP_SYNC = 3  # plain: blocks float(body) seconds, answers b"done"
NOTE = 4  # plain: records the body, answers None (an empty reply)
BOOM = 5  # plain: raises ValueError
REFUSE = 6  # plain: raises RequestError(code=1000)


# ------------------------------------------------------------------ helpers


@dataclasses.dataclass(frozen=True)
class Answer:
    """A message a raw client read, its header parsed (and an error reply's body)."""

    kind: int
    type: int
    id: int
    body: bytes
    code: int | None = None
    message: str | None = None


def parse(frame: bytes) -> Answer:
    kind, type_, id_, deadline = framing.parse_header(frame)
    assert deadline == 0, "only a request carries a deadline"
    body = bytes(frame[wire.HEADER_SIZE :])
    if kind == wire.ERROR:
        code, message = framing.parse_error_body(body)
        return Answer(kind, type_, id_, body, code, message)
    return Answer(kind, type_, id_, body)


def request(type_: int, id_: int, body: bytes = b"", deadline: int = 0) -> bytes:
    """A request frame's content (the length prefix is the connection's)."""
    return framing.encode_message(wire.REQUEST, type_, id_, deadline, body)


def framed(message: bytes) -> bytes:
    """A message with its 4-byte length prefix: the bytes on the wire."""
    return len(message).to_bytes(4, "big") + message


async def answers(conn: fastnet.Connection, count: int) -> list[Answer]:
    """Read exactly ``count`` messages (fail if more come in the same batch)."""
    got: list[Answer] = []
    while len(got) < count:
        batch = await asyncio.wait_for(conn.recv_batch(), READ_TIMEOUT)
        got += [parse(frame) for frame in batch]
    assert len(got) == count, f"expected {count} answers, got {got}"
    return got


async def quiet(conn: fastnet.Connection, seconds: float) -> list[Answer]:
    """Everything that arrives within ``seconds`` (up to the end of the input)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    got: list[Answer] = []
    while (left := end - loop.time()) > 0:
        try:
            batch = await asyncio.wait_for(conn.recv_batch(), left)
        except (asyncio.TimeoutError, ConnectionBrokenError):
            break
        got += [parse(frame) for frame in batch]
    return got


def reply(id_: int, body: bytes, type_: int = 0) -> Answer:
    return Answer(wire.REPLY, type_, id_, body)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """How a test's server listens and its clients connect: plain TCP or TLS."""

    name: str
    server: dict[str, Any]
    client: dict[str, Any]


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    return make_certs(tmp_path_factory.mktemp("router-tls"))


@pytest.fixture(params=["tcp", "tls"])
def endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """Plain TCP, or TLS (trustme certificates, the name checked as ``localhost``)."""
    if request.param == "tcp":
        return Endpoint("tcp", {}, {})
    certs: TLSCerts = request.getfixturevalue("tls_certs")
    return Endpoint(
        "tls",
        {"ssl": certs.server_context()},
        {"ssl": certs.client_context(), "server_hostname": "localhost"},
    )


PLAIN = Endpoint("tcp", {}, {})


@contextlib.asynccontextmanager
async def serving(
    router: fastnet.Router, endpoint: Endpoint = PLAIN, **kwargs: Any
) -> AsyncIterator[fastnet.Server]:
    """A started router server on 127.0.0.1 port 0, shut down on exit."""
    kwargs.setdefault("drain_timeout", 5.0)
    server = fastnet.Server(router, "127.0.0.1", 0, **endpoint.server, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


async def raw_client(
    server: fastnet.Server, router: fastnet.Router, endpoint: Endpoint = PLAIN
) -> fastnet.Connection:
    """A plain fastnet connection speaking the router's framing (no Channel)."""
    return await fastnet.connect(
        "127.0.0.1", server.port, framing=router.framing, **endpoint.client
    )


async def channel_to(
    server: fastnet.Server, router: fastnet.Router, endpoint: Endpoint = PLAIN
) -> fastnet.Channel:
    return await fastnet.open_channel("127.0.0.1", server.port, router=router, **endpoint.client)


def basic_router(**kwargs: Any) -> tuple[fastnet.Router, dict[str, Any]]:
    """A raw-bodied router with the ECHO..REFUSE handlers; ``seen`` records what they saw."""
    router = fastnet.Router(**kwargs)
    seen: dict[str, Any] = {"notes": [], "conns": [], "finally": []}

    @router.handler(ECHO)
    def echo(conn: fastnet.Connection, body: bytes) -> bytes:
        seen["conns"].append(conn)
        return body

    @router.handler(SLEEP)
    async def sleep(conn: fastnet.Connection, body: bytes) -> bytes:
        try:
            await asyncio.sleep(float(body))
            return b"slept " + body
        finally:
            seen["finally"].append(body)

    @router.handler(SLEEP_SYNC)
    def sleep_sync(conn: fastnet.Connection, body: bytes) -> bytes:
        time.sleep(float(body))
        return b"done"

    @router.handler(NOTE)
    def note(conn: fastnet.Connection, body: bytes) -> None:
        seen["notes"].append(body)

    @router.handler(BOOM)
    def boom(conn: fastnet.Connection, body: bytes) -> bytes:
        raise ValueError("secret detail " + body.decode())

    @router.handler(REFUSE)
    def refuse(conn: fastnet.Connection, body: bytes) -> bytes:
        raise fastnet.RequestError("refused: " + body.decode(), code=1000)

    return router, seen


def elapsed_since(start: float) -> float:
    return asyncio.get_running_loop().time() - start


# ------------------------------------------------------------ pipelining


def test_pipelined_requests_are_answered_out_of_order_and_matched_by_id(
    arun: Runner[Any], endpoint: Endpoint
) -> None:
    async def scenario() -> None:
        router, _ = basic_router()
        async with serving(router, endpoint) as server:
            # On the wire: four requests in one write, the slowest first.
            conn = await raw_client(server, router, endpoint)
            delays = {1: b"0.45", 2: b"0.15", 3: b"0.3", 4: b"0.05"}
            conn.send_many([request(SLEEP, id_, body) for id_, body in delays.items()])
            conn.send(request(ECHO, 5, b"inline"))
            got = await answers(conn, 5)
            order = [answer.id for answer in got]
            assert order != [1, 2, 3, 4, 5]
            # The plain handler answers inline; the others as their sleeps end.
            assert order == [5, 4, 2, 3, 1]
            assert {answer.id: answer for answer in got} == {
                **{id_: reply(id_, b"slept " + body) for id_, body in delays.items()},
                5: reply(5, b"inline"),
            }
            assert await quiet(conn, 0.1) == []
            conn.close()
            await conn.wait_closed()

            # Through a Channel: each caller gets its own answer.
            async with await channel_to(server, router, endpoint) as channel:
                bodies = [b"0.3", b"0.0", b"0.2", b"0.1", b"0.05"]
                finished: list[bytes] = []

                async def call(body: bytes) -> bytes:
                    result: bytes = await channel.call(body, type=SLEEP)
                    finished.append(body)
                    return result

                results = await asyncio.gather(*(call(body) for body in bodies))
                assert results == [b"slept " + body for body in bodies]
                assert finished == sorted(bodies, key=float)  # out of order
                assert channel.in_flight == 0

    arun(scenario())


# ------------------------------------------------------------ one-way


def test_one_way_messages_are_handled_and_never_answered(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router, seen = basic_router(states=("new", "authenticated"))

        @router.handler(7, states="authenticated")
        def secret(conn: fastnet.Connection, body: bytes) -> bytes:
            return b"secret"

        async with serving(router) as server:
            async with await channel_to(server, router) as channel:
                channel.send(b"via channel", type=NOTE)
                await wait_until(lambda: seen["notes"] == [b"via channel"])

            conn = await raw_client(server, router)
            conn.send_many(
                [
                    request(NOTE, 0, b"one"),
                    request(ECHO, 0, b"no reply"),  # a handler's result is dropped
                    request(SLEEP, 0, b"0.05"),  # an async handler's too
                    request(999, 0),  # unknown type
                    request(BOOM, 0, b"x"),  # internal error
                    request(REFUSE, 0, b"x"),  # RequestError
                    request(7, 0),  # forbidden in state "new"
                    request(SLEEP_SYNC, 0, b"0.02", deadline=1),  # deadline exceeded
                    request(NOTE, 0, b"two"),
                ]
            )
            await wait_until(lambda: seen["notes"] == [b"via channel", b"one", b"two"])
            await wait_until(lambda: seen["finally"] == [b"0.05"])
            assert await quiet(conn, 0.2) == []  # nothing at all came back
            # Each was handled (and counted) as a request with an id would be.
            stats = router.stats()
            assert stats["unknown_type"] == 1
            assert stats["internal_errors"] == 1
            assert stats["request_errors"] == 1
            assert stats["forbidden"] == 1
            assert stats["deadline_exceeded"] == 1
            # The connection is fine: a request with an id is answered, alone.
            conn.send(request(ECHO, 9, b"after"))
            assert await answers(conn, 1) == [reply(9, b"after")]
            assert await quiet(conn, 0.1) == []
            conn.close()
            await conn.wait_closed()

    arun(scenario())


# ------------------------------------------------------------ in-flight limit


def test_the_in_flight_limit_holds_requests_and_stops_reading(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router = fastnet.Router(max_in_flight=2)
        release = asyncio.Event()
        started: list[int] = []
        conns: list[fastnet.Connection] = []

        @router.handler(1)
        async def blocked(conn: fastnet.Connection, body: bytes) -> bytes:
            conns.append(conn)
            started.append(int(body[:8]))
            await release.wait()
            return b"ok " + body[:8]

        async with serving(router) as server:
            conn = await raw_client(server, router)
            first = [request(1, i, b"%08d" % i) for i in range(1, 11)]
            conn.send_many(first)
            await wait_until(lambda: router.stats()["held"] >= 1, what="a held batch")
            server_conn = conns[0]
            assert router.in_flight(server_conn) == 2
            assert started == [1, 2]
            # The client keeps sending; the server reads none of it.
            read_before = server_conn.bytes_in
            padding = b"." * 4000
            more = [request(1, i, b"%08d" % i + padding) for i in range(11, 17)]
            for frame in more:
                conn.send(frame)
                await asyncio.sleep(0.02)
            for _ in range(5):
                await asyncio.sleep(0.03)
                assert router.in_flight(server_conn) == 2
                assert server_conn.bytes_in == read_before
            assert not server_conn.transport.is_reading()
            assert started == [1, 2]
            assert await quiet(conn, 0.05) == []

            release.set()
            got = await answers(conn, 16)
            ids = sorted(answer.id for answer in got)
            assert ids == list(range(1, 17))  # none lost, none twice
            assert all(answer == reply(answer.id, b"ok %08d" % answer.id) for answer in got)
            assert await quiet(conn, 0.2) == []
            assert router.in_flight(server_conn) == 0
            assert server_conn.bytes_in > read_before
            assert sorted(started) == list(range(1, 17))
            conn.close()
            await conn.wait_closed()

    arun(scenario())


# ------------------------------------------------------------ deadlines


def test_deadlines_on_the_wire(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router, seen = basic_router()
        async with serving(router) as server:
            conn = await raw_client(server, router)
            # A plain handler that overruns: DEADLINE_EXCEEDED, and only that.
            conn.send(request(SLEEP_SYNC, 1, b"0.15", deadline=50))
            (late,) = await answers(conn, 1)
            assert (late.kind, late.id, late.type) == (wire.ERROR, 1, SLEEP_SYNC)
            assert late.code == wire.ErrorCode.DEADLINE_EXCEEDED
            assert await quiet(conn, 0.3) == []

            # An async handler that overruns: cancelled (its finally runs),
            # answered DEADLINE_EXCEEDED once, at the deadline.
            start = asyncio.get_running_loop().time()
            conn.send(request(SLEEP, 2, b"5", deadline=100))
            (late,) = await answers(conn, 1)
            assert 0.08 <= elapsed_since(start) < 1.5
            assert (late.kind, late.id, late.code) == (
                wire.ERROR,
                2,
                wire.ErrorCode.DEADLINE_EXCEEDED,
            )
            await wait_until(lambda: seen["finally"] == [b"5"])
            assert await quiet(conn, 0.3) == []

            # Within their deadlines: answered as usual.
            conn.send_many(
                [
                    request(SLEEP, 3, b"0.02", deadline=2000),
                    request(SLEEP_SYNC, 4, b"0", deadline=2000),
                    request(ECHO, 5, b"quick", deadline=1),
                ]
            )
            got = sorted(await answers(conn, 3), key=lambda answer: answer.id)
            assert got == [reply(3, b"slept 0.02"), reply(4, b"done"), reply(5, b"quick")]
            assert await quiet(conn, 0.1) == []
            assert router.stats()["deadline_exceeded"] == 2
            conn.close()
            await conn.wait_closed()

    arun(scenario())


def test_a_channel_timeout_raises_deadline_exceeded(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router, seen = basic_router()
        async with serving(router) as server, await channel_to(server, router) as channel:
            start = asyncio.get_running_loop().time()
            with pytest.raises(fastnet.DeadlineExceeded) as info:
                await channel.call(b"5", type=SLEEP, timeout=0.1)
            assert isinstance(info.value, TimeoutError)
            assert info.value.code == wire.ErrorCode.DEADLINE_EXCEEDED
            assert elapsed_since(start) < 1.5
            # The server cancelled the handler too (the deadline was sent).
            await wait_until(lambda: seen["finally"] == [b"5"])
            with pytest.raises(TimeoutError):
                await channel.call(b"5", type=SLEEP, timeout=0.05)
            await asyncio.sleep(0.1)  # the server's own DEADLINE_EXCEEDED came and went
            assert await channel.call(b"after", type=ECHO, timeout=2) == b"after"
            assert channel.in_flight == 0 and not channel.closed

    arun(scenario())


def test_a_late_reply_is_dropped_and_later_calls_still_work(arun: Runner[Any]) -> None:
    # A hand-written server that ignores deadlines: the reply to a call that
    # timed out does come, late; the channel drops it.
    deadlines: list[int] = []
    sent: list[int] = []

    async def answer_later(conn: fastnet.Connection, id_: int, body: bytes) -> None:
        await asyncio.sleep(float(body))
        conn.send(framing.encode_message(wire.REPLY, 0, id_, 0, b"late " + body))
        sent.append(id_)

    async def careless(conn: fastnet.Connection) -> None:
        async for frame in conn:
            _, _, id_, deadline = framing.parse_header(frame)
            deadlines.append(deadline)
            conn.spawn(answer_later(conn, id_, bytes(frame[wire.HEADER_SIZE :])))

    async def scenario() -> None:
        router = fastnet.Router()
        server = fastnet.Server(careless, "127.0.0.1", 0, framing=router.framing)
        await server.start()
        try:
            async with await channel_to(server, router) as channel:
                with pytest.raises(fastnet.DeadlineExceeded):
                    await channel.call(b"0.3", type=1, timeout=0.1)
                assert deadlines == [100]  # the timeout went out as the deadline
                await wait_until(lambda: len(sent) == 1)
                await asyncio.sleep(0.05)  # the late reply is read (and dropped)
                assert not channel.closed and channel.in_flight == 0
                assert await channel.call(b"0", type=1, timeout=2) == b"late 0"
                assert await channel.call(b"0.01", type=1) == b"late 0.01"
                assert deadlines == [100, 2000, 0]
        finally:
            await server.shutdown()

    arun(scenario())


# ------------------------------------------------------------ protocol states


def test_protocol_states_are_per_connection(arun: Runner[Any]) -> None:
    LOGIN, SECRET, WHOAMI = 10, 11, 12

    async def scenario() -> None:
        router = fastnet.Router(states=("new", "authenticated"))
        conns: list[fastnet.Connection] = []

        @router.handler(LOGIN, states="new")
        def login(conn: fastnet.Connection, body: bytes) -> bytes:
            router.set_state(conn, "authenticated")
            return b"welcome"

        @router.handler(SECRET, states=("authenticated",))
        def secret(conn: fastnet.Connection, body: bytes) -> bytes:
            return b"the secret"

        @router.handler(WHOAMI)
        def whoami(conn: fastnet.Connection, body: bytes) -> bytes:
            conns.append(conn)
            return router.state_of(conn).encode()

        async with serving(router) as server:
            async with (
                await channel_to(server, router) as alice,
                await channel_to(server, router) as bob,
            ):
                assert await alice.call(b"", type=WHOAMI) == b"new"
                with pytest.raises(fastnet.Forbidden) as info:
                    await alice.call(b"", type=SECRET)
                assert info.value.code == 6 == wire.ErrorCode.FORBIDDEN
                assert "'new'" in info.value.message
                assert await alice.call(b"", type=LOGIN) == b"welcome"
                assert await alice.call(b"", type=SECRET) == b"the secret"
                assert await alice.call(b"", type=WHOAMI) == b"authenticated"
                # A second login is not allowed any more.
                with pytest.raises(fastnet.Forbidden):
                    await alice.call(b"", type=LOGIN)

                # Bob's connection starts in "new", whatever Alice did.
                assert await bob.call(b"", type=WHOAMI) == b"new"
                with pytest.raises(fastnet.Forbidden):
                    await bob.call(b"", type=SECRET)
                assert router.state_of(conns[0]) == "authenticated"
                assert router.state_of(conns[-1]) == "new"
                assert router.stats()["forbidden"] == 3
                with pytest.raises(ValueError, match="unknown protocol state"):
                    router.set_state(conns[0], "admin")
                # The server can move a connection back.
                router.set_state(conns[0], "new")
                with pytest.raises(fastnet.Forbidden):
                    await alice.call(b"", type=SECRET)
                assert router.stats()["forbidden"] == 4

            # Pipelined in one write: each message is checked in the state
            # the ones before it left (a plain login takes effect at once).
            conn = await raw_client(server, router)
            conn.send_many([request(SECRET, 1), request(LOGIN, 2), request(SECRET, 3)])
            got = await answers(conn, 3)
            assert [(a.id, a.code) for a in got] == [
                (1, wire.ErrorCode.FORBIDDEN),
                (2, None),
                (3, None),
            ]
            assert got[2] == reply(3, b"the secret")
            conn.close()
            await conn.wait_closed()

    arun(scenario())


# ------------------------------------------------------------ errors


class Point(msgspec.Struct):
    x: int
    y: int


class Norm(msgspec.Struct):
    squared: int


class Pair(NamedTuple):
    a: int
    b: int
    layout = "!ii"


class PairSum(NamedTuple):
    total: int
    layout = "!q"


@dataclasses.dataclass
class Small:
    value: int
    layout: ClassVar[str] = "!B"


def test_error_replies_are_typed(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router, _ = basic_router()

        @router.handler(20)
        def overloaded(conn: fastnet.Connection, body: bytes) -> bytes:
            raise fastnet.Overloaded("busy")

        @router.handler(21)
        def not_text(conn: fastnet.Connection, body: bytes) -> bytes:
            raise fastnet.RequestError(404, code=1404)  # type: ignore[arg-type]

        packed = fastnet.Router(codec=Packed())
        packed.message(1)(Pair)
        packed.message(2, reply_only=True)(PairSum)
        packed.handler(Pair)(lambda conn, msg: PairSum(msg.a + msg.b))
        msgpack = fastnet.Router(codec=Msgpack())
        msgpack.message(1)(Point)
        msgpack.message(2, reply_only=True)(Norm)
        msgpack.handler(Point)(lambda conn, msg: Norm(msg.x * msg.x + msg.y * msg.y))

        async with (
            serving(router) as raw_server,
            serving(packed) as packed_server,
            serving(msgpack) as msgpack_server,
            await channel_to(raw_server, router) as channel,
            await channel_to(packed_server, packed) as packed_channel,
            await channel_to(msgpack_server, msgpack) as msgpack_channel,
        ):
            with pytest.raises(fastnet.UnknownMessageType) as unknown:
                await channel.call(b"", type=999)
            assert unknown.value.code == wire.ErrorCode.UNKNOWN_TYPE == 1
            assert "999" in unknown.value.message

            with pytest.raises(fastnet.RequestError) as refused:
                await channel.call(b"nope", type=REFUSE)
            assert type(refused.value) is fastnet.RequestError
            assert refused.value.code == 1000
            assert refused.value.message == "refused: nope"
            # A router code raised by the handler: its class on the client.
            with pytest.raises(fastnet.Overloaded) as busy:
                await channel.call(b"", type=20)
            assert (busy.value.code, busy.value.message) == (wire.ErrorCode.OVERLOADED, "busy")
            # A message that is not a str is sent as its str (the connection stays).
            with pytest.raises(fastnet.RequestError) as not_text:
                await channel.call(b"", type=21)
            assert (not_text.value.code, not_text.value.message) == (1404, "404")

            # A body of the wrong size for the layout.
            with pytest.raises(fastnet.DecodeFailed) as bad_size:
                await packed_channel.call(b"\x00\x01\x02", type=1)
            assert bad_size.value.code == wire.ErrorCode.DECODE_ERROR == 2
            assert await packed_channel.call(Pair(2, 3)) == PairSum(5)

            # Not MessagePack at all, and MessagePack of the wrong shape.
            for garbage in (b"\xc1\xc1\xc1", msgspec.msgpack.encode({"x": "not an int"})):
                with pytest.raises(fastnet.DecodeFailed):
                    await msgpack_channel.call(garbage, type=1)
            assert await msgpack_channel.call(Point(3, 4)) == Norm(25)

            assert router.stats()["unknown_type"] == 1
            assert router.stats()["request_errors"] == 3
            assert packed.stats()["decode_errors"] == 1
            assert msgpack.stats()["decode_errors"] == 2

    arun(scenario())


def test_an_internal_error_hides_its_text_is_logged_and_keeps_the_connection(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        router, _ = basic_router()
        async with serving(router) as server, await channel_to(server, router) as channel:
            with pytest.raises(fastnet.InternalError) as info:
                await channel.call(b"42", type=BOOM)
            assert info.value.code == wire.ErrorCode.INTERNAL == 4
            assert info.value.message == "internal error"
            assert "secret" not in str(info.value)
            assert router.stats()["internal_errors"] == 1
            assert await channel.call(b"still open", type=ECHO) == b"still open"
            assert server.stats()["handler_errors"] == 0  # not a connection failure

    with caplog.at_level(logging.ERROR, logger="fastnet"):
        arun(scenario())
    logged = [r for r in caplog.records if "secret detail 42" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is ValueError


def test_debug_sends_the_exception_text(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        router, _ = basic_router(debug=True)
        async with serving(router) as server, await channel_to(server, router) as channel:
            with pytest.raises(fastnet.InternalError) as info:
                await channel.call(b"7", type=BOOM)
            assert info.value.message == "ValueError: secret detail 7"
            assert await channel.call(b"x", type=ECHO) == b"x"

    with caplog.at_level(logging.CRITICAL, logger="fastnet"):
        arun(scenario())


def test_an_unencodable_reply_is_an_internal_error(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        router = fastnet.Router(codec=Packed())
        router.message(1)(Pair)
        router.message(2, reply_only=True)(Small)

        @router.handler(Pair)
        def small(conn: fastnet.Connection, msg: Pair) -> Any:
            if msg.a == 0:
                return object()  # neither bytes nor a declared message
            return Small(msg.b)  # "!B": 0-255 only

        @router.handler(3)
        async def number(conn: fastnet.Connection, body: bytes) -> Any:
            await asyncio.sleep(0)
            return 12345  # from an async handler that suspended

        async with serving(router) as server, await channel_to(server, router) as channel:
            assert await channel.call(Pair(1, 200)) == Small(200)
            for bad in (Pair(0, 0), Pair(1, 300)):
                with pytest.raises(fastnet.InternalError) as info:
                    await channel.call(bad)
                assert info.value.message == "internal error"
            with pytest.raises(fastnet.InternalError):
                await channel.call(b"", type=3)
            assert router.stats()["internal_errors"] == 3
            assert await channel.call(Pair(1, 7)) == Small(7)

    with caplog.at_level(logging.ERROR, logger="fastnet"):
        arun(scenario())
    assert sum("cannot be encoded" in r.getMessage() for r in caplog.records) == 3


# A handler that suspended runs in a task; on 3.10 a CancelledError it raises
# cannot be told from the task's cancellation (Task.cancelling() is 3.11+).
TASK_KNOWS_ITS_CANCELLATION = sys.version_info >= (3, 11)


def test_a_handler_cancelled_from_inside_is_answered(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # A CancelledError the handler raises itself (something it awaited was
    # cancelled; the connection is not going away) is a failure like any
    # other: answered INTERNAL, exactly once, and the connection stays open.
    async def scenario() -> None:
        router, _ = basic_router()

        @router.handler(30)
        async def awaits_a_cancelled_future(conn: fastnet.Connection, body: bytes) -> bytes:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            if body == b"later":
                loop.call_later(0.05, future.cancel)  # after the handler suspended
            else:
                future.cancel()  # in its first step
            await future
            return b"unreachable"

        async with serving(router) as server:
            conn = await raw_client(server, router)
            conn.send(request(30, 1, b"now", deadline=5000))
            if TASK_KNOWS_ITS_CANCELLATION:
                conn.send(request(30, 2, b"later"))
                conn.send(request(30, 3, b"later", deadline=5000))
            got = sorted(await answers(conn, len(ids)), key=lambda answer: answer.id)
            assert [(a.kind, a.id, a.code, a.message) for a in got] == [
                (wire.ERROR, id_, wire.ErrorCode.INTERNAL, "internal error") for id_ in ids
            ]
            assert await quiet(conn, 0.2) == []
            conn.send(request(ECHO, 4, b"open"))
            assert await answers(conn, 1) == [reply(4, b"open")]
            assert router.stats()["internal_errors"] == len(ids)
            assert server.stats()["handler_errors"] == 0
            conn.close()
            await conn.wait_closed()

    ids = [1, 2, 3] if TASK_KNOWS_ITS_CANCELLATION else [1]
    with caplog.at_level(logging.ERROR, logger="fastnet"):
        arun(scenario())
    assert sum("raised CancelledError" in r.getMessage() for r in caplog.records) == len(ids)


def test_a_cancelled_error_in_a_handlers_first_step_is_answered(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        router, _ = basic_router()

        @router.handler(31)
        async def awaits_a_cancelled_future(conn: fastnet.Connection, body: bytes) -> bytes:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future
            return b"unreachable"

        @router.handler(32)
        def raises_cancelled(conn: fastnet.Connection, body: bytes) -> bytes:
            raise asyncio.CancelledError

        async with serving(router) as server:
            conn = await raw_client(server, router)
            conn.send_many([request(31, 1), request(32, 2), request(ECHO, 3, b"open")])
            got = await quiet(conn, 0.5)
            assert [(a.id, a.code) for a in got] == [
                (1, wire.ErrorCode.INTERNAL),
                (2, wire.ErrorCode.INTERNAL),
                (3, None),
            ]
            conn.close()
            await conn.wait_closed()

    with caplog.at_level(logging.CRITICAL, logger="fastnet"):
        arun(scenario())


def test_a_held_request_keeps_the_deadline_counted_from_its_reading(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router = fastnet.Router(max_in_flight=1)
        release = asyncio.Event()

        @router.handler(1)
        async def blocked(conn: fastnet.Connection, body: bytes) -> bytes:
            await release.wait()
            return b"released"

        @router.handler(2)
        def quick(conn: fastnet.Connection, body: bytes) -> bytes:
            return b"quick"

        async with serving(router) as server, await raw_client(server, router) as conn:
            # One write: the second is read with the first, and held.
            conn.send_many([request(1, 1), request(2, 2, deadline=100)])
            await wait_until(lambda: router.stats()["held"] == 1)
            await asyncio.sleep(0.3)  # its deadline passes while it waits
            release.set()
            got = sorted(await answers(conn, 2), key=lambda answer: answer.id)
            assert got[0] == reply(1, b"released")
            assert (got[1].kind, got[1].id, got[1].code) == (
                wire.ERROR,
                2,
                wire.ErrorCode.DEADLINE_EXCEEDED,
            )

    arun(scenario())


def test_an_oversized_reply_is_an_internal_error(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        router, _ = basic_router(max_message_size=1000)

        @router.handler(40)
        def big(conn: fastnet.Connection, body: bytes) -> bytes:
            return b"x" * 2000

        @router.handler(41)
        async def big_later(conn: fastnet.Connection, body: bytes) -> bytes:
            await asyncio.sleep(0.01)
            return b"x" * 2000

        # The client takes frames of any size.
        big_frames = fastnet.LengthPrefixed(max_frame=1 << 20)
        async with (
            serving(router) as server,
            await fastnet.connect("127.0.0.1", server.port, framing=big_frames) as conn,
        ):
            conn.send_many([request(40, 1), request(ECHO, 2, b"same batch")])
            got = await quiet(conn, 0.3)
            assert [(a.id, a.code) for a in got] == [(1, wire.ErrorCode.INTERNAL), (2, None)]
            conn.send(request(41, 3))
            got = await quiet(conn, 0.3)
            assert [(a.id, a.code) for a in got] == [(3, wire.ErrorCode.INTERNAL)]
            conn.send(request(ECHO, 4, b"open"))
            assert await answers(conn, 1) == [reply(4, b"open")]

    with caplog.at_level(logging.CRITICAL, logger="fastnet"):
        arun(scenario())


def test_a_slow_reader_gets_every_answer_of_async_handlers(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        router = fastnet.Router()

        @router.handler(1)
        async def medium(conn: fastnet.Connection, body: bytes) -> bytes:
            await asyncio.sleep(0.01)
            return b"y" * 900

        async with serving(router, max_write_buffer=4096) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.transport.pause_reading()  # a client slow to read its answers
                writer.write(b"".join(framed(request(1, id_)) for id_ in range(1, 201)))
                await asyncio.sleep(0.5)
                writer.transport.resume_reading()
                decoder = fastnet.LengthPrefixed().decoder()
                ids: list[int] = []
                while len(ids) < 200:
                    data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
                    if not data:
                        break
                    ids += [parse(frame).id for frame in decoder.feed(data)]
                assert sorted(ids) == list(range(1, 201))
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    with caplog.at_level(logging.CRITICAL, logger="fastnet"):
        arun(scenario())


# ------------------------------------------------------------ framing errors


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(struct.pack(">BBHII", wire.REQUEST, 1, ECHO, 3, 0), id="flags"),
        pytest.param(b"\x01\x00\x00\x01\x00", id="short"),
        pytest.param(struct.pack(">BBHII", wire.REPLY, 0, 0, 3, 0), id="reply-kind"),
        pytest.param(struct.pack(">BBHII", 9, 0, ECHO, 3, 0), id="unknown-kind"),
    ],
)
def test_a_malformed_header_closes_after_the_answers_before_it(
    arun: Runner[Any], bad: bytes
) -> None:
    async def scenario() -> None:
        router, _ = basic_router()
        async with serving(router) as server, await channel_to(server, router) as witness:
            assert await witness.call(b"w", type=ECHO) == b"w"
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"".join(
                    framed(message)
                    for message in (request(ECHO, 1, b"a"), request(ECHO, 2, b"b"), bad)
                )
            )
            decoder = fastnet.LengthPrefixed().decoder()
            received: list[bytes] = []
            while True:
                data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
                if not data:
                    break  # closed by the server, in order (FIN, not a reset)
                received += decoder.feed(data)
            assert [parse(frame) for frame in received] == [reply(1, b"a"), reply(2, b"b")]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await wait_until(lambda: server.stats()["frame_errors"] == 1)
            assert router.stats()["malformed"] == 1
            # The other connection is unaffected.
            assert await witness.call(b"still", type=ECHO) == b"still"
            assert await witness.ping(timeout=READ_TIMEOUT) >= 0

    arun(scenario())


# ------------------------------------------------------------ control messages


def test_ping_pong(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router, _ = basic_router()
        async with serving(router) as server:
            async with await channel_to(server, router) as channel:
                rtt = await channel.ping(timeout=READ_TIMEOUT)
                assert 0 <= rtt < READ_TIMEOUT
                # Pings interleave with calls in flight.
                slow = asyncio.ensure_future(channel.call(b"0.2", type=SLEEP))
                await channel.ping(timeout=READ_TIMEOUT)
                assert not slow.done()
                assert await slow == b"slept 0.2"
            # On the wire: the pong carries the ping's id; an unknown control
            # code is ignored, and the connection stays open.
            conn = await raw_client(server, router)
            conn.send(framing.pack_header(wire.CONTROL, wire.PING, 77, 0))
            assert await answers(conn, 1) == [Answer(wire.CONTROL, wire.PONG, 77, b"")]
            conn.send(framing.pack_header(wire.CONTROL, 200, 5, 0))
            conn.send(request(ECHO, 6, b"ok"))
            assert await answers(conn, 1) == [reply(6, b"ok")]
            assert router.stats()["pings"] == 3
            conn.close()
            await conn.wait_closed()

    arun(scenario())


# ------------------------------------------------------------ drain


def test_shutdown_drains_a_channel(arun: Runner[Any], endpoint: Endpoint) -> None:
    async def scenario() -> None:
        router, _ = basic_router()  # the default drain grace: 5 s
        server = fastnet.Server(router, "127.0.0.1", 0, drain_timeout=10, **endpoint.server)
        await server.start()
        try:
            channel = await channel_to(server, router, endpoint)
            idle = await channel_to(server, router, endpoint)
            assert await channel.call(b"warm", type=ECHO) == b"warm"
            assert await idle.call(b"warm", type=ECHO) == b"warm"
            in_flight = asyncio.ensure_future(channel.call(b"0.3", type=SLEEP))
            await wait_until(lambda: router.stats()["suspended"] == 1)
            start = asyncio.get_running_loop().time()
            shutdown = asyncio.ensure_future(server.shutdown())

            await asyncio.wait_for(asyncio.shield(channel.drained), READ_TIMEOUT)
            assert channel.draining
            assert not in_flight.done()
            # A channel with nothing due closes at once.
            await asyncio.wait_for(idle.wait_closed(), READ_TIMEOUT)
            assert idle.draining and idle.closed
            assert not shutdown.done()
            with pytest.raises(fastnet.Draining):
                await channel.call(b"new", type=ECHO)
            with pytest.raises(fastnet.Draining):
                channel.send(b"new", type=NOTE)
            assert await asyncio.wait_for(in_flight, READ_TIMEOUT) == b"slept 0.3"

            # Its answers in, the channel closes; the server sees it and is done.
            await asyncio.wait_for(channel.wait_closed(), READ_TIMEOUT)
            assert channel.closed
            await asyncio.wait_for(shutdown, READ_TIMEOUT)
            assert 0.25 <= elapsed_since(start) < 2.0  # not the 5 s grace, not the 10 s
            assert router.stats()["drains_sent"] == 2
            assert server.stats()["active"] == 0
            with pytest.raises(fastnet.Draining):
                await channel.call(b"after", type=ECHO)
        finally:
            await server.shutdown()

    arun(scenario())


def test_a_client_that_ignores_drain_is_closed_after_the_grace(
    arun: Runner[Any], endpoint: Endpoint
) -> None:
    async def scenario() -> None:
        router, _ = basic_router(drain_grace=0.3)
        server = fastnet.Server(router, "127.0.0.1", 0, drain_timeout=10, **endpoint.server)
        await server.start()
        try:
            conn = await raw_client(server, router, endpoint)
            conn.send(request(ECHO, 1, b"a"))
            assert await answers(conn, 1) == [reply(1, b"a")]
            start = asyncio.get_running_loop().time()
            shutdown = asyncio.ensure_future(server.shutdown())
            assert await answers(conn, 1) == [Answer(wire.CONTROL, wire.DRAIN, 0, b"")]
            # Within the grace the server still reads and answers.
            conn.send(request(ECHO, 2, b"b"))
            assert await answers(conn, 1) == [reply(2, b"b")]
            # Then it ends the input and closes.
            with pytest.raises(ConnectionBrokenError):
                await asyncio.wait_for(conn.recv(), READ_TIMEOUT)
            assert 0.25 <= elapsed_since(start) < 2.0
            await asyncio.wait_for(shutdown, READ_TIMEOUT)
            assert elapsed_since(start) < 2.0
            assert router.stats()["drains_sent"] == 1
            conn.close()
            await conn.wait_closed()
        finally:
            await server.shutdown()

    arun(scenario())


# ------------------------------------------------------------ startup checks


def test_startup_checks_name_what_is_wrong(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        router = fastnet.Router(codec=Msgpack())

        @router.message(40)
        class Orphan(msgspec.Struct):
            n: int

        with pytest.raises(ValueError, match=r"Orphan \(40\) has no handler"):
            router.check()
        with pytest.raises(ValueError, match=r"Orphan \(40\) has no handler"):
            fastnet.Server(router, "127.0.0.1", 0)

        # Declared twice: a type for two classes, a class under two types.
        class First(msgspec.Struct):
            n: int

        class Second(msgspec.Struct):
            n: int

        router.message(41)(First)
        with pytest.raises(ValueError, match=r"41.*First.*Second"):
            router.message(41)(Second)
        with pytest.raises(ValueError, match=r"First is declared twice.*41.*42"):
            router.message(42)(First)

        # A handler registered twice names both.
        def first_handler(conn: fastnet.Connection, msg: First) -> None: ...

        def second_handler(conn: fastnet.Connection, msg: First) -> None: ...

        router.handler(First)(first_handler)
        with pytest.raises(ValueError, match=r"first_handler.*second_handler"):
            router.handler(First)(second_handler)

        # Not declared: a TypeError at the decorator.
        class Undeclared(msgspec.Struct):
            n: int

        with pytest.raises(TypeError, match="Undeclared"):
            router.handler(Undeclared)

        # A reply-only class needs no handler; with Orphan's the router is whole.
        router.message(43, reply_only=True)(Second)
        router.handler(Orphan)(lambda conn, msg: Second(msg.n))
        router.check()
        async with serving(router) as server, await channel_to(server, router) as channel:
            assert await channel.call(Orphan(5)) == Second(5)
        # Once a server uses it, the declarations are frozen.
        with pytest.raises(RuntimeError, match="declare everything before"):
            router.message(44)(Undeclared)

    arun(scenario())


# ------------------------------------------------------------ codecs


def test_codecs_end_to_end(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        seen: list[Any] = []

        msgpack = fastnet.Router(codec=Msgpack())
        msgpack.message(1)(Point)
        msgpack.message(2, reply_only=True)(Norm)

        @msgpack.handler(Point)
        async def norm(conn: fastnet.Connection, msg: Point) -> Norm:
            seen.append(msg)
            await asyncio.sleep(0)
            return Norm(msg.x * msg.x + msg.y * msg.y)

        packed = fastnet.Router(codec=Packed())
        packed.message(1)(Pair)
        packed.message(2, reply_only=True)(PairSum)
        packed.message(3, reply_only=True)(Small)

        @packed.handler(Pair)
        def add(conn: fastnet.Connection, msg: Pair) -> Any:
            seen.append(msg)
            return Small(msg.a) if msg.b == 0 else PairSum(msg.a + msg.b)

        @packed.handler(4)
        def untyped(conn: fastnet.Connection, body: bytes) -> Any:
            return None if not body else body[::-1]

        async with (
            serving(msgpack) as msgpack_server,
            serving(packed) as packed_server,
            await channel_to(msgpack_server, msgpack) as msgpack_channel,
            await channel_to(packed_server, packed) as packed_channel,
        ):
            result = await msgpack_channel.call(Point(3, -4))
            assert type(result) is Norm and result == Norm(25)
            results = await asyncio.gather(*(msgpack_channel.call(Point(i, 1)) for i in range(5)))
            assert results == [Norm(i * i + 1) for i in range(5)]

            pair_sum = await packed_channel.call(Pair(-7, 2**31 - 1))
            assert type(pair_sum) is PairSum and pair_sum.total == 2**31 - 8
            small = await packed_channel.call(Pair(255, 0))
            assert type(small) is Small and small.value == 255
            assert await packed_channel.call(b"abc", type=4) == b"cba"
            assert await packed_channel.call(b"", type=4) == b""
            assert type(seen[0]) is Point and seen[0] == Point(3, -4)
            assert Pair(-7, 2**31 - 1) in seen and all(
                type(msg) is Pair for msg in seen if not isinstance(msg, Point)
            )

    arun(scenario())


# ------------------------------------------------------------ a real process

TESTS_DIR = Path(__file__).resolve().parent


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_a_router_process(process_variant: tuple[str, str]) -> None:
    loop, backend = process_variant
    args = ["router_app:router", "--port", "0", "--loop", loop, "--drain-timeout", "10"]

    async def client(server: Any) -> None:
        channel = await fastnet.open_channel("127.0.0.1", server.port, router=router_app.router)
        assert await channel.call(b"hello", type=router_app.ECHO) == b"hello"
        bodies = [b"0.3", b"0.6", b"0.45"]
        calls = [
            asyncio.ensure_future(channel.call(body, type=router_app.SLEEP)) for body in bodies
        ]
        await asyncio.sleep(0.15)  # the server has them
        server.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.shield(channel.drained), READ_TIMEOUT)
        assert channel.draining
        with pytest.raises(fastnet.Draining):
            await channel.call(b"late", type=router_app.ECHO)
        results = await asyncio.wait_for(asyncio.gather(*calls), READ_TIMEOUT)
        assert results == [b"slept " + body for body in bodies]
        await asyncio.wait_for(channel.wait_closed(), READ_TIMEOUT)
        assert channel.closed

    with server_process(args, backend=backend, cwd=TESTS_DIR) as server:
        asyncio.run(client(server))
        status, _, err = server.wait(10)
    assert status == 0, err
    assert "Traceback" not in err
    assert "SIGTERM received" in err


def test_a_router_behind_the_proxy_protocol_sees_the_client_address(arun: Runner[Any]) -> None:
    # The router works behind PROXY unchanged: the header is read before any
    # frame, and the handler sees the client's address as conn.peer.
    router = fastnet.Router()

    @router.handler(1)
    def peer(conn: fastnet.Connection, body: bytes) -> bytes:
        return f"{conn.peer[0]}:{conn.peer[1]}".encode()

    async def scenario() -> None:
        async with serving(router, proxy_protocol="v1", trusted_proxies=["127.0.0.1"]) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                request = fastnet.framing.encode_message(1, 1, 7, 0, b"")
                writer.write(b"PROXY TCP4 203.0.113.9 127.0.0.1 51234 7000\r\n")
                writer.write(len(request).to_bytes(4, "big") + request)
                length = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 5), "big")
                reply = await asyncio.wait_for(reader.readexactly(length), 5)
            finally:
                writer.close()
            assert fastnet.framing.parse_header(reply) == (2, 0, 7, 0)
            assert reply[12:] == b"203.0.113.9:51234"

    arun(scenario())


def test_a_reply_only_message_is_refused_as_a_request_by_the_client(arun: Runner[Any]) -> None:
    # The client knows the declarations: sending a reply-only class as a
    # request is the caller's mistake, refused before anything is sent.
    router = fastnet.Router(codec=fastnet.bodies.Packed())

    @router.message(1)
    class Ask(NamedTuple):
        n: int
        layout = "!I"

    @router.message(2, reply_only=True)
    class Told(NamedTuple):
        n: int
        layout = "!I"

    @router.handler(Ask)
    def ask(conn: fastnet.Connection, msg: Ask) -> Told:
        return Told(msg.n + 1)

    async def scenario() -> None:
        async with serving(router) as server:
            channel = await channel_to(server, router)
            try:
                assert await channel.call(Ask(1), timeout=5) == Told(2)
                with pytest.raises(TypeError, match="reply_only"):
                    await channel.call(Told(1), timeout=5)
                assert channel.in_flight == 0
                assert await channel.call(Ask(2), timeout=5) == Told(3)
            finally:
                await channel.close()

    arun(scenario())
