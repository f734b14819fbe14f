"""Retries that cannot multiply an outage: ``RetryBudget``, ``Backoff``, ``RetryPolicy``.

A retry is worth making when one endpoint hiccups, and harmful when the
whole backend is overloaded: every client retrying each failed call three
times turns an overload into four times the load. Finagle's answer is a
*budget*: retries may be at most a share (``percent``) of the requests of
the last ``ttl`` seconds, plus a small floor (``min_per_second``) so that a
client sending few requests can still retry. The client checks three
things before a retry:

1. ``RetryPolicy.safe(sent, message_type)``: the server cannot have acted
   on the request (it was never sent), or acting twice does no harm (its
   type is idempotent);
2. attempts left (``max_attempts`` counts the first);
3. ``RetryBudget.try_withdraw()``; then it waits ``Backoff.delay(attempt)``
   (jittered, so that clients failed by the same event do not retry in
   lockstep) and tries another endpoint.

Strategy (``RetryBudget``): a ring of ``BUDGET_BUCKETS`` buckets spans the
``ttl``; each bucket keeps the net tokens of its slice of time (+``percent``
per deposit, -1 per withdrawal, in millionths, so the arithmetic is exact
integer arithmetic). A running total is the sum of the ring. As time enters
a new slice, the slices that have left the window are taken off the total
and emptied, so every call is O(1) (amortised: each slice is emptied once;
at most ``BUDGET_BUCKETS`` at once) and memory is fixed. The window is the
current slice and the ``BUDGET_BUCKETS - 1`` before it, so it reaches back
between ``ttl * (1 - 1/BUDGET_BUCKETS)`` and ``ttl`` seconds: the
granularity is ``ttl / BUDGET_BUCKETS`` (one second with the default ttl),
as Finagle's windowed adder.

None of this sleeps or imports asyncio: the client does the waiting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "BUDGET_BUCKETS",
    "JITTERS",
    "TOKEN_SCALE",
    "Backoff",
    "Jitter",
    "RetryBudget",
    "RetryPolicy",
]

# Slices of the ttl window. Ten, as Finagle's WindowedAdder: a request
# leaves the budget within a tenth of ttl of its due time (a second with the
# default 10 s), and the ring costs ten ints per client.
BUDGET_BUCKETS = 10

# Tokens are counted in millionths of a retry, so that percent=0.2 is 200,000
# tokens a deposit and the balance never drifts as a float sum would; percent
# and min_per_second are kept to a millionth.
TOKEN_SCALE = 1_000_000

Jitter = Literal["full", "equal", "none"]
JITTERS: Final = ("full", "equal", "none")


def _number(name: str, value: object, *, low: float, low_open: bool, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        above = "above" if low_open else "at least"
        raise ValueError(f"{name} must be {above} {low} and at most {high}, got {value!r}")
    return float(value)


class RetryBudget:
    """Finagle's retry budget: retries are a share of recent requests, plus a floor.

    Within the window (the last ``ttl`` seconds, to ``ttl / BUDGET_BUCKETS``),
    the retries allowed are ``min_per_second * ttl + percent * deposits``,
    minus the retries already withdrawn. One budget is shared by all the
    endpoints of a client: it bounds the client's retries, not one
    endpoint's.

    Args:
        percent: retries allowed per request deposited (0.2: one retry per
            five requests; Finagle's default). From 0 to 1000.
        min_per_second: retries a second allowed whatever the requests (10,
            Finagle's default), so that a client sending a request a minute
            may still retry it; 0 for none.
        ttl: seconds a deposit or a withdrawal counts for (10, Finagle's
            default); from 1 ms to an hour.
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).

    Attributes:
        exhausted: withdrawals refused (the budget was spent).
    """

    __slots__ = (
        "_clock",
        "_deposit",
        "_reserve",
        "_ring",
        "_slice",
        "_total",
        "_width",
        "exhausted",
        "min_per_second",
        "percent",
        "ttl",
    )

    def __init__(
        self,
        *,
        percent: float = 0.2,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # percent is bounded only to keep the integers sane: 1000 retries a
        # request is already no budget at all.
        self.percent = _number("percent", percent, low=0.0, low_open=False, high=1000.0)
        self.min_per_second = _number(
            "min_per_second", min_per_second, low=0.0, low_open=False, high=1e6
        )
        self.ttl = _number("ttl", ttl, low=0.001, low_open=False, high=3600.0)
        self._clock = clock
        self._deposit = round(self.percent * TOKEN_SCALE)
        # The floor is a standing reserve of min_per_second * ttl retries:
        # withdrawals against it expire after ttl like any other, so it
        # refills at min_per_second.
        self._reserve = round(self.min_per_second * self.ttl * TOKEN_SCALE)
        self._width = self.ttl / BUDGET_BUCKETS
        self._ring = [0] * BUDGET_BUCKETS  # net tokens per slice
        self._total = 0  # sum of the ring
        self._slice = math.floor(clock() / self._width)  # the newest slice's number
        self.exhausted = 0

    def _turn(self) -> None:
        """Take the slices that have left the window off the total, and empty them."""
        current = math.floor(self._clock() / self._width)
        last = self._slice
        if current <= last:  # the same slice (or a clock that went back: stay put)
            return
        ring = self._ring
        if current - last >= BUDGET_BUCKETS:
            ring[:] = [0] * BUDGET_BUCKETS
            self._total = 0
        else:
            for s in range(last + 1, current + 1):
                i = s % BUDGET_BUCKETS
                self._total -= ring[i]
                ring[i] = 0
        self._slice = current

    def deposit(self) -> None:
        """Count one original request (not a retry): it earns ``percent`` of a retry."""
        self._turn()
        self._ring[self._slice % BUDGET_BUCKETS] += self._deposit
        self._total += self._deposit

    def try_withdraw(self) -> bool:
        """Take one retry from the budget: True if it had one, else False (counted)."""
        self._turn()
        if self._reserve + self._total < TOKEN_SCALE:
            self.exhausted += 1
            return False
        self._ring[self._slice % BUDGET_BUCKETS] -= TOKEN_SCALE
        self._total -= TOKEN_SCALE
        return True

    @property
    def balance(self) -> float:
        """Retries available now (a float: deposits earn fractions of a retry).

        Negative for a while when deposits leave the window before the
        retries they paid for: those retries still count until they leave.
        """
        self._turn()
        return (self._reserve + self._total) / TOKEN_SCALE

    def __repr__(self) -> str:
        return f"<RetryBudget balance={self.balance:.2f} exhausted={self.exhausted}>"


class Backoff:
    """Exponential backoff with jitter: the wait before retry number ``attempt``.

    The ceiling for attempt n is ``min(cap, base * multiplier ** (n - 1))``.
    With ``jitter="full"`` the delay is uniform in [0, ceiling]; with
    ``"equal"``, uniform in [ceiling / 2, ceiling]; with ``"none"``, the
    ceiling. Full jitter is the default: of the three it spreads the retries
    of clients failed by the same event the most, and so finishes the work
    with the fewest collisions (AWS's "Exponential Backoff and Jitter");
    equal jitter keeps a minimum wait, for a backend that needs one.

    Args:
        base: the first retry's ceiling, seconds. 10 ms: long enough for a
            reconnect to another endpoint to matter, short enough to stay
            well inside a typical call deadline.
        cap: the largest ceiling, seconds. 1 s: a call waiting longer than
            that for a retry is better failed (its deadline has usually
            passed anyway).
        multiplier: the growth per attempt (2: doubling), at least 1.
        jitter: ``"full"``, ``"equal"`` or ``"none"``.
        rng: the source of randomness (a seeded ``random.Random`` in tests);
            a new ``random.Random()`` by default.

    Raises:
        ValueError: an argument out of range.
    """

    __slots__ = ("_rng", "_saturate", "base", "cap", "jitter", "multiplier")

    def __init__(
        self,
        *,
        base: float = 0.01,
        cap: float = 1.0,
        multiplier: float = 2.0,
        jitter: Jitter = "full",
        rng: random.Random | None = None,
    ) -> None:
        self.base = _number("base", base, low=0.0, low_open=True, high=3600.0)
        self.cap = _number("cap", cap, low=self.base, low_open=False, high=3600.0)
        self.multiplier = _number("multiplier", multiplier, low=1.0, low_open=False, high=1000.0)
        if jitter not in JITTERS:
            raise ValueError(f"jitter must be one of {', '.join(JITTERS)}, got {jitter!r}")
        self.jitter: Jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        # An attempt from which the ceiling is the cap: from there on the
        # power is not computed (it would overflow a float for large
        # attempts). One past the exact attempt, against rounding in log().
        self._saturate: float
        if self.cap == self.base:
            self._saturate = 1
        elif self.multiplier == 1.0:
            self._saturate = math.inf
        else:
            self._saturate = 2 + math.ceil(math.log(self.cap / self.base, self.multiplier))

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay of retry ``attempt`` (1 is the first retry)."""
        if attempt < 1:
            raise ValueError(f"attempt must be at least 1 (the first retry), got {attempt}")
        if attempt >= self._saturate:
            return self.cap
        return min(self.cap, self.base * self.multiplier ** (attempt - 1))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1 is the first retry).

        Raises:
            ValueError: ``attempt`` under 1.
        """
        ceiling = self.ceiling(attempt)
        jitter = self.jitter
        if jitter == "full":
            return self._rng.uniform(0.0, ceiling)
        if jitter == "equal":
            half = ceiling / 2
            return half + self._rng.uniform(0.0, half)
        return ceiling

    def __repr__(self) -> str:
        return (
            f"Backoff(base={self.base}, cap={self.cap}, multiplier={self.multiplier}, "
            f"jitter={self.jitter!r})"
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Whether and how a client retries a failed call.

    Args:
        max_attempts: attempts per call, the first included (3: two
            retries; 1 turns retries off). Past two retries a call rarely
            succeeds where the first three failed, and each try spends the
            caller's deadline.
        backoff: the wait before each retry (``Backoff()``: full jitter from
            10 ms, doubling, capped at 1 s).
        percent, min_per_second, ttl: the client's ``RetryBudget``
            (Finagle's defaults: 20% of requests, 10 a second, over 10 s).
        budget: a ``RetryBudget`` to use instead, shared by several clients
            that call the same backend (their retries then share one bound).
        idempotent: the message types safe to send twice (the server acting
            on both does no harm: reads, puts of a whole value). Empty by
            default: only the caller knows.

    Raises:
        ValueError: a field out of range.
    """

    max_attempts: int = 3
    backoff: Backoff = field(default_factory=Backoff)
    percent: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0
    budget: RetryBudget | None = None
    idempotent: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            raise ValueError(f"max_attempts must be an int from 1 to 100, got {attempts!r}")
        if not isinstance(self.backoff, Backoff):
            raise ValueError(f"backoff must be a Backoff, got {self.backoff!r}")
        if self.budget is not None and not isinstance(self.budget, RetryBudget):
            raise ValueError(f"budget must be a RetryBudget or None, got {self.budget!r}")
        # Checked now, not when the client makes the budget.
        _number("percent", self.percent, low=0.0, low_open=False, high=1000.0)
        _number("min_per_second", self.min_per_second, low=0.0, low_open=False, high=1e6)
        _number("ttl", self.ttl, low=0.001, low_open=False, high=3600.0)
        types: Iterable[object] = self.idempotent
        if not isinstance(types, frozenset):
            # A set or a list works too; kept as a frozenset (hashable, read-only).
            object.__setattr__(self, "idempotent", frozenset(types))
        for message_type in self.idempotent:
            if (
                isinstance(message_type, bool)
                or not isinstance(message_type, int)
                or not 1 <= message_type <= 0xFFFF
            ):
                raise ValueError(
                    f"idempotent holds message types (ints from 1 to 65535), got {message_type!r}"
                )

    def safe(self, sent: bool, message_type: int) -> bool:
        """May a failed attempt be retried without risk of the server acting twice?

        Args:
            sent: whether the server may have acted on the request. False
                when the connect failed, the breaker refused, or the
                connection drained before the request was written: the
                server cannot have seen it. An ``Overloaded`` reply also
                says the request was not run, so the client may pass False
                for it too.
            message_type: the request's type.

        Returns:
            True when the request was never sent, or its type is idempotent.
        """
        return not sent or message_type in self.idempotent

    def new_budget(self, clock: Callable[[], float] = time.monotonic) -> RetryBudget:
        """The budget a client uses: ``budget`` if given, else a new one from the fields."""
        if self.budget is not None:
            return self.budget
        return RetryBudget(
            percent=self.percent, min_per_second=self.min_per_second, ttl=self.ttl, clock=clock
        )
