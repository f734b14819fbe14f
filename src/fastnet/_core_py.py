"""Pure-Python twin of ``fastnet._core``: the per-read and per-send path of a connection.

Strategy: the Python work on a busy connection is fixed per *read*, never per
frame, and all of it lives in ``ConnectionCore``; the extension compiles the
same logic to C (``_core.pyx``), and both must behave identically, call for
call (the connection tests run on both).

Receiving. ``get_buffer`` is the decoder's own bound method, stored on the
instance, so the kernel receives into the decoder's buffer (or, for a large
frame, into the frame's final bytes object) with nothing in between.
``buffer_updated`` makes one decoder call and bumps two counters; then it
either calls a callback handler with the batch and writes its replies at
once, or stores the batch as the inbox (not a copy; appended to only when
the handler is behind) and resumes the waiting handler task right there,
through its ``_Wakeup``. On CPython's selector transport it reads on through
runs of large frames (``read_fd``, at most ``READ_BURST`` more reads).

Receiving, handler side. ``_take_batch`` and ``_take_one`` are the
synchronous halves of ``recv_batch``/``recv``/``async for``: they return
what is queued, or flush the handler's replies, check why it may not wait
(input ended, another receiver, backpressure to lift) and arm the wake-up,
returning None: the coroutine then awaits the wake-up.

Sending. ``send``/``send_many``/``try_send`` validate and encode each frame
into the ``OutQueue`` as it is sent (a bad frame raises in the caller, with
nothing queued) and check the write-buffer limit exactly: the queued bytes,
plus what the transport holds, plus this frame. Everything queued leaves as
one write (``_flush``): when the handler waits for input or drains, at the
end of the read callback that resumed it, or from one ``call_soon`` per batch
for sends made elsewhere.

Flow control. On a server's connection (``read_pauses_on_write``), a
handler whose replies are over the write high-water mark (queued, or in the
transport) takes no more queued frames until the peer reads
(``_wait_writing``): what a request/response handler holds is bounded by the
mark, not by how many requests the peer pipelined. Reading pauses while the
handler has more than
``READ_HIGH_FRAMES`` frames or ``READ_HIGH_BYTES`` bytes queued, and resumes
once it is down to a quarter; on a server's connections it also pauses while
the transport is over its write high-water mark (``read_pauses_on_write``),
and, with a frames-per-second limit (``fastnet.Limits.frame_rate``), while
the connection's ``FrameRate`` bucket is in debt, until a timer finds it
refilled (``PAUSE_RATE``). Like ``ReadStats``, the bucket is a field that
is None unless the limit is on: one pointer test per read otherwise.

Everything that happens once per connection or less (connection_made, the
end of input, closing) is in ``protocol.FrameProtocol``, in Python, for both
backends; the core calls it for the rare events (a framing error, a failed
callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import _reasons
from ._internals import current_task, fatal_error
from ._tunables import (
    BATCH_BOUNDS,
    BULK_READ,
    DEFAULT_MAX_WRITE_BUFFER,
    HANDLER_SECONDS_BOUNDS,
    LARGE_FRAME,
    PAUSE_FAIR,
    PAUSE_INBOX,
    PAUSE_RATE,
    PAUSE_WRITE,
    PLAIN_AFTER_READS,
    QUEUE_CHECK_BYTES,
    READ_BURST,
    READ_FAIR_FRAMES,
    READ_HIGH_BYTES,
    READ_HIGH_FRAMES,
    READ_LOW_BYTES,
    READ_LOW_FRAMES,
)
from ._wakeup import _AwaitWakeup, _Wakeup
from .errors import ConnectionBusyError, FrameError
from .lifecycle import CLOSED, CLOSING, OPEN

if TYPE_CHECKING:
    from .framing import Buffer

__all__ = ["ConnectionCore", "FrameRate", "ReadStats"]

_EMPTY: Sequence[bytes] = ()  # the inbox when nothing is queued; never mutated
_monotonic = time.monotonic  # CLOCK_MONOTONIC, as the extension reads it


class ReadStats:
    """Histograms the connections of one server fill per read, when metrics are on.

    ``batches``: frames per read (bounds ``BATCH_BOUNDS``). ``handler``:
    seconds per handler run (``HANDLER_SECONDS_BOUNDS``): a callback
    handler's call per batch, or a task handler's time from its wake-up by
    a read (or, when frames were already queued, from its taking them) to
    its next wait for input. Each observation is one bucket increment; the
    exporter reads ``snapshot()`` at scrape time.
    """

    __slots__ = ("_batch_counts", "_batch_sum", "_handler_counts", "_handler_sum")

    def __init__(self) -> None:
        self._batch_counts = [0] * (len(BATCH_BOUNDS) + 1)
        self._batch_sum = 0
        self._handler_counts = [0] * (len(HANDLER_SECONDS_BOUNDS) + 1)
        self._handler_sum = 0.0

    def observe_batch(self, frames: int) -> None:
        """Count one read that delivered ``frames`` frames."""
        self._batch_counts[bisect_left(BATCH_BOUNDS, frames)] += 1
        self._batch_sum += frames

    def observe_handler(self, seconds: float) -> None:
        """Count one handler run of ``seconds``."""
        self._handler_counts[bisect_left(HANDLER_SECONDS_BOUNDS, seconds)] += 1
        self._handler_sum += seconds

    def snapshot(self) -> tuple[list[int], int, list[int], float]:
        """``(batch bucket counts, frames, handler bucket counts, seconds)``; counts per bucket,
        not cumulative, the last one for +Inf."""
        return (
            list(self._batch_counts),
            self._batch_sum,
            list(self._handler_counts),
            self._handler_sum,
        )


class FrameRate:
    """One connection's frames-per-second token bucket (``fastnet.Limits.frame_rate``).

    It holds up to ``burst`` tokens and refills at ``rate`` a second. A read
    takes a token per frame it delivered, and may leave the bucket in debt
    (its frames are delivered all the same); reading then pauses for as long
    as the debt takes to refill. ``take`` and ``wait`` return that time in
    seconds (0.0: no pause). ``handle`` is the pending resume timer, if any.
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens", "handle")

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = _monotonic()
        self.handle: asyncio.TimerHandle | None = None

    def _refill(self) -> float:
        now = _monotonic()
        tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        return tokens

    def take(self, frames: int) -> float:
        """Take ``frames`` tokens; the seconds to pause reading for (0.0: none)."""
        tokens = self._refill() - frames
        self._tokens = tokens
        return 0.0 if tokens >= 0.0 else -tokens / self._rate

    def wait(self) -> float:
        """Refill; the seconds left until the debt is paid (0.0: reading may resume)."""
        tokens = self._refill()
        self._tokens = tokens
        return 0.0 if tokens >= 0.0 else -tokens / self._rate

    @property
    def tokens(self) -> float:
        """The tokens in the bucket now (negative: in debt)."""
        return min(self._burst, self._tokens + (_monotonic() - self._last) * self._rate)

    def cancel(self) -> None:
        """Cancel the pending resume timer (the connection is closing)."""
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()


class _PlainReads:
    """The protocol a uvloop transport reads through between large frames.

    uvloop reads into a buffer of its own, shared by all its connections, and
    calls ``data_received`` with the bytes when the protocol has no
    ``get_buffer`` (``_internals`` 5e): one Python call per read, against two
    (``get_buffer``, then ``buffer_updated``) for the connection itself. The
    decoder copies the bytes out as it would from its own buffer. Everything
    else uvloop calls goes to the connection.
    """

    __slots__ = ("core",)

    def __init__(self, core: ConnectionCore) -> None:
        self.core = core

    def data_received(self, data: bytes) -> None:
        self.core._chunk(data)

    def eof_received(self) -> bool | None:
        return self.core.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.core.connection_lost(exc)  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.core.pause_writing()

    def resume_writing(self) -> None:
        self.core.resume_writing()


class ConnectionCore:
    """The per-read and per-send state and path of one framed connection.

    The first base of every ``fastnet.Connection`` class; see the module
    docstring. Its methods other than ``send``, ``send_many``, ``try_send``,
    ``write_buffer_size`` and ``writable`` are for the transport and for
    fastnet's own layers.

    Args:
        framing: the wire layout (``LengthPrefixed`` or ``Lines``); its
            decoder and out queue must come from this backend.
        server: the ``Server`` this connection belongs to, or None on the
            client side.
        max_write_buffer: the hard limit of unsent bytes.
    """

    __slots__ = (
        "__weakref__",
        "_await_wakeup",
        "_buffered_reads",
        "_close_pending",
        "_closed_waiters",
        "_consumed_mark",
        "_decoded",
        "_decoder",
        "_decoder_failed",
        "_delivering",
        "_drain_waiter",
        "_end",
        "_end_quiet",
        "_feed",
        "_flush_scheduled",
        "_frame_rate",
        "_framing",
        "_half_close",
        "_handler_error",
        "_high_water",
        "_inbox",
        "_lifecycle",
        "_loop",
        "_max_write_buffer",
        "_on_frames",
        "_out",
        "_overhead",
        "_plain_reads",
        "_pos",
        "_read_fd",
        "_read_paused",
        "_read_pauses_on_write",
        "_read_stats",
        "_reading_plain",
        "_send_block",
        "_server",
        "_strategy",
        "_tasks",
        "_transport",
        "_user_state",
        "_wakeup",
        "_woke_at",
        "_write",
        "_write_buffers",
        "_write_paused",
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
        framing: Any,
        server: Any = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._framing = framing
        self._server = server
        self._max_write_buffer = max_write_buffer
        self._transport: Any = None  # connection_made
        self._write: Callable[[Any], None] | None = None  # transport.write
        self._high_water = 0  # the transport's write high-water mark
        self.peer: Any = None
        self.local: Any = None

        decoder = framing.decoder()
        self._decoder = decoder
        self._decoder_failed = False  # a framing error: the decoder takes no more input
        self.get_buffer = decoder.get_buffer
        self._decoded = decoder.buffer_updated
        # The decoder's feed, for plain reads; None once _set_reader ran.
        self._feed: Callable[[bytes], list[bytes]] | None = decoder.feed
        self._read_fd = -1  # the socket fastnet reads on itself; -1: never (transports.py)
        # uvloop: the transport reads through a _PlainReads between large
        # frames, and does now (see _chunk).
        self._plain_reads = False
        self._reading_plain = False
        self._buffered_reads = 0  # reads in a row through get_buffer with no large frame begun
        self._strategy: Any = None  # connection_made chooses it
        # Writes a list of buffers as one vectored write; None: join them.
        self._write_buffers: Callable[[list[Buffer]], None] | None = None
        self._out = framing.out_queue(0)
        # Wire bytes a frame adds to its payload: the length field or the delimiter.
        self._overhead: int = framing.overhead

        # Receive side: the inbox is a list of frames, ``_pos`` the next one.
        self._inbox: Sequence[bytes] = _EMPTY
        self._pos = 0
        self._wakeup = _Wakeup(loop)
        self._await_wakeup = _AwaitWakeup((self._wakeup,))
        self._delivering = False  # the handler is running inside buffer_updated
        self._read_paused = 0  # PAUSE_* flags
        self._consumed_mark = 0  # bytes_in when the handler last caught up
        # Why no more frames will come: a factory of the exception recv()
        # raises, and whether ``async for`` ends quietly; None while input may
        # still come.
        self._end: Callable[[], Exception] | None = None
        self._end_quiet = True
        # A callback handler: called with each batch inside buffer_updated
        # instead of waking a task; its exception, or a spawned task's, if any.
        self._on_frames: Callable[[Any, list[bytes]], Iterable[Buffer] | None] | None = None
        self._handler_error: Exception | None = None

        # Send side.
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # A factory of the exception send() raises; None while sending is allowed.
        self._send_block: Callable[[], Exception] | None = None

        self._lifecycle = OPEN  # lifecycle.py; FrameProtocol._move_to changes it
        # Reading pauses while the transport is over its write high-water
        # mark: on a server's connections (Connection.read_pauses_on_write).
        self._read_pauses_on_write = server is not None
        # After the peer's FIN: keep writing (a server) or close (a client).
        self._half_close = server is not None
        self._closed_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # Connection.spawn
        self._close_pending = False  # close() waits for the spawned tasks
        self._user_state: Any = None

        self.bytes_in = 0
        self.frames_in = 0
        self.bytes_out = 0
        self.frames_out = 0
        self.writes = 0
        self._read_stats: ReadStats | None = None  # set by a server with metrics on
        self._woke_at = 0.0  # when a task handler was last woken (metrics only)
        self._frame_rate: FrameRate | None = None  # set by a server with a frame-rate limit

    # ------------------------------------------------------------ receiving

    def buffer_updated(self, nbytes: int) -> None:
        """Decode ``nbytes`` just received and deliver the frames; read on through large frames."""
        if self._read_fd < 0:
            self._received(nbytes)
            if self._plain_reads:
                self._count_buffered_read(nbytes)
            return
        # CPython's selector transport: after a read that began a large frame
        # (its payload has most likely arrived with its header) or that
        # filled the rest of one (the next header most likely follows), read
        # again at once with os.readv instead of going back to the selector.
        # Reads of small frames never read on. An error fails the transport
        # its way; the end of the stream stays in the socket for the
        # transport's next read to find.
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
                return  # no large frame begun
            # Not when reading is paused, nor once the connection is closing.
            if self._read_paused or not transport.is_reading() or self._read_fd < 0:
                return
            missing = decoder.missing
            buf = decoder.get_buffer(-1)
            try:
                nbytes = os.readv(fd, (buf,))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                fatal_error(transport, exc, "Fatal read error on socket transport")
                return
            if not nbytes:
                return
            self._received(nbytes)

    def _new_read_stats(self) -> ReadStats:
        """A new ``ReadStats`` of this backend, for a server to share among its connections."""
        return ReadStats()

    def _new_frame_rate(self, rate: float, burst: float) -> FrameRate:
        """A new ``FrameRate`` of this backend, for this connection."""
        return FrameRate(rate, burst)

    def _received(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        try:
            frames = self._decoded(nbytes)
        except FrameError as exc:
            self._framing_failed(exc)  # type: ignore[attr-defined]
            return
        self._arrived(frames, nbytes)

    def _chunk(self, data: bytes) -> None:
        # A read that uvloop made into its own buffer: _PlainReads passes the
        # bytes on. A large frame begun in them is received through
        # get_buffer, straight into its object, and a bulk read (BULK_READ)
        # makes the next ones bounded by get_buffer's window: the connection
        # becomes the transport's protocol again until PLAIN_AFTER_READS
        # small reads in a row begin no large frame (_count_buffered_read).
        nbytes = len(data)
        self.bytes_in += nbytes
        try:
            frames = self._feed(data)  # type: ignore[misc]  # not None while reading plain
        except FrameError as exc:
            self._framing_failed(exc)  # type: ignore[attr-defined]
            return
        self._arrived(frames, nbytes)
        if self._reading_plain and (self._decoder.missing or nbytes >= BULK_READ):
            self._read_buffered()

    def _count_buffered_read(self, nbytes: int) -> None:
        # After a read through get_buffer on uvloop: back to plain reads once
        # PLAIN_AFTER_READS reads in a row began no large frame and were
        # small (BULK_READ).
        if self._decoder.missing or nbytes >= BULK_READ:
            self._buffered_reads = 0
            return
        self._buffered_reads += 1
        if self._buffered_reads >= PLAIN_AFTER_READS and not self._reading_plain:
            self._read_plain()

    def _read_buffered(self) -> None:
        # The connection is the transport's protocol again: uvloop calls its
        # get_buffer, and the rest of a large frame goes straight into its object.
        self._reading_plain = False
        self._buffered_reads = 0
        self._transport.set_protocol(self)

    def _read_plain(self) -> None:
        # A new _PlainReads each time: the connection keeps none, so it makes
        # no reference cycle (uvloop's transport lets go of its protocol when
        # the connection is lost, and the connection of its transport).
        self._reading_plain = True
        self._transport.set_protocol(_PlainReads(self))

    def _arrived(self, frames: list[bytes], nbytes: int) -> None:
        if not frames:
            return
        count = len(frames)
        self.frames_in += count
        if count > READ_FAIR_FRAMES:
            self._yield_reading()
        if self._frame_rate is not None:
            self._charge_frames(count)
        stats = self._read_stats
        if stats is not None:
            stats.observe_batch(count)
        on_frames = self._on_frames
        if on_frames is not None:
            # A callback handler runs here and now; its replies leave as one
            # write right after.
            if stats is not None:
                began = _monotonic()
                self._deliver(on_frames, frames)
                stats.observe_handler(_monotonic() - began)
            else:
                self._deliver(on_frames, frames)
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
        self._resume_receiver()
        # Backpressure: the handler is far behind.
        unconsumed = len(self._inbox) - self._pos
        if unconsumed and (
            unconsumed > READ_HIGH_FRAMES or self.bytes_in - self._consumed_mark > READ_HIGH_BYTES
        ):
            self._pause_reading(PAUSE_INBOX)

    def _deliver(self, on_frames: Callable[..., Any], frames: list[bytes]) -> None:
        # Call a callback handler with a batch; queue and write its replies.
        self._delivering = True
        try:
            replies = on_frames(self, frames)
            if replies is not None:
                if not self._read_pauses_on_write:
                    # Reading goes on whatever the write buffer holds, so
                    # nothing else bounds the replies: they obey
                    # max_write_buffer as send_many's frames do.
                    if type(replies) is not list:
                        replies = list(replies)
                    self._admit(self._wire_size(replies), True)
                self._out.extend(replies)  # validated here: a bad reply is the handler's error
        except Exception as exc:
            self._delivering = False
            self._callback_failed(exc)  # type: ignore[attr-defined]
            return
        self._delivering = False
        if self._out:
            self._flush()
        if self._close_pending:  # the handler called close()
            self._close_after_callback()  # type: ignore[attr-defined]

    def _resume_receiver(self) -> None:
        # Resume the handler task waiting for frames, here and now: it runs
        # until it waits again (flushing its replies as it does) or awaits
        # something else, whose replies are flushed right after.
        wakeup = self._wakeup
        callback = wakeup._callback
        if callback is None:
            return
        wakeup._callback = None
        if self._read_stats is not None:
            self._woke_at = _monotonic()
        if current_task(self._loop) is None:
            context = wakeup._context
            self._delivering = True
            try:
                if context is None:
                    callback(wakeup._resolved)
                else:
                    context.run(callback, wakeup._resolved)
            finally:
                self._delivering = False
            if self._out:
                self._flush()
        else:  # a protocol callback made from inside a task: no nesting
            self._loop.call_soon(callback, wakeup._resolved, context=wakeup._context)

    def _set_reader(
        self, get_buffer: Callable[[int], Any], buffer_updated: Callable[[int], list[bytes]]
    ) -> None:
        """Receive through ``get_buffer``/``buffer_updated`` from now on, not the decoder.

        The decoder stays (its counters are still read); reading on through
        large frames stops. protocol.py's lingering close drops what still
        arrives this way, a failed decoder or not.
        """
        self.get_buffer = get_buffer
        self._decoded = buffer_updated
        self._feed = None
        self._read_fd = -1
        self._plain_reads = False
        self._reading_plain = False

    def _queue_frames(self, frames: list[bytes]) -> None:
        """Queue frames outside a read (end of stream, frames before an error) and wake."""
        self.frames_in += len(frames)
        on_frames = self._on_frames
        if on_frames is not None:
            self._deliver(on_frames, frames)
            return
        inbox = self._inbox
        if self._pos == len(inbox):
            self._inbox = frames
            self._pos = 0
        else:
            inbox.extend(frames)  # type: ignore[attr-defined]
        self._wakeup.wake_soon()

    # The receive coroutines of fastnet.Connection (its documentation is
    # here): each written out in full, for every coroutine level in the
    # handler's await chain costs a frame switch on every read.

    async def recv_batch(self) -> list[bytes]:
        """Return every frame received and not yet consumed: at least one.

        Waits when none is queued (flushing queued sends first). The list
        belongs to the caller.

        Raises:
            ConnectionBrokenError: the peer has gone and every frame was consumed.
            ConnectionClosedError: this side closed the connection, or the
                server is shutting down or timed the connection out.
            ConnectionBusyError: another task is receiving on this connection.
        """
        while True:
            batch = self._take_batch()
            if batch is not None:
                return batch
            await self._await_wakeup

    async def recv(self) -> bytes:
        """Return the next frame, waiting for one if none is queued.

        Raises:
            as ``recv_batch``.
        """
        while True:
            frame = self._take_one(False)
            if frame is not None:
                return frame
            await self._await_wakeup

    async def __anext__(self) -> bytes:
        """``async for``: the next frame; the loop ends quietly when the input ends.

        Raises:
            as ``recv_batch``, except after the input ended without this
            side's ``close()``, when the loop ends.
        """
        while True:
            frame = self._take_one(True)
            if frame is not None:
                return frame
            await self._await_wakeup

    def _take_batch(self) -> list[bytes] | None:
        """``recv_batch`` without the wait: every queued frame, or None after arming the wake-up.

        Raises:
            ConnectionBrokenError, ConnectionClosedError: no frame is queued
                and none will come.
            ConnectionBusyError: another task is receiving.
        """
        inbox = self._inbox
        pos = self._pos
        if pos < len(inbox):
            if (
                self._read_paused & PAUSE_WRITE or self._out.nbytes > QUEUE_CHECK_BYTES
            ) and self._wait_writing():
                return None
            self._inbox = _EMPTY
            self._pos = 0
            if self._read_paused & PAUSE_INBOX:
                self._caught_up()
            if self._read_stats is not None and not self._woke_at:
                self._woke_at = _monotonic()  # frames were queued: the run starts now
            return inbox if pos == 0 else inbox[pos:]  # type: ignore[return-value]
        self._prepare_wait(False)
        return None

    def _take_one(self, quiet_end: bool) -> bytes | None:
        """``recv`` (``async for`` with ``quiet_end``) without the wait: a frame, or None.

        Raises:
            StopAsyncIteration: ``quiet_end`` and the input ended quietly.
            as ``_take_batch`` otherwise.
        """
        inbox = self._inbox
        pos = self._pos
        if pos < len(inbox):
            if (
                self._read_paused & PAUSE_WRITE or self._out.nbytes > QUEUE_CHECK_BYTES
            ) and self._wait_writing():
                return None
            self._pos = pos + 1
            frame = inbox[pos]
            if self._read_paused & PAUSE_INBOX:
                self._consumed_one(frame)
            if self._read_stats is not None and not self._woke_at:
                self._woke_at = _monotonic()  # frames were queued: the run starts now
            return frame
        self._prepare_wait(quiet_end)
        return None

    def _prepare_wait(self, quiet_end: bool) -> None:
        # Nothing queued. The handler is about to wait for the peer, so
        # everything it sent goes out now, as one write.
        self._inbox = _EMPTY
        self._pos = 0
        if self._out:
            self._flush()
        wakeup = self._wakeup
        end = self._end
        if end is not None:
            if quiet_end and self._end_quiet:
                raise StopAsyncIteration
            raise end()
        if wakeup._callback is not None:
            raise ConnectionBusyError("another task is already receiving on this connection")
        # The handler has caught up: resume reading if backpressure paused it.
        if self._read_paused & PAUSE_INBOX:
            self._caught_up()
        woke_at = self._woke_at
        if woke_at:
            # A task handler's run: from its wake-up to this wait.
            self._woke_at = 0.0
            stats = self._read_stats
            if stats is not None:
                stats.observe_handler(_monotonic() - woke_at)
        wakeup._asyncio_future_blocking = True

    def _wait_writing(self) -> bool:
        # Frames are queued for the handler while its replies are past the
        # write high-water mark (queued, or in a paused transport). On a
        # server's connection (read_pauses_on_write) the replies go out now,
        # and while the transport stays over its mark the handler waits for
        # the peer to read before it takes another frame: it holds at most a
        # high-water mark of replies plus one, however many requests the peer
        # pipelined (the frames already read obey the backpressure that
        # reading does). Returns True after arming the wake-up, which
        # resume_writing (or the end of the connection) resolves.
        if not self._read_pauses_on_write or self._send_block is not None:
            return False
        if self._write_paused or self._out.nbytes > self._high_water:
            self._flush()
        if not self._write_paused or self._send_block is not None:
            return False
        wakeup = self._wakeup
        if wakeup._callback is not None:
            raise ConnectionBusyError("another task is already receiving on this connection")
        wakeup._asyncio_future_blocking = True
        return True

    def _caught_up(self) -> None:
        # The handler took every queued frame.
        self._consumed_mark = self.bytes_in
        self._unpause_reading(PAUSE_INBOX)

    def _consumed_one(self, frame: bytes) -> None:
        # recv() took one frame while reading is paused for the inbox.
        self._consumed_mark += len(frame)
        if (
            len(self._inbox) - self._pos <= READ_LOW_FRAMES
            and self.bytes_in - self._consumed_mark <= READ_LOW_BYTES
        ):
            self._unpause_reading(PAUSE_INBOX)

    def _yield_reading(self) -> None:
        # A read of very many frames: pause reading until the loop's next
        # turn, so other connections are served between this one's reads.
        if not self._read_paused & PAUSE_FAIR:
            self._pause_reading(PAUSE_FAIR)
            self._loop.call_soon(self._unpause_reading, PAUSE_FAIR)

    def _charge_frames(self, count: int) -> None:
        # A frames-per-second limit: this read's frames are delivered, and
        # if they put the bucket in debt, reading pauses until it is paid.
        limiter = self._frame_rate
        assert limiter is not None
        delay = limiter.take(count)
        if delay > 0.0 and not self._read_paused & PAUSE_RATE:
            self._pause_reading(PAUSE_RATE)
            limiter.handle = self._loop.call_later(delay, self._rate_resume)

    def _rate_resume(self) -> None:
        # The frame-rate timer: resume if the debt is paid, else wait again.
        limiter = self._frame_rate
        if limiter is None:
            return
        limiter.handle = None
        delay = limiter.wait()
        if delay > 0.0:
            limiter.handle = self._loop.call_later(delay, self._rate_resume)
        else:
            self._unpause_reading(PAUSE_RATE)

    def _pause_reading(self, reason: int) -> None:
        paused = self._read_paused
        self._read_paused = paused | reason
        if not paused and self._lifecycle != CLOSED and self._transport is not None:
            with contextlib.suppress(RuntimeError):  # a closing transport may refuse
                self._transport.pause_reading()

    def _unpause_reading(self, reason: int) -> None:
        paused = self._read_paused
        if not paused & reason:
            return
        paused &= ~reason
        self._read_paused = paused
        if self._lifecycle == CLOSED:
            self._resume_leftover()  # type: ignore[attr-defined]  # protocol.py (leftover.py)
        elif not paused and not self._transport.is_closing():
            self._transport.resume_reading()

    # -------------------------------------------------------------- sending

    def send(self, frame: Buffer) -> None:
        """Queue one frame; it is written with the rest of its batch.

        The frame is checked and encoded now: a frame the framing cannot
        encode (over ``max_frame``, a line holding its delimiter, not
        bytes-like) raises here, with nothing queued, and the connection
        stays usable.

        Raises:
            FrameError, TypeError: the frame cannot be encoded.
            WriteBufferFull: the frame would take the unsent bytes (queued
                and in the transport's buffer) past ``max_write_buffer``.
                (A frame larger than the limit itself goes while the unsent
                bytes are at most the write high-water mark.)
            ConnectionClosedError, ConnectionBrokenError: the connection is
                closed or broke.
        """
        self._admit(_payload_size(frame) + self._overhead, True)
        out = self._out
        was_empty = not out
        out.append(frame)
        self._queued(was_empty)

    def _send_replies(self, frames: list[bytes]) -> None:
        """Queue frames past ``max_write_buffer``: replies whose number is bounded elsewhere.

        A Router's replies from handlers that suspended (at most
        ``max_in_flight`` per connection, and a server connection stops
        reading under write pressure): as a callback handler's replies are
        queued, without ``WriteBufferFull``.
        """
        block = self._send_block
        if block is not None:
            raise block()
        out = self._out
        was_empty = not out
        out.extend(frames)
        self._queued(was_empty)

    def send_many(self, frames: Iterable[Buffer]) -> None:
        """Queue several frames, in order; they are written with the rest of their batch.

        All or nothing: if one frame cannot be encoded, or the frames would
        take the write buffer past its limit, none is queued.

        Raises:
            as ``send``.
        """
        if type(frames) is not list:
            frames = list(frames)
        self._admit(self._wire_size(frames), True)
        out = self._out
        was_empty = not out
        out.extend(frames)
        self._queued(was_empty)

    def _wire_size(self, frames: list[Any]) -> int:
        # What ``frames`` add to the write buffer, as _admit counts it.
        size = 0
        for frame in frames:
            size += _payload_size(frame) + self._overhead
        return size

    def try_send(self, frame: Buffer) -> bool:
        """Queue one frame if the write buffer can take it; never raise ``WriteBufferFull``.

        For fan-out: sending one message to many connections, a slow reader
        among them must not fail the sender. Returns False, with nothing
        queued, where ``send`` would raise ``WriteBufferFull``; what to do
        then (drop the message, close the slow connection) is the caller's
        choice.

        Raises:
            FrameError, TypeError, ConnectionClosedError, ConnectionBrokenError:
                as ``send``.
        """
        if not self._admit(_payload_size(frame) + self._overhead, False):
            return False
        out = self._out
        was_empty = not out
        out.append(frame)
        self._queued(was_empty)
        return True

    def _admit(self, size: int, strict: bool) -> bool:
        # May ``size`` more bytes be queued? Raises if sending has ended.
        # Far from the limit (the common case) that is one comparison; near
        # it, the exact check: raise WriteBufferFull (strict) or say False.
        block = self._send_block
        if block is not None:
            raise block()
        near_limit = self._out.nbytes + size > self._max_write_buffer - self._high_water
        if (self._write_paused or near_limit) and not self._has_room(size):
            if strict:
                raise _reasons.write_buffer_full(size, self._max_write_buffer)
            return False
        return True

    def _queued(self, was_empty: bool) -> None:
        # Frames were queued: the first of a batch sent outside a read
        # schedules the batch's one write.
        if was_empty and self._out and not self._delivering and not self._flush_scheduled:
            self._schedule_flush()

    @property
    def write_buffer_size(self) -> int:
        """Bytes sent and not yet written to the socket: queued, and in the transport's buffer."""
        return self._unsent()

    @property
    def writable(self) -> bool:
        """True while the connection is open for sending and below its write high-water mark.

        The mark counts every unsent byte, the frames queued here as well as
        the transport's buffer (as Netty's ``isWritable`` counts its outbound
        buffer): a handler that sends many frames before it next waits sees
        False once they pass the mark, and ``await conn.drain()`` writes them.
        The cheap question before sending to another connection: False means
        its peer is not keeping up (or it is closing), so a fan-out can skip
        it or use ``try_send``.
        """
        if self._send_block is not None or self._write_paused:
            return False
        return not self._out or self._unsent() <= self._high_water

    def _unsent(self) -> int:
        transport = self._transport
        buffered = 0 if transport is None else transport.get_write_buffer_size()
        return int(self._out.nbytes) + buffered

    def _has_room(self, size: int) -> bool:
        # The limit bounds what piles up, exactly. A frame (or batch) larger
        # than the limit itself goes while the unsent bytes are at most the
        # high-water mark (and the limit): it could not go at all otherwise,
        # and a handler that answers what it reads (reading resumes below the
        # low-water mark, not at 0) would fail on it whenever a few bytes
        # were still unsent. What piles up stays within the limit, or a
        # high-water mark and one such frame.
        unsent = self._unsent()
        limit = self._max_write_buffer
        if unsent + size <= limit:
            return True
        return size > limit and unsent <= min(self._high_water, limit)

    def _schedule_flush(self) -> None:
        # First frame of a batch sent outside buffer_updated's resumption of
        # the handler: make sure it goes out even if nobody waits for input.
        self._flush_scheduled = True
        self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            self._flush()

    def _flush(self) -> None:
        """Write every queued frame: one write (vectored where large payloads are unjoined)."""
        out = self._out
        if self._lifecycle >= CLOSING:
            # Nowhere to write once closing (close() and _finish() flush
            # before they mark the connection closing); send() reports it.
            out.clear()
            return
        n = out.nframes
        size = out.nbytes
        data = out.take()
        if data is None:
            return
        if type(data) is bytes:
            self._write(data)  # type: ignore[misc]
        else:
            write_buffers = self._write_buffers
            if write_buffers is not None:
                write_buffers(data)
            else:
                self._write(b"".join(data))  # type: ignore[misc]
        self.frames_out += n
        self.bytes_out += size
        self.writes += 1

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._read_pauses_on_write:
            self._pause_reading(PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._unpause_reading(PAUSE_WRITE)
        self._wake_drain(None)  # type: ignore[attr-defined]
        if self._pos < len(self._inbox):  # the handler waits in _wait_writing
            self._resume_receiver()

    def _use_transport(self, transport: Any, strategy: Any) -> None:
        """Run over ``transport`` with ``strategy`` (transports.TransportStrategy)."""
        self._transport = transport
        self._write = transport.write
        self._strategy = strategy
        self._read_fd = strategy.read_fd
        self._write_buffers = strategy.write_buffers
        self._reading_plain = False
        self._plain_reads = strategy.plain_reads and self._feed is not None
        if self._plain_reads:
            self._read_plain()
        # Without vectored writes, [length field, payload] would cost two
        # send calls and a 4-byte packet per large frame (or a TLS record of
        # its own); copying the payload into the joined buffer is cheaper.
        threshold = LARGE_FRAME if strategy.write_buffers is not None else 0
        if self._out.nframes:
            self._flush()
        self._out = self._framing.out_queue(threshold)
        try:
            self._high_water = int(transport.get_write_buffer_limits()[1])
        except (AttributeError, NotImplementedError):
            self._high_water = 0


def _payload_size(frame: object) -> int:
    """Bytes of payload in ``frame``; 0 for what is not a buffer (the out queue then refuses it)."""
    kind = type(frame)
    if kind is bytes or kind is bytearray:
        return len(frame)  # type: ignore[arg-type]
    try:
        with memoryview(frame) as view:  # type: ignore[arg-type]
            return view.nbytes
    except TypeError:
        return 0
