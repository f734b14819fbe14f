"""The Connection contract that real applications rely on (issue: connection semantics).

Peer close made visible, per-connection state, connection-scoped tasks
(spawn) and fresh exceptions. Each test fails without the change it covers,
and runs on both codec backends and both event loops (``arun``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any

import pytest
from test_server_support import Runner, frame_bytes, serving, wait_until

import fastnet
from fastnet import ConnectionBrokenError, ConnectionClosedError, FrameTooLarge
from fastnet._reasons import reraise_factory
from fastnet.apps import echo
from fastnet.connection import Lifecycle

pytest_plugins = ["test_server_support"]


# ------------------------------------------------------------- peer close


def test_a_client_sees_the_server_close(arun: Runner[Any]) -> None:
    # The server answers one frame and returns; its side closes. The client
    # must see it: peer_closed, closing, wait_closed() returns, send() raises,
    # a pending recv() ends -- instead of waiting for a reply that cannot come.
    async def one_reply(conn: fastnet.Connection) -> None:
        conn.send(await conn.recv())

    async def scenario() -> None:
        async with serving(one_reply) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send(b"ping")
            assert await conn.recv() == b"ping"
            with pytest.raises(ConnectionBrokenError):
                await asyncio.wait_for(conn.recv(), 5)  # ends, does not hang
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert conn.peer_closed
            assert conn.closing
            assert conn.lifecycle is Lifecycle.CLOSED
            for _ in range(3):
                with pytest.raises(ConnectionBrokenError):
                    conn.send(b"more")
            with pytest.raises(ConnectionBrokenError):
                await conn.drain()

    arun(scenario())


def test_a_clients_close_does_not_reset_away_its_last_frames(arun: Runner[Any]) -> None:
    # A producer sends 3 MB and closes at once while the echoes come back
    # unread. Closing the socket then made the kernel reset the connection
    # (unread input) and drop the send queue: the server got 130 of 3,000
    # frames. Now the client lingers as a server connection does: FIN after
    # the data, read and drop until the server closes or has it all.
    received = 0

    def counting_echo(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        nonlocal received
        received += len(frames)
        return frames

    async def scenario() -> None:
        nonlocal received
        received = 0
        async with serving(fastnet.callback_handler(counting_echo)) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send_many([b"x" * 1000] * 3000)
            conn.close()
            assert conn.closing
            with pytest.raises(ConnectionClosedError):
                conn.send(b"late")
            await asyncio.wait_for(conn.wait_closed(), 10)
            await wait_until(lambda: received == 3000, 5.0, "every frame at the server")
            await wait_until(lambda: server.stats()["active"] == 0, 5.0, "the server side closed")
            assert server.stats()["resets"] == 0

    arun(scenario())


def test_a_client_with_nothing_in_flight_closes_at_once(arun: Runner[Any]) -> None:
    # A request/response client that read its reply has nothing to linger
    # for: it closes its socket in close() as before, not after the ACK of
    # its FIN (which a peer that stays open delays by about 40 ms).
    async def stays_open(conn: fastnet.Connection) -> None:
        conn.send(await conn.recv())
        await asyncio.sleep(30)  # ignores our FIN

    async def scenario() -> None:
        async with serving(stays_open, drain_timeout=0.5) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send(b"ping")
            assert await asyncio.wait_for(conn.recv(), 5) == b"ping"
            await asyncio.sleep(0.05)  # our request is acknowledged by now
            conn.close()
            assert conn._transport.is_closing()  # closed, not lingering
            await asyncio.wait_for(conn.wait_closed(), 5)

    arun(scenario())


def test_the_probe_does_not_count_a_lone_fin_as_data() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("SIOCOUTQ and TCP_INFO are Linux's")
    import fcntl
    import termios

    from fastnet.lingering import unacknowledged_probe

    class FakeTransport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return self.sock if name == "socket" else default

    seen_fin_only = 0
    for _ in range(20):  # the peer's delayed ACK of our FIN: about 40 ms
        with socket.create_server(("127.0.0.1", 0)) as listener:
            ours = socket.create_connection(listener.getsockname())
            theirs, _ = listener.accept()
            with ours, theirs:
                probe = unacknowledged_probe(FakeTransport(ours))  # type: ignore[arg-type]
                assert probe is not None
                ours.sendall(b"x" * 1000)
                assert theirs.recv(1000, socket.MSG_WAITALL) == b"x" * 1000
                ours.shutdown(socket.SHUT_WR)
                raw = fcntl.ioctl(ours.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                if int.from_bytes(raw, sys.byteorder) == 1:
                    seen_fin_only += 1
                assert probe() == 0  # the data is acknowledged; the FIN is not data
        if seen_fin_only >= 3:
            break
    assert seen_fin_only >= 1, "the FIN was always acknowledged at once: nothing tested"


def test_a_clients_lingering_close_is_bounded(
    arun: Runner[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that neither reads nor closes cannot keep a closing client
    # forever: after the bound the client resets the connection.
    monkeypatch.setattr(fastnet.lingering, "CLOSE_LINGER", 0.5)
    stuck = asyncio.Event()

    async def never_reads(conn: fastnet.Connection) -> None:
        stuck.set()
        await asyncio.sleep(30)  # reading pauses once 4 MiB wait unconsumed

    async def scenario() -> None:
        nonlocal stuck
        stuck = asyncio.Event()
        async with serving(never_reads, drain_timeout=0.5) as server:
            conn = await fastnet.connect("127.0.0.1", server.port, max_write_buffer=64 << 20)
            await asyncio.wait_for(stuck.wait(), 5)
            conn.send_many([b"x" * 65536] * 512)  # 32 MiB: more than the kernels hold
            await asyncio.sleep(0.1)
            conn.close()
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert 0.4 <= loop.time() - began < 3.0

    arun(scenario())


def test_a_server_connection_still_answers_a_half_closed_peer(arun: Runner[Any]) -> None:
    # The server side keeps half-close semantics: a client that sends its
    # requests then shuts down its sending side still gets every reply.
    seen: dict[str, Any] = {}

    async def late_replier(conn: fastnet.Connection) -> None:
        frames = [frame async for frame in conn]  # ends at the peer's FIN
        seen["peer_closed"] = conn.peer_closed
        seen["lifecycle"] = conn.lifecycle
        conn.send_many(frames)

    async def scenario() -> None:
        async with serving(late_replier) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"".join(frame_bytes(b"r%d" % i) for i in range(10)))
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 5)
            assert data == b"".join(frame_bytes(b"r%d" % i) for i in range(10))
            assert seen == {"peer_closed": True, "lifecycle": Lifecycle.PEER_CLOSED}
            writer.close()
            await writer.wait_closed()

    arun(scenario())


def test_lifecycle_refuses_an_illegal_transition(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.close()
            await conn.wait_closed()
            assert conn.lifecycle is Lifecycle.CLOSED
            with pytest.raises(RuntimeError, match="CLOSED to OPEN"):
                conn._move_to(Lifecycle.OPEN)

    arun(scenario())


def test_a_callback_handlers_close_comes_after_the_replies_it_returns(arun: Runner[Any]) -> None:
    # A callback handler answers QUIT with BYE and closes: conn.close(), then
    # return [b"BYE"]. Before, close() flushed and sent FIN at once, and the
    # replies returned after it were dropped without a word. Now the close
    # waits for the handler to return: every reply, BYE last, then EOF.
    @fastnet.callback_handler
    def quits(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        replies = []
        for frame in frames:
            if frame == b"QUIT":
                conn.close()
                replies.append(b"BYE")
                break
            replies.append(frame.upper())
        return replies

    async def scenario() -> None:
        async with serving(quits) as server:
            for split in (False, True):  # QUIT in the batch of the frames before it, or alone
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(frame_bytes(b"a") + frame_bytes(b"b"))
                if split:
                    await writer.drain()
                    assert await reader.readexactly(10) == frame_bytes(b"A") + frame_bytes(b"B")
                writer.write(frame_bytes(b"QUIT") + frame_bytes(b"ignored"))
                rest = await asyncio.wait_for(reader.read(), 5)  # to EOF: no reset
                expected = frame_bytes(b"BYE")
                if not split:
                    expected = frame_bytes(b"A") + frame_bytes(b"B") + expected
                assert rest == expected
                writer.close()
            assert server.stats()["handler_errors"] == 0

    arun(scenario())


# ------------------------------------------------------------------ state


def test_connection_state_is_per_connection(arun: Runner[Any]) -> None:
    names: list[str] = []
    members: list[fastnet.Connection] = []

    async def named(conn: fastnet.Connection) -> None:
        conn.state.name = (await conn.recv()).decode()
        members.append(conn)
        async for frame in conn:
            # another connection's state, read from this one's handler
            conn.send(",".join(m.state.name for m in members).encode() + b":" + frame)

    async def scenario() -> None:
        async with serving(named) as server:
            a = await fastnet.connect("127.0.0.1", server.port)
            b = await fastnet.connect("127.0.0.1", server.port)
            a.send(b"alice")
            await wait_until(lambda: len(members) == 1)
            b.send(b"bob")
            await wait_until(lambda: len(members) == 2)
            b.send(b"hi")
            names.append((await b.recv()).decode())
            a.close()
            b.close()
            await a.wait_closed()
            await b.wait_closed()
        assert names == ["alice,bob:hi"]

    arun(scenario())


# ------------------------------------------------------------------ spawn


async def _slow_reply(conn: fastnet.Connection, frame: bytes, delay: float) -> None:
    await asyncio.sleep(delay)
    conn.send(frame)


async def concurrent(conn: fastnet.Connection) -> None:
    # A task per request: the usual way when each awaits a slow dependency.
    async for frame in conn:
        conn.spawn(_slow_reply(conn, frame, 0.3))


def test_shutdown_waits_for_spawned_requests(arun: Runner[Any]) -> None:
    # Four requests in flight when the server shuts down: all four replies
    # arrive before the connection closes (before: 0 of 4, shutdown in 2 ms).
    async def scenario() -> None:
        server = fastnet.Server(concurrent, "127.0.0.1", 0, drain_timeout=5.0)
        await server.start()
        conn = await fastnet.connect("127.0.0.1", server.port)
        conn.send_many([b"a", b"b", b"c", b"d"])
        await wait_until(lambda: server.stats()["frames_in"] == 4)
        shutdown = asyncio.ensure_future(server.shutdown())
        replies = []
        with pytest.raises(ConnectionBrokenError):
            while True:
                replies.append(await conn.recv())
        await shutdown
        assert sorted(replies) == [b"a", b"b", b"c", b"d"]

    arun(scenario())


def test_drain_timeout_cancels_spawned_tasks(arun: Runner[Any]) -> None:
    cancelled: list[bool] = []

    async def stuck(conn: fastnet.Connection) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def handler(conn: fastnet.Connection) -> None:
        await conn.recv()
        conn.spawn(stuck(conn))

    async def scenario() -> None:
        server = fastnet.Server(handler, "127.0.0.1", 0, drain_timeout=0.2)
        await server.start()
        conn = await fastnet.connect("127.0.0.1", server.port)
        conn.send(b"go")
        await wait_until(lambda: server.stats()["frames_in"] == 1)
        await asyncio.wait_for(server.shutdown(), 5)
        assert cancelled == [True]
        conn.abort()

    arun(scenario())


def test_the_idle_timeout_waits_for_spawned_tasks(arun: Runner[Any]) -> None:
    # A request that takes 0.6 s, with idle_timeout=0.2: its reply arrives.
    async def slow(conn: fastnet.Connection) -> None:
        async for frame in conn:
            conn.spawn(_slow_reply(conn, frame, 0.6))

    async def scenario() -> None:
        async with serving(slow, idle_timeout=0.2) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send(b"slow")
            assert await asyncio.wait_for(conn.recv(), 5) == b"slow"
            assert server.stats()["idle_timeouts"] == 0
            # with nothing running, the timeout applies again
            with pytest.raises(ConnectionBrokenError):
                await asyncio.wait_for(conn.recv(), 5)
            assert server.stats()["idle_timeouts"] == 1

    arun(scenario())


def test_close_waits_for_spawned_tasks(arun: Runner[Any]) -> None:
    async def handler(conn: fastnet.Connection) -> None:
        frame = await conn.recv()
        conn.spawn(_slow_reply(conn, frame, 0.2))
        conn.close()  # closes once the reply has gone out
        await conn.wait_closed()

    async def scenario() -> None:
        async with serving(handler) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send(b"x")
            assert await asyncio.wait_for(conn.recv(), 5) == b"x"
            await asyncio.wait_for(conn.wait_closed(), 5)

    arun(scenario())


def test_a_failing_spawned_task_is_a_handler_error(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(conn: fastnet.Connection) -> None:
        raise KeyError("lost")

    async def handler(conn: fastnet.Connection) -> None:
        async for _ in conn:
            conn.spawn(boom(conn))

    async def scenario() -> None:
        async with serving(handler) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send(b"x")
            await asyncio.wait_for(conn.wait_closed(), 5)
            await wait_until(lambda: server.stats()["handler_errors"] == 1)

    with caplog.at_level(logging.ERROR, logger="fastnet"):
        arun(scenario())
    assert any("KeyError" in r.getMessage() for r in caplog.records)


def test_spawn_on_a_closed_connection_raises(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.close()

            async def never() -> None:
                raise AssertionError("must not run")

            coro = never()
            with pytest.raises(ConnectionClosedError):
                conn.spawn(coro)
            assert coro.cr_frame is None  # closed, so no "never awaited" warning
            await conn.wait_closed()

    arun(scenario())


# ------------------------------------------------------ fresh exceptions


def test_reraise_factory_gives_a_fresh_exception_each_time() -> None:
    original = FrameTooLarge(10, 5)
    factory = reraise_factory(original)
    depths = []
    for _ in range(3):
        try:
            raise factory()
        except FrameTooLarge as exc:
            assert exc is not original
            assert exc.__cause__ is original
            assert (exc.size, exc.limit) == (10, 5)
            depths.append(len(traceback.extract_tb(exc.__traceback__)))
    assert depths[0] == depths[1] == depths[2]  # no traceback piling up on one object
    assert original.__traceback__ is None


# ----------------------------------------------------------------- fan-out


def test_fan_out_survives_a_slow_reader(arun: Runner[Any]) -> None:
    # A room: every frame a member sends goes to every member. One member
    # never reads. Before: the *sender* got WriteBufferFull from
    # member.send() and was closed, and the others missed messages. Now the
    # sender uses try_send: what does not fit is dropped for that member
    # only, nobody is closed, and every buffer stays under the limit. (On a
    # loaded machine the fast member may fall behind for a moment too, so
    # what it must get is every message not dropped for it.)
    limit = 256 * 1024
    room: list[fastnet.Connection] = []
    dropped: dict[Any, int] = {}
    sizes: list[int] = []
    handled = [0]

    async def member(conn: fastnet.Connection) -> None:
        room.append(conn)
        try:
            async for frame in conn:
                for other in room:
                    if not other.try_send(frame):
                        dropped[other.peer] = dropped.get(other.peer, 0) + 1
                        sizes.append(other.write_buffer_size)
                handled[0] += 1
        finally:
            room.remove(conn)

    async def scenario() -> None:
        async with serving(member, max_write_buffer=limit) as server:
            # The slow member never reads, and its receive buffer is small, so
            # what the server sends it backs up in the server soon.
            slow = socket.socket()
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(slow, ("127.0.0.1", server.port))
                fast = await fastnet.connect("127.0.0.1", server.port)
                sender = await fastnet.connect("127.0.0.1", server.port)
                await wait_until(lambda: len(room) == 3)
                message = b"m" * 16384
                count = 400  # 6.5 MB: far more than the slow member's buffers
                received = 0

                async def receive() -> None:
                    nonlocal received
                    await wait_until(lambda: handled[0] == count, timeout=20)
                    expected = count - dropped.get(fast.local, 0)
                    while received < expected:
                        received += len(await fast.recv_batch())

                reader = asyncio.ensure_future(receive())
                for _ in range(count):
                    sender.send(message)
                    await sender.drain()
                await asyncio.wait_for(reader, 25)
                assert received == count - dropped.get(fast.local, 0)
                assert dropped.get(slow.getsockname(), 0) > 0, "the slow member never filled"
                assert max(sizes) <= limit
                assert server.stats()["handler_errors"] == 0
                assert not sender.closing and not fast.closing
                for conn in (fast, sender):
                    conn.close()
                    await conn.wait_closed()
            finally:
                slow.close()

    arun(scenario())


def test_send_raises_write_buffer_full_at_the_limit_exactly(arun: Runner[Any]) -> None:
    limit = 200_000
    seen: dict[str, Any] = {}

    async def producer(conn: fastnet.Connection) -> None:
        await conn.recv()
        frame = b"p" * 10_000
        sent = 0
        try:
            while sent < 1000:
                conn.send(frame)
                sent += 1
        except fastnet.WriteBufferFull:
            seen["size"] = conn.write_buffer_size
            seen["sent"] = sent
        seen["try"] = conn.try_send(frame)
        await conn.recv()

    async def scenario() -> None:
        async with serving(producer, max_write_buffer=limit) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\0\0\0\x01x")
            await wait_until(lambda: "size" in seen)
            # Every frame is 10,004 bytes on the wire: the refused one would
            # have passed the limit, the ones before did not.
            assert seen["size"] <= limit < seen["size"] + 10_004
            assert seen["try"] is False
            writer.transport.abort()

    arun(scenario())


def _read_replies(sock: socket.socket, count: int, size: int) -> list[int]:
    """Read ``count`` length-prefixed frames from a blocking socket; their sizes."""
    sizes = []
    buffer = bytearray()
    while len(sizes) < count:
        while len(buffer) < 4 or len(buffer) < 4 + int.from_bytes(buffer[:4], "big"):
            chunk = sock.recv(1 << 20)
            assert chunk, f"EOF after {len(sizes)} replies"
            buffer += chunk
        length = int.from_bytes(buffer[:4], "big")
        assert buffer[4 : 4 + length] == b"r" * size
        sizes.append(length)
        del buffer[: 4 + length]
    return sizes


def test_a_handler_that_never_drains_waits_for_its_peer_to_read(arun: Runner[Any]) -> None:
    # The README's first handler (async for, send, never drain) against a
    # client that pipelines requests for large replies and reads them late.
    # Before: every request arrived in one read, so async for handed them
    # all over at once and the replies piled up in the connection's queue
    # until send() raised WriteBufferFull at the fourth, and conn.writable
    # said True all along (it ignored the queue). Now the handler waits in
    # async for, its replies written, while they are over the high-water
    # mark, and writable counts the queued bytes.
    size = 1 << 20
    count = 12  # 12 MiB of replies: three times max_write_buffer
    seen: dict[str, list[Any]] = {"writable": [], "unsent": []}

    async def big_replies(conn: fastnet.Connection) -> None:
        async for _ in conn:
            conn.send(b"r" * size)
            seen["writable"].append(conn.writable)
            seen["unsent"].append(conn.write_buffer_size)

    async def scenario() -> None:
        async with serving(big_replies) as server:
            loop = asyncio.get_running_loop()
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.connect(("127.0.0.1", server.port))
            try:
                client.sendall(frame_bytes(b"get") * count)  # one read at the server
                await asyncio.sleep(0.3)  # the client reads nothing yet
                assert len(seen["unsent"]) < count, "the handler did not wait"
                client.settimeout(20)
                sizes = await loop.run_in_executor(None, _read_replies, client, count, size)
                assert sizes == [size] * count
                assert server.stats()["handler_errors"] == 0
            finally:
                client.close()
        # Right after each send, the 1 MiB reply is queued, past the 64 KiB
        # mark: not writable. The handler waited with at most one reply
        # queued and one in the transport, not max_write_buffer.
        assert seen["writable"] == [False] * count
        assert max(seen["unsent"]) <= 2 * (size + 4) + 65536

    arun(scenario())


def test_turning_read_pauses_on_write_off_releases_a_waiting_handler(arun: Runner[Any]) -> None:
    # The handler waits in async for, its replies over the mark and the peer
    # not reading; then it turns into a feed (read_pauses_on_write = False).
    # The wait is for the old rule: it must end at once, not when the peer
    # reads (a probe saw it wait on).
    handled: list[int] = []
    waited: list[int] = []
    switched = asyncio.Event()

    async def turns_into_a_feed(conn: fastnet.Connection) -> None:
        async def switch() -> None:
            await wait_until(lambda: len(handled) > 0)
            await asyncio.sleep(0.2)  # the handler is waiting by now
            waited.append(len(handled))
            conn.read_pauses_on_write = False
            switched.set()

        conn.spawn(switch())
        async for _ in conn:
            handled.append(1)
            conn.send(b"x" * (256 << 10) if conn.read_pauses_on_write else b"small")

    async def scenario() -> None:
        async with serving(turns_into_a_feed) as server:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.connect(("127.0.0.1", server.port))
            try:
                client.sendall(frame_bytes(b"g") * 100)  # read by the server in one go
                await asyncio.wait_for(switched.wait(), 10)
                assert waited[0] < 100, "the handler never waited"
                await wait_until(lambda: len(handled) == 100, timeout=5)
            finally:
                client.close()

    arun(scenario())


# ------------------------------------------------------- over-long lines


@pytest.mark.parametrize("on_too_long", ["error", "skip"])
def test_an_over_long_line_closes_or_is_skipped(arun: Runner[Any], on_too_long: str) -> None:
    # "error" (the default): the server closes the connection, a framing
    # error; the next valid line is not read. "skip": the line is dropped,
    # counted, and the connection goes on.
    framing = fastnet.Lines(max_length=16, on_too_long=on_too_long)  # type: ignore[arg-type]

    async def scenario() -> None:
        async with serving(echo, framing=framing) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"first\n" + b"x" * 40 + b"\nsecond\n")
            writer.write_eof()
            assert await asyncio.wait_for(reader.readline(), 5) == b"first\n"
            rest = await asyncio.wait_for(reader.read(), 5)
            await wait_until(lambda: server.stats()["active"] == 0)
            stats = server.stats()
            if on_too_long == "skip":
                assert rest == b"second\n"
                assert stats["lines_skipped"] == 1 and stats["frame_errors"] == 0
            else:
                assert rest == b""
                assert stats["frame_errors"] == 1 and stats["lines_skipped"] == 0
            writer.close()
            await writer.wait_closed()

    arun(scenario())


def test_a_framing_error_closes_a_client_connection(arun: Runner[Any]) -> None:
    # The server sends one frame, then a header over max_frame. The client
    # gets the frame, then ConnectionBrokenError from the FrameTooLarge, and
    # the connection is closed: before, it stayed OPEN, send() went through
    # and wait_closed() never returned.
    async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frame_bytes(b"abc") + (0x7FFFFFFF).to_bytes(4, "big"))
        await reader.read()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(bad_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await fastnet.connect("127.0.0.1", port)
        assert await conn.recv() == b"abc"
        with pytest.raises(ConnectionBrokenError) as info:
            await asyncio.wait_for(conn.recv(), 5)
        assert isinstance(info.value.__cause__, FrameTooLarge)
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert conn.closing and conn.lifecycle is Lifecycle.CLOSED
        with pytest.raises(ConnectionBrokenError):
            conn.send(b"still here?")
        server.close()
        await server.wait_closed()

    arun(scenario())


def test_abort_is_a_reset_for_the_peer(arun: Runner[Any]) -> None:
    # With no unread input, closing the socket would send FIN, and the peer
    # could take the aborted exchange for a complete one.
    async def aborter(conn: fastnet.Connection) -> None:
        await conn.recv()
        conn.send(b"partial")
        conn.abort()

    async def scenario() -> None:
        async with serving(aborter) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame_bytes(b"go"))
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()

    arun(scenario())


# ------------------------------------------- input that a reset cannot take


class _Producer:
    """A peer that sends a burst and goes while the server's handler blocks the loop.

    It sends one frame; once the handler holds it (``hold`` blocks the loop
    there), it sends ``rest``, which stays unread in the server's socket,
    and goes: a reset (TCP, once the kernel acknowledged it all) or a close
    (Unix). The handler's next write then fails with that input unread.
    """

    def __init__(self, rest: bytes) -> None:
        self.rest = rest
        self.first_seen = threading.Event()
        self.released = threading.Event()

    def reset(self) -> None:
        self.first_seen.clear()
        self.released.clear()

    def hold(self) -> None:
        """In the handler, on the first frame: block until the producer has gone."""
        if not self.first_seen.is_set():
            self.first_seen.set()
            assert self.released.wait(5)

    async def goes(self, server: fastnet.Server, family: str = "tcp", path: str = "") -> None:
        """Run the producer against ``server``; return once its connection closed."""
        if family == "unix":
            address: Any = path
            af = socket.AF_UNIX
        else:
            address, af = ("127.0.0.1", server.port), socket.AF_INET
        client = threading.Thread(target=self._run, args=(address, af))
        client.start()
        try:
            await wait_until(lambda: server.stats()["closed"] == 1, 10.0, "the connection ended")
        finally:
            self.released.set()
            client.join(10)

    def _run(self, address: Any, family: int) -> None:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(address)
                sock.sendall(frame_bytes(_payload(0)))
                if not self.first_seen.wait(5):
                    return
                sock.sendall(self.rest)
                if family != socket.AF_UNIX:
                    deadline = time.monotonic() + 5
                    while _unacknowledged(sock) and time.monotonic() < deadline:
                        time.sleep(0.005)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self.released.set()


def _unacknowledged(sock: socket.socket) -> int:
    import fcntl
    import termios

    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(raw, sys.byteorder)


def _payload(i: int) -> bytes:
    return i.to_bytes(4, "big")


# 5,000 frames of 8 bytes: 40 kB, acknowledged whole into the server's receive
# buffer, and more frames than the inbox's high-water mark (READ_HIGH_FRAMES).
_RESET_FRAMES = 5000
_RESET_REST = b"".join(frame_bytes(_payload(i)) for i in range(1, _RESET_FRAMES))
_RESET_PAYLOADS = [_payload(i) for i in range(_RESET_FRAMES)]

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SIOCOUTQ and /proc/self/fd are Linux's"
)


@linux_only
@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("kind", ["callback", "task"])
def test_frames_received_before_a_reset_are_all_delivered(
    arun: Runner[Any], family: str, kind: str, tmp_path: Any
) -> None:
    # A producer sends frames and goes without reading the acks. The server
    # writes an ack, the write fails (EPIPE/ECONNRESET), and the event loop's
    # transport gave up its socket with the rest of the input still in it,
    # acknowledged to the producer: 1 of 5,000 frames reached the handler.
    # Every frame the kernel took is delivered, then the input ends. The task
    # handler takes them one by one: the inbox fills past its mark, reading
    # waits, and resumes as the handler catches up.
    producer = _Producer(_RESET_REST)
    got: list[bytes] = []
    ended: list[BaseException] = []

    def acks(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        got.extend(frames)
        producer.hold()
        return [b"ack"] * len(frames)

    async def acks_in_a_task(conn: fastnet.Connection) -> None:
        try:
            while True:
                got.append(await conn.recv())
                producer.hold()
                with contextlib.suppress(ConnectionBrokenError):
                    conn.send(b"ack")
        except ConnectionBrokenError as exc:
            ended.append(exc)

    handler = fastnet.callback_handler(acks) if kind == "callback" else acks_in_a_task

    async def scenario() -> None:
        got.clear()
        ended.clear()
        producer.reset()
        path = str(tmp_path / f"reset-{len(list(tmp_path.iterdir()))}.sock")
        kwargs = {"unix": path} if family == "unix" else {}
        async with serving(handler, **kwargs) as server:
            await producer.goes(server, family, path)
            assert server.stats()["frames_in"] == _RESET_FRAMES
        assert got == _RESET_PAYLOADS
        if kind == "task":
            assert len(ended) == 1  # the end of input comes after the last frame

    arun(scenario())


@linux_only
def test_a_framing_error_in_the_input_left_after_a_reset(arun: Runner[Any]) -> None:
    # The frames before the bad bytes are delivered and the error is counted,
    # as on a connection that did not break.
    producer = _Producer(_RESET_REST + (1000).to_bytes(4, "big") + b"x" * 100)  # over max_frame
    got: list[bytes] = []

    def acks(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        got.extend(frames)
        producer.hold()
        return [b"ack"] * len(frames)

    async def scenario() -> None:
        got.clear()
        producer.reset()
        framing = fastnet.LengthPrefixed(max_frame=100)
        async with serving(fastnet.callback_handler(acks), framing=framing) as server:
            await producer.goes(server)
            assert server.stats()["frame_errors"] == 1
        assert got == _RESET_PAYLOADS

    arun(scenario())


@linux_only
def test_a_handler_that_returns_stops_the_reading_of_what_is_left(arun: Runner[Any]) -> None:
    # The handler takes one frame and returns while the rest still waits in
    # the broken connection's socket: the reading stops, its descriptor is
    # closed, the connection ends.
    producer = _Producer(_RESET_REST)
    reading: list[bool] = []

    async def one_then_done(conn: fastnet.Connection) -> None:
        await conn.recv()
        producer.hold()
        with contextlib.suppress(ConnectionBrokenError):
            conn.send(b"ack")
            await conn.drain()
        await asyncio.wait_for(conn.wait_closed(), 5)  # the write failed
        reading.append(conn._leftover is not None)  # paused: the inbox is full

    def sockets() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed
                count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        return count

    async def scenario() -> None:
        producer.reset()
        reading.clear()
        async with serving(one_then_done) as server:
            before = sockets()
            await producer.goes(server)
            assert reading == [True]
            await wait_until(lambda: sockets() <= before, 5.0, "the sockets closed")

    arun(scenario())


def _large_receive_buffer(sock: socket.socket, peer: Any) -> bool:
    # admit=: room for the whole burst, acknowledged while the handler blocks.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return True


@linux_only
def test_close_stops_the_reading_of_what_is_left(arun: Runner[Any]) -> None:
    # A callback handler closes in the first batch read after the break: no
    # batch after it (the probe got 5,807 more frames after close()).
    producer = _Producer(b"".join(frame_bytes(_payload(i)) for i in range(1, 20_000)))  # 3 reads
    batches: list[int] = []

    def closes_in_the_second_batch(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        batches.append(len(frames))
        producer.hold()
        if len(batches) == 2:
            conn.close()
        return [b"ack"] * len(frames)

    async def scenario() -> None:
        batches.clear()
        producer.reset()
        handler = fastnet.callback_handler(closes_in_the_second_batch)
        async with serving(handler, admit=_large_receive_buffer) as server:
            await producer.goes(server)
        assert len(batches) == 2, batches

    arun(scenario())


@linux_only
def test_shutdown_with_a_broken_connection_still_handled(arun: Runner[Any]) -> None:
    # The drain timeout aborts a handler still busy on a connection that
    # broke while its input was being read: the reset must not touch the
    # closed socket (uvloop raised ValueError: negative file descriptor).
    producer = _Producer(_RESET_REST)
    lost: list[bool] = []

    async def slow(conn: fastnet.Connection) -> None:
        await conn.recv()
        producer.hold()
        with contextlib.suppress(ConnectionBrokenError):
            conn.send(b"ack")
            await conn.drain()
        await conn.wait_closed()
        lost.append(True)
        await asyncio.sleep(30)  # busy: only the drain timeout ends it

    async def scenario() -> None:
        producer.reset()
        lost.clear()
        server = fastnet.Server(slow, "127.0.0.1", 0, drain_timeout=0.2)
        await server.start()
        producer_done = asyncio.ensure_future(producer.goes(server))
        try:
            await wait_until(lambda: lost == [True], 10.0, "the connection lost")
        finally:
            producer.released.set()
        await asyncio.wait_for(server.shutdown(), 5)
        await producer_done
        assert server.stats()["active"] == 0

    arun(scenario())
