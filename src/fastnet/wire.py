"""The router's wire format: message header, kinds, control codes, error codes.

This is the specification another language can implement; the README's router
section repeats it. Every message is one frame of ``LengthPrefixed()``: a
4-byte big-endian length counting the bytes after it, then a 12-byte header,
then the body. All header integers are unsigned and big-endian::

    offset  size  field
    0       1     kind      1 request, 2 reply, 3 error reply, 4 control
    1       1     flags     0; every other value is reserved and refused
    2       2     type      request: the message type (1-65535)
                            reply: the reply's message type; 0 = an untyped body
                            error reply: the request's type
                            control: the control code (below)
    4       4     id        request: 0 = one-way (no reply of any kind), else the id
                            the reply will carry; reply, error reply: the request's
                            id; control: the ping's id in a ping and its pong, else 0
    8       4     deadline  request: milliseconds the sender will wait, counted from
                            when the receiver reads it; 0 = none. Other kinds: 0
    12      ...   body      request, reply: the message, encoded by the body codec
                            error reply: a 2-byte error code, then a UTF-8 message
                            control: empty

A request with an id gets exactly one answer with that id, a reply or an error
reply. The answers to pipelined requests may come back in any order: a server
runs requests concurrently, up to a per-connection limit beyond which it stops
reading (backpressure, not an error). Ids are the client's business: a server
does not check that the ids in flight on a connection are distinct.

Control codes: 1 ping (the receiver answers pong with the same id), 2 pong,
3 drain (sent by a server that is shutting down: send no new requests on this
connection, collect the answers still due, then close it; the server keeps
reading and answering until the client closes or its drain grace ends).
Unknown control codes are ignored, so later versions can add some.

A header that breaks these rules (a frame shorter than 12 bytes, an unknown
kind, non-zero flags, a deadline or error body outside their kinds, a kind the
receiver never accepts: a server takes requests and control messages, a client
replies, error replies and control messages) is a framing error: the receiver
closes the connection after answering the messages before it. An unknown
message type, a body the codec cannot decode, a handler's error or a deadline
exceeded are answered with an error reply, and the connection stays open.

Error codes 1-255 are the router's (``ErrorCode``); 256-65535 are the
application's (``RequestError(message, code=...)``).
"""

from __future__ import annotations

import enum

from .errors import FastnetError, FrameError

__all__ = [
    "CONTROL",
    "DRAIN",
    "ERROR",
    "HEADER_SIZE",
    "MAX_DEADLINE_MS",
    "MAX_ID",
    "MAX_TYPE",
    "PING",
    "PONG",
    "REPLY",
    "REQUEST",
    "DeadlineExceeded",
    "DecodeFailed",
    "ErrorCode",
    "Forbidden",
    "HeaderError",
    "InternalError",
    "Overloaded",
    "RequestError",
    "UnknownMessageType",
    "header_error",
    "short_message",
]

HEADER_SIZE = 12
MAX_TYPE = 0xFFFF
MAX_ID = 0xFFFFFFFF
MAX_DEADLINE_MS = 0xFFFFFFFF

# Kinds.
REQUEST = 1
REPLY = 2
ERROR = 3
CONTROL = 4

# Control codes.
PING = 1
PONG = 2
DRAIN = 3


def short_message(size: int) -> HeaderError:
    """The error for a message shorter than its header."""
    return HeaderError(f"message of {size} bytes is shorter than the 12-byte header")


def header_error(
    kind: int, flags: int, deadline: int, size: int, server: bool | None
) -> HeaderError | None:
    """The first rule a header breaks, or None.

    ``server`` says who reads it: True for a server (requests and control
    messages only), False for a client (replies, error replies and control
    messages), None for neither (any kind).
    """
    if not REQUEST <= kind <= CONTROL:
        return HeaderError(f"unknown message kind {kind}")
    if flags:
        return HeaderError(f"reserved header flags set: 0x{flags:02x}")
    if deadline and kind != REQUEST:
        return HeaderError(f"a message of kind {kind} carries a deadline")
    if kind == ERROR and size < HEADER_SIZE + 2:
        return HeaderError("error reply without its 2-byte error code")
    if server is not None and kind != CONTROL and (kind == REQUEST) != server:
        if server:
            return HeaderError(f"a server does not accept messages of kind {kind} (replies)")
        return HeaderError("a client does not accept requests")
    return None


class ErrorCode(enum.IntEnum):
    """The router's error codes (1-255); an application's own codes are 256-65535."""

    UNKNOWN_TYPE = 1  # no handler for the request's message type
    DECODE_ERROR = 2  # the body codec could not decode the request's body
    HANDLER_ERROR = 3  # the handler raised RequestError (an application error)
    INTERNAL = 4  # the handler raised anything else, or returned what cannot be encoded
    DEADLINE_EXCEEDED = 5  # the request's deadline passed before its reply was ready
    FORBIDDEN = 6  # the message type is not allowed in the connection's protocol state
    OVERLOADED = 7  # the server sheds load; the request was not run


class HeaderError(FrameError):
    """A message header that breaks the wire format: a framing error, the connection closes."""


class RequestError(FastnetError):
    """An error reply: raised by a handler to answer with it, raised by a call that got one.

    Args:
        message: the text sent to the client (UTF-8).
        code: an ``ErrorCode`` or an application code (256-65535);
            ``HANDLER_ERROR`` by default.

    A client raises the subclass of the code (``DeadlineExceeded``,
    ``Overloaded``, ...), or ``RequestError`` itself for the others.
    """

    default_code = ErrorCode.HANDLER_ERROR

    def __init__(self, message: str = "", code: int | None = None) -> None:
        if code is None:
            code = self.default_code
        if not isinstance(code, int) or not 1 <= code <= 0xFFFF:
            raise ValueError(f"an error code is an int from 1 to 65535, got {code!r}")
        super().__init__(message, code)
        self.message = message
        self.code = int(code)

    def __str__(self) -> str:
        try:
            name = ErrorCode(self.code).name
        except ValueError:
            name = str(self.code)
        return f"[{name}] {self.message}" if self.message else f"[{name}]"

    @staticmethod
    def from_reply(code: int, message: str) -> RequestError:
        """The exception an error reply with ``code`` stands for."""
        cls = _BY_CODE.get(code, RequestError)
        return cls(message, code)


class UnknownMessageType(RequestError):
    """No handler for the request's message type (``ErrorCode.UNKNOWN_TYPE``)."""

    default_code = ErrorCode.UNKNOWN_TYPE


class DecodeFailed(RequestError):
    """The body codec could not decode the request's body (``ErrorCode.DECODE_ERROR``)."""

    default_code = ErrorCode.DECODE_ERROR


class InternalError(RequestError):
    """The handler failed (``ErrorCode.INTERNAL``); the server logged the cause."""

    default_code = ErrorCode.INTERNAL


class DeadlineExceeded(RequestError, TimeoutError):
    """The request's deadline passed before its reply (``ErrorCode.DEADLINE_EXCEEDED``).

    A ``TimeoutError`` too: a client raises it when the call's timeout passes.
    """

    default_code = ErrorCode.DEADLINE_EXCEEDED


class Forbidden(RequestError):
    """Not allowed in the connection's protocol state (``ErrorCode.FORBIDDEN``)."""

    default_code = ErrorCode.FORBIDDEN


class Overloaded(RequestError):
    """The server is shedding load and did not run the request (``ErrorCode.OVERLOADED``)."""

    default_code = ErrorCode.OVERLOADED


_BY_CODE: dict[int, type[RequestError]] = {
    cls.default_code: cls
    for cls in (
        UnknownMessageType,
        DecodeFailed,
        InternalError,
        DeadlineExceeded,
        Forbidden,
        Overloaded,
    )
}
