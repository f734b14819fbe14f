"""Baseline: a hand-written asyncio.Protocol that reflects complete frames.

The strongest Python baseline: it does no more work than an echo of
length-prefixed frames needs. On each read it finds the end of the last
complete frame in (the kept tail + the new bytes) by hopping from length field
to length field, and writes that whole prefix back with one
``transport.write``, without cutting the frames out or encoding them again.
The incomplete tail waits for the next read. No Python server can echo with
less per-read work; a framework that beats it has nothing left to remove.

Careful details:

- A read that holds only whole frames (the usual case for small frames) is
  written back as the very ``bytes`` object the loop delivered: no copy.
- While a known incomplete frame is still short of its end (a large frame
  arriving in many reads), a read only appends to the tail: no scan, and the
  tail grows in place (``bytearray``), so a frame costs O(its size) in all.
- When the tail plus the new bytes end exactly on a frame boundary, the tail
  buffer itself is handed to ``transport.write`` and a fresh one started:
  nothing is copied again.
- Reading pauses while the transport's write buffer is above its high-water
  mark, so a client that does not read cannot grow memory.

Wire format: 4-byte big-endian length field, then the payload (fastnet's
default ``length`` framing). A frame above 8 MiB closes the connection.

With ``--tls-cert FILE [--tls-key FILE]`` the same protocol serves TLS:
``ssl=`` on ``create_server``, so the event loop's TLS transport (asyncio's
``SSLProtocol`` or uvloop's) hands it the decrypted bytes, the baseline of
compare.py's ``--set tls``. The context is built as ``fastnet.tls.server_context``
builds fastnet's (TLS 1.2 or later, no compression, the server's cipher
preference), with the standard library only, so both servers negotiate the same
protocol version and cipher.

Usage::

    python benchmarks/servers/protocol_reflect.py --port 0 [--loop asyncio|uvloop]
        [--tls-cert FILE [--tls-key FILE]]

prints ``listening on HOST:PORT`` once it accepts connections, and exits 0 on
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import struct
import sys
from typing import cast

# Same limit as fastnet.DEFAULT_MAX_FRAME_SIZE, so both servers refuse the same input.
MAX_FRAME = 8 * 1024 * 1024

# See streams_echo.py: room for 1,000 clients connecting at once.
BACKLOG = 1024

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


class ReflectProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Bytes received after the last complete frame: the start of the next one.
        self.tail = bytearray()
        # Length the tail must reach before it can hold a complete frame: the
        # end of the frame it starts, once that frame's length field is in.
        self.need = HEADER_SIZE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        tail = self.tail
        if tail:
            tail += data
            if len(tail) < self.need:
                return  # still inside the frame the tail starts
            source: bytes | bytearray = tail
        else:
            source = data
        # Hop over the complete frames: `pos` ends the last one.
        unpack_from = HEADER.unpack_from
        end = len(source)
        pos = 0
        need = HEADER_SIZE
        while end - pos >= HEADER_SIZE:
            (size,) = unpack_from(source, pos)
            if size > MAX_FRAME:
                assert self.transport is not None
                self.transport.close()
                return
            stop = pos + HEADER_SIZE + size
            if stop > end:
                need = stop - pos
                break
            pos = stop
        self.need = need
        if not pos:
            if source is data:
                tail += data
            return
        assert self.transport is not None
        if pos == end:
            # Only whole frames: hand over the object itself.
            self.transport.write(source)
            if source is tail:
                self.tail = bytearray()
        else:
            self.transport.write(source[:pos])
            if source is tail:
                del tail[:pos]
            else:
                tail += memoryview(data)[pos:]

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """A server context with fastnet.tls.server_context's settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(cert, key)
    return context


async def serve(
    host: str,
    port: int,
    context: ssl.SSLContext | None = None,
    protocol: type[asyncio.Protocol] = ReflectProtocol,
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, host, port, backlog=BACKLOG, ssl=context)
    sock_host, sock_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {sock_host}:{sock_port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt
            break
    async with server:
        await stop.wait()


def main(
    argv: list[str] | None = None,
    protocol: type[asyncio.Protocol] = ReflectProtocol,
    description: str = __doc__.split("\n\n")[0],
) -> int:
    """Serve ``protocol`` (the reflecting one; raw_echo.py passes its own)."""
    name = "raw_echo" if protocol is not ReflectProtocol else "protocol_reflect"
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM key (default: in --tls-cert)")
    args = parser.parse_args(argv)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    try:
        context = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        print(f"{name}: cannot load {args.tls_cert}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.host, args.port, context, protocol))
        else:
            asyncio.run(serve(args.host, args.port, context, protocol))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"{name}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
