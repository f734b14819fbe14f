"""Helpers of the abuse tests (test_abuse.py); it holds no tests itself.

- ``AbuseServer``: ``python -m fastnet serve ...`` in a subprocess, with its
  RSS, open descriptors and CPU time read from ``/proc`` (Linux), and its
  stderr kept in a file (a pipe nobody reads would fill up and stall the
  server's logging).
- ``Pinger``: the healthy client. It runs in a subprocess of its own (this
  file run as a script), so its latencies measure the server and not this
  process's Python work on the abusive sockets: it sends one frame every
  ``PING_INTERVAL`` seconds, waits for the echo, checks it byte for byte and
  records the round trip, until told to stop (and at least ``MIN_PINGS``
  round trips have run); then it reports every ping,
  failure and latency as one JSON line.
- ``PeakRSS``: a thread that samples the server's RSS every few milliseconds
  and keeps the highest value, so a transient peak is seen.
- Small socket helpers: frames built by hand, waiting for the server to
  close a socket, waiting for the server's descriptors to come back.

Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# Bound on a subprocess reaching "listening on" (or the pinger its first
# echo): start-up takes well under a second; a loaded CI machine gets more.
START_TIMEOUT = 15.0
# Seconds between pings: 100 a second, enough for a p99 over a few seconds.
PING_INTERVAL = 0.01
# The pinger keeps going after "stop" until it has this many round trips, so
# an abuse that ends quickly still leaves a sample worth a p99.
MIN_PINGS = 20
# A ping not answered within this is lost (and the pinger stops).
PING_TIMEOUT = 10.0
# The pinger's payloads: 16 to 512 bytes, printable (so a line never holds
# the delimiter).
PING_SIZES = (16, 512)


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (subprocesses inherit it).

    Returns:
        The soft limit now in force (lower than ``wanted`` if the hard limit is).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def process_env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTNET_NO_EXTENSIONS", None)
    if backend == "py":
        env["FASTNET_NO_EXTENSIONS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rss_kib(pid: int) -> int:
    """``VmRSS`` of a process, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmRSS")


class AbuseServer:
    """``python -m fastnet serve APP ...`` on 127.0.0.1, port 0, in a subprocess.

    Args:
        args: the arguments after ``serve`` (the app first).
        loop: ``asyncio`` or ``uvloop``.
        backend: ``c`` or ``py`` (``FASTNET_NO_EXTENSIONS=1``).
        fd_limit: an RLIMIT_NOFILE soft limit for the server alone.
        cwd: the server's working directory (importable: ``module:function`` apps).
    """

    def __init__(
        self,
        args: list[str],
        *,
        loop: str,
        backend: str,
        fd_limit: int | None = None,
        cwd: str | None = None,
    ) -> None:
        command = [sys.executable, "-m", "fastnet", "serve", *args, "--port", "0"]
        command += ["--loop", loop, "--log-level", "warning"]
        self.command = command
        preexec: Callable[[], None] | None = None
        if fd_limit is not None:
            limit = fd_limit

            def preexec() -> None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        # Closed in close(); it outlives this method, so no `with` block.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=process_env(backend),
            preexec_fn=preexec,
            cwd=cwd,
        )
        self.pid = self.proc.pid
        line = _readline(self.proc.stdout, START_TIMEOUT)
        if not line.startswith("listening on "):
            self.proc.kill()
            self.proc.wait()
            error = self.error_text().strip()
            self.close()
            raise AssertionError(f"the server did not start ({' '.join(args)}): {line!r} {error}")
        self.port = int(line.rpartition(":")[2])
        self.ticks = os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def describe_fds(self) -> list[str]:
        """Each open descriptor: its target, and for a TCP socket its state and addresses."""
        tcp = _tcp_sockets(self.pid)
        lines = []
        for name in sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:
                continue
            inode = target[len("socket:[") : -1] if target.startswith("socket:[") else ""
            lines.append(f"{name} -> {target} {tcp.get(inode, '')}".rstrip())
        return lines

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime

    def alive(self) -> bool:
        return self.proc.poll() is None

    def error_text(self) -> str:
        if self.stderr.closed:
            return ""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def wait_fds(self, at_most: int, timeout: float) -> int:
        """Wait until the server holds at most ``at_most`` descriptors; return its count."""
        deadline = time.monotonic() + timeout
        count = self.fds()
        while count > at_most and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.fds()
        return count

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; return the exit status (the server is killed if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


# /proc/net/tcp's state codes (include/net/tcp_states.h).
_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


def _tcp_sockets(pid: int) -> dict[str, str]:
    # inode -> "STATE local remote tx_queue:rx_queue", from the process's view of /proc/net.
    found: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9:
                state = _TCP_STATES.get(fields[3], fields[3])
                found[fields[9]] = f"{state} {fields[1]} {fields[2]} queues {fields[4]}"
    return found


@contextlib.contextmanager
def abuse_server(args: list[str], **kwargs: Any) -> Iterator[AbuseServer]:
    """An ``AbuseServer`` that is killed on exit."""
    server = AbuseServer(args, **kwargs)
    try:
        yield server
    finally:
        server.close()


def _readline(stream: Any, timeout: float) -> str:
    # One byte at a time from the descriptor: a buffered readline could
    # swallow what follows the line (the pinger's report), which
    # communicate() would then never see.
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode(errors="replace")


# --------------------------------------------------------------------- apps

HERE = os.path.dirname(os.path.abspath(__file__))

# What answer_once replies: larger than a small receive buffer, so a client
# that does not read leaves it unacknowledged in the server's send queue.
ANSWER_SIZE = 64 * 1024


ANSWER_REQUEST = b"answer me"


async def answer_once(conn: Any) -> None:
    """An app (``abuse_support:answer_once``, run from this directory).

    A connection whose first frame is ``ANSWER_REQUEST`` gets one answer of
    ``ANSWER_SIZE`` bytes, and the handler returns while the client may
    still be connected, so the server closes it with a lingering close.
    Any other connection (the pinger's) is echoed.
    """
    request = await conn.recv()
    if request == ANSWER_REQUEST:
        conn.send((request * (ANSWER_SIZE // len(request) + 1))[:ANSWER_SIZE])
        return
    conn.send(request)
    async for frame in conn:
        conn.send(frame)


# ----------------------------------------------------------------- framing


def encode(payload: bytes, framing: str) -> bytes:
    """One frame in ``framing``: ``length`` (4-byte big-endian), ``length:8``, or ``lines``."""
    if framing == "lines":
        return payload + b"\n"
    size = 8 if framing == "length:8" else 4
    return len(payload).to_bytes(size, "big") + payload


def frame(payload: bytes) -> bytes:
    """One frame with a 4-byte big-endian length field."""
    return len(payload).to_bytes(4, "big") + payload


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """True if the peer has closed or reset ``sock`` (a non-blocking read says so)."""
    # select() first: recv on a socket with a timeout would wait for it.
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        data = sock.recv(65536, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset
    return not data  # data first: not closed yet (the test decides what it means)


def wait_all_closed_by_peer(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Wait until the server has closed every socket; return those still open at the deadline."""
    remaining = list(socks)
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        ready, _, _ = select.select(remaining[:1000], [], [], 0.05)
        gone = {s for s in ready if closed_by_peer(s)}
        remaining = [s for s in remaining if s not in gone]
    return remaining


# ------------------------------------------------------------------- memory


class PeakRSS:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` is the highest."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="PeakRSS", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, AssertionError):
                return  # the process is gone; the test reports that

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        with contextlib.suppress(OSError, AssertionError):
            self.peak = max(self.peak, rss_kib(self.pid))


# ------------------------------------------------------------------- pinger


class Pinger:
    """The healthy client: a subprocess that pings ``port`` until ``finish()``.

    The constructor returns once the first ping has come back (so the
    connection holds a server slot before any abuse starts).
    """

    def __init__(self, port: int, framing: str = "length") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "ping", str(port), framing],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=process_env("c"),
        )
        line = _readline(self.proc.stdout, START_TIMEOUT)
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=START_TIMEOUT)
            raise AssertionError(f"the pinger did not start: {line!r} {err.decode()!r}")

    def finish(self) -> dict[str, Any]:
        """Stop pinging; return ``pings``, ``failures``, ``p50_ms``, ``p99_ms``, ``max_ms``."""
        out, err = self.proc.communicate(b"stop\n", timeout=PING_TIMEOUT + START_TIMEOUT)
        lines = out.decode().strip().splitlines()
        if not lines:
            raise AssertionError(f"the pinger reported nothing: {err.decode()!r}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=START_TIMEOUT)


@contextlib.contextmanager
def pinging(port: int, framing: str = "length") -> Iterator[Pinger]:
    """A ``Pinger``, killed on exit if the test did not finish it."""
    pinger = Pinger(port, framing)
    try:
        yield pinger
    finally:
        pinger.kill()


def _read_reply(sock: socket.socket, framing: str, buf: bytearray) -> bytes:
    # Read one frame of `framing` from a blocking socket; `buf` keeps what
    # was read past it.
    while True:
        if framing == "lines":
            end = buf.find(b"\n")
            if end >= 0:
                reply = bytes(buf[:end])
                del buf[: end + 1]
                return reply
        else:
            size = 8 if framing == "length:8" else 4
            if len(buf) >= size:
                total = size + int.from_bytes(buf[:size], "big")
                if len(buf) >= total:
                    reply = bytes(buf[size:total])
                    del buf[:total]
                    return reply
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        buf += data


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ping_main(port: int, framing: str) -> int:
    """The pinger's process: ping until a line arrives on stdin, then print a JSON report."""
    rng = random.Random(port)
    latencies: list[float] = []
    failures: list[str] = []
    sock = socket.create_connection(("127.0.0.1", port), timeout=PING_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    seq = 0
    ready = False
    stopping = False
    while True:
        seq += 1
        size = rng.randint(*PING_SIZES)
        payload = (b"%08d" % seq + rng.randbytes(size).hex().encode())[:size]
        start = time.perf_counter()
        try:
            sock.sendall(encode(payload, framing))
            reply = _read_reply(sock, framing, buf)
        except OSError as exc:  # a timeout included
            failures.append(f"ping {seq}: {type(exc).__name__}: {exc}")
            break
        latencies.append(time.perf_counter() - start)
        if reply != payload:
            failures.append(f"ping {seq}: the echo differs from what was sent")
            break
        if not ready:
            print("ready", flush=True)
            ready = True
        if not stopping:
            stopping = bool(select.select([sys.stdin], [], [], PING_INTERVAL)[0])
        else:
            time.sleep(PING_INTERVAL)
        if stopping and len(latencies) >= MIN_PINGS:
            break
    if not ready:
        print("ready", flush=True)  # let the test read the report
    sock.close()
    ms = [x * 1000 for x in latencies]
    report = {
        "pings": len(latencies),
        "failures": failures,
        "p50_ms": round(_percentile(ms, 0.50), 3) if ms else None,
        "p99_ms": round(_percentile(ms, 0.99), 3) if ms else None,
        "max_ms": round(max(ms), 3) if ms else None,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "ping":
        sys.exit(ping_main(int(sys.argv[2]), sys.argv[3]))
    print("usage: abuse_support.py ping PORT FRAMING", file=sys.stderr)
    sys.exit(2)
