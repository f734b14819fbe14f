"""Endpoint choice and outlier ejection (``fastnet.balancer``).

Power of two choices checked with a scripted random source (each pair's
less loaded endpoint wins) and with a seeded one over many picks (the
shares P2C predicts; even shares at equal load). Ejection, its growing
length and its decay, the cap on ejected endpoints, and returns, all on a
fake clock. A hypothesis test drives random failures, successes and time
and checks the invariants after every step.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet.balancer import Balancer, EndpointState


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedRandom(random.Random):
    """``randrange`` answers from a script, so each pick's pair is known."""

    def __new__(cls, script: list[int]) -> ScriptedRandom:
        # CPython 3.10's Random.__new__ seeds from its arguments (a list
        # cannot be hashed); 3.11 stopped doing that.
        return super().__new__(cls)

    def __init__(self, script: list[int]) -> None:
        super().__init__(0)
        self.script = list(script)
        self.calls: list[int] = []

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        (stop,) = args
        self.calls.append(stop)
        value = self.script.pop(0)
        assert 0 <= value < stop
        return value


def addresses(n: int) -> list[str]:
    return [f"127.0.0.1:{7000 + i}" for i in range(n)]


def make(n: int, **kwargs: Any) -> tuple[Balancer, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    events: list[tuple[str, str]] = []
    balancer = Balancer(
        addresses(n),
        clock=clock,
        rng=kwargs.pop("rng", random.Random(0)),
        on_eject=lambda ep: events.append(("eject", ep.address)),
        on_return=lambda ep: events.append(("return", ep.address)),
        **kwargs,
    )
    return balancer, clock, events


def fail(balancer: Balancer, ep: EndpointState, times: int) -> None:
    for _ in range(times):
        balancer.failure(ep)


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ([], {}, "at least one address"),
        (["a:1", "a:1"], {}, "duplicate"),
        ([("127.0.0.1", 1)], {}, "str"),
        (["a:1"], {"consecutive_failures": 0}, "consecutive_failures"),
        (["a:1"], {"consecutive_failures": 2.0}, "consecutive_failures"),
        (["a:1"], {"base_ejection_seconds": 0.0}, "base_ejection_seconds"),
        (["a:1"], {"base_ejection_seconds": math.inf}, "base_ejection_seconds"),
        (["a:1"], {"max_ejection_seconds": 10.0}, "max_ejection_seconds"),  # under base
        (["a:1"], {"max_ejection_seconds": math.nan}, "max_ejection_seconds"),
        (["a:1"], {"max_ejection_percent": -1.0}, "max_ejection_percent"),
        (["a:1"], {"max_ejection_percent": 100.5}, "max_ejection_percent"),
    ],
)
def test_rejects_bad_arguments(args: list[Any], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Balancer(args, **kwargs)


def test_endpoints_start_clean() -> None:
    balancer = Balancer(iter(addresses(3)))  # any iterable
    assert [ep.address for ep in balancer.endpoints] == addresses(3)
    for ep in balancer.endpoints:
        assert (ep.outstanding, ep.consecutive_failures, ep.ejections) == (0, 0, 0)
        assert ep.ejected_until is None
    assert balancer.available == balancer.endpoints
    assert (balancer.ejected_total, balancer.returned_total, balancer.ejections_refused) == (
        0,
        0,
        0,
    )
    assert "127.0.0.1:7000" in repr(balancer.endpoints[0])


# --------------------------------------------------------------------- P2C


def test_the_less_loaded_of_the_pair_wins() -> None:
    # randrange(n) then randrange(n - 1), the second index skipping the first.
    rng = ScriptedRandom([0, 0, 2, 0, 3, 2, 1, 1])
    balancer, _clock, _ = make(4, rng=rng)
    a, b, c, d = balancer.endpoints
    a.outstanding, b.outstanding, c.outstanding, d.outstanding = 5, 1, 3, 0
    assert balancer.pick() is b  # (0, 1): a=5 vs b=1
    assert balancer.pick() is c  # (2, 0): c=3 vs a=5
    assert balancer.pick() is d  # (3, 2): d=0 vs c=3
    assert balancer.pick() is b  # (1, 2): b=1 vs c=3
    assert rng.calls == [4, 3] * 4


def test_a_tie_goes_to_the_first_drawn() -> None:
    balancer, _clock, _ = make(3, rng=ScriptedRandom([2, 0, 1, 1]))
    _a, b, c = balancer.endpoints
    assert balancer.pick() is c  # (2, 0)
    assert balancer.pick() is b  # (1, 2)


def test_p2c_shares_follow_the_load_order() -> None:
    # With loads 0 < 1 < 2 < 3, the endpoint of rank k (0 the least loaded)
    # wins the pairs where it is the least loaded: 2(n-1-k) of n(n-1)
    # ordered pairs, so 1/2, 1/3, 1/6 and never the most loaded one.
    balancer, _clock, _ = make(4, rng=random.Random(7))
    for load, ep in enumerate(balancer.endpoints):
        ep.outstanding = load
    picks = Counter(balancer.pick() for _ in range(24_000))
    shares = [picks[ep] / 24_000 for ep in balancer.endpoints]
    assert shares[0] == pytest.approx(1 / 2, abs=0.02)
    assert shares[1] == pytest.approx(1 / 3, abs=0.02)
    assert shares[2] == pytest.approx(1 / 6, abs=0.02)
    assert shares[3] == 0.0


def test_p2c_is_even_at_equal_load() -> None:
    balancer, _clock, _ = make(5, rng=random.Random(11))
    picks = Counter(balancer.pick() for _ in range(50_000))
    assert len(picks) == 5
    assert all(9_300 < count < 10_700 for count in picks.values()), picks


def test_p2c_keeps_loads_close() -> None:
    # Calls that start on the picked endpoint and end in random order: the
    # outstanding counts stay within a few of each other.
    rng = random.Random(3)
    balancer, _clock, _ = make(4, rng=random.Random(5))
    in_flight: list[EndpointState] = []
    spread = 0
    for _ in range(5_000):
        ep = balancer.pick()
        assert ep is not None
        ep.outstanding += 1
        in_flight.append(ep)
        if len(in_flight) > 40:
            done = in_flight.pop(rng.randrange(len(in_flight)))
            done.outstanding -= 1
        loads = [e.outstanding for e in balancer.endpoints]
        spread = max(spread, max(loads) - min(loads))
    assert spread <= 8


def test_one_candidate_and_none() -> None:
    balancer, _clock, _ = make(1, rng=ScriptedRandom([]))  # no draw needed
    (only,) = balancer.endpoints
    assert balancer.pick() is only
    assert balancer.pick(exclude=[only]) is None


def test_exclude_leaves_endpoints_out() -> None:
    balancer, _clock, _ = make(3, rng=random.Random(1))
    a, b, c = balancer.endpoints
    a.outstanding = 100  # would lose every pair it is in anyway
    for _ in range(200):
        assert balancer.pick(exclude=(b,)) in (a, c)
        assert balancer.pick(exclude={b, c}) is a
    assert balancer.pick(exclude=balancer.endpoints) is None


# --------------------------------------------------------------- ejection


def test_ejected_after_consecutive_failures() -> None:
    balancer, clock, events = make(3, consecutive_failures=5, base_ejection_seconds=30.0)
    a, b, c = balancer.endpoints
    fail(balancer, a, 4)
    assert a.consecutive_failures == 4
    assert a.ejected_until is None
    fail(balancer, a, 1)
    assert a.ejected_until == clock.now + 30.0
    assert a.ejections == 1
    assert balancer.ejected_total == 1
    assert events == [("eject", a.address)]
    assert balancer.available == (b, c)
    for _ in range(300):
        assert balancer.pick() in (b, c)


def test_success_resets_the_streak() -> None:
    balancer, _clock, _ = make(3, consecutive_failures=3)
    a = balancer.endpoints[0]
    fail(balancer, a, 2)
    balancer.success(a)
    assert a.consecutive_failures == 0
    fail(balancer, a, 2)
    assert a.ejected_until is None  # 2 in a row, not 4
    fail(balancer, a, 1)
    assert a.ejected_until is not None


def test_failures_while_ejected_change_nothing() -> None:
    balancer, _clock, _ = make(3, consecutive_failures=2)
    a = balancer.endpoints[0]
    fail(balancer, a, 2)
    until = a.ejected_until
    fail(balancer, a, 10)  # calls that were in flight when it was ejected
    assert a.ejected_until == until
    assert a.ejections == 1
    assert a.consecutive_failures == 2
    assert balancer.ejected_total == 1


def test_returns_when_its_time_is_up() -> None:
    balancer, clock, events = make(3, consecutive_failures=1, base_ejection_seconds=30.0)
    a, b, c = balancer.endpoints
    balancer.failure(a)
    clock.advance(29.999)
    assert a not in balancer.available
    assert balancer.returned_total == 0
    clock.advance(0.001)
    assert balancer.pick() is not None  # the pick returns it first
    assert a.ejected_until is None
    assert a.consecutive_failures == 0  # a fresh start
    assert balancer.returned_total == 1
    assert events == [("eject", a.address), ("return", a.address)]
    assert set(balancer.available) == {a, b, c}


def test_available_returns_those_due_too() -> None:
    balancer, clock, events = make(2, consecutive_failures=1, base_ejection_seconds=5.0)
    a, b = balancer.endpoints
    balancer.failure(a)
    clock.advance(5.0)
    assert set(balancer.available) == {a, b}
    assert events[-1] == ("return", a.address)


def test_ejection_grows_with_each_ejection_up_to_the_cap() -> None:
    balancer, clock, _ = make(
        4, consecutive_failures=2, base_ejection_seconds=30.0, max_ejection_seconds=100.0
    )
    a = balancer.endpoints[0]
    lengths = []
    for _ in range(5):
        fail(balancer, a, 2)  # straight after it came back: no decay
        assert a.ejected_until is not None
        lengths.append(a.ejected_until - clock.now)
        clock.now = a.ejected_until
        balancer.pick()
    assert lengths == [30.0, 60.0, 90.0, 100.0, 100.0]
    assert a.ejections == 5
    assert balancer.ejected_total == balancer.returned_total == 5


def test_ejection_level_decays_in_service() -> None:
    balancer, clock, _ = make(4, consecutive_failures=1, base_ejection_seconds=10.0)
    a = balancer.endpoints[0]
    for _ in range(3):  # levels 1, 2, 3: out 10, 20, 30 s
        balancer.failure(a)
        assert a.ejected_until is not None
        clock.now = a.ejected_until
        balancer.pick()
    clock.advance(19.9)  # one whole base period in service: one level off
    balancer.failure(a)
    assert a.ejected_until is not None
    assert a.ejected_until == pytest.approx(clock.now + 30.0)  # level 3 again, not 4
    clock.now = a.ejected_until
    balancer.pick()
    clock.advance(1000.0)  # long healthy: back to the first level
    balancer.failure(a)
    assert a.ejected_until == clock.now + 10.0
    assert a.ejections == 5


@pytest.mark.parametrize(
    ("n", "percent", "most"),
    [
        (1, 50.0, 0),
        (2, 50.0, 1),
        (3, 50.0, 1),
        (4, 50.0, 2),
        (10, 30.0, 3),
        (3, 100.0, 3),
        (5, 10.0, 0),
        (10, 0.0, 0),
    ],
)
def test_max_ejection_percent(n: int, percent: float, most: int) -> None:
    balancer, _clock, _ = make(n, consecutive_failures=1, max_ejection_percent=percent)
    for ep in balancer.endpoints:
        balancer.failure(ep)
    ejected = [ep for ep in balancer.endpoints if ep.ejected_until is not None]
    assert len(ejected) == most
    assert balancer.ejections_refused == n - most
    assert len(balancer.available) == n - most


def test_refused_ejection_is_tried_again_on_the_next_failure() -> None:
    balancer, clock, _ = make(2, consecutive_failures=3, base_ejection_seconds=10.0)
    a, b = balancer.endpoints
    fail(balancer, a, 3)
    fail(balancer, b, 3)  # a is out: b would make 100%
    assert b.ejected_until is None
    assert balancer.ejections_refused == 1
    assert balancer.pick() is b  # the only one left, failing or not
    clock.advance(10.0)
    balancer.pick()  # a is back
    balancer.failure(b)  # b's streak is 4 now: ejectable
    assert b.ejected_until is not None
    assert balancer.available == (a,)


def test_all_ejected_picks_none() -> None:
    balancer, clock, _ = make(
        2, consecutive_failures=1, base_ejection_seconds=5.0, max_ejection_percent=100.0
    )
    a, b = balancer.endpoints
    balancer.failure(a)
    clock.advance(1.0)
    balancer.failure(b)
    assert balancer.pick() is None
    clock.advance(4.0)  # a's time is up, not b's
    assert balancer.pick() is a


def test_default_clock_and_rng() -> None:
    balancer = Balancer(addresses(2))
    assert balancer.pick() in balancer.endpoints


# --------------------------------------------------------------- properties

steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["fail", "ok"]), st.integers(0, 5)),
        st.tuples(st.just("wait"), st.integers(0, 40)),
        st.tuples(st.just("pick"), st.integers(0, 5)),
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(
    script=steps,
    n=st.integers(1, 6),
    percent=st.sampled_from([0.0, 20.0, 50.0, 100.0]),
    threshold=st.integers(1, 3),
)
def test_invariants_hold(
    script: list[tuple[str, int]], n: int, percent: float, threshold: int
) -> None:
    clock = FakeClock()
    returned: list[EndpointState] = []
    balancer = Balancer(
        addresses(n),
        consecutive_failures=threshold,
        base_ejection_seconds=10.0,
        max_ejection_seconds=35.0,
        max_ejection_percent=percent,
        clock=clock,
        rng=random.Random(0),
        on_return=returned.append,
    )
    most = math.floor(n * percent / 100)
    for action, arg in script:
        ep = balancer.endpoints[arg % n]
        if action == "fail":
            was_out = ep.ejected_until is not None
            before = ep.ejections
            balancer.failure(ep)
            if ep.ejected_until is not None and not was_out:
                assert ep.ejections == before + 1
                length = ep.ejected_until - clock.now
                assert 10.0 <= length <= 35.0
        elif action == "ok":
            balancer.success(ep)
            assert ep.consecutive_failures == 0
        elif action == "wait":
            clock.advance(arg)
        else:
            exclude = balancer.endpoints[:arg]
            picked = balancer.pick(exclude)
            available = [e for e in balancer.endpoints if e.ejected_until is None]
            # After a pick nothing due is still out.
            assert all(e.ejected_until > clock.now for e in balancer.endpoints if e.ejected_until)
            candidates = [e for e in available if e not in exclude]
            assert (picked is None) == (not candidates)
            assert picked is None or picked in candidates
        ejected = [e for e in balancer.endpoints if e.ejected_until is not None]
        assert len(ejected) <= most
        assert set(balancer._available) == set(balancer.endpoints) - set(ejected)
        assert len(balancer._available) == n - len(ejected)
    assert balancer.returned_total == len(returned)
    assert balancer.ejected_total == sum(e.ejections for e in balancer.endpoints)
