# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The router's per-frame path in C (twin: ``_message_py.py``, the reference).

Per message: read and check the 12-byte header straight from the frame's
bytes, find the route in a list indexed by type, check the protocol state
(one bit), cut the body, decode it, call a plain handler or take the first
step of an ``async`` one (``PyIter_Send``: a handler that finishes in its
first step costs no task and no StopIteration), and write the reply's header
and body into one new ``bytes``. Every rarer path calls the router's Python
(``router.py``), as the twin does.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_XDECREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from operator import index

from asyncio import CancelledError

from fastnet.errors import FrameTooLarge
from fastnet.wire import HeaderError, header_error, short_message

__all__ = [
    "ALL_STATES",
    "Dispatcher",
    "Route",
    "Session",
    "encode_message",
    "error_body",
    "pack_header",
    "parse_error_body",
    "parse_header",
]


cdef extern from "Python.h":
    # PYGEN_RETURN 0, PYGEN_ERROR -1 (an exception is set), PYGEN_NEXT 1.
    int PyIter_Send(object iterator, object arg, PyObject **presult) except? -1
    object PyContext_CopyCurrent()
    int PyContext_Enter(object context) except -1
    int PyContext_Exit(object context) except -1


DEF HEADER = 12
DEF K_REQUEST = 1
DEF K_REPLY = 2
DEF K_ERROR = 3
DEF K_CONTROL = 4

ALL_STATES = 0xFFFFFFFFFFFFFFFF


cdef inline uint16_t _u16(const uint8_t *p) noexcept:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t _u32(const uint8_t *p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put_header(
    char *out, int kind, uint32_t type_, uint32_t id_, uint32_t deadline
) noexcept:
    cdef uint8_t *p = <uint8_t *>out
    p[0] = <uint8_t>kind
    p[1] = 0
    p[2] = <uint8_t>(type_ >> 8)
    p[3] = <uint8_t>type_
    p[4] = <uint8_t>(id_ >> 24)
    p[5] = <uint8_t>(id_ >> 16)
    p[6] = <uint8_t>(id_ >> 8)
    p[7] = <uint8_t>id_
    p[8] = <uint8_t>(deadline >> 24)
    p[9] = <uint8_t>(deadline >> 16)
    p[10] = <uint8_t>(deadline >> 8)
    p[11] = <uint8_t>deadline


cdef bytes _message(int kind, uint32_t type_, uint32_t id_, uint32_t deadline, object body):
    # Header and body in one allocation; body is any flat bytes-like object.
    cdef Py_buffer view
    cdef bytes out
    if body is None:
        out = PyBytes_FromStringAndSize(NULL, HEADER)
        _put_header(PyBytes_AS_STRING(out), kind, type_, id_, deadline)
        return out
    if type(body) is bytes:
        out = PyBytes_FromStringAndSize(NULL, HEADER + PyBytes_GET_SIZE(body))
        _put_header(PyBytes_AS_STRING(out), kind, type_, id_, deadline)
        memcpy(PyBytes_AS_STRING(out) + HEADER, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        return out
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, HEADER + view.len)
        _put_header(PyBytes_AS_STRING(out), kind, type_, id_, deadline)
        memcpy(PyBytes_AS_STRING(out) + HEADER, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


cdef _check_fields(object kind, object type_, object id_, object deadline):
    # Ints (or __index__): a float is refused, not truncated to a C int.
    index(kind)
    index(type_)
    index(id_)
    index(deadline)
    if not 1 <= kind <= K_CONTROL:
        raise ValueError(f"kind must be 1-4, got {kind!r}")
    if not 0 <= type_ <= 0xFFFF:
        raise ValueError(f"type must be 0-65535, got {type_!r}")
    if not 0 <= id_ <= 0xFFFFFFFF:
        raise ValueError(f"id must be 0-4294967295, got {id_!r}")
    if not 0 <= deadline <= 0xFFFFFFFF:
        raise ValueError(f"deadline must be 0-4294967295 ms, got {deadline!r}")
    if deadline and kind != K_REQUEST:
        raise ValueError("only a request carries a deadline")


def pack_header(kind, type_, id_, deadline=0):
    """The 12-byte header of a message (flags 0)."""
    _check_fields(kind, type_, id_, deadline)
    return _message(kind, type_, id_, deadline, None)


def encode_message(kind, type_, id_, deadline, body):
    """Header and body as one ``bytes`` (the frame the router sends)."""
    _check_fields(kind, type_, id_, deadline)
    if body is None:
        raise TypeError("a message body must be bytes-like, not None")
    return _message(kind, type_, id_, deadline, body)


def parse_header(frame):
    """``(kind, type, id, deadline)`` of a message; ``HeaderError`` if it breaks the format."""
    cdef Py_buffer view
    cdef const uint8_t *p
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    try:
        if view.len < HEADER:
            raise short_message(view.len)
        p = <const uint8_t *>view.buf
        kind = p[0]
        error = header_error(kind, p[1], _u32(p + 8), view.len, None)
        if error is not None:
            raise error
        return kind, _u16(p + 2), _u32(p + 4), _u32(p + 8)
    finally:
        PyBuffer_Release(&view)


def error_body(code, message):
    """The body of an error reply: the 2-byte code, then the message in UTF-8."""
    index(code)  # an int: a float is refused, not truncated
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"an error code is 0-65535, got {code!r}")
    if not isinstance(message, str):
        raise TypeError(f"an error message is a str, not {type(message).__name__}")
    cdef unsigned int c = code
    cdef bytes text = message.encode("utf-8", "replace")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 2 + len(text))
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    p[0] = <uint8_t>(c >> 8)
    p[1] = <uint8_t>c
    memcpy(p + 2, PyBytes_AS_STRING(text), len(text))
    return out


def parse_error_body(body):
    """``(code, message)`` of an error reply's body (``HeaderError`` if under 2 bytes)."""
    cdef bytes data = bytes(body)
    if len(data) < 2:
        raise HeaderError(f"error reply body of {len(data)} bytes has no 2-byte error code")
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
    return _u16(p), data[2:].decode("utf-8", "replace")


cdef class Route:
    """One message type's handler, as the per-frame path needs it (see the twin)."""

    cdef readonly int type_id
    cdef readonly object handler
    cdef readonly object decode
    cdef readonly bint is_async
    cdef readonly uint64_t allowed
    cdef readonly str name

    def __init__(self, int type_id, handler, decode, bint is_async, uint64_t allowed, str name):
        self.type_id = type_id
        self.handler = handler
        self.decode = decode
        self.is_async = is_async
        self.allowed = allowed
        self.name = name


cdef class Session:
    """A router connection's own state: protocol state, requests in flight, backlog."""

    cdef public int state
    cdef public int in_flight
    cdef public object backlog
    cdef public bint failed
    cdef public bint draining
    cdef public object tasks

    def __init__(self, int state):
        self.state = state
        self.in_flight = 0
        self.backlog = None
        self.failed = False
        self.draining = False
        self.tasks = None


cdef class Dispatcher:
    """A router's callback: ``dispatcher(conn, frames) -> replies`` (see the twin)."""

    cdef object _router
    cdef list _routes
    cdef dict _replies
    cdef int _limit
    cdef int _initial
    cdef long long _max_frame

    def __init__(self, router, list routes, dict replies, int max_in_flight, int initial_state,
                 long long max_frame=-1):
        self._router = router
        self._routes = routes
        self._replies = replies
        self._limit = max_in_flight
        self._initial = initial_state
        self._max_frame = max_frame  # the largest reply frame the framing sends; -1: any

    def session(self, conn):
        """The connection's session, made on first use."""
        session = conn._session
        if session is None:
            session = conn._session = Session(self._initial)
        return session

    def __call__(self, conn, list frames):
        cdef Session session = conn._session
        if session is None:
            session = Session(self._initial)
            conn._session = session
        if session.failed:
            return None
        if session.backlog is not None:
            self._router._hold_more(conn, session, frames)  # a handler must finish first
            return None
        return self.run(conn, session, frames, 0, 0.0)

    cpdef run(self, conn, Session session, list frames, Py_ssize_t start, double read_at):
        """Answer ``frames[start:]`` in order; the replies that are ready at once.

        ``read_at`` is when the frames were read (``time.monotonic()``), for
        frames held back at the in-flight limit; 0.0 for frames just read.
        """
        cdef object router = self._router
        cdef list routes = self._routes
        cdef Py_ssize_t nroutes = len(routes)
        cdef list replies = []
        cdef Py_ssize_t count = len(frames)
        cdef Py_ssize_t i = start
        cdef Py_ssize_t size
        cdef const uint8_t *p
        cdef int kind, flags
        cdef uint32_t type_, id_, deadline
        cdef object frame, reply, route_obj
        cdef Route route
        while i < count:
            frame = frames[i]
            size = PyBytes_GET_SIZE(frame)
            if size < HEADER:
                router._malformed(conn, session, replies, short_message(size))
                return None
            p = <const uint8_t *>PyBytes_AS_STRING(frame)
            kind = p[0]
            flags = p[1]
            type_ = _u16(p + 2)
            id_ = _u32(p + 4)
            deadline = _u32(p + 8)
            if kind != K_REQUEST or flags:
                if flags or deadline or kind != K_CONTROL:
                    router._malformed(
                        conn, session, replies, header_error(kind, flags, deadline, size, True)
                    )
                    return None
                reply = router._control(conn, session, type_, id_)
                if reply is not None:
                    replies.append(reply)
                i += 1
                continue
            if session.in_flight >= self._limit:
                router._hold(conn, session, frames, i, read_at)
                break
            route_obj = routes[type_] if type_ < nroutes else None
            if route_obj is None:
                reply = router._request(
                    conn, session, None, type_, id_, deadline, frame, read_at
                )
            else:
                route = <Route>route_obj
                if deadline or not ((route.allowed >> session.state) & 1):
                    reply = router._request(
                        conn, session, route, type_, id_, deadline, frame, read_at
                    )
                else:
                    reply = self._call(conn, session, route, id_, frame, size)
            if reply is not None:
                replies.append(reply)
            i += 1
        return replies

    cdef object _call(self, conn, Session session, Route route, uint32_t id_, object frame,
                      Py_ssize_t size):
        # The common path: no deadline, an allowed type. Decode, call, encode.
        cdef object router = self._router
        cdef object body = PyBytes_FromStringAndSize(PyBytes_AS_STRING(frame) + HEADER, size - HEADER)
        cdef object msg, result, coro, context
        cdef PyObject *sent = NULL
        cdef int status
        if route.decode is not None:
            try:
                msg = route.decode(body)
            except Exception as exc:
                return router._decode_failed(conn, route, id_, exc)
        else:
            msg = body
        if route.is_async:
            context = PyContext_CopyCurrent()
            try:
                coro = route.handler(conn, msg)
                PyContext_Enter(context)
                try:
                    status = PyIter_Send(coro, None, &sent)
                finally:
                    PyContext_Exit(context)
            except (Exception, CancelledError) as exc:  # CancelledError: the handler's own
                return router._failed(conn, route, id_, exc)
            result = <object>sent
            Py_XDECREF(sent)
            if status != 0:  # PYGEN_NEXT: it awaits something
                router._suspended(conn, session, route, id_, coro, result, context, None)
                return None
        else:
            try:
                result = route.handler(conn, msg)
            except (Exception, CancelledError) as exc:  # CancelledError: the handler's own
                return router._failed(conn, route, id_, exc)
        if not id_:
            return None
        return self.reply(conn, route, id_, result)

    cpdef reply(self, conn, Route route, uint32_t id_, object result):
        """The reply frame for a handler's result (``INTERNAL`` error reply if it cannot be)."""
        cdef object frame = self._reply(conn, route, id_, result)
        if self._max_frame >= 0 and frame is not None and len(frame) > self._max_frame:
            exc = FrameTooLarge(len(frame), self._max_frame)
            return self._router._unencodable(conn, route, id_, result, exc)
        return frame

    cdef object _reply(self, conn, Route route, uint32_t id_, object result):
        cdef object entry, body
        if result is None or type(result) is bytes:
            return _message(K_REPLY, 0, id_, 0, result)
        entry = self._replies.get(type(result))
        if entry is not None:
            try:
                body = (<tuple>entry)[1](result)
                if body is None:
                    raise TypeError("the codec's encoder returned None")
                return _message(K_REPLY, (<tuple>entry)[0], id_, 0, body)
            except Exception as exc:
                return self._router._unencodable(conn, route, id_, result, exc)
        try:
            return _message(K_REPLY, 0, id_, 0, result)
        except (TypeError, BufferError) as exc:
            return self._router._unencodable(conn, route, id_, result, exc)
