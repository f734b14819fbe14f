"""The input a broken connection's socket still holds, read and delivered after the break.

When a write fails because the peer went (it reset the connection, or closed
a Unix socket), the event loop's transport gives the socket up at once
(``_internals`` 5f): it stops reading and calls ``connection_lost``, with
what the peer sent before it went still unread in the socket. The peer saw
that input acknowledged and counts it delivered: a producer that closes
without reading our acknowledgements resets the connection just so, and lost
all but the first frames of its last burst.

That input comes first in the stream, so ``connection_lost`` hands the socket
(a duplicate of its descriptor: the transport closes its own right after the
callback) to a ``LeftoverInput``, which reads it as the transport would have:
one read per loop turn, through the connection's own ``get_buffer`` and
``buffer_updated``, so the decoder, a callback handler, the inbox's marks,
the frame-rate limit and the metrics see ordinary reads; reading waits while
the connection is paused for any reason but writing (writes are over). The
input ends (``ConnectionBrokenError``, as the break) when the socket is
drained; replies to it have nowhere to go and are dropped.

The kernel bounds the input (the receive buffer: 6 MiB by default on Linux),
and so does ``SALVAGE_BYTES``. Another end of input first (a framing error,
the server's shutdown or a timeout, the handler returning) stops the reading
and closes the descriptor (``stop``). Only on the transports fastnet knows
(CPython's selector socket transport, uvloop's TCP and Unix ones): a TLS
transport's socket holds records its layer never decrypted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from ._tunables import PAUSE_BUSY, PAUSE_FAIR, PAUSE_INBOX, PAUSE_RATE, READ_SIZE, SALVAGE_BYTES
from .listener import format_peer
from .transports import extra_info

__all__ = ["LeftoverInput"]

logger = logging.getLogger("fastnet")

# What makes reading wait (a transport would be paused): not PAUSE_WRITE,
# since nothing is written any more, nor PAUSE_STOP, which comes with an end
# of input that stops the reading anyway.
_WAIT = PAUSE_INBOX | PAUSE_FAIR | PAUSE_RATE | PAUSE_BUSY


class LeftoverInput:
    """Reads one broken connection's remaining input, a read per loop turn (module docstring)."""

    __slots__ = ("_conn", "_end", "_fd", "_handle", "_left", "_loop")

    def __init__(self, conn: Any, fd: int, end: Callable[[], Exception]) -> None:
        self._conn = conn
        self._fd = fd
        self._end = end
        self._left = SALVAGE_BYTES
        self._loop: asyncio.AbstractEventLoop = conn._loop
        self._handle: asyncio.Handle | None = self._loop.call_soon(self._read)

    @classmethod
    def start(cls, conn: Any, end: Callable[[], Exception]) -> LeftoverInput | None:
        """Begin reading ``conn``'s socket, or None where that cannot be done (docstring).

        ``end`` makes the exception the input ends with once it is read.
        """
        if conn._strategy.kind not in ("selector", "uvloop"):
            return None
        sock = extra_info(conn._transport, "socket")
        try:
            fd = os.dup(sock.fileno())
        except (AttributeError, OSError, ValueError):  # no socket, or closed already
            return None
        os.set_blocking(fd, False)
        # uvloop: stay on the connection's own get_buffer; it must not make
        # the closed transport read plain again.
        conn._reading_plain = True
        return cls(conn, fd, end)

    def resume(self) -> None:
        """The connection resumed reading (``_unpause_reading``): read on, next loop turn."""
        if self._handle is None and self._fd >= 0:
            self._handle = self._loop.call_soon(self._read)

    def stop(self) -> None:
        """Stop reading and close the descriptor; nothing more is delivered."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # A connection dropped while its reading waited (every end of input
        # stops it first; this is the backstop): the descriptor is not leaked.
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _read(self) -> None:
        self._handle = None
        conn = self._conn
        if self._fd < 0:
            return
        if conn._read_paused & _WAIT:
            return  # resume() comes with the unpause
        nbytes = 0
        if self._left > 0:
            buf = conn.get_buffer(min(READ_SIZE, self._left))
            try:
                nbytes = os.readv(self._fd, (buf,))
            except OSError:  # drained (EAGAIN), or the reset itself
                nbytes = 0
        else:
            peer = format_peer(conn.peer)
            logger.info(
                "%s: %d bytes read after the connection broke; the rest is dropped",
                peer,
                SALVAGE_BYTES,
                extra={"peer": peer},
            )
        if not nbytes:
            self._finish()
            return
        self._left -= nbytes
        conn.buffer_updated(nbytes)  # may end the input (a framing error): stop() then
        if self._fd >= 0 and self._handle is None:
            self._handle = self._loop.call_soon(self._read)

    def _finish(self) -> None:
        # All read: the input ends as the break ended it.
        self.stop()
        conn = self._conn
        if conn._leftover is self:
            conn._leftover = None
            conn._input_ended(self._end, pause=False)
