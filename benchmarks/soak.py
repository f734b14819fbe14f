"""Soak: thousands of connections against ``fastnet serve echo``, with nothing lost.

Usage::

    python benchmarks/soak.py                          # 10,000 connections for 30 minutes
    python benchmarks/soak.py --duration 300           # 5 minutes
    python benchmarks/soak.py --duration 60 --no-plot --out build/soak   # the CI run (make soak-ci)
    python benchmarks/soak.py --render benchmarks/results/soak.json      # redraw the PNG only
    python benchmarks/soak.py --help

What it does. It starts ``python -m fastnet serve echo`` (``--loop``,
``--backend``) pinned to CPU 0 with ``taskset`` and pins itself to CPU 1
(unpinned, with a warning, where that is not possible). It opens
``--connections`` connections and checks that each one is served (one echoed
frame each). Then, for ``--duration`` seconds:

- ``--active`` of the connections (2 %) exchange frames continuously: each
  sends a burst of ``--burst`` frames of random sizes (log-uniform from 0 to
  ``--max-size`` bytes, so small frames and the extension's direct-receive
  path for large ones both occur), waits for every echo, and sends the next
  burst on a schedule that makes ``--rate`` frames/s over the active set;
- the others are idle but open; an idle connection that receives a byte it
  did not ask for, or that the server closes, is a failure;
- a churn of ``--churn`` connections a second closes a random idle
  connection (every tenth one with a reset instead of a FIN) and opens a new
  one in its place, which must echo one frame before it joins the idle set.

Verification is byte for byte: a connection keeps the bytes it sent and not
yet seen echoed, and every read must be a prefix of them (one
``bytearray.startswith``, a memcmp), so a corrupted, lost, duplicated or
reordered byte is caught at the read that carries it; frames are counted
as their last byte is verified. An echo that does not come back within
``ECHO_TIMEOUT`` is a failure.

Every ``--interval`` seconds the server's RSS (``VmRSS`` of
``/proc/PID/status``), its open descriptors (``/proc/PID/fd``) and CPU time
are recorded, with the client's view (connections open, frames verified,
connections churned). After the run every connection is closed, and the
server must get back to the descriptors it held before the first connection
(a leaked connection keeps its socket), then exit 0 on SIGTERM.

Pass criteria (exit 0; otherwise exit 1 and one line ``soak: FAIL: reason``):
every echoed frame verified, no connection ended that the script did not end
itself, the server alive throughout, and after the warm-up (``--warmup``,
default a tenth of the run, 10 to 60 s) every sample within the bounds:

- RSS at most ``RSS_GROWTH`` (5 %) above the median of the first samples
  after the warm-up, plus ``RSS_SLACK`` (8 MiB);
- descriptors at most ``FD_SLACK`` (16) above the same baseline.

Why these bounds: with the connection count held constant, the server's
steady state does not grow: a leak of a few hundred bytes per churned
connection or per frame crosses 5 % in a 30-minute run (at the default
rates, 100 bytes per frame is +690 MiB). The absolute RSS slack covers what
is legitimately in flight when a sample is taken: the active connections'
frames being received and echoed (up to ``--active`` x ``--max-size``, about
13 MiB in the very worst case, about 1 MiB on average) and the allocator
keeping freed arenas. Descriptors move only by the connections in the middle
of a churn (churn is sequential: one or two at a time), so 16 allows for
noise and a leak of one descriptor per churned connection fails within
seconds. A short run (the CI's 60 s) cannot see a slow leak; it checks that
nothing is lost and catches fast leaks; the 30-minute run is the one that
shows flatness.

Outputs: ``OUT/soak.json`` (configuration, machine, every sample, the
verdict) and ``OUT/soak.png`` (RSS, descriptors and frames/s over time,
matplotlib; ``--no-plot`` skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import itertools
import json
import math
import os
import platform
import random
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

SERVER_CPU = 0
CLIENT_CPU = 1

# Seconds to wait for the server's "listening on" line: interpreter start and
# imports take well under a second; a busy CI machine gets far more.
START_TIMEOUT = 20.0
# Seconds an echo may take before it counts as lost. Far above any latency
# on a loaded 2-core machine (milliseconds), far below the run's length.
ECHO_TIMEOUT = 30.0
# Seconds to open all the connections: 10,000 take a few seconds here.
CONNECT_TIMEOUT = 300.0
# Connections being opened at once: below the server's listen backlog
# (1024 by default), so no SYN is dropped and retried a second later.
CONNECT_BATCH = 500
# Seconds the server gets, after the last connection is closed, to close
# its side of all of them and return to its descriptor count before them.
RELEASE_TIMEOUT = 30.0
# Seconds the server gets to exit after SIGTERM (it has no connections then).
STOP_TIMEOUT = 30.0

# Seconds for the server to close its side of the warm-up connection.
SETTLE = 1.0

# Connections the server is allowed beyond --connections: the ones in the
# middle of a churn, so a churned connection never waits in the backlog.
CHURN_MARGIN = 100
# Descriptors each process needs beyond its connections: the interpreter,
# pipes, the listening socket, the event loop's own. A generous guess.
FD_MARGIN = 200

# The pass bounds, justified in the module docstring.
RSS_GROWTH = 0.05
RSS_SLACK_KIB = 8 * 1024
FD_SLACK = 16

# Every tenth churned connection is reset (SO_LINGER 0 / abort) instead of
# closed with a FIN: abrupt disconnects are part of a server's normal life.
CHURN_ABORT_EVERY = 10

# Random payloads are slices of one pool, prefixed by (connection, sequence),
# so every frame is distinct and cheap to make.
POOL_SIZE = 1 << 20

HEADER = 4  # fastnet serve's default framing: a 4-byte big-endian length


class Failure(Exception):
    """The soak failed; the message is the one-line reason."""


# --------------------------------------------------------------------------- server


def pinning_available() -> bool:
    """True when ``taskset`` exists and CPUs 0 and 1 can both be used."""
    if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        return False
    return {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``needed`` (the server inherits it).

    Raises:
        Failure: the hard limit is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise Failure(
            f"RLIMIT_NOFILE hard limit is {hard}, {needed} descriptors are needed "
            "(raise it, e.g. ulimit -Hn, or use fewer --connections)"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    return int(soft)


def rss_kib(pid: int) -> int:
    """A process's resident set size (``VmRSS``), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise Failure(f"/proc/{pid}/status has no VmRSS")


class Server:
    """``python -m fastnet serve echo`` in a subprocess, with its /proc readings."""

    def __init__(self, args: argparse.Namespace, pin: bool) -> None:
        command = [sys.executable, "-m", "fastnet", "serve", args.app, "--port", "0"]
        command += ["--loop", args.loop, "--log-level", "warning"]
        command += ["--max-connections", str(args.connections + CHURN_MARGIN)]
        if pin:
            command = ["taskset", "-c", str(SERVER_CPU), *command]
        env = dict(os.environ)
        env.pop("FASTNET_NO_EXTENSIONS", None)
        if args.backend == "py":
            env["FASTNET_NO_EXTENSIONS"] = "1"
        # Closed in stop(); it outlives this method, so no `with` block.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.pid = self.proc.pid
        self.port = self._wait_listening()
        self.ticks = os.sysconf("SC_CLK_TCK")

    def _wait_listening(self) -> int:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        while b"\n" not in data and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break  # the server exited
                data += chunk
        line = data.decode(errors="replace").split("\n", 1)[0].strip()
        if not line.startswith("listening on "):
            reason = self.error_output() or line or "no output"
            self.kill()
            raise Failure(f"the server did not start: {reason}")
        return int(line.rpartition(":")[2])

    def error_output(self) -> str:
        """The last line the server wrote to stderr."""
        if self.stderr.closed:
            return ""
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime

    def check_alive(self) -> None:
        status = self.proc.poll()
        if status is not None:
            raise Failure(f"the server exited with status {status}: {self.error_output()}")

    def stop(self) -> None:
        """SIGTERM, and require a graceful exit with status 0.

        Raises:
            Failure: it did not exit in time, or exited with another status.
        """
        self.check_alive()
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Failure(f"the server did not exit within {STOP_TIMEOUT:g} s of SIGTERM") from None
        if status != 0:
            raise Failure(f"the server exited with status {status}: {self.error_output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


# --------------------------------------------------------------------------- client


class Tally:
    """What the client saw, for the whole run."""

    def __init__(self) -> None:
        self.frames_verified = 0
        self.bytes_verified = 0
        self.frames_sent = 0
        self.churned = 0
        self.opened = 0
        self.failures: list[str] = []

    def fail(self, reason: str) -> None:
        self.failures.append(reason)


class SoakConnection(asyncio.Protocol):
    """One client connection: sends frames, verifies the echo byte for byte.

    ``expect`` holds the bytes sent and not yet echoed; ``ends`` the offset
    (in bytes received since the start) at which each sent frame ends.
    """

    def __init__(self, tally: Tally, ident: int) -> None:
        self.tally = tally
        self.ident = ident
        self.transport: asyncio.Transport | None = None
        self.expect = bytearray()
        self.ends: collections.deque[int] = collections.deque()
        self.sent = 0
        self.received = 0
        self.closing = False  # set before we close it ourselves
        self.lost = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, frames: list[bytes]) -> None:
        assert self.transport is not None
        for frame in frames:
            self.sent += len(frame)
            self.ends.append(self.sent)
        data = b"".join(frames)
        self.expect += data
        self.tally.frames_sent += len(frames)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if not self.expect.startswith(data):
            self._mismatch(data)
            return
        n = len(data)
        del self.expect[:n]
        self.received += n
        self.tally.bytes_verified += n
        ends = self.ends
        while ends and ends[0] <= self.received:
            ends.popleft()
            self.tally.frames_verified += 1
        if not self.expect and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _mismatch(self, data: bytes) -> None:
        if len(data) > len(self.expect):
            reason = f"{len(data) - len(self.expect)} bytes more than were sent"
        else:
            at = next(i for i, (a, b) in enumerate(zip(data, self.expect, strict=False)) if a != b)
            reason = f"a wrong byte at offset {self.received + at}"
        self.tally.fail(f"connection {self.ident}: the echo has {reason}")
        self._end()

    def eof_received(self) -> bool:
        if not self.closing:
            self.tally.fail(f"connection {self.ident}: the server closed it")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closing:
            why = f": {exc}" if exc else ""
            self.tally.fail(f"connection {self.ident}: lost{why}")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection {self.ident} lost"))

    async def echoed(self) -> None:
        """Wait until everything sent has been echoed and verified.

        Raises:
            Failure: the echo did not complete within ECHO_TIMEOUT.
        """
        if not self.expect:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, ECHO_TIMEOUT)
        except asyncio.TimeoutError:
            raise Failure(
                f"connection {self.ident}: {len(self.expect)} bytes not echoed "
                f"within {ECHO_TIMEOUT:g} s"
            ) from None
        finally:
            self.waiter = None

    def close(self, abort: bool = False) -> None:
        self.closing = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _end(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


class FrameMaker:
    """Distinct frames of random sizes: a (connection, sequence) prefix, then random bytes."""

    def __init__(self, seed: int, max_size: int) -> None:
        self.rng = random.Random(seed)
        self.pool = self.rng.randbytes(POOL_SIZE + max_size)
        self.max_exp = math.log2(max_size + 1)

    def size(self) -> int:
        # Log-uniform over 0 .. max_size: as many 10-100 B frames as 10-100 KiB ones.
        return int(2 ** self.rng.uniform(0, self.max_exp)) - 1

    def frame(self, ident: int, seq: int) -> bytes:
        size = self.size()
        tag = ident.to_bytes(4, "big") + seq.to_bytes(4, "big")
        start = self.rng.randrange(POOL_SIZE)
        body = (tag + self.pool[start : start + max(size - 8, 0)])[:size]
        return size.to_bytes(HEADER, "big") + body


class Soak:
    """The client side of the run: connections, active senders, churn, sampling."""

    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.tally = Tally()
        self.frames = FrameMaker(args.seed, args.max_size)
        self.conns: list[SoakConnection] = []
        self.next_ident = 0
        self.samples: list[dict[str, Any]] = []
        self.stopping = False
        self.t0 = 0.0
        self.load_start = 0.0

    async def open(self) -> SoakConnection:
        """Open one connection and check it is served: one frame echoed."""
        loop = asyncio.get_running_loop()
        ident = self.next_ident
        self.next_ident += 1
        try:
            _, conn = await loop.create_connection(
                lambda: SoakConnection(self.tally, ident), "127.0.0.1", self.server.port
            )
        except OSError as exc:
            raise Failure(f"connection {ident}: connect failed: {exc}") from None
        self.tally.opened += 1
        conn.send([self.frames.frame(ident, 0)])
        await conn.echoed()
        return conn

    async def open_all(self) -> None:
        total = self.args.connections
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while len(self.conns) < total:
            if time.monotonic() > deadline:
                raise Failure(f"only {len(self.conns)} of {total} connections opened in time")
            batch = min(CONNECT_BATCH, total - len(self.conns))
            self.conns += await asyncio.gather(*(self.open() for _ in range(batch)))
            self.check()

    def check(self) -> None:
        if self.tally.failures:
            raise Failure(self.tally.failures[0])
        self.server.check_alive()

    async def active(self, index: int) -> None:
        # One active connection: a burst of frames, wait for every echo,
        # then the next burst at its slot in the schedule.
        loop = asyncio.get_running_loop()
        args = self.args
        conn = self.conns[index]
        interval = args.burst * args.active / args.rate if args.rate else 0.0
        next_at = loop.time() + random.uniform(0, interval)
        seq = 1
        while not self.stopping:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if self.stopping:
                    break
            conn.send([self.frames.frame(conn.ident, seq + i) for i in range(args.burst)])
            seq += args.burst
            await conn.echoed()
            next_at = max(next_at + interval, loop.time() - interval)
            if not interval:
                await asyncio.sleep(0)  # unthrottled: still let the loop breathe

    async def churn(self) -> None:
        # Close a random idle connection and open a new one in its place, at
        # a steady rate; churn is sequential, so few connections are ever
        # in the middle of it.
        loop = asyncio.get_running_loop()
        args = self.args
        rng = random.Random(args.seed + 1)
        interval = 1.0 / args.churn
        next_at = loop.time() + interval
        while not self.stopping:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stopping:
                break
            index = rng.randrange(args.active, len(self.conns))
            old = self.conns[index]
            self.tally.churned += 1
            old.close(abort=self.tally.churned % CHURN_ABORT_EVERY == 0)
            self.conns[index] = await self.open()
            next_at = max(next_at + interval, loop.time() - interval)

    def sample(self) -> dict[str, Any]:
        server = self.server
        row = {
            "t": round(time.monotonic() - self.t0, 3),
            "rss_kib": server.rss_kib(),
            "fds": server.fds(),
            "cpu_s": round(server.cpu_seconds(), 3),
            "client_rss_kib": rss_kib(os.getpid()),
            "open": sum(1 for c in self.conns if not c.lost),
            "frames_verified": self.tally.frames_verified,
            "bytes_verified": self.tally.bytes_verified,
            "churned": self.tally.churned,
        }
        self.samples.append(row)
        return row

    async def sampler(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        last_print = 0.0
        while loop.time() < until:
            next_at += self.args.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self.check()
            row = self.sample()
            if row["t"] - last_print >= self.args.progress:
                last_print = row["t"]
                print(
                    f"  t={row['t']:7.1f}s  server rss {row['rss_kib'] / 1024:7.1f} MiB"
                    f"  fds {row['fds']:6d}  open {row['open']:6d}"
                    f"  frames verified {row['frames_verified']:10,d}"
                    f"  churned {row['churned']:7,d}",
                    flush=True,
                )

    async def run(self) -> dict[str, Any]:
        args = self.args
        server = self.server
        loop = asyncio.get_running_loop()
        self.t0 = time.monotonic()
        # One connection first, served and closed, so that what the server
        # sets up once on first use (uvloop keeps a reserve descriptor open
        # from the first connection on) is not taken for a leaked connection.
        warm = await self.open()
        warm.close()
        await asyncio.sleep(SETTLE)
        empty_fds = server.fds()
        empty_rss = server.rss_kib()
        print(f"opening {args.connections:,} connections ...", flush=True)
        await self.open_all()
        setup_s = time.monotonic() - self.t0
        print(f"  {args.connections:,} connections open and served in {setup_s:.1f} s", flush=True)
        self.sample()
        self.load_start = time.monotonic() - self.t0
        until = loop.time() + args.duration
        workers = [loop.create_task(self.active(i)) for i in range(args.active)]
        if args.churn:
            workers.append(loop.create_task(self.churn()))
        sampler = loop.create_task(self.sampler(until))
        try:
            # Ends at the end of the run (the sampler returns), or at the
            # first failure of any task (the others run until told to stop).
            done, _ = await asyncio.wait([sampler, *workers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            self.stopping = True
            await asyncio.wait_for(asyncio.gather(*workers), ECHO_TIMEOUT * 2)
            self.check()
        finally:
            self.stopping = True
            for task in [sampler, *workers]:
                task.cancel()
            await asyncio.gather(sampler, *workers, return_exceptions=True)
        final = self.sample()
        # Close everything; the server must release every connection.
        for conn in self.conns:
            conn.close()
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while server.fds() > empty_fds:
            if time.monotonic() > deadline:
                raise Failure(
                    f"{server.fds() - empty_fds} server descriptors still open "
                    f"{RELEASE_TIMEOUT:g} s after every connection was closed"
                )
            await asyncio.sleep(0.1)
        released_s = time.monotonic() - self.t0 - final["t"]
        return {
            "empty_fds": empty_fds,
            "empty_rss_kib": empty_rss,
            "setup_s": round(setup_s, 2),
            "load_start_s": round(self.load_start, 2),
            "released_rss_kib": server.rss_kib(),
            "released_fds": server.fds(),
            "released_after_s": round(released_s, 2),
        }


# --------------------------------------------------------------------------- verdict


def judge(samples: list[dict[str, Any]], warm_from: float) -> dict[str, Any]:
    """Compare the samples after the warm-up with the bounds.

    Returns a dict with the baseline, the end values, the peaks, the bounds
    and ``problems`` (one-line reasons; empty when flat).
    """
    steady = [s for s in samples if s["t"] >= warm_from]
    if len(steady) < 2:
        return {"problems": ["too few samples after the warm-up (run longer)"]}
    window = max(3, len(steady) // 10)
    first = steady[:window]
    last = steady[-window:]
    rss_base = statistics.median(s["rss_kib"] for s in first)
    fd_base = statistics.median(s["fds"] for s in first)
    rss_bound = rss_base * (1 + RSS_GROWTH) + RSS_SLACK_KIB
    fd_bound = fd_base + FD_SLACK
    rss_peak = max(steady, key=lambda s: s["rss_kib"])
    fd_peak = max(steady, key=lambda s: s["fds"])
    problems = []
    if rss_peak["rss_kib"] > rss_bound:
        problems.append(
            f"server RSS {rss_peak['rss_kib'] / 1024:.1f} MiB at t={rss_peak['t']:.0f}s exceeds "
            f"the bound {rss_bound / 1024:.1f} MiB (baseline {rss_base / 1024:.1f} MiB "
            f"+{RSS_GROWTH:.0%} +{RSS_SLACK_KIB // 1024} MiB)"
        )
    if fd_peak["fds"] > fd_bound:
        problems.append(
            f"server descriptors {fd_peak['fds']} at t={fd_peak['t']:.0f}s exceed the bound "
            f"{fd_bound:.0f} (baseline {fd_base:.0f} + {FD_SLACK})"
        )
    return {
        "samples_judged": len(steady),
        "rss_baseline_kib": rss_base,
        "rss_end_kib": statistics.median(s["rss_kib"] for s in last),
        "rss_peak_kib": rss_peak["rss_kib"],
        "rss_bound_kib": round(rss_bound),
        "fd_baseline": fd_base,
        "fd_end": statistics.median(s["fds"] for s in last),
        "fd_peak": fd_peak["fds"],
        "fd_bound": fd_bound,
        "problems": problems,
    }


# --------------------------------------------------------------------------- plot


def chart(result: dict[str, Any], path: Path) -> None:
    """RSS, descriptors and frames/s over time, with the warm-up shaded and the bounds drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    config = result["config"]
    verdict = result["verdict"]
    minutes = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    warm = result["warm_from_s"] / 60
    start = result["run"]["load_start_s"] / 60 if "run" in result else 0
    rss = [s["rss_kib"] / 1024 for s in samples]
    fds = [s["fds"] for s in samples]
    # The last sample follows the end of the load: no rate for it.
    rates = [0.0] + [
        (b["frames_verified"] - a["frames_verified"]) / max(b["t"] - a["t"], 1e-9)
        for a, b in itertools.pairwise(samples)
    ]
    rates[-1] = rates[-2] if len(rates) > 1 else 0.0
    panels = (
        (axes[0], rss, "server RSS (MiB)", verdict.get("rss_bound_kib"), 1 / 1024),
        (axes[1], fds, "server open descriptors", verdict.get("fd_bound"), 1),
        (axes[2], [r / 1000 for r in rates], "frames verified (thousand/s)", None, 1),
    )
    for ax, values, label, bound, scale in panels:
        ax.plot(minutes, values, color="#2f5f8f", linewidth=1.2)
        ax.axvspan(min(minutes[0], start), warm, color="#cccccc", alpha=0.4, lw=0)
        if bound is not None:
            ax.axhline(bound * scale, color="#b03030", linestyle="--", linewidth=1, label="bound")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    lo = min(rss)
    axes[0].set_ylim(bottom=max(0.0, lo * 0.8))
    axes[1].set_ylim(bottom=min(fds) - 50, top=max([*fds, verdict.get("fd_bound") or 0]) + 50)
    axes[2].set_xlabel("minutes (shaded: connecting and warm-up)", fontsize=9)
    summary = result["summary"]
    fig.suptitle(
        f"fastnet serve echo ({config['loop']}, {config['backend']} backend): "
        f"{config['connections']:,} connections, {config['active']} active, "
        f"churn {config['churn']:g}/s, {config['duration'] / 60:.3g} min\n"
        f"{summary['frames_verified']:,} frames verified, {summary['churned']:,} connections "
        f"churned, {'PASS' if result['passed'] else 'FAIL'} ({result['date']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=10_000, help="(10000)")
    parser.add_argument(
        "--active-fraction", type=float, default=0.02, help="share exchanging frames (0.02)"
    )
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load (1800)")
    parser.add_argument(
        "--warmup", type=float, help="seconds not judged (default: a tenth, 10 to 60 s)"
    )
    parser.add_argument("--rate", type=float, default=4000.0, help="frames/s, all active (4000)")
    parser.add_argument("--burst", type=int, default=4, help="frames per burst (4)")
    parser.add_argument("--max-size", type=int, default=65536, help="largest payload (65536)")
    parser.add_argument("--churn", type=float, default=20.0, help="connections/s replaced (20)")
    parser.add_argument("--interval", type=float, help="seconds between samples (default 1-5)")
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between lines (10)")
    parser.add_argument(
        "--app", default="echo", help="the server's APP: echo, echo-task or any echo (echo)"
    )
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--client-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--backend", choices=("c", "py"), default="c", help="codec backend (c)")
    parser.add_argument("--seed", type=int, default=15, help="random seed (15)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="(benchmarks/results)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only redraw the PNG")
    args = parser.parse_args(argv)
    if args.render is None:
        if args.connections < 2 or not 0 < args.active_fraction < 1:
            parser.error("need at least 2 connections and 0 < --active-fraction < 1")
        args.active = max(1, round(args.connections * args.active_fraction))
        if args.active >= args.connections:
            parser.error("--active-fraction leaves no idle connections")
        if args.warmup is None:
            args.warmup = min(60.0, max(10.0, args.duration / 10))
        if args.interval is None:
            args.interval = 1.0 if args.duration <= 600 else 5.0
        if args.loop == "auto":  # record the loop the server will pick
            args.loop = "uvloop" if loop_available("uvloop") else "asyncio"
        if args.burst < 1 or args.max_size < 8 or args.rate < 0 or args.churn < 0:
            parser.error("--burst >= 1, --max-size >= 8, --rate and --churn >= 0")
    return args


def loop_available(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def loop_factory(name: str) -> Any:
    if name != "asyncio":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if name == "uvloop":
                raise Failure("uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak; return the result (``passed`` and ``failure`` say how it went)."""
    pin = not args.no_pin and pinning_available()
    if not pin and not args.no_pin:
        print("warning: taskset or a second CPU is missing: running unpinned", file=sys.stderr)
    needed = args.connections + CHURN_MARGIN + FD_MARGIN
    fd_limit = raise_fd_limit(needed)
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("render", "out", "no_plot")
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "pinned": pin,
            "fd_limit": fd_limit,
        },
        "bounds": {"rss_growth": RSS_GROWTH, "rss_slack_kib": RSS_SLACK_KIB, "fd_slack": FD_SLACK},
    }
    started = time.monotonic()
    server = Server(args, pin)
    client = Soak(args, server)
    failure = None
    try:
        run = asyncio_run(client.run(), args.client_loop)
        result["run"] = run
        server.stop()
    except Failure as exc:
        failure = str(exc)
    except Exception as exc:  # a bug of the harness, or of the server seen through it
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        server.kill()
    tally = client.tally
    result["samples"] = client.samples
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["warm_from_s"] = client.load_start + args.warmup
    result["summary"] = {
        "frames_sent": tally.frames_sent,
        "frames_verified": tally.frames_verified,
        "bytes_verified": tally.bytes_verified,
        "connections_opened": tally.opened,
        "churned": tally.churned,
        "failures": tally.failures[:20],
    }
    verdict = judge(client.samples, result["warm_from_s"])
    result["verdict"] = verdict
    if failure is None and verdict["problems"]:
        failure = verdict["problems"][0]
    result["passed"] = failure is None
    result["failure"] = failure
    return result


def asyncio_run(coro: Any, loop_name: str) -> Any:
    loop = loop_factory(loop_name)()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def report(result: dict[str, Any]) -> None:
    summary = result["summary"]
    verdict = result["verdict"]
    config = result["config"]
    print(
        f"{config['connections']:,} connections ({config['active']} active, churn "
        f"{config['churn']:g}/s) for {config['duration']:g} s on {config['loop']}, "
        f"{config['backend']} backend: {summary['frames_verified']:,} frames verified "
        f"({summary['bytes_verified'] / 2**20:,.1f} MiB), {summary['connections_opened']:,} "
        f"connections opened, {summary['churned']:,} churned"
    )
    if "rss_baseline_kib" in verdict:
        print(
            f"server after warm-up: RSS {verdict['rss_baseline_kib'] / 1024:.1f} -> "
            f"{verdict['rss_end_kib'] / 1024:.1f} MiB (peak {verdict['rss_peak_kib'] / 1024:.1f},"
            f" bound {verdict['rss_bound_kib'] / 1024:.1f}); descriptors "
            f"{verdict['fd_baseline']:.0f} -> {verdict['fd_end']:.0f} (peak "
            f"{verdict['fd_peak']}, bound {verdict['fd_bound']:.0f})"
        )


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.render is not None:
            result = json.loads(args.render.read_text())
            out = args.render.with_suffix(".png")
            chart(result, out)
            print(f"wrote {out}")
            return 0
        if not sys.platform.startswith("linux"):
            raise Failure("the soak reads /proc: Linux only")
        result = soak(args)
    except Failure as exc:
        print(f"soak: FAIL: {exc}", file=sys.stderr)
        return 1
    report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "soak.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = args.out / "soak.png"
        try:
            chart(result, png)
        except ImportError:
            print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        else:
            print(f"wrote {png}")
    if not result["passed"]:
        print(f"soak: FAIL: {result['failure']}", file=sys.stderr)
        return 1
    print("soak: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
