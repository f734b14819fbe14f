# cython: language_level=3, embedsignature=True, freethreading_compatible=True
"""Cython hot path of fastnet's send side: the queue of frames a connection sends.

Strategy:

- A frame is validated and encoded when it is queued, not when the batch is
  written, so a frame that cannot be encoded is refused in the caller of
  ``send`` with nothing queued, and ``nbytes`` is the exact size of what will
  be written. The checks are the encoders' own (``_check``, cimported from
  ``_frame.pxd``), so the errors are those of ``encoder.encode``.
- Encoded frames are written straight into one growable C buffer:
  appending a frame allocates no Python object; ``take`` makes one ``bytes``
  object of the batch. The buffer grows by doubling from ``INITIAL_SIZE``
  and, after a batch has grown it past ``KEEP_SIZE``, shrinks back to
  ``KEEP_SIZE`` when the batch is taken.
- Once its batch is taken (or cleared), a queue lends its buffer to the
  process: it puts it in one spare slot and keeps whatever buffer was there
  (none, mostly), and a queue that needs a buffer and has none takes the
  spare. A connection that answers each read at once (a callback handler)
  so writes its replies into the buffer the previous connection's replies
  just went through, still in the CPU's caches, instead of into its own,
  which at 1,000 connections is cold: callgrind's cache model counted three
  cache misses per frame in that copy (docs/design.md §5). Queues that fill
  in the same loop iteration (task handlers) keep buffers of their own, as
  before: none of them allocates per batch. A quiet connection holds no
  buffer.
- A length-prefixed payload of at least ``unjoined_threshold`` bytes that is
  a flat byte buffer is not copied: its length field goes into the buffer,
  and the payload object is remembered with the buffer offset it follows,
  so ``take`` returns ``[joined bytes, payload, joined bytes, ...]`` for one
  vectored write.

The pure-Python twin ``_outq_py.py`` is the reference for behaviour: the
same bytes, the same errors and the same ``nbytes`` for every sequence of
calls.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_FULL_RO,
    PyBUF_SIMPLE,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_GET_SIZE
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from ._frame cimport LengthPrefixedEncoder, LineEncoder


# Tunables, in one place (the twin's module constants say the same).
cdef enum:
    # Size of the buffer the first frame allocates: one page holds the
    # replies to a typical read of small frames (16 pipelined 64-byte frames
    # and their headers take 1.1 KiB) without regrowing, and costs a quiet
    # connection that sends only small frames no more than one page.
    INITIAL_BUFFER = 4096
    # Largest buffer kept once a batch is taken; a larger one goes back to
    # this size. 64 KiB is one default receive window (READ_SIZE in _frame):
    # the replies to a full read of small frames, the largest batch an echo
    # or a request/response handler produces per read, fit without
    # regrowing, so a busy connection allocates nothing per batch. Larger
    # batches are rare (large payloads go out unjoined) and pay one
    # allocation, small next to copying that many bytes. A connection that
    # once sent a large batch keeps at most this much.
    KEEP_BUFFER = 65536

cdef extern from *:
    """
    /* The spare buffer (see the module docstring). While spare, a buffer's
       first bytes hold its size. The exchange is atomic, so queues on event
       loops in other threads (free-threaded builds) never share a buffer;
       without the builtin, no buffer is lent. */
    #if defined(__GNUC__) || defined(__clang__)
    static char *fastnet_outq_spare = NULL;
    static char *fastnet_outq_swap(char *buf) {
        return __atomic_exchange_n(&fastnet_outq_spare, buf, __ATOMIC_ACQ_REL);
    }
    #else
    static char *fastnet_outq_swap(char *buf) { return buf; }
    #endif
    """
    char* fastnet_outq_swap(char* buf) nogil


# The same values, for Python code and tests (the twin's names).
INITIAL_SIZE = INITIAL_BUFFER
KEEP_SIZE = KEEP_BUFFER

# Bounds unjoined_threshold as framing.MAX_SIZE_PARAMETER bounds sizes.
MAX_THRESHOLD = 2**48

REENTRANT = "queue called re-entrantly, from a callback inside one of its own calls"


cdef inline void _write_length(char* p, uint64_t value, int size, bint big) noexcept nogil:
    cdef int i
    if big:
        for i in range(size - 1, -1, -1):
            p[i] = <char>(value & 0xFF)
            value >>= 8
    else:
        for i in range(size):
            p[i] = <char>(value & 0xFF)
            value >>= 8


cdef bint _is_flat(object frame) except -1:
    """True for a 1-D, item size 1, C-contiguous buffer (protocol._is_flat, memoryview's view)."""
    cdef Py_buffer view
    try:
        PyObject_GetBuffer(frame, &view, PyBUF_FULL_RO)
    except TypeError:  # not a buffer: the encoder reports it
        return False
    try:
        return view.ndim == 1 and view.itemsize == 1 and PyBuffer_IsContiguous(&view, b'C')
    finally:
        PyBuffer_Release(&view)


@cython.final
cdef class OutQueue:
    """Frames waiting to be written, validated and encoded as they are queued.

    ``append`` and ``extend`` check each frame as ``encoder.encode`` would and
    raise its error, with nothing queued, so a frame that cannot be sent is
    refused where it is sent. Joined frames are copied at once into one
    reusable buffer; ``take`` hands out everything queued, in order, for one
    write, and empties the queue.

    A frame object must not be changed while it is queued. A joined frame
    is copied when it is queued, so changing it afterwards does not change
    what is written; an unjoined payload is kept by reference and written
    as it is when the batch is written.

    Args:
        encoder: a ``LengthPrefixedEncoder`` or ``LineEncoder`` of the same
            backend (``framing.LengthPrefixed(...).encoder``).
        unjoined_threshold: length-prefixed frames only: a payload of at
            least this many bytes that is a flat byte buffer (1-D, item size
            1, C-contiguous) is not copied but kept as its own buffer after
            its length field. 0 joins every frame.

    Raises:
        TypeError: ``encoder`` is not an encoder of this backend, or
            ``unjoined_threshold`` is not an int.
        ValueError: ``unjoined_threshold`` is negative or too large.
    """

    def __cinit__(self):
        self.refs = []

    def __init__(self, encoder, unjoined_threshold=0):
        if self.busy:
            raise RuntimeError(REENTRANT)
        if type(encoder) is LengthPrefixedEncoder:
            self.lp, self.lines = encoder, None
        elif type(encoder) is LineEncoder:
            self.lp, self.lines = None, encoder
        else:
            raise TypeError(
                f"encoder must be a LengthPrefixedEncoder or LineEncoder of "
                f"{LengthPrefixedEncoder.__module__}, "
                f"not {type(encoder).__module__}.{type(encoder).__qualname__}"
            )
        if not isinstance(unjoined_threshold, int) or isinstance(unjoined_threshold, bool):
            raise TypeError(
                f"unjoined_threshold must be an int, not {type(unjoined_threshold).__name__}"
            )
        if not 0 <= unjoined_threshold <= MAX_THRESHOLD:
            raise ValueError(
                f"unjoined_threshold must be between 0 and {MAX_THRESHOLD}, "
                f"got {unjoined_threshold}"
            )
        self.threshold = 0 if self.lines is not None else unjoined_threshold
        self._reset()

    def __dealloc__(self):
        PyMem_RawFree(self.buf)
        self.buf = NULL

    @property
    def nbytes(self):
        """Bytes the queued frames take on the wire: headers, payloads, delimiters."""
        return self.queued_bytes

    @property
    def nframes(self):
        """Number of frames queued."""
        return self.queued_frames

    def __len__(self):
        return self.queued_frames

    def __bool__(self):
        return self.queued_frames > 0

    def __sizeof__(self):
        return type(self).__basicsize__ + self.size

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        """Make room for ``extra`` more bytes at ``buf + used``."""
        cdef Py_ssize_t need = self.used + extra
        cdef Py_ssize_t size
        cdef char* grown
        if need <= self.size:
            return 0
        if self.buf == NULL:
            self.buf = fastnet_outq_swap(NULL)  # the spare, if there is one
            if self.buf != NULL:
                self.size = (<Py_ssize_t*>self.buf)[0]
                if need <= self.size:
                    return 0
        size = self.size if self.size > INITIAL_BUFFER else INITIAL_BUFFER
        while size < need:
            if size > (<Py_ssize_t>1 << 61):
                raise MemoryError()
            size *= 2
        grown = <char*>PyMem_RawRealloc(self.buf, size)
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        self.size = size
        return 0

    cdef int _add(self, object frame) except -1:
        """Check and queue one frame; on an error nothing is queued."""
        cdef Py_buffer view
        cdef bint viewed = False
        cdef const char* data
        cdef Py_ssize_t size, head, dlen
        cdef LengthPrefixedEncoder lp = self.lp
        cdef LineEncoder lines
        cdef char* p
        if PyBytes_CheckExact(frame):
            data = PyBytes_AS_STRING(frame)
            size = PyBytes_GET_SIZE(frame)
        else:
            PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
            viewed = True
            data = <const char*>view.buf
            size = view.len
        try:
            if lp is not None:
                lp._check(size)
                head = lp.length_size
                if self.threshold and size >= self.threshold and (not viewed or _is_flat(frame)):
                    self._reserve(head)
                    _write_length(self.buf + self.used, <uint64_t>(size - lp.adjustment),
                                  head, lp.big)
                    self.refs.append(self.used + head)
                    self.refs.append(frame)
                    self.unjoined = True
                    self.used += head
                else:
                    self._reserve(head + size)
                    p = self.buf + self.used
                    _write_length(p, <uint64_t>(size - lp.adjustment), head, lp.big)
                    memcpy(p + head, data, size)
                    self.used += head + size
                self.queued_bytes += head + size
            elif self.lines is not None:
                lines = self.lines
                lines._check(data, size)
                dlen = PyBytes_GET_SIZE(lines.delimiter)
                self._reserve(size + dlen)
                p = self.buf + self.used
                memcpy(p, data, size)
                memcpy(p + size, PyBytes_AS_STRING(lines.delimiter), dlen)
                self.used += size + dlen
                self.queued_bytes += size + dlen
            else:
                raise TypeError("OutQueue.__init__ was not called")
            self.queued_frames += 1
        finally:
            if viewed:
                PyBuffer_Release(&view)
        return 0

    cdef int _append(self, object frame) except -1:
        if self.busy:
            raise RuntimeError(REENTRANT)
        self.busy = True
        try:
            self._add(frame)
        finally:
            self.busy = False
        return 0

    # append and take are called per frame and per batch: without binding
    # they are plain method descriptors (METH_O, METH_NOARGS), which the
    # interpreter calls through its specialized fast path for C methods.
    # Their docstrings then start with the signature in the form CPython
    # reads into __text_signature__ (as Argument Clinic writes it), and
    # __doc__ is the twin's docstring.
    @cython.binding(False)
    @cython.embedsignature(False)
    @cython.always_allow_keywords(False)
    def append(self, frame):
        """append($self, frame, /)
--

Validate and encode one frame, and queue it.

        Raises:
            FrameTooLarge, FrameError, TypeError, BufferError: as
                ``encoder.encode(frame)``; nothing is queued.
            RuntimeError: called from a callback inside another call on
                this queue.
        """
        self._append(frame)

    def extend(self, frames):
        """Validate, encode and queue several frames: all of them or none.

        Raises:
            FrameTooLarge, FrameError, TypeError, BufferError: as
                ``encoder.encode`` for the first frame that cannot be
                encoded, or whatever iterating ``frames`` raises; nothing
                of this call stays queued.
            RuntimeError: called from a callback inside another call on
                this queue (for example from ``frames``' iterator).
        """
        if self.busy:
            raise RuntimeError(REENTRANT)
        self.busy = True
        cdef Py_ssize_t used = self.used
        cdef Py_ssize_t queued_bytes = self.queued_bytes
        cdef Py_ssize_t queued_frames = self.queued_frames
        cdef Py_ssize_t nrefs = PyList_GET_SIZE(self.refs) if self.unjoined else 0
        try:
            for frame in frames:
                self._add(frame)
        except BaseException:
            self.used = used
            self.queued_bytes = queued_bytes
            self.queued_frames = queued_frames
            del self.refs[nrefs:]
            self.unjoined = nrefs != 0
            raise
        finally:
            self.busy = False

    cdef object _take(self):
        cdef list parts
        cdef Py_ssize_t i, n, start = 0, offset
        if self.busy:
            raise RuntimeError(REENTRANT)
        if self.queued_frames == 0:
            return None
        if not self.unjoined:
            out = PyBytes_FromStringAndSize(self.buf, self.used)
        else:
            n = PyList_GET_SIZE(self.refs)
            parts = []
            for i in range(0, n, 2):
                offset = self.refs[i]
                if offset > start:
                    parts.append(PyBytes_FromStringAndSize(self.buf + start, offset - start))
                parts.append(self.refs[i + 1])
                start = offset
            if self.used > start:
                parts.append(PyBytes_FromStringAndSize(self.buf + start, self.used - start))
            out = parts
        self._reset()
        return out

    @cython.binding(False)
    @cython.embedsignature(False)
    def take(self):
        """take($self, /)
--

Return everything queued, for one write, and empty the queue.

        Returns:
            None when nothing is queued; one bytes object when every frame
            was joined; otherwise a list of buffers in wire order, where
            each unjoined payload is the object that was queued, preceded by
            bytes that end with its length field.

        Raises:
            RuntimeError: called from a callback inside another call on
                this queue.
        """
        return self._take()

    def clear(self):
        """Drop every queued frame.

        Raises:
            RuntimeError: called from a callback inside another call on
                this queue.
        """
        if self.busy:
            raise RuntimeError(REENTRANT)
        self._reset()

    cdef int _reset(self) except -1:
        cdef char* smaller
        self.used = self.queued_bytes = self.queued_frames = 0
        if self.unjoined:
            del self.refs[:]
            self.unjoined = False
        if self.size > KEEP_BUFFER:
            smaller = <char*>PyMem_RawRealloc(self.buf, KEEP_BUFFER)
            if smaller != NULL:  # else keep the larger block: still correct
                self.buf = smaller
                self.size = KEEP_BUFFER
        if self.buf != NULL and self.size <= KEEP_BUFFER:
            # Lend it: the spare slot takes this buffer, this queue takes
            # what the slot held (NULL, mostly).
            (<Py_ssize_t*>self.buf)[0] = self.size
            self.buf = fastnet_outq_swap(self.buf)
            self.size = 0 if self.buf == NULL else (<Py_ssize_t*>self.buf)[0]
        return 0
