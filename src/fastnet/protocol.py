"""``FrameProtocol``: the once-per-connection half of a connection's asyncio protocol.

A connection is one object with three layers (see docs/design.md, "Layout"):

- the **core** (``fastnet._core``, in Cython, or its twin ``_core_py``):
  the per-read and per-send path: ``get_buffer``/``buffer_updated``, the
  inbox and the wake-up of the handler, the out queue and the write, flow
  control, the counters;
- **this module**: what happens once per connection or less, in Python for
  both backends: choosing the transport strategy (``connection_made``, and
  again after ``start_tls``), the end of the input (the peer's FIN, a framing
  error, a failed callback handler), the lifecycle state and its
  transitions, the graceful finish that the server's supervisor starts;
- ``Connection`` (connection.py): what a handler calls.

Ending. A framing error first delivers the frames that preceded the bad
bytes, then stops reading and ends the input. A connection that breaks (a
write fails because the peer reset) first delivers what the socket still
holds (``leftover.py``). The end of the stream delivers
the decoder's last frames; a server's connection stays open for writing, so
the handler can still answer, and a client's closes. Either way the handler
sees the end after the queued frames (``async for`` ends, ``recv`` raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _reasons
from ._tunables import (
    DEFAULT_MAX_WRITE_BUFFER,
    LARGE_FRAME,
    PAUSE_BUSY,
    PAUSE_INBOX,
    PAUSE_RATE,
    PAUSE_STOP,
    READ_HIGH_BYTES,
    READ_HIGH_FRAMES,
    READ_SIZE,
)
from .errors import ConnectionBrokenError, ConnectionClosedError, FrameError, WriteBufferFull
from .leftover import LeftoverInput
from .lifecycle import CLOSED, CLOSING, OPEN, PEER_CLOSED, Lifecycle, check_transition
from .transports import TLS_STRATEGY, TransportStrategy, choose_strategy, extra_info

if TYPE_CHECKING:
    from ._core_py import ConnectionCore

    _Base = ConnectionCore
else:
    _Base = object

__all__ = [
    "DEFAULT_MAX_WRITE_BUFFER",
    "LARGE_FRAME",
    "READ_HIGH_BYTES",
    "READ_HIGH_FRAMES",
    "FrameProtocol",
    "Lifecycle",
    "WriteBufferFull",
]

logger = logging.getLogger("fastnet")

_SO_LINGER_RESET = struct.pack("ii", 1, 0)  # linger on, 0 s: close(2) sends RST


class FrameProtocol(asyncio.BufferedProtocol, _Base):
    """The asyncio protocol of one framed connection, apart from its per-read core.

    Subclassed by ``fastnet.Connection``; the connection core (``_core``)
    comes first in every connection's class, so its ``buffer_updated``,
    ``get_buffer``, ``pause_writing`` and ``resume_writing`` are what the
    transport calls. See the module docstring.
    """

    if TYPE_CHECKING:
        # A slot of each connection's class (connection._implementation): the
        # socket error that ended the connection, if one did.
        __slots__ = ("_leftover", "_lost_error")
        _lost_error: BaseException | None
        _leftover: LeftoverInput | None  # reading a broken connection's socket (leftover.py)
    else:
        __slots__ = ()

    # ------------------------------------------------------------ lifecycle

    @property
    def _closing(self) -> bool:
        # This side is closing, or the socket is closed.
        return self._lifecycle >= CLOSING

    @property
    def _lost(self) -> bool:
        return self._lifecycle == CLOSED

    def _move_to(self, state: int) -> None:
        """Change the lifecycle state; a transition the table does not allow raises."""
        check_transition(self._lifecycle, state)
        self._lifecycle = int(state)

    # ------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        self._use_transport(transport, choose_strategy(transport))

    def _use_strategy(self, strategy: TransportStrategy) -> None:
        self._use_transport(self._transport, strategy)

    def _set_transport(self, transport: asyncio.BaseTransport) -> None:
        """The connection now runs over ``transport`` (after ``start_tls``): choose again."""
        self._use_transport(transport, choose_strategy(transport))

    def _plain_strategy_for_tls(self) -> None:
        # Before a TLS handshake: joined writes and the transport's own reads.
        self._use_transport(self._transport, TLS_STRATEGY)

    def eof_received(self) -> bool | None:
        if self._lifecycle >= CLOSING:  # the peer's answer to our FIN (lingering close): done
            return False
        self._move_to(PEER_CLOSED)
        self._end_of_stream()
        if self._half_close and self._strategy.kind != "tls":
            # Keep the transport open for writing: the handler may still
            # answer the last requests of a peer that closed its sending side.
            return True
        if self._strategy.kind == "tls" and self._out:
            # TLS has no half-close here: the loop's TLS layer closes after
            # the peer's close_notify (it ignores True), writing out what
            # its transport holds; replies already queued go with it.
            self._flush()
        # A client: the server is done with us. Sends now raise at once, and
        # the transport closes (after writing what it holds), so
        # wait_closed() returns and pending calls end instead of hanging.
        if self._send_block is None:
            self._send_block = _reasons.peer_closed
        self._out.clear()
        return False

    def _end_of_stream(self) -> None:
        # The peer's stream ended: the frames still buffered are delivered,
        # and a frame cut off is a framing error (IncompleteFrame).
        try:
            frames = self._decoder.eof()
        except FrameError as exc:  # the stream ended inside a frame
            self._decoder_failed = True
            if exc.frames:
                self._queue_frames(exc.frames)
            self._report_frame_error(exc)
            self._input_ended(_reasons.broken_factory(exc), pause=False)
        else:
            if frames:
                self._queue_frames(frames)
            self._input_ended(_reasons.peer_closed, pause=False)

    def connection_lost(self, exc: Exception | None) -> None:
        closing = self._lifecycle >= CLOSING
        silent_eof = self._lifecycle == OPEN and exc is None
        self._move_to(CLOSED)
        if exc is not None:
            self._lost_error = exc
        if closing:
            self._input_ended(_reasons.closed_by_us, quiet=False, pause=False)
        elif silent_eof and self._decoder.pending and not self._decoder_failed:
            # The stream ended inside a frame with no eof_received first:
            # uvloop's TLS layer does this on a TCP FIN without close_notify
            # (asyncio's calls eof_received). The same framing error as there.
            self._end_of_stream()
        elif exc is None:
            self._input_ended(_reasons.peer_closed, pause=False)
        else:
            end = _reasons.broken_factory(exc)
            if isinstance(exc, OSError) and not self._decoder_failed and self._end is None:
                # A failed write (the peer went): what the socket still
                # holds came before the break (leftover.py).
                self._leftover = LeftoverInput.start(self, end)
            if self._leftover is None:
                self._input_ended(end, pause=False)
        if self._send_block is None:
            if closing:
                self._send_block = _reasons.closed_by_us
            elif exc is None:
                self._send_block = _reasons.peer_closed
            else:
                self._send_block = _reasons.broken_factory(exc)
        self._out.clear()
        self._wake_drain(exc)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            # asyncio's TLS transport on Python 3.10 is not marked closed when
            # the TLS layer closes the socket under it (after the peer's
            # close_notify), and warns (ResourceWarning) when it is collected.
            with contextlib.suppress(Exception):
                transport.close()
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _resume_leftover(self) -> None:
        # Called by the core's _unpause_reading once the transport is lost.
        leftover = self._leftover
        if leftover is not None:
            leftover.resume()

    # --------------------------------------------------- rare events of a read

    def _callback_failed(self, exc: Exception) -> None:
        """A callback handler raised (or returned a reply that cannot be encoded)."""
        self._out.clear()
        if not isinstance(exc, (ConnectionBrokenError, ConnectionClosedError)):
            self._handler_error = exc
        self._input_ended(_reasons.reraise_factory(exc), quiet=False)

    def _framing_failed(self, exc: FrameError) -> None:
        if self._lifecycle >= CLOSING and self._leftover is None:
            # Bad bytes after we closed (lingering): just go.
            self._transport.abort()
            return
        self._decoder_failed = True
        if exc.frames:  # complete frames that preceded the bad bytes: deliver them first
            self._queue_frames(exc.frames)
        self._report_frame_error(exc)
        self._input_ended(_reasons.broken_factory(exc))
        if self._server is None:
            # A client: the stream cannot be read past the bad bytes, and no
            # supervisor will close it. Close now: sends raise, wait_closed()
            # returns, and a server still writing is not left blocked.
            if self._send_block is None:
                self._send_block = _reasons.broken_factory(exc)
            self._abort()

    def _report_frame_error(self, exc: FrameError) -> None:
        server = self._server
        if server is not None:
            server.frame_error(self, exc)
        else:
            logger.debug("framing error from %s: %s", self.peer, exc)

    async def _wait_input_end(self) -> None:
        """Wait until no more frames will come (for callback handlers' supervisors)."""
        wakeup = self._wakeup
        while self._end is None:
            wakeup._asyncio_future_blocking = True
            await self._await_wakeup

    def _input_ended(
        self, exc_factory: Callable[[], Exception], *, quiet: bool = True, pause: bool = True
    ) -> None:
        """No more frames will come: ``recv`` raises ``exc_factory()`` after the queued ones."""
        leftover = self._leftover
        if leftover is not None:  # the input ends otherwise first: stop reading the rest
            self._leftover = None
            leftover.stop()
        if self._end is None:
            self._end = exc_factory
            self._end_quiet = quiet
        if pause:
            self._pause_reading(PAUSE_STOP)
        self._wakeup.wake_soon()

    # ------------------------------------------------- ending the connection

    def _finish(self) -> None:
        """End the connection gracefully (the server does this when the handler is done).

        Flush the replies, send FIN after them (``write_eof``), and read and
        discard whatever the peer still sends until its own FIN, then close.
        Closing at once instead, with unread input in the socket, would make
        the kernel send RST and drop the replies still in its send queue: a
        pipelining client would lose answers. The caller bounds the wait and
        aborts a peer that never closes.
        """
        if self._leftover is not None:  # the handler is done with the input
            self._input_ended(_reasons.closed_by_us, pause=False)
        if self._lifecycle >= CLOSING:  # closed by the handler, or failed, or lost
            return
        if self._out:
            self._flush()
        peer_eof = self._lifecycle == PEER_CLOSED
        self._mark_closing()
        transport = self._transport
        # Nothing to wait for when the peer already closed, nor after a
        # handler error (its replies were dropped). A framing error is no
        # reason: the replies to the frames before the bad bytes are owed,
        # and the bad frame's rest is still in the socket (the lingering
        # close reads past the decoder, see _read_on_discarding).
        failed = self._handler_error is not None
        if peer_eof or failed or not transport.can_write_eof():
            if self._strategy.kind == "tls":
                # close() sends close_notify, and the TLS layer must read the
                # peer's answer (or its EOF) to finish: on CPython 3.10 a
                # paused TLS transport pauses the socket under it, so the
                # close would wait out tls_shutdown_timeout.
                self._read_on_discarding()
                with contextlib.suppress(OSError, RuntimeError):
                    transport.resume_reading()
            transport.close()
            return
        self._read_on_discarding()
        try:
            transport.write_eof()
            transport.resume_reading()
        except (OSError, RuntimeError):  # the transport is already going away
            transport.close()

    def _read_on_discarding(self) -> None:
        # Closing: what still arrives is read and dropped unread, whatever
        # our buffer holds, without the decoder: one that failed takes no
        # more input, and bytes that do not frame must not turn the lingering
        # close into an abort (a reset drops the replies still unsent).
        self._on_frames = _discard
        self._set_reader(_sink_buffer, _sink_updated)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            # uvloop took get_buffer and buffer_updated when the protocol was
            # set (entry 5c of _internals.py): set it again for the new ones.
            transport.set_protocol(self)
        self._read_pauses_on_write = False
        self._read_paused = 0

    def _begin_shutdown(self) -> None:
        """The server is shutting down: stop reading; end the input after the queued frames."""
        self._input_ended(_reasons.shutting_down)

    def _idle_timeout(self) -> None:
        """Close a connection whose handler waited ``idle_timeout`` with no byte received."""
        self._input_ended(_reasons.idle_closed)
        self._abort()

    @property
    def _idle(self) -> bool:
        # The handler is waiting for frames (the idle timer runs only then,
        # like a read timeout that applies to a pending read) and no task
        # spawned on the connection is running.
        return self._wakeup._callback is not None and not self._tasks

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter = self._drain_waiter
        if waiter is None:
            return
        self._drain_waiter = None
        if waiter.done():
            return
        if exc is None and self._lifecycle != CLOSED:
            waiter.set_result(None)
        elif self._send_block is not None:
            waiter.set_exception(self._send_block())  # why sending ended, as send() says
        else:
            waiter.set_exception(_reasons.broken_factory(exc)())

    def _mark_closing(self) -> None:
        """This side is closing: sends and receives (after the queued frames) now raise."""
        if self._lifecycle < CLOSING:
            self._move_to(CLOSING)
        if self._send_block is None:
            self._send_block = _reasons.closed_by_us
        self._input_ended(_reasons.closed_by_us, quiet=False, pause=False)

    def _abort(self, reset: bool = False) -> None:
        """Close at once, discarding unsent data; with ``reset``, the peer sees a reset (RST).

        Without SO_LINGER 0 the kernel sends an orderly FIN when no input is
        waiting unread: right for a timeout on an idle connection, wrong for
        ``Connection.abort()``, where a peer could take an aborted exchange
        for a complete one.
        """
        self._out.clear()
        lost = self._lifecycle == CLOSED
        self._mark_closing()
        transport = self._transport
        sock = extra_info(transport, "socket") if reset and not lost else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Closed already: OSError, or ValueError from uvloop's stand-in
            # socket for a closed handle (fd -1).
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _SO_LINGER_RESET)
        transport.abort()

    # ----------------------------------------------------- supervisor hooks
    # Read by the server's one timer (supervisor.py) every tick, O(1) each;
    # nothing here runs per read.

    @property
    def _frame_pending(self) -> int:
        """Bytes received of a frame not yet complete (0 at a frame boundary).

        Nonzero means a frame is in progress: the frame deadline runs. 0 once
        the input has ended (nothing more will be read into that frame).
        """
        if self._end is not None or self._decoder_failed:
            return 0
        decoder = self._decoder
        return int(decoder.pending or decoder.missing)

    @property
    def _backpressured(self) -> bool:
        """Reading is paused by fastnet's own backpressure, not by the peer's silence.

        True while the handler has too many frames queued (it is busy: the
        connection is not idle), while the transport is over its write
        high-water mark (the peer is being sent replies; whether it takes
        them is output progress, which the supervisor watches), or while the
        peer is over its frames-per-second limit (``PAUSE_RATE``: its bytes
        wait in the kernel because fastnet will not read them yet; the pause
        ends by itself when the bucket refills), or while a Router's
        connection has its most handlers running (``PAUSE_BUSY``).
        """
        paused = self._read_paused & (PAUSE_INBOX | PAUSE_RATE | PAUSE_BUSY)
        return bool(paused) or self._write_paused

    @property
    def _buffered(self) -> int:
        """Bytes this connection holds: unsent output (out queue and transport) and input
        received since the handler last caught up (its inbox and a frame in progress)."""
        unsent = int(self.write_buffer_size)
        if self._inbox:
            return unsent + max(int(self.bytes_in - self._consumed_mark), 0)
        decoder = self._decoder
        return unsent + int(decoder.pending)

    @property
    def _write_backpressured(self) -> bool:
        """The transport is over its write high-water mark (the peer is slow to take our output)."""
        return bool(self._write_paused)

    def _timed_out(self, message: str) -> None:
        """Close at once for a timeout the supervisor enforces (frame deadline...).

        The handler's ``recv`` raises ``ConnectionClosedError(message)`` after
        the queued frames; the transport is aborted.
        """

        def factory() -> Exception:
            return ConnectionClosedError(message)

        self._input_ended(factory)
        self._abort()


# Where a closing connection's input goes: one buffer for all of them, since
# nothing ever reads what is written into it.
_SINK = memoryview(bytearray(READ_SIZE))


def _sink_buffer(sizehint: int) -> memoryview:
    return _SINK


def _sink_updated(nbytes: int) -> list[bytes]:
    return []


def _discard(conn: Any, frames: list[bytes]) -> None:
    """The ``_on_frames`` of a connection that is closing: input is dropped."""
