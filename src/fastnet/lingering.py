"""The lingering close, on both sides: FIN after our data, then close when that cannot lose it.

Closing a TCP socket with unread input makes the kernel send RST and throw
away whatever of our data it has not delivered yet; input that arrives after
the close does the same. So a connection that ends is closed in two steps:
``_finish()`` (``protocol.py``) flushes, sends FIN after the data
(``write_eof``) and reads on, dropping what still comes; then a ``Lingering``
closes the transport as soon as nothing can be lost: the peer closed too (its
FIN closes the transport at once), or every byte we sent is acknowledged
(Linux: ``SIOCOUTQ``; elsewhere, the peer has sent nothing for
``LINGER_QUIET`` seconds, as nginx's ``lingering_timeout``). A peer that does
neither (it stopped reading) is aborted after ``CLOSE_LINGER`` seconds.

Acknowledged data is safe from the reset: Linux hands the receiving
application what it has acknowledged before it reports the reset.

The supervisor lingers after every handler (the replies a pipelining client
has not read yet); a client connection lingers after ``close()`` (the requests
a producer sent just before it closed, while replies arrived unread).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from .listener import format_peer
from .transports import extra_info

try:  # imported once, here: a lazy import can fail later with EMFILE
    import fcntl
    import termios
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    termios = None  # type: ignore[assignment]

__all__ = ["CLOSE_LINGER", "Lingering", "send_queue", "unacknowledged_probe"]

logger = logging.getLogger("fastnet")

# After the handler returns (or a client closes), the connection still writes
# what it buffers, sends FIN, and waits for the peer's FIN. A peer that never
# reads, or never closes, would keep it (and its slot) forever, so it is
# aborted after this many seconds: long enough for a slow client to take a
# large last reply. During a server's shutdown, the drain timeout bounds it too.
CLOSE_LINGER = 30.0

# A lingering close ends on events (the peer's FIN or a lost connection
# close it at once); what no event announces (our write buffer and the
# kernel's send queue emptying) is checked by a timer that starts at a
# fiftieth of a second and doubles up to a second: a peer that takes our
# last data at once is closed within tens of milliseconds, and one that
# never reads costs about 30 checks over CLOSE_LINGER instead of 1,500.
LINGER_POLL_MIN = 0.02
LINGER_POLL_MAX = 1.0
# Without SIOCOUTQ, a lingering connection whose peer has sent nothing for
# this long is closed without waiting for its FIN (nginx waits 5 s by
# default; a shutdown waits for this, so it is shorter here).
LINGER_QUIET = 0.5


def unacknowledged_probe(transport: asyncio.BaseTransport) -> Callable[[], int] | None:
    """A function returning the bytes of the socket's send queue not yet acknowledged.

    Linux only (the SIOCOUTQ ioctl, which is TIOCOUTQ's number); None elsewhere
    or for sockets that are not TCP.
    """
    if not sys.platform.startswith("linux") or fcntl is None or termios is None:
        return None
    sock = extra_info(transport, "socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    fd = sock.fileno()
    ioctl = fcntl.ioctl
    request = termios.TIOCOUTQ

    def unacknowledged() -> int:
        try:
            raw = ioctl(fd, request, b"\0\0\0\0")
        except OSError:
            return 0  # the socket is gone: nothing left to lose
        return int.from_bytes(raw, sys.byteorder, signed=True)

    return unacknowledged


def send_queue(transport: asyncio.BaseTransport) -> int:
    """The socket's unacknowledged bytes (Linux, TCP), or 0 where they cannot be known."""
    probe = unacknowledged_probe(transport)
    return 0 if probe is None else probe()


class Lingering:
    """One lingering close: timer callbacks with back-off, on a connection ``_finish()`` ended.

    Closes the transport when that cannot lose our data (our buffer is empty
    and the kernel holds nothing unacknowledged, or, without SIOCOUTQ, the
    peer has been quiet for LINGER_QUIET), aborts it after ``limit`` seconds.
    Any error aborts the transport and is logged; nothing escapes. ``what``
    names the data in the log line of an abort.
    """

    __slots__ = (
        "_conn",
        "_deadline",
        "_handle",
        "_interval",
        "_loop",
        "_probe",
        "_quiet",
        "_seen",
        "_what",
    )

    def __init__(
        self,
        conn: Any,
        loop: asyncio.AbstractEventLoop,
        limit: float = CLOSE_LINGER,
        what: str = "its last replies",
    ) -> None:
        self._conn = conn
        self._loop = loop
        self._what = what
        self._probe = unacknowledged_probe(conn._transport)
        now = loop.time()
        self._deadline = now + limit
        self._seen = conn.bytes_in
        self._quiet = now  # since when the peer has sent nothing
        self._interval = LINGER_POLL_MIN
        self._handle: asyncio.TimerHandle | None = loop.call_later(self._interval, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        conn = self._conn
        try:
            if conn._lost:
                return
            now = self._loop.time()
            if now >= self._deadline:
                peer = format_peer(conn.peer)
                logger.info("%s did not take %s; aborted", peer, self._what, extra={"peer": peer})
                conn.abort()
                return
            transport = conn._transport
            if conn.bytes_in != self._seen:
                self._seen = conn.bytes_in
                self._quiet = now
            # Closing already, or data still in our buffer: look again later.
            if not transport.is_closing() and not transport.get_write_buffer_size():
                probe = self._probe
                safe = probe() == 0 if probe is not None else now - self._quiet >= LINGER_QUIET
                if safe:
                    transport.close()
                    return
            self._interval = min(self._interval * 2, LINGER_POLL_MAX)
            delay = min(self._interval, self._deadline - now)
            self._handle = self._loop.call_later(delay, self._check)
        except Exception:
            logger.exception("lingering close of %s failed; aborted", format_peer(conn.peer))
            conn.abort()
