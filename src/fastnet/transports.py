"""How fastnet writes to and reads from each kind of transport: the transport strategy.

A connection asks ``choose_strategy(transport)`` when its transport is made,
and again whenever the transport changes (``Connection.start_tls``), so no
fast path outlives the transport it was chosen for. The kinds:

- ``selector``: CPython's selector socket transport (Unix). fastnet makes
  vectored writes itself (``write_vectored``: os.writev while the transport
  holds nothing unsent) and reads on through runs of large frames
  (os.readv on the socket, ``read_fd``).
- ``uvloop``: uvloop's TCP and Unix transports. Their ``writelines`` makes
  one vectored write; uvloop reads in a loop itself, so no reading on.
- Both take the read buffer only through the buffer protocol (and ``len()``):
  the extension's decoder hands them its window object itself, with no
  memoryview made per read (``raw_windows``).
- On uvloop, small frames come through plain reads instead (``plain_reads``):
  uvloop reads into its own buffer and calls ``data_received`` of the
  connection's ``_PlainReads`` with the bytes, which measured about 780
  user-space instructions less per read than calling ``get_buffer`` and
  exporting its buffer; the connection sets itself as the protocol again while a large
  frame is under way, to receive it straight into its object.
- ``tls``: any TLS transport (asyncio's or uvloop's). Writes are joined, so a
  length field and its payload travel in one TLS record instead of two.
  asyncio's TLS layer slices the read buffer: it gets a memoryview.
- ``plain``: anything else (Windows' proactor, a transport fastnet does not
  know). Joined writes and the transport's own reads: always correct.

Every private name used here comes from ``_internals``.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from ._internals import fatal_error, is_selector_socket_transport, is_uvloop_stream_transport
from .framing import Buffer

__all__ = [
    "IOV_MAX",
    "TLS_STRATEGY",
    "TransportStrategy",
    "choose_strategy",
    "extra_info",
    "write_vectored",
]

# Most buffers one vectored write takes. POSIX guarantees 16 (_XOPEN_IOV_MAX);
# Linux and the BSDs take 1024. A longer list is joined instead.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
if IOV_MAX <= 0:
    IOV_MAX = 16


class TransportStrategy(NamedTuple):
    """What fastnet does on one transport."""

    kind: str
    """``selector``, ``uvloop``, ``tls`` or ``plain``."""
    write_buffers: Callable[[list[Buffer]], None] | None
    """Writes a list of buffers as one vectored write; None: join them, one ``write``."""
    read_fd: int
    """The socket fastnet reads on itself (``os.readv``) through large frames; -1: never."""
    raw_windows: bool = False
    """The transport uses ``get_buffer``'s result only through the buffer protocol and
    ``len()``, so the extension's decoder may hand it its window object instead of a new
    memoryview per read (``_internals`` 5d)."""
    plain_reads: bool = False
    """The transport reads into its own buffer and hands over bytes between large frames
    (``_internals`` 5e)."""


TLS_STRATEGY = TransportStrategy("tls", None, -1)


def extra_info(transport: asyncio.BaseTransport, name: str) -> Any:
    """``transport.get_extra_info(name)``, or None once the transport cannot say.

    asyncio's TLS transport (``sslproto._SSLProtocolTransport``, CPython
    3.11-3.13) raises AttributeError from ``get_extra_info`` once its TLS
    layer has let go of it after a close; a closing connection asks for its
    socket then (to reset it, to probe its send queue).
    """
    try:
        return transport.get_extra_info(name)
    except AttributeError:
        return None


def choose_strategy(transport: asyncio.BaseTransport) -> TransportStrategy:
    """The strategy for ``transport`` (see the module docstring)."""
    if transport.get_extra_info("sslcontext") is not None:
        return TLS_STRATEGY
    if is_uvloop_stream_transport(transport):
        return TransportStrategy("uvloop", transport.writelines, -1, True, True)  # type: ignore[attr-defined]
    if is_selector_socket_transport(transport) and hasattr(os, "writev"):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            fd = int(sock.fileno())
            writer = functools.partial(write_vectored, cast(asyncio.WriteTransport, transport), fd)
            return TransportStrategy("selector", writer, fd, True)
    return TransportStrategy("plain", None, -1)


def write_vectored(transport: asyncio.WriteTransport, fd: int, buffers: list[Buffer]) -> None:
    """Write ``buffers`` in order: writev(2) while the transport holds nothing unsent.

    This is what the transport's own ``write`` does with one buffer (send at
    once when its buffer is empty), with an iovec per buffer instead of a
    joined copy. Only what the kernel did not take is joined and handed to
    ``transport.write``, which buffers it and applies flow control.

    CPython's own ``writelines`` is not used: it joins the buffers before
    3.12, and from 3.12 it has had bugs in released versions: it did not
    pause the protocol at the high-water mark (gh-127655: drain() never
    waited; fixed in 3.12.9 and 3.13.2), and it fails after the connection
    is lost (gh-136234).
    """
    if len(buffers) <= IOV_MAX and not transport.get_write_buffer_size():
        # An empty write runs the transport's own checks first: it raises
        # RuntimeError after write_eof() or while loop.sendfile() runs (whose
        # bytes ours would land among), as a write of the data would.
        transport.write(b"")
        if not transport.is_closing():
            try:
                sent = os.writev(fd, buffers)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                # Report this error, not the EPIPE a second send would meet:
                # the kernel reports a socket error such as ECONNRESET once.
                fatal_error(transport, exc, "Fatal write error on socket transport")
                return
            for i, buf in enumerate(buffers):
                size = len(buf)
                if sent < size:
                    buffers = [memoryview(buf)[sent:], *buffers[i + 1 :]]
                    break
                sent -= size
            else:
                return  # all of it went out
    transport.write(b"".join(buffers))
