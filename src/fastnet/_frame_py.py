"""Pure-Python twin of ``fastnet._frame``: the same decoders and encoders.

Strategy: a decoder keeps the bytes that belong to no delivered frame in one
``bytearray``. Each ``feed`` appends, cuts every complete frame from the front,
and keeps a copy of the unfinished tail only, so no large buffer outlives a
large frame. ``get_buffer`` hands out a fresh
receive buffer and ``buffer_updated`` feeds what arrived in it. The buffer
behind a window of a large frame's missing bytes (which may be megabytes) is
an anonymous ``mmap``: the kernel commits its pages only as bytes are
written into it, as it does for the extension's frame object, so a bare
header announcing a large frame costs no memory up front. Decoders never
return ``None``: an incomplete frame stays buffered and the call returns the
frames completed so far, possibly none. Work per call is linear in the bytes
received: a line decoder remembers how far it has searched for a delimiter.

This module is the reference for behaviour. The extension ``_frame.pyx`` must
give the same frames, the same ``pending`` counts and the same errors for every
input and every chunking; the test suite runs against both.
"""

from __future__ import annotations

import mmap
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._tunables import DIRECT_ROOM, DIRECT_THRESHOLD, MAX_READ, READ_SIZE
from .errors import (
    FrameError,
    FrameTooLarge,
    IncompleteFrame,
    delimiter_in_payload,
    negative_body,
    negative_length_field,
    strip_past_end,
)

if TYPE_CHECKING:
    from .framing import Buffer, LengthPrefixed, Lines

__all__ = [
    "LengthPrefixedDecoder",
    "LengthPrefixedEncoder",
    "LineDecoder",
    "LineEncoder",
]

REENTRANT = "decoder called re-entrantly, from a callback inside one of its own calls"


def _contiguous(data: Buffer) -> bytes | memoryview:
    """The bytes of a bytes-like object, refusing non-contiguous buffers as C does."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data)
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view


def _as_bytes(data: Buffer) -> bytes:
    view = _contiguous(data)
    return view if isinstance(view, bytes) else view.tobytes()


class _Decoder:
    __slots__ = (
        "_buf",
        "_busy",
        "_direct_failed",
        "_failed",
        "_peek",
        "_peek_size",
        "_room",
        "_scratch",
        "_window",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        # A large frame's window reaches _room bytes past it, over the next
        # header (_peek_size bytes, if at most DIRECT_ROOM). Should a read end
        # that frame short of a whole header, the next window is only what
        # completes the header (_peek; see _frame.pyx).
        self._peek = False
        self._peek_size = 0
        self._room = 0  # _peek_size, or 0 past DIRECT_ROOM
        # Receive buffer behind the open window; kept between reads only
        # while a large frame is unfinished, so a slow sender costs no
        # reallocation per read. Dropped whenever a call closes the window
        # with no large frame under way, so a decoder that is not reading
        # keeps no receive buffer.
        self._scratch: bytearray | mmap.mmap | None = None
        # The receive buffer of a large frame could not be allocated: the
        # frame is received through ordinary windows, as in the extension,
        # until the next call tries again.
        self._direct_failed = False
        self._window = -1  # size of the open get_buffer() window; -1: none
        self._failed: FrameError | None = None
        self._busy = False  # inside a public call (a re-entrant call raises)

    @property
    def pending(self) -> int:
        """The number of received bytes that belong to no delivered frame yet."""
        return len(self._buf)

    @property
    def missing(self) -> int:
        """Bytes still missing from a large frame being received into its own object, or 0.

        While it is not 0, ``get_buffer`` opens a window of that many bytes
        and the next frame's header (direct receive); 0 when no such frame is
        under way.
        """
        return self._direct_missing()

    def _check(self) -> None:
        failed = self._failed
        if failed is not None:
            raise type(failed)(*failed.args)

    def _fail(self, exc: FrameError) -> FrameError:
        self._failed = exc
        self._buf.clear()
        return exc

    def _decode(self, out: list[bytes]) -> FrameError | None:
        raise NotImplementedError

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError(REENTRANT)
        self._busy = True

    def _pull(self, data: Buffer) -> list[bytes]:
        """feed() without the guard."""
        try:
            self._check()
            self._window = -1
            self._peek = False
            self._buf += _contiguous(data)
            out: list[bytes] = []
            exc = self._decode(out)
            if exc is not None:
                raise exc
            return out
        finally:
            self._settle_scratch()

    def _settle_scratch(self) -> None:
        """Keep a receive buffer only for a large unfinished frame, allocated as its header arrives.

        The extension allocates such a frame's object when its header is
        parsed; allocating the twin's buffer at the same point makes both
        agree on ``missing`` and on the windows when that allocation fails.
        """
        self._direct_failed = False
        missing = self._direct_missing()
        if not missing:
            self._scratch = None
        elif self._scratch is None or len(self._scratch) < missing + self._room:
            try:
                # Pages are committed as the kernel writes them, not up front.
                self._scratch = mmap.mmap(-1, missing + self._room)
            except (OSError, MemoryError, OverflowError):
                self._scratch = None
                self._direct_failed = True

    def feed(self, data: Buffer) -> list[bytes]:
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
        self._enter()
        try:
            return self._pull(data)
        finally:
            self._busy = False

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Return a writable buffer for the next receive (asyncio.BufferedProtocol).

        Args:
            sizehint: the size the caller would like, or -1 for any size.

        Returns:
            A writable memoryview of at least one byte: ``sizehint`` bytes
            (64 KiB for -1, at most 1 MiB); exactly the missing bytes of a
            large unfinished frame and the next frame's header; or, right
            after such a frame completed, no more than what completes the
            next frame's header. Write into its start, then call
            ``buffer_updated`` with the number of bytes written. The view is
            not to be used after that call: it may be part of a delivered frame.

        Raises:
            FrameError: the decoder has failed (see ``feed``).
        """
        want = READ_SIZE
        if sizehint > 0:  # a hint under MAX_READ must be an integer, as the extension converts it
            want = MAX_READ if sizehint >= MAX_READ else operator.index(sizehint)
        self._enter()
        try:
            self._check()
            missing = self._direct_missing()
            if missing:
                want = missing + self._room
            elif self._peek and len(self._buf) < self._peek_size:
                want = min(want, self._peek_size - len(self._buf))
            scratch = self._scratch
            if scratch is None or len(scratch) < want:
                # (A large frame's buffer exists already: see _settle_scratch.)
                scratch = self._scratch = bytearray(want)
            self._window = want
            return memoryview(scratch)[:want]
        finally:
            self._busy = False

    def _direct_missing(self) -> int:
        """Bytes still missing from a large unfinished frame, or 0."""
        return 0

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        """Take ``nbytes`` written into the last ``get_buffer`` and return complete frames.

        Returns, raises and handles errors as ``feed``.

        Raises:
            RuntimeError: no ``get_buffer`` call precedes this one.
            ValueError: ``nbytes`` is negative or larger than that buffer.
        """
        self._enter()
        try:
            if self._window < 0:
                raise RuntimeError("buffer_updated() called without get_buffer()")
            if not 0 <= nbytes <= self._window:
                raise ValueError(f"nbytes {nbytes} outside the buffer of {self._window} bytes")
            scratch = self._scratch
            assert scratch is not None
            missing = self._direct_missing()
            with memoryview(scratch) as view, view[:nbytes] as received:
                frames = self._pull(received)
            self._peek = 0 < missing <= nbytes
            return frames
        finally:
            self._busy = False


class LengthPrefixedDecoder(_Decoder):
    """Streaming decoder of length-prefixed frames.

    Args:
        spec: the ``fastnet.LengthPrefixed`` layout to decode.
    """

    __slots__ = ("_adjustment", "_header", "_max", "_offset", "_order", "_size", "_strip")

    def __init__(self, spec: LengthPrefixed) -> None:
        super().__init__()
        self._offset = spec.offset
        self._size = spec.length_size
        self._order = spec.byteorder
        self._adjustment = spec.adjustment
        self._strip = spec.strip_size
        self._max = spec.max_frame
        self._header = spec.offset + spec.length_size
        self._peek_size = max(self._header, self._strip)
        self._room = self._peek_size if self._peek_size <= DIRECT_ROOM else 0

    def _decode(self, out: list[bytes]) -> FrameError | None:
        buf = self._buf
        n = len(buf)
        pos = 0
        header = self._header
        strip = self._strip
        exc: FrameError | None = None
        with memoryview(buf) as view:
            while n - pos >= header:
                field = pos + self._offset
                length = int.from_bytes(view[field : field + self._size], self._order)
                body = length + self._adjustment
                if body < 0:
                    exc = negative_body(length, self._adjustment, frames=out)
                    break
                if body > self._max:
                    exc = FrameTooLarge(body, self._max, frames=out)
                    break
                size = header + body
                if strip > size:
                    exc = strip_past_end(strip, size, frames=out)
                    break
                if n - pos < size:
                    break
                out.append(view[pos + strip : pos + size].tobytes())
                pos += size
        if exc is not None:
            return self._fail(exc)
        if pos:
            self._buf = buf[pos:]
        return None

    def _direct_missing(self) -> int:
        buf = self._buf
        if len(buf) < self._header or self._direct_failed:
            return 0
        field = self._offset
        body = int.from_bytes(buf[field : field + self._size], self._order) + self._adjustment
        size = self._header + body
        if size - self._strip < DIRECT_THRESHOLD or len(buf) < self._strip:
            return 0
        return size - len(buf)

    def eof(self) -> list[bytes]:
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
            frames = self._pull(b"")
            if self._buf:
                raise self._fail(IncompleteFrame(len(self._buf), frames=frames))
            return frames
        finally:
            self._busy = False


class LineDecoder(_Decoder):
    """Streaming decoder of delimited lines.

    Args:
        spec: the ``fastnet.Lines`` layout to decode.
    """

    __slots__ = (
        "_crlf",
        "_delimiter",
        "_discarding",
        "_max",
        "_scanned",
        "_skip",
        "_skipped",
        "_strip",
    )

    def __init__(self, spec: Lines) -> None:
        super().__init__()
        self._delimiter = spec.delimiter
        self._max = spec.max_length
        self._strip = spec.strip
        self._crlf = spec.strip and spec.delimiter == b"\n"
        self._skip = spec.on_too_long == "skip"
        # Over-long lines dropped so far (the skipped property).
        self._skipped = 0
        # Bytes at the front of the buffer known to hold no delimiter start.
        self._scanned = 0
        # True after an over-long line, until its delimiter has gone by.
        self._discarding = False

    @property
    def skipped(self) -> int:
        """The number of over-long lines dropped so far (raised, or skipped silently)."""
        return self._skipped

    def _too_long(self, size: int, out: list[bytes]) -> FrameError | None:
        """Count an over-long line; the error to raise for it, or None to go on."""
        self._skipped += 1
        return None if self._skip else FrameTooLarge(size, self._max, frames=out)

    def _decode(self, out: list[bytes]) -> FrameError | None:
        buf = self._buf
        delimiter = self._delimiter
        keep = len(delimiter) - 1  # a delimiter may straddle two receives
        n = len(buf)
        pos = 0
        exc: FrameError | None = None
        with memoryview(buf) as view:
            while exc is None:
                if self._discarding:
                    end = buf.find(delimiter, pos)
                    if end < 0:
                        pos = max(pos, n - keep)
                        break
                    pos = end + len(delimiter)
                    self._discarding = False
                    continue
                end = buf.find(delimiter, pos + self._scanned)
                if end < 0:
                    # Bytes at the end that may begin a delimiter are not line bytes (yet).
                    partial = min(keep, n - pos)
                    while partial > 0 and buf[n - partial : n] != delimiter[:partial]:
                        partial -= 1
                    size = n - pos - partial
                    if size > self._max:
                        self._discarding = True
                        self._scanned = 0
                        pos = max(pos, n - keep)
                        exc = self._too_long(size, out)
                        continue
                    self._scanned = max(0, n - pos - keep)
                    break
                self._scanned = 0
                if end - pos > self._max:
                    size = end - pos
                    pos = end + len(delimiter)
                    exc = self._too_long(size, out)
                    continue
                if not self._strip:
                    out.append(view[pos : end + len(delimiter)].tobytes())
                elif self._crlf and end > pos and buf[end - 1] == 13:
                    out.append(view[pos : end - 1].tobytes())
                else:
                    out.append(view[pos:end].tobytes())
                pos = end + len(delimiter)
        if pos:
            self._buf = buf[pos:]
        return exc

    def eof(self) -> list[bytes]:
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
        self._enter()
        try:
            frames = self._pull(b"")
            tail = bytes(self._buf)
            discarding = self._discarding
            self._buf = bytearray()
            self._scanned = 0
            self._discarding = False
            if discarding or not tail:
                return frames
            if len(tail) > self._max:
                self._skipped += 1
                if self._skip:
                    return frames
                raise FrameTooLarge(len(tail), self._max, frames=frames)
            if self._crlf and tail[-1] == 13:
                tail = tail[:-1]
                if not tail:
                    return frames
            frames.append(tail)
            return frames
        finally:
            self._busy = False


class LengthPrefixedEncoder:
    """Encoder of length-prefixed frames.

    Args:
        spec: the ``fastnet.LengthPrefixed`` layout to encode.
    """

    __slots__ = ("_adjustment", "_field_max", "_max", "_order", "_size")

    def __init__(self, spec: LengthPrefixed) -> None:
        self._size = spec.length_size
        self._order = spec.byteorder
        self._adjustment = spec.adjustment
        self._max = spec.max_frame
        self._field_max = (1 << (8 * spec.length_size)) - 1

    def header(self, size: int) -> bytes:
        """Return the length field that precedes a payload of ``size`` bytes.

        Raises:
            FrameTooLarge: ``size`` exceeds ``max_frame`` or does not fit the field.
            FrameError: ``size - adjustment`` is negative.
        """
        if size > self._max:
            raise FrameTooLarge(size, self._max)
        value = size - self._adjustment
        if value < 0:
            raise negative_length_field(size, self._adjustment)
        if value > self._field_max:
            raise FrameTooLarge(value, self._field_max)
        return value.to_bytes(self._size, self._order)

    def encode(self, payload: Buffer) -> bytes:
        """Return one frame: the length field, then ``payload``.

        Raises:
            FrameTooLarge: the payload exceeds ``max_frame`` or its length
                does not fit the field.
            FrameError: ``len(payload) - adjustment`` is negative.
        """
        data = _as_bytes(payload)
        return self.header(len(data)) + data

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        """Return the frames of all ``payloads`` as one bytes object.

        Raises:
            FrameTooLarge, FrameError: as ``encode``; nothing is returned
                when any payload is rejected.
        """
        parts = []
        for payload in payloads:
            data = _as_bytes(payload)
            parts.append(self.header(len(data)))
            parts.append(data)
        return b"".join(parts)


class LineEncoder:
    """Encoder of delimited lines.

    Args:
        spec: the ``fastnet.Lines`` layout to encode.
    """

    __slots__ = ("_delimiter", "_max")

    def __init__(self, spec: Lines) -> None:
        self._delimiter = spec.delimiter
        self._max = spec.max_length

    def _check(self, data: bytes) -> None:
        if len(data) > self._max:
            raise FrameTooLarge(len(data), self._max)
        if self._delimiter in data:
            raise delimiter_in_payload(self._delimiter)

    def encode(self, payload: Buffer) -> bytes:
        """Return ``payload`` followed by the delimiter.

        Raises:
            FrameTooLarge: the payload is longer than ``max_length``.
            FrameError: the payload contains the delimiter.
        """
        data = _as_bytes(payload)
        self._check(data)
        return data + self._delimiter

    def encode_many(self, payloads: Iterable[Buffer]) -> bytes:
        """Return the lines of all ``payloads`` as one bytes object.

        Raises:
            FrameTooLarge, FrameError: as ``encode``; nothing is returned
                when any payload is rejected.
        """
        parts = []
        for payload in payloads:
            data = _as_bytes(payload)
            self._check(data)
            parts.append(data)
            parts.append(self._delimiter)
        return b"".join(parts)
