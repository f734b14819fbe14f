"""``FrameProtocol``: the transport-facing half of a connection.

``fastnet.Connection`` (connection.py) subclasses it and adds what a handler
calls; this module holds the machinery those calls rest on: the receive path,
the wake-up of the handler task, the write path and flow control. One object
per connection is both the asyncio protocol and the handler's Connection, so
a read costs no hop between objects.

Strategy: the Python work on a busy connection is fixed per *read*, never per
frame.

Receiving. ``get_buffer`` is the decoder's own bound method, stored on the
instance, so the kernel receives into the decoder's buffer (or, for a large
frame, into the frame's final bytes object) with no Python code in between.
``buffer_updated`` makes one decoder call, bumps two counters, stores the
returned frame list as the inbox (not a copy; appended to only when the
handler is behind), and resumes the handler task once.

Reading on. A large frame takes two reads: one of its header (the decoder's
window after a large frame is header-sized), one of its payload, straight
into the frame. CPython's selector transport makes one read per readiness
event and goes back to the selector in between. There, fastnet reads on
itself (``_read_burst``) through runs of large frames: after a read that
began a large frame, or filled the rest of one, up to ``READ_BURST`` more
reads, stopping at a short read, when reading pauses, or when the
connection closes. Reads of small frames never read on, so a client
pipelining small frames cannot hold the loop longer than one read.

Waking. A handler waiting for frames is suspended on a ``_Wakeup``: a
reusable, future-like object (asyncio's duck-typed Future protocol). No Future
is created per read, and ``buffer_updated`` resumes the task directly, the
way a callback protocol would run its code there, instead of scheduling it
for the loop's next iteration. The handler then runs until it waits again;
waiting flushes its replies, so a read costs one write, made from inside the
read callback.

Sending. Frames queue in ``_out`` and leave as ONE
``transport.write(encoder.encode_many(frames))`` (see ``_flush``). The flush
happens when the handler waits for input or drains, on close, at the end of
``buffer_updated`` for whatever the resumed handler left queued, and, for
sends made anywhere else, from one ``loop.call_soon`` per batch.
Length-prefixed payloads of ``LARGE_FRAME`` bytes or more are not copied into
the joined buffer: their length field and the payload object itself go out
as separate iovecs of one vectored write (uvloop's ``writelines``; on
CPython's selector transport, ``_write_vectored``).

Flow control. Reading pauses while the handler has more than
``READ_HIGH_FRAMES`` frames or ``READ_HIGH_BYTES`` bytes queued, and resumes
once it is down to a quarter of that. Reading also pauses while the transport
is over its write high-water mark, so a peer that sends requests without
reading the replies stops being read: the replies to what was already
received are all a request/response handler can queue. Past
``max_write_buffer`` unsent bytes, ``send`` raises ``WriteBufferFull``, which
bounds handlers that produce without receiving.

Ending. A framing error first delivers the frames that preceded the bad
bytes, then stops reading and ends the input. The end of the stream delivers
the decoder's last frames and keeps the transport open for writing, so the
handler can still answer. Either way the handler sees the end after the
queued frames (``async for`` ends, ``recv`` raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import types
from asyncio import AbstractEventLoop, CancelledError, selector_events
from collections.abc import Callable, Generator, Iterable, Sequence
from contextvars import Context
from typing import TYPE_CHECKING, Any, cast

from .errors import (
    ConnectionBrokenError,
    ConnectionClosedError,
    FrameError,
    WriteBufferFull,
)
from .framing import Framing

if TYPE_CHECKING:
    from ._observer import ConnectionObserver

__all__ = [
    "DEFAULT_MAX_WRITE_BUFFER",
    "LARGE_FRAME",
    "READ_HIGH_BYTES",
    "READ_HIGH_FRAMES",
    "FrameProtocol",
    "WriteBufferFull",
]

logger = logging.getLogger("fastnet")

Buffer = bytes | bytearray | memoryview

# Read backpressure. A handler that takes whole batches never comes near these
# marks: its inbox is empty each time it waits. They bound what a handler that
# consumes frame by frame, or not at all, lets pile up: 4096 frames is about
# four 64 KiB reads of 64-byte frames; 4 MiB is sixty-four 64 KiB reads, or
# half a maximum-size (8 MiB) frame, so reading pauses after such a frame
# until the handler has taken it. Resuming at a quarter of the mark
# (hysteresis) avoids a pause/resume pair of system calls per read.
READ_HIGH_FRAMES = 4096
READ_LOW_FRAMES = READ_HIGH_FRAMES // 4
READ_HIGH_BYTES = 4 * 1024 * 1024
READ_LOW_BYTES = READ_HIGH_BYTES // 4

# Length-prefixed payloads this large are written as [length field, payload]
# instead of being copied into one joined buffer. It equals the decoder's
# direct-receive threshold, so a large frame received straight into its final
# bytes object is echoed without ever being copied in user space. Below it,
# copying a few KiB costs less than an extra iovec (or, without vectored
# writes, an extra system call and packet). A judgement call.
LARGE_FRAME = 32 * 1024

# Default hard limit of a transport's unsent bytes, past which send() raises
# WriteBufferFull: 64 times asyncio's and uvloop's default write high-water
# mark (64 KiB), room for the bursts of a handler that drains now and then,
# while one that never drains holds at most a few MiB.
DEFAULT_MAX_WRITE_BUFFER = 4 * 1024 * 1024

# Why reading is paused (bit flags); it resumes when none is left.
_PAUSE_INBOX = 1  # the handler has too many frames queued
_PAUSE_WRITE = 2  # the transport is over its write high-water mark
_PAUSE_STOP = 4  # no more input wanted: shutdown, framing error, close

# CPython's transport for sockets on selector loops (Unix); private, so looked
# up softly: if it is renamed, payloads are joined, as on other transports.
_SelectorSocketTransport = getattr(selector_events, "_SelectorSocketTransport", None)

# Most buffers one vectored write takes. POSIX guarantees 16 (_XOPEN_IOV_MAX);
# Linux and the BSDs take 1024. A longer list is joined instead.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
if _IOV_MAX <= 0:
    _IOV_MAX = 16


def _selector_socket_fd(transport: asyncio.BaseTransport) -> int:
    """The socket's descriptor if ``transport`` is CPython's selector socket transport, else -1.

    There fastnet makes vectored writes and reads on by itself (writev,
    readv on that descriptor); elsewhere it leaves all I/O to the transport.
    """
    if type(transport) is not _SelectorSocketTransport or not hasattr(os, "writev"):
        return -1
    sock = transport.get_extra_info("socket")
    return -1 if sock is None else int(sock.fileno())


def _vectored_writer(
    transport: asyncio.BaseTransport, fd: int
) -> Callable[[list[Buffer]], None] | None:
    """A function writing a list of buffers as one vectored write, or None.

    uvloop's ``writelines`` does that. CPython's selector transport joins the
    buffers before 3.12, and from 3.12 its ``writelines`` has had bugs in
    released versions: it did not pause the protocol at the high-water mark
    (gh-127655: drain() never waited, the buffer grew without bound; fixed in
    3.12.9 and 3.13.2), and it fails after the connection is lost
    (gh-136234). So on that transport fastnet makes the vectored write itself
    (``_write_vectored``) on ``fd`` (``_selector_socket_fd``), in every
    version. Other transports (SSL, proactor) get None: their payloads are
    joined.
    """
    if type(transport).__module__.startswith("uvloop"):
        return transport.writelines  # type: ignore[attr-defined,no-any-return]
    if fd >= 0:
        return functools.partial(_write_vectored, cast(asyncio.WriteTransport, transport), fd)
    return None


def _write_vectored(transport: asyncio.WriteTransport, fd: int, buffers: list[Buffer]) -> None:
    """Write ``buffers`` in order: writev(2) while the transport holds nothing unsent.

    This is what the transport's own ``write`` does with one buffer (send at
    once when its buffer is empty), with an iovec per buffer instead of a
    joined copy. Only what the kernel did not take is joined and handed to
    ``transport.write``, which buffers it and applies flow control.
    """
    if len(buffers) <= _IOV_MAX and not transport.get_write_buffer_size():
        # An empty write runs the transport's own checks first: it raises
        # RuntimeError after write_eof() or while loop.sendfile() runs (whose
        # bytes ours would land among), as a write of the data would.
        transport.write(b"")
        if not transport.is_closing():
            try:
                sent = os.writev(fd, buffers)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                # Report this error, not the EPIPE a second send would meet:
                # the kernel reports a socket error such as ECONNRESET once.
                transport._fatal_error(exc, "Fatal write error on socket transport")  # type: ignore[attr-defined]
                return
            for i, buf in enumerate(buffers):
                size = len(buf)
                if sent < size:
                    buffers = [memoryview(buf)[sent:], *buffers[i + 1 :]]
                    break
                sent -= size
            else:
                return  # all of it went out
    transport.write(b"".join(buffers))


def _is_flat(frame: object) -> bool:
    """True if ``len(frame)`` counts bytes and the frame can be an iovec as it is.

    Not so for an ``array('i')`` or a memoryview of one (``len`` counts
    items), nor for a non-contiguous view: those are encoded (copied), which
    counts their bytes or raises the encoder's error.
    """
    try:
        with memoryview(frame) as view:  # type: ignore[arg-type]
            return view.ndim == 1 and view.itemsize == 1 and view.c_contiguous
    except TypeError:  # not a buffer at all: the encoder reports it
        return False


# Most extra reads _read_burst makes per readiness event, so a connection
# streaming large frames cannot keep the loop from the others for long
# (libuv reads up to 32 times per event, small reads included).
READ_BURST = 16

_EMPTY: Sequence[bytes] = ()  # the inbox when nothing is queued; never mutated

# asyncio.current_task is C from Python 3.12; before, the Python function
# wraps this dict lookup, which costs a call per read.
_current_task: Callable[[AbstractEventLoop], object]
if isinstance(asyncio.current_task, types.BuiltinFunctionType):
    _current_task = asyncio.current_task
else:
    _current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]
_NoneType = type(None)


class _Wakeup:
    """A reusable, future-like object the handler task awaits for input.

    An asyncio Task suspends on any object with ``_asyncio_future_blocking``
    and ``add_done_callback`` (the duck-typed Future protocol that
    ``asyncio.isfuture`` recognises) and resumes when the callback it
    registered runs: it then calls ``result()`` and sends ``None`` into the
    coroutine. ``FrameProtocol.buffer_updated`` runs that callback at once,
    in the task's context, instead of through ``call_soon``; it falls back
    to ``call_soon`` if a task is already running (a protocol callback
    invoked from inside a task, which asyncio's and uvloop's transports
    never do).

    To stay cheap, ``result`` is the C builtin ``NoneType`` (calling it
    returns None) except after ``cancel``, when it raises ``CancelledError``
    once. Cancelling the waiting task calls ``cancel``, which schedules the
    callback the ordinary way.
    """

    __slots__ = (
        "_asyncio_future_blocking",
        "_callback",
        "_cancel_message",
        "_context",
        "_loop",
        "result",
    )

    def __init__(self, loop: AbstractEventLoop) -> None:
        self._loop = loop  # read by asyncio.futures._get_loop and the C Task
        self._asyncio_future_blocking = False
        self._callback: Callable[[Any], object] | None = None
        self._context: Context | None = None
        self._cancel_message: object = None
        self.result: Callable[[], None] = _NoneType

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
            self._loop.call_soon(callback, self, context=self._context)

    def cancel(self, msg: object = None) -> bool:
        if self._callback is None:
            return False
        self._cancel_message = msg
        self.result = self._raise_cancelled
        self.wake_soon()
        return True

    def _raise_cancelled(self) -> None:
        self.result = _NoneType
        msg, self._cancel_message = self._cancel_message, None
        raise CancelledError() if msg is None else CancelledError(msg)

    def done(self) -> bool:
        return self._callback is None

    def cancelled(self) -> bool:
        return self.result is not _NoneType

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


class FrameProtocol(asyncio.BufferedProtocol):
    """The asyncio protocol of one framed connection: decode, wake, write, flow control.

    Subclassed by ``fastnet.Connection``, which is what handlers use; see
    the module docstring for the design.

    Args:
        framing: the wire layout (``LengthPrefixed`` or ``Lines``).
        server: the observer of a server-side connection (the supervisor,
            see ``_observer.ConnectionObserver``: framing errors, shutdown),
            or None on the client side.
        max_write_buffer: the hard limit of unsent bytes (see ``WriteBufferFull``).

    Attributes:
        bytes_in, frames_in: received bytes and decoded frames (counted per read).
        bytes_out, frames_out, writes: sent bytes and frames, and the
            transport writes that carried them (counted per flush).
        peer, local: the peer's and this side's addresses, as the socket
            module gives them (``(host, port)`` for TCP).
    """

    # ``get_buffer`` is a slot holding the decoder's bound method: it shadows
    # BufferedProtocol.get_buffer, so the transport calls the decoder straight
    # away (uvloop reads this attribute once, when the transport is made).
    # ``buffer_updated`` is a slot too, holding ``_received`` or, on CPython's
    # selector transport, ``_read_burst`` (uvloop reads it once, too).
    __slots__ = (
        "__weakref__",
        "_await_wakeup",
        "_closed_waiters",
        "_closing",
        "_consumed_mark",
        "_decoded",
        "_decoder",
        "_decoder_failed",
        "_delivering",
        "_drain_waiter",
        "_encode_many",
        "_end",
        "_end_quiet",
        "_flush_scheduled",
        "_framing",
        "_handler_error",
        "_header",
        "_inbox",
        "_loop",
        "_lost",
        "_max_write_buffer",
        "_on_frames",
        "_out",
        "_peer_eof",
        "_pos",
        "_read_fd",
        "_read_paused",
        "_send_block",
        "_server",
        "_transport",
        "_wakeup",
        "_write_buffers",
        "_write_paused",
        "buffer_updated",
        "bytes_in",
        "bytes_out",
        "frames_in",
        "frames_out",
        "get_buffer",
        "local",
        "peer",
        "writes",
    )

    def __init__(
        self,
        framing: Framing,
        *,
        server: ConnectionObserver | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._framing = framing
        self._server = server
        self._max_write_buffer = max_write_buffer
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.peer: Any = None
        self.local: Any = None

        decoder = framing.decoder()
        self._decoder = decoder
        self._decoder_failed = False  # a framing error: the decoder takes no more input
        self.get_buffer = decoder.get_buffer  # type: ignore[method-assign]
        self.buffer_updated = self._received  # type: ignore[method-assign]
        self._decoded = decoder.buffer_updated
        self._read_fd = -1  # the socket's descriptor, for _read_burst; -1: not reading on
        encoder = framing.encoder
        self._encode_many: Callable[[Iterable[Buffer]], bytes] = encoder.encode_many
        # Only a length-prefixed encoder can write a length field apart from its payload.
        self._header: Callable[[int], bytes] | None = getattr(encoder, "header", None)
        # Writes a list of buffers as one vectored write; None where the
        # transport cannot (connection_made decides).
        self._write_buffers: Callable[[list[Buffer]], None] | None = None

        # Receive side: the inbox is a list of frames, ``_pos`` the next one.
        self._inbox: Sequence[bytes] = _EMPTY
        self._pos = 0
        self._wakeup = _Wakeup(loop)
        self._await_wakeup = _AwaitWakeup((self._wakeup,))
        self._delivering = False  # the handler is being resumed inside buffer_updated
        self._read_paused = 0  # _PAUSE_* flags
        self._consumed_mark = 0  # bytes_in when the handler last caught up
        # Why no more frames will come: a factory of the exception recv()
        # raises, and whether ``async for`` ends quietly; None while input may
        # still come.
        self._end: Callable[[], Exception] | None = None
        self._end_quiet = True
        # A callback handler (server.CallbackHandler): called with each batch
        # inside buffer_updated instead of waking a task; its exception, if any.
        self._on_frames: Callable[[Any, list[bytes]], Iterable[Buffer] | None] | None = None
        self._handler_error: Exception | None = None

        # Send side.
        self._out: list[Buffer] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # A factory of the exception send() raises; None while sending is allowed.
        self._send_block: Callable[[], Exception] | None = None

        self._closing = False  # close() or abort() was called, or a flush failed
        self._peer_eof = False  # the peer closed its sending side
        self._lost = False  # connection_lost happened
        self._closed_waiters: list[asyncio.Future[None]] = []

        self.bytes_in = 0
        self.frames_in = 0
        self.bytes_out = 0
        self.frames_out = 0
        self.writes = 0

    # ------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        fd = _selector_socket_fd(transport)
        self._write_buffers = _vectored_writer(transport, fd)
        if fd >= 0:
            self._read_fd = fd
            self.buffer_updated = self._read_burst  # type: ignore[method-assign]
        if self._write_buffers is None:
            # Without vectored writes, [length field, payload] would cost two
            # send calls and a 4-byte packet per large frame; copying the
            # payload into one buffer is cheaper.
            self._header = None

    def _read_burst(self, nbytes: int) -> None:
        """``buffer_updated`` on CPython's selector transport: take the read, then read on.

        Only through large frames: after a read that began one (its payload
        has most likely arrived with its header) or that filled the rest of
        one (the next header most likely follows), read again at once, with
        ``os.readv`` on the socket, instead of returning to the selector for
        each read. What the transport's read path would do with the outcome
        is done here too: an error fails the transport its way; the end of
        the stream stays in the socket, where the transport's next read
        finds it.
        """
        decoder = self._decoder
        missing = decoder.missing  # what this read's window was for, if a large frame's
        self._received(nbytes)
        transport = self._transport
        fd = self._read_fd
        for _ in range(READ_BURST):
            if missing:
                if nbytes < missing:
                    return  # a short read: the socket is most likely drained
            elif not decoder.missing:
                return  # no large frame begun: small frames are not read on
            # Not when reading is paused (backpressure, shutdown, a framing
            # error), nor once the connection is closing.
            if self._read_paused or not transport.is_reading():
                return
            missing = decoder.missing
            buf = decoder.get_buffer(-1)
            try:
                nbytes = os.readv(fd, (buf,))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                transport._fatal_error(exc, "Fatal read error on socket transport")  # type: ignore[attr-defined]
                return
            if not nbytes:
                return
            self._received(nbytes)

    def _received(self, nbytes: int) -> None:
        """``buffer_updated``: decode ``nbytes`` just received and deliver the frames."""
        self.bytes_in += nbytes
        try:
            frames = self._decoded(nbytes)
        except FrameError as exc:
            self._framing_failed(exc)
            return
        if not frames:
            return
        self.frames_in += len(frames)
        on_frames = self._on_frames
        if on_frames is not None:
            # A callback handler runs here and now, and its sends leave as one
            # write right after. (Inlined: this is the fastest path there is.)
            self._delivering = True
            try:
                replies = on_frames(self, frames)
            except Exception as exc:
                self._callback_failed(exc)
                return
            self._delivering = False
            if self._out:
                if replies is not None:
                    self._out.extend(replies)
                replies = None
            elif replies is not None and type(replies) is not list:
                replies = list(replies)
            # try/except rather than contextlib.suppress: this runs on every read.
            try:  # noqa: SIM105
                self._flush(replies)
            except Exception:  # the flush failed the connection (see _encode_failed)
                pass
            return
        # Queue the frames: the inbox is the decoder's list unless the handler
        # has not finished the previous one.
        inbox = self._inbox
        if self._pos == len(inbox):
            self._inbox = frames
            self._pos = 0
            self._consumed_mark = self.bytes_in - nbytes
        else:
            inbox.extend(frames)  # type: ignore[attr-defined]  # a decoder's list
        # Resume the waiting handler here and now; it runs until it waits
        # again (flushing its replies as it does) or awaits something else.
        wakeup = self._wakeup
        callback = wakeup._callback
        if callback is not None:
            wakeup._callback = None
            if _current_task(self._loop) is None:
                context = wakeup._context
                self._delivering = True
                if context is None:
                    callback(wakeup)
                else:
                    context.run(callback, wakeup)
                self._delivering = False
                if self._out:  # replies left by a handler that awaited something else
                    try:  # noqa: SIM105 - a hot path, see above
                        self._flush()
                    except Exception:  # kept in _send_block for the handler's next call
                        pass
            else:
                self._loop.call_soon(callback, wakeup, context=wakeup._context)
        # Backpressure: the handler is far behind.
        unconsumed = len(self._inbox) - self._pos
        if unconsumed and (
            unconsumed > READ_HIGH_FRAMES or self.bytes_in - self._consumed_mark > READ_HIGH_BYTES
        ):
            self._pause_reading(_PAUSE_INBOX)

    def _call_on_frames(self, frames: list[bytes]) -> None:
        # buffer_updated's callback-handler branch, for frames queued outside a read.
        self._delivering = True
        try:
            replies = self._on_frames(self, frames)  # type: ignore[misc]
        except Exception as exc:
            self._callback_failed(exc)
            return
        self._delivering = False
        if replies is not None:
            self._out.extend(replies)
        if self._out:
            with contextlib.suppress(Exception):  # the flush failed the connection
                self._flush()

    def _callback_failed(self, exc: Exception) -> None:
        self._delivering = False
        self._out.clear()
        if not isinstance(exc, (ConnectionBrokenError, ConnectionClosedError)):
            self._handler_error = exc
        self._input_ended(_reraise_factory(exc), quiet=False)

    async def _wait_input_end(self) -> None:
        """Wait until no more frames will come (for callback handlers' supervisors)."""
        wakeup = self._wakeup
        while self._end is None:
            wakeup._asyncio_future_blocking = True
            await self._await_wakeup

    def _queue_frames(self, frames: list[bytes]) -> None:
        """Queue frames outside a read (end of stream, frames before an error) and wake."""
        self.frames_in += len(frames)
        if self._on_frames is not None:
            self._call_on_frames(frames)
            return
        inbox = self._inbox
        if self._pos == len(inbox):
            self._inbox = frames
            self._pos = 0
        else:
            inbox.extend(frames)  # type: ignore[attr-defined]
        self._wakeup.wake_soon()

    def _framing_failed(self, exc: FrameError) -> None:
        if self._closing:  # bad bytes after we closed (while lingering): just go
            self._transport.abort()
            return
        self._decoder_failed = True
        if exc.frames:  # complete frames that preceded the bad bytes: deliver them first
            self._queue_frames(exc.frames)
        self._report_frame_error(exc)
        self._input_ended(_broken_factory(exc))

    def _report_frame_error(self, exc: FrameError) -> None:
        server = self._server
        if server is not None:
            server.frame_error(self, exc)
        else:
            logger.debug("framing error from %s: %s", self.peer, exc)

    def eof_received(self) -> bool | None:
        self._peer_eof = True
        if self._closing:  # the peer's answer to our FIN (lingering close): done
            return False
        try:
            frames = self._decoder.eof()
        except FrameError as exc:  # the stream ended inside a frame
            self._decoder_failed = True
            if exc.frames:
                self._queue_frames(exc.frames)
            self._report_frame_error(exc)
            self._input_ended(_broken_factory(exc), pause=False)
        else:
            if frames:
                self._queue_frames(frames)
            self._input_ended(_peer_closed, pause=False)
        # Keep the transport open for writing: the handler may still answer
        # the last requests of a peer that closed its sending side.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._closing:
            self._input_ended(_closed_by_us, quiet=False, pause=False)
        elif exc is None:
            self._input_ended(_peer_closed, pause=False)
        else:
            self._input_ended(_broken_factory(exc), pause=False)
        if self._send_block is None or self._send_block is _write_buffer_full:
            self._send_block = _closed_by_us if self._closing else _broken_factory(exc)
        self._out.clear()
        self._wake_drain(exc)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._send_block is _write_buffer_full:
            self._send_block = None
        self._unpause_reading(_PAUSE_WRITE)
        self._wake_drain(None)

    # ------------------------------------------------------------ mechanics

    def _input_ended(
        self, exc_factory: Callable[[], Exception], *, quiet: bool = True, pause: bool = True
    ) -> None:
        """No more frames will come: ``recv`` raises ``exc_factory()`` after the queued ones."""
        if self._end is None:
            self._end = exc_factory
            self._end_quiet = quiet
        if pause:
            self._pause_reading(_PAUSE_STOP)
        self._wakeup.wake_soon()

    def _finish(self) -> None:
        """End the connection gracefully (the server does this when the handler is done).

        Flush the replies, send FIN after them (``write_eof``), and read and
        discard whatever the peer still sends until its own FIN, then close.
        Closing at once instead, with unread input in the socket, would make
        the kernel send RST and drop the replies still in its send queue: a
        pipelining client would lose answers. The caller bounds the wait and
        aborts a peer that never closes.
        """
        if self._lost:
            return
        if self._closing:  # closed by the handler, or failed: the transport is closing
            return
        if self._out:
            try:
                self._flush()
            except Exception:  # the flush failed the connection and closed it
                return
        self._mark_closing()
        transport = self._transport
        # Nothing to wait for when the peer already closed; nothing worth it
        # after a framing error (the decoder takes no more input) or a
        # handler error.
        failed = self._decoder_failed or self._handler_error is not None
        if self._peer_eof or failed or not transport.can_write_eof():
            transport.close()
            return
        self._on_frames = _discard  # what still arrives is read and dropped
        self._read_paused = 0
        try:
            transport.write_eof()
            transport.resume_reading()
        except (OSError, RuntimeError):  # the transport is already going away
            transport.close()

    def _begin_shutdown(self) -> None:
        """The server is shutting down: stop reading; end the input after the queued frames."""
        self._input_ended(_shutting_down)

    def _idle_timeout(self) -> None:
        """Close a connection whose handler waited ``idle_timeout`` with no byte received."""
        self._input_ended(_idle_closed)
        self._abort()

    @property
    def _idle(self) -> bool:
        # The handler is waiting for frames: the idle timer runs only then,
        # like a read timeout that applies to a pending read.
        return self._wakeup._callback is not None

    def _caught_up(self) -> None:
        # The handler took every queued frame.
        self._consumed_mark = self.bytes_in
        self._unpause_reading(_PAUSE_INBOX)

    def _consumed_one(self, frame: bytes) -> None:
        # recv() took one frame while reading is paused for some reason.
        if self._read_paused & _PAUSE_INBOX:
            self._consumed_mark += len(frame)
            if (
                len(self._inbox) - self._pos <= READ_LOW_FRAMES
                and self.bytes_in - self._consumed_mark <= READ_LOW_BYTES
            ):
                self._unpause_reading(_PAUSE_INBOX)

    def _pause_reading(self, reason: int) -> None:
        paused = self._read_paused
        self._read_paused = paused | reason
        if not paused and not self._lost:
            with contextlib.suppress(RuntimeError):  # a closing transport may refuse
                self._transport.pause_reading()

    def _unpause_reading(self, reason: int) -> None:
        paused = self._read_paused
        if not paused & reason:
            return
        paused &= ~reason
        self._read_paused = paused
        if not paused and not self._lost and not self._transport.is_closing():
            self._transport.resume_reading()

    def _schedule_flush(self) -> None:
        # First frame of a batch sent outside buffer_updated's resumption of
        # the handler: make sure it goes out even if nobody waits for input.
        self._flush_scheduled = True
        self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            with contextlib.suppress(Exception):  # kept in _send_block for the handler's next call
                self._flush()

    def _flush(self, out: list[Buffer] | None = None) -> None:
        """Write every queued frame (or ``out``, if given): one encode_many and one write.

        Raises:
            FrameError, TypeError: a frame cannot be encoded; the frames
                before it were written and the connection is failed.
        """
        if out is None:
            out = self._out
            self._out = []
        # Nowhere to write once lost or closing (close() and _finish() flush
        # before they mark the connection closing); send() reports it.
        if self._lost or self._closing or not out:
            return
        transport = self._transport
        header = self._header
        n = len(out)
        if header is not None and (
            len(out[0]) >= LARGE_FRAME if n == 1 else max(map(len, out)) >= LARGE_FRAME
        ):
            size = self._flush_large(out, header)
        else:
            try:
                data = self._encode_many(out)
            except Exception as exc:
                self._encode_failed(out, exc)
                raise
            transport.write(data)
            size = len(data)
        self.frames_out += n
        self.bytes_out += size
        self.writes += 1
        if (
            self._write_paused
            and self._send_block is None
            and transport.get_write_buffer_size() > self._max_write_buffer
        ):
            self._send_block = _write_buffer_full

    def _flush_large(self, out: list[Buffer], header: Callable[[int], bytes]) -> int:
        """Write a batch holding large payloads without copying them."""
        buffers: list[Buffer] = []
        start = 0
        encode_many = self._encode_many
        try:
            for i, frame in enumerate(out):
                size = len(frame)
                if size >= LARGE_FRAME and (type(frame) is bytes or _is_flat(frame)):
                    if i > start:
                        buffers.append(encode_many(out[start:i]))
                    buffers.append(header(size))
                    buffers.append(frame)
                    start = i + 1
            if start < len(out):
                buffers.append(encode_many(out[start:]))
        except Exception as exc:
            self._encode_failed(out, exc)
            raise
        size = sum(map(len, buffers))
        assert self._write_buffers is not None  # else no _header, and no call here
        self._write_buffers(buffers)
        return size

    def _encode_failed(self, out: list[Buffer], exc: Exception) -> None:
        """Write the frames before the one that cannot be encoded, then fail the connection."""
        good: list[Buffer] = []
        for frame in out:
            try:
                self._encode_many((frame,))
            except Exception:
                break
            good.append(frame)
        if good:
            self._transport.write(self._encode_many(good))
        self._send_block = _reraise_factory(exc)
        self._input_ended(_reraise_factory(exc), quiet=False)
        self._closing = True
        self._transport.close()

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter = self._drain_waiter
        if waiter is None:
            return
        self._drain_waiter = None
        if waiter.done():
            return
        if exc is None and not self._lost:
            waiter.set_result(None)
        elif self._closing:
            waiter.set_exception(_closed_by_us())
        else:
            waiter.set_exception(_broken_factory(exc)())

    def _mark_closing(self) -> None:
        """This side is closing: sends and receives (after the queued frames) now raise."""
        self._closing = True
        if self._send_block is None or self._send_block is _write_buffer_full:
            self._send_block = _closed_by_us
        self._input_ended(_closed_by_us, quiet=False, pause=False)

    def _abort(self) -> None:
        self._out.clear()
        self._mark_closing()
        self._transport.abort()

    # --- supervisor hooks (server branch) ---
    # Read by the server's one timer (supervisor.py) every tick, O(1) each;
    # nothing here runs per read.

    @property
    def _frame_pending(self) -> int:
        """Bytes received of a frame not yet complete (0 at a frame boundary).

        Nonzero means a frame is in progress: the frame deadline runs. 0 once
        the input has ended (nothing more will be read into that frame).
        """
        if self._end is not None or self._decoder_failed:
            return 0
        decoder = self._decoder
        return int(decoder.pending or decoder.missing)

    @property
    def _backpressured(self) -> bool:
        """Reading is paused by fastnet's own backpressure, not by the peer's silence.

        True while the handler has too many frames queued (it is busy: the
        connection is not idle) or while the transport is over its write
        high-water mark (the peer is being sent replies; whether it takes
        them is output progress, which the supervisor watches).
        """
        return bool(self._read_paused & (_PAUSE_INBOX | _PAUSE_WRITE))

    @property
    def _write_backpressured(self) -> bool:
        """Reading is paused because the transport is over its write high-water mark."""
        return bool(self._read_paused & _PAUSE_WRITE)

    def _timed_out(self, message: str) -> None:
        """Close at once for a timeout the supervisor enforces (frame deadline...).

        The handler's ``recv`` raises ``ConnectionClosedError(message)`` after
        the queued frames; the transport is aborted.
        """

        def factory() -> Exception:
            return ConnectionClosedError(message)

        self._input_ended(factory)
        self._abort()


def _discard(conn: FrameProtocol, frames: list[bytes]) -> None:
    """The ``_on_frames`` of a connection that is closing: input is dropped."""


# The exceptions that end a connection's input or output, as factories: a
# fresh exception per raise keeps tracebacks from piling up on one object.


def _closed_by_us() -> Exception:
    return ConnectionClosedError("the connection is closed")


def _peer_closed() -> Exception:
    return ConnectionBrokenError("the peer closed the connection")


def _shutting_down() -> Exception:
    return ConnectionClosedError("the server is shutting down")


def _idle_closed() -> Exception:
    return ConnectionClosedError("closed after the idle timeout")


def _write_buffer_full() -> Exception:
    return WriteBufferFull("the write buffer is over its limit; await drain() before sending more")


def _broken_factory(cause: BaseException | None) -> Callable[[], Exception]:
    def factory() -> Exception:
        if cause is None:
            return ConnectionBrokenError("the connection was lost")
        exc = ConnectionBrokenError(f"the connection broke: {cause}")
        exc.__cause__ = cause
        return exc

    return factory


def _reraise_factory(exc: Exception) -> Callable[[], Exception]:
    def factory() -> Exception:
        return exc

    return factory
