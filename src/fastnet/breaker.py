"""A circuit breaker per endpoint: ``BreakerPolicy``, ``CircuitBreaker``, ``CircuitOpen``.

The client keeps one breaker per endpoint and asks it before each call::

    permit = breaker.check()              # raises CircuitOpen: try another endpoint
    started = time.monotonic()
    try:
        reply = await channel.call(msg, timeout=timeout)
    except asyncio.CancelledError:
        breaker.release(permit)           # never judged: the caller gave up
        raise
    except (ConnectionBrokenError, DeadlineExceeded, Overloaded):
        breaker.record(False, time.monotonic() - started, permit)
        raise
    breaker.record(True, time.monotonic() - started, permit)

The model is resilience4j's. **Closed**, calls go through and their outcomes
fill a sliding window; once the window holds ``min_calls`` calls, the
breaker opens when the share of failures reaches ``failure_rate``, or the
share of slow calls (``slow_call_seconds`` or longer, failed or not)
reaches ``slow_call_rate``. **Open**, calls are refused (``CircuitOpen``,
counted in ``rejected``) for ``open_seconds``; the first call asked after
that moves it to **half-open**, where ``half_open_calls`` probe calls are
let through and any more refused. When every probe has completed, the
breaker closes (with an empty window) if the probes' failure and slow rates
are both under the thresholds, else it opens again for another
``open_seconds``. Nothing moves on its own: the moves happen inside
``allow``/``check`` and ``record``, so the breaker needs no timer and no
task.

Late results: every transition starts a new *generation*, and ``check()``
returns the generation the call was allowed in (its permit). A result
handed back with a permit of an earlier generation is dropped: a call let
through while closed that fails after the breaker opened neither counts
as a half-open probe nor lands in the fresh window of a later closed
period. (Without a permit, a result counts in the current state; in
half-open only while a probe is out.)

Strategy: the window keeps counts, not a list of calls, so ``record`` is
O(1) and memory is fixed by the policy.

- Count-based (``window=N``): a ring of N one-byte outcomes (failed and
  slow bits) with running totals. A new call overwrites the oldest and
  takes its bits off the totals: the window is exactly the last N calls.
- Time-based (``window_seconds=N``): a ring of N buckets, one per second of
  the clock (a bucket holds the calls recorded while ``floor(clock())`` had
  its value), with running totals. As the clock enters a new second, the
  buckets of the seconds that have left the window are taken off the totals
  and emptied (amortised O(1): each second's bucket is emptied once; after
  a silence of N seconds or more, all at once). The window is exactly the
  calls recorded in the current second and the N - 1 seconds before it, so
  at any moment it reaches back between N - 1 and N seconds: the
  granularity is one second, as resilience4j's epoch-second buckets.

A breaker is not thread-safe; it belongs to one event loop, as the client
that uses it does. It imports nothing from asyncio.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from .errors import FastnetError

__all__ = [
    "CLOSED",
    "DEFAULT_POLICY",
    "HALF_OPEN",
    "MAX_WINDOW",
    "MAX_WINDOW_SECONDS",
    "OPEN",
    "BreakerPolicy",
    "CircuitBreaker",
    "CircuitOpen",
    "State",
]

State = Literal["closed", "open", "half_open"]
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# The moves a breaker makes by itself (``reset()`` may close it from any
# state). Anything else is a bug in this module, and ``_move`` says so.
_TRANSITIONS: Final = frozenset(
    {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
)

# The largest count-based window: a byte per call, so 100 KB at most. A
# window this long takes minutes of traffic to turn over at any rate a
# single endpoint sees; a breaker judging on more than that reacts too late
# to protect anything. The bound only stops a typo from allocating a lot.
MAX_WINDOW = 100_000

# The longest time-based window: an hour of one-second buckets (three small
# lists of 3,600 ints). A breaker that needs an hour of history to judge an
# endpoint is a reporting tool, not a breaker.
MAX_WINDOW_SECONDS = 3600

# Outcome bits of a call in the count-based ring.
_FAILED = 1
_SLOW = 2


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_rate(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a share above 0 and at most 1, got {value!r}")


def _check_seconds(name: str, value: object) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not (value > 0 and math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens, how long it stays open, and how it probes.

    Args:
        window: the count-based sliding window: the last ``window`` calls.
            100, as resilience4j: a failure moves the rate by 1%, and the
            window judges the same way at any traffic level. Not used when
            ``window_seconds`` is set.
        window_seconds: a time-based window instead: the calls of the last
            ``window_seconds`` seconds, a whole number (the window is kept
            in one-second buckets; see the module docstring). Off by
            default: at low traffic a time window holds too few calls to
            judge, and at high traffic 100 calls are a fraction of a second
            anyway. Use it when calls per endpoint vary a lot over the day
            and old outcomes must age out.
        failure_rate: open when failures / calls in the window reach it.
            0.5, as resilience4j. Only connection errors, timeouts and
            "overloaded" replies count as failures (not an application's
            error replies), so half of the calls failing that way means the
            backend is not serving; lower, and an ordinary burst of
            timeouts trips it.
        slow_call_seconds: a call that took at least this long is slow,
            whether it succeeded or not. None (the default) turns slow calls
            off: what is slow depends on the service, and the client's
            deadlines already turn the slowest calls into timeouts, which
            count as failures. (resilience4j's 60 s default is off in all
            but name for an RPC client.)
        slow_call_rate: open when slow calls / calls in the window reach it.
            1.0, as resilience4j: only when every call is slow.
        min_calls: no judgement before the window holds this many calls.
            20, where resilience4j waits for 100 (its whole window): at one
            call a second, 100 calls is a minute and a half of failing
            calls to a dead endpoint before the breaker acts. 20 calls are
            enough not to trip on noise: a backend failing 10% of its calls
            at random shows 50% failures in 20 calls with a probability of
            about 7 in a million (0.3% at 20% background failures). For a
            count-based window longer than ``window`` it is taken as
            ``window`` (a full window), as resilience4j does.
        open_seconds: the wait in open before half-open. 5 s, where
            resilience4j waits 60 s: a fastnet client balances over several
            endpoints, and an endpoint restarted by a deploy is back within
            seconds; keeping it out for a minute would halve a two-server
            service's capacity for a minute per restart. Probing is cheap:
            at most ``half_open_calls`` calls per ``open_seconds`` reach a
            dead endpoint (one a second with the defaults). Endpoints that
            stay down are the balancer's business (its ejection grows
            from 30 s to 5 minutes).
        half_open_calls: the probe calls let through in half-open. 5, where
            resilience4j lets 10: the decision comes in half the calls and
            risks half as many against a backend still sick. With the 50%
            threshold, 3 failed probes of 5 reopen it, which a backend
            failing 10% of its calls at random does with a probability
            under 1%.

    Raises:
        ValueError: a field out of range, named in the message.
    """

    window: int = 100
    window_seconds: float | None = None
    failure_rate: float = 0.5
    slow_call_seconds: float | None = None
    slow_call_rate: float = 1.0
    min_calls: int = 20
    open_seconds: float = 5.0
    half_open_calls: int = 5

    def __post_init__(self) -> None:
        _check_int("window", self.window, 1, MAX_WINDOW)
        seconds = self.window_seconds
        if seconds is not None and (
            not isinstance(seconds, (int, float))
            or isinstance(seconds, bool)
            or not (math.isfinite(seconds) and seconds == int(seconds))
            or not 1 <= seconds <= MAX_WINDOW_SECONDS
        ):
            raise ValueError(
                f"window_seconds must be a whole number of seconds from 1 to "
                f"{MAX_WINDOW_SECONDS} (the window is kept in one-second buckets), "
                f"got {seconds!r}"
            )
        _check_rate("failure_rate", self.failure_rate)
        if self.slow_call_seconds is not None:
            _check_seconds("slow_call_seconds", self.slow_call_seconds)
        _check_rate("slow_call_rate", self.slow_call_rate)
        _check_int("min_calls", self.min_calls, 1)
        _check_seconds("open_seconds", self.open_seconds)
        _check_int("half_open_calls", self.half_open_calls, 1)


DEFAULT_POLICY: Final = BreakerPolicy()


class CircuitOpen(FastnetError):
    """Raised by ``CircuitBreaker.check()`` (and the client) while a breaker refuses calls.

    Args:
        message: the text; by default one naming the endpoint and the wait.
        endpoint: the breaker's ``name`` (the client names each breaker
            after its endpoint's address), or None.
        retry_after: seconds until the breaker may let a probe through: the
            rest of ``open_seconds`` when open; 0.0 when half-open with all
            its probes out (one may come back any moment).

    Attributes:
        endpoint: as given.
        retry_after: as given.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        endpoint: str | None = None,
        retry_after: float = 0.0,
    ) -> None:
        if message is None:
            where = f" for {endpoint}" if endpoint is not None else ""
            message = f"circuit open{where}: no calls for {retry_after:.3f} s"
        super().__init__(message)
        self.endpoint = endpoint
        self.retry_after = retry_after


class _CountWindow:
    """The last ``size`` outcomes, as a ring of bytes with running totals."""

    __slots__ = ("_pos", "_ring", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._ring = bytearray(size)
        self._pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, outcome: int, now: float) -> None:
        ring = self._ring
        pos = self._pos
        if self.calls == len(ring):  # full: the oldest call leaves
            old = ring[pos]
            self.failures -= old & _FAILED
            self.slow -= (old & _SLOW) >> 1
        else:
            self.calls += 1
        ring[pos] = outcome
        self.failures += outcome & _FAILED
        self.slow += (outcome & _SLOW) >> 1
        pos += 1
        self._pos = 0 if pos == len(ring) else pos

    def turn(self, now: float) -> None:
        """Nothing ages out of a count window."""

    def clear(self) -> None:
        self._ring[:] = bytes(len(self._ring))
        self._pos = self.calls = self.failures = self.slow = 0


class _TimeWindow:
    """The calls of the current second and the ``size - 1`` before it, one bucket a second."""

    __slots__ = ("_calls", "_failures", "_second", "_slow", "calls", "failures", "slow")

    def __init__(self, size: int, now: float) -> None:
        self._calls = [0] * size
        self._failures = [0] * size
        self._slow = [0] * size
        self._second = math.floor(now)  # the second of the newest bucket
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def turn(self, now: float) -> None:
        """Empty the buckets of the seconds that have left the window by ``now``."""
        second = math.floor(now)
        last = self._second
        if second <= last:  # same second (or a clock that went back: stay put)
            return
        size = len(self._calls)
        if second - last >= size:  # a silence of a whole window: everything left
            self._zero()
        else:
            calls, failures, slow = self._calls, self._failures, self._slow
            for s in range(last + 1, second + 1):
                i = s % size  # the bucket of second s held second s - size
                self.calls -= calls[i]
                self.failures -= failures[i]
                self.slow -= slow[i]
                calls[i] = failures[i] = slow[i] = 0
        self._second = second

    def add(self, outcome: int, now: float) -> None:
        self.turn(now)
        i = self._second % len(self._calls)
        self._calls[i] += 1
        self.calls += 1
        if outcome & _FAILED:
            self._failures[i] += 1
            self.failures += 1
        if outcome & _SLOW:
            self._slow[i] += 1
            self.slow += 1

    def _zero(self) -> None:
        size = len(self._calls)
        self._calls[:] = [0] * size
        self._failures[:] = [0] * size
        self._slow[:] = [0] * size
        self.calls = self.failures = self.slow = 0

    def clear(self) -> None:
        self._zero()


class CircuitBreaker:
    """One endpoint's breaker (see the module docstring for the model).

    Args:
        policy: the thresholds and waits (``BreakerPolicy``).
        name: a name for ``CircuitOpen`` and logs: the endpoint's address.
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).
        on_change: called as ``on_change(breaker, old_state, new_state)``
            after every transition (``reset()`` included when it changes
            the state); for metrics and logs. An exception it raises
            propagates to the caller of the method that moved the breaker,
            which has moved already.

    Attributes:
        state: ``"closed"``, ``"open"`` or ``"half_open"`` (``CLOSED``,
            ``OPEN``, ``HALF_OPEN``). Open turns half-open when a call is
            asked for, not on its own.
        generation: the number of the current state period; every
            transition adds one. ``check()`` returns it as the call's permit.
        opened: times the breaker opened (from closed or half-open).
        closed: times it closed again after half-open (not ``reset()``).
        rejected: calls refused: while open, or half-open with every probe
            out.
    """

    __slots__ = (
        "_clock",
        "_half_open_calls",
        "_min_calls",
        "_on_change",
        "_open_until",
        "_probe_done",
        "_probe_failures",
        "_probe_slow",
        "_probes",
        "_window",
        "closed",
        "generation",
        "name",
        "opened",
        "policy",
        "rejected",
        "state",
    )

    def __init__(
        self,
        policy: BreakerPolicy = DEFAULT_POLICY,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitBreaker, State, State], object] | None = None,
    ) -> None:
        self.policy = policy
        self.name = name
        self._clock = clock
        self._on_change = on_change
        self._window: _CountWindow | _TimeWindow
        if policy.window_seconds is not None:
            self._window = _TimeWindow(int(policy.window_seconds), clock())
            self._min_calls = policy.min_calls
        else:
            self._window = _CountWindow(policy.window)
            # A count window never holds more than ``window`` calls.
            self._min_calls = min(policy.min_calls, policy.window)
        self._half_open_calls = policy.half_open_calls
        self.state: State = CLOSED
        self.generation = 0
        self._open_until = 0.0
        # Half-open: probes let through (out or done), done, and how they went.
        self._probes = 0
        self._probe_done = 0
        self._probe_failures = 0
        self._probe_slow = 0
        self.opened = 0
        self.closed = 0
        self.rejected = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name or ''} {self.state}>"

    # -------------------------------------------------------------- asking

    def allow(self) -> bool:
        """May a call go through now? If True, the call must be ``record``-ed or ``release``-d.

        Closed: True. Open: False (counted in ``rejected``) until
        ``open_seconds`` have passed since it opened; then it turns
        half-open. Half-open: True for up to ``half_open_calls`` probes
        (out or done), False beyond.
        """
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if self._clock() < self._open_until:
                self.rejected += 1
                return False
            self._move(HALF_OPEN)
        if self._probes < self._half_open_calls:
            self._probes += 1
            return True
        self.rejected += 1
        return False

    def check(self) -> int:
        """``allow()``, raising where it would say False; returns the call's permit.

        Returns:
            the permit (the current ``generation``) to hand back to
            ``record`` or ``release``, so that a result arriving after the
            breaker moved on is not taken for one of the new state's calls.

        Raises:
            CircuitOpen: the breaker refuses the call.
        """
        if not self.allow():
            raise CircuitOpen(endpoint=self.name, retry_after=self.retry_after)
        return self.generation

    @property
    def retry_after(self) -> float:
        """Seconds until an open breaker may let a probe through; 0.0 in other states."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    # ----------------------------------------------------------- answering

    def record(self, ok: bool, seconds: float, permit: int | None = None) -> None:
        """The outcome of an allowed call: ``ok`` or failed, after ``seconds``.

        Args:
            ok: False for a failure (what counts as one is the caller's
                choice: the client counts connection errors, timeouts and
                "overloaded" replies).
            seconds: how long the call took; slow at ``slow_call_seconds``
                or more.
            permit: what ``check()`` returned for this call. A permit of an
                earlier generation marks a late result, which is dropped.
                None: the result belongs to the current state.
        """
        if permit is not None and permit != self.generation:
            return  # allowed in an earlier state period: judged by nobody
        policy = self.policy
        slow_after = policy.slow_call_seconds
        slow = slow_after is not None and seconds >= slow_after
        state = self.state
        if state == CLOSED:
            outcome = (0 if ok else _FAILED) | (_SLOW if slow else 0)
            window = self._window
            window.add(outcome, self._clock())
            calls = window.calls
            if calls >= self._min_calls and (
                window.failures / calls >= policy.failure_rate
                or window.slow / calls >= policy.slow_call_rate
            ):
                self._open()
        elif state == HALF_OPEN:
            if self._probe_done >= self._probes:
                return  # no probe is out: a permit-less late result
            self._probe_done += 1
            if not ok:
                self._probe_failures += 1
            if slow:
                self._probe_slow += 1
            done = self._probe_done
            if done == self._half_open_calls:
                if (
                    self._probe_failures / done >= policy.failure_rate
                    or self._probe_slow / done >= policy.slow_call_rate
                ):
                    self._open()
                else:
                    self.closed += 1
                    self._move(CLOSED)
        # Open: nothing was allowed in this state, so this is a late result.

    def release(self, permit: int | None = None) -> None:
        """An allowed call that was never made, or whose outcome must not count (cancelled).

        In half-open it gives the probe's place back, for another call to
        probe with. ``permit`` as for ``record``.
        """
        if permit is not None and permit != self.generation:
            return
        if self.state == HALF_OPEN and self._probes > self._probe_done:
            self._probes -= 1

    def reset(self) -> None:
        """Back to closed with an empty window; results of calls allowed before are dropped.

        The counters (``opened``, ``closed``, ``rejected``) keep counting.
        """
        old = self.state
        self._enter(CLOSED)
        if old != CLOSED and self._on_change is not None:
            self._on_change(self, old, CLOSED)

    def window_counts(self) -> tuple[int, int, int]:
        """The closed-state window now: (calls, failures, slow calls).

        Empty while open or half-open (the window starts afresh on closing).
        """
        window = self._window
        window.turn(self._clock())
        return window.calls, window.failures, window.slow

    # ------------------------------------------------------------- moving

    def _open(self) -> None:
        self._open_until = self._clock() + self.policy.open_seconds
        self.opened += 1
        self._move(OPEN)

    def _move(self, new: State) -> None:
        old = self.state
        if (old, new) not in _TRANSITIONS:
            raise AssertionError(f"circuit breaker cannot move from {old} to {new}")
        self._enter(new)
        if self._on_change is not None:
            self._on_change(self, old, new)

    def _enter(self, new: State) -> None:
        self.state = new
        self.generation += 1
        self._probes = self._probe_done = self._probe_failures = self._probe_slow = 0
        if new != HALF_OPEN:
            # Closed starts with an empty window; open forgets the old one
            # (so window_counts() reports nothing judged while not closed).
            self._window.clear()
