"""Everything fastnet borrows from asyncio and uvloop beyond their public API, in one place.

uvloop keeps the stdlib names it binds in one file (``includes/stdlib.pxi``);
this module does the same for the private names and behaviours fastnet
relies on, so a reader sees in one screen what a new Python or uvloop
release could break. Each entry says what is used, why, the versions it was
checked on, and its fallback; ``tests/test_internals.py`` has a test per
entry that fails loudly when it stops holding.

Checked on CPython 3.10.13, 3.11.7, 3.12.1, 3.13.0 and uvloop 0.19-0.23.
"""

from __future__ import annotations

import asyncio
import types
from asyncio import AbstractEventLoop, selector_events
from collections.abc import Callable

__all__ = [
    "SELECTOR_SOCKET_TRANSPORT",
    "UVLOOP_STREAM_TRANSPORTS",
    "current_task",
    "fatal_error",
    "is_selector_socket_transport",
    "is_uvloop_stream_transport",
]

# 1. asyncio.selector_events._SelectorSocketTransport: CPython's transport for
#    sockets on selector loops (Unix). Recognised by exact type (a subclass may
#    change how it reads or writes) so that fastnet may make vectored writes
#    (os.writev) and read on (os.readv) on its socket itself; see
#    transports.py. Fallback: None, and every transport gets the plain path.
SELECTOR_SOCKET_TRANSPORT: type | None = getattr(selector_events, "_SelectorSocketTransport", None)


def is_selector_socket_transport(transport: asyncio.BaseTransport) -> bool:
    return SELECTOR_SOCKET_TRANSPORT is not None and type(transport) is SELECTOR_SOCKET_TRANSPORT


# 2. transport._fatal_error(exc, message) of that transport: how it fails
#    itself on a socket error (logs unless the error is a connection reset,
#    closes, calls connection_lost(exc)). fastnet's own writev/readv report
#    their errors through it, so a failure looks exactly as if the transport
#    had made the call. Fallback: abort() (connection_lost(None): the cause
#    is lost, the connection still ends).
def fatal_error(transport: asyncio.BaseTransport, exc: BaseException, message: str) -> None:
    method = getattr(transport, "_fatal_error", None)
    if method is None:
        transport.abort()  # type: ignore[attr-defined]
    else:
        method(exc, message)


# 3. uvloop's stream transports, by exact type: their writelines() makes one
#    vectored write (uv_write with several buffers). uvloop's TLS transport
#    (_SSLProtocolTransport) lives in the same module and must NOT be taken
#    for one: its writelines would make each length field a TLS record of its
#    own. Fallback: an empty tuple (uvloop absent or renamed): joined writes.
def _uvloop_stream_transports() -> tuple[type, ...]:
    try:
        import uvloop.loop as uvloop_loop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return ()
    names = ("TCPTransport", "UnixTransport")
    return tuple(t for t in (getattr(uvloop_loop, name, None) for name in names) if t is not None)


UVLOOP_STREAM_TRANSPORTS: tuple[type, ...] = _uvloop_stream_transports()


def is_uvloop_stream_transport(transport: asyncio.BaseTransport) -> bool:
    return type(transport) in UVLOOP_STREAM_TRANSPORTS


# 4. asyncio.tasks._current_tasks (before 3.12): asyncio.current_task is a C
#    function from 3.12; before, the Python function wraps a lookup in this
#    dict, which costs a Python call on every read. Fallback:
#    asyncio.current_task itself.
current_task: Callable[[AbstractEventLoop], object]
if isinstance(asyncio.current_task, types.BuiltinFunctionType):
    current_task = asyncio.current_task
else:
    _tasks = getattr(asyncio.tasks, "_current_tasks", None)
    current_task = _tasks.get if isinstance(_tasks, dict) else asyncio.current_task

# 5. Behaviours, not names (tested in tests/test_internals.py):
#    a. A Task suspends on any object with ``_asyncio_future_blocking`` and
#       ``add_done_callback(fn, *, context)``, and resumes when ``fn(obj)``
#       is called, calling ``obj.result()``; without ``get_loop`` it reads
#       ``obj._loop``. _wakeup._Wakeup is such an object. ``fn`` reads only
#       the result of the future it is called with, not which future it is:
#       a wake-up calls it with a finished ``asyncio.Future``, whose
#       result CPython's C Task reads in C (``_Wakeup._resolved``), and a
#       cancel with a Future cancelled with the message.
#       Fallback: none needed; a Task that called ``result()`` on it would
#       get None all the same.
#    b. The selector transport's ``write(b"")`` runs its checks (RuntimeError
#       after write_eof(), during loop.sendfile()) and writes nothing:
#       transports.write_vectored calls it before its own writev.
#    c. Both loops call ``protocol.get_buffer``/``buffer_updated`` looked up
#       on the instance, so a slot holding a bound method replaces the method
#       (uvloop reads them once, when the transport is made, and again on
#       ``set_protocol``: the lingering close sets the protocol again after
#       pointing them at its sink, protocol._read_on_discarding; tested by
#       tests/test_server.py's framing-error close on uvloop).
#    d. Their plain socket transports use what ``get_buffer`` returns only
#       through the buffer protocol (uvloop: PyObject_GetBuffer; CPython's
#       selector transport: ``len()`` and ``sock.recv_into``), so the
#       extension's decoder hands them its window object (``_frame._Block``)
#       instead of a new memoryview per read (transports.py, ``raw_windows``).
#       asyncio's TLS layer slices the buffer: TLS and unknown transports get
#       a memoryview.
#    e. uvloop's stream transports read the plain way (into the loop's own
#       buffer, then ``protocol.data_received(bytes)``) when the protocol has
#       no ``get_buffer`` attribute, and ``set_protocol`` decides again and
#       restarts reading, even from inside a read callback, losing nothing
#       (uvloop's UVStream._set_protocol, 0.17-0.23). fastnet's connections
#       read through a ``_PlainReads`` between large frames and set
#       themselves again for a large one (transports.py, ``plain_reads``).
#       Fallback: were it to stop holding, plain reads would still deliver
#       every frame through ``data_received``, only large frames with a copy.
#    f. When a write fails (EPIPE, ECONNRESET), both loops' socket transports
#       stop reading and call ``connection_lost(exc)`` with the socket still
#       open, the input it holds still in it; they close it after that
#       callback returns (asyncio: _call_connection_lost; uvloop:
#       UVBaseTransport._call_connection_lost). leftover.LeftoverInput
#       duplicates the descriptor there and reads that input after the
#       break. Fallback: were the socket closed first, os.dup would fail
#       (OSError) and nothing more would be delivered, as before.
