"""Client: calls to a service of several router servers, balanced, protected, retried.

    client = fastnet.Client(["10.0.0.1:7000", "10.0.0.2:7000"], router=router)
    reply = await client.call(Get(key="a"), timeout=0.5)
    await client.close()

Each endpoint (a server) has up to ``connections_per_endpoint`` connections
(``Channel``), and each connection carries up to ``max_in_flight`` calls at
once, multiplexed by request id. Per call:

1. **Pick an endpoint**: power of two choices on outstanding calls, among
   the endpoints that are not ejected (``balancer.py``: an endpoint is
   ejected after consecutive connection failures, for a time that grows with
   each ejection), whose breaker lets the call through (``breaker.py``), and
   that have not just drained a connection (a server shutting down).
2. **Send it** on the endpoint's least busy connection (connecting one if
   needed, within ``connect_timeout``); the call's timeout is sent as the
   request's deadline.
3. **Judge the outcome**: a connection failure or a timeout counts against
   the endpoint (balancer: a stalled server's calls only time out) and its
   breaker; an ``Overloaded`` reply counts against the breaker; an
   application's error reply is an answer, not a failure (``is_failure``
   changes that).
4. **Retry only where safe** (``retry.py``): a request that never reached
   the server (the connection could not be made, or was draining, or the
   breaker refused) or that the server did not run (``Overloaded``), or of a
   message type marked idempotent; with jittered exponential backoff, at most
   ``max_attempts`` times, and only while the retry budget (a share of all
   calls plus a floor per second) has room, so retries cannot multiply an
   outage. The call's timeout bounds all attempts together.

A connection that receives drain (its server is shutting down) takes no new
calls; its calls in flight finish; new calls go to another connection, and
the endpoint gets no new connection for ``DRAIN_AVOID`` seconds unless it is
the only one: a rolling restart of the servers costs the client no call.

Events (``client.stats()``, ``on_event(name, **info)``, and
``fastnet_client_events_total{event}`` with ``metrics=``): ``connected``,
``connect_failed``, ``connection_lost``, ``drained``, ``breaker_open``,
``breaker_half_open``, ``breaker_closed``, ``endpoint_ejected``,
``endpoint_returned``, ``retry``, ``retry_budget_exhausted``,
``in_flight_full`` (a call waited for a free slot: every connection of the
endpoint at ``max_in_flight``), ``panic`` (every endpoint ejected or
refusing: an ejected one was tried anyway).

What counts towards an endpoint's ejection: a failed connection attempt and
a lost connection, once each (not once per call that met them), and a sent
call's timeout (a stalled server's calls only time out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from ._events import Events
from .balancer import Balancer, EndpointState
from .breaker import DEFAULT_POLICY, BreakerPolicy, CircuitBreaker, CircuitOpen
from .channel import Channel, Draining, NoReply, open_channel
from .connection import WriteBufferFull
from .errors import ConnectionBrokenError, ConnectionClosedError, FastnetError
from .pool import ConnectError, ConnectTimeout
from .retry import RetryPolicy
from .router import Router
from .wire import DeadlineExceeded, Overloaded, RequestError

__all__ = ["Client", "NoEndpointAvailable", "default_is_failure"]

logger = logging.getLogger("fastnet")

DEFAULT_TIMEOUT = 10.0  # a call's default timeout: bounded, never forever
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_IN_FLIGHT = 64  # as the router's default per connection
# Seconds an endpoint that drained a connection gets no new connection
# (unless it is the only one left): its server is shutting down; a restarted
# one is found again after this.
DRAIN_AVOID = 1.0
# After a failed connection attempt the endpoint is avoided (picked only if
# nothing else can take the call) for this long, doubling with each failure
# in a row up to the maximum: a restarting server is tried a few times a
# second, not once per call.
CONNECT_BACKOFF = 0.05
CONNECT_BACKOFF_MAX = 2.0
# Seconds close() lets each connection flush what it has queued (one-way
# messages) before aborting it.
CLOSE_FLUSH_SECONDS = 1.0

EVENTS = (
    "connected",
    "connect_failed",
    "connection_lost",
    "drained",
    "breaker_open",
    "breaker_half_open",
    "breaker_closed",
    "endpoint_ejected",
    "endpoint_returned",
    "retry",
    "retry_budget_exhausted",
    "in_flight_full",
    "panic",
)

_DEFAULT: Any = object()
# What a call may be retried after (if safe): the connection, the server,
# the time. Anything else is about the message and raised at once.
_RETRYABLE = (
    ConnectionError,
    OSError,
    ConnectionClosedError,
    ConnectionBrokenError,
    asyncio.TimeoutError,
    TimeoutError,
    RequestError,
    CircuitOpen,
)
DEFAULT_RETRY = RetryPolicy()


class NoEndpointAvailable(FastnetError, ConnectionError):
    """No endpoint can take the call: all ejected, draining, or their breakers open."""


def default_is_failure(exc: BaseException) -> bool:
    """What counts against an endpoint's breaker: connection errors, timeouts, Overloaded.

    An application's error reply (``RequestError`` of another code) is the
    server answering, so it does not.
    """
    if isinstance(exc, (DeadlineExceeded, Overloaded, asyncio.TimeoutError, TimeoutError)):
        return True
    if isinstance(exc, RequestError):
        return False
    return isinstance(exc, (ConnectionError, OSError, ConnectionClosedError, ConnectionBrokenError))


def _address(endpoint: str | tuple[str, int]) -> tuple[str, str, int]:
    if isinstance(endpoint, tuple):
        host, port = endpoint
    else:
        host, sep, port_text = endpoint.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"an endpoint is 'host:port' or (host, port), not {endpoint!r}")
        port = int(port_text)
        host = host.strip("[]")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad port in endpoint {endpoint!r}")
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return shown, host, port


class _Endpoint:
    """One server: its connections, breaker and balancer state."""

    __slots__ = (
        "address",
        "avoid_until",
        "breaker",
        "channels",
        "connect_failures",
        "connecting",
        "host",
        "port",
        "state",
        "waiters",
    )

    def __init__(self, address: str, host: str, port: int, state: EndpointState) -> None:
        self.address = address
        self.host = host
        self.port = port
        self.state = state
        self.breaker: CircuitBreaker | None = None
        self.channels: list[Channel] = []
        self.connecting: asyncio.Task[Channel] | None = None
        self.connect_failures = 0  # failed connection attempts in a row
        self.avoid_until = 0.0
        self.waiters: deque[asyncio.Future[None]] = deque()


class Client:
    """Calls to a service of one or more router servers (see the module docstring).

    Args:
        endpoints: ``"host:port"`` strings or ``(host, port)`` tuples.
        router: declares the message classes and the body codec (its
            handlers are not used); raw bodies by default.
        ssl, server_hostname: TLS for every connection
            (``fastnet.tls.client_context(...)``).
        timeout: a call's default timeout in seconds, over all its attempts
            (None: no timeout; not recommended).
        connect_timeout: seconds one connection attempt may take.
        connections_per_endpoint: connections kept to each endpoint.
        max_in_flight: calls in flight per connection; beyond, a call waits
            for a free slot (within its timeout).
        breaker: the breaker policy of each endpoint, or None for none.
        retry: the retry policy (attempts, backoff, budget, idempotent
            types), or None for no retries.
        is_failure: what counts against a breaker (``default_is_failure``).
        consecutive_failures, base_ejection_seconds, max_ejection_seconds,
            max_ejection_percent: the balancer's outlier ejection.
        init: ``async def init(channel)``, run on each new connection before
            any call uses it, within ``connect_timeout``: say hello,
            authenticate (move a router's protocol state). If it raises,
            the attempt fails like a refused connection.
        on_event: ``on_event(name, **info)`` for every event (module docstring).
        metrics: a prometheus_client registry to export the events to.
    """

    def __init__(
        self,
        endpoints: Iterable[str | tuple[str, int]],
        *,
        router: Router | None = None,
        ssl: Any = None,
        server_hostname: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        connections_per_endpoint: int = 1,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        breaker: BreakerPolicy | None = DEFAULT_POLICY,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        is_failure: Callable[[BaseException], bool] = default_is_failure,
        consecutive_failures: int = 5,
        base_ejection_seconds: float = 30.0,
        max_ejection_seconds: float = 300.0,
        max_ejection_percent: float = 50.0,
        init: Callable[[Channel], Awaitable[object]] | None = None,
        on_event: Callable[..., None] | None = None,
        metrics: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        parsed = [_address(e) for e in endpoints]
        if not parsed:
            raise ValueError("a Client needs at least one endpoint")
        if len({a for a, _, _ in parsed}) != len(parsed):
            raise ValueError("an endpoint is listed twice")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        if connections_per_endpoint < 1 or max_in_flight < 1:
            raise ValueError("connections_per_endpoint and max_in_flight must be at least 1")
        self.router = Router() if router is None else router
        if init is not None and not callable(init):
            raise TypeError(f"init must be an async callable, not {type(init).__name__}")
        self._init = init
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.connections_per_endpoint = connections_per_endpoint
        self.max_in_flight = max_in_flight
        self.retry = retry
        self.is_failure = is_failure
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._events = Events("client", EVENTS, on_event)
        self._rng = rng if rng is not None else random.Random()
        self._balancer = Balancer(
            [address for address, _, _ in parsed],
            consecutive_failures=consecutive_failures,
            base_ejection_seconds=base_ejection_seconds,
            max_ejection_seconds=max_ejection_seconds,
            max_ejection_percent=max_ejection_percent,
            rng=self._rng,
            on_eject=lambda state: self._event("endpoint_ejected", endpoint=state.address),
            on_return=lambda state: self._event("endpoint_returned", endpoint=state.address),
        )
        states = {state.address: state for state in self._balancer.endpoints}
        self._endpoints: dict[str, _Endpoint] = {}
        for address, host, port in parsed:
            ep = _Endpoint(address, host, port, states[address])
            if breaker is not None:
                ep.breaker = CircuitBreaker(breaker, name=address, on_change=self._breaker_changed)
            self._endpoints[address] = ep
        self._by_state = {id(ep.state): ep for ep in self._endpoints.values()}
        self._budget = None if retry is None else retry.new_budget()
        self._closed = False
        if metrics is not None:
            self._events.register(metrics, self._gauges)

    def __repr__(self) -> str:
        return f"<fastnet.Client {len(self._endpoints)} endpoints>"

    # ----------------------------------------------------------------- calls

    async def call(
        self,
        msg: Any,
        *,
        type: int | None = None,
        timeout: float | None = _DEFAULT,
        idempotent: bool | None = None,
    ) -> Any:
        """Send a request to one endpoint and return its reply (see the module docstring).

        Args:
            msg: a message declared on the router, or bytes-like with ``type``.
            type: the message type of a raw body.
            timeout: seconds for the whole call, retries included (the
                client's ``timeout`` by default); sent as each attempt's deadline.
            idempotent: whether the request may be retried after it was sent
                (default: whether the retry policy lists its type).

        Raises:
            RequestError: the server's error reply (its subclass);
                ``DeadlineExceeded`` (a ``TimeoutError``) when the timeout passes.
            CircuitOpen: every endpoint's breaker is open.
            NoEndpointAvailable: no endpoint can take the call.
            ConnectionError: the last attempt's connection failure.
        """
        if self._closed:
            raise ConnectionClosedError("the client is closed")
        if timeout is _DEFAULT:
            timeout = self.timeout
        loop = asyncio.get_running_loop()
        expires = None if timeout is None else loop.time() + timeout
        type_id = self._type_of(msg, type)
        if idempotent is None:
            idempotent = self.retry is not None and type_id in self.retry.idempotent
        budget = self._budget
        if budget is not None:
            budget.deposit()
        attempt = 1
        reroutes = 0
        tried: list[_Endpoint] = []
        while True:
            remaining = None
            if expires is not None:
                remaining = expires - loop.time()
                if remaining <= 0:
                    raise DeadlineExceeded(f"no reply within {timeout:.3g} s")
            ep, permit = self._pick(tried)
            tried.append(ep)
            sent = False
            began = loop.time()
            try:
                channel = await self._channel(ep, remaining)
                if expires is not None:
                    remaining = max(expires - loop.time(), 0.001)
                call = channel._begin(msg, type, remaining)
                sent = True
                ep.state.outstanding += 1
                try:
                    if call.unsent is not None:
                        await channel._send(call)
                    reply = await channel._wait(call)
                finally:
                    ep.state.outstanding -= 1
                    self._slot_freed(ep)
            except Draining:
                # Never sent: that connection is leaving. Another one, at no cost.
                self._judge(ep, None, 0.0, permit)
                reroutes += 1
                if reroutes > 2 * len(self._endpoints) + 2:
                    raise
                continue
            except asyncio.CancelledError:
                self._judge(ep, None, 0.0, permit)
                raise
            except BaseException as exc:
                if not isinstance(exc, _RETRYABLE):
                    # The message itself (it cannot be encoded, a bad type):
                    # nothing to do with the endpoint, and the same everywhere.
                    self._judge(ep, None, 0.0, permit)
                    raise
                elapsed = loop.time() - began
                failed = self.is_failure(exc)
                if isinstance(exc, ConnectError) and not sent:
                    # A failed connection attempt counted once, in _open, for
                    # the breaker as for ejection, not once per waiting call.
                    self._judge(ep, None, 0.0, permit)
                else:
                    self._judge(ep, not failed, elapsed, permit)
                if isinstance(exc, NoReply):
                    # A sent call's timeout: a stalled server's calls only
                    # time out, so they count towards its ejection. (Connect
                    # failures and lost connections count once each, where
                    # they happen, not once per call that met them.)
                    self._balancer.failure(ep.state)
                if isinstance(exc, (RequestError, CircuitOpen)) and not isinstance(exc, Overloaded):
                    raise  # an answer (or the caller's time is up): not retried
                # Overloaded: the server did not run it, as if never sent.
                safe = not sent or isinstance(exc, Overloaded) or idempotent
                if not self._may_retry(safe, attempt):
                    raise
                delay = self.retry.backoff.delay(attempt) if self.retry is not None else 0.0
                if expires is not None and loop.time() + delay >= expires:
                    raise
                self._event("retry", endpoint=ep.address, attempt=attempt, error=repr(exc))
                attempt += 1
                if delay > 0:
                    await asyncio.sleep(delay)
                continue
            else:
                self._judge(ep, True, loop.time() - began, permit)
                self._balancer.success(ep.state)
                return reply

    async def send(self, msg: Any, *, type: int | None = None) -> None:
        """Send a one-way message to one endpoint (no reply; retried only if never sent).

        A full write buffer is waited out (backpressure, as for calls) within
        the client's ``timeout``; ``DeadlineExceeded`` after it.
        """
        if self._closed:
            raise ConnectionClosedError("the client is closed")
        loop = asyncio.get_running_loop()
        expires = None if self.timeout is None else loop.time() + self.timeout
        tried: list[_Endpoint] = []
        for _ in range(2 * len(self._endpoints) + 2):
            remaining = None
            if expires is not None:
                remaining = expires - loop.time()
                if remaining <= 0:
                    raise DeadlineExceeded(f"not sent within {self.timeout:.3g} s")
            ep, permit = self._pick(tried)
            tried.append(ep)
            try:
                channel = await self._channel(ep, remaining)
                while True:
                    try:
                        channel.send(msg, type=type)
                        break
                    except WriteBufferFull:
                        # Not sent: wait for room (backpressure, as a call
                        # does), within the timeout.
                        left = None if expires is None else max(expires - loop.time(), 0.0)
                        try:
                            await asyncio.wait_for(channel.drain(), left)
                        except asyncio.TimeoutError:
                            raise DeadlineExceeded("no room to send in time") from None
            except Draining:
                self._judge(ep, None, 0.0, permit)
                continue
            except (ConnectionError, OSError, ConnectionClosedError, asyncio.TimeoutError):
                self._judge(ep, False, 0.0, permit)
                if self._closed:
                    raise
                self._balancer.failure(ep.state)
                continue
            except BaseException:
                self._judge(ep, None, 0.0, permit)
                raise
            self._judge(ep, None, 0.0, permit)
            return
        raise NoEndpointAvailable("no endpoint took the one-way message")

    # ------------------------------------------------------------- choosing

    def _pick(self, tried: list[_Endpoint]) -> tuple[_Endpoint, int | None]:
        # The endpoint for an attempt, and its breaker's permit (the breaker
        # drops a result whose permit is from before its last change of
        # state). Preferred in this order, each by power of two choices or,
        # for ejected endpoints, the least busy:
        #   1. not tried by this call, not avoided (draining, connect backoff)
        #   2. not avoided
        #   3. panic (Envoy's word): an ejected endpoint that is not avoided;
        #      ejection is a guess from past failures, and with nothing
        #      better left it is tried rather than failing the call
        #   4. not tried (an avoided endpoint may have come back)
        #   5. panic: an ejected endpoint not tried (before trying again one
        #      that already failed this call: a restarted server, ejected
        #      and still in its connect backoff, rather than the one that
        #      is shutting down)
        #   6. any in service; 7. panic: any at all.
        now = asyncio.get_running_loop().time()
        endpoints = list(self._endpoints.values())
        available = set(map(id, self._balancer.available))

        def avoided(ep: _Endpoint) -> bool:
            return ep.avoid_until > now

        levels: tuple[tuple[bool, Callable[[_Endpoint], bool]], ...] = (
            (False, lambda ep: ep in tried or avoided(ep)),
            (False, avoided),
            (True, avoided),
            (False, lambda ep: ep in tried),
            (True, lambda ep: ep in tried),
            (False, lambda ep: False),
            (True, lambda ep: False),
        )
        for panic, skip in levels:
            exclude = [ep.state for ep in endpoints if skip(ep)]
            while True:
                if panic:
                    ejected = [
                        ep
                        for ep in endpoints
                        if id(ep.state) not in available and ep.state not in exclude
                    ]
                    ep = min(ejected, key=lambda e: e.state.outstanding, default=None)
                    state = None if ep is None else ep.state
                else:
                    state = self._balancer.pick(exclude)
                    ep = None if state is None else self._by_state[id(state)]
                if ep is None or state is None:
                    break
                breaker = ep.breaker
                if breaker is None or breaker.allow():
                    if panic:
                        self._event("panic", endpoint=ep.address)
                    return ep, None if breaker is None else breaker.generation
                exclude.append(state)
        raise CircuitOpen(
            "every endpoint's circuit breaker is open", endpoint=None, retry_after=0.0
        )

    def _judge(self, ep: _Endpoint, ok: bool | None, seconds: float, permit: int | None) -> None:
        breaker = ep.breaker
        if breaker is None:
            return
        if ok is None:
            breaker.release(permit)
        else:
            breaker.record(ok, seconds, permit)

    def _may_retry(self, safe: bool, attempt: int) -> bool:
        retry = self.retry
        if retry is None or not safe or attempt >= retry.max_attempts or self._closed:
            return False
        budget = self._budget
        if budget is not None and not budget.try_withdraw():
            self._event("retry_budget_exhausted")
            return False
        return True

    def _type_of(self, msg: Any, type_: int | None) -> int:
        if type_ is not None:
            return type_
        return self.router._types.get(msg.__class__, 0)

    # ---------------------------------------------------------- connections

    async def _channel(self, ep: _Endpoint, remaining: float | None) -> Channel:
        loop = asyncio.get_running_loop()
        expires = None if remaining is None else loop.time() + remaining
        while True:
            live = [c for c in ep.channels if not c.closed]
            ep.channels = live
            best = None
            usable = 0
            for channel in live:
                if channel.draining:
                    continue
                usable += 1
                if best is None or channel.in_flight < best.in_flight:
                    best = channel
            if best is not None and best.in_flight < self.max_in_flight:
                return best
            if usable < self.connections_per_endpoint:
                left = None if expires is None else expires - loop.time()
                await self._connect(ep, left)
                continue
            # Every connection at max_in_flight: wait for a free slot.
            self._event("in_flight_full", endpoint=ep.address)
            waiter: asyncio.Future[None] = loop.create_future()
            ep.waiters.append(waiter)
            try:
                left = None if expires is None else max(expires - loop.time(), 0.0)
                await asyncio.wait_for(waiter, left)
            except asyncio.TimeoutError:
                raise DeadlineExceeded("no free slot on a connection in time") from None
            finally:
                with contextlib.suppress(ValueError):
                    ep.waiters.remove(waiter)

    def _slot_freed(self, ep: _Endpoint) -> None:
        while ep.waiters:
            waiter = ep.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, ep: _Endpoint, remaining: float | None) -> Channel:
        # One connection attempt per endpoint at a time; callers share it.
        if self._closed:
            raise ConnectionClosedError("the client is closed")
        task = ep.connecting
        if task is None:
            task = ep.connecting = asyncio.get_running_loop().create_task(self._open(ep))
            task.add_done_callback(lambda _: setattr(ep, "connecting", None))
        try:
            if remaining is None:
                return await asyncio.shield(task)
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("no connection in time") from None
        except asyncio.CancelledError:
            # close() cancelled the attempt, not our caller: the call fails
            # as the calls in flight do.
            if self._closed and task.cancelled() and not _cancelling():
                raise ConnectionClosedError("the client is closed") from None
            raise

    async def _open(self, ep: _Endpoint) -> Channel:
        # One connection attempt. A failure counts once against the endpoint
        # (however many calls waited for it), and the endpoint is avoided
        # for a backoff that doubles with each failure in a row, so a server
        # that is restarting is not hammered, nor ejected by a burst of calls.
        try:
            channel = await asyncio.wait_for(self._connect_channel(ep), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self._event("connect_failed", endpoint=ep.address, error=repr(exc))
            ep.connect_failures += 1
            backoff = min(CONNECT_BACKOFF * 2 ** (ep.connect_failures - 1), CONNECT_BACKOFF_MAX)
            ep.avoid_until = asyncio.get_running_loop().time() + backoff
            self._balancer.failure(ep.state)
            if ep.breaker is not None:
                ep.breaker.record(False, 0.0)
            if isinstance(exc, asyncio.TimeoutError):
                timeout = ConnectTimeout(
                    f"connecting to {ep.address} took over {self.connect_timeout:.3g} s"
                )
                raise timeout from None
            error = ConnectError(f"cannot connect to {ep.address}: {exc}", [(ep.address, exc)])
            raise error from exc
        if self._closed:
            await channel.close()
            raise ConnectionClosedError("the client is closed")
        ep.connect_failures = 0
        ep.channels.append(channel)
        self._event("connected", endpoint=ep.address)
        channel.drained.add_done_callback(lambda f: self._drained(ep, f))
        channel._reader.add_done_callback(lambda _: self._channel_ended(ep, channel))
        return channel

    async def _connect_channel(self, ep: _Endpoint) -> Channel:
        channel = await open_channel(
            ep.host,
            ep.port,
            router=self.router,
            ssl=self._ssl,
            server_hostname=self._server_hostname if self._ssl is not None else None,
        )
        if self._init is not None:
            try:
                await self._init(channel)
            except BaseException:
                channel.connection.abort()
                raise
        return channel

    def _channel_ended(self, ep: _Endpoint, channel: Channel) -> None:
        # A connection lost (not closed by us, not drained) counts once.
        if isinstance(channel._closed, ConnectionBrokenError) and not self._closed:
            self._event("connection_lost", endpoint=ep.address)
            self._balancer.failure(ep.state)

    def _drained(self, ep: _Endpoint, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        ep.avoid_until = asyncio.get_running_loop().time() + DRAIN_AVOID
        self._event("drained", endpoint=ep.address)
        for waiter in list(ep.waiters):  # they can use a new connection now
            if not waiter.done():
                waiter.set_result(None)

    # --------------------------------------------------------------- events

    def _breaker_changed(self, breaker: CircuitBreaker, old: str, new: str) -> None:
        self._event(f"breaker_{new}", endpoint=breaker.name, previous=old)

    def _event(self, name: str, **info: Any) -> None:
        self._events.emit(name, **info)

    def stats(self) -> dict[str, Any]:
        """Event counts, and per endpoint: connections, calls in flight, breaker, ejected."""
        try:
            now = asyncio.get_running_loop().time()  # the clock avoid_until is on
        except RuntimeError:  # outside the loop: nothing is being avoided any more
            now = float("inf")
        endpoints = {}
        for ep in self._endpoints.values():
            endpoints[ep.address] = {
                "connections": sum(1 for c in ep.channels if not c.closed),
                "outstanding": ep.state.outstanding,
                "breaker": None if ep.breaker is None else ep.breaker.state,
                "ejected": ep.state not in self._balancer.available,
                "draining": ep.avoid_until > now,
            }
        return {"events": dict(self._events.counts), "endpoints": endpoints}

    # ---------------------------------------------------------------- close

    async def close(self) -> None:
        """Close every connection; calls in flight fail with ConnectionClosedError.

        Calls waiting for a connection fail the same way, and nothing is
        retried or connected after it. Each connection may flush what it has
        queued for ``CLOSE_FLUSH_SECONDS``, then it is aborted.
        """
        if self._closed:
            return
        self._closed = True
        for ep in self._endpoints.values():
            if ep.connecting is not None:
                ep.connecting.cancel()
            for waiter in ep.waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionClosedError("the client is closed"))
        channels = [c for ep in self._endpoints.values() for c in ep.channels]
        closing = [asyncio.ensure_future(c.close()) for c in channels]
        if not closing:
            return
        # A connection flushes what it has queued before it closes; one whose
        # server reads nothing (stalled) would hold close() forever: aborted.
        _, pending = await asyncio.wait(closing, timeout=CLOSE_FLUSH_SECONDS)
        if pending:
            for channel, task in zip(channels, closing, strict=True):
                if not task.done():
                    channel.connection.abort()
            await asyncio.wait(pending, timeout=CLOSE_FLUSH_SECONDS)
        for task in closing:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: close() reports nothing

    async def __aenter__(self) -> Client:
        return self

    def _gauges(self) -> Iterator[Any]:
        # Per endpoint, for the metrics: calls in flight, breaker open.
        from prometheus_client.core import GaugeMetricFamily

        outstanding = GaugeMetricFamily(
            "fastnet_client_outstanding_calls", "Calls in flight, by endpoint.", labels=["endpoint"]
        )
        open_ = GaugeMetricFamily(
            "fastnet_client_breaker_open",
            "1 while the endpoint's breaker is open.",
            labels=["endpoint"],
        )
        for ep in self._endpoints.values():
            outstanding.add_metric([ep.address], ep.state.outstanding)
            state = None if ep.breaker is None else ep.breaker.state
            open_.add_metric([ep.address], 1 if state == "open" else 0)
        yield outstanding
        yield open_

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _cancelling() -> bool:
    # Whether the current task was asked to cancel (Python 3.11+ counts the
    # requests; on 3.10 it cannot be told, and False is assumed).
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0
