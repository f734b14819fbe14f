"""Per-peer limits and overload protection: ``Limits``, and the bookkeeping behind it.

``Server(..., limits=Limits(...))`` turns on any of three independent guards:

- **Per peer** (a client address: the accept-time address, or the PROXY
  header's when the PROXY protocol is on; IPv6 addresses grouped by their
  /64, since one host commonly owns a whole /64, IPv4 addresses one by
  one): a token bucket on *new connections* per second (``conn_rate``,
  ``conn_burst``) and a cap on *concurrent* connections
  (``conns_per_peer``). A connection over either is closed at once, with
  no reply byte, and counted by cause (``rate``, ``concurrency``).
- **Per connection**: a token bucket on *frames* per second
  (``frame_rate``, ``frame_burst``). Over it, reading pauses until the
  bucket has refilled (backpressure, not a disconnect: the peer's bytes
  wait in the kernel, and TCP slows the sender down). The frames of the
  read that went over are still delivered; the debt they leave is paid by
  the pause, so the long-run rate is ``frame_rate``.
- **Process-wide overload**: above ``overload_high`` bytes buffered by all
  of the server's connections together, the listener stops accepting until
  the total is back at or under ``overload_low`` (hysteresis); connections
  arriving meanwhile wait in the kernel's backlog, as they do at
  ``max_connections``. A socket accepted just as an episode began is closed
  (cause ``overload``).

Why buffered bytes and not RSS for the overload mark: they are what fastnet
controls and what a misbehaving peer grows (replies a client does not read,
frames a handler has not taken), they are summed on a timer at no cost to
the per-read path (one look per connection per tick: the out queue, the
transport's write buffer, the inbox), and they fall as soon as the cause
goes away. RSS measures the allocator as much as the server: freed memory
is often not returned to the system, so RSS stays high after the load has
gone, and an RSS mark would keep the listener closed for nothing (or, set
high enough to avoid that, react late). RSS remains the right thing for an
external supervisor to watch.

Strategy: one ``PeerLimiter`` per server. The connection-rate buckets live
in an LRU table bounded by ``max_peers`` entries (a scan from many
addresses evicts the oldest buckets, counted; it cannot grow memory
without bound). The concurrency counts live apart, in a dict holding only
peers with connections open, so it is bounded by the open connections
themselves (``max_connections``): evicting a peer's rate bucket never
touches its count, which cannot be lost while open nor go negative.
Everything here is O(1) per connection, nothing per read.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = [
    "CAUSES",
    "DEFAULT_MAX_PEERS",
    "DEFAULT_OVERLOAD_INTERVAL",
    "Limits",
    "OverloadGate",
    "PeerLimiter",
    "peer_key",
]

# Rejection causes (the ``cause`` label of fastnet_connections_rejected_total).
CAUSES = ("rate", "concurrency", "overload")

# Peers whose connection-rate bucket is remembered. A bucket is a key and
# two floats in an OrderedDict (about 200 bytes), so 65,536 peers cost about
# 13 MB at most; a scan from more addresses than that evicts the oldest
# buckets (an evicted peer starts again with a full bucket). A guess sized
# for a busy public listener; raise it with the memory to spare.
DEFAULT_MAX_PEERS = 65536

# Seconds between two sums of the buffered bytes (the overload watch). The
# sum costs about a microsecond per open connection, so 4 a second over
# 10,000 connections is about 4% of a core at worst; a server growing its
# buffers by 100 MB/s overshoots the mark by at most 25 MB.
DEFAULT_OVERLOAD_INTERVAL = 0.25


def _burst(rate: float | None, burst: int | None) -> int | None:
    # A bucket holds a second's worth by default (at least one token).
    if rate is None:
        return None
    return burst if burst is not None else max(1, math.ceil(rate))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a server allows each peer, each connection, and all of them together.

    Every limit is off (None) unless given.

    Args:
        conn_rate: new connections per second a peer may open (the token
            bucket's refill rate).
        conn_burst: connections a peer may open at once before ``conn_rate``
            applies (the bucket's size); a second's worth by default.
        conns_per_peer: connections a peer may have open at once.
        frame_rate: frames per second read from one connection; over it,
            reading pauses (backpressure) until the bucket has refilled.
        frame_burst: frames read at once before ``frame_rate`` applies; a
            second's worth by default.
        overload_high: buffered bytes (out queues, transport write buffers
            and inboxes of all connections) above which the listener stops
            accepting.
        overload_low: buffered bytes at or under which it accepts again;
            half of ``overload_high`` by default.
        overload_interval: seconds between two sums of the buffered bytes.
        max_peers: peers whose connection rate is tracked (an LRU table).
        ipv6_prefix: IPv6 peers are grouped by this prefix (/64).

    Raises:
        ValueError: a value out of range, or ``overload_low`` above
            ``overload_high``.
    """

    conn_rate: float | None = None
    conn_burst: int | None = None
    conns_per_peer: int | None = None
    frame_rate: float | None = None
    frame_burst: int | None = None
    overload_high: int | None = None
    overload_low: int | None = None
    overload_interval: float = DEFAULT_OVERLOAD_INTERVAL
    max_peers: int = DEFAULT_MAX_PEERS
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        for name in ("conn_rate", "frame_rate"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of per second, got {value}")
        for name in ("conn_burst", "conns_per_peer", "frame_burst", "overload_high"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.conn_burst is not None and self.conn_rate is None:
            raise ValueError("conn_burst needs conn_rate")
        if self.frame_burst is not None and self.frame_rate is None:
            raise ValueError("frame_burst needs frame_rate")
        if self.overload_low is not None:
            if self.overload_high is None:
                raise ValueError("overload_low needs overload_high")
            if not 0 <= self.overload_low <= self.overload_high:
                raise ValueError(
                    f"overload_low must be between 0 and overload_high ({self.overload_high}), "
                    f"got {self.overload_low}"
                )
        if not self.overload_interval > 0:
            raise ValueError(f"overload_interval must be positive, got {self.overload_interval}")
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be at least 1, got {self.max_peers}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 0 to 128, got {self.ipv6_prefix}")

    @property
    def per_peer(self) -> bool:
        """True if a per-peer limit (connection rate or concurrency) is on."""
        return self.conn_rate is not None or self.conns_per_peer is not None

    @property
    def conn_bucket(self) -> int | None:
        """The connection bucket's size in effect (``conn_burst`` or its default)."""
        return _burst(self.conn_rate, self.conn_burst)

    @property
    def frame_bucket(self) -> int | None:
        """The frame bucket's size in effect (``frame_burst`` or its default)."""
        return _burst(self.frame_rate, self.frame_burst)

    @property
    def overload_resume(self) -> int | None:
        """The low mark in effect (``overload_low``, or half of ``overload_high``)."""
        if self.overload_high is None:
            return None
        return self.overload_low if self.overload_low is not None else self.overload_high // 2


def peer_key(address: Any, ipv6_prefix: int = 64) -> str | None:
    """The key a peer's limits are kept under, or None for a peer that is not limited.

    An IPv4 address is its own key (``"192.0.2.7"``); an IPv6 address is
    keyed by its network of ``ipv6_prefix`` bits (``"2001:db8:1:2::/64"``),
    its zone (``%eth0``) dropped; an IPv4-mapped IPv6 address
    (``::ffff:192.0.2.7``) is keyed as the IPv4 address. Anything else (a
    Unix-socket peer, a PROXY ``LOCAL`` connection without an address) gives
    None.
    """
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    try:
        ip = ipaddress.ip_address(str(address[0]).partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    drop = 128 - ipv6_prefix
    network = ipaddress.IPv6Address(int(ip) >> drop << drop)
    return f"{network}/{ipv6_prefix}"


class PeerLimiter:
    """The per-peer bookkeeping of one server: connection-rate buckets and open counts.

    Args:
        limits: the ``Limits`` (its ``conn_rate``, ``conn_burst``,
            ``conns_per_peer`` and ``max_peers``).
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).

    Attributes:
        evictions: rate buckets dropped from the full table (oldest first).
    """

    __slots__ = (
        "_buckets",
        "_burst",
        "_cap",
        "_clock",
        "_max_peers",
        "_open",
        "_rate",
        "evictions",
    )

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = limits.conn_rate
        bucket = limits.conn_bucket
        self._burst = float(bucket) if bucket is not None else 0.0
        self._cap = limits.conns_per_peer
        self._max_peers = limits.max_peers
        self._clock = clock
        # key -> [tokens, time of the last refill], least recently seen first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # key -> connections open (only peers with at least one; only with a cap).
        self._open: dict[str, int] = {}
        self.evictions = 0

    @property
    def peers(self) -> int:
        """Peers in the rate table (at most ``max_peers``)."""
        return len(self._buckets)

    def open_connections(self, key: str) -> int:
        """Connections counted open for ``key`` (with ``conns_per_peer`` on; else 0)."""
        return self._open.get(key, 0)

    def admit(self, key: str) -> str | None:
        """Take a new connection from ``key``: None if admitted, else the cause refusing it.

        An admitted connection is counted open (with ``conns_per_peer``)
        until ``release(key)``; a refused one takes no token and is not
        counted.
        """
        cap = self._cap
        if cap is not None and self._open.get(key, 0) >= cap:
            return "concurrency"
        rate = self._rate
        if rate is not None:
            now = self._clock()
            buckets = self._buckets
            bucket = buckets.get(key)
            if bucket is None:
                tokens = self._burst
                bucket = buckets[key] = [tokens, now]
                if len(buckets) > self._max_peers:
                    buckets.popitem(last=False)  # the least recently seen peer
                    self.evictions += 1
            else:
                buckets.move_to_end(key)
                tokens = min(self._burst, bucket[0] + (now - bucket[1]) * rate)
                bucket[1] = now
            if tokens < 1.0:
                bucket[0] = tokens
                return "rate"
            bucket[0] = tokens - 1.0
        if cap is not None:
            self._open[key] = self._open.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        """A connection ``admit(key)`` admitted has closed (call once per admitted connection)."""
        if self._cap is None:
            return
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)  # never below 0, and gone when none is open


class OverloadGate:
    """The overload watermarks with hysteresis: ``update(buffered)`` says when the state flips.

    Args:
        high: the mark above which the server is overloaded.
        low: the mark under which it no longer is (``low <= high``).
    """

    __slots__ = ("buffered", "high", "low", "overloaded")

    def __init__(self, high: int, low: int) -> None:
        self.high = high
        self.low = low
        self.overloaded = False
        self.buffered = 0  # the last sum

    def update(self, buffered: int) -> bool:
        """Record the latest sum; True if the state changed (see ``overloaded``)."""
        self.buffered = buffered
        if not self.overloaded and buffered > self.high:
            self.overloaded = True
            return True
        if self.overloaded and buffered <= self.low:
            self.overloaded = False
            return True
        return False
