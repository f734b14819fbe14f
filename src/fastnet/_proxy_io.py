"""Reading a PROXY header from an accepted socket, before any transport exists.

The supervisor calls ``read_proxy_header`` on the raw non-blocking socket
(``fastnet.proxy`` parses); only then does it hand the socket to the event
loop (``connect_accepted_socket``, with TLS if configured). So the reads here
must stop exactly at the header's end: the next byte may be a TLS
ClientHello or the first frame, and it must still be in the kernel's buffer
when the transport starts reading.

Strategy: wait until the socket is readable (``add_reader``), peek at what
is there (``recv(limit, MSG_PEEK)``: nothing is consumed), ask the parser
how many of those bytes are the header's, and ``recv`` exactly that many:
one wait and two system calls for a header that arrives in one segment, as
HAProxy sends it. A header split across segments repeats that; each peek
finds only bytes not consumed yet, so the loop never spins on data it has
already seen. Where the loop has no ``add_reader`` (Windows' proactor), it
reads ``parser.need`` bytes at a time with ``sock_recv``: fewer, never more
than the header holds.
"""

from __future__ import annotations

import asyncio
import socket

from .proxy import ProxyHeader, ProxyHeaderError, ProxyParser

__all__ = ["read_proxy_header"]

_PEEK = getattr(socket, "MSG_PEEK", 0)


def _set_result(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, parser: ProxyParser
) -> ProxyHeader:
    """Read one header from ``sock`` (non-blocking), not a byte past its end.

    Bound it with a timeout: a peer that sends nothing keeps it waiting.

    Raises:
        ProxyHeaderError: not a valid header; ``truncated`` when the peer
            closed or reset the connection before its end (``parser.received``
            tells whether it sent anything at all).
    """
    fd = sock.fileno()
    can_wait = _PEEK != 0
    while True:
        if not can_wait:
            try:
                data = await loop.sock_recv(sock, parser.need)
            except OSError:
                data = b""
            if not data:
                parser.eof()  # raises: the header is incomplete
                raise ProxyHeaderError("truncated", "the stream ended inside the PROXY header")
            header = parser.feed(data)
            if header is not None:
                return header
            continue
        try:
            peeked = sock.recv(parser.limit, _PEEK)
        except (BlockingIOError, InterruptedError):
            waiter = loop.create_future()
            try:
                loop.add_reader(fd, _set_result, waiter)
            except NotImplementedError:
                can_wait = False
                continue
            try:
                await waiter
            finally:
                loop.remove_reader(fd)
            continue
        except OSError:  # reset by the peer: the header ends here
            peeked = b""
        if not peeked:
            parser.eof()  # raises: the header is incomplete
            raise ProxyHeaderError("truncated", "the stream ended inside the PROXY header")
        count = parser.header_length(peeked)
        try:
            data = sock.recv(count)
        except (BlockingIOError, InterruptedError):  # pragma: no cover - peeked bytes are there
            continue
        except OSError:
            data = b""
        if not data:
            parser.eof()
            raise ProxyHeaderError("truncated", "the stream ended inside the PROXY header")
        header = parser.feed(data)
        if header is not None:
            return header
