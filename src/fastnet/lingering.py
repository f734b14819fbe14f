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
application what it has acknowledged before it reports the reset, and a
fastnet connection whose write fails reads it after the break
(``leftover.py``). A peer that stops at its first
failed write loses what it had not read: the ACK says the kernel has it,
not the application.

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

__all__ = [
    "CLOSE_LINGER",
    "Lingering",
    "nothing_in_flight",
    "send_queue",
    "unacknowledged_probe",
]

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


# Linux TCP states (include/net/tcp_states.h) in which our FIN is sent and
# may be unacknowledged: SIOCOUTQ then counts it as one byte.
_FIN_SENT_STATES = frozenset((4, 9, 11))  # FIN_WAIT1, LAST_ACK, CLOSING


def _ioctl_int(fd: int, request: int) -> int:
    raw = fcntl.ioctl(fd, request, b"\0\0\0\0")
    return int.from_bytes(raw, sys.byteorder, signed=True)


def unacknowledged_probe(transport: asyncio.BaseTransport) -> Callable[[], int] | None:
    """A function returning the bytes of data in the socket's send queue not yet acknowledged.

    Linux only (the SIOCOUTQ ioctl, which is TIOCOUTQ's number); None elsewhere
    or for sockets that are not TCP. Our FIN is not data: when it is the one
    unacknowledged sequence number, the data is all acknowledged (a peer
    that stays open after our FIN delays that ACK by about 40 ms).
    """
    if not sys.platform.startswith("linux") or fcntl is None or termios is None:
        return None
    sock = extra_info(transport, "socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    fd = sock.fileno()
    request = termios.TIOCOUTQ

    def unacknowledged() -> int:
        try:
            queued = _ioctl_int(fd, request)
            if queued == 1:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if state in _FIN_SENT_STATES:
                    return 0
        except OSError:
            return 0  # the socket is gone: nothing left to lose
        return queued

    return unacknowledged


def _is_unix(transport: Any) -> bool:
    sock = extra_info(transport, "socket")
    family = getattr(socket, "AF_UNIX", None)
    return sock is not None and family is not None and sock.family == family


def nothing_in_flight(transport: Any) -> bool:
    """True when closing ``transport``'s socket now cannot lose data either way.

    Nothing of ours is unsent or unacknowledged, and nothing of the peer's
    waits unread (which would make close(2) send RST): a client that read
    every reply closes at once, as a plain close does. Linux TCP only
    (SIOCOUTQ, FIONREAD); a Unix socket once our buffer is empty (the peer
    reads all that was written to it even after a reset); False where it
    cannot be known.
    """
    if transport.get_write_buffer_size():
        return False
    if _is_unix(transport):
        return True
    sock = extra_info(transport, "socket")
    if sock is None:
        return False
    probe = unacknowledged_probe(transport)
    if probe is None:
        return False
    try:
        return probe() == 0 and _ioctl_int(sock.fileno(), termios.FIONREAD) == 0
    except OSError:
        return True  # the socket is gone: nothing left to lose


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
    names the data in the log line of an abort. With ``graceful_deadline``
    (a client's close) the deadline closes instead of aborting when our
    buffer is empty: the kernel still delivers its send queue.
    """

    __slots__ = (
        "_conn",
        "_deadline",
        "_graceful_deadline",
        "_handle",
        "_interval",
        "_loop",
        "_probe",
        "_quiet",
        "_seen",
        "_unix",
        "_what",
    )

    def __init__(
        self,
        conn: Any,
        loop: asyncio.AbstractEventLoop,
        limit: float = CLOSE_LINGER,
        what: str = "its last replies",
        graceful_deadline: bool = False,
    ) -> None:
        self._conn = conn
        self._graceful_deadline = graceful_deadline
        self._loop = loop
        self._what = what
        # A Unix socket needs only our buffer written: its peer reads all
        # that was written to it, reset or not.
        self._unix = _is_unix(conn._transport)
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
                transport = conn._transport
                if self._graceful_deadline and not transport.get_write_buffer_size():
                    # All our data is in the kernel, still going out to a peer
                    # that reads slowly: the kernel delivers it after the close
                    # (unless the peer sends more), a reset would drop it.
                    transport.close()
                    return
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
                if self._unix:
                    safe = True
                elif probe is not None:
                    safe = probe() == 0
                else:
                    safe = now - self._quiet >= LINGER_QUIET
                if safe:
                    transport.close()
                    return
            self._interval = min(self._interval * 2, LINGER_POLL_MAX)
            delay = min(self._interval, self._deadline - now)
            self._handle = self._loop.call_later(delay, self._check)
        except Exception:
            logger.exception("lingering close of %s failed; aborted", format_peer(conn.peer))
            conn.abort()
