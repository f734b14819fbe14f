# cython: language_level=3, embedsignature=True, freethreading_compatible=True
"""The per-read and per-send path of a connection, compiled: ``ConnectionCore``.

Strategy: what ``_core_py.py`` (the twin, and the reference for behaviour)
does in Python, done here with the connection's state in C fields: counters,
flags and offsets are C integers, the out queue is called through its C
methods (``OutQueue._append``, ``_take``), and the hot methods
(``buffer_updated``, ``send``, ``_flush``, ``_take_batch``, ``_take_one``)
run without a Python frame. Python code is still called where it must be:
the decoder's ``buffer_updated``, the handler (a callback function or the
task's wake-up), ``transport.write``, and the rare events, which
``protocol.FrameProtocol`` handles in Python for both backends.

Read the twin's module docstring for the design; the two must give the
same results for every sequence of calls (the connection tests run on
both).
"""

import asyncio
import os

cimport cython

from cpython.contextvars cimport PyContext_Enter, PyContext_Exit
from cpython.list cimport PyList_GET_SIZE
from cpython.object cimport PyObject
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from ._frame cimport _Decoder
from ._outq cimport OutQueue

from . import _reasons
from ._internals import current_task, fatal_error
from ._tunables import (
    BULK_READ,
    BATCH_BOUNDS,
    DEFAULT_MAX_WRITE_BUFFER,
    HANDLER_SECONDS_BOUNDS,
    LARGE_FRAME,
    PAUSE_FAIR,
    PAUSE_INBOX,
    PAUSE_RATE,
    PAUSE_WRITE,
    QUEUE_CHECK_BYTES,
    PLAIN_AFTER_READS,
    READ_BURST,
    READ_FAIR_FRAMES,
    READ_HIGH_BYTES,
    READ_HIGH_FRAMES,
    READ_LOW_BYTES,
    READ_LOW_FRAMES,
)
from ._wakeup import cancelled_future, resolved_future
from .errors import ConnectionBusyError, FrameError
from .lifecycle import CLOSED, CLOSING, OPEN

__all__ = ["ConnectionCore", "FrameRate", "ReadStats", "Wakeup"]

# The tunables, as C constants for this module (read once, at import).
cdef long long c_READ_HIGH_FRAMES = READ_HIGH_FRAMES
cdef long long c_READ_LOW_FRAMES = READ_LOW_FRAMES
cdef long long c_READ_HIGH_BYTES = READ_HIGH_BYTES
cdef long long c_READ_LOW_BYTES = READ_LOW_BYTES
cdef int c_READ_BURST = READ_BURST
cdef int c_PLAIN_AFTER_READS = PLAIN_AFTER_READS
cdef Py_ssize_t c_BULK_READ = BULK_READ
cdef Py_ssize_t c_READ_FAIR_FRAMES = READ_FAIR_FRAMES
cdef int c_PAUSE_FAIR = PAUSE_FAIR
cdef int c_PAUSE_INBOX = PAUSE_INBOX
cdef int c_PAUSE_RATE = PAUSE_RATE
cdef int c_PAUSE_WRITE = PAUSE_WRITE
cdef Py_ssize_t c_QUEUE_CHECK_BYTES = QUEUE_CHECK_BYTES
cdef int c_CLOSING = CLOSING
cdef int c_CLOSED = CLOSED

cdef tuple _EMPTY = ()  # the inbox when nothing is queued; never mutated
cdef object _current_task = current_task
cdef type _bytes = bytes
cdef type _bytearray = bytearray
cdef type _list = list

# The write of the transport type last seen without a __dict__ (uvloop's
# transports), set by _use_transport and called unbound by _flush_c: no bound
# method per connection to keep warm (a cache line per write with a thousand
# connections), and no method lookup per write. Instances with a __dict__
# could shadow write, so _flush_c calls theirs by name.
cdef type _write_type = None
cdef object _write_function = None


cdef enum:
    MAX_BUCKETS = 32
cdef int c_N_BATCH = len(BATCH_BOUNDS)
cdef int c_N_HANDLER = len(HANDLER_SECONDS_BOUNDS)
cdef long long c_BATCH_BOUNDS[MAX_BUCKETS]
cdef double c_HANDLER_BOUNDS[MAX_BUCKETS]
assert c_N_BATCH < MAX_BUCKETS and c_N_HANDLER < MAX_BUCKETS
for _i, _bound in enumerate(BATCH_BOUNDS):
    c_BATCH_BOUNDS[_i] = _bound
for _i, _bound in enumerate(HANDLER_SECONDS_BOUNDS):
    c_HANDLER_BOUNDS[_i] = _bound


cdef inline double _monotonic() noexcept:
    # CLOCK_MONOTONIC, as time.monotonic() reads it (a vDSO call, no system call).
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class ReadStats:
    """Histograms the connections of one server fill per read, when metrics are on.

    See the twin (``_core_py.ReadStats``): frames per read, and seconds per
    handler run; one bucket increment per observation, read at scrape time.
    """

    cdef long long _batch_counts[MAX_BUCKETS]
    cdef long long _batch_sum
    cdef long long _handler_counts[MAX_BUCKETS]
    cdef double _handler_sum

    def __cinit__(self):
        cdef int i
        for i in range(MAX_BUCKETS):
            self._batch_counts[i] = 0
            self._handler_counts[i] = 0
        self._batch_sum = 0
        self._handler_sum = 0.0

    cdef inline void _batch(self, long long frames) noexcept:
        cdef int i = 0
        while i < c_N_BATCH and frames > c_BATCH_BOUNDS[i]:
            i += 1
        self._batch_counts[i] += 1
        self._batch_sum += frames

    cdef inline void _handler(self, double seconds) noexcept:
        cdef int i = 0
        while i < c_N_HANDLER and seconds > c_HANDLER_BOUNDS[i]:
            i += 1
        self._handler_counts[i] += 1
        self._handler_sum += seconds

    def observe_batch(self, long long frames):
        """Count one read that delivered ``frames`` frames."""
        self._batch(frames)

    def observe_handler(self, double seconds):
        """Count one handler run of ``seconds``."""
        self._handler(seconds)

    def snapshot(self):
        """``(batch bucket counts, frames, handler bucket counts, seconds)``; counts per bucket,
        not cumulative, the last one for +Inf."""
        return (
            [self._batch_counts[i] for i in range(c_N_BATCH + 1)],
            self._batch_sum,
            [self._handler_counts[i] for i in range(c_N_HANDLER + 1)],
            self._handler_sum,
        )


cdef class FrameRate:
    """One connection's frames-per-second token bucket (``fastnet.Limits.frame_rate``).

    It holds up to ``burst`` tokens and refills at ``rate`` a second. A read
    takes a token per frame it delivered, and may leave the bucket in debt
    (its frames are delivered all the same); reading then pauses for as long
    as the debt takes to refill. ``take`` and ``wait`` return that time in
    seconds (0.0: no pause). ``handle`` is the pending resume timer, if any.
    """

    cdef double _rate
    cdef double _burst
    cdef double _tokens
    cdef double _last
    cdef public object handle

    def __init__(self, double rate, double burst):
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = _monotonic()
        self.handle = None

    cdef inline double _refill(self) noexcept:
        cdef double now = _monotonic()
        cdef double tokens = self._tokens + (now - self._last) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        self._last = now
        return tokens

    cdef inline double _take(self, Py_ssize_t frames) noexcept:
        cdef double tokens = self._refill() - <double>frames
        self._tokens = tokens
        return 0.0 if tokens >= 0.0 else -tokens / self._rate

    def take(self, Py_ssize_t frames):
        """Take ``frames`` tokens; the seconds to pause reading for (0.0: none)."""
        return self._take(frames)

    def wait(self):
        """Refill; the seconds left until the debt is paid (0.0: reading may resume)."""
        cdef double tokens = self._refill()
        self._tokens = tokens
        return 0.0 if tokens >= 0.0 else -tokens / self._rate

    @property
    def tokens(self):
        """The tokens in the bucket now (negative: in debt)."""
        cdef double tokens = self._tokens + (_monotonic() - self._last) * self._rate
        return self._burst if tokens > self._burst else tokens

    def cancel(self):
        """Cancel the pending resume timer (the connection is closing)."""
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()


@cython.final
@cython.freelist(8)
cdef class _YieldOnce:
    """The iterator of one ``await`` on a ``Wakeup``: yields it, then stops."""

    cdef object _value

    def __iter__(self):
        return self

    def __next__(self):
        value = self._value
        if value is None:
            raise StopIteration
        self._value = None
        return value


@cython.final
cdef class Wakeup:
    """``_wakeup._Wakeup`` compiled: the handler task's reusable wake-up, for this core.

    The same duck-typed Future protocol and the same behaviour (read the
    twin's docstring); here the Task's ``add_done_callback`` and ``result``
    calls run no Python frame, and the core reads the fields in C. asyncio's
    Task reads ``_asyncio_future_blocking`` and ``_loop`` by name, and sets
    the flag back to False.
    """

    cdef public object _loop
    cdef public bint _asyncio_future_blocking
    cdef public object _callback
    cdef public object _context
    cdef readonly object _resolved  # see the twin's docstring

    def __init__(self, loop):
        self._loop = loop
        self._asyncio_future_blocking = False
        self._callback = None
        self._context = None
        self._resolved = resolved_future(loop)

    def __await__(self):
        # Awaiting the wake-up yields it to the Task once: the twin's
        # _AwaitWakeup, without the Python-level __await__ lookup per wait.
        cdef _YieldOnce once = _YieldOnce.__new__(_YieldOnce)
        once._value = self
        return once

    def add_done_callback(self, fn, *, context=None):
        self._callback = fn
        self._context = context

    def remove_done_callback(self, fn):
        if self._callback is fn:
            self._callback = None
            return 1
        return 0

    def wake_soon(self):
        """Resume the waiting task, if any, from the loop's next iteration."""
        callback = self._callback
        if callback is not None:
            self._callback = None
            self._loop.call_soon(callback, self._resolved, context=self._context)

    def cancel(self, msg=None):
        callback = self._callback
        if callback is None:
            return False
        self._callback = None
        self._loop.call_soon(callback, cancelled_future(self._loop, msg), context=self._context)
        return True

    def result(self):
        return None

    def done(self):
        return self._callback is None

    def cancelled(self):
        return False

    def exception(self):
        return None


cdef Py_ssize_t _payload_size(object frame) except -1:
    # Bytes of payload in frame; 0 for what is not a buffer (the out queue then refuses it).
    cdef type kind = type(frame)
    if kind is _bytes or kind is _bytearray:
        return len(frame)
    try:
        with memoryview(frame) as view:
            return view.nbytes
    except TypeError:
        return 0


cdef class ConnectionCore


cdef class _PlainReads:
    """The protocol a uvloop transport reads through between large frames.

    uvloop reads into its own buffer and calls ``data_received`` with the
    bytes (one call per read) when the protocol has no ``get_buffer``
    (``_internals`` 5e); everything else it calls is the connection's.
    See the twin.
    """

    cdef ConnectionCore core

    def data_received(self, data):
        self.core._chunk(data)

    def eof_received(self):
        return self.core.eof_received()

    def connection_lost(self, exc):
        self.core.connection_lost(exc)

    def pause_writing(self):
        self.core.pause_writing()

    def resume_writing(self):
        self.core.resume_writing()


cdef class ConnectionCore:
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

    # The fields a read touches come first, so that they share as few cache
    # lines as they can: with a thousand connections each line is a miss.
    # First what a callback handler's read touches (128 bytes with the
    # object's header and vtable: two lines, or three), then what a task handler's
    # and a read through get_buffer add; the rest are in name order.
    cdef _Decoder _c_decoder  # the decoder when it is this extension's (called in C), else None
    cdef public object _on_frames
    cdef public OutQueue _out
    cdef public object _transport  # written through _write_function when its type is _write_type, else by name
    cdef public FrameRate _frame_rate
    cdef public ReadStats _read_stats
    cdef public long long bytes_in
    cdef public long long frames_in
    cdef public long long frames_out
    cdef public long long bytes_out
    cdef public long long writes
    cdef public int _lifecycle
    cdef public bint _delivering
    cdef public bint _close_pending  # close() waits for the callback handler or spawned tasks
    cdef public bint _read_pauses_on_write
    cdef public object _decoded
    cdef public object _write_buffers
    cdef public object _inbox
    cdef readonly Wakeup _wakeup  # read by protocol.py; never None once made
    cdef public long long _consumed_mark
    cdef public Py_ssize_t _pos
    cdef public int _read_fd
    cdef public int _read_paused
    cdef int _buffered_reads  # reads in a row through get_buffer with no large frame begun
    cdef bint _plain_reads  # uvloop: read through a _PlainReads between large frames
    cdef public bint _reading_plain  # ... and the transport does now
    cdef public bint _flush_scheduled
    cdef object __weakref__
    cdef public object _await_wakeup
    cdef public list _closed_waiters
    cdef public object _decoder
    cdef public bint _decoder_failed
    cdef public object _drain_waiter
    cdef public object _end
    cdef public bint _end_quiet
    cdef public object _framing
    cdef public bint _half_close
    cdef public object _handler_error
    cdef public Py_ssize_t _high_water
    cdef public object _loop
    cdef public Py_ssize_t _max_write_buffer
    cdef public Py_ssize_t _overhead
    cdef public object _send_block
    cdef public object _server
    cdef public object _strategy
    cdef public set _tasks
    cdef public object _user_state
    cdef public double _woke_at
    cdef public bint _write_paused
    cdef public object get_buffer
    cdef public object local
    cdef public object peer

    def __init__(self, framing, server=None, max_write_buffer=DEFAULT_MAX_WRITE_BUFFER):
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._framing = framing
        self._server = server
        self._max_write_buffer = max_write_buffer
        self._transport = None
        self._high_water = 0
        self.peer = None
        self.local = None

        decoder = framing.decoder()
        self._decoder = decoder
        self._decoder_failed = False
        self.get_buffer = decoder.get_buffer
        self._decoded = decoder.buffer_updated
        self._c_decoder = decoder if isinstance(decoder, _Decoder) else None
        self._read_fd = -1
        self._plain_reads = False
        self._reading_plain = False
        self._buffered_reads = 0
        self._strategy = None
        self._write_buffers = None
        self._out = framing.out_queue(0)
        self._overhead = framing.overhead

        self._inbox = _EMPTY
        self._pos = 0
        self._wakeup = Wakeup(loop)
        self._await_wakeup = self._wakeup  # awaitable, in C
        self._delivering = False
        self._read_paused = 0
        self._consumed_mark = 0
        self._end = None
        self._end_quiet = True
        self._on_frames = None
        self._handler_error = None

        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiter = None
        self._send_block = None

        self._lifecycle = OPEN
        self._read_pauses_on_write = server is not None
        self._half_close = server is not None
        self._closed_waiters = []
        self._tasks = set()
        self._close_pending = False
        self._user_state = None

        self.bytes_in = 0
        self.frames_in = 0
        self.bytes_out = 0
        self.frames_out = 0
        self.writes = 0
        self._read_stats = None
        self._woke_at = 0.0
        self._frame_rate = None

    def _new_read_stats(self):
        """A new ``ReadStats`` of this backend, for a server to share among its connections."""
        return ReadStats()

    def _new_frame_rate(self, double rate, double burst):
        """A new ``FrameRate`` of this backend, for this connection."""
        return FrameRate(rate, burst)

    # ------------------------------------------------------------ receiving

    def buffer_updated(self, Py_ssize_t nbytes):
        """Decode ``nbytes`` just received and deliver the frames; read on through large frames."""
        cdef Py_ssize_t missing
        cdef int i
        if self._read_fd < 0:
            self._received(nbytes)
            if self._plain_reads:
                self._count_buffered_read(nbytes)
            return
        # CPython's selector transport: read on through runs of large frames
        # (see the twin).
        decoder = self._decoder
        missing = decoder.missing
        self._received(nbytes)
        transport = self._transport
        fd = self._read_fd
        for i in range(c_READ_BURST):
            if missing:
                if nbytes < missing:
                    return
            elif not decoder.missing:
                return
            if self._read_paused or not transport.is_reading() or self._read_fd < 0:
                return
            missing = decoder.missing
            buf = decoder.get_buffer(-1)
            try:
                nbytes = os.readv(fd, (buf,))  # looked up per call, as the twin does
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                fatal_error(transport, exc, "Fatal read error on socket transport")
                return
            if not nbytes:
                return
            self._received(nbytes)

    cdef int _received(self, Py_ssize_t nbytes) except -1:
        self.bytes_in += nbytes
        try:
            if self._c_decoder is not None:
                frames = self._c_decoder._updated(nbytes)
            else:
                frames = self._decoded(nbytes)
        except FrameError as exc:
            self._framing_failed(exc)
            return 0
        return self._arrived(frames, nbytes)

    cdef int _chunk(self, bytes data) except -1:
        # A read that uvloop made into its own buffer (see the twin).
        cdef Py_ssize_t nbytes = len(data)
        self.bytes_in += nbytes
        try:
            frames = self._c_decoder._fed(data)
        except FrameError as exc:
            self._framing_failed(exc)
            return 0
        self._arrived(frames, nbytes)
        if self._reading_plain and (self._c_decoder.direct is not None or nbytes >= c_BULK_READ):
            self._read_buffered()
        return 0

    cdef int _count_buffered_read(self, Py_ssize_t nbytes) except -1:
        # After a read through get_buffer on uvloop: back to plain reads once
        # PLAIN_AFTER_READS small reads in a row began no large frame.
        if self._c_decoder.direct is not None or nbytes >= c_BULK_READ:
            self._buffered_reads = 0
            return 0
        self._buffered_reads += 1
        if self._buffered_reads >= c_PLAIN_AFTER_READS and not self._reading_plain:
            self._read_plain()
        return 0

    cdef int _read_buffered(self) except -1:
        # The rest of a large frame goes straight into its object (see the twin).
        self._reading_plain = False
        self._buffered_reads = 0
        self._transport.set_protocol(self)
        return 0

    cdef int _read_plain(self) except -1:
        # A new _PlainReads each time: the connection keeps none, so it makes
        # no reference cycle (see the twin).
        cdef _PlainReads plain = _PlainReads.__new__(_PlainReads)
        plain.core = self
        self._reading_plain = True
        self._transport.set_protocol(plain)
        return 0

    cdef int _arrived(self, list frames, Py_ssize_t nbytes) except -1:
        cdef Py_ssize_t unconsumed
        if not frames:
            return 0
        cdef Py_ssize_t count = len(frames)
        self.frames_in += count
        if count > c_READ_FAIR_FRAMES:
            self._yield_reading()
        if self._frame_rate is not None:
            self._charge_frames(count)
        cdef ReadStats stats = self._read_stats
        cdef double began
        if stats is not None:
            stats._batch(count)
        on_frames = self._on_frames
        if on_frames is not None:
            if stats is not None:
                began = _monotonic()
                self._deliver(on_frames, frames)
                stats._handler(_monotonic() - began)
            else:
                self._deliver(on_frames, frames)
            return 0
        inbox = self._inbox
        if self._pos == len(inbox):
            self._inbox = frames
            self._pos = 0
            self._consumed_mark = self.bytes_in - nbytes
        else:
            inbox.extend(frames)
        self._resume_receiver()
        unconsumed = len(self._inbox) - self._pos
        if unconsumed and (
            unconsumed > c_READ_HIGH_FRAMES
            or self.bytes_in - self._consumed_mark > c_READ_HIGH_BYTES
        ):
            self._pause_reading(c_PAUSE_INBOX)
        return 0

    cdef int _deliver(self, object on_frames, object frames) except -1:
        # Call a callback handler with a batch; queue and write its replies.
        self._delivering = True
        try:
            replies = on_frames(self, frames)
            if replies is not None:
                if not self._read_pauses_on_write:
                    # Reading goes on whatever the write buffer holds, so
                    # nothing else bounds the replies: they obey
                    # max_write_buffer as send_many's frames do (see the twin).
                    if type(replies) is not _list:
                        replies = list(replies)
                    self._admit(self._wire_size(<list>replies), True)
                if type(replies) is _list and PyList_GET_SIZE(replies) == 1:
                    self._out._append((<list>replies)[0])
                else:
                    self._out.extend(replies)
        except Exception as exc:
            self._delivering = False
            self._callback_failed(exc)
            return 0
        self._delivering = False
        if self._out.queued_frames:
            self._flush_c()
        if self._close_pending:  # the handler called close()
            self._close_after_callback()
        return 0

    cdef int _resume_receiver(self) except -1:
        cdef Wakeup wakeup = self._wakeup
        callback = wakeup._callback
        if callback is None:
            return 0
        wakeup._callback = None
        if self._read_stats is not None:
            self._woke_at = _monotonic()
        if _current_task(self._loop) is None:
            context = wakeup._context
            self._delivering = True
            try:
                # The Task reads the result of the future it is called with:
                # a finished asyncio.Future's, in C (see the twin).
                if context is None:
                    callback(wakeup._resolved)
                else:
                    # context.run(callback, ...) without the method call
                    PyContext_Enter(context)
                    try:
                        callback(wakeup._resolved)
                    finally:
                        PyContext_Exit(context)
            finally:
                self._delivering = False
            if self._out.queued_frames:
                self._flush_c()
        else:
            self._loop.call_soon(callback, wakeup._resolved, context=wakeup._context)
        return 0

    def _set_reader(self, get_buffer, buffer_updated):
        """Receive through ``get_buffer``/``buffer_updated`` from now on, not the decoder.

        The decoder stays (its counters are still read); reading on through
        large frames stops. protocol.py's lingering close drops what still
        arrives this way, a failed decoder or not.
        """
        self.get_buffer = get_buffer
        self._decoded = buffer_updated
        self._c_decoder = None
        self._read_fd = -1
        self._plain_reads = False
        self._reading_plain = False

    def _queue_frames(self, list frames):
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
            inbox.extend(frames)
        self._wakeup.wake_soon()

    # The receive coroutines of fastnet.Connection, compiled: awaiting one
    # runs no Python frame, and the wake-up is awaited in C (see the twin).

    async def recv_batch(self):
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
            await self._wakeup

    async def recv(self):
        """Return the next frame, waiting for one if none is queued.

        Raises:
            as ``recv_batch``.
        """
        while True:
            frame = self._take_one(False)
            if frame is not None:
                return frame
            await self._wakeup

    async def __anext__(self):
        """``async for``: the next frame; the loop ends quietly when the input ends.

        Raises:
            as ``recv_batch``, except after the input ended without this
            side's ``close()``, when the loop ends.
        """
        while True:
            frame = self._take_one(True)
            if frame is not None:
                return frame
            await self._wakeup

    cdef object _take_batch(self):
        # recv_batch without the wait: every queued frame, or None after
        # arming the wake-up (the twin documents it).
        inbox = self._inbox
        cdef Py_ssize_t pos = self._pos
        if pos < len(inbox):
            if (self._read_paused & c_PAUSE_WRITE or self._out.queued_bytes > c_QUEUE_CHECK_BYTES) and self._wait_writing():
                return None
            self._inbox = _EMPTY
            self._pos = 0
            if self._read_paused & c_PAUSE_INBOX:
                self._caught_up()
            if self._read_stats is not None and not self._woke_at:
                self._woke_at = _monotonic()  # frames were queued: the run starts now
            return inbox if pos == 0 else inbox[pos:]
        self._prepare_wait(False)
        return None

    cdef object _take_one(self, bint quiet_end):
        # recv (async for with quiet_end) without the wait: a frame, or None.
        inbox = self._inbox
        cdef Py_ssize_t pos = self._pos
        if pos < len(inbox):
            if (self._read_paused & c_PAUSE_WRITE or self._out.queued_bytes > c_QUEUE_CHECK_BYTES) and self._wait_writing():
                return None
            self._pos = pos + 1
            frame = inbox[pos]
            if self._read_paused & c_PAUSE_INBOX:
                self._consumed_one(frame)
            if self._read_stats is not None and not self._woke_at:
                self._woke_at = _monotonic()  # frames were queued: the run starts now
            return frame
        self._prepare_wait(quiet_end)
        return None

    cdef int _prepare_wait(self, bint quiet_end) except -1:
        self._inbox = _EMPTY
        self._pos = 0
        if self._out.queued_frames:
            self._flush_c()
        cdef Wakeup wakeup = self._wakeup
        end = self._end
        if end is not None:
            if quiet_end and self._end_quiet:
                raise StopAsyncIteration
            raise end()
        if wakeup._callback is not None:
            raise ConnectionBusyError("another task is already receiving on this connection")
        if self._read_paused & c_PAUSE_INBOX:
            self._caught_up()
        cdef double woke_at = self._woke_at
        if woke_at:
            # A task handler's run: from its wake-up to this wait.
            self._woke_at = 0.0
            if self._read_stats is not None:
                self._read_stats._handler(_monotonic() - woke_at)
        wakeup._asyncio_future_blocking = True
        return 0

    cdef bint _wait_writing(self) except -1:
        # Frames are queued while the handler's replies are past the write
        # high-water mark: on a server's connection, write them, and wait
        # for the peer to read before the next frame while the transport
        # stays over its mark (see the twin). True after arming the wake-up.
        if not self._read_pauses_on_write or self._send_block is not None:
            return False
        if self._write_paused or self._out.queued_bytes > self._high_water:
            self._flush_c()
        if not self._write_paused or self._send_block is not None:
            return False
        cdef Wakeup wakeup = self._wakeup
        if wakeup._callback is not None:
            raise ConnectionBusyError("another task is already receiving on this connection")
        wakeup._asyncio_future_blocking = True
        return True

    def _caught_up(self):
        # The handler took every queued frame.
        self._consumed_mark = self.bytes_in
        self._unpause_reading(c_PAUSE_INBOX)

    def _consumed_one(self, frame):
        # recv() took one frame while reading is paused for the inbox.
        self._consumed_mark += len(frame)
        if (
            len(self._inbox) - self._pos <= c_READ_LOW_FRAMES
            and self.bytes_in - self._consumed_mark <= c_READ_LOW_BYTES
        ):
            self._unpause_reading(c_PAUSE_INBOX)

    cdef int _yield_reading(self) except -1:
        # A read of very many frames: let the loop turn before the next one.
        if not self._read_paused & c_PAUSE_FAIR:
            self._pause_reading(c_PAUSE_FAIR)
            self._loop.call_soon(self._unpause_reading, c_PAUSE_FAIR)
        return 0

    cdef int _charge_frames(self, Py_ssize_t count) except -1:
        # A frames-per-second limit: this read's frames are delivered, and
        # if they put the bucket in debt, reading pauses until it is paid.
        cdef FrameRate limiter = self._frame_rate
        cdef double delay = limiter._take(count)
        if delay > 0.0 and not self._read_paused & c_PAUSE_RATE:
            self._pause_reading(c_PAUSE_RATE)
            limiter.handle = self._loop.call_later(delay, self._rate_resume)
        return 0

    def _rate_resume(self):
        # The frame-rate timer: resume if the debt is paid, else wait again.
        cdef FrameRate limiter = self._frame_rate
        if limiter is None:
            return
        limiter.handle = None
        cdef double delay = limiter.wait()
        if delay > 0.0:
            limiter.handle = self._loop.call_later(delay, self._rate_resume)
        else:
            self._unpause_reading(c_PAUSE_RATE)

    def _pause_reading(self, int reason):
        cdef int paused = self._read_paused
        self._read_paused = paused | reason
        if not paused and self._lifecycle != c_CLOSED and self._transport is not None:
            try:
                self._transport.pause_reading()
            except RuntimeError:  # a closing transport may refuse
                pass

    def _unpause_reading(self, int reason):
        cdef int paused = self._read_paused
        if not paused & reason:
            return
        paused &= ~reason
        self._read_paused = paused
        if self._lifecycle == c_CLOSED:
            self._resume_leftover()  # protocol.py: a broken connection's input still read
        elif not paused and not self._transport.is_closing():
            self._transport.resume_reading()

    # -------------------------------------------------------------- sending

    def send(self, frame):
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
        cdef OutQueue out = self._out
        cdef bint was_empty = out.queued_frames == 0
        out._append(frame)
        self._queued(was_empty)

    def _send_replies(self, list frames):
        """Queue frames past ``max_write_buffer``: replies whose number is bounded elsewhere.

        A Router's replies from handlers that suspended (at most
        ``max_in_flight`` per connection, and a server connection stops
        reading under write pressure): as a callback handler's replies are
        queued, without ``WriteBufferFull``.
        """
        block = self._send_block
        if block is not None:
            raise block()
        cdef OutQueue out = self._out
        cdef bint was_empty = out.queued_frames == 0
        out.extend(frames)
        self._queued(was_empty)

    def send_many(self, frames):
        """Queue several frames, in order; they are written with the rest of their batch.

        All or nothing: if one frame cannot be encoded, or the frames would
        take the write buffer past its limit, none is queued.

        Raises:
            as ``send``.
        """
        if type(frames) is not _list:
            frames = list(frames)
        self._admit(self._wire_size(<list>frames), True)
        cdef OutQueue out = self._out
        cdef bint was_empty = out.queued_frames == 0
        out.extend(frames)
        self._queued(was_empty)

    cdef Py_ssize_t _wire_size(self, list frames) except -1:
        # What ``frames`` add to the write buffer, as _admit counts it.
        cdef Py_ssize_t size = 0
        for frame in frames:
            size += _payload_size(frame) + self._overhead
        return size

    def try_send(self, frame):
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
        cdef OutQueue out = self._out
        cdef bint was_empty = out.queued_frames == 0
        out._append(frame)
        self._queued(was_empty)
        return True

    @property
    def write_buffer_size(self):
        """Bytes sent and not yet written to the socket: queued, and in the transport's buffer."""
        return self._unsent()

    @property
    def writable(self):
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
        return not self._out.queued_frames or self._unsent() <= self._high_water

    cdef Py_ssize_t _unsent(self) except -1:
        transport = self._transport
        cdef Py_ssize_t buffered = 0 if transport is None else transport.get_write_buffer_size()
        return self._out.queued_bytes + buffered

    cdef bint _admit(self, Py_ssize_t size, bint strict) except -1:
        # May ``size`` more bytes be queued? Raises if sending has ended.
        # Far from the limit, one comparison; near it, the exact check:
        # raise WriteBufferFull (strict) or say False (see the twin).
        block = self._send_block
        if block is not None:
            raise block()
        if self._write_paused or self._out.queued_bytes + size > self._max_write_buffer - self._high_water:
            if not self._has_room(size):
                if strict:
                    raise _reasons.write_buffer_full(size, self._max_write_buffer)
                return False
        return True

    cdef inline int _queued(self, bint was_empty) except -1:
        # Frames were queued: the first of a batch sent outside a read
        # schedules the batch's one write.
        if was_empty and self._out.queued_frames and not self._delivering and not self._flush_scheduled:
            self._schedule_flush()
        return 0

    cdef bint _has_room(self, Py_ssize_t size) except -1:
        # The limit bounds what piles up, exactly; a frame larger than the
        # limit itself goes while the unsent bytes are at most the high-water
        # mark (and the limit; see the twin).
        cdef Py_ssize_t unsent = self._unsent()
        cdef Py_ssize_t limit = self._max_write_buffer
        if unsent + size <= limit:
            return True
        return size > limit and unsent <= min(self._high_water, limit)

    cdef int _schedule_flush(self) except -1:
        self._flush_scheduled = True
        self._loop.call_soon(self._scheduled_flush)
        return 0

    def _scheduled_flush(self):
        self._flush_scheduled = False
        if self._out.queued_frames:
            self._flush_c()

    def _flush(self):
        """Write every queued frame: one write (vectored where large payloads are unjoined)."""
        self._flush_c()

    cdef int _flush_c(self) except -1:
        cdef OutQueue out = self._out
        cdef Py_ssize_t n, size
        if self._lifecycle >= c_CLOSING:
            out.clear()
            return 0
        n = out.queued_frames
        size = out.queued_bytes
        data = out._take()  # None, one bytes, or a list of buffers (large payloads unjoined)
        if data is None:
            return 0
        write_buffers = self._write_buffers
        if type(data) is not _bytes and write_buffers is not None:
            write_buffers(data)  # the strategy's vectored write
        else:
            if type(data) is not _bytes:
                data = b"".join(data)
            transport = self._transport
            if type(transport) is _write_type:
                _write_function(transport, data)
            else:
                transport.write(data)
        self.frames_out += n
        self.bytes_out += size
        self.writes += 1
        return 0

    def pause_writing(self):
        self._write_paused = True
        if self._read_pauses_on_write:
            self._pause_reading(c_PAUSE_WRITE)

    def resume_writing(self):
        self._write_paused = False
        self._unpause_reading(c_PAUSE_WRITE)
        self._wake_drain(None)
        if self._pos < len(self._inbox):  # the handler waits in _wait_writing
            self._resume_receiver()

    def _use_transport(self, transport, strategy):
        """Run over ``transport`` with ``strategy`` (transports.TransportStrategy)."""
        global _write_type, _write_function
        self._transport = transport
        kind = type(transport)
        if kind is not _write_type and kind.__dictoffset__ == 0:
            write = getattr(kind, "write", None)
            if callable(write) and not hasattr(type(write), "__set__"):  # not a slot
                _write_type = kind
                _write_function = write
        self._strategy = strategy
        self._read_fd = strategy.read_fd
        self._write_buffers = strategy.write_buffers
        if self._c_decoder is not None:
            self._c_decoder.raw_windows = strategy.raw_windows
        self._reading_plain = False
        self._plain_reads = strategy.plain_reads and self._c_decoder is not None
        if self._plain_reads:
            self._read_plain()
        threshold = LARGE_FRAME if strategy.write_buffers is not None else 0
        if self._out.queued_frames:
            self._flush_c()
        self._out = self._framing.out_queue(threshold)
        try:
            self._high_water = int(transport.get_write_buffer_limits()[1])
        except (AttributeError, NotImplementedError):
            self._high_water = 0
