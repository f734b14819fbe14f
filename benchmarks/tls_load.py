"""TLS connection load for compare.py's ``--set tls``: new connections per second, idle memory.

Usage::

    python benchmarks/tls_load.py rate --port P --server-pid PID [--connections 2000]
        [--concurrency 32] [--ca FILE] [--json]
    python benchmarks/tls_load.py idle --port P --server-pid PID [--connections 2000] [--json]

``rate`` measures new TLS connections per second: ``--concurrency`` workers
share a bounded count of ``--connections`` connections (after
``--warmup-connections`` unmeasured ones); each connection connects, completes
a full TLS handshake (no session is resumed), sends one 64-byte frame, reads
its echo, verifies it, and closes (close_notify). The report gives
connections/s, the server's CPU microseconds per connection (``/proc/PID/stat``
at the edges of the measured loop, so it stays a fair figure when this client
is the limit), this client's own CPU use, and the time per connection (p50,
p99). Without ``--ca`` the client does not verify the server's certificate:
verifying costs the client a signature check per connection and the server
nothing, and the server is what is measured.

``idle`` measures the server's memory per idle TLS connection: one warm-up
connection (connect, echo, close) so that first-use allocations are not
charged to the others, the server's RSS, then ``--connections`` connections
opened and handshaken (at most ``BATCH`` at a time) and left idle, the RSS
again once it has settled, then one 128-byte frame echoed on each connection
and the RSS a third time. RSS is ``VmRSS`` from ``/proc/PID/status``; kernel
socket buffers are not part of it. A server that closed an idle connection
is an error (it would look lean).

Every loop is bounded in count and in time (``--timeout``). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import statistics
import sys
import time
from typing import Any, cast

# Concurrent connection attempts while opening idle connections: below the
# servers' listen backlog (1024) and asyncio's default (100).
BATCH = 100

# Descriptors needed beyond the connections (interpreter, event loop). A guess.
FD_MARGIN = 200

# RSS is read after it has changed by less than this over SETTLE_STEP seconds
# (the server may still be finishing handshakes or freeing buffers), or after
# SETTLE_LIMIT seconds: 64 KiB is 32 bytes per connection at 2,000, noise.
SETTLE_STABLE_KIB = 64
SETTLE_STEP = 0.5
SETTLE_LIMIT = 10.0

# Seconds one connection (connect, handshake, echo, close) may take.
CONNECTION_TIMEOUT = 10.0


def frame(size: int) -> bytes:
    """A length-prefixed frame (4-byte big-endian length) of ``size`` payload bytes."""
    return size.to_bytes(4, "big") + bytes(i % 251 for i in range(size))


def client_context(ca: str | None) -> ssl.SSLContext:
    """TLS 1.2+; the server verified against ``ca`` when given, else not at all."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (proc(5) fields 14, 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted``; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class Echo(asyncio.Protocol):
    """A client connection that can send one frame and wait for its echo."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.expected = b""
        self.received = bytearray()
        self.echoed: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.expected = data
        self.received.clear()
        self.echoed = asyncio.get_running_loop().create_future()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.expected) and not self.echoed.done():
            if self.received == self.expected:
                self.echoed.set_result(None)
            else:
                self.echoed.set_exception(RuntimeError("the server echoed different bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.echoed.done() and self.expected:
            self.echoed.set_exception(RuntimeError(f"the server closed the connection ({exc})"))


async def open_one(args: argparse.Namespace, context: ssl.SSLContext) -> Echo:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        Echo, args.host, args.port, ssl=context, server_hostname=args.server_name or args.host
    )
    return protocol


async def one_connection(args: argparse.Namespace, context: ssl.SSLContext, payload: bytes) -> None:
    """Connect, handshake, echo one frame, close (close_notify), wait until closed."""
    protocol = await open_one(args, context)
    protocol.send(payload)
    await protocol.echoed
    assert protocol.transport is not None
    protocol.transport.close()
    await protocol.lost


# --------------------------------------------------------------------------- rate


async def rate(args: argparse.Namespace) -> dict[str, Any]:
    context = client_context(args.ca)
    payload = frame(args.size)
    errors: list[str] = []
    durations: list[float] = []
    deadline = time.monotonic() + args.timeout

    async def run(count: int, record: bool) -> int:
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < count and time.monotonic() < deadline:
                issued += 1
                began = time.perf_counter()
                try:
                    await asyncio.wait_for(
                        one_connection(args, context, payload), CONNECTION_TIMEOUT
                    )
                except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if record:
                    durations.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(min(args.concurrency, count))))
        return issued

    await run(args.warmup_connections, record=False)
    warmup_errors = len(errors)
    start_server = cpu_seconds(args.server_pid)
    start_machine = machine_busy()
    start_cpu = time.process_time()
    start = time.perf_counter()
    issued = await run(args.connections, record=True)
    window = time.perf_counter() - start
    client_cpu = time.process_time() - start_cpu
    server_cpu = cpu_seconds(args.server_pid) - start_server
    machine = machine_busy() - start_machine
    done = len(durations)
    durations.sort()

    def ms(q: float) -> float | None:
        if not durations:
            return None
        return round(durations[min(len(durations) - 1, int(q / 100 * len(durations)))] * 1e3, 3)

    return {
        "connections": args.connections,
        "issued": issued,
        "completed": done,
        "concurrency": args.concurrency,
        "window_s": round(window, 3),
        "conns_per_s": round(done / window, 1) if window else None,
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_us_per_conn": round(server_cpu / done * 1e6, 1) if done else None,
        "server_cpu_util": round(server_cpu / window, 3) if window else None,
        "client_cpu_util": round(client_cpu / window, 3) if window else None,
        "client_cpu_us_per_conn": round(client_cpu / done * 1e6, 1) if done else None,
        "other_cpu_util": (
            round(max(0.0, machine - client_cpu - server_cpu) / window, 3) if window else None
        ),
        "conn_ms": {"p50": ms(50), "p99": ms(99), "mean": (
            round(statistics.fmean(durations) * 1e3, 3) if durations else None
        )},
        "errors": len(errors) - warmup_errors,
        "warmup_errors": warmup_errors,
        "error_messages": errors[:10],
        "verified": args.ca is not None,
    }  # fmt: skip


# --------------------------------------------------------------------------- idle


async def settled_rss(pid: int, deadline: float) -> int:
    """The server's RSS once two reads ``SETTLE_STEP`` apart agree (or at the deadline)."""
    previous = rss_kib(pid)
    limit = min(deadline, time.monotonic() + SETTLE_LIMIT)
    while time.monotonic() < limit:
        await asyncio.sleep(SETTLE_STEP)
        current = rss_kib(pid)
        if abs(current - previous) < SETTLE_STABLE_KIB:
            return current
        previous = current
    return previous


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    context = client_context(args.ca)
    pid = args.server_pid
    deadline = time.monotonic() + args.timeout
    row: dict[str, Any] = {"connections": args.connections}
    await asyncio.wait_for(one_connection(args, context, frame(128)), CONNECTION_TIMEOUT)
    await asyncio.sleep(args.settle)
    row["rss_before_kib"] = await settled_rss(pid, deadline)
    gate = asyncio.Semaphore(BATCH)

    async def opened() -> Echo:
        async with gate:
            return await asyncio.wait_for(open_one(args, context), CONNECTION_TIMEOUT)

    protocols: list[Echo] = []
    try:
        results = await asyncio.gather(
            *(opened() for _ in range(args.connections)), return_exceptions=True
        )
        protocols = [p for p in results if isinstance(p, Echo)]
        failures = [r for r in results if not isinstance(r, Echo)]
        if failures:
            raise RuntimeError(
                f"{len(failures)} of {args.connections} TLS connections failed: {failures[0]!r}"
            )
        await asyncio.sleep(args.settle)
        row["rss_connected_kib"] = await settled_rss(pid, deadline)
        payload = frame(128)
        for protocol in protocols:
            protocol.send(payload)
        await asyncio.wait_for(
            asyncio.gather(*(p.echoed for p in protocols)), max(1.0, deadline - time.monotonic())
        )
        await asyncio.sleep(args.settle)
        row["rss_after_echo_kib"] = await settled_rss(pid, deadline)
        closed = sum(1 for p in protocols if p.lost.done())
        if closed:
            raise RuntimeError(f"the server closed {closed} idle connections")
    finally:
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.abort()
        await asyncio.sleep(0)
    n = args.connections
    row["per_connection_kib"] = round((row["rss_connected_kib"] - row["rss_before_kib"]) / n, 2)
    row["per_connection_after_echo_kib"] = round(
        (row["rss_after_echo_kib"] - row["rss_before_kib"]) / n, 2
    )
    return row


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("rate", "idle"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--server-name", default=None, help="SNI name (default: --host)")
    parser.add_argument("--ca", default=None, help="verify the server against this CA file")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32, help="rate: workers (32)")
    parser.add_argument(
        "--warmup-connections", type=int, default=200, help="rate: unmeasured first (200)"
    )
    parser.add_argument("--size", type=int, default=64, help="rate: payload bytes (64)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle: seconds (1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds in all (120)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.concurrency < 1 or args.warmup_connections < 0:
        parser.error("--connections and --concurrency must be positive")
    raise_fd_limit(args.connections + FD_MARGIN)
    job = rate(args) if args.mode == "rate" else idle(args)
    try:
        if args.loop == "uvloop":
            import uvloop

            result = uvloop.run(job)
        else:
            result = asyncio.run(job)
    except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
        print(f"tls_load {args.mode}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key, value in result.items():
            print(f"{key:>30}  {value}")
    return 0 if not result.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
