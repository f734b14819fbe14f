"""Retries (``fastnet.retry``): the budget's exact arithmetic, backoff, ``RetryPolicy.safe``.

The budget runs on a fake clock; the hypothesis test replays random
deposits, withdrawals and pauses against a model that recounts the window
(the current tenth of the ttl and the nine before it) in exact fractions.
"""

from __future__ import annotations

import math
import random
import statistics
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet.retry import BUDGET_BUCKETS, Backoff, RetryBudget, RetryPolicy


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def withdraw_all(budget: RetryBudget, limit: int = 100_000) -> int:
    n = 0
    while n < limit and budget.try_withdraw():
        n += 1
    return n


# ------------------------------------------------------------------ budget


def test_budget_defaults_are_finagles() -> None:
    budget = RetryBudget(clock=FakeClock())
    assert (budget.percent, budget.min_per_second, budget.ttl) == (0.2, 10.0, 10.0)
    assert budget.balance == 100.0  # 10 a second over 10 s, with no request yet
    assert withdraw_all(budget) == 100
    assert budget.exhausted == 1
    assert budget.balance == 0.0


def test_budget_floor_is_min_per_second_times_ttl() -> None:
    budget = RetryBudget(percent=0.0, min_per_second=0.5, ttl=4.0, clock=FakeClock())
    assert withdraw_all(budget) == 2
    assert not budget.try_withdraw()
    assert budget.exhausted == 2  # every refusal counted


def test_budget_earns_a_percent_of_deposits() -> None:
    budget = RetryBudget(percent=0.2, min_per_second=0.0, ttl=10.0, clock=FakeClock())
    assert not budget.try_withdraw()
    for _ in range(4):
        budget.deposit()
    assert budget.balance == pytest.approx(0.8)
    assert not budget.try_withdraw()  # 0.8 of a retry is not a retry
    budget.deposit()
    assert budget.balance == 1.0
    assert budget.try_withdraw()
    assert budget.balance == 0.0
    for _ in range(50):
        budget.deposit()
    assert withdraw_all(budget) == 10
    assert budget.exhausted == 3


def test_budget_floor_and_percent_add_up() -> None:
    budget = RetryBudget(percent=0.5, min_per_second=1.0, ttl=3.0, clock=FakeClock())
    for _ in range(7):
        budget.deposit()
    assert budget.balance == 6.5  # 3 + 3.5
    assert withdraw_all(budget) == 6


def test_budget_deposits_and_withdrawals_expire_after_ttl() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(percent=1.0, min_per_second=0.0, ttl=10.0, clock=clock)
    for _ in range(3):
        budget.deposit()  # slice 0
    clock.now = 5.0
    assert budget.try_withdraw()  # slice 5: balance 2 now
    assert budget.balance == 2.0
    clock.now = 9.999  # slices 0 to 9: all still in
    assert budget.balance == 2.0
    clock.now = 10.0  # slice 0 (the deposits) left; the withdrawal of slice 5 did not
    assert budget.balance == -1.0  # the retry they paid for still counts
    assert not budget.try_withdraw()
    clock.now = 15.0  # the withdrawal left too
    assert budget.balance == 0.0


def test_budget_floor_refills_as_withdrawals_expire() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(percent=0.0, min_per_second=1.0, ttl=10.0, clock=clock)
    assert withdraw_all(budget) == 10
    clock.now = 9.0
    assert not budget.try_withdraw()
    clock.now = 10.0
    assert withdraw_all(budget) == 10  # at most 10 within any ttl window


def test_budget_long_silence_forgets_everything() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(percent=1.0, min_per_second=0.0, ttl=1.0, clock=clock)
    for _ in range(5):
        budget.deposit()
    clock.now = 1e6
    assert budget.balance == 0.0
    assert "balance=0.00" in repr(budget)


def test_budget_granularity_is_a_tenth_of_ttl() -> None:
    assert BUDGET_BUCKETS == 10
    clock = FakeClock(0.0)
    budget = RetryBudget(percent=1.0, min_per_second=0.0, ttl=2.0, clock=clock)
    budget.deposit()  # slice 0 = [0, 0.2)
    clock.now = 0.19
    budget.deposit()  # still slice 0
    clock.now = 0.25
    budget.deposit()  # slice 1
    clock.now = 2.0  # slice 10: slice 0 left
    assert budget.balance == 1.0
    clock.now = 2.2  # slice 11: slice 1 left
    assert budget.balance == 0.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"percent": -0.1}, "percent"),
        ({"percent": math.nan}, "percent"),
        ({"percent": 1001.0}, "percent"),
        ({"min_per_second": -1.0}, "min_per_second"),
        ({"min_per_second": math.inf}, "min_per_second"),
        ({"ttl": 0.0}, "ttl"),
        ({"ttl": 3601.0}, "ttl"),
        ({"ttl": "10"}, "ttl"),
        ({"percent": True}, "percent"),
    ],
)
def test_budget_rejects_out_of_range(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RetryBudget(**kwargs)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("deposit"), st.integers(1, 20)),
        st.tuples(st.just("withdraw"), st.integers(1, 20)),
        st.tuples(st.just("wait"), st.floats(min_value=0.0, max_value=4.0, allow_nan=False)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    script=ops,
    permille=st.integers(0, 1500),
    min_per_second=st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]),
    ttl=st.sampled_from([1.0, 2.0, 5.0, 10.0]),
)
def test_budget_matches_the_formula(
    script: list[tuple[str, Any]], permille: int, min_per_second: float, ttl: float
) -> None:
    """Each withdrawal is allowed exactly when the recount of the window
    leaves a whole retry: min_per_second * ttl + percent * deposits -
    withdrawals >= 1; so the retries of a window never exceed the formula."""
    clock = FakeClock(0.0)
    percent = permille / 1000
    budget = RetryBudget(percent=percent, min_per_second=min_per_second, ttl=ttl, clock=clock)
    width = ttl / BUDGET_BUCKETS
    events: list[tuple[int, str]] = []  # (slice, "d" or "w")
    reserve = Fraction(str(min_per_second)) * Fraction(str(ttl))
    refused = 0

    def window() -> tuple[int, int]:
        now = math.floor(clock.now / width)
        kept = [kind for s, kind in events if s > now - BUDGET_BUCKETS]
        return kept.count("d"), kept.count("w")

    for action, arg in script:
        if action == "wait":
            clock.advance(arg)
            continue
        for _ in range(arg):
            here = math.floor(clock.now / width)
            if action == "deposit":
                budget.deposit()
                events.append((here, "d"))
            else:
                deposits, withdrawals = window()
                allowed = reserve + Fraction(permille, 1000) * deposits - withdrawals >= 1
                assert budget.try_withdraw() == allowed
                if allowed:
                    events.append((here, "w"))
                    deposits, withdrawals = window()
                    assert withdrawals <= reserve + Fraction(permille, 1000) * deposits
                else:
                    refused += 1
        deposits, withdrawals = window()
        expected = reserve + Fraction(permille, 1000) * deposits - withdrawals
        assert budget.balance == pytest.approx(float(expected), abs=1e-9)
    assert budget.exhausted == refused


# ------------------------------------------------------------------ backoff


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    backoff = Backoff(jitter="none")
    assert [backoff.delay(n) for n in range(1, 10)] == [
        0.01,
        0.02,
        0.04,
        0.08,
        0.16,
        0.32,
        0.64,
        1.0,
        1.0,
    ]
    assert backoff.delay(10_000) == 1.0  # no overflow
    assert backoff.ceiling(3) == 0.04


def test_backoff_other_multipliers() -> None:
    assert Backoff(base=0.5, cap=0.5, jitter="none").delay(7) == 0.5
    flat = Backoff(base=0.1, cap=10.0, multiplier=1.0, jitter="none")
    assert {flat.delay(n) for n in (1, 2, 50, 10**9)} == {0.1}
    triple = Backoff(base=1.0, cap=100.0, multiplier=3.0, jitter="none")
    assert [triple.delay(n) for n in range(1, 7)] == [1.0, 3.0, 9.0, 27.0, 81.0, 100.0]
    assert triple.delay(10**12) == 100.0


def test_full_jitter_is_uniform_up_to_the_ceiling() -> None:
    backoff = Backoff(base=0.01, cap=1.0, rng=random.Random(1))
    ceiling = 0.04  # attempt 3
    samples = [backoff.delay(3) for _ in range(20_000)]
    assert all(0.0 <= s <= ceiling for s in samples)
    assert statistics.fmean(samples) == pytest.approx(ceiling / 2, rel=0.02)
    quarters = [0, 0, 0, 0]
    for s in samples:
        quarters[min(3, int(s / ceiling * 4))] += 1
    assert all(4700 < q < 5300 for q in quarters), quarters
    capped = [backoff.delay(50) for _ in range(2000)]
    assert max(capped) <= 1.0
    assert max(capped) > 0.95


def test_equal_jitter_keeps_half_the_ceiling() -> None:
    backoff = Backoff(base=0.01, cap=1.0, jitter="equal", rng=random.Random(2))
    samples = [backoff.delay(4) for _ in range(20_000)]  # ceiling 0.08
    assert all(0.04 <= s <= 0.08 for s in samples)
    assert statistics.fmean(samples) == pytest.approx(0.06, rel=0.01)
    assert min(samples) < 0.041
    assert max(samples) > 0.079


def test_backoff_is_repeatable_with_a_seed() -> None:
    a = Backoff(rng=random.Random(42))
    b = Backoff(rng=random.Random(42))
    assert [a.delay(n) for n in range(1, 20)] == [b.delay(n) for n in range(1, 20)]
    assert "jitter='full'" in repr(a)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"base": 0.0}, "base"),
        ({"base": -1.0}, "base"),
        ({"base": math.nan}, "base"),
        ({"cap": 0.001}, "cap"),  # under base
        ({"cap": math.inf}, "cap"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": "decorrelated"}, "jitter"),
    ],
)
def test_backoff_rejects_out_of_range(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Backoff(**kwargs)


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_attempts_start_at_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay(attempt)


# ------------------------------------------------------------------ policy


def test_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert isinstance(policy.backoff, Backoff)
    assert policy.backoff.jitter == "full"
    assert (policy.percent, policy.min_per_second, policy.ttl) == (0.2, 10.0, 10.0)
    assert policy.budget is None
    assert policy.idempotent == frozenset()
    hash(policy)  # frozen: usable as a key


def test_safe_when_never_sent_or_idempotent() -> None:
    policy = RetryPolicy(idempotent=frozenset({1, 7}))
    assert policy.safe(sent=False, message_type=3)  # the server never saw it
    assert policy.safe(sent=True, message_type=7)  # doing it twice is harmless
    assert policy.safe(sent=False, message_type=7)
    assert not policy.safe(sent=True, message_type=3)  # it may have acted on it
    assert not RetryPolicy().safe(sent=True, message_type=1)


def test_idempotent_accepts_any_collection() -> None:
    policy = RetryPolicy(idempotent={2, 3})  # type: ignore[arg-type]
    assert policy.idempotent == frozenset({2, 3})
    assert isinstance(policy.idempotent, frozenset)
    assert policy.safe(True, 2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"max_attempts": 2.0}, "max_attempts"),
        ({"percent": -1.0}, "percent"),
        ({"min_per_second": -1.0}, "min_per_second"),
        ({"ttl": 0.0}, "ttl"),
        ({"idempotent": frozenset({0})}, "idempotent"),
        ({"idempotent": frozenset({65536})}, "idempotent"),
        ({"idempotent": frozenset({"get"})}, "idempotent"),
        ({"backoff": 0.1}, "backoff"),
        ({"budget": 5}, "budget"),
    ],
)
def test_policy_rejects_out_of_range(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RetryPolicy(**kwargs)


def test_new_budget_from_the_fields_or_the_shared_one() -> None:
    clock = FakeClock()
    budget = RetryPolicy(percent=0.5, min_per_second=0.0, ttl=2.0).new_budget(clock)
    assert (budget.percent, budget.min_per_second, budget.ttl) == (0.5, 0.0, 2.0)
    budget.deposit()
    budget.deposit()
    assert budget.balance == 1.0
    shared = RetryBudget(clock=clock)
    policy = RetryPolicy(budget=shared)
    assert policy.new_budget() is shared
    assert policy.new_budget() is shared


def test_default_policies_have_their_own_backoff() -> None:
    assert RetryPolicy().backoff is not RetryPolicy().backoff
