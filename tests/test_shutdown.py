"""Graceful shutdown: real server processes (``python -m fastnet serve``) and real signals.

Process tests run on both loops and both backends (``process_variant``); the
in-process ``Server.shutdown`` tests on both as well (``arun``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_server_support import (
    Runner,
    blocking_roundtrip,
    frame_bytes,
    read_frames,
    roundtrip,
    server_process,
    serving,
    sigterm_then_wait,
    wait_until,
)

import fastnet
from fastnet import ConnectionClosedError

# The loop/backend fixtures (arun, loop_name, process_variant) live there.
pytest_plugins = ["test_server_support"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# An app for the server processes: each frame is "SECONDS TAG"; the handler
# sleeps that long, then answers "done TAG shutting_down=BOOL".
SLOW_APP = textwrap.dedent(
    """
    import asyncio


    async def slow(conn):
        async for frame in conn:
            seconds, _, tag = frame.partition(b" ")
            await asyncio.sleep(float(seconds))
            conn.send(b"done %s shutting_down=%r" % (tag, conn.shutting_down))
    """
)


@pytest.fixture
def slow_app(tmp_path: Path) -> Path:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    return tmp_path


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_in_flight_work_and_exits_zero(
    process_variant: tuple[str, str], slow_app: Path
) -> None:
    loop, backend = process_variant
    args = ["slowapp:slow", "--port", "0", "--loop", loop, "--drain-timeout", "10"]
    with server_process(args, backend=backend, cwd=slow_app) as server:
        assert blocking_roundtrip(server.port, [b"0 warmup"]) == [
            b"done warmup shutting_down=False"
        ]
        client = _connect(server.port)
        client.sendall(frame_bytes(b"1.0 slow"))  # one second of work
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        time.sleep(0.3)
        # Stopped accepting at once: new connections are refused while draining.
        assert _refused(server.port)
        # The in-flight request still gets its answer, then the connection closes.
        assert read_frames(client, 1) == [b"done slow shutting_down=True"]
        assert client.recv(1) == b""
        client.close()
        status, out, err = server.wait(10)
    assert status == 0, err
    assert out == ""  # nothing after the "listening on" line
    assert "Traceback" not in err
    assert "SIGTERM received" in err


def test_sigint_is_a_graceful_shutdown_too(slow_app: Path) -> None:
    with server_process(["slowapp:slow", "--port", "0"], cwd=slow_app) as server:
        client = _connect(server.port)
        client.sendall(frame_bytes(b"0.5 x"))
        time.sleep(0.1)
        server.signal(signal.SIGINT)
        assert read_frames(client, 1) == [b"done x shutting_down=True"]
        client.close()
        status, _, err = server.wait(10)
    assert status == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_the_drain_timeout_is_honoured(process_variant: tuple[str, str], slow_app: Path) -> None:
    loop, backend = process_variant
    args = ["slowapp:slow", "--port", "0", "--loop", loop, "--drain-timeout", "0.5"]
    with server_process(args, backend=backend, cwd=slow_app) as server:
        client = _connect(server.port)
        client.sendall(frame_bytes(b"60 stuck"))  # a minute of work
        time.sleep(0.2)
        status, _, err, elapsed = sigterm_then_wait(server, 15)
        # Aborted, unanswered, and the client can tell: a reset, not the
        # orderly close (EOF) of a handler that finished.
        with pytest.raises(ConnectionResetError):
            client.recv(100)
        client.close()
    assert status == 0, err
    assert 0.5 <= elapsed < 5
    assert "drain timeout" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_forces_the_exit(slow_app: Path, signum: int) -> None:
    args = ["slowapp:slow", "--port", "0", "--drain-timeout", "60"]
    with server_process(args, cwd=slow_app) as server:
        client = _connect(server.port)
        client.sendall(frame_bytes(b"60 stuck"))
        time.sleep(0.2)
        server.signal(signum)
        time.sleep(0.3)
        assert server.proc.poll() is None  # draining, for up to a minute
        start = time.monotonic()
        server.signal(signum)
        status, _, _ = server.wait(10)
        elapsed = time.monotonic() - start
        client.close()
    assert status == -signum  # killed by the signal's default action
    assert elapsed < 2


def test_sigterm_under_pipelined_load_keeps_replies_whole_and_ordered(
    process_variant: tuple[str, str],
) -> None:
    loop, backend = process_variant
    rng = random.Random(7)
    clients = 8
    per_client = 3000

    async def client(port: int, index: int, started: asyncio.Event) -> tuple[int, bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payloads = [
            b"%d:%d:" % (index, i) + bytes([i % 256]) * rng.randrange(0, 3000)
            for i in range(per_client)
        ]

        async def send() -> None:
            try:
                for i, payload in enumerate(payloads):
                    writer.write(frame_bytes(payload))
                    if i % 20 == 0:
                        await writer.drain()
                        if i == 400:
                            started.set()
                await writer.drain()
            except ConnectionError:
                pass  # the server closed while we were still sending

        sender = asyncio.ensure_future(send())
        decoder = fastnet.LengthPrefixed().decoder()
        received: list[bytes] = []
        reset = False
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                received += decoder.feed(data)
        except ConnectionResetError:
            reset = True
        await sender
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        # Every complete reply is the request it answers, in order, from the
        # first on: a prefix of what was sent. Nothing corrupted, reordered
        # or skipped.
        assert received == payloads[: len(received)]
        return len(received), reset

    async def scenario(port: int, kill: Any) -> list[tuple[int, bool]]:
        started = [asyncio.Event() for _ in range(clients)]
        tasks = [asyncio.ensure_future(client(port, i, started[i])) for i in range(clients)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)
        kill()
        return await asyncio.wait_for(asyncio.gather(*tasks), 30)

    args = ["echo", "--port", "0", "--loop", loop, "--drain-timeout", "10"]
    with server_process(args, backend=backend) as server:
        results = asyncio.run(scenario(server.port, lambda: server.signal(signal.SIGTERM)))
        status, _, err = server.wait(15)
    assert status == 0, err
    assert "Traceback" not in err
    assert all(count > 0 for count, _ in results)
    assert not any(reset for _, reset in results), "the server reset a connection"


# ----------------------------------------------------------- in-process shutdown


def test_shutdown_lets_a_busy_handler_finish_and_flushes_its_replies(arun: Runner[Any]) -> None:
    seen: dict[str, Any] = {}

    async def worker(conn: fastnet.Connection) -> None:
        seen["conn"] = conn
        try:
            while True:
                batch = await conn.recv_batch()
                seen["flag_before"] = conn.shutting_down
                await asyncio.sleep(0.3)  # shutdown begins meanwhile
                seen["flag_after"] = conn.shutting_down
                conn.send_many([b"done " + f for f in batch])
        except ConnectionClosedError as exc:
            seen["end"] = exc
            raise

    async def scenario() -> None:
        server = fastnet.Server(worker, drain_timeout=5)
        await server.start()
        client = await fastnet.connect("127.0.0.1", server.port)
        client.send_many([b"a", b"b"])
        await wait_until(lambda: "flag_before" in seen)
        shutdown = asyncio.ensure_future(server.shutdown())
        await asyncio.sleep(0.05)
        assert server.shutting_down and server.sockets == ()
        with pytest.raises(OSError):  # refused at once
            await fastnet.connect("127.0.0.1", server.port)
        replies = []
        while len(replies) < 2:
            replies += await client.recv_batch()
        assert replies == [b"done a", b"done b"]
        await shutdown
        assert server.stats()["active"] == 0
        assert seen["flag_before"] is False and seen["flag_after"] is True
        assert "shutting down" in str(seen["end"])
        client.close()
        await client.wait_closed()
        await server.shutdown()  # idempotent

    arun(scenario())


def test_shutdown_cancels_what_outlives_the_drain_timeout(arun: Runner[Any]) -> None:
    state: dict[str, Any] = {}

    async def stubborn(conn: fastnet.Connection) -> None:
        await conn.recv()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    @fastnet.callback_handler
    def quiet(conn: fastnet.Connection, frames: list[bytes]) -> None:
        return None

    async def scenario() -> None:
        async with serving(stubborn, drain_timeout=0.2) as server:
            client = await fastnet.connect("127.0.0.1", server.port)
            client.send(b"go")
            await wait_until(lambda: server.stats()["frames_in"] == 1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await server.shutdown()
            assert 0.19 <= loop.time() - start < 2  # uvloop's clock ticks in ms
            assert state["cancelled"]
            with pytest.raises(fastnet.ConnectionBrokenError):
                await client.recv()
            client.close()
            await client.wait_closed()
        async with (
            serving(quiet, drain_timeout=0.2) as server,
            await fastnet.connect("127.0.0.1", server.port) as client,
        ):
            client.send(b"x")
            await wait_until(lambda: server.stats()["frames_in"] == 1)
            await server.shutdown()  # a callback handler just stops reading and closes
            assert server.stats()["active"] == 0

    arun(scenario())


def test_serve_forever_returns_after_shutdown_and_shuts_down_when_cancelled(
    arun: Runner[Any],
) -> None:
    async def scenario() -> None:
        server = fastnet.Server(fastnet.apps.echo)  # type: ignore[attr-defined]
        forever = asyncio.ensure_future(server.serve_forever())
        await wait_until(lambda: server.port is not None)
        async with await fastnet.connect("127.0.0.1", server.port) as conn:
            assert await roundtrip(conn, [b"x"]) == [b"x"]
        await server.shutdown()
        await asyncio.wait_for(forever, 5)

        other = fastnet.Server(fastnet.apps.echo)  # type: ignore[attr-defined]
        forever = asyncio.ensure_future(other.serve_forever())
        await wait_until(lambda: other.port is not None)
        forever.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forever
        assert other.shutting_down and other.sockets == ()

    import fastnet.apps

    arun(scenario())
