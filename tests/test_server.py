"""Server behaviour over real sockets on 127.0.0.1: integrity, isolation, limits, timeouts.

Each test runs on both codec backends and both event loops (``arun``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import socket
import sys
import time
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
from fastnet import ConnectionBrokenError, ConnectionClosedError, lingering
from fastnet.apps import KVStore, echo, echo_task
from fastnet.listener import ACCEPT_CAPACITY_ERRNOS, ACCEPT_IGNORABLE_ERRNOS

# The loop/backend fixtures (arun, loop_name, process_variant) live there.
pytest_plugins = ["test_server_support"]


async def echo_for(conn: fastnet.Connection) -> None:
    async for frame in conn:
        conn.send(frame)


ECHOES = {"callback": echo, "recv_batch": echo_task, "async-for": echo_for}


def _random_payloads(rng: random.Random, count: int) -> list[bytes]:
    # Sizes spread log-uniformly over 0 B .. 1 MiB, so small, medium and
    # large frames (the direct-receive and unjoined-write paths) all occur.
    payloads = []
    for i in range(count):
        size = int(2 ** rng.uniform(0, 20)) - 1
        payloads.append(rng.randbytes(16) * (size // 16) + bytes([i % 256]) * (size % 16))
    return payloads


@pytest.mark.parametrize("kind", list(ECHOES))
def test_echo_integrity_under_concurrent_connections(arun: Runner[Any], kind: str) -> None:
    rng = random.Random(1234)
    clients = 12
    per_client = [[*_random_payloads(rng, 10), b"", b"\x00" * (1 << 20)] for _ in range(clients)]

    async def client(port: int, payloads: list[bytes]) -> None:
        async with await fastnet.connect("127.0.0.1", port) as conn:
            # Pipelined in two bursts, so replies and requests interleave.
            half = len(payloads) // 2
            conn.send_many(payloads[:half])
            received = [await conn.recv() for _ in range(3)]
            conn.send_many(payloads[half:])
            while len(received) < len(payloads):
                received += await conn.recv_batch()
            assert len(received) == len(payloads)
            for got, want in zip(received, payloads, strict=True):
                assert got == want

    async def scenario() -> None:
        async with serving(ECHOES[kind]) as server:
            await asyncio.gather(*(client(server.port, p) for p in per_client))
            await wait_until(lambda: server.stats()["active"] == 0)
            stats = server.stats()
            frames = sum(len(p) for p in per_client)
            assert stats["accepted"] == stats["closed"] == clients
            assert stats["frames_in"] == stats["frames_out"] == frames
            assert stats["bytes_in"] == stats["bytes_out"]
            assert stats["handler_errors"] == stats["frame_errors"] == 0

    arun(scenario())


def test_input_after_a_framing_error_is_not_an_error_of_the_server(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with serving(echo_task, framing=fastnet.LengthPrefixed(max_frame=1000)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame_bytes(b"a") + b"\xff\xff\xff\xff")
            with contextlib.suppress(ConnectionError):  # the server goes away meanwhile
                for _ in range(200):  # the peer keeps sending after its bad header
                    if writer.is_closing():  # reset by the server (uvloop raises on write)
                        break
                    writer.write(b"garbage" * 1000)
                    await writer.drain()
                    await asyncio.sleep(0.001)
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == frame_bytes(b"a")
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await wait_until(lambda: server.stats()["active"] == 0)
            assert server.stats()["frame_errors"] == 1

    with caplog.at_level(logging.WARNING):
        arun(scenario())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_an_oversized_header_closes_only_its_connection(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        framing = fastnet.LengthPrefixed(max_frame=1 << 20)
        async with serving(echo, framing=framing) as server:
            good = await fastnet.connect("127.0.0.1", server.port, framing=framing)
            assert await roundtrip(good, [b"before"]) == [b"before"]
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # Two good frames, then a header announcing 4 GiB - 1 (no memory
            # is reserved for it), then bytes that are never looked at.
            writer.write(frame_bytes(b"one") + frame_bytes(b"two") + b"\xff\xff\xff\xff" + b"junk")
            data = await reader.read()  # the frames before the error, then EOF
            assert fastnet.LengthPrefixed().decoder().feed(data) == [b"one", b"two"]
            writer.close()
            await writer.wait_closed()
            assert await roundtrip(good, [b"after"]) == [b"after"]
            stats = server.stats()
            assert stats["frame_errors"] == 1
            assert stats["handler_errors"] == 0
            good.close()
            await good.wait_closed()

    arun(scenario())


def test_an_overlong_line_closes_only_its_connection(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        framing = fastnet.Lines(max_length=100)
        async with serving(echo_task, framing=framing) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"fine\n" + b"x" * 500 + b"\nlater\n")
            assert await reader.read() == b"fine\n"
            writer.close()
            await writer.wait_closed()
            assert server.stats()["frame_errors"] == 1

    arun(scenario())


def test_a_handler_crash_is_logged_counted_and_isolated(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def fragile(conn: fastnet.Connection) -> None:
        async for frame in conn:
            if frame == b"boom":
                raise ValueError("handler blew up")
            conn.send(frame)

    async def scenario() -> None:
        async with serving(fragile) as server:
            good = await fastnet.connect("127.0.0.1", server.port)
            bad = await fastnet.connect("127.0.0.1", server.port)
            bad_port = bad.local[1]
            assert await roundtrip(bad, [b"ok"]) == [b"ok"]
            bad.send(b"boom")
            with pytest.raises(ConnectionBrokenError):
                await bad.recv()
            assert await roundtrip(good, [b"still here"]) == [b"still here"]
            bad.close()  # the server sent FIN and waits for ours (lingering close)
            await wait_until(lambda: server.stats()["active"] == 1)
            assert server.stats()["handler_errors"] == 1
            good.close()
            await good.wait_closed()
        return bad_port

    with caplog.at_level(logging.ERROR, logger="fastnet"):
        bad_port = arun(scenario())
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert f"127.0.0.1:{bad_port}" in message
    assert "handler raised ValueError: handler blew up; closing the connection" in message


def test_a_callback_handler_crash_is_isolated_too(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    @fastnet.callback_handler
    def fragile(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        if b"boom" in frames:
            raise KeyError("boom")
        return frames

    async def scenario() -> None:
        async with serving(fragile) as server:
            good = await fastnet.connect("127.0.0.1", server.port)
            bad = await fastnet.connect("127.0.0.1", server.port)
            bad.send(b"boom")
            with pytest.raises(ConnectionBrokenError):
                await bad.recv()
            assert await roundtrip(good, [b"fine"]) == [b"fine"]
            await wait_until(lambda: server.stats()["handler_errors"] == 1)
            for conn in (good, bad):
                conn.close()
                await conn.wait_closed()

    with caplog.at_level(logging.ERROR, logger="fastnet"):
        arun(scenario())
    assert any("KeyError" in r.getMessage() for r in caplog.records)


def test_max_connections_serves_exactly_n_and_the_next_waits(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo_task, max_connections=2) as server:
            first = await fastnet.connect("127.0.0.1", server.port)
            second = await fastnet.connect("127.0.0.1", server.port)
            assert await roundtrip(first, [b"1"]) == [b"1"]
            assert await roundtrip(second, [b"2"]) == [b"2"]
            # The kernel completes the handshake (the backlog), but the server
            # does not accept: no reply while two connections are open.
            third = await fastnet.connect("127.0.0.1", server.port)
            third.send(b"3")
            reply = asyncio.ensure_future(third.recv())
            done, _ = await asyncio.wait([reply], timeout=0.3)
            assert not done
            assert server.stats()["accepted"] == 2
            first.close()
            await first.wait_closed()
            assert await asyncio.wait_for(reply, 5) == b"3"
            stats = server.stats()
            assert stats["accepted"] == 3 and stats["active"] == 2
            for conn in (second, third):
                conn.close()
                await conn.wait_closed()

    arun(scenario())


def test_idle_timeout_closes_silent_and_half_sent_connections(arun: Runner[Any]) -> None:
    timeout = 0.3

    async def scenario() -> None:
        async with serving(echo_task, idle_timeout=timeout) as server:
            loop = asyncio.get_running_loop()
            start = loop.time()
            silent = await fastnet.connect("127.0.0.1", server.port)
            r_half, w_half = await asyncio.open_connection("127.0.0.1", server.port)
            w_half.write(b"\x00\x00")  # half a header, then nothing
            busy = await fastnet.connect("127.0.0.1", server.port)

            async def keep_busy() -> None:
                for i in range(12):  # 1.2 s of traffic, a frame every 0.1 s
                    assert await roundtrip(busy, [b"%d" % i]) == [b"%d" % i]
                    await asyncio.sleep(0.1)

            busy_task = asyncio.ensure_future(keep_busy())
            with pytest.raises(ConnectionBrokenError):
                await silent.recv()
            silent_closed = loop.time() - start
            assert await r_half.read() == b""
            half_closed = loop.time() - start
            await busy_task  # never idle: still served
            # Closed after the timeout, within the checker's resolution.
            assert timeout <= silent_closed < timeout * 3
            assert timeout <= half_closed < timeout * 3
            assert server.stats()["idle_timeouts"] == 2
            for conn in (silent, busy):
                conn.close()
                await conn.wait_closed()
            w_half.close()
            await w_half.wait_closed()

    arun(scenario())


def test_a_peer_reading_a_large_reply_slowly_is_not_idle(arun: Runner[Any]) -> None:
    # The reply has left the transport for the kernel's send queue, and the
    # peer takes it from there slowly. Before, nothing the transport showed
    # changed, so the idle timeout closed the connection while the peer was
    # still reading (a probe: 8 MiB read over 5 s, idle after 4.3 s). The
    # socket's unacknowledged bytes shrinking now counts as the peer taking
    # our output.
    size = 2 << 20

    async def one_large_reply(conn: fastnet.Connection) -> None:
        async for _ in conn:
            conn.send(b"r" * size)

    def read_slowly(sock: socket.socket) -> tuple[int, float]:
        got = 0
        start = time.monotonic()
        while got < size + 4:
            chunk = sock.recv(16384)
            if not chunk:
                break
            got += len(chunk)
            time.sleep(0.01)  # about 1.6 MB/s
        return got, time.monotonic() - start

    async def scenario() -> None:
        async with serving(one_large_reply, idle_timeout=0.4) as server:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            client.connect(("127.0.0.1", server.port))
            client.settimeout(20)
            try:
                client.sendall(frame_bytes(b"get"))
                loop = asyncio.get_running_loop()
                got, took = await loop.run_in_executor(None, read_slowly, client)
                assert got == size + 4
                assert took > 0.8, "the reply went too fast to test anything"
                assert server.stats()["idle_timeouts"] == 0
            finally:
                client.close()

    arun(scenario())


def test_an_idle_handler_sees_its_input_end(arun: Runner[Any]) -> None:
    seen: list[BaseException] = []

    async def handler(conn: fastnet.Connection) -> None:
        try:
            await conn.recv()
        except ConnectionClosedError as exc:
            seen.append(exc)
            raise

    async def scenario() -> None:
        async with serving(handler, idle_timeout=0.1) as server:
            async with await fastnet.connect("127.0.0.1", server.port):
                await wait_until(lambda: bool(seen))
            assert server.stats()["handler_errors"] == 0  # a normal end

    arun(scenario())
    assert "idle" in str(seen[0])


def test_accept_errors_are_counted_and_never_end_the_loop(arun: Runner[Any]) -> None:
    errors = [
        OSError(errno.ECONNABORTED, "Software caused connection abort"),  # retried at once
        OSError(errno.EMFILE, "Too many open files"),  # backed off, then retried
    ]

    class FlakyListener(socket.socket):
        """A listening socket whose accept() fails as an overloaded system's would."""

        def accept(self) -> tuple[socket.socket, Any]:
            sock, address = super().accept()
            if errors:
                sock.close()
                raise errors.pop(0)
            return sock, address

    async def scenario() -> None:
        listener = FlakyListener(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        async with serving(echo, sock=listener) as server:
            for _ in range(2):  # both dropped by the injected errors
                socket.create_connection(("127.0.0.1", server.port)).close()
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                assert await roundtrip(conn, [b"served"]) == [b"served"]
            stats = server.stats()
            assert stats["accept_errors"] == 2
            assert stats["accepted"] == 1

    arun(scenario())


def test_accept_error_classification_follows_trio() -> None:
    assert {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS} == ACCEPT_CAPACITY_ERRNOS
    for name in ("ECONNABORTED", "EPROTO", "EPERM", "ECONNRESET", "ETIMEDOUT"):
        assert getattr(errno, name) in ACCEPT_IGNORABLE_ERRNOS
    assert not ACCEPT_CAPACITY_ERRNOS & ACCEPT_IGNORABLE_ERRNOS


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_descriptor_leak_after_thousands_of_connections(arun: Runner[Any]) -> None:
    cycles = 2000

    async def one(port: int, i: int) -> None:
        if i % 3 == 0:  # a plain connect and close, no frame
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
        elif i % 3 == 1:  # a reset in the middle of a frame
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00\x00\x00\x10abc")
            await writer.drain()
            writer.transport.abort()
        else:
            async with await fastnet.connect("127.0.0.1", port) as conn:
                assert await roundtrip(conn, [b"%d" % i]) == [b"%d" % i]

    async def scenario() -> None:
        async with serving(echo_task) as server:
            # Warm up first: libuv opens /dev/null once, lazily, as its spare
            # descriptor for EMFILE; that is not a leak.
            await asyncio.gather(*(one(server.port, i) for i in range(3)))
            await wait_until(lambda: server.stats()["active"] == 0, timeout=10)
            before = _open_fds()
            for start in range(0, cycles, 50):  # 50 at a time
                await asyncio.gather(*(one(server.port, i) for i in range(start, start + 50)))
            await wait_until(lambda: server.stats()["active"] == 0, timeout=10)
            assert server.stats()["accepted"] == cycles + 3
            assert _open_fds() == before
        return before

    before = arun(scenario())
    assert _open_fds() <= before  # the listening socket is gone too


def test_bind_error_names_the_address(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            taken = fastnet.Server(echo, "127.0.0.1", server.port)
            with pytest.raises(OSError) as info:
                await taken.start()
            assert info.value.errno == errno.EADDRINUSE
            assert f"127.0.0.1:{server.port}" in str(info.value)

    arun(scenario())


def test_server_properties_and_stats(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        server = fastnet.Server(echo)
        assert server.sockets == () and server.port is None
        await server.shutdown()  # not started: nothing to do
        async with server:
            (sock,) = server.sockets
            assert sock.getsockname() == ("127.0.0.1", server.port)
            assert server.address == f"127.0.0.1:{server.port}"
            assert "serving" in repr(server)
            with pytest.raises(RuntimeError):
                await server.start()
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                assert await roundtrip(conn, [b"ab", b"cd"]) == [b"ab", b"cd"]
                stats = server.stats()
                assert stats["active"] == 1
                assert stats["frames_in"] == 2 and stats["bytes_in"] == 12
        assert server.sockets == ()
        assert set(server.stats()) == {
            "accept_errors",
            "accepted",
            "active",
            "buffered_bytes",
            "bytes_in",
            "bytes_out",
            "closed",
            "frame_errors",
            "frame_timeouts",
            "frames_in",
            "frames_out",
            "handler_errors",
            "idle_timeouts",
            "lines_skipped",
            "overload_episodes",
            "overloaded",
            "peer_table_evictions",
            "proxy_header_errors",
            "proxy_header_timeouts",
            "proxy_untrusted",
            "rejected",
            "rejected_concurrency",
            "rejected_overload",
            "rejected_rate",
            "resets",
            "tls_handshake_errors",
            "tls_handshake_timeouts",
            "tls_handshakes",
            "writes",
        }

    arun(scenario())


def test_buffered_bytes_is_the_live_sum_without_limits(arun: Runner[Any]) -> None:
    # stats()["buffered_bytes"] was the overload watch's last sum, so it read 0
    # with megabytes queued whenever overload_high was unset.
    go = asyncio.Event()

    async def handler(conn: fastnet.Connection) -> None:
        await go.wait()  # the input waits, untaken
        async for frame in conn:
            conn.send(frame)

    async def scenario() -> None:
        nonlocal go
        go = asyncio.Event()
        async with serving(handler) as server:
            assert server.port is not None
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                conn.send_many([b"x" * 1000] * 100)
                await conn.drain()
                await wait_until(
                    lambda: server.stats()["bytes_in"] == 100 * 1004, 5.0, "input read"
                )
                assert server.stats()["buffered_bytes"] == 100 * 1004
                go.set()
                replies: list[bytes] = []
                while len(replies) < 100:
                    replies += await asyncio.wait_for(conn.recv_batch(), 5.0)
                assert replies == [b"x" * 1000] * 100
                await wait_until(lambda: server.stats()["buffered_bytes"] == 0, 5.0, "all taken")

    arun(scenario())


def _have_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
def test_ipv6(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with fastnet.Server(echo, "::1", 0) as server:
            assert server.address == f"[::1]:{server.port}"
            async with await fastnet.connect("::1", server.port) as conn:
                assert await roundtrip(conn, [b"v6"]) == [b"v6"]
            # Only the given interface is bound: the IPv4 loopback refuses.
            with pytest.raises(OSError):
                await fastnet.connect("127.0.0.1", server.port)

    arun(scenario())


def test_serving_a_premade_socket(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        async with fastnet.Server(echo, sock=sock) as server:
            assert server.sockets == (sock,)
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                assert await roundtrip(conn, [b"premade"]) == [b"premade"]
        assert sock.fileno() == -1  # closed by the shutdown

    arun(scenario())


@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")
def test_unix_socket_replaces_a_stale_file_and_removes_its_own(
    arun: Runner[Any], tmp_path: Any
) -> None:
    path = str(tmp_path / "fastnet.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file nobody accepts on
    stale.close()

    async def scenario() -> None:
        async with fastnet.Server(KVStore().handler(), unix=path) as server:
            async with await fastnet.connect(unix=path) as conn:
                assert await roundtrip(conn, [b"SET k v", b"GET k"]) == [b"+OK", b"$v"]
            # A second server on a live path is a bind error.
            with pytest.raises(OSError, match="unix:"):
                await fastnet.Server(echo, unix=path).start()
            assert server.address == f"unix:{path}"
        assert not os.path.exists(path)

    arun(scenario())


def test_kv_app_wire_format(arun: Runner[Any]) -> None:
    requests = [
        b"SET greeting hello world",
        b"get greeting",
        b"SET empty ",
        b"GET empty",
        b"DEL greeting",
        b"DEL greeting",
        b"GET greeting",
        b"SET bin \x00\xff\n",
        b"GET bin",
        b"PING",
        b"SET onlykey",
        b"GET",
        b"GET a b",
        b"GET " + b"k" * 513,
        b"FLY away",
    ]
    replies = [
        b"+OK",
        b"$hello world",
        b"+OK",
        b"$",
        b":1",
        b":0",
        b"_",
        b"+OK",
        b"$\x00\xff\n",
        b"+PONG",
        b"-ERR SET needs a key and a value",
        b"-ERR missing key",
        b"-ERR a key cannot contain spaces",
        b"-ERR key longer than 512 bytes",
        b"-ERR unknown command 'FLY'",
    ]

    async def scenario() -> None:
        async with (
            serving(KVStore(max_keys=3).handler()) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            assert await roundtrip(conn, requests) == replies
            # "empty" and "bin" are stored: room for one more key
            full = await roundtrip(conn, [b"SET k1 v", b"SET k2 v", b"SET k1 again"])
            assert full == [b"+OK", b"-ERR store full", b"+OK"]

    arun(scenario())


def test_invalid_server_arguments() -> None:
    with pytest.raises(TypeError):
        fastnet.Server(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fastnet.Server(echo, max_connections=0)
    with pytest.raises(ValueError):
        fastnet.Server(echo, idle_timeout=0)
    with pytest.raises(ValueError):
        fastnet.Server(echo, drain_timeout=-1)
    with socket.socket() as sock, pytest.raises(ValueError):
        fastnet.Server(echo, sock=sock, unix="/nonexistent")


async def _small_window_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream client with a 16 KiB receive buffer, so a large reply stays queued at the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


@pytest.mark.parametrize("probe", ["siocoutq", "quiet-period"])
def test_last_replies_survive_unread_input_at_close(
    arun: Runner[Any], probe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if probe == "siocoutq" and not sys.platform.startswith("linux"):
        pytest.skip("SIOCOUTQ is Linux only")
    if probe == "quiet-period":  # what other platforms get
        monkeypatch.setattr(lingering, "unacknowledged_probe", lambda transport: None)
    big = b"R" * (4 * 1024 * 1024)

    async def answer_once(conn: fastnet.Connection) -> None:
        await conn.recv()
        conn.send(big)  # more than the kernel buffers hold at once
        # Returning now leaves the client's later frames unread. Closing with
        # unread input would make the kernel reset the connection and drop
        # the reply's tail; the server closes gracefully instead.

    async def scenario() -> None:
        async with serving(answer_once) as server:
            # A small receive buffer keeps most of the reply queued on the
            # server side, in its transport and its kernel send queue.
            reader, writer = await _small_window_client(server.port)
            writer.write(frame_bytes(b"request"))
            await asyncio.sleep(0.2)  # the handler has returned
            writer.write(frame_bytes(b"more") * 1000)  # input the server will not use
            await writer.drain()
            await asyncio.sleep(0.1)
            data = await asyncio.wait_for(reader.read(), 10)  # all of it, then the FIN
            assert data == frame_bytes(big)
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: server.stats()["active"] == 0)

    arun(scenario())


@pytest.mark.parametrize("kind", ["callback", "task"])
def test_a_handlers_close_lingers_over_unread_input(arun: Runner[Any], kind: str) -> None:
    """``conn.close()`` from a handler closes as gracefully as its return does.

    A probe found that a callback handler which answered and called
    ``conn.close()`` while its client was still sending lost the answer: the
    close went straight to ``transport.close()`` with input unread, and the
    kernel reset the connection, dropping the queued reply. The close now
    flushes, sends FIN and reads on until the peer closes (the lingering
    close, bounded by the server), as the end of a handler does.
    """
    big = b"R" * (4 * 1024 * 1024)
    closed: list[bool] = []

    @fastnet.callback_handler
    def callback(conn: fastnet.Connection, frames: list[bytes]) -> None:
        if not closed:
            conn.send(big)
            conn.close()
            closed.append(conn.closing)

    async def task(conn: fastnet.Connection) -> None:
        await conn.recv()
        conn.send(big)
        conn.close()
        closed.append(conn.closing)
        await asyncio.sleep(0.5)  # still running while the input goes unread

    async def scenario() -> None:
        async with serving(callback if kind == "callback" else task) as server:
            reader, writer = await _small_window_client(server.port)
            writer.write(frame_bytes(b"request"))
            await wait_until(lambda: bool(closed))
            writer.write(frame_bytes(b"more") * 1000)  # input the server will not use
            await writer.drain()
            await asyncio.sleep(0.1)
            data = await asyncio.wait_for(reader.read(), 10)  # all of it, then the FIN
            assert data == frame_bytes(big)
            assert closed == [True]
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: server.stats()["active"] == 0)

    arun(scenario())


@pytest.mark.parametrize("kind", sorted(ECHOES))
def test_replies_before_a_framing_error_survive_the_close(arun: Runner[Any], kind: str) -> None:
    """A framing error closes gracefully: every reply owed goes out, then the FIN, no reset.

    The bad frame's body (and whatever follows it) is still unread in the
    socket; closing over it makes the kernel reset the connection and drop
    the replies still queued. A new-user study and an abuse probe both lost
    most of their replies that way; the close now lingers, reading past the
    failed decoder, as it does for any close.
    """
    requests = [b"%05d" % i + b"." * 1000 for i in range(2000)]  # 2 MB of echoes
    bad = (70000).to_bytes(4, "big") + b"x" * 20000  # over max_frame, with its body
    wire = b"".join(frame_bytes(r) for r in requests) + bad

    async def scenario() -> None:
        framing = fastnet.LengthPrefixed(max_frame=65536)
        async with serving(ECHOES[kind], framing=framing) as server:
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            with sock:
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                sending = asyncio.ensure_future(loop.sock_sendall(sock, wire))
                await asyncio.sleep(0.3)  # a client that reads a little later
                got = bytearray()
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10):
                    got += chunk  # a reset raises here
                await asyncio.wait_for(sending, 10)
            assert bytes(got) == b"".join(frame_bytes(r) for r in requests)
            await wait_until(lambda: server.stats()["active"] == 0)
            assert server.stats()["frame_errors"] == 1

    arun(scenario())


def _module_imports(path: Any, *, type_checking: bool) -> set[str]:
    """The fastnet modules ``path`` imports outside functions (TYPE_CHECKING ones if asked)."""
    import ast

    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # a deliberate lazy import (PEP 562 re-exports) is no cycle
            if (
                not type_checking
                and isinstance(child, ast.If)
                and "TYPE_CHECKING" in ast.unparse(child.test)
            ):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                if child.module:
                    found.add(child.module.split(".")[0])
                else:
                    found.update(alias.name for alias in child.names)
            visit(child)

    visit(tree)
    return found


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def walk(name: str) -> None:
        if name in done or name not in graph:
            return
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name) :], name])
        visiting.append(name)
        for target in sorted(graph[name]):
            walk(target)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        walk(name)


# The asyncio layer, where not even type-checking imports may go in a circle
# (connection -> protocol -> server -> connection was one: connections now
# know the server only through _observer.ConnectionObserver). The codec
# layer's dispatcher and twin refer to each other's types, as yarl's do.
ASYNCIO_LAYER = {
    "_observer",
    "connection",
    "listener",
    "protocol",
    "runner",
    "server",
    "supervisor",
}


def test_the_package_has_no_import_cycle() -> None:
    from pathlib import Path

    package = Path(fastnet.__file__).parent
    modules = [p for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert {p.stem for p in modules} >= ASYNCIO_LAYER
    _assert_acyclic({p.stem: _module_imports(p, type_checking=False) for p in modules})
    _assert_acyclic(
        {
            p.stem: _module_imports(p, type_checking=True) & ASYNCIO_LAYER
            for p in modules
            if p.stem in ASYNCIO_LAYER
        }
    )
