"""Baseline: the idiomatic asyncio-streams echo server a user would write first.

One task per connection reads each frame with ``readexactly`` (a 4-byte
big-endian length, then the payload), writes the reply and awaits ``drain``:
an await, a write and usually a send syscall per frame. This is the code
fastnet replaces, so it is the denominator of every ratio in
``benchmarks/compare.py``.

Wire format: 4-byte big-endian length field, then the payload (fastnet's
default ``length`` framing). Frames above 8 MiB close the connection, like
fastnet's default ``max_frame``.

Usage::

    python benchmarks/servers/streams_echo.py --port 0 [--loop asyncio|uvloop]

prints ``listening on HOST:PORT`` once it accepts connections, and exits 0 on
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

# Same limit as fastnet.DEFAULT_MAX_FRAME_SIZE, so both servers refuse the same input.
MAX_FRAME = 8 * 1024 * 1024

# The kernel's accept queue: 1,000-connection workloads connect in bursts, and
# asyncio's default of 100 would make some SYNs wait for a retransmit.
BACKLOG = 1024


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(4)
            size = int.from_bytes(header, "big")
            if size > MAX_FRAME:
                break
            payload = await reader.readexactly(size)
            writer.write(header + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, backlog=BACKLOG)
    sock_host, sock_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {sock_host}:{sock_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
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
        print(f"streams_echo: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
