# Declarations of the cdef class in _outq.pyx: one comment per field. A
# Cython module (the per-read core) may cimport OutQueue and call _append and
# _take directly, without a Python method call per frame.

from ._frame cimport LengthPrefixedEncoder, LineEncoder


cdef class OutQueue:
    cdef char* buf                   # joined wire bytes live in buf[:used]; NULL until the first frame
    cdef Py_ssize_t size             # bytes allocated at buf
    cdef Py_ssize_t used             # bytes of buf queued
    cdef Py_ssize_t queued_bytes     # wire bytes queued: used plus the unjoined payloads (nbytes)
    cdef Py_ssize_t queued_frames    # frames queued (nframes)
    cdef LengthPrefixedEncoder lp    # the encoder when it writes length fields, else None
    cdef LineEncoder lines           # the encoder when it writes lines, else None
    cdef Py_ssize_t threshold        # smallest flat payload kept unjoined; 0: join everything
    cdef list refs                   # [offset, payload, ...]: unjoined payload after buf[:offset]
    cdef bint busy                   # inside a public call: a re-entrant call raises RuntimeError
    cdef bint unjoined               # refs is not empty: tested instead of the list (a cold line)

    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _add(self, object frame) except -1
    cdef int _append(self, object frame) except -1
    cdef object _take(self)
    cdef int _reset(self) except -1
