"""Connection behaviour over real sockets on 127.0.0.1: receive, send, flow control, close.

Each test runs on both codec backends and both event loops (``arun``).
"""

from __future__ import annotations

import asyncio
import contextvars
import struct
import sys
from typing import Any

import pytest
from test_server_support import (
    Runner,
    frame_bytes,
    roundtrip,
    serving,
    wait_until,
)

import fastnet
from fastnet import (
    ConnectionBrokenError,
    ConnectionBusyError,
    ConnectionClosedError,
    FrameTooLarge,
    WriteBufferFull,
)
from fastnet._tunables import (
    DIRECT_THRESHOLD,
    LARGE_FRAME,
    PAUSE_FAIR,
    PAUSE_INBOX,
    PLAIN_AFTER_READS,
    READ_FAIR_FRAMES,
    READ_HIGH_FRAMES,
)
from fastnet.apps import echo, echo_task
from fastnet.server import run_coroutine

# The loop/backend fixtures (arun, loop_name, process_variant) live there.
pytest_plugins = ["test_server_support"]


async def echo_recv(conn: fastnet.Connection) -> None:
    while True:
        conn.send(await conn.recv())


async def echo_for(conn: fastnet.Connection) -> None:
    async for frame in conn:
        conn.send(frame)


HANDLERS = {
    "callback": echo,
    "recv_batch": echo_task,
    "recv": echo_recv,
    "async-for": echo_for,
}


@pytest.mark.parametrize("kind", list(HANDLERS))
def test_every_receive_form_echoes_in_order(arun: Runner[Any], kind: str) -> None:
    frames = [b"", b"a", b"hello world", bytes(range(256)) * 20, b"x" * 40000]

    async def scenario() -> None:
        async with (
            serving(HANDLERS[kind]) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            assert await roundtrip(conn, frames) == frames
            # one at a time as well, with recv() and async for on the client side
            for frame in frames:
                conn.send(frame)
                assert await conn.recv() == frame
            conn.send_many(frames)
            received = []
            async for frame in conn:
                received.append(frame)
                if len(received) == len(frames):
                    break
            assert received == frames

    arun(scenario())


def test_sends_while_handling_one_batch_leave_in_one_write(arun: Runner[Any]) -> None:
    batches = 0

    async def handler(conn: fastnet.Connection) -> None:
        nonlocal batches
        while True:
            batch = await conn.recv_batch()
            batches += 1
            for frame in batch:  # one send per frame...
                conn.send(frame)

    async def scenario() -> None:
        async with (
            serving(handler) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            frames = [b"%d" % i for i in range(200)]
            assert await roundtrip(conn, frames) == frames
            stats = server.stats()
            # ...and one write per batch: 200 frames in as many writes as batches.
            assert stats["frames_out"] == 200
            assert stats["writes"] == batches < 200

    arun(scenario())


def test_sender_that_never_receives_is_flushed(arun: Runner[Any]) -> None:
    async def greeter(conn: fastnet.Connection) -> None:
        conn.send(b"hello")
        conn.send(b"world")
        await asyncio.sleep(10)  # never waits for input: the call_soon flush sends it

    async def scenario() -> None:
        async with (
            serving(greeter, drain_timeout=0.1) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            assert await conn.recv() == b"hello"
            assert await conn.recv() == b"world"
            assert server.stats()["writes"] == 1

    arun(scenario())


def test_connection_attributes_and_repr(arun: Runner[Any]) -> None:
    seen: dict[str, Any] = {}

    async def handler(conn: fastnet.Connection) -> None:
        seen["peer"] = conn.peer
        seen["local"] = conn.local
        seen["shutting_down"] = conn.shutting_down
        seen["repr"] = repr(conn)
        conn.send(b"ok")
        await conn.recv()

    async def scenario() -> None:
        async with serving(handler) as server:
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                assert await conn.recv() == b"ok"
                assert seen["local"] == ("127.0.0.1", server.port)
                assert seen["peer"] == conn.local
                assert conn.peer == ("127.0.0.1", server.port)
                assert seen["shutting_down"] is False
                assert "open" in seen["repr"] and str(server.port) in seen["repr"]
                assert conn.transport.get_extra_info("peername") == conn.peer
            assert conn.closing
            assert "closed" in repr(conn)

    arun(scenario())


def test_close_is_idempotent_and_later_calls_raise_closed(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send(b"last")
            conn.close()  # flushes "last" first
            conn.close()
            await conn.wait_closed()
            await conn.wait_closed()
            with pytest.raises(ConnectionClosedError):
                conn.send(b"x")
            with pytest.raises(ConnectionClosedError):
                conn.send_many([b"x"])
            with pytest.raises(ConnectionClosedError):
                await conn.recv()
            with pytest.raises(ConnectionClosedError):
                await conn.recv_batch()
            with pytest.raises(ConnectionClosedError):
                await conn.drain()
            with pytest.raises(ConnectionClosedError):  # our own close: async for raises
                async for _ in conn:
                    pass
            await wait_until(lambda: server.stats()["closed"] == 1, what="server-side close")
            assert server.stats()["frames_in"] == 1

    arun(scenario())


def test_peer_end_ends_iteration_and_recv_raises_broken(arun: Runner[Any]) -> None:
    outcome: dict[str, Any] = {}

    async def iterate(conn: fastnet.Connection) -> None:
        frames = [frame async for frame in conn]
        outcome["frames"] = frames
        try:
            await conn.recv()
        except ConnectionBrokenError as exc:
            outcome["recv"] = exc

    async def scenario() -> None:
        async with serving(iterate) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame_bytes(b"one") + frame_bytes(b"two"))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: "recv" in outcome, what="handler end")
        assert outcome["frames"] == [b"one", b"two"]
        assert "closed the connection" in str(outcome["recv"])

    arun(scenario())


def test_replies_reach_a_peer_that_closed_its_sending_side(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo_for) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"".join(frame_bytes(b"%d" % i) for i in range(100)))
            writer.write_eof()  # half-close: the server still answers everything
            data = await reader.read()  # until the server closes
            writer.close()
            await writer.wait_closed()
            assert fastnet.LengthPrefixed().decoder().feed(data) == [b"%d" % i for i in range(100)]

    arun(scenario())


def test_two_receivers_at_once_is_an_error(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with (
            serving(echo) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            first = asyncio.ensure_future(conn.recv())
            await asyncio.sleep(0.01)
            with pytest.raises(ConnectionBusyError):
                await conn.recv_batch()
            conn.send(b"x")
            assert await first == b"x"

    arun(scenario())


def test_a_cancelled_or_timed_out_receive_leaves_the_connection_usable(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with (
            serving(echo) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.recv(), 0.05)
            task = asyncio.ensure_future(conn.recv_batch())
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await roundtrip(conn, [b"still", b"works"]) == [b"still", b"works"]

    arun(scenario())


def test_the_handler_keeps_its_context_across_wakeups(arun: Runner[Any]) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def handler(conn: fastnet.Connection) -> None:
        var.set(f"conn {conn.peer[1]}")
        async for frame in conn:
            conn.send(var.get().encode() + b" " + frame)

    async def scenario() -> None:
        async with (
            serving(handler) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            port = conn.local[1]
            for i in range(3):
                conn.send(b"%d" % i)
                assert await conn.recv() == b"conn %d %d" % (port, i)
            assert var.get() == "unset"

    arun(scenario())


def test_lines_framing(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        framing = fastnet.Lines()
        async with serving(echo_for, framing=framing) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"one\r\ntwo\nthree\n")
            assert await reader.readexactly(14) == b"one\ntwo\nthree\n"
            writer.close()
            await writer.wait_closed()
            async with await fastnet.connect("127.0.0.1", server.port, framing=framing) as conn:
                assert await roundtrip(conn, [b"a b", b"", b"c"]) == [b"a b", b"", b"c"]

    arun(scenario())


def test_large_frames_roundtrip_through_the_unjoined_write_path(arun: Runner[Any]) -> None:
    sizes = [LARGE_FRAME - 1, LARGE_FRAME, 64 * 1024, 1024 * 1024, 10, 3 * 1024 * 1024]
    frames = [bytes([i % 251]) * size for i, size in enumerate(sizes)]

    async def scenario() -> None:
        async with (
            serving(echo_task) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            replies = await roundtrip(conn, frames)
            assert [len(r) for r in replies] == sizes
            assert replies == frames

    arun(scenario())


class _RecordingTransport(asyncio.Transport):
    """A transport that records what it is asked to write (for the no-copy checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[Any]]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", [data]))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", list(list_of_data)))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None:  # as uvloop's, which it may pose as
        self.protocol = protocol

    def close(self) -> None:
        pass


@pytest.mark.parametrize("writelines_ok", [True, False], ids=["writev", "joined"])
def test_large_payloads_are_not_copied_where_writes_are_vectored(
    arun: Runner[Any], writelines_ok: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fastnet._internals

    # The recording transport counts as one of uvloop's stream transports
    # (vectored writelines) or as a transport fastnet does not know.
    monkeypatch.setattr(
        fastnet._internals,
        "UVLOOP_STREAM_TRANSPORTS",
        (_RecordingTransport,) if writelines_ok else (),
    )

    async def scenario() -> None:
        conn = fastnet.Connection(fastnet.LengthPrefixed())
        transport = _RecordingTransport()
        conn.connection_made(transport)
        assert (conn._write_buffers is not None) is writelines_ok
        big = b"B" * (64 * 1024)
        conn.send_many([b"a", b"b", big, b"c"])
        await conn.drain()
        if writelines_ok:  # [a b joined, length field] [the payload itself] [c]
            ((name, buffers),) = transport.calls
            assert name == "writelines" and len(buffers) == 3
            assert buffers[1] is big
        else:  # one joined write
            ((name, buffers),) = transport.calls
            assert name == "write"
        wire = b"".join(frame_bytes(p) for p in [b"a", b"b", big, b"c"])
        assert b"".join(buffers) == wire
        assert conn.frames_out == 4 and conn.bytes_out == len(wire)

    arun(scenario())


# uvloop's read buffer (Loop._recv_buffer): the most one plain read takes.
UVLOOP_READ = 256 * 1024


def test_reading_pauses_while_the_handler_falls_behind(arun: Runner[Any]) -> None:
    # More than one read of any size, at 5 wire bytes per frame.
    FRAMES = 2 * UVLOOP_READ // 5
    state: dict[str, Any] = {"go": None}

    async def lazy(conn: fastnet.Connection) -> None:
        state["conn"] = conn
        await state["go"].wait()  # takes nothing for now
        count = 0
        while count < FRAMES:
            await conn.recv()
            count += 1
        conn.send(b"%d" % count)
        await conn.drain()

    async def scenario() -> None:
        state["go"] = asyncio.Event()
        async with (
            serving(lazy) as server,
            await fastnet.connect("127.0.0.1", server.port) as client,
        ):
            client.send_many([b"x"] * FRAMES)
            await client.drain()
            await wait_until(lambda: "conn" in state and state["conn"]._read_paused & PAUSE_INBOX)
            conn = state["conn"]
            queued = len(conn._inbox) - conn._pos
            # Paused after passing the mark, at most one read later: 64 KiB
            # through get_buffer, or uvloop's own read buffer in plain reads
            # (on uvloop the read past the mark may have been plain: a bulk
            # read switches to get_buffer, BULK_READ).
            read = UVLOOP_READ if conn._strategy.kind == "uvloop" else 65536
            assert READ_HIGH_FRAMES < queued <= READ_HIGH_FRAMES + read // 5
            await asyncio.sleep(0.05)
            assert len(conn._inbox) - conn._pos == queued  # nothing more was read
            state["go"].set()
            assert await client.recv() == b"%d" % FRAMES
            assert not conn._read_paused

    arun(scenario())


def test_a_flood_is_read_in_windows_not_in_uvloops_buffer(arun: Runner[Any]) -> None:
    # uvloop's plain reads fill its own 256 KiB buffer: a flood of tiny frames
    # made each handler call four times a window's frames (the pure backend
    # kept a healthy client's pings 0.9-1.4 s behind). After one bulk read the
    # connection reads through get_buffer, whose window bounds each read.
    batches: list[int] = []
    frames = 1_000_000 // 5  # 1 MB of 1-byte frames

    def counts(conn: fastnet.Connection, got: list[bytes]) -> None:
        batches.append(len(got))

    async def scenario() -> None:
        batches.clear()
        async with serving(fastnet.callback_handler(counts)) as server:
            writer = (await asyncio.open_connection("127.0.0.1", server.port))[1]
            writer.write(b"\0\0\0\1x" * frames)
            await writer.drain()
            await wait_until(lambda: sum(batches) == frames, 10.0, "every frame")
            writer.close()
        window = 65536 // 5
        assert len([n for n in batches if n > window + 1]) <= 1, batches

    arun(scenario())


def test_drain_waits_while_the_peer_does_not_read(arun: Runner[Any]) -> None:
    state: dict[str, Any] = {}

    async def producer(conn: fastnet.Connection) -> None:
        chunk = b"p" * 65536
        sent = 0
        drains = 0
        while not conn.closing:
            conn.send(chunk)
            sent += 1
            await conn.drain()
            drains += 1
            state["sent"] = sent
            state["buffered"] = max(
                state.get("buffered", 0), conn.transport.get_write_buffer_size()
            )

    async def scenario() -> None:
        async with serving(producer, drain_timeout=0.2) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await wait_until(lambda: state.get("sent", 0) > 4)
            await asyncio.sleep(0.3)  # the client reads nothing: the producer is stuck in drain
            stuck_at = state["sent"]
            await asyncio.sleep(0.2)
            assert state["sent"] == stuck_at
            assert state["buffered"] <= 256 * 1024  # drain kept the buffer near the mark
            # Reading lets it go on (once the kernel buffers have room again).
            for _ in range(10000):
                if state["sent"] > stuck_at:
                    break
                await asyncio.wait_for(reader.read(65536), 5)
            assert state["sent"] > stuck_at
            writer.close()
            await writer.wait_closed()

    arun(scenario())


def test_a_handler_that_never_drains_gets_write_buffer_full(arun: Runner[Any]) -> None:
    limit = 512 * 1024
    state: dict[str, Any] = {}

    async def flooder(conn: fastnet.Connection) -> None:
        chunk = b"f" * 16384
        try:
            for _ in range(100000):  # bounded; about 1.6 GB if nothing stopped it
                conn.send(chunk)
                await asyncio.sleep(0)
        except WriteBufferFull as exc:
            state["error"] = exc
            state["buffered"] = conn.transport.get_write_buffer_size()
            raise

    async def scenario() -> None:
        async with serving(flooder, max_write_buffer=limit) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await wait_until(lambda: "error" in state, timeout=20)
            # Checked at send, exactly: the frame that did not fit was refused.
            assert limit - 16388 < state["buffered"] <= limit
            assert "drain" in str(state["error"])
            await wait_until(lambda: server.stats()["handler_errors"] == 1)
            writer.close()
            await writer.wait_closed()

    arun(scenario())


@pytest.mark.parametrize("kind", ["callback", "recv_batch"])
def test_a_client_that_sends_without_reading_leaves_server_memory_bounded(
    arun: Runner[Any], kind: str
) -> None:
    async def scenario() -> None:
        async with serving(HANDLERS[kind]) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            request = frame_bytes(b"r" * 1000)
            # Push up to 64 MB of requests without reading a single reply; the
            # server stops reading once its replies back up, so our writes
            # back up too and the loop ends early.
            pushed = 0
            for _ in range(64 * 1024):
                writer.write(request)
                pushed += len(request)
                if writer.transport.get_write_buffer_size() > 4 * 1024 * 1024:
                    break
            await asyncio.sleep(0.3)
            (conn,) = server._connections
            assert conn._read_paused  # the server stopped reading from this client
            server_buffered = conn.transport.get_write_buffer_size()
            # Replies queued on the server: under its 64 KiB write mark plus
            # the replies to one read (64 KiB of requests) and the decoder's
            # own buffer; far below what was pushed.
            assert server_buffered < 512 * 1024
            assert pushed > 8 * server_buffered
            assert conn.bytes_in < pushed
            writer.transport.abort()
            await wait_until(lambda: server.stats()["active"] == 0)

    arun(scenario())


def test_a_frame_that_cannot_be_encoded_is_refused_at_send(arun: Runner[Any]) -> None:
    # The error is raised by send() in the caller, with nothing queued: the
    # frames before and after it go out and the connection stays usable.
    outcome: dict[str, Any] = {}

    async def handler(conn: fastnet.Connection) -> None:
        async for frame in conn:
            if frame == b"big":
                conn.send(b"before")
                try:
                    conn.send(b"x" * 2000)  # over max_frame
                except FrameTooLarge as exc:
                    outcome["error"] = exc
                try:
                    conn.send_many([b"ok", b"y" * 2000])  # all or nothing
                except FrameTooLarge as exc:
                    outcome["many"] = exc
                conn.send(b"after")
                continue
            conn.send(frame)

    async def scenario() -> None:
        framing = fastnet.LengthPrefixed(max_frame=1000)
        async with serving(handler, framing=framing) as server:
            conn = await fastnet.connect("127.0.0.1", server.port, framing=framing)
            conn.send(b"big")
            assert await conn.recv() == b"before"
            assert await conn.recv() == b"after"
            assert isinstance(outcome["error"], FrameTooLarge)
            assert isinstance(outcome["many"], FrameTooLarge)
            assert await roundtrip(conn, [b"fine"]) == [b"fine"]
            assert server.stats()["handler_errors"] == 0
            conn.close()
            await conn.wait_closed()

    arun(scenario())


def test_a_callback_reply_that_cannot_be_encoded_fails_only_its_connection(
    arun: Runner[Any],
) -> None:
    @fastnet.callback_handler
    def handler(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        return [b"x" * 2000 if f == b"big" else f for f in frames]

    async def scenario() -> None:
        framing = fastnet.LengthPrefixed(max_frame=1000)
        async with serving(handler, framing=framing) as server:
            good = await fastnet.connect("127.0.0.1", server.port, framing=framing)
            bad = await fastnet.connect("127.0.0.1", server.port, framing=framing)
            bad.send(b"big")
            with pytest.raises(ConnectionBrokenError):
                await bad.recv()
            assert await roundtrip(good, [b"fine"]) == [b"fine"]
            await wait_until(lambda: server.stats()["handler_errors"] == 1)
            for conn in (good, bad):
                conn.close()
                await conn.wait_closed()

    arun(scenario())


def test_callback_handler_replies_and_sends(arun: Runner[Any]) -> None:
    @fastnet.callback_handler
    def handler(conn: fastnet.Connection, frames: list[bytes]) -> Any:
        if frames[0] == b"close":
            conn.send(b"bye")
            conn.close()
            return None
        conn.send(b"count %d" % len(frames))
        return (f.upper() for f in frames)  # any iterable

    async def scenario() -> None:
        async with serving(handler) as server:
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                replies = await roundtrip(conn, [b"a", b"b"])
                assert replies in ([b"count 2", b"A", b"B"], [b"count 1", b"A", b"count 1"])
                if len(replies) == 3 and replies[2] == b"count 1":  # arrived in two reads
                    assert await conn.recv() == b"B"
                conn.send(b"close")
                assert await conn.recv() == b"bye"
                with pytest.raises(ConnectionBrokenError):
                    await conn.recv()
            assert "CallbackHandler" in repr(handler)

    arun(scenario())


def test_client_connection_over_a_unix_socket(arun: Runner[Any], tmp_path: Any) -> None:
    path = str(tmp_path / "s.sock")

    async def scenario() -> None:
        async with fastnet.Server(echo, unix=path) as server:
            assert server.port is None and server.address == f"unix:{path}"
            async with await fastnet.connect(unix=path) as conn:
                assert await roundtrip(conn, [b"over", b"unix"]) == [b"over", b"unix"]

    arun(scenario())


def test_connect_needs_a_port(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        with pytest.raises(TypeError, match="port"):
            await fastnet.connect("127.0.0.1")

    arun(scenario())


def test_frames_cross_reads_in_any_split(arun: Runner[Any]) -> None:
    payloads = [b"", b"x" * 5, b"y" * 70000, b"z"]
    wire = b"".join(frame_bytes(p) for p in payloads)

    async def scenario() -> None:
        async with serving(echo) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            for i in range(0, len(wire), 997):  # odd-sized pieces that split headers
                writer.write(wire[i : i + 997])
                await writer.drain()
                await asyncio.sleep(0)
            data = await reader.readexactly(len(wire))
            assert data == wire
            writer.close()
            await writer.wait_closed()

    arun(scenario())


def test_uvloop_reads_plain_between_large_frames_and_into_them_directly(
    arun: Runner[Any],
) -> None:
    # On uvloop small frames come through _PlainReads.data_received; a large
    # frame begun in a read makes the connection the protocol again, so the
    # rest is received straight into the frame's object, until
    # PLAIN_AFTER_READS reads in a row begin none. Other loops always read
    # through get_buffer. Every frame arrives either way.
    small = [bytes([i]) * (i + 1) for i in range(PLAIN_AFTER_READS + 4)]
    large = b"L" * (DIRECT_THRESHOLD * 3)
    seen: list[tuple[int, str]] = []

    @fastnet.callback_handler
    def record(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        reader = type(conn._transport.get_protocol()).__name__  # type: ignore[attr-defined]
        seen.extend((len(f), reader) for f in frames)
        return frames

    async def scenario() -> None:
        uv = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with serving(record) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

            async def echoed(wire: bytes, *, split: int = 0) -> None:
                if split:  # the large frame's header and first bytes come alone
                    writer.write(wire[:split])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    wire = wire[split:]
                writer.write(wire)
                await writer.drain()

            sent = [*small, large, *small]
            for frame in sent:  # one at a time: a read each, at least
                wire = frame_bytes(frame)
                await echoed(wire, split=1000 if frame is large else 0)
                assert await reader.readexactly(len(wire)) == wire
            writer.close()
            await writer.wait_closed()
        assert [n for n, _ in seen] == [len(f) for f in sent]
        readers = [r for _, r in seen]
        n = len(small)
        if not uv:
            assert "_PlainReads" not in readers
            return
        assert set(readers[:n]) == {"_PlainReads"}  # from the start
        assert readers[n] != "_PlainReads"  # the large frame's rest: through get_buffer
        assert readers[n + 1] != "_PlainReads"  # reads after it, until ...
        assert set(readers[-3:]) == {"_PlainReads"}  # ... PLAIN_AFTER_READS of them

    arun(scenario())


def test_little_endian_two_byte_framing(arun: Runner[Any]) -> None:
    framing = fastnet.LengthPrefixed(length_size=2, byteorder="little")

    async def scenario() -> None:
        async with serving(echo, framing=framing) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(struct.pack("<H", 3) + b"abc")
            assert await reader.readexactly(5) == b"\x03\x00abc"
            writer.close()
            await writer.wait_closed()

    arun(scenario())


def test_large_frames_of_any_buffer_type_keep_their_byte_length(arun: Runner[Any]) -> None:
    # A length field counts bytes. len() of an array('i'), or of a memoryview
    # of one, counts items: such a frame must be encoded (copied), not sent as
    # [len() as length field, buffer], which would corrupt the stream.
    import array

    ints = array.array("i", range(40000))  # 160,000 bytes, len() 40,000
    data = bytes(range(256)) * 256
    frames: list[Any] = [
        ints,
        memoryview(ints),
        memoryview(ints).cast("B"),
        bytearray(data),
        memoryview(data)[1:-1],
        data,
    ]

    async def scenario() -> None:
        async with serving(echo) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            try:
                replies = await roundtrip(conn, frames)
            finally:
                conn.close()
            assert replies == [bytes(f) for f in frames]

    arun(scenario())


class _VectorIORecorder:
    """Wraps os.writev or os.readv: the buffer lists, byte counts and errors of its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        import os

        self.calls: list[list[Any]] = []
        self.results: list[int] = []
        self.errors: list[OSError] = []
        self._real = getattr(os, name)
        monkeypatch.setattr(os, name, self)

    def __call__(self, fd: int, buffers: Any) -> int:
        self.calls.append(list(buffers))
        try:
            n: int = self._real(fd, buffers)
        except OSError as exc:
            self.errors.append(exc)
            raise
        self.results.append(n)
        return n


async def _read_exactly(sock: Any, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, min(1 << 20, n - len(got)))
        assert chunk, "peer closed early"
        got += chunk
    return bytes(got)


# fastnet makes the vectored write itself only on CPython's selector
# transport (uvloop's writelines is tested above), so these run on asyncio,
# with both codecs.


def test_asyncio_vectored_write_sends_payload_objects_unjoined(
    codec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The payload objects are the iovecs. A payload larger than the socket
    # buffer makes writev partial and the rest goes through the transport's
    # buffer; a batch sent while that buffer is not empty is joined behind
    # it. The peer must get every byte, in order.
    import socket

    writev = _VectorIORecorder(monkeypatch, "writev")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        try:
            _, conn = await loop.connect_accepted_socket(
                lambda: fastnet.Connection(fastnet.LengthPrefixed()), ours
            )
            big = bytes(range(256)) * 256  # 64 KiB
            huge = b"H" * (4 << 20)  # far more than the socket buffer holds
            batches = [[b"a", big, b"b"], [huge], [big, big], [b"tail"]]
            for batch in batches:
                conn.send_many(batch)
                conn._flush()  # one batch, one write, as a handler's wait would do
            wire = b"".join(frame_bytes(p) for batch in batches for p in batch)
            assert await _read_exactly(theirs, len(wire)) == wire
            await conn.drain()
            # [a + big's length field] [big] [b's frame], then [length field] [huge]
            assert [len(c) for c in writev.calls] == [3, 2], "one writev per batch while unbuffered"
            assert writev.calls[0][1] is big and writev.calls[1][1] is huge, "a payload was copied"
            conn.close()
            await conn.wait_closed()
        finally:
            theirs.close()

    run_coroutine(asyncio.wait_for(scenario(), 30), loop="asyncio")


def test_asyncio_vectored_write_to_a_reset_peer_reports_the_reset(
    codec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # writev meets ECONNRESET, which the kernel reports once: the connection
    # fails with that error as its cause, not with the EPIPE a second send
    # would meet.
    import socket

    writev = _VectorIORecorder(monkeypatch, "writev")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname()[:2])
            served, _ = listener.accept()
        _, conn = await loop.connect_accepted_socket(
            lambda: fastnet.Connection(fastnet.LengthPrefixed()), served
        )
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST, delivered at once on loopback
        conn.send(b"x" * (64 * 1024))
        conn._flush()
        with pytest.raises(ConnectionBrokenError) as info:
            await conn.drain()
            await conn.recv()
        assert isinstance(info.value.__cause__, ConnectionResetError), repr(info.value.__cause__)
        assert [type(e) for e in writev.errors] == [ConnectionResetError]
        await conn.wait_closed()

    run_coroutine(asyncio.wait_for(scenario(), 30), loop="asyncio")


def test_asyncio_vectored_write_refuses_to_interleave_with_sendfile(codec: Any) -> None:
    # While loop.sendfile() runs, the transport's buffer is empty; a direct
    # writev would put a frame among the file's bytes. The transport's own
    # check refuses the write instead, as it refuses a joined one.
    import socket
    import tempfile

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        _, conn = await loop.connect_accepted_socket(
            lambda: fastnet.Connection(fastnet.LengthPrefixed()), ours
        )
        size = 8 << 20
        with tempfile.TemporaryFile() as file:
            file.write(b"F" * size)
            file.seek(0)
            sending = asyncio.ensure_future(loop.sendfile(conn._transport, file))
            await asyncio.sleep(0.05)  # the socket buffer is full; sendfile waits for room
            got = bytearray(theirs.recv(1 << 20))
            conn.send(b"P" * (64 * 1024))
            with pytest.raises(RuntimeError, match="sendfile"):
                conn._flush()
            while len(got) < size:
                try:
                    got += theirs.recv(1 << 20)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            assert await sending == size
        assert got == b"F" * size
        conn.abort()
        theirs.close()

    run_coroutine(asyncio.wait_for(scenario(), 30), loop="asyncio")


def test_asyncio_reads_on_while_reads_fill_their_window(
    codec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large frames arrive as reads of a payload and the next header, each of
    # which fills its window: fastnet reads on (os.readv) instead of going
    # back to the selector each time. Every frame must still arrive whole and
    # in order, and the end of the stream must still be seen after them.
    import socket

    readv = _VectorIORecorder(monkeypatch, "readv")
    payloads = [bytes([i]) * (40000 + 997 * i) for i in range(40)]
    wire = b"".join(frame_bytes(p) for p in payloads)

    async def scenario() -> None:
        async with serving(echo) as server:
            loop = asyncio.get_running_loop()
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.setblocking(False)
                await loop.sock_sendall(client, wire)
                client.shutdown(socket.SHUT_WR)  # the end comes right behind the frames
                got = bytearray()
                while chunk := await loop.sock_recv(client, 1 << 20):
                    got += chunk
            assert bytes(got) == wire
            assert server.stats()["frames_in"] == len(payloads)
        # It read on, frame after frame: one read per frame (the payload's rest
        # and the next header), most of the stream without the selector.
        assert len(readv.results) >= len(payloads) // 2, readv.results
        assert sum(readv.results) >= len(wire) // 2, readv.results

    run_coroutine(asyncio.wait_for(scenario(), 30), loop="asyncio")


def test_asyncio_small_frames_are_never_read_on(
    codec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client pipelining small frames fills every 64 KiB read; reading on
    # there would let it hold the loop for many reads per event while other
    # connections wait. Only large frames are read on.
    import socket

    readv = _VectorIORecorder(monkeypatch, "readv")
    wire = frame_bytes(b"s" * 60) * 40000  # 2.5 MiB of 64-byte frames

    async def scenario() -> None:
        async with serving(echo) as server:
            loop = asyncio.get_running_loop()
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.setblocking(False)
                sending = loop.create_task(loop.sock_sendall(client, wire))
                got = 0
                while got < len(wire):
                    chunk = await loop.sock_recv(client, 1 << 20)
                    assert chunk
                    got += len(chunk)
                await sending
        assert readv.results == []

    run_coroutine(asyncio.wait_for(scenario(), 30), loop="asyncio")


def test_asyncio_reading_on_stops_when_reading_pauses(codec: Any) -> None:
    # A handler that takes nothing: reading pauses once 4 MiB of 64 KiB frames
    # are queued, and reading on must stop there too, not a burst later.
    import socket

    from fastnet.protocol import READ_HIGH_BYTES

    state: dict[str, Any] = {}

    async def idle(conn: fastnet.Connection) -> None:
        state["conn"] = conn
        await state["done"].wait()

    async def scenario() -> None:
        state["done"] = asyncio.Event()
        async with serving(idle) as server:
            loop = asyncio.get_running_loop()
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.setblocking(False)
                wire = frame_bytes(b"z" * 65536) * 160  # 10 MiB
                sending = loop.create_task(loop.sock_sendall(client, wire))
                await wait_until(
                    lambda: "conn" in state and state["conn"]._read_paused & PAUSE_INBOX
                )
                conn = state["conn"]
                received = conn.bytes_in
                assert READ_HIGH_BYTES < received <= READ_HIGH_BYTES + 2 * (65536 + 4)
                await asyncio.sleep(0.1)
                assert conn.bytes_in == received  # nothing more was read
                sending.cancel()
                await asyncio.wait((sending,))
                state["done"].set()

    run_coroutine(asyncio.wait_for(scenario(), 30), loop="asyncio")


def test_a_read_of_very_many_frames_yields_to_the_loop(arun: Runner[Any]) -> None:
    """A read that delivers more than READ_FAIR_FRAMES frames pauses reading until the
    loop's next turn (uvloop reads a stream up to 32 times per event otherwise), then
    resumes: nothing is lost, and smaller reads never pause."""
    seen: list[tuple[int, bool, bool]] = []

    @fastnet.callback_handler
    def record(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        paused = bool(conn._read_paused & PAUSE_FAIR)
        seen.append((len(frames), paused, conn.transport.is_reading()))
        return frames

    total = 4 * 16384  # 256 KiB of zero-length frames: reads of up to 16,384 frames

    async def scenario() -> int:
        async with serving(record) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\0\0\0\0" * total)
            echoed = await asyncio.wait_for(reader.readexactly(4 * total), 20.0)
            writer.close()
            return len(echoed)

    assert arun(scenario()) == 4 * total
    assert sum(n for n, _, _ in seen) == total
    assert any(n > READ_FAIR_FRAMES for n, _, _ in seen), f"no large read: {seen[:8]}"
    for n, paused, reading in seen:
        assert paused == (n > READ_FAIR_FRAMES), (n, paused)
        if paused:
            assert not reading


def test_the_connection_class_still_shows_the_receive_api() -> None:
    # recv_batch/recv/__anext__ are the connection core's (as send is);
    # Connection itself still shows them: help(), documentation tools,
    # mock.create_autospec(fastnet.Connection) and
    # issubclass(Connection, AsyncIterator) all read the class.
    import collections.abc
    from unittest import mock

    for name in ("send", "recv_batch", "recv", "__anext__"):
        assert hasattr(fastnet.Connection, name), name
    assert issubclass(fastnet.Connection, collections.abc.AsyncIterator)
    spec = mock.create_autospec(fastnet.Connection, instance=True)
    assert spec.recv is not None and spec.recv_batch is not None


def test_a_subclass_cannot_silently_replace_what_the_core_implements() -> None:
    # The core comes first in every connection's class, so an override of
    # one of its methods would never run: the class statement fails instead.
    for name in ("recv", "send", "__init__", "buffer_updated"):
        with pytest.raises(TypeError, match=name):
            type("Mine", (fastnet.Connection,), {name: lambda self, *a: None})

    class Tagged(fastnet.Connection):
        __slots__ = ()

        def describe(self) -> str:
            return f"tagged {self.peer}"

    async def make() -> Tagged:
        return Tagged(fastnet.LengthPrefixed())

    conn = asyncio.run(make())
    assert type(conn).__mro__[1] is fastnet.framing.ConnectionCore
    assert isinstance(conn, Tagged) and conn.describe() == "tagged None"


def test_two_receivers_cancelled_in_one_loop_turn_are_both_cancelled(arun: Runner[Any]) -> None:
    # A waits and is cancelled; before A's wake-up runs, B begins waiting
    # (A no longer does) and is cancelled too. Each must end cancelled, with
    # its own message: a pending cancel shared by the wake-up let A take
    # B's, and left B waiting (a probe's finding).
    async def scenario() -> None:
        async with (
            serving(echo) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            a = asyncio.ensure_future(conn.recv())
            await asyncio.sleep(0.01)  # A waits on the wake-up
            b = asyncio.ensure_future(conn.recv())  # B's first step is queued first

            async def cancel_b() -> None:
                assert b.cancel("from B")

            canceller = asyncio.ensure_future(cancel_b())  # after B waits, before A runs
            assert a.cancel("from A")
            _, pending = await asyncio.wait({a, b}, timeout=2.0)
            for task in pending:
                task.cancel()
            await canceller
            assert not pending, "a cancelled receiver kept waiting"
            for task, msg in ((a, "from A"), (b, "from B")):
                with pytest.raises(asyncio.CancelledError) as raised:
                    task.result()
                if sys.version_info >= (3, 11):  # 3.10 drops the message on the way
                    assert raised.value.args == (msg,)
            assert await roundtrip(conn, [b"still", b"works"]) == [b"still", b"works"]

    arun(scenario())


@pytest.mark.c_extension
def test_the_cores_public_docstrings_match() -> None:
    # help(fastnet.Connection.recv) shows the core in use: both cores say
    # the same (the compiled one has its signature line first).
    import importlib
    import inspect

    c = importlib.import_module("fastnet._core").ConnectionCore
    py = importlib.import_module("fastnet._core_py").ConnectionCore

    def doc(obj: Any, name: str) -> str:
        text = inspect.cleandoc(obj.__doc__ or "")
        first, _, rest = text.partition("\n")
        signed = first.startswith((f"{name}(", f"ConnectionCore.{name}("))
        return inspect.cleandoc(rest) if signed else text

    names = ("recv_batch", "recv", "__anext__", "send", "send_many", "try_send")
    names += ("write_buffer_size", "writable")
    for name in names:
        assert doc(getattr(py, name), name), name
        assert doc(getattr(c, name), name) == doc(getattr(py, name), name), name
