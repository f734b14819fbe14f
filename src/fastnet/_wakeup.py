"""The handler task's wake-up: a reusable, future-like object, and an awaitable of it.

A handler waiting for frames is suspended on a ``_Wakeup``; the connection
core resumes it from inside the read callback, with no Future created per
read and no extra trip through the event loop (docs/design.md §2). The Task
protocol this relies on is entry 5a of ``_internals``.
"""

from __future__ import annotations

from asyncio import AbstractEventLoop, Future
from collections.abc import Callable, Generator
from contextvars import Context
from typing import TYPE_CHECKING, Any

__all__ = ["_AwaitWakeup", "_Wakeup", "cancelled_future", "resolved_future"]


def resolved_future(loop: AbstractEventLoop) -> Future[None]:
    """A finished ``asyncio.Future`` (result None) of ``loop``: what a woken Task reads."""
    future: Future[None] = Future(loop=loop)
    future.set_result(None)
    return future


def cancelled_future(loop: AbstractEventLoop, msg: object) -> Future[None]:
    """A Future of ``loop`` cancelled with ``msg``: what a cancelled waiting Task reads."""
    future: Future[None] = Future(loop=loop)
    future.cancel(msg)
    return future


class _Wakeup:
    """A reusable, future-like object the handler task awaits for input.

    An asyncio Task suspends on any object with ``_asyncio_future_blocking``
    and ``add_done_callback`` (the duck-typed Future protocol that
    ``asyncio.isfuture`` recognises) and resumes when the callback it
    registered is called with a future: it reads that future's result and
    sends it into the coroutine, or throws its exception in.
    ``FrameProtocol.buffer_updated`` runs that callback at once, in the
    task's context, instead of through ``call_soon``; it falls back to
    ``call_soon`` if a task is already running (a protocol callback invoked
    from inside a task, which asyncio's and uvloop's transports never do).

    The Task's callback reads the result of whatever future it is called
    with, and nothing else of it. A wake-up calls it with ``_resolved``, a
    finished ``asyncio.Future`` of the same loop, never awaited: CPython's C
    Task reads an exact Future's result in C, where any other object costs a
    ``result()`` method call looked up by a new, uninterned name, a third of
    the Task's work per wake-up (``_internals`` entry 5a).

    Cancelling the waiting task calls ``cancel``, which schedules the
    callback with a Future of its own, cancelled with the message: each
    cancelled wait reads its own ``CancelledError``, even when another task
    began waiting (and was cancelled in turn) before the first one ran.
    """

    __slots__ = ("_asyncio_future_blocking", "_callback", "_context", "_loop", "_resolved")

    def __init__(self, loop: AbstractEventLoop) -> None:
        self._loop = loop  # read by asyncio.futures._get_loop and the C Task
        self._asyncio_future_blocking = False
        self._callback: Callable[[Any], object] | None = None
        self._context: Context | None = None
        self._resolved = resolved_future(loop)

    def add_done_callback(
        self, fn: Callable[[Any], object], *, context: Context | None = None
    ) -> None:
        self._callback = fn
        self._context = context

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        if self._callback is fn:
            self._callback = None
            return 1
        return 0

    def wake_soon(self) -> None:
        """Resume the waiting task, if any, from the loop's next iteration."""
        callback = self._callback
        if callback is not None:
            self._callback = None
            self._loop.call_soon(callback, self._resolved, context=self._context)

    def cancel(self, msg: object = None) -> bool:
        callback = self._callback
        if callback is None:
            return False
        self._callback = None
        self._loop.call_soon(callback, cancelled_future(self._loop, msg), context=self._context)
        return True

    def result(self) -> None:
        return None

    def done(self) -> bool:
        return self._callback is None

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return None

    # No get_loop(): without it, asyncio reads ``_loop`` directly, which
    # saves a Python call on every wait.


class _AwaitWakeup(tuple):  # type: ignore[type-arg]
    """``(wakeup,)`` made awaitable: ``await`` iterates the tuple, in C.

    The tuple iterator yields the ``_Wakeup`` to the Task once and is
    exhausted when the Task resumes the coroutine, so awaiting costs no
    Python call (a generator-based ``__await__`` would cost one per await
    and one per resume).
    """

    __slots__ = ()
    if TYPE_CHECKING:

        def __await__(self) -> Generator[Any, None, None]: ...

    else:
        __await__ = tuple.__iter__
