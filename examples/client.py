"""A small fastnet client: send frames, print the replies.

    python examples/client.py --port 8080 hello world
    python examples/client.py --port 6380 "SET k v" "GET k"
    printf 'one\\ntwo\\n' | python examples/client.py --port 8080 -

Each argument is one frame (``-`` reads one frame per line of standard
input). The frames are sent pipelined, in one write; the client then prints
one reply per frame, as text where it decodes and as a bytes literal where
it does not.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import fastnet


async def exchange(
    host: str, port: int, framing: fastnet.framing.Framing, frames: list[bytes]
) -> int:
    try:
        conn = await fastnet.connect(host, port, framing=framing)
    except OSError as exc:
        print(f"client: cannot connect to {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    async with conn:
        conn.send_many(frames)
        for _ in frames:
            try:
                reply = await asyncio.wait_for(conn.recv(), 10)
            except (asyncio.TimeoutError, fastnet.ConnectionBrokenError) as exc:
                print(f"client: no reply: {exc or 'timed out'}", file=sys.stderr)
                return 1
            try:
                print(reply.decode())
            except UnicodeDecodeError:
                print(repr(reply))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "frames", nargs="+", metavar="FRAME", help="a frame to send, or - for stdin"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--lines", action="store_true", help="newline-terminated frames")
    args = parser.parse_args()
    frames: list[bytes] = []
    for arg in args.frames:
        if arg == "-":
            frames += [line.rstrip(b"\r\n") for line in sys.stdin.buffer]
        else:
            frames.append(arg.encode())
    framing = fastnet.Lines() if args.lines else fastnet.LengthPrefixed()
    return asyncio.run(exchange(args.host, args.port, framing, frames))


if __name__ == "__main__":
    sys.exit(main())
