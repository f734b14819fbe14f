"""Baseline: a careful hand-written asyncio.Protocol echo server.

What an experienced asyncio programmer writes when streams are too slow: a
callback protocol with one ``bytearray`` receive buffer, a
``struct.unpack_from`` loop that cuts every complete frame out of it, and one
``transport.write`` per read carrying the replies to all the frames that read
completed. Each frame is still handled as a frame (its payload is extracted
and its reply re-encoded), so the server does the per-frame work a real
protocol handler does rather than reflecting raw bytes.

Careful details: a read that holds only whole frames is parsed in place,
without copying it into the buffer; the consumed prefix is dropped once per
read, not once per frame; reading pauses while the transport's write buffer is
above its high-water mark, so a client that does not read cannot grow memory.

Wire format: 4-byte big-endian length field, then the payload (fastnet's
default ``length`` framing). A frame above 8 MiB closes the connection.

Usage::

    python benchmarks/servers/protocol_echo.py --port 0 [--loop asyncio|uvloop]

prints ``listening on HOST:PORT`` once it accepts connections, and exits 0 on
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from typing import cast

# Same limit as fastnet.DEFAULT_MAX_FRAME_SIZE, so both servers refuse the same input.
MAX_FRAME = 8 * 1024 * 1024

# See streams_echo.py: room for 1,000 clients connecting at once.
BACKLOG = 1024

HEADER = struct.Struct(">I")


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        if buf:
            buf += data
            source: bytes | bytearray = buf
        else:
            source = data
        unpack_from = HEADER.unpack_from
        pack = HEADER.pack
        end = len(source)
        pos = 0
        replies: list[bytes | bytearray] = []
        while end - pos >= 4:
            (size,) = unpack_from(source, pos)
            if size > MAX_FRAME:
                assert self.transport is not None
                self.transport.close()
                return
            stop = pos + 4 + size
            if stop > end:
                break
            payload = source[pos + 4 : stop]
            # The "handler": echo the payload back as one frame.
            replies.append(pack(len(payload)))
            replies.append(payload)
            pos = stop
        if source is buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        if replies:
            assert self.transport is not None
            self.transport.write(b"".join(replies))

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, backlog=BACKLOG)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.host, args.port))
        else:
            asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"protocol_echo: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
