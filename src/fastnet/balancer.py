"""Which endpoint takes the next call: ``Balancer`` and its ``EndpointState`` records.

Two ideas, both from load balancers that run at scale:

- **Power of two choices** (Mitzenmacher; Finagle's and Envoy's
  least-request balancer): draw two different endpoints at random and send
  the call to the one with fewer calls in flight. Picking the least loaded
  of *all* endpoints sends every client's burst to the same one (they all
  see it idle at once) and costs O(n); picking at random ignores a slow
  endpoint piling up calls. Two random choices avoid both: the maximum load
  drops exponentially compared with one random choice, and a pick is O(1).
- **Outlier ejection** (Envoy's consecutive-failure detection): after
  ``consecutive_failures`` connection-level failures in a row, an endpoint
  is left out of the picks for ``base_ejection_seconds`` times its
  ejection level (1 the first time, 2 the next...), up to
  ``max_ejection_seconds``, so an endpoint that keeps failing is tried
  less and less often. Each ``base_ejection_seconds`` spent back in service
  without an ejection lowers the level by one, as Envoy does, so a blip
  next week is not punished for this week's outage. Never more than
  ``max_ejection_percent`` of the endpoints are out at once: ejection is for
  outliers, and when half of the backend fails the fault is not in the
  endpoints it would leave (the breaker and the retry budget handle that).

What counts as a failure is the client's call: connection refused or
broken, connect or call timeouts; not error replies, which come from a
working server.

Strategy: the endpoints in service are kept in a list, changed only on an
ejection or a return (O(n) then, rare); the ejected ones in a heap by the
time they are due back. ``pick()`` looks at the heap's top (one comparison
with the clock, and only while something is ejected), returns what is due,
and draws two indexes from the list: O(1). With ``exclude`` (a retry
leaving out endpoints already tried), it first filters the list: O(n) on
retries only. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Collection, Iterable

__all__ = ["Balancer", "EndpointState"]


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class EndpointState:
    """One endpoint as the balancer sees it.

    Attributes:
        address: the endpoint, as given (``"127.0.0.1:7000"``).
        outstanding: calls in flight to it; the client adds one when a call
            starts and takes it off when the call ends (whatever the end).
        consecutive_failures: connection-level failures since the last
            success (or since it came back from an ejection).
        ejections: times it was ejected, in all.
        ejected_until: the clock time it is due back, while ejected; else
            None.
    """

    __slots__ = (
        "_back_at",
        "_level",
        "address",
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "outstanding",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.outstanding = 0
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until: float | None = None
        self._level = 0  # the ejection multiplier (decays while in service)
        self._back_at = 0.0  # when it last came back (for the decay)

    def __repr__(self) -> str:
        out = f" ejected until {self.ejected_until:.3f}" if self.ejected_until is not None else ""
        return f"<EndpointState {self.address} outstanding={self.outstanding}{out}>"


class Balancer:
    """Picks endpoints by power of two choices; ejects those that keep failing.

    Args:
        addresses: the endpoints (at least one; no duplicates).
        consecutive_failures: failures in a row that eject an endpoint (5,
            Envoy's default: one or two failed connects happen to healthy
            servers; five in a row without a success rarely do).
        base_ejection_seconds: the first ejection's length; the n-th in a
            row lasts n times it (30 s, Envoy's default: long enough for a
            crashed process to be restarted by its supervisor).
        max_ejection_seconds: the longest ejection (300 s, Envoy's default:
            a dead endpoint is still tried every five minutes, so it comes
            back without anyone's action once it is fixed).
        max_ejection_percent: the most endpoints ejected at once, as a share
            of all, rounded down: with 2 endpoints and 50%, one may be
            ejected; with 1, none. 50%, where Envoy has 10% (for clusters of
            hundreds of hosts, and it then ejects one host anyway): a fastnet
            client typically has two to a handful of endpoints, and 10% of
            those is nobody.
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).
        rng: the source of randomness (a seeded ``random.Random`` in tests);
            a new ``random.Random()`` by default.
        on_eject: called as ``on_eject(endpoint)`` after an ejection
            (``endpoint.ejected_until`` is set).
        on_return: called as ``on_return(endpoint)`` when an ejected
            endpoint is back in service.

    Attributes:
        endpoints: every endpoint's ``EndpointState``, in the order given.
        ejected_total: ejections, in all.
        returned_total: returns from ejection, in all.
        ejections_refused: ejections not made because ``max_ejection_percent``
            of the endpoints were out already (Envoy's "overflow").

    Raises:
        ValueError: no address, a duplicate address, or a value out of range.
    """

    __slots__ = (
        "_available",
        "_base",
        "_clock",
        "_ejected",
        "_max_ejected",
        "_max_seconds",
        "_on_eject",
        "_on_return",
        "_rng",
        "_seq",
        "_threshold",
        "ejected_total",
        "ejections_refused",
        "endpoints",
        "returned_total",
    )

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        consecutive_failures: int = 5,
        base_ejection_seconds: float = 30.0,
        max_ejection_seconds: float = 300.0,
        max_ejection_percent: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_eject: Callable[[EndpointState], object] | None = None,
        on_return: Callable[[EndpointState], object] | None = None,
    ) -> None:
        addresses = list(addresses)
        if not addresses:
            raise ValueError("a balancer needs at least one address")
        seen: set[str] = set()
        for address in addresses:
            if not isinstance(address, str):
                raise ValueError(f"an address is a str, got {address!r}")
            if address in seen:
                raise ValueError(f"duplicate address {address!r}")
            seen.add(address)
        if (
            isinstance(consecutive_failures, bool)
            or not isinstance(consecutive_failures, int)
            or consecutive_failures < 1
        ):
            raise ValueError(
                f"consecutive_failures must be an int of at least 1, got {consecutive_failures!r}"
            )
        if not (_is_number(base_ejection_seconds) and base_ejection_seconds > 0):
            raise ValueError(
                f"base_ejection_seconds must be a positive finite number, "
                f"got {base_ejection_seconds!r}"
            )
        if not (_is_number(max_ejection_seconds) and max_ejection_seconds >= base_ejection_seconds):
            raise ValueError(
                f"max_ejection_seconds must be finite and at least base_ejection_seconds "
                f"({base_ejection_seconds}), got {max_ejection_seconds!r}"
            )
        if not (_is_number(max_ejection_percent) and 0 <= max_ejection_percent <= 100):
            raise ValueError(
                f"max_ejection_percent must be from 0 to 100, got {max_ejection_percent!r}"
            )
        self.endpoints = tuple(EndpointState(address) for address in addresses)
        self._available = list(self.endpoints)
        # (due back, sequence, endpoint): the sequence breaks ties, so
        # endpoints are never compared.
        self._ejected: list[tuple[float, int, EndpointState]] = []
        self._seq = 0
        # Rounded down, with a hair of tolerance for shares such as 30% of
        # 10 that a float product puts just under a whole number.
        self._max_ejected = math.floor(len(self.endpoints) * max_ejection_percent / 100 + 1e-9)
        self._threshold = consecutive_failures
        self._base = float(base_ejection_seconds)
        self._max_seconds = float(max_ejection_seconds)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._on_eject = on_eject
        self._on_return = on_return
        self.ejected_total = 0
        self.returned_total = 0
        self.ejections_refused = 0

    # -------------------------------------------------------------- picking

    def pick(self, exclude: Collection[EndpointState] = ()) -> EndpointState | None:
        """The endpoint for the next call, or None when none is in service.

        Ejected endpoints whose time is up come back first (``on_return``).
        Then, of the endpoints in service and not in ``exclude``: two drawn
        at random (two different ones), the one with fewer ``outstanding``
        calls (the first drawn on a tie); with only one candidate, that one.

        Args:
            exclude: endpoints not to pick (those a retry already tried).
        """
        ejected = self._ejected
        if ejected and ejected[0][0] <= self._clock():
            self._return_due()
        candidates = self._available
        if exclude:
            candidates = [ep for ep in candidates if ep not in exclude]
        n = len(candidates)
        if n < 2:
            return candidates[0] if n else None
        rng = self._rng
        i = rng.randrange(n)
        j = rng.randrange(n - 1)
        if j >= i:  # a second index, different from the first, uniform over the rest
            j += 1
        first = candidates[i]
        second = candidates[j]
        return second if second.outstanding < first.outstanding else first

    @property
    def available(self) -> tuple[EndpointState, ...]:
        """The endpoints in service (not ejected), after returning those due."""
        ejected = self._ejected
        if ejected and ejected[0][0] <= self._clock():
            self._return_due()
        return tuple(self._available)

    # ------------------------------------------------------------ outcomes

    def success(self, ep: EndpointState) -> None:
        """A call to ``ep`` reached a working server: its failure streak ends."""
        ep.consecutive_failures = 0

    def failure(self, ep: EndpointState) -> None:
        """A connection-level failure on ``ep``; the ``consecutive_failures``-th in a row ejects it.

        A failure reported while ``ep`` is ejected (a call started before)
        changes nothing. An ejection that would put more than
        ``max_ejection_percent`` of the endpoints out is not made (counted in
        ``ejections_refused``); the next failure tries again.
        """
        if ep.ejected_until is not None:
            return
        ep.consecutive_failures += 1
        if ep.consecutive_failures >= self._threshold:
            self._eject(ep)

    # ------------------------------------------------------------- moving

    def _eject(self, ep: EndpointState) -> None:
        if len(self._ejected) >= self._max_ejected:
            self.ejections_refused += 1
            return
        now = self._clock()
        base = self._base
        if ep._level:
            # One level off for each base period back in service.
            ep._level = max(0, ep._level - math.floor((now - ep._back_at) / base))
        ep._level += 1
        until = now + min(self._max_seconds, base * ep._level)
        ep.ejected_until = until
        ep.ejections += 1
        self._available.remove(ep)
        self._seq += 1
        heapq.heappush(self._ejected, (until, self._seq, ep))
        self.ejected_total += 1
        if self._on_eject is not None:
            self._on_eject(ep)

    def _return_due(self) -> None:
        now = self._clock()
        ejected = self._ejected
        while ejected and ejected[0][0] <= now:
            until, _, ep = heapq.heappop(ejected)
            ep.ejected_until = None
            ep.consecutive_failures = 0
            ep._back_at = until
            self._available.append(ep)
            self.returned_total += 1
            if self._on_return is not None:
                self._on_return(ep)
