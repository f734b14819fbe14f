"""``Pool``: exclusive checkout of framed connections to one service, bounded and kept healthy.

    pool = fastnet.Pool(["10.0.0.1:7000", "10.0.0.2:7000"], framing=fastnet.LengthPrefixed())
    async with pool.acquire() as conn:       # a fastnet.Connection, this task's alone
        conn.send(request)
        reply = await conn.recv()
    await pool.close()

For plain framed protocols: one task at a time owns a connection, for a
request and its reply or any longer exchange. (Calls multiplexed over the
router's wire format are ``fastnet.Client``'s business.) asyncpg's pool is
the model for the checkout: the pool hands out the connection itself, and
keeps per connection a holder (``_Holder``) with what it knows of it.

Strategy:

- **Slots.** At most ``max_size`` connections exist: idle, checked out, or
  being opened. ``acquire`` takes an idle one (the most recently returned:
  the others age out through ``max_idle``), or has the pool open one while
  a slot is free, or waits in a FIFO line. A returned connection goes
  straight to the first waiter. A waiter that times out or is cancelled
  leaves the line; a connection handed to it in that same instant goes
  back to the pool, so no slot ever leaks.
- **Opening.** Connections are opened by the pool's own tasks, not in the
  acquiring task: an acquirer that gives up does not abandon a half-made
  connection, which goes to the next waiter or the idle set. Each new
  connection tries the endpoints round-robin, starting one further than
  the previous; an endpoint that fails (refused, unreachable, over
  ``connect_timeout``, TLS handshake failed) is skipped for the next. When
  all fail, the first waiter gets ``ConnectError`` at once instead of
  waiting out ``acquire_timeout``: a backend that is down fails fast.
- **Health.** A connection is handed out only if its lifecycle is still
  ``OPEN`` (the peer has not closed it, it did not break) and no frame
  arrived while it sat idle (a late reply would be read as the answer to
  the next request; a protocol whose server greets each new connection
  reads the greeting in ``init``). Each connection also has a task waiting for its
  close, so an idle connection whose server went away leaves the pool (and
  is re-made if ``min_size`` needs it) without waiting for an acquire.
- **Return.** On leaving ``async with pool.acquire()`` the connection goes
  back to the pool, unless: the block raised (any exception, cancellation
  included, except those named in ``acquire(keep_on=...)``: an exception
  may have cut an exchange in half, and a reply still on its way would
  answer the next user's request; the connection is aborted, as asyncpg
  discards a connection whose protocol state is unknown), the connection
  is closing or closed (the user's ``close()``, the peer, a failure), it
  outlived ``max_lifetime``, or the pool is closing. The first two are
  *discarded*, the third *retired*. Calls in flight are never cut: a
  connection past its lifetime is retired when it comes back.
- **Retirement and warmth.** A background task (started by ``start()`` or
  the first ``acquire``) retires idle connections past ``max_lifetime``,
  and those idle longer than ``max_idle`` while more than ``min_size``
  exist, and keeps ``min_size`` connections open, re-making them with
  jittered exponential backoff when they cannot be opened. ``acquire``
  never waits for it. It sleeps until the next deadline, not on a tick.
- **Timeouts** (see ``Pool``): ``acquire_timeout`` bounds the whole
  ``acquire``, ``connect_timeout`` each attempt to open a connection to one
  endpoint, on its own clock.
- **Close.** ``close()`` refuses new acquires, fails the waiters, closes
  idle connections, waits up to ``close_timeout`` for checked-out ones to
  come back, then aborts those still out.

Events, passed to ``on_event(name, **info)`` (every one names the
``endpoint`` it concerns, except ``exhausted`` and ``timeout``):

- ``connected``: a connection was opened (``endpoint``).
- ``connect_failed``: an attempt to open one failed (``endpoint``, ``error``).
- ``exhausted``: an acquire has to wait, ``max_size`` connections being in
  use or being opened (``in_use``, ``waiting``).
- ``timeout``: an acquire gave up after ``acquire_timeout`` (``waited``,
  ``waiting``).
- ``discarded``: a connection was closed as unusable (``reason``:
  ``"error"`` the block raised or ``release(discard=True)``, ``"closed"``
  it came back closing or closed, ``"peer_closed"`` its peer closed it or
  it broke while idle, ``"unexpected_frames"`` frames arrived while idle).
- ``retired``: a healthy connection was closed by policy (``reason``:
  ``"lifetime"`` or ``"idle"``; ``age`` in seconds).

A hook that raises is logged and otherwise ignored: it cannot break the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ._events import Events
from .connection import Connection, connect
from .errors import FastnetError
from .framing import Framing, LengthPrefixed
from .lifecycle import Lifecycle

if TYPE_CHECKING:
    import ssl as _ssl
    import types

__all__ = [
    "DEFAULT_ACQUIRE_TIMEOUT",
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_IDLE",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_MAX_SIZE",
    "EVENTS",
    "ConnectError",
    "ConnectTimeout",
    "Pool",
    "PoolClosedError",
    "PoolTimeout",
]

logger = logging.getLogger("fastnet.pool")

# As asyncpg's default max_size: enough concurrency to one backend for a
# typical service process, few enough not to crowd a server's connection
# limit when a fleet of clients scales out. A guess; tune per deployment.
DEFAULT_MAX_SIZE = 10
# Long enough to ride out a burst (callers queue rather than fail), short
# enough that a caller learns of a stuck pool before the usual upstream
# deadlines (30-60 s gateways) give up on it. Never infinite: asyncpg's
# acquire() waits forever by default, and a leaked connection then hangs
# every caller silently.
DEFAULT_ACQUIRE_TIMEOUT = 10.0
# A connect on a LAN takes milliseconds and a TLS handshake across regions
# a few hundred; 5 s covers a lost SYN (Linux retransmits it after 1 s, then
# 3 s) and still reports a dead host long before the kernel's own ~127 s.
DEFAULT_CONNECT_TIMEOUT = 5.0
# Rotating connections hourly spreads them again over endpoints that came
# back or were added, and bounds what a slow leak on either side can grow
# to; HikariCP's default (30 min) is of the same order.
DEFAULT_MAX_LIFETIME = 3600.0
# asyncpg's max_inactive_connection_lifetime; under the idle timeouts of
# common NATs and load balancers (AWS NAT gateway: 350 s), which drop idle
# flows without telling either end.
DEFAULT_MAX_IDLE = 300.0
# How long close() waits for checked-out connections: about one typical
# request's worth of patience, as a server's drain does.
DEFAULT_CLOSE_TIMEOUT = 10.0

# Each connection lives max_lifetime less up to this share of it, at random,
# so connections opened together (min_size at start) do not all retire and
# reconnect in the same instant (HikariCP subtracts up to 2.5%).
LIFETIME_JITTER = 0.05
# Backoff of the background re-making of min_size connections: rounds are
# at least 0.1 s apart (a server that accepts and closes at once must not
# get a reconnection storm); after n failed rounds in a row the wait is
# 0.1 * 2**n s capped at 5 s (a restarting server is back within a second
# or two; a long outage costs one attempt per endpoint every few seconds),
# each drawn between half and all of its value.
RECONNECT_BACKOFF_MIN = 0.1
RECONNECT_BACKOFF_MAX = 5.0
# After close_timeout, what closing sockets (a TLS close_notify exchange)
# may still take before they are aborted.
CLOSE_GRACE = 1.0

EVENTS = ("connected", "connect_failed", "exhausted", "timeout", "discarded", "retired")


class PoolTimeout(FastnetError, TimeoutError):
    """Raised by ``Pool.acquire`` when no connection came within ``acquire_timeout``."""


class ConnectError(FastnetError, ConnectionError):
    """Raised by ``Pool.acquire`` when a new connection could not be opened to any endpoint.

    Attributes:
        errors: ``(endpoint, exception)`` for each attempt, in order
            (``"host:port"``; ``ConnectTimeout`` for an attempt over
            ``connect_timeout``). The last one is also ``__cause__``.
    """

    def __init__(self, message: str, errors: Iterable[tuple[str, BaseException]] = ()) -> None:
        super().__init__(message)
        self.errors: list[tuple[str, BaseException]] = list(errors)


class ConnectTimeout(ConnectError, TimeoutError):
    """An attempt to connect (TCP and TLS handshake) took over ``connect_timeout``.

    ``Pool.acquire`` raises it (rather than ``ConnectError``) when every
    endpoint's attempt timed out.
    """


class PoolClosedError(FastnetError):
    """Raised by ``Pool.acquire`` once ``close()`` was called, and to its waiters then."""


class _Endpoint:
    __slots__ = ("address", "host", "port")

    def __init__(self, address: str, host: str, port: int) -> None:
        self.address = address  # "host:port", as events and errors name it
        self.host = host
        self.port = port


def _endpoint(value: str | tuple[str, int]) -> _Endpoint:
    if isinstance(value, str):
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ValueError(f"an endpoint is 'host:port' or (host, port), not {value!r}")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        port = int(port_text)
    else:
        host, port = value
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError(f"an endpoint is 'host:port' or (host, port), not {value!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in endpoint {value!r}")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _Endpoint(address, host, port)


class _Holder:
    """What the pool knows of one of its connections."""

    __slots__ = ("conn", "created", "endpoint", "expires", "frames_mark", "idle", "idle_since")

    def __init__(self, conn: Connection, endpoint: str, created: float, expires: float) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.created = created
        self.expires = expires  # loop time past which it is retired (inf: never)
        self.idle = False  # in the pool's idle deque
        self.idle_since = 0.0
        self.frames_mark = 0  # conn.frames_in when it was returned


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a positive number of seconds, not None (never forever)")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")


class Pool:
    """Connections to one service, each checked out by one task at a time.

    ``async with pool.acquire() as conn`` gives exclusive use of a
    ``fastnet.Connection``; leaving the block returns it, or discards it
    (see the module docstring for when). ``conn = await pool.acquire()``
    with a later ``pool.release(conn)`` does the same without a block.
    ``async with Pool(...) as pool`` starts the pool and closes it.

    Timeouts:
        ``acquire_timeout`` is the caller's bound on ``acquire()`` as a
        whole, from the call until a connection is in hand, whether the
        time goes to waiting in line for a slot, to the opening of a new
        connection, or both; ``PoolTimeout`` when it passes. It cannot be
        None or infinite: a leaked connection must surface as an error, not
        as callers hanging forever. ``connect_timeout`` bounds each attempt
        to open a connection to one endpoint (TCP connect, TLS handshake,
        ``init``) on its own clock, which starts when the attempt starts:
        the time an acquirer spent in line never shortens it (aiohttp's
        ``connect`` timeout included the wait for a pool slot, so a busy
        pool failed requests as connect timeouts with no connection being
        made; aiohttp#2648). An attempt over it fails with
        ``ConnectTimeout`` and the next endpoint is tried. Opening runs in
        the pool's task: if the acquirer's ``acquire_timeout`` passes during
        an attempt, the acquirer gets ``PoolTimeout`` on time and the
        attempt carries on, its connection going to the next waiter or
        the idle set. ``acquire`` thus raises ``PoolTimeout`` at
        ``acquire_timeout`` at the latest, or ``ConnectError`` sooner when
        every endpoint failed.

    Args:
        endpoints: the service's servers, ``"host:port"`` strings (IPv6 as
            ``"[::1]:7000"``) or ``(host, port)`` tuples; at least one.
        framing: the wire layout; ``LengthPrefixed()`` by default.
        ssl: an ``ssl.SSLContext`` for TLS (``fastnet.tls.client_context``).
        server_hostname: the name the servers' certificates must carry; by
            default each endpoint's host.
        min_size: connections kept open even when idle, re-made when they
            break (0 to ``max_size``).
        max_size: the most connections at once (at least 1).
        acquire_timeout: seconds an ``acquire`` may take in all.
        connect_timeout: seconds one attempt to connect to one endpoint may take.
        max_lifetime: seconds a connection is used for, less up to 5% at
            random; past it, it is retired when it comes back or while
            idle, never while checked out. None: no limit.
        max_idle: seconds a connection beyond ``min_size`` may stay idle
            before it is retired. None: no limit.
        close_timeout: seconds ``close()`` waits for checked-out connections.
        init: ``async def init(conn)``, run on each new connection before
            the pool uses it: read a server's greeting, authenticate, say
            hello. It is part of the attempt, within ``connect_timeout``; if
            it raises, the connection is aborted and the attempt failed.
        on_event: called as ``on_event(name, **info)`` on each state change
            (the module docstring lists them).
        metrics: a prometheus_client registry: the events are exported as
            ``fastnet_pool_events_total{event}``, and the pool's size as
            ``fastnet_pool_connections{state="idle"|"in_use"}``.

    Raises:
        ValueError: no endpoint, a malformed one, or a size or timeout out of range.
    """

    def __init__(
        self,
        endpoints: str | tuple[str, int] | Sequence[str | tuple[str, int]],
        *,
        framing: Framing | None = None,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        min_size: int = 0,
        max_size: int = DEFAULT_MAX_SIZE,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_lifetime: float | None = DEFAULT_MAX_LIFETIME,
        max_idle: float | None = DEFAULT_MAX_IDLE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        init: Callable[[Connection], Awaitable[object]] | None = None,
        on_event: Callable[..., Any] | None = None,
        metrics: Any = None,
    ) -> None:
        if isinstance(endpoints, str) or (
            isinstance(endpoints, tuple) and len(endpoints) == 2 and isinstance(endpoints[1], int)
        ):
            endpoints = [endpoints]
        self._endpoints = [_endpoint(ep) for ep in endpoints]
        if not self._endpoints:
            raise ValueError("a pool needs at least one endpoint")
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if not 0 <= min_size <= max_size:
            raise ValueError(f"min_size must be between 0 and max_size={max_size}, got {min_size}")
        _positive("acquire_timeout", acquire_timeout)
        _positive("connect_timeout", connect_timeout)
        _positive("max_lifetime", max_lifetime, allow_none=True)
        _positive("max_idle", max_idle, allow_none=True)
        if close_timeout is None or not (close_timeout >= 0 and math.isfinite(close_timeout)):
            raise ValueError(
                f"close_timeout must be a finite number of seconds, got {close_timeout!r}"
            )
        if init is not None and not callable(init):
            raise TypeError(f"init must be an async callable, not {type(init).__name__}")
        self._framing: Framing = LengthPrefixed() if framing is None else framing
        self._ssl = ssl
        self._server_hostname = server_hostname
        self.min_size = min_size
        self.max_size = max_size
        self.acquire_timeout = float(acquire_timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_lifetime = None if max_lifetime is None else float(max_lifetime)
        self.max_idle = None if max_idle is None else float(max_idle)
        self.close_timeout = float(close_timeout)
        self._init = init
        self._events = Events("pool", EVENTS, on_event)
        if metrics is not None:
            self._events.register(metrics, self._gauges)

        self._loop: asyncio.AbstractEventLoop | None = None  # bound on first use
        self._cursor = 0  # the endpoint the next connection tries first
        # Idle holders, most recently returned on the right (handed out
        # first); the left end holds the longest idle (retired first).
        self._idle: collections.deque[_Holder] = collections.deque()
        self._in_use: dict[int, _Holder] = {}  # id(conn) -> holder; handed out or granted
        self._connecting = 0  # connections being opened (each holds a slot)
        # Acquirers in line, FIFO; each future gets a holder (already counted
        # in _in_use) or an exception.
        self._waiters: collections.deque[asyncio.Future[_Holder]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()  # opening tasks
        self._watchers: dict[int, asyncio.Task[None]] = {}  # id(conn) -> its wait_closed task
        self._maintainer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the maintainer's sleep
        self._next_check = math.inf  # when the maintainer next looks at the idle set
        self._first_round: asyncio.Future[bool] | None = None  # the first min_size fill
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._all_returned: asyncio.Future[None] | None = None  # close() waits on it

        self._created = 0
        self._discarded = 0
        self._retired = 0
        self._timeouts = 0
        self._connect_failures = 0

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        endpoints = ",".join(ep.address for ep in self._endpoints)
        return (
            f"<fastnet.Pool {state} {endpoints} size={self._size}/{self.max_size} "
            f"in_use={len(self._in_use)} waiting={len(self._waiters)}>"
        )

    # ------------------------------------------------------------- public API

    def acquire(self, *, keep_on: tuple[type[BaseException], ...] = ()) -> _Acquire:
        """Check out a connection: ``async with pool.acquire() as conn``, or ``await``.

        As a context manager, leaving the block returns the connection to the
        pool, or discards it when the block raised an exception other than
        one of ``keep_on``'s types. Awaited, it returns the connection, to be
        given back with ``release``.

        Args:
            keep_on: exception types that leave the connection fit for reuse
                (raised where no exchange was under way, e.g. after the
                reply was read). Any other exception, cancellation included,
                discards the connection: it may have cut an exchange in half.

        Raises:
            PoolTimeout: no connection came within ``acquire_timeout``.
            ConnectError: a new connection was needed and no endpoint could
                be connected to (``ConnectTimeout`` if every attempt timed out).
            PoolClosedError: the pool is closed or closing.
        """
        return _Acquire(self, keep_on)

    def release(self, conn: Connection, *, discard: bool = False) -> None:
        """Give back a connection that ``await pool.acquire()`` returned.

        It goes to the next waiter or the idle set if it is healthy;
        otherwise, or with ``discard``, it is closed (aborted with
        ``discard``). Releasing after ``close()`` aborted the connection is
        allowed and does nothing.

        Raises:
            ValueError: ``conn`` is not checked out from this pool.
        """
        holder = self._in_use.pop(id(conn), None)
        if holder is None:
            if self._closing:
                return
            raise ValueError(f"{conn!r} is not checked out from this pool")
        self._returned(holder, discard)

    async def start(self) -> None:
        """Start the background task and wait for its first round of ``min_size`` connections.

        Optional: the first ``acquire`` starts the task too, without waiting.

        Raises:
            ConnectError: ``min_size`` is above 0 and not one connection
                could be opened (the task keeps trying, with backoff).
            PoolClosedError: the pool is closed.
        """
        if self._closing:
            raise PoolClosedError("the pool is closed")
        self._ensure_started()
        first = self._first_round
        assert first is not None
        made = await asyncio.shield(first)
        if self._closing:
            raise PoolClosedError("the pool was closed while starting")
        if not made:
            raise ConnectError(
                f"could not open any of the min_size={self.min_size} connections "
                f"to {', '.join(ep.address for ep in self._endpoints)}"
            )

    async def close(self) -> None:
        """Drain and close the pool. Idempotent; concurrent calls all wait for the end.

        New acquires raise ``PoolClosedError`` at once, and so do those
        waiting in line. Idle connections are closed; connections checked
        out are closed as they come back, and those not back within
        ``close_timeout`` are aborted (their users' next receive or send
        raises). Returns once every socket is closed (those that take over
        ``CLOSE_GRACE`` more seconds are aborted).
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        self._closing = True
        closed = self._closed = loop.create_future()
        try:
            await self._close(loop)
        finally:
            closed.set_result(None)

    def stats(self) -> dict[str, int]:
        """Counts, now and since the pool was made.

        Returns:
            ``size`` (open or being opened), ``idle``, ``in_use``,
            ``connecting``, ``waiting`` (acquires in line), and the totals
            ``created``, ``discarded``, ``retired``, ``timeouts`` (acquires
            that raised ``PoolTimeout``), ``connect_failures`` (failed
            attempts, one per endpoint tried).
        """
        return {
            "size": self._size,
            "idle": len(self._idle),
            "in_use": len(self._in_use),
            "connecting": self._connecting,
            "waiting": len(self._waiters),
            "created": self._created,
            "discarded": self._discarded,
            "retired": self._retired,
            "timeouts": self._timeouts,
            "connect_failures": self._connect_failures,
        }

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closing

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- acquire

    @property
    def _size(self) -> int:
        return len(self._idle) + len(self._in_use) + self._connecting

    async def _acquire(self) -> Connection:
        if self._closing:
            raise PoolClosedError("the pool is closed")
        loop = self._ensure_started()
        # The fast path: an idle connection, when nobody is in line before us.
        if not self._waiters:
            holder = self._pop_idle()
            if holder is not None:
                self._in_use[id(holder.conn)] = holder
                return holder.conn
        start = loop.time()
        deadline = start + self.acquire_timeout
        first = True
        while True:
            fut: asyncio.Future[_Holder] = loop.create_future()
            if first:
                self._waiters.append(fut)
                if self._size >= self.max_size and not self._idle:
                    self._event("exhausted", in_use=len(self._in_use), waiting=len(self._waiters))
            else:
                self._waiters.appendleft(fut)  # keep our place in line
            first = False
            timer = loop.call_at(deadline, self._expire, fut, start)
            self._dispatch()
            try:
                holder = await fut
            except asyncio.CancelledError:
                self._abandon(fut)
                raise
            finally:
                timer.cancel()
            # Granted: re-check, since a loop iteration passed since the grant.
            if self._usable(holder):
                return holder.conn
            del self._in_use[id(holder.conn)]
            self._discard(holder, self._unusable_reason(holder))

    def _expire(self, fut: asyncio.Future[_Holder], start: float) -> None:
        # The acquire's deadline: leave the line with PoolTimeout.
        if fut.done():
            return
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)
        self._timeouts += 1
        waited = self._loop.time() - start if self._loop is not None else self.acquire_timeout
        fut.set_exception(
            PoolTimeout(
                f"no connection within acquire_timeout={self.acquire_timeout} s: "
                f"{len(self._in_use)} in use and {self._connecting} being opened "
                f"of max_size={self.max_size}, {len(self._waiters)} other acquires waiting"
            )
        )
        self._event("timeout", waited=waited, waiting=len(self._waiters))

    def _abandon(self, fut: asyncio.Future[_Holder]) -> None:
        # The acquiring task was cancelled: leave the line, and give back a
        # connection granted in the same instant.
        if not fut.done() or fut.cancelled():
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            if not fut.done():
                fut.cancel()
            return
        if fut.exception() is None:
            holder = fut.result()
            if self._in_use.pop(id(holder.conn), None) is not None:
                self._returned(holder, False)

    def _dispatch(self) -> None:
        """Serve the line: idle connections to the first waiters, then open what the rest need."""
        waiters = self._waiters
        while waiters:
            if waiters[0].done():  # timed out or cancelled, not yet removed
                waiters.popleft()
                continue
            holder = self._pop_idle()
            if holder is None:
                break
            self._grant(waiters.popleft(), holder)
        if self._closing:
            return
        # Every waiter left in line needs a connection that is not there:
        # open as many as slots allow, counting those already being opened.
        # (Waiters that time out or are cancelled leave the line at once.)
        need = len(waiters) - self._connecting
        while need > 0 and self._size < self.max_size:
            self._start_connect(for_waiter=True)
            need -= 1

    def _grant(self, fut: asyncio.Future[_Holder], holder: _Holder) -> None:
        self._in_use[id(holder.conn)] = holder
        fut.set_result(holder)

    def _pop_idle(self) -> _Holder | None:
        # The most recently returned healthy connection; the unhealthy and
        # expired ones met on the way are closed.
        idle = self._idle
        while idle:
            holder = idle.pop()
            holder.idle = False
            if not self._usable(holder):
                self._discard(holder, self._unusable_reason(holder))
            elif self._loop is not None and self._loop.time() >= holder.expires:
                self._retire(holder, "lifetime")
            else:
                return holder
        return None

    @staticmethod
    def _usable(holder: _Holder) -> bool:
        # Open both ways, and nothing received since it came back.
        conn = holder.conn
        return conn.lifecycle is Lifecycle.OPEN and conn.frames_in == holder.frames_mark

    @staticmethod
    def _unusable_reason(holder: _Holder) -> str:
        return "peer_closed" if holder.conn.lifecycle is not Lifecycle.OPEN else "unexpected_frames"

    # ---------------------------------------------------------------- return

    def _returned(self, holder: _Holder, discard: bool) -> None:
        """A checked-out connection came back (already out of ``_in_use``)."""
        conn = holder.conn
        if self._closing:
            if discard:
                conn.abort()
            else:
                conn.close()
            self._check_all_returned()
            return
        if discard:
            self._discard(holder, "error", abort=True)
        elif conn.lifecycle is not Lifecycle.OPEN:
            self._discard(holder, "closed")
        elif self._loop is not None and self._loop.time() >= holder.expires:
            self._retire(holder, "lifetime")
        else:
            loop = self._loop
            assert loop is not None
            holder.idle = True
            holder.idle_since = loop.time()
            holder.frames_mark = conn.frames_in
            self._idle.append(holder)
            if self._holder_deadline(holder) < self._next_check:
                self._wake_maintainer()
        self._dispatch()

    def _discard(self, holder: _Holder, reason: str, *, abort: bool = False) -> None:
        """Close an unusable connection; its slot is free."""
        self._discarded += 1
        conn = holder.conn
        if abort:
            conn.abort()
        else:
            conn.close()
        logger.debug("pool: discarded a connection to %s (%s)", holder.endpoint, reason)
        self._event("discarded", endpoint=holder.endpoint, reason=reason)
        self._slot_freed()

    def _retire(self, holder: _Holder, reason: str) -> None:
        """Close a healthy connection by policy (lifetime, idle); its slot is free."""
        self._retired += 1
        holder.conn.close()
        age = self._loop.time() - holder.created if self._loop is not None else 0.0
        self._event("retired", endpoint=holder.endpoint, reason=reason, age=age)
        self._slot_freed()

    def _slot_freed(self) -> None:
        if self._size < self.min_size:
            self._wake_maintainer()

    def _conn_closed(self, holder: _Holder) -> None:
        # The watcher: the connection's socket closed. Only an idle one is
        # the watcher's business; release deals with one checked out.
        self._watchers.pop(id(holder.conn), None)
        if self._closing or not holder.idle:
            return
        holder.idle = False
        try:
            self._idle.remove(holder)
        except ValueError:  # pragma: no cover - idle and in the deque go together
            return
        self._discard(holder, "peer_closed")
        self._dispatch()

    # ---------------------------------------------------------------- opening

    def _start_connect(self, *, for_waiter: bool) -> asyncio.Task[bool]:
        loop = self._loop
        assert loop is not None
        self._connecting += 1
        task = loop.create_task(self._open(for_waiter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _open(self, for_waiter: bool) -> bool:
        """Open one connection (its slot is taken); True if it was made."""
        try:
            conn, endpoint = await self._connect_any()
        except ConnectError as exc:
            self._connecting -= 1
            if for_waiter and not self._closing:
                # The first in line learns of it now rather than at its deadline.
                waiters = self._waiters
                while waiters:
                    fut = waiters.popleft()
                    if not fut.done():
                        fut.set_exception(exc)
                        break
            if not self._closing:
                self._slot_freed()
                self._dispatch()
            return False
        except BaseException:
            self._connecting -= 1
            raise
        self._connecting -= 1
        if self._closing:
            conn.abort()
            return False
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lifetime = self.max_lifetime
        if lifetime is None:
            expires = math.inf
        else:
            expires = now + lifetime * (1.0 - LIFETIME_JITTER * random.random())
        holder = _Holder(conn, endpoint, now, expires)
        holder.frames_mark = conn.frames_in
        self._created += 1
        watcher = loop.create_task(conn.wait_closed())
        watcher.add_done_callback(lambda _task: self._conn_closed(holder))
        self._watchers[id(conn)] = watcher
        self._event("connected", endpoint=endpoint)
        self._returned_new(holder)
        return True

    def _returned_new(self, holder: _Holder) -> None:
        # A fresh connection: to the first waiter, or idle.
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                self._grant(fut, holder)
                return
        loop = self._loop
        assert loop is not None
        holder.idle = True
        holder.idle_since = loop.time()
        self._idle.append(holder)
        if self._holder_deadline(holder) < self._next_check:
            self._wake_maintainer()

    async def _connect_any(self) -> tuple[Connection, str]:
        """Connect to the next endpoint that accepts, round-robin; ConnectError if none does."""
        endpoints = self._endpoints
        count = len(endpoints)
        first = self._cursor
        self._cursor = (first + 1) % count
        errors: list[tuple[str, BaseException]] = []
        for i in range(count):
            ep = endpoints[(first + i) % count]
            kwargs: dict[str, Any] = {}
            if self._ssl is not None:
                kwargs["ssl"] = self._ssl
                if self._server_hostname is not None:
                    kwargs["server_hostname"] = self._server_hostname
            error: BaseException
            try:
                conn = await asyncio.wait_for(self._attempt(ep, kwargs), self.connect_timeout)
            except asyncio.TimeoutError:  # TimeoutError on 3.11+
                error = ConnectTimeout(
                    f"connecting to {ep.address} took over connect_timeout={self.connect_timeout} s"
                )
            except Exception as exc:  # refused, unreachable, TLS handshake failed...
                error = exc
            else:
                return conn, ep.address
            self._connect_failures += 1
            errors.append((ep.address, error))
            logger.debug("pool: could not connect to %s: %s", ep.address, _describe(error))
            self._event("connect_failed", endpoint=ep.address, error=error)
        cls = (
            ConnectTimeout
            if all(isinstance(e, ConnectTimeout) for _, e in errors)
            else ConnectError
        )
        text = "; ".join(f"{address}: {_describe(e)}" for address, e in errors)
        raise cls(f"could not connect to any endpoint: {text}", errors) from errors[-1][1]

    async def _attempt(self, ep: _Endpoint, kwargs: dict[str, Any]) -> Connection:
        conn = await connect(ep.host, ep.port, framing=self._framing, **kwargs)
        init = self._init
        if init is not None:
            try:
                await init(conn)
            except BaseException:  # failed, or connect_timeout passed
                conn.abort()
                raise
        return conn

    # ------------------------------------------------------------ maintenance

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        if self._maintainer is None:
            self._first_round = loop.create_future()
            self._maintainer = loop.create_task(self._maintain())
        return loop

    def _wake_maintainer(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _holder_deadline(self, holder: _Holder) -> float:
        # When an idle holder must next be looked at: its lifetime, or its idle limit.
        when = holder.expires
        if self.max_idle is not None:
            when = min(when, holder.idle_since + self.max_idle)
        return when

    async def _maintain(self) -> None:
        """The background task: retire idle connections on time, keep min_size open."""
        loop = self._loop
        assert loop is not None
        failures = 0
        refill_at = 0.0  # no refill round before this
        first_round = self._first_round
        while not self._closing:
            now = loop.time()
            next_check = self._expire_idle(now)
            deficit = self.min_size - self._size
            if deficit > 0 and now >= refill_at:
                tasks = [self._start_connect(for_waiter=False) for _ in range(deficit)]
                made = await asyncio.gather(*tasks)
                # Rounds are spaced by the shortest backoff even when they
                # succeed: a server that accepts and at once closes must not
                # get a reconnection storm.
                refill_at = loop.time() + RECONNECT_BACKOFF_MIN
                if first_round is not None and not first_round.done():
                    first_round.set_result(any(made))
                if all(made):
                    failures = 0
                else:
                    failures += 1
                    delay = min(RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN * 2**failures)
                    refill_at = loop.time() + delay * random.uniform(0.5, 1.0)
                continue
            if first_round is not None and not first_round.done():
                first_round.set_result(True)
            wake_at = next_check
            if deficit > 0:
                wake_at = min(wake_at, refill_at)
            self._next_check = wake_at
            wake = self._wake = loop.create_future()
            timer = loop.call_at(wake_at, _set_done, wake) if wake_at < math.inf else None
            try:
                await wake
            finally:
                if timer is not None:
                    timer.cancel()
                self._wake = None
                self._next_check = math.inf

    def _expire_idle(self, now: float) -> float:
        """Retire idle connections past their lifetime or idle limit; return the next deadline."""
        next_check = math.inf
        max_idle = self.max_idle
        for holder in list(self._idle):  # oldest idle first
            if now >= holder.expires:
                reason = "lifetime"
            elif (
                max_idle is not None
                and now - holder.idle_since >= max_idle
                and self._size > self.min_size
            ):
                reason = "idle"
            else:
                next_check = min(next_check, self._holder_deadline(holder))
                continue
            self._idle.remove(holder)
            holder.idle = False
            self._retire(holder, reason)
        return next_check

    # ------------------------------------------------------------------ close

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = loop.time() + self.close_timeout
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(PoolClosedError("the pool was closed while waiting"))
        tasks = list(self._tasks)
        if self._maintainer is not None:
            tasks.append(self._maintainer)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._first_round is not None and not self._first_round.done():
            self._first_round.set_result(False)
        conns = [holder.conn for holder in self._idle]
        for holder in self._idle:
            holder.idle = False
            holder.conn.close()
        self._idle.clear()

        # Checked-out connections: closed as they come back (_returned),
        # aborted if still out at the deadline.
        out = [holder.conn for holder in self._in_use.values()]
        conns += out
        if self._in_use:
            self._all_returned = loop.create_future()
            timer = loop.call_at(deadline, _set_done, self._all_returned)
            try:
                await self._all_returned
            finally:
                timer.cancel()
        if self._in_use:
            logger.warning(
                "pool: closing with %d connection(s) still checked out after %s s: aborted",
                len(self._in_use),
                self.close_timeout,
            )
            for holder in self._in_use.values():
                holder.conn.abort()
            self._in_use.clear()

        # Wait for the sockets, briefly: a TLS close exchanges close_notify.
        pending = [c for c in conns if c.lifecycle is not Lifecycle.CLOSED]
        if pending:
            waiters = [loop.create_task(c.wait_closed()) for c in pending]
            _, late = await asyncio.wait(waiters, timeout=CLOSE_GRACE)
            for c in pending:
                if c.lifecycle is not Lifecycle.CLOSED:
                    c.abort()
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for watcher in list(self._watchers.values()):
            watcher.cancel()
        self._watchers.clear()

    def _check_all_returned(self) -> None:
        done = self._all_returned
        if not self._in_use and done is not None and not done.done():
            done.set_result(None)

    # ----------------------------------------------------------------- events

    def _event(self, name: str, **info: Any) -> None:
        self._events.emit(name, **info)

    def _gauges(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "fastnet_pool_connections", "The pool's connections, by state.", labels=["state"]
        )
        family.add_metric(["idle"], len(self._idle))
        family.add_metric(["in_use"], len(self._in_use))
        yield family


class _Acquire:
    """What ``Pool.acquire()`` returns: an async context manager, and awaitable."""

    __slots__ = ("_conn", "_keep_on", "_pool")

    def __init__(self, pool: Pool, keep_on: tuple[type[BaseException], ...]) -> None:
        self._pool = pool
        self._keep_on = keep_on
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._pool._acquire().__await__()

    async def __aenter__(self) -> Connection:
        if self._conn is not None:
            raise RuntimeError("this acquire() is already in use; call pool.acquire() again")
        self._conn = await self._pool._acquire()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        conn = self._conn
        self._conn = None
        assert conn is not None
        discard = exc_type is not None and not issubclass(exc_type, self._keep_on)
        self._pool.release(conn, discard=discard)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
