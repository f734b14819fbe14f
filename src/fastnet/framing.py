"""Framing specs, and the one place that chooses the codec backend.

A framing spec is a small immutable value that describes a wire layout. It
makes streaming decoders (``spec.decoder()``) and encodes frames
(``spec.encode(payload)``, ``spec.encode_many(payloads)``). The work is done by
the backend classes ``LengthPrefixedDecoder``, ``LineDecoder``,
``LengthPrefixedEncoder`` and ``LineEncoder``, taken all from the Cython
extension ``fastnet._frame`` or all from its pure-Python twin
``fastnet._frame_py``; there is no hybrid mode. ``OutQueue``, the queue of
frames a connection sends, comes with them from ``fastnet._outq`` or
``fastnet._outq_py``. This module is the only one that imports either backend.

It also holds what the asyncio layer shares with the codecs: the ``Buffer``
type of a payload, and the sizes both backends use (``READ_SIZE``,
``MAX_READ``, ``DIRECT_THRESHOLD``, defined once in ``_tunables``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from . import _core_py, _frame_py, _message_py, _outq_py
from ._compat import USE_EXTENSIONS
from ._tunables import DIRECT_THRESHOLD as DIRECT_THRESHOLD
from ._tunables import MAX_READ as MAX_READ
from ._tunables import READ_SIZE as READ_SIZE

if TYPE_CHECKING or not USE_EXTENSIONS:
    from ._core_py import ConnectionCore as ConnectionCore
    from ._frame_py import (
        LengthPrefixedDecoder,
        LengthPrefixedEncoder,
        LineDecoder,
        LineEncoder,
    )
    from ._message_py import ALL_STATES as ALL_STATES
    from ._message_py import Dispatcher as Dispatcher
    from ._message_py import Route as Route
    from ._message_py import encode_message as encode_message
    from ._message_py import error_body as error_body
    from ._message_py import pack_header as pack_header
    from ._message_py import parse_error_body as parse_error_body
    from ._message_py import parse_header as parse_header
    from ._outq_py import OutQueue

    ACCELERATED = False
else:
    try:
        from ._core import ConnectionCore
        from ._frame import (
            LengthPrefixedDecoder,
            LengthPrefixedEncoder,
            LineDecoder,
            LineEncoder,
        )
        from ._message import (
            ALL_STATES,
            Dispatcher,
            Route,
            encode_message,
            error_body,
            pack_header,
            parse_error_body,
            parse_header,
        )
        from ._outq import OutQueue

        ACCELERATED = True
    except ImportError:  # built without the extension (FASTNET_NO_EXTENSIONS at install)
        from ._core_py import ConnectionCore
        from ._frame_py import (
            LengthPrefixedDecoder,
            LengthPrefixedEncoder,
            LineDecoder,
            LineEncoder,
        )
        from ._message_py import (  # noqa: F401  (re-exported: the router's backend)
            ALL_STATES,
            Dispatcher,
            Route,
            encode_message,
            error_body,
            pack_header,
            parse_error_body,
            parse_header,
        )
        from ._outq_py import OutQueue

        ACCELERATED = False

# Explicit backend aliases, for tests and benchmarks (aiohttp's HttpRequestParserPy/C).
LengthPrefixedDecoderPy = _frame_py.LengthPrefixedDecoder
LengthPrefixedEncoderPy = _frame_py.LengthPrefixedEncoder
LineDecoderPy = _frame_py.LineDecoder
LineEncoderPy = _frame_py.LineEncoder
OutQueuePy = _outq_py.OutQueue
ConnectionCorePy = _core_py.ConnectionCore
DispatcherPy = _message_py.Dispatcher
if ACCELERATED:
    LengthPrefixedDecoderC = LengthPrefixedDecoder
    LengthPrefixedEncoderC = LengthPrefixedEncoder
    LineDecoderC = LineDecoder
    LineEncoderC = LineEncoder
    OutQueueC = OutQueue
    ConnectionCoreC = ConnectionCore
    DispatcherC = Dispatcher

Buffer = bytes | bytearray | memoryview
"""A payload: any flat bytes-like object the codecs and ``Connection.send`` accept."""

# 8 MiB: large enough for any RPC message or file chunk a framed protocol
# normally carries, small enough that a hostile header cannot make a server
# reserve much memory per connection. A judgement call, like h11's 16 KiB.
DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024

# 64 KiB: a generous line for text protocols (Redis inline commands allow
# 64 KiB too); lines longer than this are almost always a missing delimiter.
DEFAULT_MAX_LINE_LENGTH = 64 * 1024

# Bounds that keep every size computation in both backends inside a signed
# 64-bit integer (a length field of 8 bytes plus an adjustment cannot
# overflow). 2**48 bytes is 256 TiB, far beyond any real frame.
MAX_SIZE_PARAMETER = 2**48

LENGTH_SIZES = (1, 2, 3, 4, 8)

# What a Lines decoder does with a line longer than max_length: raise
# FrameTooLarge (then skip it), or skip it silently; both count it.
ON_TOO_LONG = ("error", "skip")


class _DefaultMaxFrame(int):
    """The type of ``LengthPrefixed.max_frame``'s default, told apart from an explicit value.

    A default too large for a short length field is lowered to what the field
    can announce; the same value given explicitly is an error.
    """


_DEFAULT_MAX_FRAME = _DefaultMaxFrame(DEFAULT_MAX_FRAME_SIZE)


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclass(frozen=True)
class LengthPrefixed:
    """Frames preceded by an unsigned length field.

    Wire layout: ``offset`` header bytes, then a length field of
    ``length_size`` bytes (1, 2, 3, 4 or 8) in ``byteorder``, then a body of
    ``L + adjustment`` bytes, where ``L`` is the field's value. This is the
    convention Netty's LengthFieldBasedFrameDecoder and tokio-util's
    LengthDelimitedCodec share, so any existing layout can be described: a
    length that counts the header too is ``adjustment=-(offset + length_size)``.

    A decoded frame is the wire frame without its first ``strip`` bytes;
    ``strip=None`` means ``offset + length_size``, the body alone.
    ``max_frame`` bounds the body (``L + adjustment``); it is checked as soon as
    the header is complete, before any buffer grows for the announced size.
    By default it is ``DEFAULT_MAX_FRAME_SIZE`` (8 MiB), or the largest body
    the field can announce when that is less (65,535 bytes for a 2-byte field
    with no adjustment).

    A layout in which frames the limit allows cannot be written, or in which
    no frame is valid, is refused when the spec is made: a ``max_frame``
    larger than the field can announce (``2 ** (8 * length_size) - 1 +
    adjustment``), an ``adjustment`` larger than ``max_frame`` (every body
    would be too large), or a ``strip`` longer than the longest frame.

    Encoding writes the length field first, holding ``len(payload) -
    adjustment``, then the payload; ``offset`` and ``strip`` describe what a
    decoder skips and keeps, and do not change what ``encode`` writes (as in
    tokio-util).

    Args:
        length_size: size of the length field in bytes: 1, 2, 3, 4 or 8.
        byteorder: "big" (network order) or "little".
        offset: bytes before the length field.
        adjustment: added to the field's value to give the body size.
        strip: bytes removed from the front of each frame, or None for the
            whole header.
        max_frame: largest body accepted or produced.

    Raises:
        TypeError, ValueError: for a parameter of the wrong type or range, or
            an impossible combination (the message names the values).
    """

    length_size: int = 4
    byteorder: Literal["big", "little"] = "big"
    offset: int = 0
    adjustment: int = 0
    strip: int | None = None
    max_frame: int = _DEFAULT_MAX_FRAME
    encoder: LengthPrefixedEncoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.length_size not in LENGTH_SIZES or isinstance(self.length_size, bool):
            raise ValueError(f"length_size must be one of {LENGTH_SIZES}, got {self.length_size!r}")
        if self.byteorder not in ("big", "little"):
            raise ValueError(f"byteorder must be 'big' or 'little', got {self.byteorder!r}")
        _check_int("offset", self.offset, 0, MAX_SIZE_PARAMETER)
        _check_int("adjustment", self.adjustment, -MAX_SIZE_PARAMETER, MAX_SIZE_PARAMETER)
        if self.strip is not None:
            _check_int("strip", self.strip, 0, MAX_SIZE_PARAMETER)
        _check_int("max_frame", self.max_frame, 0, MAX_SIZE_PARAMETER)
        self._check_layout()
        object.__setattr__(self, "encoder", LengthPrefixedEncoder(self))

    def _check_layout(self) -> None:
        """Resolve the default ``max_frame``; refuse a layout no frame fits."""
        # The field holds 0 .. 2**(8*size)-1; the body is that plus adjustment.
        largest = (1 << (8 * self.length_size)) - 1 + self.adjustment
        field = f"a {self.length_size}-byte length field with adjustment {self.adjustment}"
        if largest < 0:
            raise ValueError(f"{field} announces only negative body sizes")
        if type(self.max_frame) is _DefaultMaxFrame:
            object.__setattr__(self, "max_frame", min(DEFAULT_MAX_FRAME_SIZE, largest))
        elif self.max_frame > largest:
            raise ValueError(
                f"max_frame {self.max_frame} does not fit {field}: "
                f"the largest body it can announce is {largest} bytes"
            )
        if self.adjustment > self.max_frame:
            raise ValueError(
                f"adjustment {self.adjustment} exceeds max_frame {self.max_frame}: "
                "every body would be too large"
            )
        if self.strip_size > self.header_size + self.max_frame:
            raise ValueError(
                f"strip {self.strip_size} exceeds the longest frame, header "
                f"{self.header_size} + max_frame {self.max_frame} bytes"
            )

    @property
    def header_size(self) -> int:
        """Bytes before the body: ``offset + length_size``."""
        return self.offset + self.length_size

    @property
    def strip_size(self) -> int:
        """Bytes removed from the front of each decoded frame (``strip`` resolved)."""
        return self.header_size if self.strip is None else self.strip

    def decoder(self) -> LengthPrefixedDecoder:
        """Return a new streaming decoder for this layout."""
        return LengthPrefixedDecoder(self)

    def encode(self, payload: Buffer) -> bytes:
        """Return one frame: the length field, then ``payload``.

        Raises:
            FrameTooLarge: the payload exceeds ``max_frame`` or its length
                does not fit the field.
            FrameError: ``len(payload) - adjustment`` is negative.
        """
        return self.encoder.encode(payload)

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        """Return the frames of all ``payloads`` as one bytes object.

        Raises:
            FrameTooLarge, FrameError: as ``encode``; nothing is returned
                when any payload is rejected.
        """
        return self.encoder.encode_many(payloads)

    @property
    def overhead(self) -> int:
        """Wire bytes ``encode`` adds to a payload: the length field."""
        return self.length_size

    def out_queue(self, unjoined_threshold: int = 0) -> OutQueue:
        """Return a new ``OutQueue`` encoding for this layout (see ``OutQueue``)."""
        return OutQueue(self.encoder, unjoined_threshold)


@dataclass(frozen=True)
class Lines:
    """Frames that end with a delimiter.

    With the default delimiter ``b"\\n"`` one trailing ``b"\\r"`` is removed as
    well, so ``\\r\\n`` and ``\\n`` both end a line (tokio-util's LinesCodec
    behaves this way). ``max_length`` counts the bytes before the delimiter,
    a stripped ``\\r`` included. As soon as more than ``max_length`` bytes have
    arrived without a delimiter, the line is over-long: the decoder discards
    input through the next delimiter and goes on decoding. With
    ``on_too_long="error"`` (the default) it raises ``FrameTooLarge`` for the
    line first (the next call goes on); with ``"skip"`` it raises nothing.
    Either way the decoder's ``skipped`` property counts the dropped lines.
    At end of stream an unterminated tail is returned as a last frame (a
    tail of exactly ``b"\\r"`` before a ``b"\\n"`` delimiter is none, as in
    tokio-util's LinesCodec).

    Args:
        delimiter: non-empty bytes that end a frame.
        max_length: longest line accepted or produced, delimiter excluded.
        strip: remove the delimiter (and, for ``b"\\n"``, a ``\\r`` before it)
            from decoded frames; ``False`` keeps the wire bytes.
        on_too_long: ``"error"`` or ``"skip"``: what decoding does with an
            over-long line (encoding always raises ``FrameTooLarge``).

    Raises:
        TypeError, ValueError: for a parameter of the wrong type or range.
    """

    delimiter: bytes = b"\n"
    max_length: int = DEFAULT_MAX_LINE_LENGTH
    strip: bool = True
    on_too_long: Literal["error", "skip"] = "error"
    encoder: LineEncoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.delimiter, bytes) or not self.delimiter:
            raise ValueError(f"delimiter must be non-empty bytes, got {self.delimiter!r}")
        _check_int("max_length", self.max_length, 0, MAX_SIZE_PARAMETER)
        if not isinstance(self.strip, bool):
            raise TypeError(f"strip must be a bool, not {type(self.strip).__name__}")
        if self.on_too_long not in ON_TOO_LONG:
            raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {self.on_too_long!r}")
        object.__setattr__(self, "encoder", LineEncoder(self))

    def decoder(self) -> LineDecoder:
        """Return a new streaming decoder for these lines."""
        return LineDecoder(self)

    def encode(self, payload: Buffer) -> bytes:
        """Return ``payload`` followed by the delimiter.

        Raises:
            FrameTooLarge: the payload is longer than ``max_length``.
            FrameError: the payload contains the delimiter.
        """
        return self.encoder.encode(payload)

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        """Return the lines of all ``payloads`` as one bytes object.

        Raises:
            FrameTooLarge, FrameError: as ``encode``; nothing is returned
                when any payload is rejected.
        """
        return self.encoder.encode_many(payloads)

    @property
    def overhead(self) -> int:
        """Wire bytes ``encode`` adds to a payload: the delimiter."""
        return len(self.delimiter)

    def out_queue(self, unjoined_threshold: int = 0) -> OutQueue:
        """Return a new ``OutQueue`` encoding these lines (the threshold is ignored)."""
        return OutQueue(self.encoder, unjoined_threshold)


Framing = LengthPrefixed | Lines
