"""Server memory with many idle connections: fastnet against the streams baseline.

Usage::

    python benchmarks/memory.py                       # 10,000 connections, text report
    python benchmarks/memory.py --json --connections 2000 --loops asyncio,uvloop

For each server it starts the server, makes one warm-up connection (so that
first-use allocations are not charged to the idle connections), reads the
server's RSS, opens ``--connections`` connections that send nothing, reads the
RSS again, then sends one 128-byte frame on every connection, reads every
echo back, and reads the RSS a third time (the state of a connection that has
been used once and is idle again). The server's issue sets the target: at
most 16 KiB per idle connection for fastnet.

RSS is ``VmRSS`` from ``/proc/PID/status`` (Linux only). Kernel socket
buffers are not part of it. Both this process and the server need one file
descriptor per connection, so the script raises its own ``RLIMIT_NOFILE``
soft limit to what it needs (at most the hard limit), and the server inherits
it; when the hard limit is too low it says so and measures fewer connections.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import sys
import time
from typing import Any

from compare import SERVERS, ServerKind, ServerProcess

# Connections opened before waiting for the server to accept them: below
# asyncio's default listen backlog (100), so no SYN is dropped and retried.
BATCH = 100

# File descriptors needed beyond the connections: the interpreter, pipes,
# the listening socket, the event loop's own descriptors. A generous guess.
FD_MARGIN = 200

# Seconds to let the server settle (handle connection_made, run handler
# tasks up to their first await) before reading its RSS.
SETTLE = 1.0

FRAME = len(b"x" * 128).to_bytes(4, "big") + b"x" * 128


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted``; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect_all(host: str, port: int, count: int, server_pid: int) -> list[socket.socket]:
    """Open ``count`` connections, in batches the server's backlog can hold."""
    base = open_fds(server_pid)
    sockets: list[socket.socket] = []
    while len(sockets) < count:
        for _ in range(min(BATCH, count - len(sockets))):
            sockets.append(socket.create_connection((host, port), timeout=10.0))
        # Wait until the server has accepted this batch (one fd per connection).
        deadline = time.monotonic() + 10.0
        while open_fds(server_pid) < base + len(sockets):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server accepted only {open_fds(server_pid) - base} of "
                    f"{len(sockets)} connections within 10 s"
                )
            time.sleep(0.005)
    return sockets


def echo_once(sockets: list[socket.socket]) -> None:
    """Send one frame on every connection, then read every echo back."""
    for sock in sockets:
        sock.sendall(FRAME)
    for sock in sockets:
        received = b""
        while len(received) < len(FRAME):
            chunk = sock.recv(len(FRAME) - len(received))
            if not chunk:
                raise RuntimeError("the server closed a connection instead of echoing")
            received += chunk
        if received != FRAME:
            raise RuntimeError("the server echoed different bytes")


def measure(kind: ServerKind, loop: str, connections: int) -> dict[str, Any]:
    row: dict[str, Any] = {"server": kind.name, "title": kind.title, "loop": loop}
    # fastnet's default limit of 1000 connections would make the rest wait in
    # the backlog; raise it past the number measured.
    server = ServerProcess(kind, loop, pin=False, max_connections=connections + 10)
    sockets: list[socket.socket] = []
    try:
        warm = connect_all(server.host, server.port, 1, server.proc.pid)
        echo_once(warm)
        warm[0].close()
        time.sleep(SETTLE)
        row["rss_before_kib"] = rss_kib(server.proc.pid)
        sockets = connect_all(server.host, server.port, connections, server.proc.pid)
        time.sleep(SETTLE)
        row["rss_connected_kib"] = rss_kib(server.proc.pid)
        echo_once(sockets)
        time.sleep(SETTLE)
        row["rss_after_echo_kib"] = rss_kib(server.proc.pid)
        # Still connected? A server that dropped idle connections would look lean.
        poller = select.poll()
        for sock in sockets:
            poller.register(sock, select.POLLIN)
        closed = poller.poll(0)
        if closed:
            raise RuntimeError(f"{len(closed)} idle connections were closed by the server")
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
    row["connections"] = connections
    row["per_connection_kib"] = (row["rss_connected_kib"] - row["rss_before_kib"]) / connections
    row["per_connection_after_echo_kib"] = (
        row["rss_after_echo_kib"] - row["rss_before_kib"]
    ) / connections
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000, help="idle connections")
    parser.add_argument(
        "--servers",
        default="fastnet,streams",
        help="comma-separated: " + ", ".join(s.name for s in SERVERS),
    )
    parser.add_argument("--loops", default="uvloop", help="comma-separated: asyncio, uvloop")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    kinds = {s.name: s for s in SERVERS}
    chosen = [name.strip() for name in args.servers.split(",") if name.strip()]
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    for name in chosen:
        if name not in kinds:
            parser.error(f"unknown server {name!r}")
    for loop in loops:
        if loop not in ("asyncio", "uvloop"):
            parser.error(f"unknown loop {loop!r}")

    limit = raise_fd_limit(args.connections + FD_MARGIN)
    connections = min(args.connections, limit - FD_MARGIN)
    if connections < args.connections:
        print(
            f"warning: RLIMIT_NOFILE's hard limit allows {limit} descriptors; "
            f"measuring {connections} connections instead of {args.connections}",
            file=sys.stderr,
        )
    result: dict[str, Any] = {"connections": connections, "servers": []}
    status = 0
    for name in chosen:
        for loop in loops:
            try:
                row = measure(kinds[name], loop, connections)
            except (RuntimeError, OSError) as exc:
                row = {"server": name, "title": kinds[name].title, "loop": loop}
                row["failure"] = str(exc)
                status = 1
            result["servers"].append(row)
            if not args.json:
                if "failure" in row:
                    print(f"{row['title']:<28} {loop:<8} failed: {row['failure']}")
                else:
                    print(
                        f"{row['title']:<28} {loop:<8} {connections} idle: "
                        f"{row['per_connection_kib']:6.1f} KiB/connection, "
                        f"after one echo each: {row['per_connection_after_echo_kib']:6.1f} "
                        f"KiB/connection (RSS {row['rss_before_kib'] / 1024:.1f} -> "
                        f"{row['rss_after_echo_kib'] / 1024:.1f} MiB)",
                        flush=True,
                    )
    if args.json:
        print(json.dumps(result, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
