"""``ConnectionObserver``: what a server-side connection reports upward, and asks.

A connection (protocol.py, connection.py) knows its server only through this
interface, so the modules below the supervisor import nothing above them
(no ``connection -> protocol -> server -> connection`` cycle, not even under
``TYPE_CHECKING``). The supervisor (supervisor.py) is the observer of every
connection it serves; client connections have none.
"""

from __future__ import annotations

from typing import Any, Protocol

from .errors import FrameError

__all__ = ["ConnectionObserver"]


class ConnectionObserver(Protocol):
    """The server side of a connection, as the connection sees it."""

    @property
    def shutting_down(self) -> bool:
        """True once the server has begun a graceful shutdown."""
        ...

    def frame_error(self, conn: Any, exc: FrameError) -> None:
        """The peer broke the framing on ``conn``: count it, log it (rate-limited)."""
        ...
