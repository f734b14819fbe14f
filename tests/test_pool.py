"""Pool: exhaustion, failures under the pool, rotation, retirement, timeouts, close, TLS.

Every scenario runs on both event loops and both codec backends (``arun``),
against real sockets on 127.0.0.1: in-process servers (``serving``), a real
``fastnet serve echo`` killed with SIGKILL and restarted on its port, a
listener whose full backlog never completes a connect, a TCP server that
never answers a TLS handshake. Timings are asserted with generous bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server_support import Runner, ServerProcess, serving, wait_until
from tls_support import TLSCerts, make_certs

import fastnet
from fastnet.apps import echo
from fastnet.connection import Lifecycle
from fastnet.pool import (
    ConnectError,
    ConnectTimeout,
    Pool,
    PoolClosedError,
    PoolTimeout,
)

pytest_plugins = ["test_server_support"]

# Bound on one reply on loopback.
REPLY_TIMEOUT = 5.0


# ------------------------------------------------------------------ helpers


class Events:
    """An ``on_event`` hook that records ``(name, info)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, **info: Any) -> None:
        self.seen.append((name, info))

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [info for seen, info in self.seen if seen == name]


def address(port: int | None) -> str:
    assert port is not None
    return f"127.0.0.1:{port}"


async def call(conn: fastnet.Connection, payload: bytes) -> bytes:
    """One request and its reply."""
    conn.send(payload)
    return await asyncio.wait_for(conn.recv(), REPLY_TIMEOUT)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port nothing listens on (connects are refused).

    The port stays bound, not listening, for the block: a port merely
    picked and released could be taken meanwhile (by another process's
    listener, or as the local port of a connection), and then accept.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A loopback port where a connect never completes.

    A listener with backlog 0 that never accepts: once its accept queue
    holds one connection, Linux drops further SYNs, so a connect waits in
    SYN_SENT (retrying) until the caller gives up.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            probe = socket.socket()
            probe.setblocking(False)
            fillers.append(probe)
            probe.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [probe], [], 0.2)
            if not writable:
                break  # the queue is full: this connect hangs, and so will the pool's
        else:
            pytest.skip("this kernel completes connects beyond a full backlog")
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts and never sends a byte (a TLS handshake never completes)."""
    transports: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for transport in transports:
            transport.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    return make_certs(Path(tmp_path_factory.mktemp("pool-certs")))


# --------------------------------------------------------------- exhaustion


def test_exhaustion_raises_pool_timeout_then_waiters_are_served_in_order(
    arun: Runner[Any],
) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            events = Events()
            pool = Pool(address(server.port), max_size=2, acquire_timeout=0.3, on_event=events)
            first = await pool.acquire()
            second = await pool.acquire()
            assert first is not second
            started = time.monotonic()
            with pytest.raises(PoolTimeout) as info:
                await pool.acquire()
            waited = time.monotonic() - started
            assert 0.25 <= waited < 2.0, waited
            assert isinstance(info.value, TimeoutError)
            assert "max_size=2" in str(info.value)
            assert events.names().count("exhausted") == 1
            assert events.names().count("timeout") == 1
            stats = pool.stats()
            assert stats["timeouts"] == 1
            assert stats["waiting"] == 0  # the timed-out waiter left the line
            assert stats["in_use"] == 2
            assert stats["size"] == 2

            # FIFO: a waits first, then b; each release serves the head of the line.
            patient = Pool(address(server.port), max_size=2, acquire_timeout=5.0)
            held = [await patient.acquire(), await patient.acquire()]
            order: list[tuple[str, fastnet.Connection]] = []

            async def waiter(name: str) -> None:
                conn = await patient.acquire()
                order.append((name, conn))

            a = asyncio.create_task(waiter("a"))
            await wait_until(lambda: patient.stats()["waiting"] == 1)
            b = asyncio.create_task(waiter("b"))
            await wait_until(lambda: patient.stats()["waiting"] == 2)
            patient.release(held[1])
            await a
            assert order == [("a", held[1])]
            assert patient.stats()["waiting"] == 1
            patient.release(held[0])
            await b
            assert order == [("a", held[1]), ("b", held[0])]
            for _, conn in order:
                assert await call(conn, b"ok") == b"ok"
                patient.release(conn)

            pool.release(first)
            pool.release(second)
            await pool.close()
            await patient.close()

    arun(scenario())


# ----------------------------------------------------- failures under the pool


def test_a_server_killed_and_restarted_under_the_pool(arun: Runner[Any]) -> None:
    # A real `fastnet serve echo` is SIGKILLed: the pool's idle connections
    # are seen to close and leave; while it is down, an acquire fails fast
    # with ConnectError; once it is back on the same port, min_size is made
    # again and every call succeeds on a healthy connection.
    async def scenario() -> None:
        proc = await asyncio.to_thread(ServerProcess, ["echo", "--port", "0"])
        try:
            port = proc.port
            events = Events()
            pool = Pool(address(port), min_size=2, max_size=4, acquire_timeout=5.0, on_event=events)
            await pool.start()

            async def one(i: int) -> None:
                async with pool.acquire() as conn:
                    assert conn.lifecycle is Lifecycle.OPEN
                    assert await call(conn, b"%d" % i) == b"%d" % i
                    await asyncio.sleep(0.02)  # overlap, so several connections exist

            await asyncio.gather(*(one(i) for i in range(4)))
            before = pool.stats()
            assert before["idle"] == before["size"] >= 2

            await asyncio.to_thread(proc.kill)
            await wait_until(
                lambda: pool.stats()["discarded"] >= before["size"] and pool.stats()["idle"] == 0,
                what="the idle connections to the killed server to leave the pool",
            )
            assert {info["reason"] for info in events.of("discarded")} == {"peer_closed"}

            started = time.monotonic()
            with pytest.raises(ConnectError):
                await pool.acquire()
            assert time.monotonic() - started < 2.0  # not the 5 s acquire_timeout

            proc = await asyncio.to_thread(ServerProcess, ["echo", "--port", str(port)])
            await wait_until(
                lambda: pool.stats()["idle"] >= 2,
                what="min_size connections to be made again",
            )
            handed_out = []
            for i in range(20):
                async with pool.acquire() as conn:
                    assert conn.lifecycle is Lifecycle.OPEN
                    handed_out.append(conn)
                    assert await call(conn, b"after %d" % i) == b"after %d" % i
            assert all(conn.lifecycle is Lifecycle.OPEN for conn in handed_out)
            assert pool.stats()["connect_failures"] >= 1
            await pool.close()
        finally:
            await asyncio.to_thread(proc.kill)

    arun(scenario())


def test_an_in_process_server_restarted_on_its_port(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        server = fastnet.Server(echo, "127.0.0.1", 0, drain_timeout=1.0)
        await server.start()
        port = server.port
        assert port is not None
        pool = Pool(address(port), max_size=3, acquire_timeout=5.0)
        conns = [await pool.acquire() for _ in range(3)]
        for conn in conns:
            pool.release(conn)
        assert pool.stats()["idle"] == 3
        await server.shutdown()
        await wait_until(lambda: pool.stats()["idle"] == 0, what="idle connections to leave")
        server = fastnet.Server(echo, "127.0.0.1", port, drain_timeout=1.0)
        await server.start()
        try:
            for i in range(10):
                async with pool.acquire() as conn:
                    assert conn not in conns
                    assert await call(conn, b"%d" % i) == b"%d" % i
            assert pool.stats()["discarded"] == 3
        finally:
            await pool.close()
            await server.shutdown()

    arun(scenario())


def test_a_frame_that_arrives_while_idle_gets_the_connection_discarded(
    arun: Runner[Any],
) -> None:
    # A late reply (here: a second frame the server sends after its answer)
    # would be read as the answer to the next user's request.
    async def late(conn: fastnet.Connection) -> None:
        async for frame in conn:
            conn.send(frame)
            if frame == b"late":
                await asyncio.sleep(0.05)
                conn.send(b"stray")

    async def scenario() -> None:
        async with serving(late) as server:
            events = Events()
            pool = Pool(address(server.port), on_event=events)
            async with pool.acquire() as first:
                assert await call(first, b"late") == b"late"
            await wait_until(lambda: first.frames_in == 2, what="the stray frame")
            async with pool.acquire() as conn:
                assert conn is not first
                assert await call(conn, b"next") == b"next"
            assert events.of("discarded") == [
                {"endpoint": address(server.port), "reason": "unexpected_frames"}
            ]
            await pool.close()

    arun(scenario())


# ------------------------------------------------------ lifetime, idle, warm


def test_max_lifetime_rotates_connections_under_load_without_a_failed_call(
    arun: Runner[Any],
) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            events = Events()
            pool = Pool(
                address(server.port),
                max_size=4,
                max_lifetime=0.2,
                acquire_timeout=2.0,
                on_event=events,
            )
            calls = 0
            failures: list[BaseException] = []
            stop = time.monotonic() + 1.5

            async def worker(w: int) -> None:
                nonlocal calls
                i = 0
                while time.monotonic() < stop:
                    payload = b"%d:%d" % (w, i)
                    try:
                        async with pool.acquire() as conn:
                            assert await call(conn, payload) == payload
                    except Exception as exc:
                        failures.append(exc)
                    calls += 1
                    i += 1
                    await asyncio.sleep(0.002)

            await asyncio.gather(*(worker(w) for w in range(6)))
            stats = pool.stats()
            assert failures == []
            assert calls > 100
            assert stats["retired"] >= 8, stats  # 1.5 s / 0.2 s, several connections
            assert stats["created"] >= stats["retired"]
            assert stats["discarded"] == 0
            assert {info["reason"] for info in events.of("retired")} == {"lifetime"}
            assert all(info["age"] >= 0.18 for info in events.of("retired"))  # 0.2 less jitter
            await pool.close()

    arun(scenario())


def test_max_idle_retires_connections_beyond_min_size(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            events = Events()
            pool = Pool(address(server.port), min_size=1, max_size=3, max_idle=0.2, on_event=events)
            conns = [await pool.acquire() for _ in range(3)]
            for conn in conns:
                pool.release(conn)
            assert pool.stats()["idle"] == 3
            started = time.monotonic()
            await wait_until(lambda: pool.stats()["size"] == 1, what="idle retirement")
            assert time.monotonic() - started >= 0.15
            await asyncio.sleep(0.3)  # min_size stays
            assert pool.stats()["size"] == 1
            assert pool.stats()["retired"] == 2
            assert [info["reason"] for info in events.of("retired")] == ["idle", "idle"]
            async with pool.acquire() as conn:
                assert await call(conn, b"still") == b"still"
            await pool.close()

    arun(scenario())


def test_min_size_is_kept_warm_and_made_again_after_the_server_closes_them(
    arun: Runner[Any],
) -> None:
    served: list[fastnet.Connection] = []

    async def tracked(conn: fastnet.Connection) -> None:
        served.append(conn)
        async for frame in conn:
            conn.send(frame)

    async def scenario() -> None:
        async with serving(tracked) as server:
            pool = Pool(address(server.port), min_size=2, max_size=4)
            await pool.start()  # before any acquire
            assert pool.stats()["idle"] == 2
            assert pool.stats()["created"] == 2
            await wait_until(lambda: len(served) == 2)
            for conn in list(served):
                conn.close()
            await wait_until(
                lambda: pool.stats()["created"] == 4 and pool.stats()["idle"] == 2,
                what="min_size made again",
            )
            assert pool.stats()["discarded"] == 2
            async with pool.acquire() as conn:
                assert await call(conn, b"warm") == b"warm"
            await pool.close()

    arun(scenario())


def test_init_reads_the_greeting_of_each_new_connection(arun: Runner[Any]) -> None:
    # Without init, the greeting would arrive while the connection is idle
    # and get it discarded as unexpected frames.
    async def greeter(conn: fastnet.Connection) -> None:
        conn.send(b"hello")
        async for frame in conn:
            conn.send(frame)

    async def scenario() -> None:
        async with serving(greeter) as server:
            greetings: list[bytes] = []

            async def init(conn: fastnet.Connection) -> None:
                greetings.append(await conn.recv())

            pool = Pool(address(server.port), min_size=2, init=init)
            await pool.start()
            await asyncio.sleep(0.05)
            for i in range(4):
                async with pool.acquire() as conn:
                    assert await call(conn, b"%d" % i) == b"%d" % i
            assert greetings == [b"hello", b"hello"]
            assert (pool.stats()["created"], pool.stats()["discarded"]) == (2, 0)
            await pool.close()

            async def refuse(conn: fastnet.Connection) -> None:
                raise PermissionError("bad credentials")

            pool = Pool(address(server.port), init=refuse)
            with pytest.raises(ConnectError) as info:
                await pool.acquire()
            assert isinstance(info.value.__cause__, PermissionError)
            assert pool.stats()["size"] == 0
            await pool.close()

    arun(scenario())


# ------------------------------------------------------ errors and cancellation


def test_an_exception_in_the_block_discards_the_connection(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            events = Events()
            pool = Pool(address(server.port), on_event=events)
            with pytest.raises(RuntimeError):
                async with pool.acquire() as conn:
                    conn.send(b"half an exchange")
                    raise RuntimeError("the user's code failed")
            assert conn.lifecycle in (Lifecycle.CLOSING, Lifecycle.CLOSED)
            assert pool.stats()["size"] == 0
            assert events.of("discarded")[0]["reason"] == "error"

            # An exception the user marks harmless keeps the connection.
            with pytest.raises(KeyError):
                async with pool.acquire(keep_on=(KeyError,)) as kept:
                    assert await call(kept, b"x") == b"x"
                    raise KeyError("not the connection's fault")
            assert pool.stats()["idle"] == 1
            async with pool.acquire() as again:
                assert again is kept
                assert await call(again, b"y") == b"y"

            # A connection the user closed in the block is discarded too.
            async with pool.acquire() as closed:
                closed.close()
            assert pool.stats()["size"] == 0
            assert [info["reason"] for info in events.of("discarded")] == ["error", "closed"]

            # Acquire and release without a block; releasing twice is an error.
            conn = await pool.acquire()
            pool.release(conn)
            with pytest.raises(ValueError):
                pool.release(conn)
            await pool.close()

    arun(scenario())


def test_a_cancelled_or_timed_out_waiter_leaks_no_slot(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            pool = Pool(address(server.port), max_size=1, acquire_timeout=0.3)

            async def acquire() -> fastnet.Connection:
                return await pool.acquire()

            held = await pool.acquire()
            waiting = asyncio.create_task(acquire())
            await wait_until(lambda: pool.stats()["waiting"] == 1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert pool.stats()["waiting"] == 0

            # Cancelled in the very instant the connection is handed over
            # (granted, its task not yet resumed): it must come back.
            racing = asyncio.create_task(acquire())
            await wait_until(lambda: pool.stats()["waiting"] == 1)
            pool.release(held)
            assert pool.stats()["in_use"] == 1  # granted to the waiter
            racing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await racing
            stats = pool.stats()
            assert (stats["size"], stats["idle"], stats["in_use"]) == (1, 1, 0), stats

            # A waiter that timed out leaves no trace either.
            held = await pool.acquire()
            with pytest.raises(PoolTimeout):
                await pool.acquire()
            pool.release(held)
            async with pool.acquire() as conn:
                assert conn is held
                assert await call(conn, b"free") == b"free"
                stats = pool.stats()
                assert (stats["size"], stats["waiting"], stats["in_use"]) == (1, 0, 1)
            await pool.close()

    arun(scenario())


# ----------------------------------------------------------------- timeouts


def test_connect_timeout_bounds_each_attempt(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        with blackhole() as dead:
            events = Events()
            pool = Pool(address(dead), connect_timeout=0.3, acquire_timeout=5.0, on_event=events)
            started = time.monotonic()
            with pytest.raises(ConnectTimeout) as info:
                await pool.acquire()
            took = time.monotonic() - started
            assert 0.25 <= took < 2.0, took  # connect_timeout, not acquire_timeout
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value, ConnectError)
            assert [address for address, _ in info.value.errors] == [address(dead)]
            assert events.names() == ["connect_failed"]
            stats = pool.stats()
            assert (stats["connect_failures"], stats["size"], stats["timeouts"]) == (1, 0, 0)
            await pool.close()

    arun(scenario())


def test_acquire_timeout_holds_while_a_connect_hangs(arun: Runner[Any]) -> None:
    # The acquirer gets PoolTimeout on time; the attempt carries on in the
    # pool's task (its connection would go to the next waiter), and close()
    # ends it.
    async def scenario() -> None:
        with blackhole() as dead:
            pool = Pool(address(dead), connect_timeout=5.0, acquire_timeout=0.3)
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                await pool.acquire()
            assert 0.25 <= time.monotonic() - started < 2.0
            assert pool.stats()["connecting"] == 1
            started = time.monotonic()
            await pool.close()
            assert time.monotonic() - started < 1.0
            assert pool.stats()["connecting"] == 0

    arun(scenario())


def test_the_wait_for_a_slot_does_not_count_against_connect_timeout(arun: Runner[Any]) -> None:
    # aiohttp#2648: there the wait for a pool slot counted against the
    # connect timeout. Here a waiter that waited longer than connect_timeout
    # still gets its own connect attempt, with the whole connect_timeout.
    async def scenario() -> None:
        async with serving(echo) as server:
            pool = Pool(address(server.port), max_size=1, connect_timeout=0.2, acquire_timeout=3.0)
            held = await pool.acquire()

            async def later() -> bytes:
                async with pool.acquire() as conn:
                    assert conn is not held
                    return await call(conn, b"waited")

            task = asyncio.create_task(later())
            await asyncio.sleep(0.4)  # twice connect_timeout, in line
            pool.release(held, discard=True)  # the waiter needs a new connection
            assert await task == b"waited"
            assert pool.stats()["connect_failures"] == 0
            await pool.close()

    arun(scenario())


def test_a_dead_endpoint_is_skipped_for_a_live_one(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            with refused_port() as refused:
                events = Events()
                pool = Pool(
                    [address(refused), ("127.0.0.1", server.port or 0)],
                    connect_timeout=0.3,
                    on_event=events,
                )
                for i in range(4):  # new connections start at each endpoint in turn
                    conn = await pool.acquire()
                    assert conn.peer[1] == server.port
                    assert await call(conn, b"%d" % i) == b"%d" % i
                    pool.release(conn, discard=True)
                failed = events.of("connect_failed")
                assert len(failed) == 2
                assert {info["endpoint"] for info in failed} == {address(refused)}
                assert all(isinstance(info["error"], ConnectionRefusedError) for info in failed)
                await pool.close()

            # A blackholed endpoint costs connect_timeout, then the live one serves.
            with blackhole() as dead:
                pool = Pool([address(dead), address(server.port)], connect_timeout=0.3)
                started = time.monotonic()
                async with pool.acquire() as conn:
                    assert await call(conn, b"via the live one") == b"via the live one"
                assert 0.25 <= time.monotonic() - started < 2.0
                await pool.close()

    arun(scenario())


def test_new_connections_go_round_robin_over_the_endpoints(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as one, serving(echo) as two:
            pool = Pool([address(one.port), address(two.port)], max_size=4)
            conns = [await pool.acquire() for _ in range(4)]
            ports = [conn.peer[1] for conn in conns]
            assert ports == [one.port, two.port, one.port, two.port]
            for conn in conns:
                pool.release(conn)
            await pool.close()

    arun(scenario())


# -------------------------------------------------------------------- close


def test_close_waits_for_returns_then_aborts_what_is_still_out(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            pool = Pool(address(server.port), max_size=3, close_timeout=0.5)
            returned = await pool.acquire()
            kept = await pool.acquire()
            idle = await pool.acquire()
            pool.release(idle)

            async def in_line() -> fastnet.Connection:
                return await pool.acquire()

            started = time.monotonic()
            closing = asyncio.create_task(pool.close())
            await asyncio.sleep(0.05)
            assert pool.closed
            with pytest.raises(PoolClosedError):
                await pool.acquire()
            assert idle.closing  # idle connections close at once
            assert await call(returned, b"still mine") == b"still mine"
            pool.release(returned)  # in time: closed in order
            assert returned.closing
            assert not kept.closing
            await closing
            took = time.monotonic() - started
            assert 0.45 <= took < 2.0, took
            assert kept.lifecycle is Lifecycle.CLOSED  # aborted at close_timeout
            with pytest.raises(fastnet.ConnectionClosedError):  # this side aborted it
                kept.send(b"too late")
            pool.release(kept)  # after close: allowed, does nothing
            await pool.close()  # idempotent
            assert pool.stats()["size"] == 0

            # Waiters in line when close() starts get PoolClosedError.
            pool = Pool(address(server.port), max_size=1)
            held = await pool.acquire()
            waiter = asyncio.create_task(in_line())
            await wait_until(lambda: pool.stats()["waiting"] == 1)
            closing = asyncio.create_task(pool.close())
            with pytest.raises(PoolClosedError):
                await waiter
            pool.release(held)
            started = time.monotonic()
            await closing
            assert time.monotonic() - started < 1.0

    arun(scenario())


# ---------------------------------------------------------------------- TLS


def test_acquire_and_echo_over_tls(arun: Runner[Any], tls_certs: TLSCerts) -> None:
    async def scenario() -> None:
        async with serving(echo, ssl=tls_certs.server_context()) as server:
            pool = Pool(
                address(server.port),
                ssl=fastnet.tls.client_context(ca=tls_certs.ca),
                server_hostname="localhost",
                min_size=1,
            )
            async with pool:
                for i in range(3):
                    async with pool.acquire() as conn:
                        assert conn.tls is not None
                        assert await call(conn, b"tls %d" % i) == b"tls %d" % i
                assert pool.stats()["created"] == 1

    arun(scenario())


def test_a_tls_handshake_that_never_completes_is_bounded_by_connect_timeout(
    arun: Runner[Any], tls_certs: TLSCerts
) -> None:
    async def scenario() -> None:
        async with silent_server() as port:
            pool = Pool(
                address(port),
                ssl=fastnet.tls.client_context(ca=tls_certs.ca),
                server_hostname="localhost",
                connect_timeout=0.3,
            )
            started = time.monotonic()
            with pytest.raises(ConnectTimeout):
                await pool.acquire()
            assert 0.25 <= time.monotonic() - started < 2.0
            await pool.close()

    arun(scenario())


# --------------------------------------------------------------- arguments


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="acquire_timeout"):
        Pool("127.0.0.1:1", acquire_timeout=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="acquire_timeout"):
        Pool("127.0.0.1:1", acquire_timeout=float("inf"))
    with pytest.raises(ValueError, match="connect_timeout"):
        Pool("127.0.0.1:1", connect_timeout=0)
    with pytest.raises(ValueError, match="min_size"):
        Pool("127.0.0.1:1", min_size=3, max_size=2)
    with pytest.raises(ValueError, match="max_size"):
        Pool("127.0.0.1:1", max_size=0)
    with pytest.raises(ValueError, match="endpoint"):
        Pool([])
    with pytest.raises(ValueError, match="endpoint"):
        Pool("localhost")
    with pytest.raises(ValueError, match="range"):
        Pool("127.0.0.1:70000")
    pool = Pool(["[::1]:7000", ("127.0.0.1", 7001)], max_lifetime=None, max_idle=None)
    assert "[::1]:7000,127.0.0.1:7001" in repr(pool)
    assert Pool(("127.0.0.1", 7000)).stats()["size"] == 0


def test_pool_events_and_size_are_exported(arun: Runner[Any]) -> None:
    # Pool(metrics=registry): fastnet_pool_events_total{event} (each event at 0
    # from the first scrape) and fastnet_pool_connections{state}.
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()

    async def scenario() -> None:
        async with fastnet.Server(echo) as server:
            pool = fastnet.Pool(("127.0.0.1", server.port), max_size=1, metrics=registry)
            try:

                def value(name: str, **labels: str) -> float | None:
                    return registry.get_sample_value(name, labels)  # type: ignore[no-any-return]

                assert value("fastnet_pool_events_total", event="exhausted") == 0
                async with pool.acquire() as conn:
                    assert value("fastnet_pool_connections", state="in_use") == 1
                    conn.send(b"x")
                    assert await conn.recv() == b"x"
                assert value("fastnet_pool_events_total", event="connected") == 1
                assert value("fastnet_pool_connections", state="idle") == 1
                assert value("fastnet_pool_connections", state="in_use") == 0
            finally:
                await pool.close()

    arun(scenario())
