"""``Lifecycle`` prints as its name on every Python, and stays an ordered int."""

from __future__ import annotations

import pytest

from fastnet import Lifecycle


@pytest.mark.parametrize("state", list(Lifecycle), ids=lambda state: state.name)
def test_a_lifecycle_state_prints_as_its_name(state: Lifecycle) -> None:
    name = state.name
    assert str(state) == name
    assert f"{state}" == name
    assert format(state) == name
    assert "{}".format(state) == name  # noqa: UP032 (str.format is what it checks)
    assert "%s" % state == name  # noqa: UP031 (%-formatting is what it checks)
    assert f"{state:>12}" == f"{name:>12}"
    assert repr(state) == f"<Lifecycle.{name}: {int(state)}>"


def test_a_numeric_format_spec_gives_the_number() -> None:
    assert f"{Lifecycle.CLOSED:d}" == "3"
    assert f"{Lifecycle.CLOSING:03d}" == "002"
    assert "%d" % Lifecycle.PEER_CLOSED == "1"  # noqa: UP031


def test_lifecycle_is_still_an_ordered_int() -> None:
    assert isinstance(Lifecycle.OPEN, int)
    assert Lifecycle.OPEN < Lifecycle.PEER_CLOSED < Lifecycle.CLOSING < Lifecycle.CLOSED
    assert Lifecycle.CLOSED >= 2
    assert Lifecycle(3) is Lifecycle.CLOSED
    assert Lifecycle.CLOSING == 2
