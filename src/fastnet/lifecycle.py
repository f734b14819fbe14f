"""A connection's lifecycle: one state and a table of the transitions allowed.

h11's ``_state.py`` is the model: instead of a set of booleans (closing,
lost, peer EOF...) that can contradict each other, a connection holds one
state, every change goes through ``check_transition``, and an illegal change
raises, so a bug that would reopen a closed connection fails loudly.

The connection core keeps the state as a plain int (the hot path compares
it with ``>=``); ``Lifecycle`` gives it its name.
"""

from __future__ import annotations

import enum

__all__ = ["CLOSED", "CLOSING", "OPEN", "PEER_CLOSED", "Lifecycle", "check_transition"]


class Lifecycle(enum.IntEnum):
    """Where a connection is in its life; ``Connection.lifecycle`` tells.

    An ``IntEnum``, ordered as listed; ``str()``, f-strings and ``format()``
    give the name (``CLOSED``), a numeric format spec the number.
    """

    OPEN = 0
    """Both directions open."""
    PEER_CLOSED = 1
    """The peer sent FIN: no more input. A server's connection may still write."""
    CLOSING = 2
    """This side is closing: close(), abort(), the end of the handler, a failed write."""
    CLOSED = 3
    """The transport called connection_lost: the socket is closed."""

    def __str__(self) -> str:
        return self.name

    def __format__(self, format_spec: str) -> str:
        # The name, as str() gives, on every Python: IntEnum's own __format__
        # differs across versions (3.10 fails on "d", 3.11+ gives the number
        # for ">8"). A numeric presentation type ("d", "03d") gives the number.
        if format_spec and format_spec[-1] in _NUMERIC_TYPES:
            return int.__format__(self, format_spec)
        return format(self.name, format_spec)


# The presentation types of int's format spec.
_NUMERIC_TYPES = "bcdoxXneEfFgG%"


OPEN = 0
PEER_CLOSED = 1
CLOSING = 2
CLOSED = 3

_TRANSITIONS: dict[int, frozenset[int]] = {
    OPEN: frozenset({PEER_CLOSED, CLOSING, CLOSED}),
    PEER_CLOSED: frozenset({CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


def check_transition(current: int, new: int) -> None:
    """Raise ``RuntimeError`` unless the lifecycle may go from ``current`` to ``new``."""
    if new != current and new not in _TRANSITIONS[current]:
        raise RuntimeError(
            f"connection cannot go from {Lifecycle(current).name} to {Lifecycle(new).name}"
        )
