"""Server behaviour under abuse and overload: each test is the regression test of a bug found
by an abuse probe (slowloris, slow readers, EMFILE, lingering closes, connect bursts, floods of
framing errors), or of a seam (the admission hook).

In-process tests run on both codec backends and both event loops (``arun``); the EMFILE test
runs a real server process under a lowered descriptor limit, on both loops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import resource
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_server_support import (
    HAVE_UVLOOP,
    Runner,
    frame_bytes,
    roundtrip,
    server_process,
    serving,
    wait_until,
)

import fastnet
from fastnet import lingering, supervisor
from fastnet.apps import echo, echo_task
from fastnet.listener import ACCEPT_BATCH

pytest_plugins = ["test_server_support"]

LINUX = sys.platform.startswith("linux")


# ------------------------------------------------------------ lingering close


@pytest.mark.skipif(not LINUX, reason="SIOCOUTQ is Linux only")
def test_a_lingering_close_backs_off_instead_of_polling(
    arun: Runner[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Clients that never read leave the server's last replies unacknowledged
    # in its kernel send queue (all of it fits there: a large SO_SNDBUF, a
    # tiny client window), so every check of a lingering close asks SIOCOUTQ.
    # A 20 ms poll would ask 75 times in 1.5 s; backing off from 20 ms
    # (doubling to 1 s) asks about 6 times.
    checks: collections.Counter[int] = collections.Counter()
    real_probe = lingering.unacknowledged_probe

    def counting_probe(transport: asyncio.BaseTransport) -> Any:
        probe = real_probe(transport)
        assert probe is not None
        key = id(transport)

        def counted() -> int:
            checks[key] += 1
            return probe()

        return counted

    monkeypatch.setattr(lingering, "unacknowledged_probe", counting_probe)
    reply = b"R" * (128 * 1024)

    async def answer_once(conn: fastnet.Connection) -> None:
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024
        )
        await conn.recv()
        conn.send(reply)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        clients = []
        async with serving(answer_once) as server:
            for _ in range(4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                await loop.sock_sendall(sock, frame_bytes(b"request"))
                clients.append(sock)
            await wait_until(lambda: len(checks) == 4, what="four lingering closes")
            await asyncio.sleep(1.5)
            assert server.stats()["active"] == 4  # still lingering: nothing was read
            per_connection = sorted(checks.values())
            assert per_connection[0] >= 2, per_connection  # it does look
            assert per_connection[-1] <= 12, per_connection  # but backs off
            for sock in clients:
                sock.close()  # unread data: a reset, which ends the lingering
            await wait_until(lambda: server.stats()["active"] == 0)

    arun(scenario())


EMFILE_APP = textwrap.dedent(
    """
    async def once(conn):
        await conn.recv()
        conn.send(b"ok")
    """
)


def _sockets(pid: int) -> int:
    # Sockets only: an event loop may open other descriptors lazily (uvloop
    # opens /dev/null once the limit is hit).
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize(
    "loop",
    [
        "asyncio",
        pytest.param("uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="no uvloop")),
    ],
)
def test_emfile_before_the_first_lingering_close_leaks_nothing(loop: str, tmp_path: Path) -> None:
    # 64 descriptors, 104 clients, a handler that answers one frame and
    # returns: the server runs out of descriptors before its first lingering
    # close. Every client must still be answered and closed, and nothing may
    # escape a connection's task.
    (tmp_path / "emfileapp.py").write_text(EMFILE_APP)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    clients = 104
    args = ["emfileapp:once", "--port", "0", "--loop", loop, "--drain-timeout", "5"]
    # The pure backend: the bug is the supervisor's, and this runs in pure-only venvs too.
    with server_process(args, backend="py", cwd=tmp_path, preexec_fn=limit) as server:
        pid = server.proc.pid
        baseline = _sockets(pid)  # the listening socket

        async def client() -> tuple[bytes, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(frame_bytes(b"hello"))
                reply = await asyncio.wait_for(reader.readexactly(6), 30)
                rest = await asyncio.wait_for(reader.read(), 30)  # the server's FIN
                return reply, rest
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        async def all_clients() -> list[tuple[bytes, bytes]]:
            return await asyncio.gather(*(client() for _ in range(clients)))

        results = asyncio.run(asyncio.wait_for(all_clients(), 60))
        assert results == [(frame_bytes(b"ok"), b"")] * clients
        deadline = time.monotonic() + 10
        while _sockets(pid) > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sockets(pid) == baseline  # every connection closed
        server.signal()
        status, _, err = server.wait(15)
    assert status == 0, err
    assert "never retrieved" not in err
    assert "Traceback" not in err
    assert "EMFILE" in err or "Too many open files" in err  # the limit was reached


# ---------------------------------------------------------------- timeouts


def test_the_idle_timeout_spares_a_slow_reader(arun: Runner[Any]) -> None:
    # The client pipelines 64 KiB frames and reads the echoes slowly, 8 KiB
    # every 0.1 s. The server's reading stays paused by its own write
    # backpressure for longer than the idle timeout at a time, while the
    # client keeps taking output: busy, not idle.
    frames = [bytes([i]) * 65536 for i in range(3)]
    wire = b"".join(frame_bytes(f) for f in frames)

    async def echo_small_buffers(conn: fastnet.Connection) -> None:
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
        )
        async for frame in conn:
            conn.send(frame)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with serving(echo_small_buffers, idle_timeout=0.5) as server:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            sending = asyncio.ensure_future(loop.sock_sendall(sock, wire))
            received = bytearray()
            for _ in range(600):  # at most 60 s
                if len(received) >= len(wire):
                    break
                chunk = await loop.sock_recv(sock, 8192)
                if not chunk:
                    break
                received += chunk
                await asyncio.sleep(0.1)
            await sending
            assert bytes(received) == wire
            assert server.stats()["idle_timeouts"] == 0
            sock.close()

    arun(scenario())


def test_the_frame_timeout_frees_slots_held_by_slowloris_clients(arun: Runner[Any]) -> None:
    # Eight clients each trickle one byte every 0.2 s of a 1000-byte frame
    # into a server with four slots; a healthy client queues behind them.
    wire = frame_bytes(b"s" * 996)

    async def slowloris(port: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ended = asyncio.ensure_future(reader.read())
        try:
            for i in range(60):  # at most 12 s
                if ended.done():
                    break
                writer.write(wire[i : i + 1])
                await asyncio.wait([ended], timeout=0.2)
            return ended.done()
        finally:
            ended.cancel()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def scenario() -> None:
        async with serving(echo_task, max_connections=4, frame_timeout=1.0) as server:
            slow = [asyncio.ensure_future(slowloris(server.port)) for _ in range(8)]
            await asyncio.sleep(0.3)  # all eight are ahead in the backlog
            async with await fastnet.connect("127.0.0.1", server.port) as healthy:
                healthy.send(b"ping")
                assert await asyncio.wait_for(healthy.recv(), 15) == b"ping"
            assert await asyncio.gather(*slow) == [True] * 8  # each one was closed
            stats = server.stats()
            assert stats["frame_timeouts"] == 8
            assert stats["idle_timeouts"] == 0

    arun(scenario())


def test_the_frame_timeout_can_be_disabled_and_is_validated() -> None:
    assert fastnet.Server(echo).frame_timeout == supervisor.DEFAULT_FRAME_TIMEOUT
    assert fastnet.Server(echo, frame_timeout=None).frame_timeout is None
    with pytest.raises(ValueError):
        fastnet.Server(echo, frame_timeout=0)


# ------------------------------------------------------------- shutdown


def test_the_drain_timeout_resets_what_it_aborts(arun: Runner[Any]) -> None:
    async def ignores_shutdown(conn: fastnet.Connection) -> None:
        await conn.recv()
        await asyncio.sleep(60)

    async def scenario() -> None:
        async with serving(ignores_shutdown, drain_timeout=0.2) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame_bytes(b"work"))
            await wait_until(lambda: server.stats()["frames_in"] == 1)
            await server.shutdown()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    arun(scenario())


# ------------------------------------------------------------ accounting


def test_a_first_frame_sees_its_connection_active(arun: Runner[Any]) -> None:
    # The frame is in the socket before the server accepts it, so the first
    # read happens as the transport is set up (uvloop reads at once).
    seen: list[int] = []
    servers: list[fastnet.Server] = []

    @fastnet.callback_handler
    def record(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
        seen.append(servers[0].stats()["active"])
        return frames

    async def scenario() -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(frame_bytes(b"first"))
        async with serving(record, sock=listener) as server:
            servers.append(server)
            loop = asyncio.get_running_loop()
            client.setblocking(False)
            data = await asyncio.wait_for(loop.sock_recv(client, 100), 5)
            assert data == frame_bytes(b"first")
            client.close()
        assert seen == [1]

    arun(scenario())


def test_framing_errors_are_logged_at_a_bounded_rate(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    bad = 25

    async def scenario() -> None:
        framing = fastnet.LengthPrefixed(max_frame=100)
        async with serving(echo_task, framing=framing) as server:
            for _ in range(bad):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write((1000).to_bytes(4, "big"))
                with contextlib.suppress(ConnectionError):
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await wait_until(lambda: server.stats()["frame_errors"] == bad)
        # Shutting down sums up what was left out.

    with caplog.at_level(logging.INFO, logger="fastnet"):
        arun(scenario())
    messages = [r.getMessage() for r in caplog.records]
    logged = [m for m in messages if m.startswith("framing error from")]
    assert len(logged) == supervisor.FRAME_ERROR_LOG_BURST
    summaries = [m for m in messages if "more framing errors in the last" in m]
    assert len(summaries) == 1
    assert summaries[0].startswith(f"{bad - supervisor.FRAME_ERROR_LOG_BURST} more")


def test_a_handler_error_is_logged_as_such(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def fragile(conn: fastnet.Connection) -> None:
        await conn.recv()
        raise RuntimeError("bug in the handler")

    async def scenario() -> int:
        async with (
            serving(fragile) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            conn.send(b"x")
            with pytest.raises(fastnet.ConnectionBrokenError):
                await conn.recv()
            assert server.stats()["handler_errors"] == 1
            return int(conn.local[1])

    with caplog.at_level(logging.ERROR, logger="fastnet"):
        port = arun(scenario())
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == (
        f"handler raised RuntimeError: bug in the handler; closing the connection to "
        f"127.0.0.1:{port}"
    )
    assert record.exc_info is not None


# ------------------------------------------------------------- the listener


def test_a_burst_of_connects_is_accepted_in_bounded_batches(arun: Runner[Any]) -> None:
    # 300 connections wait in the backlog before the server starts; the
    # accept loop must let the event loop run between batches.
    count = 300

    async def scenario() -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        try:
            loop = asyncio.get_running_loop()
            samples: list[int] = []
            server = fastnet.Server(echo, sock=listener, drain_timeout=5)

            def sample() -> None:  # once per loop iteration
                accepted = server.stats()["accepted"]
                samples.append(accepted)
                if accepted < count and len(samples) < 100_000:
                    loop.call_soon(sample)

            loop.call_soon(sample)
            async with server:
                await wait_until(lambda: server.stats()["accepted"] == count)
                steps = [b - a for a, b in itertools.pairwise(samples)]
                assert max(steps) <= ACCEPT_BATCH, max(steps)
        finally:
            for client in clients:
                client.close()

    arun(scenario())


def test_the_admission_hook_rejects_before_set_up(arun: Runner[Any]) -> None:
    decisions = iter([False, True])
    asked: list[Any] = []

    def admit(sock: socket.socket, peer: Any) -> bool:
        asked.append(peer)
        assert isinstance(sock, socket.socket)
        return next(decisions)

    async def scenario() -> None:
        async with serving(echo, admit=admit) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                assert await roundtrip(conn, [b"admitted"]) == [b"admitted"]
                assert asked[1] == conn.local
            stats = server.stats()
            assert stats["rejected"] == 1 and stats["accepted"] == 1

    arun(scenario())
