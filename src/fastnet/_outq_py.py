"""Pure-Python twin of ``fastnet._outq``: the queue of frames a connection sends.

Strategy: a frame is validated and encoded when it is queued, not when the
batch is written, so a frame that cannot be encoded is refused in the caller
of ``send`` with nothing queued, and ``nbytes`` is the exact size of what will
be written. Encoded frames are copied into one ``bytearray`` with a fill
offset: slice assignment into room already there does not resize it. It
grows by doubling from ``INITIAL_SIZE`` and, after a batch has grown it past
``KEEP_SIZE``, goes back to ``KEEP_SIZE`` when the batch is taken. Once its
batch is taken (or cleared) a queue lends its buffer to the process: it puts
it in the one spare slot and keeps whatever buffer was there (none, mostly);
a queue that needs a buffer and has none takes the spare. So connections
that answer each read at once share one buffer, still in the CPU's caches,
and a quiet connection holds none (the extension's C buffer follows the
same policy, where it matters: see ``_outq.pyx``).

A length-prefixed payload of at least ``unjoined_threshold`` bytes that is a
flat byte buffer is not copied: its length field goes into the buffer, and
the payload object is remembered with the buffer offset it follows, so
``take`` returns ``[joined bytes, payload, joined bytes, ...]`` for one
vectored write.

This module is the reference for behaviour: ``_outq.pyx`` must give the same
bytes, the same errors and the same ``nbytes`` for every sequence of calls;
the test suite runs against both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._frame_py import LengthPrefixedEncoder, LineEncoder

if TYPE_CHECKING:
    from .framing import Buffer

__all__ = ["OutQueue"]

# Size of the buffer the first frame allocates: one page holds the replies
# to a typical read of small frames (16 pipelined 64-byte frames and their
# headers take 1.1 KiB) without regrowing, and costs a quiet connection that
# sends only small frames no more than one page.
INITIAL_SIZE = 4096

# Largest buffer kept once a batch is taken; a larger one goes back to this
# size. 64 KiB is one default receive window (READ_SIZE in _frame): the
# replies to a full read of small frames, the largest batch an echo or a
# request/response handler produces per read, fit without regrowing, so a
# busy connection allocates nothing per batch. Larger batches are rare
# (large payloads go out unjoined) and pay one allocation, small next to
# copying that many bytes. A connection that once sent a large batch keeps
# at most this much, not the size of its largest batch.
KEEP_SIZE = 65536

# The spare buffer: at most one, mostly (two threads lending at once may
# leave two). list.pop and list.append are atomic, so two queues never take
# the same buffer, free-threaded builds included.
_spare: list[bytearray] = []

# Bounds unjoined_threshold as framing.MAX_SIZE_PARAMETER bounds sizes.
MAX_THRESHOLD = 2**48

REENTRANT = "queue called re-entrantly, from a callback inside one of its own calls"


class OutQueue:
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

    __slots__ = (
        "_buf",
        "_busy",
        "_delimiter",
        "_encoder",
        "_header",
        "_lines",
        "_nbytes",
        "_nframes",
        "_refs",
        "_threshold",
        "_used",
    )

    def __init__(
        self, encoder: LengthPrefixedEncoder | LineEncoder, unjoined_threshold: int = 0
    ) -> None:
        if getattr(self, "_busy", False):
            raise RuntimeError(REENTRANT)
        if type(encoder) is LengthPrefixedEncoder:
            self._lines = False
        elif type(encoder) is LineEncoder:
            self._lines = True
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
        self._encoder = encoder
        self._threshold = 0 if self._lines else unjoined_threshold
        self._buf = bytearray()
        self._used = 0  # bytes of _buf in use
        self._nbytes = 0  # wire bytes queued: _used plus the unjoined payloads
        self._nframes = 0
        # [offset, payload, offset, payload, ...]: each unjoined payload
        # follows _buf[:offset] on the wire.
        self._refs: list[object] = []
        self._busy = False

    @property
    def nbytes(self) -> int:
        """Bytes the queued frames take on the wire: headers, payloads, delimiters."""
        return self._nbytes

    @property
    def nframes(self) -> int:
        """Number of frames queued."""
        return self._nframes

    def __len__(self) -> int:
        return self._nframes

    def __bool__(self) -> bool:
        return self._nframes > 0

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + self._buf.__sizeof__()

    def _grow(self, end: int) -> None:
        if not self._buf and _spare:
            with contextlib.suppress(IndexError):  # another thread took it
                self._buf = _spare.pop()
            if end <= len(self._buf):
                return
        size = max(len(self._buf), INITIAL_SIZE)
        while size < end:
            size *= 2
        self._buf += bytes(size - len(self._buf))

    def _add(self, frame: Buffer) -> None:
        encoder = self._encoder
        if type(frame) is bytes and not self._lines:
            size = len(frame)
            header = encoder.header(size)  # type: ignore[union-attr]
            if self._threshold and size >= self._threshold:
                self._keep(header, frame, size)
                return
            data = header + frame
        else:
            if type(frame) is not bytes:
                try:
                    view = memoryview(frame)
                except TypeError:  # in the words of the extension's PyObject_GetBuffer
                    raise TypeError(
                        f"a bytes-like object is required, not '{type(frame).__name__}'"
                    ) from None
                with view:
                    flat = view.ndim == 1 and view.itemsize == 1 and view.c_contiguous
                    size = view.nbytes
                if self._threshold and flat and size >= self._threshold:
                    self._keep(encoder.header(size), frame, size)  # type: ignore[union-attr]
                    return
            data = encoder.encode(frame)
        used = self._used
        end = used + len(data)
        if end > len(self._buf):
            self._grow(end)
        self._buf[used:end] = data
        self._used = end
        self._nbytes += end - used
        self._nframes += 1

    def _keep(self, header: bytes, frame: Buffer, size: int) -> None:
        """Queue ``header`` joined and ``frame`` unjoined, by reference."""
        used = self._used
        end = used + len(header)
        if end > len(self._buf):
            self._grow(end)
        self._buf[used:end] = header
        self._used = end
        self._refs.append(end)
        self._refs.append(frame)
        self._nbytes += len(header) + size
        self._nframes += 1

    def append(self, frame: Buffer, /) -> None:
        """Validate and encode one frame, and queue it.

        Raises:
            FrameTooLarge, FrameError, TypeError, BufferError: as
                ``encoder.encode(frame)``; nothing is queued.
            RuntimeError: called from a callback inside another call on
                this queue.
        """
        if self._busy:
            raise RuntimeError(REENTRANT)
        self._busy = True
        try:
            self._add(frame)
        finally:
            self._busy = False

    def extend(self, frames: Iterable[Buffer]) -> None:
        """Validate, encode and queue several frames: all of them or none.

        Raises:
            FrameTooLarge, FrameError, TypeError, BufferError: as
                ``encoder.encode`` for the first frame that cannot be
                encoded, or whatever iterating ``frames`` raises; nothing
                of this call stays queued.
            RuntimeError: called from a callback inside another call on
                this queue (for example from ``frames``' iterator).
        """
        if self._busy:
            raise RuntimeError(REENTRANT)
        self._busy = True
        used, nbytes, nframes, nrefs = self._used, self._nbytes, self._nframes, len(self._refs)
        try:
            for frame in frames:
                self._add(frame)
        except BaseException:
            self._used, self._nbytes, self._nframes = used, nbytes, nframes
            del self._refs[nrefs:]
            raise
        finally:
            self._busy = False

    def take(self) -> bytes | list[Buffer] | None:
        """Return everything queued, for one write, and empty the queue.

        Returns:
            None when nothing is queued; one bytes object when every frame
            was joined; otherwise a list of buffers in wire order, where
            each unjoined payload is the object that was queued, preceded by
            bytes that end with its length field.

        Raises:
            RuntimeError: called from a callback inside another call on
                this queue.
        """
        if self._busy:
            raise RuntimeError(REENTRANT)
        if not self._nframes:
            return None
        used = self._used
        # bytes(bytearray slice): two copies of a small batch cost less than a view.
        out = self._parts(used) if self._refs else bytes(self._buf[:used])
        self._reset()
        return out

    def _parts(self, used: int) -> list[Buffer]:
        """The queued buffers in wire order, each unjoined payload as its own."""
        parts: list[Buffer] = []
        refs = self._refs
        start = 0
        with memoryview(self._buf) as view:
            for i in range(0, len(refs), 2):
                offset = refs[i]
                assert isinstance(offset, int)
                if offset > start:
                    parts.append(bytes(view[start:offset]))
                parts.append(refs[i + 1])  # type: ignore[arg-type]
                start = offset
            if used > start:
                parts.append(bytes(view[start:used]))
        return parts

    def clear(self) -> None:
        """Drop every queued frame.

        Raises:
            RuntimeError: called from a callback inside another call on
                this queue.
        """
        if self._busy:
            raise RuntimeError(REENTRANT)
        self._reset()

    def _reset(self) -> None:
        self._used = self._nbytes = self._nframes = 0
        if self._refs:
            self._refs.clear()
        if len(self._buf) > KEEP_SIZE:
            self._buf = bytearray(KEEP_SIZE)
        if self._buf:  # lend it (see the module docstring)
            try:
                other = _spare.pop()
            except IndexError:
                other = bytearray()
            _spare.append(self._buf)
            self._buf = other
