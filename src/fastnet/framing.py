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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from . import _frame_py, _outq_py
from ._compat import USE_EXTENSIONS

if TYPE_CHECKING or not USE_EXTENSIONS:
    from ._frame_py import (
        LengthPrefixedDecoder,
        LengthPrefixedEncoder,
        LineDecoder,
        LineEncoder,
    )
    from ._outq_py import OutQueue

    ACCELERATED = False
else:
    try:
        from ._frame import (
            LengthPrefixedDecoder,
            LengthPrefixedEncoder,
            LineDecoder,
            LineEncoder,
        )
        from ._outq import OutQueue

        ACCELERATED = True
    except ImportError:  # built without the extension (FASTNET_NO_EXTENSIONS at install)
        from ._frame_py import (
            LengthPrefixedDecoder,
            LengthPrefixedEncoder,
            LineDecoder,
            LineEncoder,
        )
        from ._outq_py import OutQueue

        ACCELERATED = False

# Explicit backend aliases, for tests and benchmarks (aiohttp's HttpRequestParserPy/C).
LengthPrefixedDecoderPy = _frame_py.LengthPrefixedDecoder
LengthPrefixedEncoderPy = _frame_py.LengthPrefixedEncoder
LineDecoderPy = _frame_py.LineDecoder
LineEncoderPy = _frame_py.LineEncoder
OutQueuePy = _outq_py.OutQueue
if ACCELERATED:
    LengthPrefixedDecoderC = LengthPrefixedDecoder
    LengthPrefixedEncoderC = LengthPrefixedEncoder
    LineDecoderC = LineDecoder
    LineEncoderC = LineEncoder
    OutQueueC = OutQueue

Buffer = bytes | bytearray | memoryview

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
        TypeError, ValueError: for a parameter of the wrong type or range.
    """

    length_size: int = 4
    byteorder: Literal["big", "little"] = "big"
    offset: int = 0
    adjustment: int = 0
    strip: int | None = None
    max_frame: int = DEFAULT_MAX_FRAME_SIZE
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
        object.__setattr__(self, "encoder", LengthPrefixedEncoder(self))

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


@dataclass(frozen=True)
class Lines:
    """Frames that end with a delimiter.

    With the default delimiter ``b"\\n"`` one trailing ``b"\\r"`` is removed as
    well, so ``\\r\\n`` and ``\\n`` both end a line (tokio-util's LinesCodec
    behaves this way). ``max_length`` counts the bytes before the delimiter,
    a stripped ``\\r`` included. As soon as more than ``max_length`` bytes have
    arrived without a delimiter the decoder raises ``FrameTooLarge``; it then
    discards input through the next delimiter and goes on decoding. At end of
    stream an unterminated tail is returned as a last frame.

    Args:
        delimiter: non-empty bytes that end a frame.
        max_length: longest line accepted or produced, delimiter excluded.
        strip: remove the delimiter (and, for ``b"\\n"``, a ``\\r`` before it)
            from decoded frames; ``False`` keeps the wire bytes.

    Raises:
        TypeError, ValueError: for a parameter of the wrong type or range.
    """

    delimiter: bytes = b"\n"
    max_length: int = DEFAULT_MAX_LINE_LENGTH
    strip: bool = True
    encoder: LineEncoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.delimiter, bytes) or not self.delimiter:
            raise ValueError(f"delimiter must be non-empty bytes, got {self.delimiter!r}")
        _check_int("max_length", self.max_length, 0, MAX_SIZE_PARAMETER)
        if not isinstance(self.strip, bool):
            raise TypeError(f"strip must be a bool, not {type(self.strip).__name__}")
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


Framing = LengthPrefixed | Lines
