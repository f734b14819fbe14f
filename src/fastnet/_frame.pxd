# Declarations of the cdef classes in _frame.pyx: one comment per field.

from libc.stdint cimport int64_t, uint64_t


cdef class _Block:
    cdef char* data              # start of the memory this block exports windows of
    cdef Py_ssize_t size         # bytes at data
    cdef object owner            # bytes object that owns data, or None when data is PyMem-allocated
    cdef Py_ssize_t start        # window the next __getbuffer__ exports: data[start:start + length]
    cdef Py_ssize_t length


cdef class _Decoder:
    # The fields a read touches come first, then the length-prefixed layout,
    # then what only a large frame's direct receive uses: a subclass's fields
    # come after all of its base's, so LengthPrefixedDecoder's layout is
    # declared here, beside the hot ones (a line decoder leaves it unused):
    # with a thousand connections each cache line a read touches is a miss.
    cdef _Block arena            # buffered stream bytes live in arena.data[rpos:wpos]; None when empty
    cdef Py_ssize_t rpos         # first byte not yet consumed
    cdef Py_ssize_t wpos         # first free byte
    cdef bytes direct            # frame object the kernel receives into (large frames), or None
    cdef object failed           # the FrameError that failed this decoder, or None
    cdef object error            # error found by _decode, raised once the buffer is settled
    cdef Py_ssize_t window       # length of the window get_buffer handed out; -1 when none is open
    cdef bint peek               # a large frame just completed: the next window ends the next header
    cdef bint busy               # inside a public call: a re-entrant call (GC callback, __del__) raises
    cdef bint raw_windows        # get_buffer returns the _Block itself, not a memoryview of it: set by
                                 # the compiled connection on transports that only take its buffer
    cdef bint big                # LengthPrefixedDecoder: byte order of the length field
    cdef int length_size         # LengthPrefixedDecoder: 1, 2, 3, 4 or 8
    cdef Py_ssize_t offset       # LengthPrefixedDecoder: bytes before the length field
    cdef Py_ssize_t header       # LengthPrefixedDecoder: offset + length_size
    cdef int64_t adjustment      # LengthPrefixedDecoder: added to the field's value to give the body size
    cdef int64_t max_frame       # LengthPrefixedDecoder: largest body accepted
    cdef Py_ssize_t strip_size   # LengthPrefixedDecoder: bytes removed from the front of each frame
    cdef Py_ssize_t arena_limit  # doubling stops here: the largest frame's wire size, at least READ_SIZE
    cdef _Block direct_block     # exports the unfilled part of direct, and header_peek bytes past it
    cdef Py_ssize_t direct_size  # the frame's delivered size (direct's size once complete)
    cdef Py_ssize_t direct_base  # wire bytes of that frame consumed before its delivered part (strip)
    cdef Py_ssize_t direct_filled  # bytes of direct written so far
    cdef Py_ssize_t header_peek  # bytes that start a frame's direct receive (0: no direct receive)
    cdef Py_ssize_t direct_room  # bytes past a direct frame its window covers: header_peek, or 0

    cdef Py_ssize_t _decode(self, const char* data, Py_ssize_t n, list out) except -1
    cdef int _ingest(self, const char* data, Py_ssize_t n, list out) except -1
    cdef int _decode_arena(self, list out) except -1
    cdef int _reserve(self, Py_ssize_t want) except -1
    cdef int _store(self, const char* data, Py_ssize_t n) except -1
    cdef int _release(self) except -1
    cdef int _start_direct(self, const char* data, Py_ssize_t have, Py_ssize_t size,
                           Py_ssize_t base) except -1
    cdef bytes _end_direct(self)
    cdef int _raise_error(self) except -1
    cdef int _raise_failed(self) except -1
    cdef int _enter(self) except -1
    cdef list _pull(self, const char* data, Py_ssize_t n)
    cdef list _fed(self, bytes data)
    cdef list _updated(self, Py_ssize_t nbytes, object given=*, bint python=*)


cdef class LengthPrefixedDecoder(_Decoder):
    pass                         # its fields are _Decoder's (see there)


cdef class LineDecoder(_Decoder):
    cdef bytes delimiter         # ends each frame
    cdef Py_ssize_t dlen         # len(delimiter)
    cdef Py_ssize_t max_length   # longest line, delimiter excluded
    cdef bint strip              # remove the delimiter from frames
    cdef bint crlf               # also remove one '\r' before a b'\n' delimiter
    cdef Py_ssize_t scanned      # bytes at the front of the buffer known to hold no delimiter start
    cdef bint discarding         # skipping an over-long line until its delimiter
    cdef bint skip               # on_too_long="skip": drop over-long lines without raising
    cdef Py_ssize_t skipped_lines  # over-long lines dropped so far (the skipped property)

    cdef bint _too_long(self, Py_ssize_t size, list out) except -1


cdef class LengthPrefixedEncoder:
    cdef int length_size         # 1, 2, 3, 4 or 8
    cdef bint big                # byte order of the length field
    cdef int64_t adjustment      # subtracted from the payload size to give the field's value
    cdef int64_t max_frame       # largest payload accepted
    cdef uint64_t field_max      # largest value the field holds

    cdef int _check(self, Py_ssize_t size) except -1


cdef class LineEncoder:
    cdef bytes delimiter         # appended to each line
    cdef Py_ssize_t max_length   # longest payload accepted

    cdef int _check(self, const char* data, Py_ssize_t size) except -1
