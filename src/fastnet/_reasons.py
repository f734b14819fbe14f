"""Why a connection's input or output ended, as exception factories.

The connection keeps a factory, not an exception: ``recv`` and ``send``
raise a fresh exception each time, so tracebacks do not pile up on one
object (and keep every frame they passed through alive).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from .errors import ConnectionBrokenError, ConnectionClosedError, WriteBufferFull

__all__ = [
    "broken_factory",
    "closed_by_us",
    "idle_closed",
    "peer_closed",
    "reraise_factory",
    "shutting_down",
    "write_buffer_full",
]


def closed_by_us() -> Exception:
    return ConnectionClosedError("the connection is closed")


def peer_closed() -> Exception:
    return ConnectionBrokenError("the peer closed the connection")


def shutting_down() -> Exception:
    return ConnectionClosedError("the server is shutting down")


def idle_closed() -> Exception:
    return ConnectionClosedError("closed after the idle timeout")


def write_buffer_full(size: int, limit: int) -> Exception:
    return WriteBufferFull(
        f"sending {size} more bytes would put {limit} bytes or more in the write buffer;"
        " await drain() before sending more"
    )


def broken_factory(cause: BaseException | None) -> Callable[[], Exception]:
    """A factory of ``ConnectionBrokenError`` chained from ``cause`` (a socket or framing error).

    The cause loses its traceback: it would keep the frame that was reading
    alive, and through it the connection, whose end-of-input factory holds
    the cause: a reference cycle that only the garbage collector frees, with
    the receive buffers in it (the abuse tests saw tens of MiB held that way).
    Its type and message say what happened.
    """
    if cause is not None:
        cause.__traceback__ = None

    def factory() -> Exception:
        if cause is None:
            return ConnectionBrokenError("the connection was lost")
        exc = ConnectionBrokenError(f"the connection broke: {cause}")
        exc.__cause__ = cause
        return exc

    return factory


def reraise_factory(exc: Exception) -> Callable[[], Exception]:
    """A factory of fresh copies of ``exc``, each with no traceback, chained to the original.

    An exception that cannot be copied is reported as a
    ``ConnectionClosedError`` caused by it.
    """

    def factory() -> Exception:
        try:
            fresh = copy.copy(exc)
        except Exception:
            fresh = None
        if fresh is None or fresh is exc or type(fresh) is not type(exc):
            fresh = ConnectionClosedError(f"the connection failed: {exc!r}")
        fresh.__traceback__ = None
        fresh.__cause__ = exc
        return fresh

    return factory
