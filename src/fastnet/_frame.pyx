# cython: language_level=3, embedsignature=True, freethreading_compatible=True
"""Cython hot path of fastnet: streaming frame decoders and encoders.

Strategy:

- A decoder owns its receive memory. Buffered stream bytes live in one
  contiguous block (the arena) between a read offset and a write offset.
  ``get_buffer`` hands the kernel a window of the arena's free space, so the
  kernel writes straight into it; ``buffer_updated`` cuts every complete frame
  out of the arena, one ``bytes`` object per frame, and advances the read
  offset. Nothing is sliced or joined in between.
- When the arena runs out of room it is compacted (the unfinished frame moves
  to the front) before it grows, and it grows by doubling, never past what
  the largest allowed frame needs. Once a read leaves it empty the arena is
  released, and a small unfinished tail moves into a small block, so an idle
  connection holds no receive memory (or a few hundred bytes mid-frame), and
  a large frame never leaves a large buffer behind.
- A length-prefixed frame whose delivered size is ``DIRECT_THRESHOLD`` or more
  is not assembled in the arena. As soon as its header is parsed, the
  decoder allocates the frame's final ``bytes`` object, copies in the part
  already received, and ``get_buffer`` hands out the rest of that object: the
  kernel writes each remaining payload byte exactly once, where it stays.
  The object is allocated ``header_peek`` bytes longer than the frame (for
  a header of at most ``DIRECT_ROOM`` bytes; every common layout's), and
  the window covers those too: one read ends the frame and fetches the next
  frame's header, so back-to-back large frames cost one read each, every
  payload byte received in place. Once the frame is complete, the bytes
  past it go to the arena and the object's size is set to the frame's (the
  few spare bytes stay allocated until the frame is freed). Should a read
  end the frame before the next header is complete, the next window is only
  what completes that header: large frames tend to follow large frames, and
  a full window would receive most of the next payload into the arena, to be
  copied out again.
- ``feed(data)`` decodes in place from the caller's buffer when nothing is
  buffered and copies only the unfinished tail.
- Decoders never return ``None``: calls return the list of frames completed,
  possibly empty. Work per call is linear in the bytes received; a line
  decoder remembers how far it has searched for a delimiter.

Windows are exported through small ``_Block`` objects: a memoryview keeps its
block alive, so a view the caller still holds never points at freed memory,
however the decoder has moved on.

The pure-Python twin ``_frame_py.py`` is the reference for behaviour: the same
frames, ``pending`` counts and errors for every input and every chunking. The
sizes that shape behaviour (window sizes, the direct-receive threshold) come
from ``_tunables.py``, which both backends read.

Built with ``FASTNET_DEBUG=1``, every public decoder call ends by checking
the decoder's bookkeeping (``_debug_check``: offsets inside the arena, the
open window inside its block, no memory held by a failed decoder) and raises
``AssertionError`` on a violation; sanitizer and fuzzing builds use it.
Release builds compile the checks out.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_REFCNT
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memmove

from .errors import (
    FrameError,
    FrameTooLarge,
    IncompleteFrame,
    delimiter_in_payload,
    negative_body,
    negative_length_field,
    strip_past_end,
)

cdef extern from "Python.h":
    void Py_SET_SIZE(object o, Py_ssize_t size)
    object PyMemoryView_FromObject(object obj)
    object PySequence_Fast(object o, const char* m)
    Py_ssize_t PySequence_Fast_GET_SIZE(object o)
    void* PySequence_Fast_GET_ITEM(object o, Py_ssize_t i)


# Tunables both backends share live in _tunables.py, read once at import time
# (see that module for why each has its value); C globals keep the hot path
# free of Python lookups.
from . import _tunables

cdef Py_ssize_t READ_SIZE = _tunables.READ_SIZE
cdef Py_ssize_t MAX_READ = _tunables.MAX_READ
cdef Py_ssize_t DIRECT_THRESHOLD = _tunables.DIRECT_THRESHOLD
cdef Py_ssize_t DIRECT_ROOM = _tunables.DIRECT_ROOM

# Tunables of the extension's own memory management (the twin has no arena).
cdef enum:
    # Smallest arena allocated to hold an unfinished frame fed by feed():
    # a whole small frame fits without regrowing.
    MIN_ARENA = 256
    # After a read, an arena whose unfinished tail fills at most 1/SHRINK_RATIO
    # of it moves the tail into a block of twice the tail's size. A peer that
    # stops mid-header then pins a few hundred bytes, not a 64 KiB read
    # window; the copy is of a few bytes and happens once per read, not per frame.
    SHRINK_RATIO = 8

# Length field values at or above this are handled with Python ints: with
# |adjustment| and max_frame bounded by 2**48 (framing.MAX_SIZE_PARAMETER),
# every value below it gives a body that fits int64_t.
cdef uint64_t LARGE_LENGTH = (<uint64_t>1) << 62

# FASTNET_DEBUG=1 at build time (setup.py passes it as a C macro) compiles in
# _debug_check, run at the end of every public decoder call. In a release
# build the macro is 0: the C compiler drops the calls and the function.
cdef extern from *:
    """
    #ifndef FASTNET_DEBUG
    #define FASTNET_DEBUG 0
    #endif
    """
    const bint FASTNET_DEBUG

# Whether this build checks its invariants (tests and the sanitizer build read it).
_DEBUG = bool(FASTNET_DEBUG)

# One released read block (an empty READ_SIZE arena) kept for the next
# decoder that opens a full read window. A server's connections read one at a
# time, and most reads leave their arena empty: they then pass one hot block
# from one to the next instead of a malloc and a free of 64 KiB, and a new
# _Block, on every read. The block is reused only if nothing else refers to
# it by then: a memoryview of an old window still alive (the transport's
# has gone once its read returned) keeps the block to itself, and the next
# decoder gets a new one, so a stale view never aliases another read.
# Builds without the GIL keep no spare: decoders on two threads could take
# the same block.
cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #define FASTNET_SHARE_READ_BLOCK 0
    #else
    #define FASTNET_SHARE_READ_BLOCK 1
    #endif
    """
    const bint FASTNET_SHARE_READ_BLOCK

cdef _Block _spare_block = None


cdef inline int _drop_block(_Block block) except -1:
    # An arena the decoder lets go of: kept as the spare when it is a read block.
    global _spare_block
    if FASTNET_SHARE_READ_BLOCK and _spare_block is None and block.size == READ_SIZE:
        _spare_block = block
    return 0


cdef inline _Block _read_block():
    # A READ_SIZE block for a new arena: the spare, or a new one.
    global _spare_block
    cdef _Block block = _spare_block
    if block is None:
        return _new_block(READ_SIZE)
    _spare_block = None
    if Py_REFCNT(block) != 1:  # a view of an old window is still alive
        return _new_block(READ_SIZE)
    return block


REENTRANT = "decoder called re-entrantly, from a callback inside one of its own calls"


@cython.final
@cython.no_gc  # refers only to a bytes object or None: it cannot be part of a cycle
@cython.auto_pickle(False)  # Cython's would copy ``data`` as a C string and free another's memory
cdef class _Block:
    """Writable window of decoder memory: exported to a memoryview, or handed to a transport.

    Its buffer is ``data[start:start + length]`` as they are when it is
    exported; ``len()`` is that window's length.
    """

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data + self.start, self.length, 0, flags)

    def __len__(self):
        return self.length

    def __dealloc__(self):
        if self.owner is None and self.data != NULL:
            PyMem_Free(self.data)
            self.data = NULL


cdef _Block _new_block(Py_ssize_t size):
    cdef _Block block = _Block.__new__(_Block)
    block.data = <char*>PyMem_Malloc(size)
    if block.data == NULL:
        raise MemoryError()
    block.size = size
    block.owner = None
    return block


cdef inline uint64_t _read_length(const unsigned char* p, int size, bint big) noexcept nogil:
    cdef uint64_t value = 0
    cdef int i
    if big:
        for i in range(size):
            value = (value << 8) | p[i]
    else:
        for i in range(size - 1, -1, -1):
            value = (value << 8) | p[i]
    return value


cdef inline void _write_length(unsigned char* p, uint64_t value, int size, bint big) noexcept nogil:
    cdef int i
    if big:
        for i in range(size - 1, -1, -1):
            p[i] = value & 0xFF
            value >>= 8
    else:
        for i in range(size):
            p[i] = value & 0xFF
            value >>= 8


cdef inline Py_ssize_t _find(const char* data, Py_ssize_t start, Py_ssize_t n,
                             const char* needle, Py_ssize_t nlen) noexcept nogil:
    """Index of needle in data[start:n], or -1."""
    cdef const char* p
    cdef const char* last
    if n - start < nlen:  # also keeps the pointer arithmetic below in bounds
        return -1
    if nlen == 1:
        p = <const char*>memchr(data + start, needle[0], n - start)
        return -1 if p == NULL else p - data
    last = data + n - nlen  # last position where needle can start
    p = data + start
    while p <= last:
        p = <const char*>memchr(p, needle[0], last - p + 1)
        if p == NULL:
            return -1
        if memcmp(p + 1, needle + 1, nlen - 1) == 0:
            return p - data
        p += 1
    return -1


cdef inline void _cut(bytes frame) noexcept:
    # A bytes object ends with a NUL past its last byte (C code may rely on
    # it). Writing it into a frame ended by _end_direct is the last step, once
    # the bytes a read left there have been taken.
    PyBytes_AS_STRING(frame)[PyBytes_GET_SIZE(frame)] = 0


cdef int _debug_check(_Decoder d) except -1:
    """The bookkeeping every public call leaves behind (FASTNET_DEBUG builds only)."""
    cdef LineDecoder lines
    if d.arena is None:
        if d.rpos != 0 or d.wpos != 0:
            raise AssertionError(f"no arena, yet rpos={d.rpos} wpos={d.wpos}")
    elif not 0 <= d.rpos <= d.wpos <= d.arena.size:
        raise AssertionError(f"rpos={d.rpos} wpos={d.wpos} arena of {d.arena.size} bytes")
    elif d.arena.owner is not None or d.arena.data == NULL:
        raise AssertionError("the arena is not a PyMem block")
    if d.direct is not None:
        if (d.direct_block is None or d.direct_block.owner is not d.direct
                or d.direct_block.data != PyBytes_AS_STRING(d.direct)
                or d.direct_block.size != PyBytes_GET_SIZE(d.direct)
                or d.direct_block.size != d.direct_size + d.direct_room):
            raise AssertionError("the direct block does not export the direct frame")
        if not 0 <= d.direct_filled < d.direct_size:
            raise AssertionError(f"direct frame filled {d.direct_filled} of {d.direct_size}")
        if d.wpos != d.rpos:
            raise AssertionError("bytes buffered in the arena during a direct receive")
    elif d.direct_block is not None:
        raise AssertionError("a direct block without a direct frame")
    if d.window >= 0:
        if d.direct is not None:
            if d.window != d.direct_block.size - d.direct_filled:
                raise AssertionError(f"window {d.window} is not the missing payload and a header")
        elif d.arena is None or d.wpos + d.window > d.arena.size:
            raise AssertionError(f"window {d.window} past the arena at wpos={d.wpos}")
    elif d.window != -1:
        raise AssertionError(f"window {d.window}")
    if d.error is not None:
        raise AssertionError("an error was found and not raised")
    if d.failed is not None and (d.arena is not None or d.direct is not None):
        raise AssertionError("a failed decoder holds memory")
    if isinstance(d, LineDecoder):
        lines = <LineDecoder>d
        if not 0 <= lines.scanned <= d.wpos - d.rpos:
            raise AssertionError(f"scanned={lines.scanned} of {d.wpos - d.rpos} buffered bytes")
        if lines.discarding and lines.scanned:
            raise AssertionError("scanned while discarding")
    return 0


cdef class _Decoder:

    def __cinit__(self):
        self.window = -1

    @property
    def pending(self):
        """The number of received bytes that belong to no delivered frame yet."""
        if self.direct is not None:
            return self.direct_base + self.direct_filled
        return self.wpos - self.rpos

    @property
    def missing(self):
        """Bytes still missing from a large frame being received into its own object, or 0.

        While it is not 0, ``get_buffer`` opens a window of that many bytes
        and the next frame's header (direct receive); 0 when no such frame is
        under way.
        """
        if self.direct is None:
            return 0
        return self.direct_size - self.direct_filled

    cdef Py_ssize_t _decode(self, const char* data, Py_ssize_t n, list out) except -1:
        raise NotImplementedError

    cdef int _raise_failed(self) except -1:
        failed = self.failed
        raise type(failed)(*failed.args)

    cdef int _enter(self) except -1:
        # Building an error object can run the garbage collector, and so any
        # __del__ or gc callback; one that calls this decoder would find its
        # offsets half-updated. Refuse instead (msgpack's Unpacker does too).
        if self.busy:
            raise RuntimeError(REENTRANT)
        self.busy = True
        return 0

    cdef list _pull(self, const char* data, Py_ssize_t n):
        """feed() without the guard: take data[:n], return the frames it completes."""
        cdef list out = []
        if self.failed is not None:
            self._raise_failed()
        self.window = -1
        self.peek = False
        self._ingest(data, n, out)
        if self.error is not None:
            self._raise_error()
        return out

    cdef int _raise_error(self) except -1:
        error = self.error
        self.error = None
        if self.failed is not None:
            self._release()
            self.direct = None
            self.direct_block = None
        raise error

    cdef int _release(self) except -1:
        if self.arena is not None:
            _drop_block(self.arena)
        self.arena = None
        self.rpos = 0
        self.wpos = 0
        return 0

    cdef int _reserve(self, Py_ssize_t want) except -1:
        """Make room for at least ``want`` more bytes after wpos."""
        cdef Py_ssize_t used, size
        cdef _Block block
        if self.arena is None:
            self.arena = _read_block() if want == READ_SIZE else _new_block(max(want, MIN_ARENA))
            return 0
        if self.arena.size - self.wpos >= want:
            return 0
        used = self.wpos - self.rpos
        if used + want <= self.arena.size:
            # Compaction: slide the unfinished frame to the front.
            memmove(self.arena.data, self.arena.data + self.rpos, used)
        else:
            size = max(used + want, min(2 * self.arena.size, self.arena_limit))
            block = _new_block(size)
            memcpy(block.data, self.arena.data + self.rpos, used)
            _drop_block(self.arena)
            self.arena = block
        self.rpos = 0
        self.wpos = used
        return 0

    cdef int _store(self, const char* data, Py_ssize_t n) except -1:
        """Append data[:n] to the arena."""
        if n == 0:
            return 0
        self._reserve(n)
        memcpy(self.arena.data + self.wpos, data, n)
        self.wpos += n
        return 0

    cdef int _decode_arena(self, list out) except -1:
        cdef Py_ssize_t used
        cdef _Block block
        if self.wpos > self.rpos:
            self.rpos += self._decode(self.arena.data + self.rpos, self.wpos - self.rpos, out)
        used = self.wpos - self.rpos
        if used == 0:
            self._release()
        elif self.arena.size > MIN_ARENA and used <= self.arena.size // SHRINK_RATIO:
            block = _new_block(max(2 * used, MIN_ARENA))
            memcpy(block.data, self.arena.data + self.rpos, used)
            _drop_block(self.arena)
            self.arena = block
            self.rpos = 0
            self.wpos = used
        return 0

    cdef int _start_direct(self, const char* data, Py_ssize_t have, Py_ssize_t size,
                           Py_ssize_t base) except -1:
        """Allocate a frame of ``size`` bytes, its first ``have`` bytes from data.

        The object has room for the next header after the frame: the window
        over the frame's rest reaches into it (see the module docstring).
        """
        cdef bytes frame = PyBytes_FromStringAndSize(NULL, size + self.direct_room)
        cdef _Block block = _Block.__new__(_Block)
        memcpy(PyBytes_AS_STRING(frame), data, have)
        block.owner = frame
        block.data = PyBytes_AS_STRING(frame)
        block.size = size + self.direct_room
        self.direct = frame
        self.direct_block = block
        self.direct_size = size
        self.direct_base = base
        self.direct_filled = have
        return 0

    cdef bytes _end_direct(self):
        """The completed direct frame, cut to its size; the direct receive is over.

        Bytes the last window wrote past the frame (the next header) stay in
        the object's spare room until the caller has taken them: the
        terminating NUL that goes there is the caller's to write (``_cut``).
        """
        cdef bytes frame = self.direct
        Py_SET_SIZE(frame, self.direct_size)
        self.direct = None
        self.direct_block = None
        return frame

    cdef int _ingest(self, const char* data, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t used
        cdef bytes frame
        if self.direct is not None:
            used = min(n, self.direct_size - self.direct_filled)
            if used:
                memcpy(self.direct_block.data + self.direct_filled, data, used)
            self.direct_filled += used
            if self.direct_filled < self.direct_size:
                return 0
            frame = self._end_direct()
            _cut(frame)
            out.append(frame)
            data += used
            n -= used
        if self.wpos == self.rpos:
            # Nothing buffered: decode in place, keep only the unfinished tail.
            # An empty arena left by a window that was never filled (get_buffer,
            # then feed or eof) goes too: the tail, if any, gets a block its size.
            if self.arena is not None:
                self._release()
            used = self._decode(data, n, out)
            self._store(data + used, n - used)
        else:
            self._store(data, n)
            self._decode_arena(out)
        return 0

    def feed(self, data):
        """Append ``data`` to the stream and return the frames it completes.

        Args:
            data: any bytes-like object; it is not kept after the call.

        Returns:
            The complete frames, oldest first; an empty list when ``data``
            completes none. Bytes of an unfinished frame stay buffered.

        Raises:
            FrameTooLarge: a frame exceeds the limit.
            FrameError: the input breaks the framing rules.

        Error handling:
            The error's ``frames`` attribute holds the frames completed before
            the bad input in this call. A length-prefixed decoder is failed
            afterwards and raises again on every call; a line decoder skips
            the over-long line and continues on the next call (``feed(b"")``
            resumes with what is buffered).
        """
        cdef Py_buffer view
        self._enter()
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                return self._pull(<const char*>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
        finally:
            self.busy = False
            if FASTNET_DEBUG:
                _debug_check(self)

    cdef list _fed(self, bytes data):
        # feed() of a bytes object, called in C: what the compiled connection
        # calls per read where the transport hands it the bytes it read.
        self._enter()
        try:
            return self._pull(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        finally:
            self.busy = False
            if FASTNET_DEBUG:
                _debug_check(self)

    def get_buffer(self, sizehint=-1):
        """Return a writable buffer for the next receive (asyncio.BufferedProtocol).

        Args:
            sizehint: the size the caller would like, or -1 for any size.

        Returns:
            A writable memoryview of at least one byte (or, where the compiled
            connection set ``raw_windows`` for a transport that takes only
            the buffer, the window object itself: a buffer with ``len()``,
            not sliceable): ``sizehint`` bytes
            (64 KiB for -1, at most 1 MiB); exactly the missing bytes of a
            large unfinished frame and the next frame's header; or, right
            after such a frame completed, no more than what completes the
            next frame's header. Write into its start, then call
            ``buffer_updated`` with the number of bytes written. The view is
            not to be used after that call: it may be part of a delivered frame.

        Raises:
            FrameError: the decoder has failed (see ``feed``).
        """
        cdef _Block block
        cdef Py_ssize_t want = READ_SIZE
        if sizehint > 0:
            want = MAX_READ if sizehint >= MAX_READ else sizehint
        self._enter()
        try:
            if self.failed is not None:
                self._raise_failed()
            if self.direct is not None:
                block = self.direct_block
                block.start = self.direct_filled
                block.length = block.size - block.start
            else:
                if self.peek and self.wpos - self.rpos < self.header_peek:
                    want = min(want, self.header_peek - (self.wpos - self.rpos))
                self._reserve(want)
                block = self.arena
                block.start = self.wpos
                block.length = want
            self.window = block.length
            if self.raw_windows:
                return block
            return PyMemoryView_FromObject(block)
        finally:
            self.busy = False
            if FASTNET_DEBUG:
                _debug_check(self)

    def buffer_updated(self, nbytes):
        """Take ``nbytes`` written into the last ``get_buffer`` and return complete frames.

        Returns, raises and handles errors as ``feed``.

        Raises:
            RuntimeError: no ``get_buffer`` call precedes this one.
            ValueError: ``nbytes`` is negative or larger than that buffer.
        """
        return self._updated(0, nbytes, True)

    cdef list _updated(self, Py_ssize_t nbytes, object given=None, bint python=False):
        # buffer_updated with a C count: what the compiled connection calls per
        # read. From Python (``python``), ``given`` is the argument as passed,
        # any object, compared and converted inside the guard, as Python would.
        cdef list out = []
        cdef Py_ssize_t missing
        cdef bytes frame
        self._enter()
        try:
            if self.window < 0:
                raise RuntimeError("buffer_updated() called without get_buffer()")
            if python:
                if not 0 <= given <= self.window:
                    raise ValueError(f"nbytes {given} outside the buffer of {self.window} bytes")
                nbytes = given
            elif not 0 <= nbytes <= self.window:
                raise ValueError(f"nbytes {nbytes} outside the buffer of {self.window} bytes")
            self.window = -1
            self.peek = False
            if self.failed is not None:
                self._raise_failed()
            if self.direct is not None:
                missing = self.direct_size - self.direct_filled
                if nbytes < missing:
                    self.direct_filled += nbytes
                    return out
                # The frame is complete; the read may have gone on into the
                # next header, in the spare room past the frame.
                self.peek = True
                frame = self._end_direct()
                out.append(frame)
                try:
                    if nbytes > missing:
                        self._ingest(PyBytes_AS_STRING(frame) + PyBytes_GET_SIZE(frame),
                                     nbytes - missing, out)
                finally:
                    _cut(frame)
                if self.error is not None:
                    self._raise_error()
                return out
            self.wpos += nbytes
            self._decode_arena(out)
            if self.error is not None:
                self._raise_error()
            return out
        finally:
            self.busy = False
            if FASTNET_DEBUG:
                _debug_check(self)


cdef class LengthPrefixedDecoder(_Decoder):
    """Streaming decoder of length-prefixed frames.

    Args:
        spec: the ``fastnet.LengthPrefixed`` layout to decode.
    """

    def __init__(self, spec):
        self.offset = spec.offset
        self.length_size = spec.length_size
        self.big = spec.byteorder == "big"
        self.adjustment = spec.adjustment
        self.strip_size = spec.strip_size
        self.max_frame = spec.max_frame
        self.header = spec.offset + spec.length_size
        self.header_peek = max(self.header, self.strip_size)
        self.direct_room = self.header_peek if self.header_peek <= DIRECT_ROOM else 0
        self.arena_limit = max(READ_SIZE, self.header + spec.max_frame)

    cdef Py_ssize_t _decode(self, const char* data, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t avail, size
        cdef int64_t body
        cdef uint64_t length
        while True:
            avail = n - pos
            if avail < self.header:
                return pos
            length = _read_length(<const unsigned char*>data + pos + self.offset,
                                  self.length_size, self.big)
            if length >= LARGE_LENGTH:
                self.failed = self.error = FrameTooLarge(
                    <object>length + self.adjustment, self.max_frame, frames=out)
                return pos
            body = <int64_t>length + self.adjustment
            if body < 0:
                self.failed = self.error = negative_body(length, self.adjustment, frames=out)
                return pos
            if body > self.max_frame:
                self.failed = self.error = FrameTooLarge(body, self.max_frame, frames=out)
                return pos
            size = self.header + <Py_ssize_t>body
            if self.strip_size > size:
                self.failed = self.error = strip_past_end(self.strip_size, size, frames=out)
                return pos
            if avail >= size:
                out.append(PyBytes_FromStringAndSize(data + pos + self.strip_size, size - self.strip_size))
                pos += size
                continue
            if size - self.strip_size >= DIRECT_THRESHOLD and avail >= self.strip_size:
                try:
                    self._start_direct(data + pos + self.strip_size, avail - self.strip_size,
                                       size - self.strip_size, self.strip_size)
                except MemoryError:
                    # Not fatal: the frame stays in the arena, and a later
                    # read tries again (or fails to grow the arena, loudly).
                    return pos
                return n
            return pos

    def eof(self):
        """Signal the end of the stream and return the last complete frames.

        Returns:
            The frames still buffered, oldest first (normally none: ``feed``
            returns frames as soon as they are complete).

        Raises:
            IncompleteFrame: the stream ended inside a frame; ``frames`` holds
                the complete frames before it. The decoder is failed after it.
        """
        self._enter()
        try:
            frames = self._pull(NULL, 0)
            pending = self.pending
            if pending:
                self.failed = self.error = IncompleteFrame(pending, frames=frames)
                self._raise_error()
            return frames
        finally:
            self.busy = False
            if FASTNET_DEBUG:
                _debug_check(self)


cdef class LineDecoder(_Decoder):
    """Streaming decoder of delimited lines.

    Args:
        spec: the ``fastnet.Lines`` layout to decode.
    """

    def __init__(self, spec):
        self.delimiter = spec.delimiter
        self.dlen = len(spec.delimiter)
        self.max_length = spec.max_length
        self.strip = spec.strip
        self.crlf = spec.strip and spec.delimiter == b"\n"
        self.skip = spec.on_too_long == "skip"
        self.arena_limit = max(READ_SIZE, spec.max_length + self.dlen)

    @property
    def skipped(self):
        """The number of over-long lines dropped so far (raised, or skipped silently)."""
        return self.skipped_lines

    cdef bint _too_long(self, Py_ssize_t size, list out) except -1:
        """Count an over-long line; True when decoding must stop to raise for it."""
        self.skipped_lines += 1
        if self.skip:
            return False
        self.error = FrameTooLarge(size, self.max_length, frames=out)
        return True

    cdef Py_ssize_t _decode(self, const char* data, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t end, partial, size
        cdef Py_ssize_t keep = self.dlen - 1  # a delimiter may straddle two receives
        cdef const char* delimiter = PyBytes_AS_STRING(self.delimiter)
        while True:
            if self.discarding:
                end = _find(data, pos, n, delimiter, self.dlen)
                if end < 0:
                    return max(pos, n - keep)
                pos = end + self.dlen
                self.discarding = False
                continue
            end = _find(data, pos + self.scanned, n, delimiter, self.dlen)
            if end < 0:
                # Bytes at the end that may begin a delimiter are not line bytes (yet).
                partial = min(keep, n - pos)
                while partial > 0 and memcmp(data + n - partial, delimiter, partial) != 0:
                    partial -= 1
                size = n - pos - partial
                if size > self.max_length:
                    self.discarding = True
                    self.scanned = 0
                    pos = max(pos, n - keep)
                    if self._too_long(size, out):
                        return pos
                    continue
                self.scanned = max(0, n - pos - keep)
                return pos
            self.scanned = 0
            if end - pos > self.max_length:
                size = end - pos
                pos = end + self.dlen
                if self._too_long(size, out):
                    return pos
                continue
            if not self.strip:
                out.append(PyBytes_FromStringAndSize(data + pos, end + self.dlen - pos))
            elif self.crlf and end > pos and data[end - 1] == b'\r':
                out.append(PyBytes_FromStringAndSize(data + pos, end - 1 - pos))
            else:
                out.append(PyBytes_FromStringAndSize(data + pos, end - pos))
            pos = end + self.dlen

    def eof(self):
        """Signal the end of the stream and return the last lines.

        Returns:
            The lines still buffered, then the unterminated tail, if any, as a
            last frame (for ``b"\\n"`` without a trailing ``\\r``; a tail of
            exactly ``b"\\r"`` is no line, as in tokio-util's LinesCodec). The
            decoder is empty afterwards and may be fed a new stream.

        Raises:
            FrameTooLarge: a buffered line or the tail is longer than
                ``max_length``; ``frames`` holds the lines before it. Never
                with ``on_too_long="skip"``: such lines are dropped and counted.

        Error handling:
            After an over-long buffered line, call ``eof()`` again to decode
            what followed it.
        """
        cdef Py_ssize_t size
        self._enter()
        try:
            frames = self._pull(NULL, 0)
            size = self.wpos - self.rpos
            tail = b"" if size == 0 else PyBytes_FromStringAndSize(self.arena.data + self.rpos, size)
            discarding = self.discarding
            self._release()
            self.scanned = 0
            self.discarding = False
            if discarding or not tail:
                return frames
            if size > self.max_length:
                self.skipped_lines += 1
                if self.skip:
                    return frames
                raise FrameTooLarge(size, self.max_length, frames=frames)
            if self.crlf and tail[size - 1] == 13:
                tail = tail[:size - 1]
                if size == 1:
                    return frames
            frames.append(tail)
            return frames
        finally:
            self.busy = False
            if FASTNET_DEBUG:
                _debug_check(self)


cdef struct _Payload:
    const char* buf
    Py_ssize_t len
    bint viewed        # view holds a buffer to release
    Py_buffer view


cdef inline int _get_payload(object obj, _Payload* payload) except -1:
    """View obj's bytes: bytes objects directly, anything else by the buffer protocol."""
    if PyBytes_CheckExact(obj):
        payload.buf = PyBytes_AS_STRING(obj)
        payload.len = PyBytes_GET_SIZE(obj)
        payload.viewed = False
        return 0
    PyObject_GetBuffer(obj, &payload.view, PyBUF_SIMPLE)
    payload.buf = <const char*>payload.view.buf
    payload.len = payload.view.len
    payload.viewed = True
    return 0


cdef inline void _release_payload(_Payload* payload) noexcept:
    if payload.viewed:
        payload.viewed = False
        PyBuffer_Release(&payload.view)


cdef class LengthPrefixedEncoder:
    """Encoder of length-prefixed frames.

    Args:
        spec: the ``fastnet.LengthPrefixed`` layout to encode.
    """

    def __init__(self, spec):
        self.length_size = spec.length_size
        self.big = spec.byteorder == "big"
        self.adjustment = spec.adjustment
        self.max_frame = spec.max_frame
        self.field_max = <uint64_t>((1 << (8 * spec.length_size)) - 1)

    cdef int _check(self, Py_ssize_t size) except -1:
        cdef int64_t value
        if size > self.max_frame:
            raise FrameTooLarge(size, self.max_frame)
        value = size - self.adjustment
        if value < 0:
            raise negative_length_field(size, self.adjustment)
        if <uint64_t>value > self.field_max:
            raise FrameTooLarge(value, self.field_max)
        return 0

    def header(self, size):
        """Return the length field that precedes a payload of ``size`` bytes.

        Raises:
            FrameTooLarge: ``size`` exceeds ``max_frame`` or does not fit the field.
            FrameError: ``size - adjustment`` is negative.
        """
        # Python ints here: any int is checked exactly, as in the twin.
        if size > self.max_frame:
            raise FrameTooLarge(size, self.max_frame)
        value = size - self.adjustment
        if value < 0:
            raise negative_length_field(size, self.adjustment)
        if value > self.field_max:
            raise FrameTooLarge(value, self.field_max)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self.length_size)
        _write_length(<unsigned char*>PyBytes_AS_STRING(out), <uint64_t>value,
                      self.length_size, self.big)
        return out

    def encode(self, payload):
        """Return one frame: the length field, then ``payload``.

        Raises:
            FrameTooLarge: the payload exceeds ``max_frame`` or its length
                does not fit the field.
            FrameError: ``len(payload) - adjustment`` is negative.
        """
        cdef _Payload view
        cdef bytes out
        cdef char* p
        _get_payload(payload, &view)
        try:
            self._check(view.len)
            out = PyBytes_FromStringAndSize(NULL, self.length_size + view.len)
            p = PyBytes_AS_STRING(out)
            _write_length(<unsigned char*>p, <uint64_t>(view.len - self.adjustment),
                          self.length_size, self.big)
            memcpy(p + self.length_size, view.buf, view.len)
        finally:
            _release_payload(&view)
        return out

    def encode_many(self, payloads):
        """Return the frames of all ``payloads`` as one bytes object.

        Raises:
            FrameTooLarge, FrameError: as ``encode``; nothing is returned
                when any payload is rejected.
        """
        cdef _Payload view
        cdef Py_ssize_t i, count, total = 0, pos = 0
        cdef bytes out
        cdef char* p
        seq = PySequence_Fast(payloads, "encode_many() takes an iterable of bytes-like objects")
        count = PySequence_Fast_GET_SIZE(seq)
        for i in range(count):
            _get_payload(<object>PySequence_Fast_GET_ITEM(seq, i), &view)
            try:
                self._check(view.len)
                total += self.length_size + view.len
            finally:
                _release_payload(&view)
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        for i in range(count):
            _get_payload(<object>PySequence_Fast_GET_ITEM(seq, i), &view)
            try:
                if pos + self.length_size + view.len > total:
                    raise RuntimeError("a payload changed size during encode_many()")
                _write_length(<unsigned char*>p + pos, <uint64_t>(view.len - self.adjustment),
                              self.length_size, self.big)
                memcpy(p + pos + self.length_size, view.buf, view.len)
                pos += self.length_size + view.len
            finally:
                _release_payload(&view)
        if pos != total:
            raise RuntimeError("a payload changed size during encode_many()")
        return out


cdef class LineEncoder:
    """Encoder of delimited lines.

    Args:
        spec: the ``fastnet.Lines`` layout to encode.
    """

    def __init__(self, spec):
        self.delimiter = spec.delimiter
        self.max_length = spec.max_length

    cdef int _check(self, const char* data, Py_ssize_t size) except -1:
        if size > self.max_length:
            raise FrameTooLarge(size, self.max_length)
        if _find(data, 0, size, PyBytes_AS_STRING(self.delimiter),
                 PyBytes_GET_SIZE(self.delimiter)) >= 0:
            raise delimiter_in_payload(self.delimiter)
        return 0

    def encode(self, payload):
        """Return ``payload`` followed by the delimiter.

        Raises:
            FrameTooLarge: the payload is longer than ``max_length``.
            FrameError: the payload contains the delimiter.
        """
        cdef _Payload view
        cdef bytes out
        cdef Py_ssize_t dlen = PyBytes_GET_SIZE(self.delimiter)
        _get_payload(payload, &view)
        try:
            self._check(view.buf, view.len)
            out = PyBytes_FromStringAndSize(NULL, view.len + dlen)
            memcpy(PyBytes_AS_STRING(out), view.buf, view.len)
            memcpy(PyBytes_AS_STRING(out) + view.len, PyBytes_AS_STRING(self.delimiter), dlen)
        finally:
            _release_payload(&view)
        return out

    def encode_many(self, payloads):
        """Return the lines of all ``payloads`` as one bytes object.

        Raises:
            FrameTooLarge, FrameError: as ``encode``; nothing is returned
                when any payload is rejected.
        """
        cdef _Payload view
        cdef Py_ssize_t i, count, total = 0, pos = 0
        cdef Py_ssize_t dlen = PyBytes_GET_SIZE(self.delimiter)
        cdef bytes out
        cdef char* p
        seq = PySequence_Fast(payloads, "encode_many() takes an iterable of bytes-like objects")
        count = PySequence_Fast_GET_SIZE(seq)
        for i in range(count):
            _get_payload(<object>PySequence_Fast_GET_ITEM(seq, i), &view)
            try:
                self._check(view.buf, view.len)
                total += view.len + dlen
            finally:
                _release_payload(&view)
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        for i in range(count):
            _get_payload(<object>PySequence_Fast_GET_ITEM(seq, i), &view)
            try:
                if pos + view.len + dlen > total:
                    raise RuntimeError("a payload changed size during encode_many()")
                memcpy(p + pos, view.buf, view.len)
                memcpy(p + pos + view.len, PyBytes_AS_STRING(self.delimiter), dlen)
                pos += view.len + dlen
            finally:
                _release_payload(&view)
        if pos != total:
            raise RuntimeError("a payload changed size during encode_many()")
        return out
