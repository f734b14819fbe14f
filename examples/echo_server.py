"""An echo server written as an ordinary async handler.

Run it from a checkout (after ``pip install -e .``)::

    python examples/echo_server.py --port 8080

and talk to it with ``python examples/client.py --port 8080 hello world``.
Ctrl-C (or SIGTERM) shuts it down gracefully; a second Ctrl-C exits at once.

The handler is a coroutine run in a task per connection: it may await
anything (a database, another connection, a timer). ``fastnet serve echo``
runs the built-in echo instead, a callback handler that answers inside the
read callback without a task switch (see ``fastnet.callback_handler``).
"""

from __future__ import annotations

import argparse
import logging

import fastnet


async def handle(conn: fastnet.Connection) -> None:
    """Send every frame back; the loop ends when the peer closes or the server stops."""
    async for frame in conn:
        conn.send(frame)  # queued; everything sent for one read goes out in one write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fastnet.run(
        handle,
        args.host,
        args.port,
        idle_timeout=300,  # close connections that stay silent for five minutes
        on_ready=lambda server: print(f"listening on {server.address}", flush=True),
    )


if __name__ == "__main__":
    main()
