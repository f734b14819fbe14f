"""Exception hierarchy shared by both codec backends and the asyncio layer.

Both ``fastnet._frame`` (Cython) and ``fastnet._frame_py`` (pure Python) raise
these classes, so ``except FrameError`` works whichever backend is active, and
the messages are built here once so that both backends produce the same text.
"""

from __future__ import annotations

__all__ = [
    "ConnectionBrokenError",
    "ConnectionBusyError",
    "ConnectionClosedError",
    "FastnetError",
    "FrameError",
    "FrameTooLarge",
    "IncompleteFrame",
    "WriteBufferFull",
]


class FastnetError(Exception):
    """Base class of every exception fastnet raises on purpose."""


class FrameError(FastnetError, ValueError):
    """Raised by a decoder or encoder for input that breaks the framing rules.

    Attributes:
        frames: the frames a decoder completed earlier in the same call, in
            order. They were cut from the stream before the bad input, so the
            caller can still deliver them; nothing that preceded the error is
            lost. Empty for errors raised by encoders.
    """

    frames: list[bytes]

    def __init__(self, *args: object, frames: list[bytes] | None = None) -> None:
        super().__init__(*args)
        self.frames = [] if frames is None else frames


class FrameTooLarge(FrameError):
    """Raised when a frame's size exceeds its limit (``max_frame`` or ``max_length``).

    A length-prefixed decoder raises it as soon as the header is complete,
    before any buffer grows for the announced size. ``size`` and ``limit`` are
    kept in ``args``.
    """

    def __init__(self, size: int, limit: int, *, frames: list[bytes] | None = None) -> None:
        super().__init__(size, limit, frames=frames)
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return f"frame of {self.size} bytes exceeds the limit of {self.limit} bytes"


class IncompleteFrame(FrameError):
    """Raised by ``eof()`` when the stream ends inside a frame.

    ``pending`` (also ``args[0]``) is the number of bytes of the unfinished
    frame that had arrived.
    """

    def __init__(self, pending: int, *, frames: list[bytes] | None = None) -> None:
        super().__init__(pending, frames=frames)
        self.pending = pending

    def __str__(self) -> str:
        return f"stream ended inside a frame, {self.pending} bytes into it"


class ConnectionClosedError(FastnetError):
    """Raised by ``Connection`` methods used after this side closed the connection."""


class ConnectionBrokenError(FastnetError, ConnectionError):
    """Raised when the peer or the network ended the connection; chained ``from`` the OSError."""


class WriteBufferFull(FastnetError):
    """Raised by ``Connection.send``/``send_many`` while the transport holds more
    than ``max_write_buffer`` unsent bytes: the handler must ``await drain()``."""


class ConnectionBusyError(FastnetError, RuntimeError):
    """Raised when two tasks receive on one ``Connection`` at the same time."""


def negative_body(length: int, adjustment: int, *, frames: list[bytes] | None = None) -> FrameError:
    """The error for a length field whose adjusted body size is negative."""
    return FrameError(
        f"impossible header: length field {length} with adjustment {adjustment} "
        f"gives a body of {length + adjustment} bytes",
        frames=frames,
    )


def strip_past_end(strip: int, frame_size: int, *, frames: list[bytes] | None = None) -> FrameError:
    """The error for a frame shorter than the bytes to strip from its front."""
    return FrameError(
        f"impossible header: cannot strip {strip} bytes from a {frame_size}-byte frame",
        frames=frames,
    )


def negative_length_field(size: int, adjustment: int) -> FrameError:
    """The error for a payload too short to encode with a positive ``adjustment``."""
    return FrameError(
        f"cannot encode a {size}-byte payload: adjustment {adjustment} "
        f"gives a negative length field {size - adjustment}"
    )


def delimiter_in_payload(delimiter: bytes) -> FrameError:
    """The error for a line payload that contains its own delimiter."""
    return FrameError(f"cannot encode a line that contains the delimiter {delimiter!r}")
