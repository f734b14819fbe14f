"""Both load generators driving the router wire format (``--protocol router``).

The wire format is specified in ``fastnet/wire.py``'s docstring: after the
4-byte length of ``LengthPrefixed()``, a 12-byte header (kind, flags, type,
id, deadline), then the body. The router server is not here yet, so the
tests run against a reference router echo written with fastnet's task
handler API (``RouterEcho``): it answers each request with a reply carrying
its id and body, and answers every batch in reverse order, so the
generators must match replies by id. Its hooks make it misbehave on purpose
(a corrupted body, a wrong id, an error reply, a drain, a ping), and the
generators must report exactly that.

- ``RouterClient`` (the Python generator's connection) is first driven with
  a fake transport, so exact counts can be checked: every reply verified
  once, latency recorded once per reply, ``depth`` requests always in
  flight, ids distinct across a wrap-around.
- Then ``fastnet.loadgen.bench`` and the C generator (``cloadgen``, built
  as compare.py builds it) each run for about half a second against the
  reference server, on both codec backends (the ``codec`` fixture) for the
  correct server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import fastnet
from fastnet import loadgen
from fastnet.errors import ConnectionBrokenError, ConnectionClosedError
from fastnet.loadgen import (
    BenchParams,
    BufferedRouterClient,
    RouterClient,
    Stats,
    bench,
    make_ring,
)

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "benchmarks" / "compare.py"

# The router header (fastnet/wire.py), written out here on purpose: the
# tests check the generators against the specification, not against the
# generator's own constants.
HEADER = struct.Struct(">BBHII")  # kind, flags, type, id, deadline
REQUEST, REPLY, ERROR, CONTROL = 1, 2, 3, 4
PING, PONG, DRAIN = 1, 2, 3
PING_ID = 0xC0FFEE

# Seconds the reference server holds a lone request back at most.
HOLD = 0.02

# Short runs: 3 connections for the misbehaving servers (one error each).
DURATION = 0.5
WARMUP = 0.1

# (n: the request's index on its connection, from 0; its type; its id; its
# body) -> the messages the server sends for it (header + body each).
Respond = Callable[[int, int, int, bytes], list[bytes]]


def echo(n: int, mtype: int, rid: int, body: bytes) -> list[bytes]:
    """A correct answer: a reply (kind 2, type 0) with the request's id and body."""
    return [HEADER.pack(REPLY, 0, 0, rid, 0) + body]


# --------------------------------------------------------------------------- the reference server


class RouterEcho:
    """The reference router echo server: fastnet's task handler API, in a background thread.

    Each batch of requests is answered in reverse order, and a lone request
    is held back until the next one has come. Whatever a generator sends
    against the wire format is recorded in ``problems``.

    Args:
        respond: the messages to send for each request (``echo`` by default).
        message_type: the type every request must carry.
        size: the body every request must carry, in bytes.
        ping_first: send a ping (id ``PING_ID``) when a connection opens;
            the pongs received are recorded in ``pongs``.
    """

    def __init__(
        self,
        respond: Respond = echo,
        *,
        message_type: int = 1,
        size: int = 64,
        ping_first: bool = False,
    ) -> None:
        self.respond = respond
        self.message_type = message_type
        self.size = size
        self.ping_first = ping_first
        self.problems: list[str] = []
        self.requests: list[int] = []  # per connection, in the order they opened
        self.replies = 0  # messages sent in answer to requests
        self.reordered = 0  # batches of two requests or more, answered in reverse
        self.max_batch = 0
        self.pongs: list[int] = []
        self.ended = 0  # handlers that saw their client close
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = fastnet.Server(self.handler, "127.0.0.1", 0)  # LengthPrefixed()
        self.loop.run_until_complete(self.server.start())
        port = self.server.port
        assert port is not None
        self.port = port
        self.ready.set()
        self.loop.run_forever()

    async def handler(self, conn: fastnet.Connection) -> None:
        index = len(self.requests)
        self.requests.append(0)
        if self.ping_first:
            conn.send(HEADER.pack(CONTROL, 0, PING, PING_ID, 0))
        # A lone request (large frames come one per batch) is held back and
        # answered after the next batch, or after HOLD seconds if none comes
        # (the end of a run): replies come back out of order at any size.
        held: list[bytes] = []
        held_id = 0
        timer: asyncio.TimerHandle | None = None

        def release() -> None:
            nonlocal held, timer
            timer = None
            messages, held = held, []
            self.replies += len(messages)
            with contextlib.suppress(ConnectionBrokenError, ConnectionClosedError):
                conn.send_many(messages)

        try:
            while True:
                batch = await conn.recv_batch()
                answers: list[list[bytes]] = []
                ids = {held_id} if held else set()
                for frame in batch:
                    kind, flags, mtype, rid, deadline = HEADER.unpack_from(frame)
                    if kind == CONTROL:
                        if mtype == PONG:
                            self.pongs.append(rid)
                        continue
                    body = bytes(frame[HEADER.size :])
                    self._check(kind, flags, mtype, rid, deadline, body, ids)
                    ids.add(rid)
                    answers.append(self.respond(self.requests[index], mtype, rid, body))
                    self.requests[index] += 1
                    held_id = rid
                self.max_batch = max(self.max_batch, len(answers) + bool(held))
                if not answers:
                    continue
                if len(answers) == 1 and not held:
                    held = answers[0]
                    timer = asyncio.get_running_loop().call_later(HOLD, release)
                    continue
                self.reordered += 1
                answers.reverse()
                messages = [m for group in answers for m in group] + held
                if timer is not None:
                    timer.cancel()
                    timer = None
                held = []
                self.replies += len(messages)
                conn.send_many(messages)
        except (ConnectionBrokenError, ConnectionClosedError):
            self.ended += 1
        finally:
            if timer is not None:
                timer.cancel()

    def _check(
        self, kind: int, flags: int, mtype: int, rid: int, deadline: int, body: bytes, ids: set[int]
    ) -> None:
        header = (kind, flags, mtype, deadline)
        if header != (REQUEST, 0, self.message_type, 0):
            self.problems.append(f"request {rid}: kind, flags, type, deadline {header}")
        if rid == 0:
            self.problems.append("a request with id 0 (one-way)")
        if rid in ids:
            self.problems.append(f"id {rid} twice in flight")
        if len(body) != self.size:
            self.problems.append(f"request {rid}: a {len(body)}-byte body")

    def wait_ended(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` handlers have seen their client close."""
        deadline = time.monotonic() + timeout
        while self.ended < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ended >= count

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def assert_served_correctly(server: RouterEcho, report: dict[str, Any], depth: int) -> None:
    """The generator sent well-formed requests, and counted only replies the server sent."""
    assert server.problems == [], server.problems[:5]
    assert 0 < report["frames"] <= server.replies
    assert server.replies == sum(server.requests)  # one reply per request
    assert server.max_batch <= depth  # never more than `depth` in flight
    assert server.reordered > 0  # replies did come back out of order


# --------------------------------------------------------------------------- the misbehaviours

BAD_AT = 10  # the request (counting from 0 on each connection) a wrong server mishandles


def corrupt_body(n: int, mtype: int, rid: int, body: bytes) -> list[bytes]:
    if n == BAD_AT:
        body = body[:7] + bytes([body[7] ^ 0x20]) + body[8:]
    return echo(n, mtype, rid, body)


def wrong_id(n: int, mtype: int, rid: int, body: bytes) -> list[bytes]:
    return echo(n, mtype, rid + 0x40000000 if n == BAD_AT else rid, body)


def error_reply(n: int, mtype: int, rid: int, body: bytes) -> list[bytes]:
    if n == BAD_AT:
        return [HEADER.pack(ERROR, 0, mtype, rid, 0) + (300).to_bytes(2, "big") + b"no such thing"]
    return echo(n, mtype, rid, body)


DRAIN_AT = 20


def drain_after(n: int, mtype: int, rid: int, body: bytes) -> list[bytes]:
    """Reply, and after request DRAIN_AT also send drain (then keep answering)."""
    messages = echo(n, mtype, rid, body)
    if n == DRAIN_AT:
        messages.append(HEADER.pack(CONTROL, 0, DRAIN, 0, 0))
    return messages


# Each wrong server, and what the generators must say once per connection.
WRONG = [
    pytest.param(corrupt_body, "differs from its request's body at byte 7", id="corrupt-body"),
    pytest.param(wrong_id, "which is not in flight", id="wrong-id"),
    pytest.param(error_reply, "answered with error 300: 'no such thing'", id="error-reply"),
]


# --------------------------------------------------------------------------- RouterClient, exactly


class FakeTransport:
    """Records what the client writes; the test plays the server."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def split_frames(data: bytes) -> list[bytes]:
    """The router messages (header + body) of a length-prefixed byte stream."""
    messages = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        messages.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(data)
    return messages


def frame(message: bytes) -> bytes:
    return len(message).to_bytes(4, "big") + message


def make_client(
    client_class: type[RouterClient], size: int, depth: int, **params: Any
) -> tuple[RouterClient, FakeTransport, Stats]:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 1,
        "connections": 1,
        "depth": depth,
        "size": size,
        "duration": 1.0,
        "warmup": 0.0,
        "framing": "length",
        "protocol": "router",
    }
    values.update(params)
    ring = make_ring(BenchParams(**values))
    stats = Stats(recording=True)
    stats.connected = 1
    client = client_class(5, ring, depth, stats)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    return client, transport, stats


def feed(client: RouterClient, data: bytes, rng: random.Random) -> None:
    """Deliver ``data`` to the client in random chunks, as reads would."""
    while data and not client.failed:
        cut = rng.randint(1, max(1, min(len(data), 3 * client.frame_size)))
        chunk, data = data[:cut], data[cut:]
        if isinstance(client, BufferedRouterClient):
            buffer = client.get_buffer(-1)
            buffer[: len(chunk)] = chunk
            client.buffer_updated(len(chunk))
        else:
            client.data_received(chunk)


def serve_fake(
    client: RouterClient,
    transport: FakeTransport,
    rounds: int,
    respond: Respond = echo,
    seed: int = 0,
) -> tuple[int, list[int]]:
    """Play the reference server for ``rounds`` rounds; return (replies sent, ids seen).

    Each round answers every request written so far and not yet answered,
    shuffled, in random chunks.
    """
    rng = random.Random(seed)
    answered = 0
    replies = 0
    ids: list[int] = []
    for _ in range(rounds):
        if client.failed:
            break
        pending = bytes(transport.written[answered:])
        answered = len(transport.written)
        messages = []
        for message in split_frames(pending):
            kind, flags, mtype, rid, deadline = HEADER.unpack_from(message)
            if kind == CONTROL:
                continue
            assert (kind, flags, deadline) == (REQUEST, 0, 0)
            ids.append(rid)
            messages += respond(len(ids) - 1, mtype, rid, message[HEADER.size :])
        rng.shuffle(messages)
        replies += len(messages)
        feed(client, b"".join(frame(m) for m in messages), rng)
    return replies, ids


CLIENTS = [
    pytest.param(RouterClient, id="plain"),
    pytest.param(BufferedRouterClient, id="buffered"),
]


@pytest.mark.parametrize("client_class", CLIENTS)
@pytest.mark.parametrize("size", [64, 5000])
def test_replies_in_any_order_verify_exactly(client_class: type[RouterClient], size: int) -> None:
    async def main() -> None:
        client, transport, stats = make_client(client_class, size, depth=8)
        client.start()
        replies, ids = serve_fake(client, transport, rounds=60)
        assert stats.errors == 0, stats.messages
        assert not client.failed and not transport.aborted
        # Every reply verified once, each latency recorded once.
        assert client.done == replies == 60 * 8
        assert stats.histogram.total == client.done
        # Depth stays exact: the last round's top-up is in flight.
        assert len(client.pending) == 8
        assert len(ids) == len(set(ids)) == 60 * 8
        assert ids[:8] == list(range(1, 9))
        written = split_frames(bytes(transport.written))
        assert all(HEADER.unpack_from(m)[:3] == (REQUEST, 0, 1) for m in written)
        assert all(len(m) == HEADER.size + size for m in written)

    asyncio.run(main())


def test_message_type_is_sent() -> None:
    async def main() -> None:
        client, transport, _ = make_client(RouterClient, 64, depth=2, message_type=0x1234)
        client.start()
        written = split_frames(bytes(transport.written))
        assert [HEADER.unpack_from(m) for m in written] == [
            (REQUEST, 0, 0x1234, 1, 0),
            (REQUEST, 0, 0x1234, 2, 0),
        ]

    asyncio.run(main())


def test_ids_wrap_skip_zero_and_stay_distinct_in_flight() -> None:
    async def main() -> None:
        client, transport, stats = make_client(RouterClient, 64, depth=4)
        client.next_id = 0xFFFFFFFF - 5
        client.start()
        stuck = 0xFFFFFFFF - 5  # never answered: still in flight after the wrap

        def hold_first(n: int, mtype: int, rid: int, body: bytes) -> list[bytes]:
            return [] if rid == stuck else echo(n, mtype, rid, body)

        _, ids = serve_fake(client, transport, rounds=40, respond=hold_first)
        assert stats.errors == 0, stats.messages
        assert 0 not in ids
        assert 0xFFFFFFFF in ids and 1 in ids
        assert stuck in client.pending
        # After the wrap the ids restart at 1 and go on; the stuck id is
        # never reused while it is in flight.
        assert ids.count(stuck) == 1
        assert len(ids) == len(set(ids))

    asyncio.run(main())


@pytest.mark.parametrize("client_class", CLIENTS)
@pytest.mark.parametrize(("respond", "message"), WRONG[:2])
def test_wrong_reply_fails_the_connection(
    client_class: type[RouterClient], respond: Respond, message: str
) -> None:
    async def main() -> None:
        client, transport, stats = make_client(client_class, 64, depth=4)
        client.start()
        serve_fake(client, transport, rounds=10, respond=respond)
        assert stats.errors == 1, stats.messages
        assert message in stats.messages[0] and "connection 5" in stats.messages[0]
        assert client.failed and transport.aborted

    asyncio.run(main())


def test_error_reply_is_an_error_and_the_connection_goes_on() -> None:
    async def main() -> None:
        client, transport, stats = make_client(RouterClient, 64, depth=4)
        client.start()
        replies, _ = serve_fake(client, transport, rounds=10, respond=error_reply)
        assert stats.errors == 1
        assert stats.messages[0].startswith("connection 5: request 11 (type 1) answered with")
        assert "error 300: 'no such thing'" in stats.messages[0]
        assert not client.failed
        assert client.done == replies - 1  # the error reply is not a verified frame
        assert len(client.pending) == 4  # its slot was given to a new request

    asyncio.run(main())


def test_drain_stops_requests_and_closes_once_answered() -> None:
    async def main() -> None:
        client, transport, stats = make_client(RouterClient, 64, depth=4)
        client.start()
        rng = random.Random(1)
        # Answer two requests, with a drain between them, in one read: no new request.
        first = split_frames(bytes(transport.written))
        sent = len(transport.written)
        drain = HEADER.pack(CONTROL, 0, DRAIN, 0, 0)
        replies = [echo(0, 1, HEADER.unpack_from(m)[3], m[HEADER.size :])[0] for m in first]
        client.data_received(frame(replies[0]) + frame(drain) + frame(replies[1]))
        assert stats.drains == 1 and client.server_drain
        assert len(transport.written) == sent  # nothing new after the drain
        assert not transport.closed
        feed(client, frame(replies[3]) + frame(replies[2]), rng)
        assert transport.closed and not transport.aborted  # all answered: closed
        client.connection_lost(None)
        assert stats.errors == 0, stats.messages
        assert stats.drained_connections == 1
        assert stats.all_failed.is_set()  # nothing left to measure

    asyncio.run(main())


def test_ping_gets_its_pong_and_other_control_messages_are_skipped() -> None:
    async def main() -> None:
        client, transport, stats = make_client(RouterClient, 64, depth=1)
        client.start()
        sent = len(transport.written)
        feed(
            client,
            frame(HEADER.pack(CONTROL, 0, PING, 77, 0))
            + frame(HEADER.pack(CONTROL, 0, PONG, 3, 0))
            + frame(HEADER.pack(CONTROL, 0, 999, 0, 0)),  # an unknown control code
            random.Random(0),
        )
        assert stats.errors == 0 and not client.failed
        assert bytes(transport.written[sent:]) == frame(HEADER.pack(CONTROL, 0, PONG, 77, 0))

    asyncio.run(main())


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (HEADER.pack(REPLY, 1, 0, 1, 0) + bytes(64), "flags 0x01"),
        (HEADER.pack(REQUEST, 0, 1, 9, 0) + bytes(64), "a request (kind 1)"),
        (HEADER.pack(9, 0, 1, 1, 0), "an unknown kind 9"),
        (HEADER.pack(REPLY, 0, 0, 1, 50) + bytes(64), "a deadline (50 ms)"),
        (HEADER.pack(REPLY, 0, 0, 1, 0) + bytes(63), "a 63-byte reply to request 1"),
        (HEADER.pack(ERROR, 0, 1, 1, 0) + b"\x01", "without its 2-byte error code"),
        (HEADER.pack(ERROR, 0, 1, 99, 0) + b"\x01\x00", "request 99, which is not in flight"),
        (b"\x00" * 11, "11-byte frame, shorter than the 12-byte router header"),
    ],
    ids=["flags", "request", "kind", "deadline", "length", "error-body", "error-id", "short"],
)
def test_malformed_messages_fail_the_connection(message: bytes, expected: str) -> None:
    async def main() -> None:
        client, transport, stats = make_client(RouterClient, 64, depth=2)
        client.start()
        feed(client, frame(message) + bytes(16), random.Random(0))
        assert stats.errors == 1, stats.messages
        assert expected in stats.messages[0], stats.messages[0]
        assert stats.messages[0].startswith("connection 5: the server sent ")
        assert client.failed and transport.aborted

    asyncio.run(main())


def test_a_huge_length_is_an_error_at_once() -> None:
    """A length no reply can have is refused before its bytes are buffered."""

    async def main() -> None:
        client, transport, stats = make_client(BufferedRouterClient, 64 * 1024, depth=2)
        client.start()
        feed(client, (1 << 30).to_bytes(4, "big") + bytes(100), random.Random(0))
        assert stats.errors == 1
        assert "announced a 1073741824-byte frame" in stats.messages[0]
        assert transport.aborted

    asyncio.run(main())


def test_a_tls_record_in_reply_names_tls() -> None:
    async def main() -> None:
        client, _, stats = make_client(RouterClient, 64, depth=2)
        client.start()
        client.data_received(b"\x15\x03\x03\x00\x02\x02\x46")  # a TLS alert record
        assert stats.errors == 1
        assert "answered with a TLS record" in stats.messages[0]
        assert "--tls" in stats.messages[0]

    asyncio.run(main())


# --------------------------------------------------------------------------- options


def test_router_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--port", "1", "--message-type", "0"], "must be at least 1"),
        (["--port", "1", "--message-type", "65536"], "a message type is 1 to 65535"),
        (["--port", "1", "--protocol", "rpc"], "invalid choice: 'rpc'"),
    ):
        with pytest.raises(SystemExit) as info:
            loadgen.main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    for argv, message in (
        (["--port", "1", "--message-type", "3"], "--message-type needs --protocol router"),
        (["--port", "1", "--protocol", "router", "--framing", "lines"], "--framing length"),
        (["--port", "1", "--protocol", "router", "--framing", "length:2"], "--framing length"),
    ):
        assert loadgen.main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="a message type is 1 to 65535"):
        bench(params(1, message_type=0))


def test_help_lists_the_router_options() -> None:
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    text = parser.format_help()
    assert "--protocol {frames,router}" in text
    assert "--message-type T" in text


# --------------------------------------------------------------------------- the Python generator


def params(port: int, **overrides: Any) -> BenchParams:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "connections": 8,
        "depth": 4,
        "size": 64,
        "duration": DURATION,
        "warmup": WARMUP,
        "framing": "length",
        "loop": "asyncio",
        "protocol": "router",
    }
    values.update(overrides)
    return BenchParams(**values)


@pytest.mark.parametrize("size", [64, 64 * 1024], ids=["64B", "64KiB"])
def test_python_generator_verifies_reordered_replies(codec: ModuleType, size: int) -> None:
    server = RouterEcho(message_type=513, size=size)
    try:
        report = bench(params(server.port, size=size, message_type=513))
    finally:
        server.close()
    assert report["errors"] == 0, report["error_messages"]
    assert report["protocol"] == "router" and report["message_type"] == 513
    assert report["connected"] == 8
    assert report["drains"] == 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["max"]
    assert_served_correctly(server, report, depth=4)


def test_python_generator_on_uvloop() -> None:
    if importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    server = RouterEcho(size=20000)
    try:
        report = bench(params(server.port, size=20000, loop="uvloop"))
    finally:
        server.close()
    assert report["errors"] == 0, report["error_messages"]
    assert_served_correctly(server, report, depth=4)


@pytest.mark.parametrize(("respond", "message"), WRONG)
def test_python_generator_reports_a_wrong_server(respond: Respond, message: str) -> None:
    server = RouterEcho(respond)
    try:
        report = bench(params(server.port, connections=3))
    finally:
        server.close()
    assert report["errors"] == 3, report["error_messages"]
    assert all(message in m for m in report["error_messages"]), report["error_messages"]
    if respond is error_reply:
        # An error reply does not end the connection: the load went on.
        assert report["frames"] > 0
        assert min(server.requests) > BAD_AT + 1


def test_python_generator_counts_a_drain_and_answers_a_ping() -> None:
    server = RouterEcho(drain_after, ping_first=True)
    try:
        report = bench(params(server.port, connections=3, warmup=0.0))
        assert server.wait_ended(3)  # the generator closed each drained connection
    finally:
        server.close()
    assert report["errors"] == 0, report["error_messages"]
    assert report["drains"] == 3
    # Every connection was answered up to its drain (the report's frames
    # count only the measured window, which a fast drain can precede: the
    # fresh-clone CI saw 0 once).
    assert min(server.requests) > DRAIN_AT
    assert server.pongs == [PING_ID] * 3
    # No new request after the drain: at most those already in flight.
    assert max(server.requests) <= DRAIN_AT + 1 + 4
    assert server.replies == sum(server.requests) + 3  # the replies and the drains


def test_cli_summary_names_router_and_drains() -> None:
    server = RouterEcho(drain_after)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fastnet", "bench", "--port", str(server.port),
             "--protocol", "router", "--connections", "2", "--depth", "4",
             "--duration", "0.3", "--warmup", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "router type 1" in done.stdout.splitlines()[0]
    assert "drains       2" in done.stdout


# --------------------------------------------------------------------------- the C generator


def _load_compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_harness_router", COMPARE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return _load_compare()


@pytest.fixture(scope="module")
def cloadgen(compare: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if sys.platform != "linux":
        pytest.skip("cloadgen uses epoll and /proc (Linux only)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    binary: Path = compare.build_cloadgen(tmp_path_factory.mktemp("cloadgen"))
    yield binary


def run_c(
    binary: Path,
    port: int,
    *extra: str,
    connections: int = 8,
    depth: int = 4,
    size: int = 64,
    warmup: float = WARMUP,
) -> tuple[int, dict[str, Any]]:
    """Run the C generator with --protocol router; return its exit status and report."""
    done = subprocess.run(
        [str(binary), "--protocol", "router", "--port", str(port),
         "--connections", str(connections), "--depth", str(depth), "--size", str(size),
         "--duration", str(DURATION), "--warmup", str(warmup), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.stdout.strip(), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, report


@pytest.mark.parametrize("size", [64, 64 * 1024], ids=["64B", "64KiB"])
def test_c_generator_verifies_reordered_replies(
    cloadgen: Path, codec: ModuleType, size: int
) -> None:
    server = RouterEcho(message_type=513, size=size)
    try:
        status, report = run_c(cloadgen, server.port, "--message-type", "513", size=size)
    finally:
        server.close()
    assert status == 0, report["error_messages"]
    assert report["errors"] == 0
    assert report["protocol"] == "router" and report["message_type"] == 513
    assert report["connected"] == 8
    assert report["drains"] == 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["max"]
    assert_served_correctly(server, report, depth=4)


@pytest.mark.parametrize(("respond", "message"), WRONG)
def test_c_generator_reports_a_wrong_server(cloadgen: Path, respond: Respond, message: str) -> None:
    server = RouterEcho(respond)
    try:
        status, report = run_c(cloadgen, server.port, connections=3)
    finally:
        server.close()
    assert status == 1
    assert report["errors"] == 3, report["error_messages"]
    assert all(message in m for m in report["error_messages"]), report["error_messages"]
    if respond is error_reply:
        assert report["frames"] > 0
        assert min(server.requests) > BAD_AT + 1


def test_c_generator_counts_a_drain_and_answers_a_ping(cloadgen: Path) -> None:
    server = RouterEcho(drain_after, ping_first=True)
    try:
        status, report = run_c(cloadgen, server.port, connections=3, warmup=0.0)
        assert server.wait_ended(3)
    finally:
        server.close()
    assert status == 0, report["error_messages"]
    assert report["errors"] == 0
    assert report["drains"] == 3
    assert report["frames"] > 0
    assert server.pongs == [PING_ID] * 3
    assert max(server.requests) <= DRAIN_AT + 1 + 4
    assert server.replies == sum(server.requests) + 3


def test_c_generator_frames_report_is_unchanged_but_for_new_fields(cloadgen: Path) -> None:
    """Without --protocol the report says frames, with no message type and no drains."""
    done = subprocess.run(
        [str(cloadgen), "--port", "1", "--connections", "1", "--duration", "0.1",
         "--warmup", "0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["protocol"] == "frames"
    assert report["message_type"] is None and report["drains"] == 0


@pytest.mark.parametrize(
    "arguments",
    [
        ["--port", "1", "--protocol", "rpc"],
        ["--port", "1", "--protocol", "router", "--message-type", "0"],
        ["--port", "1", "--protocol", "router", "--message-type", "65536"],
        ["--port", "1", "--message-type", "2"],
        ["--port", "1", "--protocol", "router", "--body-hex", "abc"],
        ["--port", "1", "--protocol", "router", "--body-hex", "zz"],
        ["--port", "1", "--body-hex", "00"],
    ],
    ids=[
        "protocol",
        "type-0",
        "type-65536",
        "type-without-router",
        "body-odd-digits",
        "body-not-hex",
        "body-without-router",
    ],
)
def test_c_generator_bad_router_arguments_exit_2(cloadgen: Path, arguments: list[str]) -> None:
    done = subprocess.run([str(cloadgen), *arguments], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "cloadgen:" in done.stderr


# --------------------------------------------------------------------------- compare.py


def test_compare_passes_the_protocol_of_a_router_server(compare: ModuleType) -> None:
    workload = compare.Workload("rpc", "rpc", 64, 1, 64)
    args = argparse.Namespace(duration=2.0, warmup=0.5)

    class Process:
        pid = 1234

    def load_args(kind: Any) -> list[str]:
        server = argparse.Namespace(kind=kind, host="127.0.0.1", port=9000, proc=Process())
        result: list[str] = compare.load_args(server, workload, args)
        return result

    plain = load_args(compare.ServerKind("fastnet", "fastnet echo"))
    assert "--protocol" not in plain
    router = load_args(compare.ServerKind("router", "router echo", protocol="router"))
    assert router == [*plain, "--protocol", "router"]


def test_c_generator_sends_a_fixed_body_to_a_typed_router(
    cloadgen: Path, compare: ModuleType
) -> None:
    # --body-hex: every request is the same msgpack struct, which the typed
    # router (benchmarks/servers/router_msgspec.py) decodes, rebuilds and
    # encodes back; the generator verifies each reply's body against it.
    pytest.importorskip("msgspec")
    body = compare.request_body("msgspec")
    kind = next(s for s in compare.SERVERS if s.name == "router-msgspec")
    command = [sys.executable, "-m", "fastnet", "serve", kind.app, "--port", "0"]
    command += ["--log-level", "warning"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, env=compare.server_env(kind), text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        port = int(line.rsplit(":", 1)[1])
        status, report = run_c(cloadgen, port, "--body-hex", body.hex(), connections=4)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert status == 0, report["error_messages"]
    assert report["errors"] == 0 and report["frames"] > 0
