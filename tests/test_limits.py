"""Per-peer limits and overload protection (``fastnet.Limits``, ``fastnet.limits``).

Unit tests of the bookkeeping (peer keys, the bounded peer table, the
overload marks, the CLI's options), then real sockets on both loops and
both codec backends (``arun``): a burst from 127.0.0.1 cut at its rate
while 127.0.0.2 is served, the concurrency cap, IPv6 on ``::1``, the
frames-per-second pause (nothing lost, no disconnect, the timeouts not
fired by it), the overload episode (the listener stops accepting, then
resumes; its log lines), and, through a real HAProxy with
``send-proxy-v2``, limits applied to the PROXY header's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from test_proxy_haproxy import HAPROXY, haproxy
from test_server_support import Runner, frame_bytes, serving, wait_until

import fastnet
from fastnet import Limits
from fastnet._tunables import PAUSE_RATE
from fastnet.cli import build_parser, server_options
from fastnet.limits import OverloadGate, PeerLimiter, peer_key

pytest_plugins = ["test_server_support"]

TIMEOUT = 10.0  # every wait on a socket


# ------------------------------------------------------------------ units


def test_peer_key_ipv4_is_the_address_ipv6_the_64() -> None:
    assert peer_key(("192.0.2.7", 1234)) == "192.0.2.7"
    assert peer_key(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == "2001:db8:1:2::/64"
    # Two hosts of one /64 share a key; the next /64 is another peer.
    assert peer_key(("2001:db8:1:2:ffff:ffff:ffff:ffff", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:3::1", 1, 0, 0)) == "2001:db8:1:3::/64"
    assert peer_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"  # the zone is dropped
    assert peer_key(("::ffff:192.0.2.7", 1, 0, 0)) == "192.0.2.7"  # IPv4-mapped: the IPv4 key
    assert peer_key(("2001:db8::1", 1, 0, 0), ipv6_prefix=48) == "2001:db8::/48"
    assert peer_key(("::1", 5, 0, 0)) == "::/64"
    # Not limited per peer: Unix-socket peers, no address (PROXY LOCAL), junk.
    assert peer_key("") is None
    assert peer_key(None) is None
    assert peer_key(("not an address", 1)) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_connection_rate_bucket() -> None:
    clock = FakeClock()
    peers = PeerLimiter(Limits(conn_rate=2.0, conn_burst=3), clock)
    assert [peers.admit("a") for _ in range(4)] == [None, None, None, "rate"]
    assert peers.admit("b") is None  # another peer has its own bucket
    clock.now += 0.5  # one token back
    assert peers.admit("a") is None
    assert peers.admit("a") == "rate"
    clock.now += 100.0  # refills up to the burst, no further
    assert [peers.admit("a") for _ in range(4)] == [None, None, None, "rate"]


def test_concurrency_cap_and_release() -> None:
    peers = PeerLimiter(Limits(conns_per_peer=2))
    assert peers.admit("a") is None and peers.admit("a") is None
    assert peers.admit("a") == "concurrency"
    assert peers.open_connections("a") == 2
    peers.release("a")
    assert peers.admit("a") is None
    for _ in range(5):  # more releases than admissions never go below 0
        peers.release("a")
    assert peers.open_connections("a") == 0
    assert peers.admit("a") is None and peers.open_connections("a") == 1


def test_peer_table_is_bounded_under_a_scan() -> None:
    clock = FakeClock()
    peers = PeerLimiter(Limits(conn_rate=1.0, conn_burst=1, conns_per_peer=1, max_peers=100), clock)
    assert peers.admit("10.0.0.1") is None  # a peer with a connection open
    assert peers.admit("10.0.0.1") == "concurrency"
    # A scan from 20,000 (fake) addresses: the rate table stays at 100 peers,
    # every bucket past them evicts the least recently seen one.
    for i in range(20_000):
        key = peer_key((f"198.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1))
        assert key is not None
        assert peers.admit(key) is None
        peers.release(key)
    assert peers.peers == 100
    assert peers.evictions == 20_000 + 1 - 100
    # The open peer's rate bucket was evicted; its open count was not: it is
    # still refused for concurrency, and its close brings it to 0, not below.
    assert peers.open_connections("10.0.0.1") == 1
    assert peers.admit("10.0.0.1") == "concurrency"
    peers.release("10.0.0.1")
    peers.release("10.0.0.1")
    assert peers.open_connections("10.0.0.1") == 0
    assert peers.admit("10.0.0.1") is None  # a new bucket, full


def test_ipv6_scan_within_one_64_is_one_peer() -> None:
    peers = PeerLimiter(Limits(conn_rate=0.001, conn_burst=5, max_peers=10))
    causes = [peers.admit(peer_key((f"2001:db8:0:1::{i:x}", 1, 0, 0)) or "") for i in range(50)]
    assert causes.count(None) == 5 and causes.count("rate") == 45
    assert peers.peers == 1 and peers.evictions == 0


def test_overload_gate_hysteresis() -> None:
    gate = OverloadGate(high=1000, low=400)
    assert [gate.update(n) for n in (10, 1000, 1001, 5000, 800, 401)] == [
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    assert gate.overloaded
    assert gate.update(400) and not gate.overloaded
    assert not gate.update(999)


def test_limits_defaults_and_validation() -> None:
    limits = Limits(conn_rate=2.5, frame_rate=100, overload_high=1000)
    assert limits.conn_bucket == 3 and limits.frame_bucket == 100
    assert limits.overload_resume == 500
    assert limits.per_peer and not Limits(frame_rate=1).per_peer
    for bad in (
        {"conn_rate": 0},
        {"conn_rate": float("inf")},
        {"conns_per_peer": 0},
        {"conn_burst": 3},  # without a rate
        {"frame_rate": -1},
        {"overload_low": 10},  # without a high mark
        {"overload_high": 10, "overload_low": 20},
        {"max_peers": 0},
        {"ipv6_prefix": 129},
    ):
        with pytest.raises(ValueError):
            Limits(**bad)
    with pytest.raises(TypeError):
        fastnet.Server(lambda conn: None, limits={"conn_rate": 1})  # type: ignore[arg-type]


def test_cli_options() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "echo",
            "--conn-rate",
            "5:20",
            "--conns-per-peer",
            "8",
            "--frame-rate",
            "1000",
            "--overload-high",
            "64MiB",
            "--overload-low",
            "16MiB",
        ]
    )
    assert server_options(args)["limits"] == Limits(
        conn_rate=5.0,
        conn_burst=20,
        conns_per_peer=8,
        frame_rate=1000.0,
        overload_high=64 << 20,
        overload_low=16 << 20,
    )
    assert "limits" not in server_options(parser.parse_args(["serve", "echo"]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--conn-rate", "0"],
        ["--conn-rate", "fast"],
        ["--conn-rate", "5:0"],
        ["--frame-rate", "5:x"],
        ["--conns-per-peer", "0"],
        ["--overload-low", "1MiB"],
        ["--overload-high", "1MiB", "--overload-low", "2MiB"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from fastnet.cli import main

    try:
        status = main(["serve", "echo", "--port", "0", *argv])
    except SystemExit as exc:  # argparse's own errors exit from the parser
        status = exc.code  # type: ignore[assignment]
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err


# ------------------------------------------------------------ real sockets


async def echo(conn: fastnet.Connection) -> None:
    async for frame in conn:
        conn.send(frame)


async def attempt(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> bool:
    """Connect from ``source``, send a frame: True if it is echoed, False if the server closed."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(source, 0)), TIMEOUT
    )
    try:
        writer.write(frame_bytes(b"ping"))
        try:
            data = await asyncio.wait_for(reader.read(100), TIMEOUT)
        except ConnectionError:
            return False
        if not data:
            return False
        assert data == frame_bytes(b"ping")
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


def rejected_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "rejected"]


def test_burst_from_one_address_is_cut_another_is_served(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastnet")
    # One connection per 1,000 s after a burst of 3: the test never sees a refill.
    limits = Limits(conn_rate=0.001, conn_burst=3)

    async def scenario() -> None:
        async with serving(echo, limits=limits) as server:
            assert server.port is not None
            served = [await attempt(server.port, "127.0.0.1") for _ in range(25)]
            assert served == [True] * 3 + [False] * 22
            other = [await attempt(server.port, "127.0.0.2") for _ in range(3)]
            assert other == [True] * 3
            await wait_until(lambda: server.stats()["active"] == 0, TIMEOUT)
            stats = server.stats()
            assert stats["rejected_rate"] == 22
            assert stats["rejected_concurrency"] == stats["rejected_overload"] == 0
            assert stats["accepted"] == 28 and stats["closed"] == 28
            assert stats["frames_in"] == 6

    arun(scenario())
    lines = rejected_lines(caplog)
    # One DEBUG line per rejection, rate-limited: the first 10 of the interval.
    assert len(lines) == 10
    assert all(r.levelno == logging.DEBUG for r in lines)
    assert {(r.cause, r.peer.rpartition(":")[0]) for r in lines} == {  # type: ignore[attr-defined]
        ("rate", "127.0.0.1")
    }


def test_concurrency_cap(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo, limits=Limits(conns_per_peer=2)) as server:
            port = server.port
            assert port is not None
            async with (
                await fastnet.connect("127.0.0.1", port) as a,
                await fastnet.connect("127.0.0.1", port) as b,
            ):
                for conn in (a, b):
                    conn.send(b"x")
                    assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"x"
                assert not await attempt(port, "127.0.0.1")  # a third: refused
                assert await attempt(port, "127.0.0.2")  # another address: served
                assert server.stats()["rejected_concurrency"] == 1
            # Both closed: the count is back to 0, two more may open.
            await wait_until(lambda: server.stats()["active"] == 0, TIMEOUT)
            async with (
                await fastnet.connect("127.0.0.1", port) as a,
                await fastnet.connect("127.0.0.1", port) as b,
            ):
                for conn in (a, b):
                    conn.send(b"y")
                    assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"y"
            assert server.stats()["rejected_concurrency"] == 1

    arun(scenario())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_peer_limited_by_its_64(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        server = fastnet.Server(echo, "::1", 0, limits=Limits(conns_per_peer=1), drain_timeout=5)
        async with server:
            assert server.port is not None
            async with await fastnet.connect("::1", server.port) as held:
                held.send(b"x")
                assert await asyncio.wait_for(held.recv(), TIMEOUT) == b"x"
                assert not await attempt(server.port, "::1", host="::1")
                assert server.stats()["rejected_concurrency"] == 1

    arun(scenario())


def test_frame_rate_pauses_reading_nothing_lost(arun: Runner[Any]) -> None:
    # 100 frames/s, bucket of 10. Five batches of 30 frames, each sent when
    # the previous one's echoes are back: the first read leaves a debt of 20
    # (0.2 s of pause), each next one 30 (0.3 s), so the fifth batch cannot
    # be read before 0.2 + 3 * 0.3 = 1.1 s. Every frame comes back, in
    # order, on the same connection.
    paused: list[int] = []

    async def watch(conn: fastnet.Connection) -> None:
        async for batch in _batches(conn):
            paused.append(conn._read_paused & PAUSE_RATE)
            conn.send_many(batch)

    async def scenario() -> float:
        limits = Limits(frame_rate=100, frame_burst=10)
        async with serving(watch, limits=limits) as server:
            assert server.port is not None
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                start = time.monotonic()
                for batch in range(5):
                    frames = [b"%d-%d" % (batch, i) for i in range(30)]
                    conn.send_many(frames)
                    got: list[bytes] = []
                    while len(got) < 30:
                        got += await asyncio.wait_for(conn.recv_batch(), TIMEOUT)
                    assert got == frames
                elapsed = time.monotonic() - start
                conn.send(b"still open")
                assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"still open"
            stats = server.stats()
            assert stats["frames_in"] == stats["frames_out"] == 151
            assert stats["idle_timeouts"] == stats["frame_timeouts"] == 0
            return elapsed

    elapsed = arun(scenario())
    assert elapsed >= 1.0, elapsed  # 1.1 s at least, less a timer's rounding
    assert any(paused)  # reading was paused for the rate while frames were handled


async def _batches(conn: fastnet.Connection) -> Any:
    while True:
        try:
            yield await conn.recv_batch()
        except fastnet.ConnectionClosedError:
            return


def test_frame_rate_pause_is_not_idle_nor_a_slow_frame(arun: Runner[Any]) -> None:
    # A pause of about 1 s (11 frames against a bucket of 1 at 10/s) with
    # half a frame received and the handler waiting: neither the 0.3 s idle
    # timeout nor the 0.3 s frame deadline may close the connection; the
    # frame completes after the pause.
    async def scenario() -> None:
        limits = Limits(frame_rate=10, frame_burst=1)
        async with serving(echo, limits=limits, idle_timeout=0.3, frame_timeout=0.3) as server:
            assert server.port is not None
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", server.port), TIMEOUT
            )
            try:
                last = frame_bytes(b"last")
                writer.write(b"".join(frame_bytes(b"%d" % i) for i in range(11)) + last[:3])
                await asyncio.sleep(0.6)
                writer.write(last[3:])
                expected = b"".join(frame_bytes(b"%d" % i) for i in range(11)) + last
                data = b""
                while len(data) < len(expected):
                    chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT)
                    assert chunk, f"closed after {data!r}"
                    data += chunk
                assert data == expected
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
            await wait_until(lambda: server.stats()["active"] == 0, TIMEOUT)
            stats = server.stats()
            assert stats["idle_timeouts"] == 0 and stats["frame_timeouts"] == 0

    arun(scenario())


def test_overload_stops_and_resumes_accepting(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The first connection's handler takes no frame until told to, and its
    # client sends 2 MiB: its inbox goes over the 256 KiB mark, the listener
    # stops accepting. A second client connects meanwhile and waits, unserved,
    # in the backlog; once the handler takes its frames (down to 0 bytes
    # buffered, under the 64 KiB mark), the listener accepts it and it is
    # served. One episode, logged at its start and its end.
    caplog.set_level(logging.INFO, logger="fastnet")
    go = asyncio.Event()
    first = True

    async def handler(conn: fastnet.Connection) -> None:
        nonlocal first
        if first:
            first = False
            await go.wait()
        async for frame in conn:
            conn.send(frame[:8])

    async def scenario() -> None:
        nonlocal go
        go = asyncio.Event()
        limits = Limits(overload_high=256 * 1024, overload_low=64 * 1024, overload_interval=0.02)
        async with serving(handler, limits=limits) as server:
            assert server.port is not None
            hog = await fastnet.connect("127.0.0.1", server.port)
            payload = b"x" * 65536
            hog.send_many([payload] * 32)
            await wait_until(lambda: server.stats()["overloaded"] == 1, TIMEOUT, "overload")
            assert server.stats()["buffered_bytes"] > 256 * 1024
            accepted = server.stats()["accepted"]
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", server.port), TIMEOUT
            )
            writer.write(frame_bytes(b"waiting"))
            with pytest.raises(asyncio.TimeoutError):  # not served while overloaded
                await asyncio.wait_for(reader.read(100), 0.3)
            assert server.stats()["accepted"] == accepted
            go.set()
            replies: list[bytes] = []
            while len(replies) < 32:
                replies += await asyncio.wait_for(hog.recv_batch(), TIMEOUT)
            assert replies == [payload[:8]] * 32
            data = await asyncio.wait_for(reader.read(100), TIMEOUT)
            assert data == frame_bytes(b"waiting")
            writer.close()
            hog.close()
            stats = server.stats()
            assert stats["overloaded"] == 0 and stats["overload_episodes"] == 1
            assert stats["rejected_overload"] == 0  # it waited in the backlog, not refused

    arun(scenario())
    starts = [r for r in caplog.records if getattr(r, "event", None) == "overload_start"]
    ends = [r for r in caplog.records if getattr(r, "event", None) == "overload_end"]
    assert len(starts) == 1 and len(ends) == 1
    assert starts[0].levelno == logging.WARNING and "not accepting" in starts[0].getMessage()
    assert "accepting again" in ends[0].getMessage()


def test_metrics_export_the_limits(arun: Runner[Any]) -> None:
    pytest.importorskip("prometheus_client")
    from fastnet.metrics import FastnetCollector

    async def scenario() -> dict[str, float]:
        limits = Limits(conn_rate=0.001, conn_burst=1, overload_high=1 << 30)
        async with serving(echo, limits=limits, metrics=False) as server:
            assert server.port is not None
            collector = FastnetCollector()
            collector.add(server)

            def samples() -> dict[str, float]:
                found = {}
                for family in collector.collect():
                    for sample in family.samples:
                        cause = sample.labels.get("cause", "")
                        found[f"{sample.name}{cause and ':' + cause}"] = sample.value
                return found

            before = samples()
            for cause in ("rate", "concurrency", "overload", "admission", "untrusted_proxy"):
                assert before[f"fastnet_connections_rejected_total:{cause}"] == 0
            assert before["fastnet_peer_table_evictions_total"] == 0
            assert before["fastnet_overloaded"] == 0
            assert before["fastnet_overload_episodes_total"] == 0
            assert await attempt(server.port)
            assert not await attempt(server.port)
            return samples()

    after = arun(scenario())
    assert after["fastnet_connections_rejected_total:rate"] == 1


# ------------------------------------------------------------------ HAProxy


@pytest.mark.skipif(HAPROXY is None, reason="no haproxy binary (Debian: apt-get install haproxy)")
def test_limits_apply_to_the_proxy_header_address(arun: Runner[Any], tmp_path: Path) -> None:
    # HAProxy connects to fastnet from 127.0.0.1 every time; the limit must
    # apply to the clients it names: 127.0.0.2 is cut after its burst of 2,
    # 127.0.0.3, through the same HAProxy, is not.
    async def scenario() -> None:
        server = fastnet.Server(
            echo,
            "127.0.0.1",
            0,
            proxy_protocol="v2",
            trusted_proxies=["127.0.0.1"],
            limits=Limits(conn_rate=0.001, conn_burst=2),
            drain_timeout=5.0,
        )
        async with server:
            assert server.port is not None
            with haproxy(tmp_path, server.port, "send-proxy-v2") as front:
                limited = [await attempt(front, "127.0.0.2") for _ in range(5)]
                other = [await attempt(front, "127.0.0.3") for _ in range(2)]
            assert limited == [True, True, False, False, False]
            assert other == [True, True]
            stats = server.stats()
            assert stats["rejected_rate"] == 3
            assert stats["proxy_header_errors"] == 0 and stats["proxy_untrusted"] == 0

    arun(scenario())
