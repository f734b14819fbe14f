"""Prometheus metrics for fastnet servers, read at scrape time; event hooks.

Nothing here runs per frame. The counters are the integers the connection
core and the server already keep for ``stats()``; the two per-read
histograms (frames per read, handler time) are bucket arrays the core fills
with one increment per read (``ReadStats``, in C in the extension), only
when metrics are on; connection duration and TLS handshake time are
observed once per connection (``Buckets``). ``FastnetCollector`` turns them
into metric families when Prometheus scrapes: prometheus_client's
``Collector`` interface, not a ``Counter.inc()`` per event.

Use::

    server = fastnet.Server(handler, metrics=True)           # prometheus_client.REGISTRY
    server = fastnet.Server(handler, metrics=my_registry)    # beside your own metrics

(``pip install 'fastnet[metrics]'``.) Several servers may share a registry:
each series carries a ``listener`` label (the server's address), so the
cardinality is the number of listeners, never of peers.

Across worker processes (the workers issue), each worker's ``snapshot()``
is plain data (integers and bucket counts) that a supervisor can sum and
expose: ``FastnetCollector.from_snapshots`` does that, so one scrape of the
supervisor gives the totals with no shared-memory files.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import ssl
import sys
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ._tunables import BATCH_BOUNDS, HANDLER_SECONDS_BOUNDS
from .errors import FrameError, FrameTooLarge, IncompleteFrame
from .limits import CAUSES as LIMIT_CAUSES
from .proxy import CAUSES as PROXY_CAUSES

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "CONNECTION_SECONDS_BOUNDS",
    "HANDSHAKE_SECONDS_BOUNDS",
    "Buckets",
    "CloseInfo",
    "FastnetCollector",
    "Hooks",
    "ServerMetrics",
    "accept_error_kind",
    "frame_error_kind",
    "handshake_error_cause",
    "merge_snapshots",
    "register",
    "snapshot",
]

logger = logging.getLogger("fastnet")

# Connection lifetimes: 1 ms to an hour and more.
CONNECTION_SECONDS_BOUNDS = (
    0.001,
    0.01,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
# TLS handshakes: 0.5 ms (loopback, resumed) to the 10 s timeout.
HANDSHAKE_SECONDS_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0)


class Buckets:
    """A histogram kept as bucket counts (not cumulative; the last for +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def frame_error_kind(exc: FrameError) -> str:
    """The ``kind`` label of a framing error: too_large, line_too_long, incomplete, malformed."""
    if isinstance(exc, FrameTooLarge):
        return "line_too_long" if "line" in str(exc) else "too_large"
    if isinstance(exc, IncompleteFrame):
        return "incomplete"
    return "malformed"


def accept_error_kind(exc: OSError) -> str:
    """The ``errno`` label of an accept error: its symbolic name (a small, fixed set)."""
    return errno.errorcode.get(exc.errno or 0, "other")


_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"}
)


def handshake_error_cause(exc: BaseException) -> str:
    """The ``cause`` label of a failed TLS handshake.

    One of not_tls, certificate, protocol, reset, other.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in _NOT_TLS:
            return "not_tls"
        if "CERTIFICATE" in reason or "CERT" in reason:
            return "certificate"
        return "protocol"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "reset"
    return "other"


@dataclasses.dataclass(frozen=True)
class CloseInfo:
    """What ``Hooks.on_close`` receives about a connection that has closed.

    ``reason`` is one of:

    - ``closed``: the handler ended: it returned, or saw the end of its input
      (the peer closed, ``close()``, the server's shutdown).
    - ``reset``: the socket failed (a reset, mostly; counted in ``resets``).
    - ``handler_error``: the handler, or a task it spawned, raised.
    - ``frame_error``: the peer sent bytes that are not a frame.
    - ``idle_timeout``: closed by ``idle_timeout``.
    - ``frame_timeout``: a frame did not arrive whole within ``frame_timeout``.
    - ``drain_timeout``: still open when the shutdown's ``drain_timeout``
      ended; aborted.
    - ``error``: supervising the connection failed (a bug in fastnet, logged
      with its traceback); aborted.
    """

    peer: Any
    duration: float
    """Seconds from set-up (after the TLS handshake) to close."""
    bytes_in: int
    bytes_out: int
    frames_in: int
    frames_out: int
    reason: str
    """Why it closed: one of the reasons listed above."""


@dataclasses.dataclass
class Hooks:
    """Optional callables the server calls on connection events (aiohttp's TraceConfig idea).

    Each is called synchronously on the event loop, once per event (never
    per frame): keep it short, or hand the work to a task. An exception in
    a hook is logged and otherwise ignored. A hook left None costs nothing.

    - ``on_open(conn)``: a connection is set up (after its TLS handshake).
    - ``on_close(conn, info)``: it closed; ``info`` is a ``CloseInfo``.
    - ``on_handler_error(conn, exc)``: its handler (or a spawned task) raised.
    - ``on_frame_error(conn, exc)``: its peer sent bytes that are not a frame.
    - ``on_tls_handshake(conn, seconds)``: a TLS handshake completed.
    - ``on_tls_error(peer, cause, exc)``: a TLS handshake failed or timed out
      (``cause`` as the ``tls_handshake_errors`` label, or ``timeout``).
    """

    on_open: Callable[[Any], object] | None = None
    on_close: Callable[[Any, CloseInfo], object] | None = None
    on_handler_error: Callable[[Any, BaseException], object] | None = None
    on_frame_error: Callable[[Any, FrameError], object] | None = None
    on_tls_handshake: Callable[[Any, float], object] | None = None
    on_tls_error: Callable[[Any, str, BaseException | None], object] | None = None

    def call(self, name: str, *args: Any) -> None:
        """Call hook ``name`` if set; log (never raise) what it raises."""
        hook = getattr(self, name)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            logger.exception("the %s hook raised; ignored", name)


class ServerMetrics:
    """What a server with metrics on keeps beyond ``stats()``: the labelled counters and
    the per-connection histograms. The per-read histograms live in ``read_stats``
    (the core's ``ReadStats``), set when the first connection is made."""

    __slots__ = (
        "accept_errors",
        "connection_seconds",
        "frame_errors",
        "handshake_seconds",
        "proxy_errors",
        "read_stats",
        "tls_errors",
    )

    def __init__(self) -> None:
        self.read_stats: Any = None
        self.connection_seconds = Buckets(CONNECTION_SECONDS_BOUNDS)
        self.handshake_seconds = Buckets(HANDSHAKE_SECONDS_BOUNDS)
        self.frame_errors: dict[str, int] = {}
        self.accept_errors: dict[str, int] = {}
        self.tls_errors: dict[str, int] = {}
        self.proxy_errors: dict[str, int] = {}  # rejected PROXY headers, by cause

    @staticmethod
    def count(table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


# ----------------------------------------------------------------- exporting


def _require_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise RuntimeError(
            "metrics need prometheus_client: pip install 'fastnet[metrics]'"
        ) from None
    return prometheus_client


def snapshot(server: Any) -> dict[str, Any]:
    """One server's metrics as plain data (for the collector, and for worker processes)."""
    stats = server.stats()
    m: ServerMetrics | None = server.metrics
    data: dict[str, Any] = {"listener": server.address, "stats": stats}
    data["draining"] = bool(server.draining)
    if m is None:
        return data
    data["handler_events"] = server.handler_stats()
    data["frame_errors"] = dict(m.frame_errors)
    data["accept_errors"] = dict(m.accept_errors)
    data["tls_errors"] = dict(m.tls_errors)
    data["proxy_errors"] = dict(m.proxy_errors)
    data["connection_seconds"] = (list(m.connection_seconds.counts), m.connection_seconds.sum)
    data["handshake_seconds"] = (list(m.handshake_seconds.counts), m.handshake_seconds.sum)
    if m.read_stats is not None:
        batches, frames, handler, seconds = m.read_stats.snapshot()
    else:
        batches = [0] * (len(BATCH_BOUNDS) + 1)
        frames = 0
        handler = [0] * (len(HANDLER_SECONDS_BOUNDS) + 1)
        seconds = 0.0
    data["frames_per_read"] = (batches, frames)
    data["handler_seconds"] = (handler, seconds)
    return data


def merge_snapshots(snaps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sum snapshots of the same listener (one per worker process): counters, labelled
    counts and histogram buckets add up; ``draining`` is true if any worker drains."""
    merged: dict[str, dict[str, Any]] = {}
    for snap in snaps:
        into = merged.get(snap["listener"])
        if into is None:
            merged[snap["listener"]] = _copy_snapshot(snap)
            continue
        for key, value in snap["stats"].items():
            into["stats"][key] = into["stats"].get(key, 0) + value
        into["draining"] = into["draining"] or snap["draining"]
        for table in _TABLES:
            if table in snap:
                counts = into.setdefault(table, {})
                for key, value in snap[table].items():
                    counts[key] = counts.get(key, 0) + value
        for hist in (
            "connection_seconds",
            "handshake_seconds",
            "frames_per_read",
            "handler_seconds",
        ):
            if hist not in snap:
                continue
            if hist not in into:
                into[hist] = (list(snap[hist][0]), snap[hist][1])
                continue
            counts, total = into[hist]
            into[hist] = (
                [a + b for a, b in zip(counts, snap[hist][0], strict=True)],
                total + snap[hist][1],
            )
    return [merged[key] for key in sorted(merged)]


# The labelled counts of a snapshot (dicts by label value).
_TABLES = ("frame_errors", "accept_errors", "tls_errors", "proxy_errors", "handler_events")

# The label values of each labelled counter known in advance (accept errors
# are by errno: the capacity ones are listed, the rest appear when they happen).
_KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    "frame_errors": ("incomplete", "line_too_long", "malformed", "too_large"),
    "tls_errors": ("certificate", "not_tls", "other", "protocol", "reset"),
    "proxy_errors": PROXY_CAUSES,
    "accept_errors": ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"),
}


def _copy_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    copy = dict(snap)
    copy["stats"] = dict(snap["stats"])
    for table in _TABLES:
        if table in snap:
            copy[table] = dict(snap[table])
    return copy


# (name, stats key, help): counters straight from stats().
_COUNTERS = (
    ("connections_accepted", "accepted", "Connections accepted."),
    ("connections_closed", "closed", "Connections closed."),
    ("connections_reset", "resets", "Connections that ended in a socket error (a reset, mostly)."),
    ("idle_timeouts", "idle_timeouts", "Connections closed after the idle timeout."),
    ("frame_timeouts", "frame_timeouts", "Connections closed after the frame timeout."),
    ("frames_received", "frames_in", "Frames received."),
    ("frames_sent", "frames_out", "Frames sent."),
    ("bytes_received", "bytes_in", "Bytes received (framing included)."),
    ("bytes_sent", "bytes_out", "Bytes sent (framing included)."),
    ("writes", "writes", "Transport writes (frames_sent / writes is the coalescing factor)."),
    ("handler_errors", "handler_errors", "Handler exceptions (each closed its connection)."),
    ("lines_skipped", "lines_skipped", "Over-long lines skipped (Lines(on_too_long='skip'))."),
    ("tls_handshakes", "tls_handshakes", "TLS handshakes completed."),
    ("tls_handshake_timeouts", "tls_handshake_timeouts", "TLS handshakes that timed out."),
    (
        "proxy_header_timeouts",
        "proxy_header_timeouts",
        "Connections closed for want of a complete PROXY header within the timeout.",
    ),
    (
        "peer_table_evictions",
        "peer_table_evictions",
        "Peers' connection-rate buckets evicted from the full peer table (Limits.max_peers).",
    ),
    (
        "overload_episodes",
        "overload_episodes",
        "Times the buffered bytes went over Limits.overload_high (accepting paused).",
    ),
)


class FastnetCollector:
    """A prometheus_client collector over fastnet servers, read at scrape time.

    ``register(server, registry)`` adds a server to the registry's one
    fastnet collector (made on first use).
    """

    def __init__(self) -> None:
        # Weak: a server that is gone (garbage) leaves the scrape with it.
        self._servers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._snapshots: Callable[[], list[dict[str, Any]]] | None = None

    def add(self, server: Any) -> None:
        self._servers.add(server)

    @classmethod
    def from_snapshots(cls, source: Callable[[], list[dict[str, Any]]]) -> FastnetCollector:
        """A collector over snapshots from elsewhere (worker processes): ``source()`` gives them."""
        collector = cls()
        collector._snapshots = source
        return collector

    def describe(self) -> list[Any]:
        return []  # no description at registration: the families depend on the servers

    def collect(self) -> Iterator[Any]:
        _require_prometheus()
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        if self._snapshots is not None:
            snaps = merge_snapshots(self._snapshots())
        else:
            snaps = sorted((snapshot(s) for s in list(self._servers)), key=lambda d: d["listener"])
        label = ["listener"]

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return CounterMetricFamily(f"fastnet_{name}", doc, labels=[*label, *labels])

        info = InfoMetricFamily("fastnet", "The fastnet build and event loop.")
        info.add_metric(
            [],
            {
                "version": _version(),
                "extension": "active" if _accelerated() else "inactive",
                "loop": _loop_name(),
                "python": sys.version.split()[0],
            },
        )
        yield info

        active = GaugeMetricFamily("fastnet_connections_active", "Connections open.", labels=label)
        draining = GaugeMetricFamily(
            "fastnet_draining", "1 from the moment a graceful drain begins.", labels=label
        )
        overloaded = GaugeMetricFamily(
            "fastnet_overloaded",
            "1 while accepting is paused because the buffered bytes are over the overload mark.",
            labels=label,
        )
        buffered = GaugeMetricFamily(
            "fastnet_buffered_bytes",
            "Bytes the open connections buffer (output queued or unsent, input not yet taken).",
            labels=label,
        )
        for snap in snaps:
            active.add_metric([snap["listener"]], snap["stats"]["active"])
            draining.add_metric([snap["listener"]], 1 if snap["draining"] else 0)
            overloaded.add_metric([snap["listener"]], 1 if snap["stats"].get("overloaded") else 0)
            buffered.add_metric([snap["listener"]], snap["stats"].get("buffered_bytes", 0))
        yield active
        yield draining
        yield overloaded
        yield buffered

        for name, key, doc in _COUNTERS:
            family = counter(name, doc)
            for snap in snaps:
                family.add_metric([snap["listener"]], snap["stats"][key])
            yield family

        rejected = counter("connections_rejected", "Connections refused, by cause.", ["cause"])
        accept_errors = counter("accept_errors", "accept(2) errors, by errno.", ["errno"])
        frame_errors = counter("frame_errors", "Framing errors, by kind.", ["kind"])
        tls_errors = counter("tls_handshake_errors", "Failed TLS handshakes, by cause.", ["cause"])
        proxy_errors = counter(
            "proxy_header_errors", "PROXY protocol headers rejected, by cause.", ["cause"]
        )
        handler_events = counter(
            "handler_events",
            "Events the handler counts (a Router: unknown_type, decode_errors, request_errors, "
            "internal_errors, deadline_exceeded, forbidden, malformed, suspended, held, pings, "
            "drains_sent).",
            ["event"],
        )
        for snap in snaps:
            where = snap["listener"]
            rejected.add_metric([where, "admission"], snap["stats"]["rejected"])
            untrusted = snap["stats"].get("proxy_untrusted", 0)
            rejected.add_metric([where, "untrusted_proxy"], untrusted)
            for cause in LIMIT_CAUSES:  # the limits (fastnet.limits), 0 until they act
                rejected.add_metric([where, cause], snap["stats"].get(f"rejected_{cause}", 0))
            for table, family in (
                ("accept_errors", accept_errors),
                ("frame_errors", frame_errors),
                ("tls_errors", tls_errors),
                ("proxy_errors", proxy_errors),
                ("handler_events", handler_events),
            ):
                # Every known label value is exported, 0 until it happens, so
                # rate() and alerts see a series from the first scrape.
                counts = dict.fromkeys(_KNOWN_LABELS.get(table, ()), 0)
                counts.update(snap.get(table, {}))
                for key, value in sorted(counts.items()):
                    family.add_metric([where, key], value)
        yield rejected
        yield accept_errors
        yield frame_errors
        yield tls_errors
        yield proxy_errors
        yield handler_events

        for name, key, bounds, doc in (
            (
                "handler_latency_seconds",
                "handler_seconds",
                HANDLER_SECONDS_BOUNDS,
                "Handler run time: a callback handler's call per batch; a task handler's time "
                "from its wake-up by a read to its next wait for input.",
            ),
            ("frames_per_read", "frames_per_read", BATCH_BOUNDS, "Frames delivered per read."),
            (
                "connection_duration_seconds",
                "connection_seconds",
                CONNECTION_SECONDS_BOUNDS,
                "Connection lifetimes, from set-up to close.",
            ),
            (
                "tls_handshake_duration_seconds",
                "handshake_seconds",
                HANDSHAKE_SECONDS_BOUNDS,
                "TLS handshake time, from accept to the handshake's end.",
            ),
        ):
            family = HistogramMetricFamily(f"fastnet_{name}", doc, labels=label)
            for snap in snaps:
                if key not in snap:
                    continue
                counts, total = snap[key]
                family.add_metric([snap["listener"]], _cumulative(bounds, counts), float(total))
            yield family


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, int]]:
    buckets = []
    running = 0
    for bound, count in zip([*map(_bound_text, bounds), "+Inf"], counts, strict=True):
        running += count
        buckets.append((bound, running))
    return buckets


def _bound_text(bound: float) -> str:
    return repr(float(bound))


def _version() -> str:
    from . import __version__

    return __version__


def _accelerated() -> bool:
    from .framing import ACCELERATED

    return ACCELERATED


def _loop_name() -> str:
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


_collectors: weakref.WeakKeyDictionary[Any, FastnetCollector] = weakref.WeakKeyDictionary()


def register(server: Any, registry: CollectorRegistry | None = None) -> FastnetCollector:
    """Expose ``server``'s metrics in ``registry`` (prometheus_client's global one by default).

    One fastnet collector per registry serves every server registered in it.

    Raises:
        RuntimeError: prometheus_client is not installed.
    """
    pc = _require_prometheus()
    if registry is None:
        registry = pc.REGISTRY
    collector = _collectors.get(registry)
    if collector is None:
        collector = FastnetCollector()
        registry.register(collector)
        _collectors[registry] = collector
    collector.add(server)
    return collector
