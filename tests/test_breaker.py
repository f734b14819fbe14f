"""The circuit breaker (``fastnet.breaker``): every transition, both windows, late results.

All on a fake clock: nothing sleeps. The hypothesis tests replay random
call histories against a brute-force recount of the window (the last N
calls, or the calls of the current second and the N - 1 before it) and
check that the breaker opens exactly when the recount says it should.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet.breaker import (
    CLOSED,
    HALF_OPEN,
    MAX_WINDOW,
    MAX_WINDOW_SECONDS,
    OPEN,
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpen,
    State,
)
from fastnet.errors import FastnetError


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    start: float = 1000.0, **policy: Any
) -> tuple[CircuitBreaker, FakeClock, list[tuple[State, State]]]:
    clock = FakeClock(start)
    changes: list[tuple[State, State]] = []

    def on_change(breaker: CircuitBreaker, old: State, new: State) -> None:
        assert breaker.state == new  # called after the move
        changes.append((old, new))

    breaker = CircuitBreaker(
        BreakerPolicy(**policy), name="127.0.0.1:7000", clock=clock, on_change=on_change
    )
    return breaker, clock, changes


def record_many(breaker: CircuitBreaker, outcomes: str, seconds: float = 0.001) -> None:
    """``F`` a failure, ``o`` a success."""
    for c in outcomes:
        assert breaker.allow()
        breaker.record(c == "o", seconds)


def trip(breaker: CircuitBreaker) -> None:
    while breaker.state == CLOSED:
        assert breaker.allow()
        breaker.record(False, 0.001)


# ------------------------------------------------------------------ policy


def test_policy_defaults() -> None:
    policy = BreakerPolicy()
    assert policy.window == 100
    assert policy.window_seconds is None
    assert policy.failure_rate == 0.5
    assert policy.slow_call_seconds is None
    assert policy.slow_call_rate == 1.0
    assert policy.min_calls == 20
    assert policy.open_seconds == 5.0
    assert policy.half_open_calls == 5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("window", 0),
        ("window", MAX_WINDOW + 1),
        ("window", 10.0),
        ("window", True),
        ("window_seconds", 0),
        ("window_seconds", 2.5),
        ("window_seconds", MAX_WINDOW_SECONDS + 1),
        ("window_seconds", math.inf),
        ("window_seconds", math.nan),
        ("failure_rate", 0.0),
        ("failure_rate", 1.01),
        ("failure_rate", math.nan),
        ("slow_call_seconds", 0.0),
        ("slow_call_seconds", -1.0),
        ("slow_call_seconds", math.inf),
        ("slow_call_rate", 0.0),
        ("slow_call_rate", 2.0),
        ("min_calls", 0),
        ("min_calls", 2.0),
        ("open_seconds", 0.0),
        ("open_seconds", math.inf),
        ("open_seconds", "5"),
        ("half_open_calls", 0),
    ],
)
def test_policy_rejects_out_of_range(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field) as info:
        BreakerPolicy(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_policy_accepts_edges() -> None:
    BreakerPolicy(window=1, min_calls=1, failure_rate=1.0, slow_call_rate=1.0, half_open_calls=1)
    BreakerPolicy(window_seconds=1)
    BreakerPolicy(window_seconds=60.0, slow_call_seconds=0.5)


# ------------------------------------------------------ closed -> open


def test_opens_at_the_failure_rate() -> None:
    breaker, _clock, changes = make(window=10, min_calls=10, failure_rate=0.5)
    record_many(breaker, "oooooFFFF")  # 9 calls: not judged yet
    assert breaker.state == CLOSED
    record_many(breaker, "F")  # 5 of 10 failed: 50% >= 50%
    assert breaker.state == OPEN
    assert changes == [(CLOSED, OPEN)]
    assert breaker.opened == 1


def test_stays_closed_under_the_failure_rate() -> None:
    breaker, _clock, _ = make(window=10, min_calls=10, failure_rate=0.5)
    record_many(breaker, "ooooooFFFF" * 5)  # always 4 of the last 10
    assert breaker.state == CLOSED
    assert breaker.window_counts() == (10, 4, 0)


def test_min_calls_respected() -> None:
    breaker, _clock, _ = make(window=100, min_calls=5)
    record_many(breaker, "FFFF")
    assert breaker.state == CLOSED  # 100% failures, but only 4 calls
    record_many(breaker, "F")
    assert breaker.state == OPEN


def test_min_calls_above_a_count_window_means_a_full_window() -> None:
    breaker, _clock, _ = make(window=4, min_calls=20)
    record_many(breaker, "FFF")
    assert breaker.state == CLOSED
    record_many(breaker, "F")  # 4 calls fill the window: judged
    assert breaker.state == OPEN


def test_opens_at_the_slow_call_rate() -> None:
    breaker, _clock, _ = make(
        window=10, min_calls=10, slow_call_seconds=1.0, slow_call_rate=0.5, failure_rate=1.0
    )
    record_many(breaker, "ooooo", seconds=0.999)  # just under: not slow
    record_many(breaker, "oooo", seconds=1.0)  # at the threshold: slow, though they succeeded
    assert breaker.state == CLOSED
    assert breaker.window_counts() == (9, 0, 4)
    record_many(breaker, "o", seconds=5.0)  # 5 of 10 slow
    assert breaker.state == OPEN


def test_a_slow_failure_counts_twice() -> None:
    breaker, _clock, _ = make(
        window=10, min_calls=10, slow_call_seconds=1.0, slow_call_rate=1.0, failure_rate=1.0
    )
    record_many(breaker, "F", seconds=2.0)
    assert breaker.window_counts() == (1, 1, 1)


def test_slow_calls_off_by_default() -> None:
    breaker, _clock, _ = make(window=10, min_calls=10)
    record_many(breaker, "o" * 20, seconds=3600.0)
    assert breaker.state == CLOSED
    assert breaker.window_counts() == (10, 0, 0)


# ------------------------------------------------ open -> half_open


def test_open_refuses_until_open_seconds() -> None:
    breaker, clock, changes = make(window=5, min_calls=5, open_seconds=5.0)
    trip(breaker)
    assert not breaker.allow()
    assert breaker.rejected == 1
    clock.advance(2.0)
    with pytest.raises(CircuitOpen) as info:
        breaker.check()
    assert info.value.endpoint == "127.0.0.1:7000"
    assert info.value.retry_after == pytest.approx(3.0)
    assert isinstance(info.value, FastnetError)
    assert "127.0.0.1:7000" in str(info.value)
    assert breaker.rejected == 2
    assert breaker.retry_after == pytest.approx(3.0)
    clock.advance(2.999)
    assert not breaker.allow()
    assert breaker.state == OPEN
    clock.advance(0.001)  # exactly open_seconds after opening
    assert breaker.allow()
    assert breaker.state == HALF_OPEN
    assert breaker.retry_after == 0.0
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert breaker.rejected == 3


def test_open_does_not_move_without_a_call() -> None:
    breaker, clock, _ = make(window=5, min_calls=5)
    trip(breaker)
    clock.advance(3600.0)
    assert breaker.state == OPEN  # half-open happens on the next allow()
    assert breaker.retry_after == 0.0


def test_circuit_open_messages() -> None:
    error = CircuitOpen(retry_after=1.5)
    assert error.endpoint is None
    assert error.retry_after == 1.5
    assert str(error) == "circuit open: no calls for 1.500 s"
    error = CircuitOpen(endpoint="h:1", retry_after=0.25)
    assert str(error) == "circuit open for h:1: no calls for 0.250 s"
    error = CircuitOpen("every endpoint's breaker is open", endpoint=None, retry_after=0.0)
    assert str(error) == "every endpoint's breaker is open"
    assert (error.endpoint, error.retry_after) == (None, 0.0)


# ------------------------------------------------ half_open -> closed / open


def to_half_open(**policy: Any) -> tuple[CircuitBreaker, FakeClock, list[tuple[State, State]]]:
    breaker, clock, changes = make(window=5, min_calls=5, open_seconds=5.0, **policy)
    trip(breaker)
    clock.advance(5.0)
    return breaker, clock, changes


def test_half_open_closes_after_good_probes() -> None:
    breaker, _clock, changes = to_half_open(half_open_calls=3)
    permits = [breaker.check() for _ in range(3)]
    breaker.record(True, 0.01, permits[0])
    breaker.record(False, 0.01, permits[1])  # 1 of 3 failed: under 50%
    assert breaker.state == HALF_OPEN  # judged only when all are done
    breaker.record(True, 0.01, permits[2])
    assert breaker.state == CLOSED
    assert breaker.closed == 1
    assert breaker.window_counts() == (0, 0, 0)  # a fresh window
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_half_open_reopens_after_bad_probes() -> None:
    breaker, clock, changes = to_half_open(half_open_calls=5)
    permits = [breaker.check() for _ in range(5)]
    for permit, ok in zip(permits, [True, True, False, False, False], strict=True):
        breaker.record(ok, 0.01, permit)
    assert breaker.state == OPEN  # 3 of 5 failed
    assert breaker.opened == 2
    assert breaker.closed == 0
    assert changes[-1] == (HALF_OPEN, OPEN)
    # A new open period, from the time it reopened.
    assert not breaker.allow()
    clock.advance(4.999)
    assert not breaker.allow()
    clock.advance(0.001)
    assert breaker.allow()
    assert breaker.state == HALF_OPEN


def test_half_open_reopens_on_slow_probes() -> None:
    breaker, _clock, _ = to_half_open(
        half_open_calls=2, slow_call_seconds=1.0, slow_call_rate=0.5, failure_rate=1.0
    )
    breaker.allow()
    breaker.allow()
    breaker.record(True, 0.1)
    breaker.record(True, 1.0)  # 1 of 2 slow: 50%
    assert breaker.state == OPEN


def test_probes_beyond_half_open_calls_refused() -> None:
    breaker, _clock, _ = to_half_open(half_open_calls=2)
    assert breaker.allow()
    assert breaker.allow()
    rejected = breaker.rejected
    assert not breaker.allow()
    with pytest.raises(CircuitOpen) as info:
        breaker.check()
    assert info.value.retry_after == 0.0
    assert breaker.rejected == rejected + 2
    breaker.record(True, 0.01)  # one probe done: still no room (2 let through)
    assert not breaker.allow()


def test_release_gives_a_probe_back() -> None:
    breaker, _clock, _ = to_half_open(half_open_calls=2)
    first = breaker.check()
    second = breaker.check()
    assert not breaker.allow()
    breaker.release(second)  # cancelled before it was judged
    assert breaker.state == HALF_OPEN
    third = breaker.check()
    breaker.record(True, 0.01, first)
    breaker.record(True, 0.01, third)
    assert breaker.state == CLOSED


def test_release_in_closed_and_with_nothing_out_changes_nothing() -> None:
    breaker, _clock, _ = make(window=5, min_calls=5)
    permit = breaker.check()
    breaker.release(permit)
    assert breaker.state == CLOSED
    assert breaker.window_counts() == (0, 0, 0)
    breaker, _clock, _ = to_half_open(half_open_calls=1)
    breaker.release()  # no probe out: must not make room for two
    assert breaker.allow()
    assert not breaker.allow()


def test_a_late_result_from_before_opening_is_not_a_probe() -> None:
    breaker, clock, _ = make(window=5, min_calls=5, open_seconds=5.0, half_open_calls=2)
    slow_permit = breaker.check()  # a call let through while closed, still out
    trip(breaker)
    clock.advance(5.0)
    probe = breaker.check()
    assert breaker.state == HALF_OPEN
    # The slow call fails now: it says nothing about the recovered backend.
    breaker.record(False, 6.0, slow_permit)
    assert breaker.state == HALF_OPEN
    assert breaker.allow()  # the second probe's place is still free
    assert not breaker.allow()
    breaker.record(True, 0.01, probe)
    breaker.record(True, 0.01)
    assert breaker.state == CLOSED


def test_a_late_release_from_before_opening_frees_no_probe() -> None:
    breaker, clock, _ = make(window=5, min_calls=5, open_seconds=5.0, half_open_calls=1)
    old = breaker.check()
    trip(breaker)
    clock.advance(5.0)
    assert breaker.allow()
    breaker.release(old)
    assert not breaker.allow()  # the one probe is still out


def test_a_late_result_while_open_changes_nothing() -> None:
    breaker, _clock, _ = make(window=5, min_calls=5)
    old = breaker.check()
    trip(breaker)
    breaker.record(True, 0.01, old)
    breaker.record(True, 0.01)  # without a permit: nothing is allowed while open
    assert breaker.state == OPEN
    assert breaker.window_counts() == (0, 0, 0)


def test_a_permitless_late_result_with_no_probe_out_is_dropped() -> None:
    breaker, _clock, _ = to_half_open(half_open_calls=1)
    breaker.allow()
    breaker.release()  # half-open, no probe out
    breaker.record(False, 0.01)  # so this cannot be a probe's result
    assert breaker.state == HALF_OPEN
    assert breaker.allow()
    breaker.record(True, 0.01)
    assert breaker.state == CLOSED


def test_a_late_result_does_not_land_in_the_next_closed_window() -> None:
    breaker, _clock, _ = to_half_open(half_open_calls=1)
    probe = breaker.check()
    breaker.record(True, 0.01, probe)
    assert breaker.state == CLOSED
    breaker.record(False, 0.01, probe)  # the same permit again: a generation ago
    assert breaker.window_counts() == (0, 0, 0)


def test_permits_are_generations() -> None:
    breaker, clock, _ = make(window=5, min_calls=5, open_seconds=1.0, half_open_calls=1)
    assert breaker.check() == breaker.generation == 0
    trip(breaker)
    assert breaker.generation == 1
    clock.advance(1.0)
    assert breaker.check() == 2
    breaker.record(True, 0.0, 2)
    assert breaker.generation == 3
    assert breaker.check() == 3


# ------------------------------------------------------------------- reset


def test_reset_closes_and_drops_earlier_results() -> None:
    breaker, _clock, changes = make(window=5, min_calls=5)
    old = breaker.check()
    trip(breaker)
    breaker.reset()
    assert breaker.state == CLOSED
    assert changes[-1] == (OPEN, CLOSED)
    assert (breaker.opened, breaker.closed) == (1, 0)  # counters keep counting
    breaker.record(False, 0.01, old)
    assert breaker.window_counts() == (0, 0, 0)
    breaker.reset()  # already closed: no change reported
    assert changes[-1] == (OPEN, CLOSED)
    assert len(changes) == 2


def test_reset_in_closed_empties_the_window() -> None:
    breaker, _clock, changes = make(window=10, min_calls=10)
    record_many(breaker, "FFo")
    breaker.reset()
    assert breaker.window_counts() == (0, 0, 0)
    assert changes == []


def test_default_breaker_uses_the_monotonic_clock() -> None:
    breaker = CircuitBreaker()
    assert breaker.allow()
    breaker.record(True, 0.001)
    assert breaker.window_counts() == (1, 0, 0)
    assert "closed" in repr(breaker)


# ------------------------------------------------------------------ windows


def test_count_window_is_exactly_the_last_n_calls() -> None:
    breaker, _clock, _ = make(window=5, min_calls=5, failure_rate=1.0)
    record_many(breaker, "Foooo")
    assert breaker.window_counts() == (5, 1, 0)
    record_many(breaker, "o")  # the failure was the oldest: it leaves
    assert breaker.window_counts() == (5, 0, 0)
    record_many(breaker, "FFFFo")
    assert breaker.window_counts() == (5, 4, 0)
    record_many(breaker, "F")  # F F F o F: the first F of the four left
    assert breaker.window_counts() == (5, 4, 0)


def test_time_window_is_exactly_the_last_n_seconds() -> None:
    breaker, clock, _ = make(start=100.5, window_seconds=10, min_calls=100)
    record_many(breaker, "F")
    clock.now = 105.0
    record_many(breaker, "o")
    assert breaker.window_counts() == (2, 1, 0)
    clock.now = 109.999  # seconds 100 to 109: both still in
    assert breaker.window_counts() == (2, 1, 0)
    clock.now = 110.0  # second 100 left
    assert breaker.window_counts() == (1, 0, 0)
    clock.now = 114.999
    assert breaker.window_counts() == (1, 0, 0)
    clock.now = 115.0
    assert breaker.window_counts() == (0, 0, 0)


def test_time_window_empties_after_a_long_silence() -> None:
    breaker, clock, _ = make(window_seconds=3, min_calls=100)
    record_many(breaker, "FoF")
    clock.advance(1.0)
    record_many(breaker, "o")
    clock.advance(1000.0)
    assert breaker.window_counts() == (0, 0, 0)
    record_many(breaker, "F")
    assert breaker.window_counts() == (1, 1, 0)


def test_time_window_opens_on_recent_failures_only() -> None:
    breaker, clock, _ = make(window_seconds=10, min_calls=4, failure_rate=0.5)
    record_many(breaker, "FFF")
    clock.advance(10.0)  # those three age out
    record_many(breaker, "ooo")
    assert breaker.state == CLOSED
    record_many(breaker, "F")  # 1 of 4
    assert breaker.state == CLOSED
    record_many(breaker, "FF")  # 3 of 6
    assert breaker.state == OPEN


def test_a_clock_going_back_keeps_the_window() -> None:
    breaker, clock, _ = make(window_seconds=5, min_calls=100)
    record_many(breaker, "F")
    clock.advance(-3.0)
    record_many(breaker, "o")
    assert breaker.window_counts() == (2, 1, 0)


# --------------------------------------------------------------- properties

# A call: (seconds since the previous one, ok, duration).
calls = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
        st.booleans(),
        st.sampled_from([0.001, 0.5, 1.0, 2.0]),
    ),
    max_size=200,
)


def check_against_recount(
    breaker: CircuitBreaker,
    clock: FakeClock,
    history: list[tuple[float, bool, float]],
    *,
    in_window: Any,
    min_calls: int,
    failure_rate: float,
    slow_seconds: float,
    slow_rate: float,
) -> None:
    kept: list[tuple[float, bool, bool]] = []  # (time, failed, slow) since the last reset
    for gap, ok, seconds in history:
        clock.advance(gap)
        assert breaker.allow()
        breaker.record(ok, seconds)
        kept.append((clock.now, not ok, seconds >= slow_seconds))
        window = in_window(kept, clock.now)
        n = len(window)
        failures = sum(1 for _, failed, _ in window if failed)
        slow = sum(1 for _, _, was_slow in window if was_slow)
        should_open = n >= min_calls and (failures / n >= failure_rate or slow / n >= slow_rate)
        if should_open:
            assert breaker.state == OPEN
            breaker.reset()
            kept.clear()
        else:
            assert breaker.state == CLOSED
            assert breaker.window_counts() == (n, failures, slow)


@settings(max_examples=150, deadline=None)
@given(
    history=calls,
    size=st.integers(min_value=1, max_value=12),
    min_calls=st.integers(min_value=1, max_value=15),
    failure_rate=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]),
    slow_rate=st.sampled_from([0.3, 0.5, 1.0]),
)
def test_count_window_matches_a_recount(
    history: list[tuple[float, bool, float]],
    size: int,
    min_calls: int,
    failure_rate: float,
    slow_rate: float,
) -> None:
    clock = FakeClock()
    policy = BreakerPolicy(
        window=size,
        min_calls=min_calls,
        failure_rate=failure_rate,
        slow_call_seconds=1.0,
        slow_call_rate=slow_rate,
    )
    breaker = CircuitBreaker(policy, clock=clock)
    check_against_recount(
        breaker,
        clock,
        history,
        in_window=lambda kept, now: kept[-size:],
        min_calls=min(min_calls, size),
        failure_rate=failure_rate,
        slow_seconds=1.0,
        slow_rate=slow_rate,
    )


@settings(max_examples=150, deadline=None)
@given(
    history=calls,
    start=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    seconds=st.integers(min_value=1, max_value=8),
    min_calls=st.integers(min_value=1, max_value=15),
    failure_rate=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]),
    slow_rate=st.sampled_from([0.3, 0.5, 1.0]),
)
def test_time_window_matches_a_recount(
    history: list[tuple[float, bool, float]],
    start: float,
    seconds: int,
    min_calls: int,
    failure_rate: float,
    slow_rate: float,
) -> None:
    clock = FakeClock(start)
    policy = BreakerPolicy(
        window_seconds=seconds,
        min_calls=min_calls,
        failure_rate=failure_rate,
        slow_call_seconds=1.0,
        slow_call_rate=slow_rate,
    )
    breaker = CircuitBreaker(policy, clock=clock)

    def in_window(
        kept: list[tuple[float, bool, bool]], now: float
    ) -> list[tuple[float, bool, bool]]:
        # The current second and the seconds - 1 before it.
        return [c for c in kept if math.floor(c[0]) > math.floor(now) - seconds]

    check_against_recount(
        breaker,
        clock,
        history,
        in_window=in_window,
        min_calls=min_calls,
        failure_rate=failure_rate,
        slow_seconds=1.0,
        slow_rate=slow_rate,
    )


# Events for the state machine: allow, record ok/failed (with the permit of
# the n-th call still out), release, time passing.
events = st.lists(
    st.one_of(
        st.just(("allow", 0)),
        st.tuples(st.sampled_from(["ok", "fail", "release"]), st.integers(0, 20)),
        st.tuples(st.just("wait"), st.integers(0, 4)),
    ),
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(script=events, half_open_calls=st.integers(min_value=1, max_value=4))
def test_probe_accounting_never_breaks(script: list[tuple[str, int]], half_open_calls: int) -> None:
    """Whatever the order of calls, results, releases and time: never more
    probes out than allowed, a half-open decision only on the state's own
    probes, and every on_change a legal move."""
    clock = FakeClock()
    moves: list[tuple[State, State]] = []
    breaker = CircuitBreaker(
        BreakerPolicy(window=4, min_calls=2, open_seconds=2.0, half_open_calls=half_open_calls),
        clock=clock,
        on_change=lambda _b, old, new: moves.append((old, new)),
    )
    out: list[int] = []  # permits of calls let through, not yet answered
    for action, arg in script:
        if action == "allow":
            if breaker.allow():
                out.append(breaker.generation)
        elif action == "wait":
            clock.advance(arg)
        elif out:
            permit = out.pop(arg % len(out))
            if action == "release":
                breaker.release(permit)
            else:
                breaker.record(action == "ok", 0.01, permit)
        if breaker.state == HALF_OPEN:
            probes_out = sum(1 for p in out if p == breaker.generation)
            assert probes_out <= half_open_calls
    legal = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
    assert set(moves) <= legal
    for (_, new), (old, _) in itertools.pairwise(moves):
        assert new == old  # each move starts where the last one ended
