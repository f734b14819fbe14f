"""The key-value example server (the kv-text app): GET, SET and DEL over length-prefixed frames.

Run it from a checkout (after ``pip install -e .``)::

    python examples/kv_server.py --port 6380

then::

    python examples/client.py --port 6380 "SET greeting hello" "GET greeting" "DEL greeting"

The store and its wire format are in ``fastnet/apps.py`` (``fastnet serve kv-text``
runs the same app; ``fastnet serve kv`` is the same store on the router, a
binary wire format that ``examples/client.py`` does not speak). This file shows
how to serve a handler with your own options: here a smaller frame limit and a
connection cap.

Wire format, one request per frame, one reply per frame, in order:

    GET <key>          -> $<value> | _
    SET <key> <value>  -> +OK
    DEL <key>          -> :1 | :0
    PING               -> +PONG
    anything else      -> -ERR <message>
"""

from __future__ import annotations

import argparse
import logging

import fastnet
from fastnet.apps import KVStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6380)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    store = KVStore()
    fastnet.run(
        store.handler(),
        args.host,
        args.port,
        framing=fastnet.LengthPrefixed(max_frame=1024 * 1024),  # values up to about 1 MiB
        max_connections=500,
        on_ready=lambda server: print(f"listening on {server.address}", flush=True),
    )


if __name__ == "__main__":
    main()
