"""``fastnet bench``: a load generator that drives and verifies a framed echo server.

Usage::

    fastnet bench --port 9000 --connections 64 --depth 16 --size 64 --duration 5
    python -m fastnet.loadgen --port 9000 --framing lines --json

Each connection keeps ``--depth`` frames in flight: it sends ``depth`` frames,
and whenever ``k`` echoed frames have come back complete it sends ``k`` more.
Every echoed byte is verified, for content and for order. At the end it
reports frames/s, MiB/s, round-trip latency (p50, p99, p99.9) and errors, as a
summary or, with ``--json``, as one JSON object. On a terminal a live progress
line is drawn on stderr; when stderr is not a terminal there is none.

Strategy: the generator must drive more load than the servers it measures,
so it does no per-frame Python work.

- All frames have the same size, so the stream one connection sends is a
  fixed byte sequence: a ring of ``R`` precomputed frames, repeated. Frame
  ``i`` of the ring carries ``i`` (its hexadecimal digits, least significant
  first, repeated over the payload), so any two frames less than ``R`` apart
  differ. ``R`` is more than twice the depth: a server that drops,
  duplicates or reorders frames among those in flight produces bytes that
  differ from the ring.
- A correct echo returns exactly the bytes sent. Each read is compared with
  the ring at the connection's receive offset by one
  ``ring.startswith(data, offset)``: a ``memcmp``, with no copy and no
  decoding. The ring is stored with its first bytes appended again, so every
  read and every write is one contiguous slice. Frames of 16 KiB or more
  are received through ``asyncio.BufferedProtocol`` into a per-connection
  buffer, so a read is not copied into a new ``bytes`` object either.
- Frames are counted by bytes: ``received // frame_size``. Sending ``k`` new
  frames is one ``transport.write`` of a ``memoryview`` slice of the ring.
- Latency is measured per write, not per frame: each write records its
  timestamp and the index of its last frame. When a read completes frames,
  each write they belong to contributes ``now - sent`` once, weighted by the
  number of its frames completed in that read, into a histogram of
  1.024 us buckets. This is exact to the resolution of one read callback.
- ``--processes K`` splits the connections over ``K`` processes, which
  connect, wait for a common start signal, run, and send back their counters
  and histograms to be merged.
- ``--tls`` connects with TLS (``fastnet.tls.client_context``). The record
  layer is the event loop's; the per-read path above it is the same. The
  options travel to ``--processes`` workers as file names, and each worker
  builds its own context (an ``SSLContext`` does not pickle). Without
  ``--tls-ca`` the server's certificate is not verified (``curl -k``): the
  generator measures servers, it does not authenticate them.
- When every connection has failed (a refused connection, a failed TLS
  handshake, a plain client that a TLS server hung up on), the run ends at
  once with the errors instead of sleeping through the window.

``--protocol router`` drives the router's wire format instead (specified in
``fastnet/wire.py``): every frame is a request, a 12-byte header (kind 1,
flags 0, type ``--message-type``, a request id, deadline 0) before the same
payload, and the server answers each with a reply (kind 2) carrying the id
and the payload, in any order. The stream is then no longer a fixed byte
sequence, so this mode pays a few Python operations per frame:

- A request is a copy of a precomputed ring frame with its id written in
  (``struct.pack_into``); a top-up of ``k`` requests is one ``bytearray``
  copy of ``k`` ring frames, ``k`` packs and one write. Ids are a
  per-connection counter (wrapping at 2**32 - 1, skipping 0 and, once
  wrapped, the ids still in flight).
- The request with id ``i`` on connection ``n`` carries the payload of ring
  frame ``(i + n) mod R``, so a reply's id names the body it must carry.
  Each reply's length field and header are one ``struct.unpack_from``; its
  id is popped from the connection's ``id -> sent at`` map (an unknown id,
  or one already answered, is an error) and its body compared with the
  expected payload by one ``startswith`` (a ``memcmp``). Latency is
  ``now - sent at`` per reply, ``now`` being read once per read callback.
- An error reply (kind 3) counts one error, naming its code and text, and
  frees its request's slot: the connection goes on, as a router's does. A
  malformed frame, an unknown id or a wrong body counts one error and drops
  the connection, as a wrong echo does. Control messages are skipped, but a
  ping is answered with its pong, and a drain is counted (``drains``, not an
  error): the connection then sends no new request, collects the replies
  still due and closes.

In the frames protocol the cost is a few Python operations per read
callback, whatever the number of frames the read completed.
``--server-pid`` additionally reads the server process's CPU time (Linux
``/proc``) at the edges of the measured window, so the report gives the
server's CPU seconds per frame, which stays honest even when the generator
is the limit. The generator's own CPU time is reported too: when it is well
below one core per process, the server was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import ssl
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait as wait_pipes
from time import perf_counter_ns
from typing import Any, cast

from ._cliargs import (
    FRAMING_HELP,
    FRAMING_METAVAR,
    SIZE_SPELLINGS,
    ArgumentParser,
    UsageError,
    add_loop_argument,
    framing_text,
    non_negative_float,
    parse_framing,
    parse_loop,
    parse_port,
    parse_size,
    positive_float,
    positive_int,
    resolve_loop,
)
from .framing import LengthPrefixed, Lines
from .server import new_event_loop
from .tls import client_context

__all__ = [
    "BenchParams",
    "GeneratorFailed",
    "Histogram",
    "Ring",
    "add_arguments",
    "bench",
    "main",
    "parse_framing",
    "parse_size",
    "run",
]

# Connections opened at once. asyncio's default listen backlog is 100; more
# simultaneous SYNs than the server's backlog would wait for a 1 s retransmit.
CONNECT_CONCURRENCY = 100

# Target size of the ring of distinct frames: 64 KiB keeps the expected bytes
# in the L2 cache of any current CPU while making wrap-arounds rare.
RING_TARGET_BYTES = 64 * 1024

# Largest read per callback. Outstanding bytes never exceed depth x frame,
# so the buffer is that size, capped here: 256 KiB matches uvloop's own read
# buffer, and a larger one only costs memory with many connections.
MAX_READ = 256 * 1024

# After the measured window, how long outstanding frames may take to come
# back before the missing ones count as errors. Generous: on a loaded 2-core
# machine a slow server can need a second to flush 64 x 16 frames.
DRAIN_TIMEOUT = 5.0

# Frames from this size on are received with BufferedProtocol (no copy per
# read); below it, one data_received call per read is cheaper than two calls
# (get_buffer, buffer_updated). Measured on uvloop, 8 connections x depth 4,
# generator CPU per frame: plain 4% cheaper at 8 KiB, buffered 10% cheaper at
# 16 KiB and 12% at 64 KiB (a noisy shared machine: a rough crossover).
BUFFERED_FRAME_SIZE = 16 * 1024

# Writes up to this size are slices of the ring as bytes (a copy), larger
# ones memoryview slices. Measured with timeit here: a bytes slice costs 54 ns
# at 64 B, 110 ns at 4 KiB and 175 ns at 16 KiB; a memoryview slice plus the
# cast uvloop applies to it costs 160-175 ns at any of those sizes.
COPY_WRITE_LIMIT = 16 * 1024

# File descriptors a generator process needs beyond its connections: the
# interpreter, the event loop's epoll and self-pipe, --processes pipes. A
# generous guess.
FD_MARGIN = 64

# Progress line refresh period, seconds.
PROGRESS_INTERVAL = 0.5

# Latency histogram buckets are 2**10 ns = 1.024 us wide: the bucket is one
# shift of the latency, the cheapest operation in the per-read path (a log
# scale cost 0.2 us more per read here). Loopback round trips are tens of
# microseconds or more, so the error is under 1% of p50 in practice.
HISTOGRAM_SHIFT = 10

# Error messages kept for the report; the count of errors is always exact.
MAX_MESSAGES = 10

# Shortest measured window, seconds, over which CPU use is reported as cores:
# 0.1 s is 10 ticks of the usual 100 Hz CPU-time clock, so at most 10% off.
MIN_BUSY_WINDOW = 0.1

# Seconds a connection (TCP connect plus the TLS handshake) may take before it
# counts as an error. asyncio's own TLS handshake default is 60 s; a server
# that has not answered in 10 s on loopback is not going to.
CONNECT_TIMEOUT = 10.0

# The first two bytes of a TLS record a server may send a client that spoke
# plain bytes to it: an alert (0x15) or a handshake record (0x16), then the
# major version 3 (RFC 8446 section 5.1).
TLS_RECORD_STARTS = (b"\x15\x03", b"\x16\x03")

# The wire protocols: "frames" echoes plain frames (every byte checked in
# order); "router" sends router requests and matches replies by id.
PROTOCOLS = ("frames", "router")

# The router's wire format (fastnet/wire.py's docstring is the specification;
# the few constants the generator needs are repeated here). After the 4-byte
# big-endian length of LengthPrefixed() comes a 12-byte header: kind, flags,
# type, id, deadline, all big-endian and unsigned.
ROUTER_HEADER = struct.Struct(">BBHII")
# A frame's length field and header, read at once: one unpack per reply.
ROUTER_FRAME = struct.Struct(">I" + ROUTER_HEADER.format[1:])
ROUTER_LENGTH = struct.Struct(">I")
# A request's id, written into its copy of a ring frame: after the length
# field (4 bytes), kind, flags and type (4 bytes).
ROUTER_ID = struct.Struct(">I")
ROUTER_ID_OFFSET = 8
ROUTER_REQUEST, ROUTER_REPLY, ROUTER_ERROR, ROUTER_CONTROL = 1, 2, 3, 4  # kinds
ROUTER_PING, ROUTER_PONG, ROUTER_DRAIN = 1, 2, 3  # control codes
ROUTER_MAX_ID = 0xFFFFFFFF
ROUTER_MAX_TYPE = 0xFFFF
# The longest body accepted in a message that is not a reply (an error
# reply's code and text): a longer frame is an error, so that a broken length
# field cannot make the generator buffer without end.
ROUTER_MAX_ERROR_BODY = 16 * 1024
# Characters of an error reply's text kept in the error message.
ROUTER_ERROR_TEXT = 120

# Added to the error of a plain connection that a server hung up on, or
# answered with a TLS record, before echoing anything.
PLAIN_TO_TLS_HINT = "if the server serves TLS, run the generator with --tls"

# --------------------------------------------------------------------------- options


def _framing_option(text: str) -> str:
    """``--framing``: check the text now (a usage error, status 2), keep it as given.

    The text, not the spec, travels to ``--processes`` workers, which parse
    it again (a spec holds an encoder, which does not pickle).
    """
    parse_framing(text)
    return text


def _message_type(text: str) -> int:
    """``--message-type``: a router message type, 1 to 65535."""
    value = positive_int(text)
    if value > ROUTER_MAX_TYPE:
        raise UsageError(f"a message type is 1 to {ROUTER_MAX_TYPE}: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastnet bench`` options to ``parser`` (for the CLI's subcommand)."""
    parser.add_argument("--host", default="127.0.0.1", help="server address (127.0.0.1)")
    parser.add_argument("--port", type=parse_port, required=True, help="server port")
    parser.add_argument(
        "--connections", type=positive_int, default=64, metavar="N", help="connections (64)"
    )
    parser.add_argument(
        "--depth",
        type=positive_int,
        default=16,
        metavar="D",
        help="frames in flight per connection (16)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=64,
        metavar="S",
        help=f"payload bytes per frame (64): {SIZE_SPELLINGS}",
    )
    parser.add_argument(
        "--duration", type=positive_float, default=5.0, metavar="T", help="measured seconds (5)"
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_float,
        default=1.0,
        metavar="W",
        help="seconds of load before measuring (1)",
    )
    parser.add_argument(
        "--framing",
        type=_framing_option,
        default="length",
        metavar=FRAMING_METAVAR,
        help="as the server's --framing: " + FRAMING_HELP,
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="frames",
        help="frames: echo of plain frames, every byte checked in order; router: router "
        "requests (fastnet.wire) with ids, replies matched by id in any order (frames)",
    )
    parser.add_argument(
        "--message-type",
        type=_message_type,
        default=None,
        metavar="T",
        help="the requests' message type with --protocol router, 1-65535 (1)",
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        metavar="K",
        help="generator processes sharing the connections (1)",
    )
    add_loop_argument(parser)
    parser.add_argument(
        "--server-pid",
        type=positive_int,
        default=None,
        metavar="PID",
        help="also report this process's CPU time per frame (Linux)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    tls = parser.add_argument_group(
        "TLS",
        "connect with TLS 1.2+; without --tls-ca the server's certificate is NOT "
        "verified (like curl -k)",
    )
    tls.add_argument("--tls", action="store_true", help="connect with TLS")
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=None,
        help="verify the server's certificate against these PEM CAs (default: no verification)",
    )
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=None,
        help="PEM client certificate, for servers that require one (mTLS)",
    )
    tls.add_argument(
        "--tls-key",
        metavar="FILE",
        default=None,
        help="PEM private key of --tls-cert (default: in --tls-cert)",
    )
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=None,
        help="name sent in SNI and verified against the certificate (default: --host)",
    )


# --------------------------------------------------------------------------- building blocks


class GeneratorFailed(RuntimeError):
    """A ``--processes`` worker failed or exited without a result."""


@dataclass(frozen=True)
class BenchParams:
    """Everything one generator process needs (picklable, for ``--processes``)."""

    host: str
    port: int
    connections: int
    depth: int
    size: int
    duration: float
    warmup: float
    framing: str
    loop: str = "auto"
    server_pid: int | None = None
    processes: int = 1
    progress: bool = False
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    protocol: str = "frames"
    message_type: int = 1


def tls_context(params: BenchParams) -> ssl.SSLContext | None:
    """The client context ``params`` asks for, or None without ``tls``.

    The server is verified only when ``tls_ca`` is given.

    Raises:
        ValueError: a ``tls_*`` option without ``tls``, or a key without a
            certificate.
        fastnet.tls.TLSConfigError: a file is missing or not what it should
            be (a ``ValueError`` too); the message names the file.
    """
    if not params.tls:
        given = [
            option
            for option, value in (
                ("--tls-ca", params.tls_ca),
                ("--tls-cert", params.tls_cert),
                ("--tls-key", params.tls_key),
                ("--tls-server-name", params.tls_server_name),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --tls")
        return None
    if params.tls_key is not None and params.tls_cert is None:
        raise ValueError("--tls-key needs --tls-cert")
    return client_context(
        ca=params.tls_ca,
        cert=params.tls_cert,
        key=params.tls_key,
        verify=params.tls_ca is not None,
    )


class Ring:
    """The byte stream one connection sends, and so expects back.

    ``data`` holds ``frames`` distinct encoded frames of ``frame_size`` bytes
    each (``period`` bytes in all), followed by its own first ``tail`` bytes,
    so that any slice of up to ``tail`` bytes starting in the period is
    contiguous.

    With a ``header`` (the router's request header), every frame carries it
    between the length field and the payload; ``bodies`` then holds each
    frame's payload, and ``body_offset`` is where a payload starts in its
    frame.

    Args:
        spec: the framing (``LengthPrefixed`` or ``Lines``).
        size: payload bytes per frame.
        depth: frames in flight per connection.
        read_size: the largest read the receiver will compare at once.
        header: bytes before each payload, inside the frame (length-prefixed
            framings only).

    Raises:
        ValueError: the payload size does not fit the framing.
    """

    def __init__(
        self,
        spec: LengthPrefixed | Lines,
        size: int,
        depth: int,
        read_size: int,
        header: bytes = b"",
    ) -> None:
        if size < 1:
            raise ValueError("the payload size must be at least 1 byte")
        if depth < 1:
            raise ValueError("the depth must be at least 1")
        if isinstance(spec, LengthPrefixed):
            if spec.offset or spec.adjustment or spec.strip is not None:
                raise ValueError("the generator writes plain length-prefixed frames only")
            length = len(header) + size
            if length >= 1 << (8 * spec.length_size):
                what = f"{size}-byte payload"
                if header:
                    what += f" with its {len(header)}-byte header"
                raise ValueError(f"a {what} does not fit a {spec.length_size}-byte length field")
            prefix, suffix = length.to_bytes(spec.length_size, spec.byteorder) + header, b""
        else:
            if header:
                raise ValueError("a frame header needs a length-prefixed framing")
            if size > spec.max_length:
                raise ValueError(f"a {size}-byte line exceeds the {spec.max_length}-byte limit")
            prefix, suffix = b"", spec.delimiter
        self.size = size
        self.body_offset = len(prefix)
        self.frame_size = len(prefix) + size + len(suffix)
        # More than twice the depth, so frames in flight are all distinct even
        # across a wrap-around; otherwise enough to fill RING_TARGET_BYTES.
        self.frames = max(2 * depth + 1, -(-RING_TARGET_BYTES // self.frame_size))
        self.period = self.frames * self.frame_size
        self.tail = max(read_size, depth * self.frame_size)
        ring = b"".join(prefix + self.payload(i, size) + suffix for i in range(self.frames))
        repeats = -(-(self.period + self.tail) // self.period)
        self.data = (ring * repeats)[: self.period + self.tail]
        self.view = memoryview(self.data)
        self.bodies: list[bytes] = []
        if header:
            first = self.body_offset
            step = self.frame_size
            self.bodies = [
                self.data[i * step + first : i * step + first + size] for i in range(self.frames)
            ]

    @staticmethod
    def payload(index: int, size: int) -> bytes:
        """Payload of ring frame ``index``: its hex digits, least significant first.

        The tag is repeated over the payload, so it contains only the
        printable characters ``0-9a-f.`` (never a line delimiter), and a
        payload shorter than the tag keeps its low digits.
        """
        tag = f"{index:x}"[::-1].encode() + b"."
        return (tag * (size // len(tag) + 1))[:size]

    def first_difference(self, offset: int, data: bytes) -> int:
        """Index of the first byte of ``data`` that differs from the ring at ``offset``."""
        expected = self.data[offset : offset + len(data)]
        for i, (a, b) in enumerate(zip(expected, data, strict=False)):
            if a != b:
                return i
        return min(len(expected), len(data))


class Histogram:
    """Histogram of latencies in nanoseconds, in 1.024 us buckets, mergeable."""

    __slots__ = ("counts",)

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    def record(self, nanoseconds: int, weight: int = 1) -> None:
        """Count ``weight`` samples of ``nanoseconds``."""
        bucket = nanoseconds >> HISTOGRAM_SHIFT
        self.counts[bucket] = self.counts.get(bucket, 0) + weight

    def merge(self, other: Histogram) -> None:
        """Add the samples of ``other``."""
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count

    @property
    def total(self) -> int:
        """Number of samples."""
        return sum(self.counts.values())

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0-100) in nanoseconds, or None when empty."""
        total = self.total
        if not total:
            return None
        rank = q / 100.0 * total
        seen = 0
        bucket = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                break
        return (bucket + 0.5) * (1 << HISTOGRAM_SHIFT)


@dataclass
class Stats:
    """Counters shared by the connections of one generator process."""

    errors: int = 0
    messages: list[str] = field(default_factory=list)
    histogram: Histogram = field(default_factory=Histogram)
    recording: bool = False  # inside the measured window: record latencies
    stopping: bool = False  # after the window: send no new frames
    connected: int = 0  # connections opened
    failed: int = 0  # of those, failed since
    drains: int = 0  # router drain messages received (not errors)
    drained_connections: int = 0  # closed cleanly after the server drained them
    # Set when every connection opened has failed, or closed after a drain:
    # nothing left to measure.
    all_failed: asyncio.Event = field(default_factory=asyncio.Event)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def connection_failed(self) -> None:
        self.failed += 1
        if self.failed + self.drained_connections >= self.connected:
            self.all_failed.set()

    def connection_drained(self) -> None:
        """A connection the server drained closed cleanly: one fewer to measure."""
        self.drained_connections += 1
        if self.failed + self.drained_connections >= self.connected:
            self.all_failed.set()


class EchoClient(asyncio.Protocol):
    """One connection: keeps ``depth`` frames in flight and verifies the echo.

    ``data_received`` is the whole per-read cost of the generator, so it is
    written flat: no helper calls on the success path, attributes read once.

    Args:
        number: the connection's index, for error messages.
        ring: the precomputed stream to send and expect.
        depth: frames in flight.
        stats: the process's shared counters.
    """

    def __init__(self, number: int, ring: Ring, depth: int, stats: Stats) -> None:
        self.number = number
        self.ring = ring
        self.stream = ring.data
        # What writes slice. uvloop's write takes bytes as they are but wraps
        # anything else in a new cast memoryview; copying is cheaper than that
        # up to COPY_WRITE_LIMIT bytes, so writes that small are bytes slices.
        self.source: bytes | memoryview = (
            ring.data if depth * ring.frame_size <= COPY_WRITE_LIMIT else ring.view
        )
        self.period = ring.period
        self.frame_size = ring.frame_size
        self.depth = depth
        self.stats = stats
        self.write: Callable[[bytes | bytearray | memoryview], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.sent = 0  # bytes written
        self.received = 0  # bytes received and verified
        self.done = 0  # frames completed: received // frame_size
        self.inflight: deque[tuple[int, int]] = deque()  # (end frame index, sent at ns)
        self.counts = stats.histogram.counts
        self.failed = False
        self.drained: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same interface.
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write

    def data_received(self, data: bytes | memoryview) -> None:
        received = self.received
        total = received + len(data)
        if total > self.sent or not self.stream.startswith(data, received % self.period):
            self._reject(data)
            return
        self.received = total
        new = total // self.frame_size
        done = self.done
        if new == done:
            return
        self.done = new
        now = perf_counter_ns()
        inflight = self.inflight
        stats = self.stats
        if stats.recording:
            counts = self.counts
            while done < new:
                end, sent_at = inflight[0]
                if end <= new:
                    inflight.popleft()
                else:
                    end = new
                bucket = (now - sent_at) >> HISTOGRAM_SHIFT
                counts[bucket] = counts.get(bucket, 0) + end - done
                done = end
        else:
            while inflight and inflight[0][0] <= new:
                inflight.popleft()
        if not stats.stopping:
            # Top the connection up to `depth` frames in flight: one write.
            sent = self.sent
            start = sent % self.period
            target = new + self.depth
            nbytes = target * self.frame_size - sent
            self.write(self.source[start : start + nbytes])  # type: ignore[misc]
            self.sent = sent + nbytes
            inflight.append((target, now))
        elif total == self.sent and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.failed or self._closed_cleanly():
            return
        self.failed = True
        reason = f": {exc}" if exc else ""
        if not self.received and not self._is_tls():
            reason += f" (before any reply; {PLAIN_TO_TLS_HINT})"
        self.stats.error(
            f"connection {self.number} closed by the server after {self.done} frames{reason}"
        )
        self.stats.connection_failed()
        self._release_drain()

    # -- helpers

    def start(self) -> None:
        """Send the first ``depth`` frames."""
        if self.write is None or self.failed:
            return
        nbytes = self.depth * self.frame_size
        self.write(self.source[:nbytes])
        self.sent = nbytes
        self.inflight.append((self.depth, perf_counter_ns()))

    def begin_drain(self) -> asyncio.Future[None]:
        """Stop sending; return a future set when every frame sent has come back."""
        self.drained = asyncio.get_running_loop().create_future()
        if self.failed or self.received == self.sent:
            self.drained.set_result(None)
        return self.drained

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def outstanding(self) -> int:
        """Frames sent and not yet echoed in full."""
        return (self.sent - self.received) // self.frame_size

    def _closed_cleanly(self) -> bool:
        """True when a lost connection is no error: we were closing it, all echoed."""
        return self.drained is not None and self.received == self.sent

    def _is_tls(self) -> bool:
        return self.transport is not None and (
            self.transport.get_extra_info("ssl_object") is not None
        )

    def _release_drain(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _reject(self, data: bytes | memoryview) -> None:
        """The echo is wrong: count one error and drop this connection."""
        total = self.received + len(data)
        if total > self.sent:
            message = (
                f"connection {self.number}: received {total - self.sent} bytes more than it sent"
            )
        else:
            ring = self.ring
            at = self.received + ring.first_difference(self.received % ring.period, bytes(data))
            message = (
                f"connection {self.number}: echo differs from what was sent at byte {at} "
                f"(frame {at // ring.frame_size}, byte {at % ring.frame_size} of the frame)"
            )
        if not self.received and bytes(data[:2]) in TLS_RECORD_STARTS and not self._is_tls():
            message = (
                f"connection {self.number}: the server answered with a TLS record, "
                f"not an echo; {PLAIN_TO_TLS_HINT}"
            )
        self.failed = True
        self.stats.error(message)
        self.stats.connection_failed()
        self._release_drain()
        if self.transport is not None:
            self.transport.abort()


class BufferedEchoClient(EchoClient, asyncio.BufferedProtocol):
    """An ``EchoClient`` for large frames: the kernel writes into our buffer.

    With frames of tens of KiB, the copy into a new ``bytes`` object per read
    costs more than the extra ``get_buffer`` call per read; the comparison
    then runs on a ``memoryview`` of the buffer.
    """

    def __init__(self, number: int, ring: Ring, depth: int, stats: Stats) -> None:
        super().__init__(number, ring, depth, stats)
        self.buffer = memoryview(bytearray(buffer_size(ring, depth)))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.buffer[:nbytes])


def buffer_size(ring: Ring, depth: int) -> int:
    """Receive buffer of a ``BufferedEchoClient``.

    Larger than the bytes that can be outstanding, so that a read which
    returns all of them does not fill the buffer: libuv reads again after a
    full buffer, and that read would only return EAGAIN. Capped at
    ``MAX_READ``.
    """
    return min(MAX_READ, 2 * depth * ring.frame_size)


class RouterClient(EchoClient):
    """One connection of ``--protocol router``: ``depth`` requests in flight, replies by id.

    The ring's frames are requests (its header has id 0); each request sent
    is a copy with its id written in. ``pending`` maps the ids in flight to
    their send time; ``done`` counts the replies verified. The hot path,
    ``_replies``, is flat like ``EchoClient.data_received``: per reply one
    unpack, one ``dict.pop``, one ``startswith`` and a histogram count.

    Args:
        as ``EchoClient``; the ring must carry the router's request header.
    """

    def __init__(self, number: int, ring: Ring, depth: int, stats: Stats) -> None:
        super().__init__(number, ring, depth, stats)
        self.view = ring.view
        self.bodies = ring.bodies
        self.ring_frames = ring.frames
        self.body_offset = ring.body_offset
        self.reply_length = ring.frame_size - ROUTER_LENGTH.size  # a reply's length field
        self.max_length = ROUTER_HEADER.size + max(ring.size, ROUTER_MAX_ERROR_BODY)
        self.pending: dict[int, int] = {}  # request id -> sent at, ns
        self.next_id = 1
        self.wrapped = False  # the ids went past 2**32 - 1: skip those still in flight
        self.partial = bytearray()  # the start of a frame cut by the end of a read
        self.server_drain = False  # the server sent drain: no new requests here

    # -- asyncio callbacks

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        # A plain Protocol: asyncio and uvloop pass bytes.
        self.received += len(data)
        partial = self.partial
        if partial:
            partial += data
            end = self._replies(partial, len(partial))
            if end > 0:
                del partial[:end]
        else:
            end = self._replies(data, len(data))
            if 0 <= end < len(data):
                partial += data[end:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.failed and self.drained is None and self.server_drain and not self.pending:
            self.stats.connection_drained()
        super().connection_lost(exc)

    # -- the replies

    def _replies(self, buf: bytes | bytearray, end: int) -> int:
        """Verify the complete frames of ``buf[:end]``; top the connection up.

        Returns:
            The offset of the first byte not consumed (the start of a cut
            frame), or -1 when the connection failed.
        """
        pending = self.pending
        pop = pending.pop
        stats = self.stats
        recording = stats.recording
        counts = self.counts
        bodies = self.bodies
        ring_frames = self.ring_frames
        number = self.number
        body_offset = self.body_offset
        reply_length = self.reply_length
        unpack = ROUTER_FRAME.unpack_from
        done = self.done
        now = perf_counter_ns()
        pos = 0
        while end - pos >= 16:
            length, kind, flags, _, rid, deadline = unpack(buf, pos)
            stop = pos + 4 + length
            if stop > end:
                break
            if kind == ROUTER_REPLY and length == reply_length and not flags and not deadline:
                sent_at = pop(rid, None)
                if sent_at is None or not buf.startswith(
                    bodies[(rid + number) % ring_frames], pos + body_offset
                ):
                    self.done = done
                    self._bad_reply(buf, pos, end, rid, sent_at is None)
                    return -1
                done += 1
                if recording:
                    bucket = (now - sent_at) >> HISTOGRAM_SHIFT
                    counts[bucket] = counts.get(bucket, 0) + 1
            elif not self._other(buf, pos, end):
                self.done = done
                return -1
            pos = stop
        self.done = done
        if end - pos >= 4:
            # A cut frame: its length must be one the generator will buffer.
            (length,) = ROUTER_LENGTH.unpack_from(buf, pos)
            if not ROUTER_HEADER.size <= length <= self.max_length:
                self._fail(self._length_error(length), buf, pos, end)
                return -1
        if stats.stopping or self.server_drain:
            if not pending:
                self._release_drain()
                if self.server_drain and self.drained is None and self.transport is not None:
                    self.transport.close()  # all answered: close, as a drain asks
        elif len(pending) < self.depth:
            self._send(self.depth - len(pending), now)
        return pos

    def _other(self, buf: bytes | bytearray | memoryview, pos: int, end: int) -> bool:
        """Handle a complete frame that is not a well-formed reply; False if it failed."""
        length, kind, flags, mtype, rid, deadline = ROUTER_FRAME.unpack_from(buf, pos)
        where = f"connection {self.number}"
        if not ROUTER_HEADER.size <= length <= self.max_length:
            self._fail(self._length_error(length), buf, pos, end)
            return False
        if flags:
            problem = f"a message with flags {flags:#04x} (reserved, must be 0)"
        elif kind not in (ROUTER_REPLY, ROUTER_ERROR, ROUTER_CONTROL):
            what = "a request (kind 1)" if kind == ROUTER_REQUEST else f"an unknown kind {kind}"
            problem = f"{what}, which a client never accepts"
        elif deadline:
            problem = f"a deadline ({deadline} ms) in a message of kind {kind}"
        elif kind == ROUTER_REPLY:
            problem = (
                f"a {length - ROUTER_HEADER.size}-byte reply to request {rid}, "
                f"whose body was {self.reply_length - ROUTER_HEADER.size} bytes"
            )
        elif kind == ROUTER_ERROR:
            if length < ROUTER_HEADER.size + 2:
                problem = "an error reply without its 2-byte error code"
            elif self.pending.pop(rid, None) is None:
                problem = f"an error reply to request {rid}, which is not in flight"
            else:
                body = pos + 4 + ROUTER_HEADER.size
                code = int.from_bytes(buf[body : body + 2], "big")
                text = bytes(buf[body + 2 : pos + 4 + length]).decode("utf-8", "replace")
                if len(text) > ROUTER_ERROR_TEXT:
                    text = text[:ROUTER_ERROR_TEXT] + "..."
                # An answer, though not the one wanted: one error; the
                # connection goes on, as the router's does.
                self.stats.error(
                    f"{where}: request {rid} (type {mtype}) answered with error {code}: {text!r}"
                )
                return True
        else:  # control: skipped, but a ping gets its pong and a drain is counted
            if mtype == ROUTER_PING and self.write is not None:
                pong = ROUTER_FRAME.pack(ROUTER_HEADER.size, ROUTER_CONTROL, 0, ROUTER_PONG, rid, 0)
                self.write(pong)
                self.sent += len(pong)
            elif mtype == ROUTER_DRAIN:
                self.stats.drains += 1
                self.server_drain = True
            return True
        self._fail(f"{where}: the server sent {problem}", buf, pos, end)
        return False

    def _bad_reply(
        self, buf: bytes | bytearray | memoryview, pos: int, end: int, rid: int, unknown: bool
    ) -> None:
        """A reply whose id is not in flight, or whose body is not its request's."""
        where = f"connection {self.number}"
        if unknown:
            self._fail(f"{where}: a reply to request {rid}, which is not in flight", buf, pos, end)
            return
        expected = self.bodies[(rid + self.number) % self.ring_frames]
        body = bytes(buf[pos + self.body_offset : pos + self.body_offset + len(expected)])
        at = next(i for i, (a, b) in enumerate(zip(expected, body, strict=True)) if a != b)
        self._fail(
            f"{where}: the reply to request {rid} differs from its request's body at byte {at}",
            buf,
            pos,
            end,
        )

    def _length_error(self, length: int) -> str:
        if length < ROUTER_HEADER.size:
            return (
                f"connection {self.number}: the server sent a {length}-byte frame, "
                "shorter than the 12-byte router header"
            )
        return (
            f"connection {self.number}: the server announced a {length}-byte frame, "
            f"longer than any reply due (at most {self.max_length})"
        )

    def _fail(self, message: str, buf: bytes | bytearray | memoryview, pos: int, end: int) -> None:
        """Count one error and drop this connection."""
        at = self.received - end + pos  # the frame's offset in the connection's stream
        if at == 0 and bytes(buf[pos : pos + 2]) in TLS_RECORD_STARTS and not self._is_tls():
            message = (
                f"connection {self.number}: the server answered with a TLS record, "
                f"not a router message; {PLAIN_TO_TLS_HINT}"
            )
        self.failed = True
        self.stats.error(message)
        self.stats.connection_failed()
        self._release_drain()
        if self.transport is not None:
            self.transport.abort()

    # -- the requests

    def _send(self, count: int, now: int) -> None:
        """Send ``count`` new requests in one write, each with a fresh id."""
        if self.write is None:
            return
        pending = self.pending
        pack = ROUTER_ID.pack_into
        frame_size = self.frame_size
        first = self.next_id
        last = first + count - 1
        if last <= ROUTER_MAX_ID and not self.wrapped:
            # The usual case: ids first..last, ring frames consecutive (the
            # ring's tail holds `depth` frames past its period).
            start = (first + self.number) % self.ring_frames * frame_size
            out = bytearray(self.view[start : start + count * frame_size])
            offset = ROUTER_ID_OFFSET
            for rid in range(first, last + 1):
                pack(out, offset, rid)
                pending[rid] = now
                offset += frame_size
            self.next_id = last + 1
        else:
            out = bytearray()
            rid = first
            for _ in range(count):
                while True:
                    if rid > ROUTER_MAX_ID:
                        rid = 1
                        self.wrapped = True
                    if not (self.wrapped and rid in pending):
                        break
                    rid += 1
                start = (rid + self.number) % self.ring_frames * frame_size
                offset = len(out) + ROUTER_ID_OFFSET
                out += self.view[start : start + frame_size]
                pack(out, offset, rid)
                pending[rid] = now
                rid += 1
            self.next_id = rid
        self.write(out)
        self.sent += len(out)

    # -- helpers

    def start(self) -> None:
        """Send the first ``depth`` requests."""
        if self.write is None or self.failed:
            return
        self._send(self.depth, perf_counter_ns())

    def begin_drain(self) -> asyncio.Future[None]:
        """Stop sending; return a future set when every request sent has been answered."""
        self.drained = asyncio.get_running_loop().create_future()
        if self.failed or not self.pending:
            self.drained.set_result(None)
        return self.drained

    def outstanding(self) -> int:
        """Requests sent and not yet answered."""
        return len(self.pending)

    def _closed_cleanly(self) -> bool:
        return not self.pending and (self.drained is not None or self.server_drain)


class BufferedRouterClient(RouterClient, asyncio.BufferedProtocol):
    """A ``RouterClient`` for large frames: the kernel writes into our buffer.

    A frame cut by the end of a read is moved to the buffer's start, and the
    next read lands after it; the buffer holds two frames at least, so there
    is always room for the rest of one.
    """

    def __init__(self, number: int, ring: Ring, depth: int, stats: Stats) -> None:
        super().__init__(number, ring, depth, stats)
        capacity = max(buffer_size(ring, depth), 2 * ring.frame_size)
        capacity = max(capacity, 2 * (ROUTER_LENGTH.size + self.max_length))
        self.inbuf = bytearray(capacity)
        self.inview = memoryview(self.inbuf)
        self.filled = 0  # bytes of a cut frame at the start of inbuf

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.inview[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        end = self.filled + nbytes
        pos = self._replies(self.inbuf, end)
        if pos < 0:
            return
        rest = end - pos
        if rest and pos:
            self.inbuf[:rest] = bytes(self.inview[pos:end])
        self.filled = rest


def client_class(ring: Ring, protocol: str = "frames") -> type[EchoClient]:
    """The protocol class for this wire protocol and frames of this ring's size."""
    buffered = ring.frame_size >= BUFFERED_FRAME_SIZE
    if protocol == "router":
        return BufferedRouterClient if buffered else RouterClient
    return BufferedEchoClient if buffered else EchoClient


# --------------------------------------------------------------------------- one process


def _cpu_ticks(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) used so far by process ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the ")" that closes the command name: state is field 3,
    # utime and stime are fields 14 and 15 (proc(5)).
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float | None:
    """CPU seconds all CPUs have spent busy since boot (Linux ``/proc/stat``), or None.

    Busy is everything but idle and iowait: user, nice, system, irq, softirq
    and steal (time a hypervisor gave to another guest).
    """
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class _Control:
    """How a generator process synchronises its start (with other processes)."""

    def __init__(self, pipe: Pipe | None) -> None:
        self.pipe = pipe

    def ready(self, connected: int, stats: Stats) -> None:
        """Report that the connections are open; block until the common start."""
        if self.pipe is None:
            return
        self.pipe.send(("ready", connected, stats.errors))
        message = self.pipe.recv()
        if message != "go":
            raise SystemExit(0)  # the parent gave up (e.g. another process failed)

    def progress(self, frames: int, errors: int) -> None:
        if self.pipe is not None:
            self.pipe.send(("progress", frames, errors))


def _progress_line(elapsed: float, warmup: float, rate: float, errors: int) -> str:
    phase = "warmup" if elapsed < warmup else "measuring"
    return f"\r{phase:>9} {elapsed:6.1f} s  {rate / 1e6:8.3f} M frames/s  errors {errors}\033[K"


def _raise_fd_limit(connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE so ``connections`` sockets fit (up to the hard limit).

    A default soft limit of 1024 would otherwise fail a 1,000-connection run
    with EMFILE. Where the hard limit is lower, the connections beyond it
    fail to connect and are reported as errors.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FD_MARGIN
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def _open(params: BenchParams, ring: Ring, stats: Stats) -> list[EchoClient]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    protocol = client_class(ring, params.protocol)
    context = tls_context(params)
    tls: dict[str, Any] = {}
    if context is not None:
        tls = {
            "ssl": context,
            "server_hostname": params.tls_server_name or params.host,
            "ssl_handshake_timeout": CONNECT_TIMEOUT,
        }

    async def connect(number: int) -> EchoClient | None:
        async with gate:
            try:
                _, client = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: protocol(number, ring, params.depth, stats),
                        params.host,
                        params.port,
                        **tls,
                    ),
                    timeout=CONNECT_TIMEOUT,
                )
            except ssl.SSLError as exc:  # before OSError: it is one
                stats.error(
                    f"connection {number}: TLS handshake with {params.host}:{params.port} "
                    f"failed: {exc}{_handshake_hint(exc, params)}"
                )
                return None
            except (OSError, asyncio.TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, ConnectionError) and context is not None:
                    reason += " (during the TLS handshake: does the server serve TLS?)"
                stats.error(
                    f"connection {number}: cannot connect to {params.host}:{params.port}: {reason}"
                )
                return None
            return client

    clients = await asyncio.gather(*(connect(i) for i in range(params.connections)))
    return [c for c in clients if c is not None]


def _handshake_hint(exc: ssl.SSLError, params: BenchParams) -> str:
    """What to try after a failed handshake, when the error says enough to tell."""
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        name = params.tls_server_name or params.host
        return (
            f" (verified against --tls-ca {params.tls_ca} for the name {name!r}; "
            "--tls-server-name sets the name, and without --tls-ca nothing is verified)"
        )
    if "WRONG_VERSION_NUMBER" in text or "PACKET_LENGTH_TOO_LONG" in text:
        return " (the server did not answer with TLS: is it a plain server?)"
    if "CERTIFICATE_REQUIRED" in text or "HANDSHAKE_FAILURE" in text:
        return " (a server that requires client certificates wants --tls-cert and --tls-key)"
    return ""


def _tls_session(clients: list[EchoClient], params: BenchParams) -> dict[str, Any] | None:
    """The TLS version and cipher of the first connection, for the report; None without TLS."""
    if not params.tls:
        return None
    session: dict[str, Any] = {
        "version": None,
        "cipher": None,
        "verified": params.tls_ca is not None,
        "client_certificate": params.tls_cert is not None,
    }
    for client in clients:
        transport = client.transport
        ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            session["version"] = ssl_object.version()
            session["cipher"] = cipher[0] if cipher else None
            break
    return session


def make_ring(params: BenchParams, read_size: int = MAX_READ) -> Ring:
    """The ring of frames ``params`` asks for: plain frames, or router requests.

    Raises:
        ValueError: an unknown protocol, a message type out of range, a
            framing other than the router's with ``--protocol router``, or
            a payload size the framing cannot carry.
    """
    spec = parse_framing(params.framing)
    if params.protocol == "frames":
        return Ring(spec, params.size, params.depth, read_size)
    if params.protocol != "router":
        raise ValueError(f"unknown protocol {params.protocol!r}: expected {', '.join(PROTOCOLS)}")
    if not 1 <= params.message_type <= ROUTER_MAX_TYPE:
        raise ValueError(f"a message type is 1 to {ROUTER_MAX_TYPE}, not {params.message_type}")
    if (
        not isinstance(spec, LengthPrefixed)
        or spec.length_size != 4
        or spec.byteorder != "big"
        or spec.offset
        or spec.adjustment
        or spec.strip is not None
    ):
        raise ValueError(
            "--protocol router speaks the router's framing: --framing length "
            "(4-byte big-endian length)"
        )
    header = ROUTER_HEADER.pack(ROUTER_REQUEST, 0, params.message_type, 0, 0)
    return Ring(spec, params.size, params.depth, read_size, header)


async def _measure(params: BenchParams, control: _Control) -> dict[str, Any]:
    """Run one generator process; return its raw counters."""
    ring = make_ring(params)
    stats = Stats()
    _raise_fd_limit(params.connections)
    clients = await _open(params, ring, stats)
    stats.connected = len(clients)
    if not clients:
        stats.all_failed.set()
    tls_session = _tls_session(clients, params)
    control.ready(len(clients), stats)

    progress_task = None
    if params.progress:
        progress_task = asyncio.ensure_future(_report_progress(params, clients, stats, control))

    for client in clients:
        client.start()
    if clients:
        await _sleep_unless_all_failed(params.warmup, stats)
    start_frames = _frames(clients)
    start_cpu = time.process_time()
    start_server = _cpu_ticks(params.server_pid) if params.server_pid else None
    start_machine = _machine_busy()
    start = time.perf_counter()
    stats.recording = True
    if clients:
        await _sleep_unless_all_failed(params.duration, stats)
    stats.recording = False
    stats.stopping = True
    end = time.perf_counter()
    end_cpu = time.process_time()
    end_server = _cpu_ticks(params.server_pid) if params.server_pid else None
    end_machine = _machine_busy()
    frames = _frames(clients) - start_frames

    if progress_task is not None:
        progress_task.cancel()
        await asyncio.gather(progress_task, return_exceptions=True)

    # Let the frames in flight come back (and be verified), then close.
    drains = [client.begin_drain() for client in clients]
    if drains:
        _, pending = await asyncio.wait(drains, timeout=DRAIN_TIMEOUT)
        if pending:
            missing = sum(c.outstanding() for c in clients if not c.failed)
            what = "frames sent were not echoed"
            if params.protocol == "router":
                what = "requests sent were not answered"
            stats.error(f"{missing} {what} within {DRAIN_TIMEOUT:g} s after the run")
            for future in pending:
                future.cancel()
    for client in clients:
        client.close()
    if clients:
        await asyncio.wait([c.lost for c in clients], timeout=1.0)

    server_cpu = (
        end_server - start_server if start_server is not None and end_server is not None else None
    )
    machine = (
        end_machine - start_machine
        if start_machine is not None and end_machine is not None
        else None
    )
    return {
        "connected": len(clients),
        "window": end - start,
        "frames": frames,
        "frame_size": ring.frame_size,
        "errors": stats.errors,
        "messages": stats.messages,
        "drains": stats.drains,
        "histogram": stats.histogram.counts,
        "loadgen_cpu_s": end_cpu - start_cpu,
        "server_cpu_s": server_cpu,
        "machine_busy_s": machine,
        "tls": tls_session,
    }


async def _sleep_unless_all_failed(seconds: float, stats: Stats) -> None:
    """Sleep ``seconds``, or less if every connection fails meanwhile."""
    if stats.all_failed.is_set():
        return
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stats.all_failed.wait(), timeout=seconds)


def _frames(clients: list[EchoClient]) -> int:
    """Frames echoed and verified so far, over all connections."""
    return sum(client.done for client in clients)


async def _report_progress(
    params: BenchParams, clients: list[EchoClient], stats: Stats, control: _Control
) -> None:
    begin = time.perf_counter()
    last_frames, last_time = 0, begin
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        now = time.perf_counter()
        frames = _frames(clients)
        if control.pipe is not None:
            control.progress(frames, stats.errors)
            continue
        rate = (frames - last_frames) / (now - last_time)
        last_frames, last_time = frames, now
        sys.stderr.write(_progress_line(now - begin, params.warmup, rate, stats.errors))
        sys.stderr.flush()


def _run_process(params: BenchParams, pipe: Pipe | None) -> dict[str, Any]:
    loop = new_event_loop(params.loop)
    try:
        result: dict[str, Any] = loop.run_until_complete(_measure(params, _Control(pipe)))
        return result
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _child(params: BenchParams, pipe: Pipe) -> None:
    """Entry point of a ``--processes`` worker."""
    try:
        result = _run_process(params, pipe)
    except BaseException as exc:  # report any failure to the parent, never hang it
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(("result", result))


# --------------------------------------------------------------------------- several processes


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _run_processes(params: BenchParams) -> list[dict[str, Any]]:
    # "spawn": a fresh interpreter per worker, the same on every platform, and
    # no event-loop or socket state inherited from the parent.
    context = multiprocessing.get_context("spawn")
    pipes: list[Pipe] = []
    workers = []
    for index, count in enumerate(_split(params.connections, params.processes)):
        parent_end, child_end = context.Pipe()
        child_params = BenchParams(
            **{
                **asdict(params),
                "connections": count,
                # One process measures the server's CPU; the windows coincide.
                "server_pid": params.server_pid if index == 0 else None,
            }
        )
        worker = context.Process(target=_child, args=(child_params, child_end), daemon=True)
        worker.start()
        child_end.close()
        pipes.append(parent_end)
        workers.append(worker)
    try:
        return _drive(params, pipes)
    finally:
        for worker in workers:
            worker.join(timeout=DRAIN_TIMEOUT + 5.0)
            if worker.is_alive():
                worker.terminate()
                worker.join()


def _drive(params: BenchParams, pipes: list[Pipe]) -> list[dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    ready = 0
    progress: dict[int, int] = {}
    errors: dict[int, int] = {}
    begin = last_time = 0.0
    last_total = 0
    open_pipes = dict(enumerate(pipes))
    while open_pipes:
        for ready_pipe in wait_pipes(list(open_pipes.values())):
            pipe = cast(Pipe, ready_pipe)
            index = pipes.index(pipe)
            try:
                message: tuple[Any, ...] = pipe.recv()
            except EOFError:
                failures.append(f"generator process {index} exited without a result")
                del open_pipes[index]
                continue
            kind = message[0]
            if kind == "ready":
                ready += 1
                errors[index] = message[2]
                if ready == len(pipes):
                    for p in pipes:
                        p.send("go")
                    begin = last_time = time.perf_counter()
            elif kind == "progress":
                progress[index], errors[index] = message[1], message[2]
                now = time.perf_counter()
                total = sum(progress.values())
                if params.progress and now - last_time >= PROGRESS_INTERVAL * 0.9:
                    rate = (total - last_total) / (now - last_time)
                    sys.stderr.write(
                        _progress_line(now - begin, params.warmup, rate, sum(errors.values()))
                    )
                    sys.stderr.flush()
                    last_total, last_time = total, now
            elif kind == "result":
                results[index] = message[1]
                del open_pipes[index]
            else:  # "failed"
                failures.append(f"generator process {index}: {message[1]}")
                del open_pipes[index]
                if ready < len(pipes):
                    for p in open_pipes.values():
                        p.send("stop")
    if failures:
        raise GeneratorFailed("; ".join(failures))
    return [results[i] for i in sorted(results)]


# --------------------------------------------------------------------------- report


def _merge(params: BenchParams, parts: list[dict[str, Any]]) -> dict[str, Any]:
    histogram = Histogram()
    for part in parts:
        histogram.merge(Histogram({int(k): v for k, v in part["histogram"].items()}))
    frames = sum(p["frames"] for p in parts)
    # Each process measured its own window (they start together); rates add up.
    frames_per_s = sum(p["frames"] / p["window"] for p in parts if p["window"] > 0)
    window = max((p["window"] for p in parts), default=0.0)
    frame_size = parts[0]["frame_size"] if parts else 0
    messages = [m for p in parts for m in p["messages"]][:MAX_MESSAGES]
    errors = sum(p["errors"] for p in parts)
    loadgen_cpu = sum(p["loadgen_cpu_s"] for p in parts)
    server_cpu = parts[0]["server_cpu_s"] if parts else None
    machine = parts[0]["machine_busy_s"] if parts else None
    # Utilisations need a window long enough to mean something: a run that
    # ended early because every connection failed has none worth reporting.
    busy_window = window if window >= MIN_BUSY_WINDOW else 0.0
    other = None
    if machine is not None and busy_window:
        # Whatever else ran on the machine in the window: the noise figure.
        other = max(0.0, (machine - loadgen_cpu - (server_cpu or 0.0)) / busy_window)

    def ms(q: float) -> float | None:
        value = histogram.percentile(q)
        return None if value is None else round(value / 1e6, 4)

    mib = 1024.0 * 1024.0
    report: dict[str, Any] = {
        "host": params.host,
        "port": params.port,
        "connections": params.connections,
        "connected": sum(p["connected"] for p in parts),
        "depth": params.depth,
        "size": params.size,
        "framing": framing_text(parse_framing(params.framing)) or params.framing,
        "protocol": params.protocol,
        "message_type": params.message_type if params.protocol == "router" else None,
        "processes": len(parts),
        "loop": resolve_loop(params.loop),
        "tls": _merge_tls(parts),
        "warmup_s": params.warmup,
        "duration_s": round(window, 4),
        "frames": frames,
        "frames_per_s": round(frames_per_s, 1),
        "mib_per_s": round(frames_per_s * params.size / mib, 3),
        "wire_mib_per_s": round(frames_per_s * frame_size / mib, 3),
        "latency_ms": {"p50": ms(50), "p99": ms(99), "p99.9": ms(99.9), "max": ms(100)},
        "errors": errors,
        "error_messages": messages,
        "drains": sum(p.get("drains", 0) for p in parts),
        "loadgen_cpu_s": round(loadgen_cpu, 4),
        "loadgen_cpu_us_per_frame": round(loadgen_cpu / frames * 1e6, 4) if frames else None,
        "loadgen_cpu_util": round(loadgen_cpu / busy_window, 3) if busy_window else None,
        "server_pid": params.server_pid,
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 3),
        "server_cpu_us_per_frame": (
            round(server_cpu / frames * 1e6, 4) if server_cpu is not None and frames else None
        ),
        "server_cpu_util": (
            round(server_cpu / busy_window, 3) if server_cpu is not None and busy_window else None
        ),
        "other_cpu_util": None if other is None else round(other, 3),
    }
    return report


def _merge_tls(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The TLS session of the report: a process's that connected, else the first's."""
    sessions = [p["tls"] for p in parts if p.get("tls") is not None]
    connected = [s for s in sessions if s["version"] is not None]
    chosen: dict[str, Any] | None = (connected or sessions or [None])[0]
    return chosen


def _tls_text(tls: dict[str, Any] | None) -> str:
    """``, TLSv1.3 CIPHER (server NOT verified)`` for the summary's first line."""
    if tls is None:
        return ""
    session = " ".join(part for part in (tls["version"] or "TLS", tls["cipher"]) if part)
    notes = ["server verified" if tls["verified"] else "server NOT verified"]
    if tls["client_certificate"]:
        notes.append("client certificate")
    return f", {session} ({', '.join(notes)})"


def _format(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]

    def fmt_ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} ms"

    protocol = ""
    if report["protocol"] == "router":
        protocol = f" router type {report['message_type']},"
    lines = [
        f"fastnet bench {report['host']}:{report['port']}: {report['connected']}/"
        f"{report['connections']} connections x depth {report['depth']} x "
        f"{report['size']} B, {report['framing']},{protocol} {report['processes']} process(es), "
        f"{report['loop']}{_tls_text(report['tls'])}",
        f"  measured     {report['duration_s']:.2f} s after {report['warmup_s']:g} s warmup",
        f"  frames/s     {report['frames_per_s']:,.0f}   ({report['frames']:,} frames)",
        f"  MiB/s        {report['mib_per_s']:,.2f} payload each way "
        f"({report['wire_mib_per_s']:,.2f} on the wire)",
        f"  latency      p50 {fmt_ms(lat['p50'])}   p99 {fmt_ms(lat['p99'])}   "
        f"p99.9 {fmt_ms(lat['p99.9'])}   max {fmt_ms(lat['max'])}",
        f"  errors       {report['errors']}",
    ]
    lines += [f"    {m}" for m in report["error_messages"]]
    if report["drains"]:
        lines.append(f"  drains       {report['drains']} (connections the server drained)")
    if report["loadgen_cpu_util"] is not None:
        lines.append(
            f"  generator    {report['loadgen_cpu_util']:.2f} CPU cores"
            + (
                f", {report['loadgen_cpu_us_per_frame']:.3f} us/frame"
                if report["loadgen_cpu_us_per_frame"]
                else ""
            )
        )
    if report["server_cpu_s"] is not None:
        per_frame = report["server_cpu_us_per_frame"]
        lines.append(
            f"  server       {report['server_cpu_util']:.2f} CPU cores"
            + (f", {per_frame:.3f} us/frame" if per_frame is not None else "")
            + f" (pid {report['server_pid']})"
        )
    if report["other_cpu_util"] is not None:
        lines.append(f"  other load   {report['other_cpu_util']:.2f} CPU cores (everything else)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def bench(params: BenchParams) -> dict[str, Any]:
    """Run the load described by ``params`` and return the report as a dict.

    Returns:
        The same object ``--json`` prints: frames, frames_per_s, mib_per_s,
        latency_ms (p50, p99, p99.9, max), errors, error_messages, and the
        generator's and (with ``server_pid``) the server's CPU use; with
        ``tls``, the session (version, cipher, whether the server was verified);
        protocol, message_type (router only) and drains (router drain
        messages received, not errors).

    Raises:
        ValueError: parameters out of range, or a TLS option or file that
            cannot be used (``fastnet.tls.TLSConfigError`` names the file).
        GeneratorFailed: a generator process failed.
    """
    if params.connections < 1:
        raise ValueError("--connections must be at least 1")
    if params.processes < 1:
        raise ValueError("--processes must be at least 1")
    if params.duration <= 0 or params.warmup < 0:
        raise ValueError("--duration must be positive and --warmup not negative")
    # Validate the loop, protocol, framing and size here, before any process starts.
    parse_loop(params.loop)
    make_ring(params, 1)
    tls_context(params)  # the files are checked here too, before any process starts
    processes = min(params.processes, params.connections)
    if processes > 1:
        params = BenchParams(**{**asdict(params), "processes": processes})
        parts = _run_processes(params)
    else:
        parts = [_run_process(params, None)]
    if params.progress:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
    return _merge(params, parts)


def run(args: argparse.Namespace) -> int:
    """Run ``fastnet bench`` from parsed arguments; return the exit status.

    Returns:
        0 when frames were echoed and every one verified; 1 on any error
        (a wrong echo, a lost connection, a refused connection); 2 on bad
        parameters.
    """
    params = BenchParams(
        host=args.host,
        port=args.port,
        connections=args.connections,
        depth=args.depth,
        size=args.size,
        duration=args.duration,
        warmup=args.warmup,
        framing=args.framing,
        loop=args.loop,
        server_pid=args.server_pid,
        processes=args.processes,
        progress=sys.stderr.isatty(),
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        protocol=args.protocol,
        message_type=1 if args.message_type is None else args.message_type,
    )
    try:
        if args.message_type is not None and args.protocol != "router":
            raise ValueError("--message-type needs --protocol router")
        report = bench(params)
    except ValueError as exc:  # parameters out of range, a bad framing, loop or TLS file
        print(f"fastnet bench: error: {exc}", file=sys.stderr)
        return 2
    except GeneratorFailed as exc:
        print(f"fastnet bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfastnet bench: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format(report))
    if report["errors"] or not report["frames"]:
        if not args.json and not report["frames"] and not report["errors"]:
            print("fastnet bench: no frame was echoed", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastnet.loadgen``: the same as ``fastnet bench``."""
    parser = ArgumentParser(
        prog="python -m fastnet.loadgen",
        description="Drive a framed echo server and verify every echoed byte.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
