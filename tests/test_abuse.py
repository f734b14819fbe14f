"""Abuse: hostile and broken clients, while a healthy client keeps being served.

Each test starts a real server (``python -m fastnet serve echo``, see
``abuse_support.AbuseServer``), connects the healthy client (``Pinger``, a
subprocess that sends a frame every 10 ms, verifies each echo byte for byte
and records its round trip), then abuses the server from this process, and
finally asserts:

- every ping came back, verified, and the pings' p99 latency stayed under
  ``P99_BOUND_MS`` = 250 ms. On an idle machine a ping takes about 0.1 ms;
  this machine has 2 cores shared by the server, the pinger, this process
  and whatever else CI runs, so scheduling alone can cost tens of
  milliseconds. 250 ms is far above that noise and far below what a stalled
  loop shows (the issue's probes saw seconds);
- the server's peak RSS (sampled every 20 ms) stayed under its baseline plus
  ``MEMORY_SLACK`` (16 MiB: allocator arenas and the healthy traffic) plus
  what the case may legitimately hold, stated per test (e.g. the README's
  16 KiB per idle connection, or 512 KiB per connection that never reads);
- the abusive connections ended as the case requires, and the server let go
  of them: its descriptor count is back to the baseline afterwards.

Variants. Where the codec backend or the event loop changes the behaviour
(decoder memory, the transports' buffers, the read path), a test runs on all
four combinations (``process_variant``); the heavier cases, whose behaviour
lives in the server layer above the codec, run on two: asyncio with the
pure-Python backend and uvloop with the extension, which covers each loop and
each backend once and keeps the module near two minutes.

The tests are marked ``slow`` (each takes seconds); ``make test`` runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import random
import selectors
import socket
import struct
import sys
import time
from typing import Any

import pytest
from abuse_support import (
    ANSWER_REQUEST,
    ANSWER_SIZE,
    HERE,
    MIN_PINGS,
    AbuseServer,
    PeakRSS,
    abuse_server,
    closed_by_peer,
    frame,
    pinging,
    raise_fd_limit,
    reset,
    wait_all_closed_by_peer,
)
from test_server_support import HAVE_UVLOOP, Runner, serving

import fastnet
from fastnet import ConnectionBrokenError, FrameTooLarge
from fastnet.apps import echo
from fastnet.connection import Connection

pytest_plugins = ["test_server_support"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)"),
]

# The healthy client's bounds (see the module docstring).
P99_BOUND_MS = 250.0
# The one exception: a flood of zero-length frames served by the pure-Python
# backend. Every 64 KiB read is 16,384 frames decoded, echoed and encoded in
# Python (about 1.5 us each, 30 times the extension's cost: 25-35 ms a read).
# uvloop used to make up to 32 such reads per readiness event; a read of more
# than READ_FAIR_FRAMES frames now pauses reading until the loop's next turn
# (uvloop p99 534 -> 284 ms on a loaded machine), but four flooders still cost
# one read each per turn, about 100+ ms, on either loop (asyncio p99 ~300 ms).
# This bounds it (the loop turns, every ping is answered) without pretending
# the twin is as fast as the extension under that load.
PURE_FLOOD_P99_BOUND_MS = 1000.0
# Memory every case may grow by, on top of what it states (module docstring).
MEMORY_SLACK_KIB = 16 * 1024
# The README's budget for an idle connection (benchmarks/memory.py measures
# 4-7 KiB): what a connection that is open but not sending may hold.
IDLE_CONNECTION_KIB = 16
# The README's bound on what the server holds for a client that sends
# requests and never reads the replies.
UNREAD_CONNECTION_KIB = 512
# Seconds the server gets to close its side of connections the abuse left:
# its own longest bound on a close, plus a margin. The frame deadline (30 s)
# is checked every 30/8 s, so a connection stuck inside a frame is closed
# within 37.5 s of the frame's start; the lingering close's bound is 30 s. They
# are normally all closed within milliseconds. Full-suite CI runs twice saw
# the storm test keep descriptors longer (1 after 10 s, asyncio/pure; 2 after
# 35 s, uvloop/C), never reproduced alone; a failure now lists the leftover
# sockets' TCP states and the server's last log lines to tell which path held
# them. A descriptor that is never released still fails.
RELEASE_TIMEOUT = 45.0
# Descriptors this module needs at most (the storm's sockets and the
# half-closing clients, plus the interpreter's own).
FDS_NEEDED = 4096

TWO_VARIANTS = [
    pytest.param(("asyncio", "py"), id="asyncio-py"),
    pytest.param(
        ("uvloop", "c"),
        id="uvloop-c",
        marks=[
            pytest.mark.c_extension,
            pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
        ],
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _fd_budget() -> None:
    raise_fd_limit(FDS_NEEDED)


def assert_healthy(
    report: dict[str, Any], min_pings: int = MIN_PINGS, p99_bound_ms: float = P99_BOUND_MS
) -> None:
    """Every ping came back verified, enough of them ran, and their p99 is in bounds."""
    assert report["failures"] == [], f"the healthy client failed: {report['failures'][:3]}"
    assert report["pings"] >= min_pings, f"only {report['pings']} pings ran: {report}"
    assert report["p99_ms"] <= p99_bound_ms, (
        f"healthy pings p99 {report['p99_ms']} ms > {p99_bound_ms} ms "
        f"(p50 {report['p50_ms']}, max {report['max_ms']}, {report['pings']} pings)"
    )


def assert_memory(peak_kib: int, base_kib: int, allowed_kib: float, what: str) -> None:
    bound = base_kib + allowed_kib + MEMORY_SLACK_KIB
    assert peak_kib <= bound, (
        f"server RSS peaked at {peak_kib / 1024:.1f} MiB, over the bound {bound / 1024:.1f} MiB "
        f"(baseline {base_kib / 1024:.1f} + {what} {allowed_kib / 1024:.1f} "
        f"+ slack {MEMORY_SLACK_KIB / 1024:.0f} MiB)"
    )


def assert_released(server: AbuseServer, base_fds: int) -> None:
    count = server.wait_fds(base_fds, RELEASE_TIMEOUT)
    if count > base_fds:  # say what they are: the sockets' states, the server's last lines
        fds = "\n  ".join(server.describe_fds())
        log = "\n  ".join(server.error_text().splitlines()[-15:])
        raise AssertionError(
            f"the server still holds {count - base_fds} descriptors of abusive connections "
            f"{RELEASE_TIMEOUT:g} s after they ended; its descriptors:\n  {fds}\n"
            f"its log's last lines:\n  {log}"
        )
    assert server.alive(), f"the server died: {server.error_text()[-2000:]}"


def connect_nonblocking(port: int, count: int) -> list[socket.socket]:
    """Start ``count`` connects at once; the sockets are non-blocking, connecting or connected."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    return socks


def server_errors(server: AbuseServer) -> list[str]:
    """Lines of the server's stderr that show an exception escaping fastnet."""
    text = server.error_text()
    return [
        line
        for line in text.splitlines()
        if "never retrieved" in line or "Traceback" in line or "Exception in callback" in line
    ]


# ----------------------------------------------------------- reset mid-frame


def test_clients_that_reset_mid_frame(process_variant: tuple[str, str]) -> None:
    """For 2 s, rounds of 20 clients: one echo each, then half of a 64 KiB frame, then a reset.

    Allowed memory: the half-frames in flight, 20 clients x 64 KiB at once.
    """
    loop, backend = process_variant
    rounds, concurrent, size, duration = 200, 20, 64 * 1024, 2.0
    rng = random.Random(1)
    with (
        abuse_server(["echo"], loop=loop, backend=backend) as server,
        pinging(server.port) as pinger,
    ):
        base_fds, base_rss = server.fds(), server.rss_kib()
        with PeakRSS(server.pid) as peak:
            end = time.monotonic() + duration
            for _ in range(rounds):
                if time.monotonic() >= end:
                    break
                socks = [
                    socket.create_connection(("127.0.0.1", server.port), 5.0)
                    for _ in range(concurrent)
                ]
                for sock in socks:
                    payload = rng.randbytes(rng.randint(1, 4096))
                    sock.sendall(frame(payload))
                    got = b""
                    while len(got) < len(payload) + 4:
                        chunk = sock.recv(65536)
                        assert chunk, "the server closed a client before its echo"
                        got += chunk
                    assert got == frame(payload)
                for sock in socks:
                    half = frame(rng.randbytes(size))[: size // 2]
                    sock.sendall(half)
                for sock in socks:
                    reset(sock)
                # The next round once the server let go of this one: at most
                # `concurrent` connections are ever open, as the allowance says.
                server.wait_fds(base_fds, RELEASE_TIMEOUT)
            assert_released(server, base_fds)
        report = pinger.finish()
    assert_healthy(report)
    assert_memory(peak.peak, base_rss, concurrent * size / 1024, "half-frames in flight")


# ------------------------------------------------------ half-close, lingering


# Server CPU allowed while its only work is connections lingering after
# their handlers returned, and the healthy pings: a tenth of a core. Waiting
# for those connections costs nothing when it waits on events; the pinger's
# 100 round trips a second cost well under 1 %.
LINGER_CPU_BOUND = 0.10


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_half_close_after_sending_gets_every_reply(variant: tuple[str, str]) -> None:
    """1,000 clients pipeline 16 KiB of requests, shutdown(SHUT_WR), and read only later.

    Their receive buffers are small (4 KiB), so the echoes cannot all be
    delivered until they read. While they wait (2 s), the server may hold at
    most 16 KiB (idle budget) + 16 KiB (the echo not yet delivered) per
    connection. Then every client reads: every reply must arrive, byte for
    byte, then EOF.
    """
    loop, backend = variant
    clients, request_bytes, wait = 1000, 16 * 1024, 2.0
    rng = random.Random(2)
    payloads: list[bytes] = []
    while sum(len(p) + 4 for p in payloads) < request_bytes:
        payloads.append(rng.randbytes(rng.randint(0, 2000)))
    wire = b"".join(frame(p) for p in payloads)
    args = ["echo", "--max-connections", str(clients + 100)]
    with abuse_server(args, loop=loop, backend=backend) as server, pinging(server.port) as pinger:
        base_fds, base_rss = server.fds(), server.rss_kib()
        socks = []
        with PeakRSS(server.pid) as peak:
            for _ in range(clients):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(5.0)
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(wire)
                sock.shutdown(socket.SHUT_WR)
                socks.append(sock)
            time.sleep(wait)
        received = {sock: bytearray() for sock in socks}
        ended: set[socket.socket] = set()
        with selectors.DefaultSelector() as sel:
            for sock in socks:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + 30.0
            while len(ended) < len(socks) and time.monotonic() < deadline:
                for key, _ in sel.select(0.5):
                    sock = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        pytest.fail(f"a half-closed client was reset: {exc}")
                    if data:
                        received[sock] += data
                    else:
                        ended.add(sock)
                        sel.unregister(sock)
        complete = sum(1 for sock in socks if received[sock] == wire)
        for sock in socks:
            sock.close()
        assert_released(server, base_fds)
        report = pinger.finish()
    assert len(ended) == clients, f"{clients - len(ended)} clients never saw the server's EOF"
    assert complete == clients, f"{clients - complete} of {clients} clients lost replies"
    assert_healthy(report)
    allowed = clients * (IDLE_CONNECTION_KIB + request_bytes / 1024)
    assert_memory(peak.peak, base_rss, allowed, f"{clients} half-closed connections")


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_lingering_closes_cost_no_cpu(variant: tuple[str, str]) -> None:
    """1,000 clients each get a 64 KiB answer, and do not read it (4 KiB receive buffers).

    The handler (``abuse_support:answer_once``) returns after answering, so
    each connection lingers on the server until its answer is acknowledged.
    For 3 s the server's only other work is the pinger: it may use at most
    a tenth of a core. Then every client reads: the whole answer, then EOF.
    Allowed memory: 16 KiB + the 64 KiB answer per connection.
    """
    loop, backend = variant
    clients, quiet = 1000, 3.0
    request = ANSWER_REQUEST
    answer = (request * (ANSWER_SIZE // len(request) + 1))[:ANSWER_SIZE]
    args = ["abuse_support:answer_once", "--max-connections", str(clients + 100)]
    with (
        abuse_server(args, loop=loop, backend=backend, cwd=HERE) as server,
        pinging(server.port) as pinger,
    ):
        base_fds, base_rss = server.fds(), server.rss_kib()
        socks = []
        with PeakRSS(server.pid) as peak:
            for _ in range(clients):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(5.0)
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(frame(request))
                socks.append(sock)
            time.sleep(1.0)  # every handler has answered and returned: lingering now
            lingering = server.fds() - base_fds
            cpu_before = server.cpu_seconds()
            time.sleep(quiet)
            cpu_used = (server.cpu_seconds() - cpu_before) / quiet
        complete = ended = 0
        for sock in socks:
            got = bytearray()
            with contextlib.suppress(OSError):
                while True:
                    data = sock.recv(262144)
                    if not data:
                        ended += 1
                        break
                    got += data
            complete += bytes(got) == frame(answer)
            sock.close()
        assert_released(server, base_fds)
        report = pinger.finish()
    assert lingering >= clients // 2, f"only {lingering} connections lingered: the test is void"
    assert complete == clients, f"{clients - complete} of {clients} answers lost"
    assert ended == clients, f"{clients - ended} connections not ended with EOF"
    assert_healthy(report)
    assert cpu_used <= LINGER_CPU_BOUND, (
        f"the server used {cpu_used:.0%} of a core while {lingering} connections lingered "
        f"(bound {LINGER_CPU_BOUND:.0%}): a lingering close must wait on events, not poll"
    )
    allowed = clients * (IDLE_CONNECTION_KIB + ANSWER_SIZE / 1024)
    assert_memory(peak.peak, base_rss, allowed, f"{clients} lingering connections")


# -------------------------------------------------------------------- slowloris

FRAME_TIMEOUT = 2.0


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_slowloris_beyond_max_connections_is_cut_by_the_frame_deadline(
    variant: tuple[str, str],
) -> None:
    """100 clients trickle a 1,000-byte frame at 2 bytes/s; ``--max-connections 50``.

    With ``--frame-timeout 2``, each is closed about 2 s after its frame
    began, so the backlog keeps moving: all of them are closed within
    ``rounds x (2 s + 1 s)`` + 5 s, and a client that connects after them all
    is served in that time. The pinger, connected first, holds its slot.
    """
    loop, backend = variant
    clients, max_connections = 100, 50
    rounds = math.ceil(clients / (max_connections - 1)) + 1
    bound = rounds * (FRAME_TIMEOUT + 1.0) + 5.0
    args = ["echo", "--max-connections", str(max_connections)]
    args += ["--frame-timeout", str(FRAME_TIMEOUT)]
    with abuse_server(args, loop=loop, backend=backend) as server, pinging(server.port) as pinger:
        base_fds = server.fds()
        slow = connect_nonblocking(server.port, clients)
        header = (1000).to_bytes(4, "big")
        late = socket.socket()
        late.setblocking(False)
        late.connect_ex(("127.0.0.1", server.port))
        start = time.monotonic()
        sent = {sock: 0 for sock in slow}
        open_ = list(slow)
        closed_after: list[float] = []
        late_served = None
        late_wire = frame(b"late client")
        late_sent = False
        late_got = b""
        while time.monotonic() - start < bound and (open_ or late_served is None):
            still = []
            for sock in open_:
                if closed_by_peer(sock):
                    closed_after.append(time.monotonic() - start)
                    continue
                data = (header + b"x" * 1000)[sent[sock] : sent[sock] + 1]
                with contextlib.suppress(BlockingIOError, OSError):
                    sent[sock] += sock.send(data)
                still.append(sock)
            open_ = still
            if late_served is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    if not late_sent:
                        late.sendall(late_wire)  # 16 bytes: all or nothing
                        late_sent = True
                    late_got += late.recv(100)
                if late_got == late_wire:
                    late_served = time.monotonic() - start
            time.sleep(0.5)
        for sock in slow:
            reset(sock)
        late.close()
        assert_released(server, base_fds)
        report = pinger.finish()
    assert not open_, (
        f"{len(open_)} of {clients} slowloris clients still open after {bound:.0f} s "
        f"(closed: {len(closed_after)})"
    )
    assert late_served is not None, f"a client queued behind them was not served in {bound:.0f} s"
    assert_healthy(report)


# ------------------------------------------------------------ never reading


def test_pipeliners_that_never_read(process_variant: tuple[str, str]) -> None:
    """16 clients push up to 8 MiB each of 1-64 KiB frames for 3 s and never read a reply.

    Allowed memory: the README's 512 KiB per unread connection.
    """
    loop, backend = process_variant
    clients, push, duration = 16, 8 * 1024 * 1024, 3.0
    rng = random.Random(4)
    chunk = b"".join(frame(rng.randbytes(rng.randint(1024, 65536))) for _ in range(64))
    with (
        abuse_server(["echo"], loop=loop, backend=backend) as server,
        pinging(server.port) as pinger,
    ):
        base_fds, base_rss = server.fds(), server.rss_kib()
        socks = connect_nonblocking(server.port, clients)
        pushed = {sock: 0 for sock in socks}
        with PeakRSS(server.pid) as peak:
            end = time.monotonic() + duration
            while time.monotonic() < end:
                for sock in socks:
                    if pushed[sock] >= push:
                        continue
                    offset = pushed[sock] % len(chunk)
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        pushed[sock] += sock.send(chunk[offset:])
                time.sleep(0.01)
            time.sleep(0.5)
        for sock in socks:
            reset(sock)
        assert_released(server, base_fds)
        report = pinger.finish()
    assert min(pushed.values()) > 0, "a client could not send at all"
    assert_healthy(report)
    assert_memory(
        peak.peak, base_rss, clients * UNREAD_CONNECTION_KIB, f"{clients} unread connections"
    )


# --------------------------------------------------------------------- storms


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_connection_storm_far_above_max_connections_and_backlog(
    variant: tuple[str, str],
) -> None:
    """2,000 connects at once against ``--max-connections 100 --backlog 32``.

    Storm clients that get in send a frame and check its echo; every storm
    socket is closed after at most 2 s (a third with a reset). Then the
    server must release them all, serve a new client at once (within 10 s:
    a SYN dropped during the storm is retried by the kernel after 1 s), and
    the pinger must have been served throughout. Allowed memory: 16 KiB
    per connection slot.
    """
    loop, backend = variant
    storm, max_connections = 2000, 100
    args = ["echo", "--max-connections", str(max_connections), "--backlog", "32"]
    with abuse_server(args, loop=loop, backend=backend) as server, pinging(server.port) as pinger:
        base_fds, base_rss = server.fds(), server.rss_kib()
        with PeakRSS(server.pid) as peak:
            served, wrong = _storm(server.port, storm, hold=2.0)
            assert_released(server, base_fds)
            assert _served_within(server.port, 10.0), "no client served after the storm"
        report = pinger.finish()
    assert wrong == 0, f"{wrong} storm clients got a wrong echo"
    assert served > 0, "no storm client was served at all"
    assert_healthy(report)
    assert_memory(peak.peak, base_rss, max_connections * IDLE_CONNECTION_KIB, "the slots")


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_connection_storm_beyond_the_servers_descriptor_limit(variant: tuple[str, str]) -> None:
    """400 clients against a server limited to 128 descriptors (RLIMIT_NOFILE), max 1,000 conns.

    accept(2) fails with EMFILE; the server must back off and keep serving,
    every connection it did accept must be closed properly (nothing may
    escape the lingering close), and afterwards it serves new clients.
    """
    loop, backend = variant
    with (
        abuse_server(["echo"], loop=loop, backend=backend, fd_limit=128) as server,
        pinging(server.port) as pinger,
    ):
        base_fds = server.fds()
        served, wrong = _storm(server.port, 400, hold=3.0)
        assert_released(server, base_fds)
        assert _served_within(server.port, 10.0), "no client served after the storm"
        report = pinger.finish()
        errors = server_errors(server)
    assert wrong == 0, f"{wrong} storm clients got a wrong echo"
    assert served > 0, "no storm client was served at all"
    assert errors == [], f"exceptions escaped in the server: {errors[:3]}"
    assert_healthy(report)


def _storm(port: int, count: int, hold: float) -> tuple[int, int]:
    # Start `count` connects at once; each socket that connects sends one
    # frame and checks the echo; every socket is closed by `hold` seconds
    # (at a random moment, every third with a reset). Returns (served, wrong).
    rng = random.Random(count)
    socks = connect_nonblocking(port, count)
    wire = {sock: frame(b"storm %d" % i) for i, sock in enumerate(socks)}
    got = {sock: b"" for sock in socks}
    sent: set[socket.socket] = set()
    close_at = {sock: time.monotonic() + rng.uniform(0.2, hold) for sock in socks}
    served = wrong = 0
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while close_at:
            now = time.monotonic()
            for sock, when in list(close_at.items()):
                if now >= when:
                    del close_at[sock]
                    sel.unregister(sock)
                    if got[sock] == wire[sock]:
                        served += 1
                    elif got[sock]:
                        wrong += 1
                    if rng.random() < 1 / 3:
                        reset(sock)
                    else:
                        sock.close()
            for key, events in sel.select(0.02):
                sock = key.fileobj  # type: ignore[assignment]
                if events & selectors.EVENT_WRITE and sock not in sent:
                    with contextlib.suppress(OSError):
                        sock.send(wire[sock])
                        sent.add(sock)
                    sel.modify(sock, selectors.EVENT_READ)
                elif events & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1024)
                    except OSError:
                        data = b""
                    if data:
                        got[sock] += data
                    else:  # closed or refused: close it on the next pass
                        close_at[sock] = now
    return served, wrong


def _served_within(port: int, timeout: float) -> bool:
    wire = frame(b"after the storm")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.sendall(wire)
            got = b""
            while len(got) < len(wire):
                data = sock.recv(1024)
                if not data:
                    return False
                got += data
            return got == wire
    except OSError:
        return False


# -------------------------------------------------------------- bad headers


@pytest.mark.parametrize(
    ("framing", "size"),
    [
        pytest.param("length", 1024 * 1024 + 1, id="max_frame+1"),
        pytest.param("length:8", 2**63, id="2**63"),
    ],
)
@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_headers_announcing_too_much_close_the_connection(
    variant: tuple[str, str], framing: str, size: int
) -> None:
    """200 clients each send only a header announcing ``size`` > ``--max-frame 1MiB``.

    Each connection is closed at once (FrameTooLarge from the header, see
    the in-process test below for the type), and nothing is reserved for
    the announced body: allowed memory, 16 KiB per connection.
    """
    loop, backend = variant
    clients = 200
    field = 8 if framing == "length:8" else 4
    args = ["echo", "--framing", framing, "--max-frame", "1MiB"]
    with (
        abuse_server(args, loop=loop, backend=backend) as server,
        pinging(server.port, framing) as pinger,
    ):
        base_fds, base_rss = server.fds(), server.rss_kib()
        with PeakRSS(server.pid) as peak:
            socks = [socket.create_connection(("127.0.0.1", server.port), 5.0) for _ in range(40)]
            socks += connect_nonblocking(server.port, clients - len(socks))
            time.sleep(0.2)
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(size.to_bytes(field, "big"))
            still_open = wait_all_closed_by_peer(socks, RELEASE_TIMEOUT)
        for sock in socks:
            sock.close()
        assert_released(server, base_fds)
        report = pinger.finish()
    assert still_open == [], f"{len(still_open)} connections with a bad header left open"
    assert_healthy(report)
    assert_memory(peak.peak, base_rss, clients * IDLE_CONNECTION_KIB, f"{clients} connections")


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_bare_headers_of_a_large_frame_commit_no_memory(variant: tuple[str, str]) -> None:
    """200 clients each send a valid header announcing ``max_frame`` (1 MiB) and no body.

    The server may reserve the frame, but must not commit memory for bytes
    that have not arrived (the README: "the kernel commits the pages only as
    the payload arrives"). Allowed memory: 64 KiB per connection (one
    receive window), against the 1 MiB x 200 = 200 MiB that committing the
    announced bodies would cost.
    """
    loop, backend = variant
    clients, max_frame = 200, 1024 * 1024
    args = ["echo", "--max-frame", "1MiB"]
    with abuse_server(args, loop=loop, backend=backend) as server, pinging(server.port) as pinger:
        base_fds, base_rss = server.fds(), server.rss_kib()
        with PeakRSS(server.pid) as peak:
            socks = [socket.create_connection(("127.0.0.1", server.port), 5.0) for _ in range(40)]
            socks += connect_nonblocking(server.port, clients - len(socks))
            time.sleep(0.2)
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(max_frame.to_bytes(4, "big"))
            time.sleep(2.0)
            reopened = [s for s in socks if closed_by_peer(s)]
        for sock in socks:
            reset(sock)
        assert_released(server, base_fds)
        report = pinger.finish()
    assert reopened == [], f"{len(reopened)} connections with a valid header were closed"
    assert_healthy(report)
    assert_memory(peak.peak, base_rss, clients * 64, f"{clients} bare headers")


def test_a_header_of_2_63_is_a_typed_frame_too_large(arun: Runner[Any]) -> None:
    """In-process, both loops and backends: the handler sees FrameTooLarge(size=2**63) as cause."""
    framing = fastnet.LengthPrefixed(length_size=8, max_frame=1024 * 1024)
    causes: list[BaseException | None] = []

    async def handler(conn: Connection) -> None:
        try:
            while True:
                conn.send(await conn.recv())
        except ConnectionBrokenError as exc:
            causes.append(exc.__cause__)

    async def scenario() -> None:
        async with serving(handler, framing=framing) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write((5).to_bytes(8, "big") + b"hello" + (2**63).to_bytes(8, "big"))
            assert await reader.readexactly(13) == (5).to_bytes(8, "big") + b"hello"
            assert await reader.read() == b""
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    arun(scenario())
    assert len(causes) == 1
    assert isinstance(causes[0], FrameTooLarge), causes
    assert causes[0].size == 2**63 and causes[0].limit == 1024 * 1024


# ------------------------------------------------------------------- lines


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_a_line_without_delimiter_past_max_length_closes_the_connection(
    variant: tuple[str, str],
) -> None:
    """For 1.5 s, rounds of 50 clients: a valid line, then ``max_length`` + 1 bytes, no delimiter.

    The valid line is echoed; then the server closes the connection (the
    line is too long as soon as max_length + 1 bytes have arrived). Allowed
    memory: two line limits per connection.
    """
    loop, backend = variant
    clients, max_length, duration = 50, 64 * 1024, 1.5
    args = ["echo", "--framing", "lines", "--max-frame", "64K"]
    with (
        abuse_server(args, loop=loop, backend=backend) as server,
        pinging(server.port, "lines") as pinger,
    ):
        base_fds, base_rss = server.fds(), server.rss_kib()
        echoed = rounds = 0
        still_open: list[socket.socket] = []
        end = time.monotonic() + duration
        with PeakRSS(server.pid) as peak:
            while time.monotonic() < end and rounds < 100:
                rounds += 1
                socks = [
                    socket.create_connection(("127.0.0.1", server.port), 5.0)
                    for _ in range(clients)
                ]
                for i, sock in enumerate(socks):
                    sock.sendall(b"line %d\n" % i + b"y" * (max_length + 1))
                for i, sock in enumerate(socks):
                    want = b"line %d\n" % i
                    got = b""
                    with contextlib.suppress(OSError):
                        while len(got) < len(want):
                            data = sock.recv(100)
                            if not data:
                                break
                            got += data
                    echoed += got == want
                still_open += wait_all_closed_by_peer(socks, RELEASE_TIMEOUT)
                for sock in socks:
                    sock.close()
                # The next round once the server let go of this one: at most
                # `clients` connections are ever open, as the allowance says.
                server.wait_fds(base_fds, RELEASE_TIMEOUT)
        assert_released(server, base_fds)
        report = pinger.finish()
    assert echoed == clients * rounds, (
        f"only {echoed} of {clients * rounds} valid lines echoed before the bad one"
    )
    assert still_open == [], f"{len(still_open)} connections left open after an over-long line"
    assert_healthy(report)
    assert_memory(peak.peak, base_rss, clients * 2 * max_length / 1024, f"{clients} long lines")


# ------------------------------------------------------------ zero-length flood


def test_a_flood_of_zero_length_frames(process_variant: tuple[str, str]) -> None:
    """4 clients send zero-length frames as fast as they can for 3 s, reading the echoes.

    Every frame must be echoed (a zero-length frame echoes as its 4-byte
    header), and the pinger must stay within its bound: a read of 64 KiB is
    16,384 frames, handled in one batch. Allowed memory: 1 MiB per client.
    On the pure-Python backend the ping bound is ``PURE_FLOOD_P99_BOUND_MS``
    (see there why).
    """
    loop, backend = process_variant
    clients, duration = 4, 3.0
    chunk = b"\0\0\0\0" * 16384
    with (
        abuse_server(["echo"], loop=loop, backend=backend) as server,
        pinging(server.port) as pinger,
    ):
        base_fds, base_rss = server.fds(), server.rss_kib()
        socks = [socket.create_connection(("127.0.0.1", server.port), 5.0) for _ in range(clients)]
        sent = dict.fromkeys(socks, 0)
        received = dict.fromkeys(socks, 0)
        nonzero = 0
        with PeakRSS(server.pid) as peak, selectors.DefaultSelector() as sel:
            for sock in socks:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            end = time.monotonic() + duration
            deadline = end + 30.0
            while time.monotonic() < deadline:
                sending = time.monotonic() < end
                if not sending and all(received[s] == sent[s] for s in socks):
                    break
                for key, events in sel.select(0.05):
                    sock = key.fileobj  # type: ignore[assignment]
                    if events & selectors.EVENT_READ:
                        data = sock.recv(262144)
                        assert data, "the server closed a flooding client"
                        received[sock] += len(data)
                        nonzero += len(data) - data.count(0)
                    if events & selectors.EVENT_WRITE:
                        if sending:
                            offset = sent[sock] % len(chunk)
                            with contextlib.suppress(BlockingIOError):
                                sent[sock] += sock.send(chunk[offset:])
                        else:
                            sel.modify(sock, selectors.EVENT_READ)
        for sock in socks:
            sock.close()
        assert_released(server, base_fds)
        report = pinger.finish()
    frames = sum(sent.values()) // 4
    assert nonzero == 0, "an echo of a zero-length frame carried a non-zero byte"
    assert received == sent, f"echoes missing: sent {sent.values()}, received {received.values()}"
    assert frames > 10_000, f"only {frames} frames sent"
    assert_healthy(report, p99_bound_ms=P99_BOUND_MS if backend == "c" else PURE_FLOOD_P99_BOUND_MS)
    assert_memory(peak.peak, base_rss, clients * 1024, f"{clients} flooding clients")


# ------------------------------------------------------- slow reader vs idle


@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_a_slow_reader_is_not_idle(variant: tuple[str, str]) -> None:
    """With ``--idle-timeout 2``: a client pipelines 4 MiB and reads the echoes at ~1 MiB/s.

    The server pauses reading it (its write buffer is full), so no bytes
    arrive for more than 2 s, but the connection is busy: it must not be
    closed as idle, and every echoed byte must arrive.
    """
    loop, backend = variant
    total, rate = 4 * 1024 * 1024, 1024 * 1024
    rng = random.Random(6)
    wire = b"".join(frame(rng.randbytes(64 * 1024 - 4)) for _ in range(total // (64 * 1024)))
    args = ["echo", "--idle-timeout", "2"]
    with abuse_server(args, loop=loop, backend=backend) as server, pinging(server.port) as pinger:
        sock = socket.create_connection(("127.0.0.1", server.port), 5.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setblocking(False)
        sent = 0
        got = bytearray()
        start = time.monotonic()
        error = None
        while len(got) < len(wire) and time.monotonic() - start < 30.0:
            if sent < len(wire):
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(wire[sent : sent + 262144])
            allowed = int((time.monotonic() - start) * rate) - len(got)
            if allowed > 0:
                try:
                    data = sock.recv(min(allowed, 65536))
                except BlockingIOError:
                    data = None
                except OSError as exc:
                    error = exc
                    break
                if data == b"":
                    error = EOFError("the server closed the connection")
                    break
                if data:
                    got += data
            time.sleep(0.01)
        sock.close()
        report = pinger.finish()
    assert error is None, f"the slow reader was cut after {len(got)} of {len(wire)} bytes: {error}"
    assert bytes(got) == wire, f"the slow reader got {len(got)} of {len(wire)} bytes, or wrong ones"
    assert_healthy(report)


# ------------------------------------------------------------ freeing closed


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("ending", ["close", "framing-error", "reset"])
def test_closed_connections_are_freed_without_the_cycle_collector(
    codec: Any, loop_kind: str, ending: str
) -> None:
    """A closed connection must be freed by reference counting, at once.

    Found by the soak (benchmarks/soak.py): with thousands of long-lived
    connections, full collections are rare, and a closed connection kept
    alive by a reference cycle keeps its receive buffer until then: the
    server's RSS grew ~60 KiB per churned connection. With the cycle
    collector off, 20 connections that each echoed a 64 KiB frame are
    opened and closed; none may be left.
    """
    if loop_kind == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    payload = os.urandom(64 * 1024)

    async def scenario() -> int:
        async with serving(echo) as server:
            loop = asyncio.get_running_loop()
            for _ in range(20):
                if ending == "close":
                    conn = await fastnet.connect("127.0.0.1", server.port)
                    conn.send(payload)
                    assert await conn.recv() == payload
                    conn.close()
                    await conn.wait_closed()
                    del conn
                    continue
                # A raw client: half a frame then a reset, or a header over
                # max_frame (the framing error's traceback must not tie the
                # connection into a cycle).
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                if ending == "reset":
                    await loop.sock_sendall(sock, (1000).to_bytes(4, "big") + b"h" * 500)
                    await asyncio.sleep(0.01)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    await loop.sock_sendall(sock, (2**31).to_bytes(4, "big"))
                    await loop.sock_recv(sock, 1)  # the server's close
                sock.close()
            await _until_no_active(server)
            return sum(
                1
                for o in gc.get_objects()
                # server-side connections (their observer is the server's supervisor)
                if isinstance(o, Connection) and o._server is not None
            )

    from fastnet.server import run_coroutine

    gc.collect()
    gc.disable()
    try:
        left = run_coroutine(asyncio.wait_for(scenario(), 30.0), loop=loop_kind)
    finally:
        gc.enable()
        gc.collect()
    assert left == 0, f"{left} closed server-side connections are only freeable by the GC"


async def _until_no_active(server: fastnet.Server) -> None:
    deadline = time.monotonic() + 10.0
    while server.stats()["active"] and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
