"""fastnet: production TCP services that speak a framed protocol.

Layout (data flows top to bottom on receive):

    framing.py      framing specs (LengthPrefixed, Lines); picks the codec backend
    _frame.pyx      Cython hot path: streaming decoders over self-managed buffers, encoders
    _frame_py.py    pure-Python twin of _frame, identical behaviour
    errors.py       exception hierarchy shared by both backends
    protocol.py     FrameProtocol: the asyncio.BufferedProtocol mechanics (receive, wake, write)
    connection.py   Connection, what a handler sees (recv, send, drain, close); connect()
    listener.py     bind, the accept loop (slots, back-off, admission hook)
    supervisor.py   one connection's life: handler kinds, errors, lingering close, timeouts
    server.py       Server, the public facade: wiring, stats, shutdown
    runner.py       loop choice, serve()/run(), signals
    apps.py         built-in apps for `fastnet serve`: echo, kv
    cli.py          the `fastnet` command (serve, info, bench); __main__.py runs it
"""

from __future__ import annotations

from .connection import Connection, WriteBufferFull, connect
from .errors import (
    ConnectionBrokenError,
    ConnectionBusyError,
    ConnectionClosedError,
    FastnetError,
    FrameError,
    FrameTooLarge,
    IncompleteFrame,
)
from .framing import (
    ACCELERATED,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_LINE_LENGTH,
    LengthPrefixed,
    Lines,
)
from .runner import run, serve
from .server import CallbackHandler, Server, callback_handler

__version__ = "0.1.0"

__all__ = [
    "ACCELERATED",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_LINE_LENGTH",
    "CallbackHandler",
    "Connection",
    "ConnectionBrokenError",
    "ConnectionBusyError",
    "ConnectionClosedError",
    "FastnetError",
    "FrameError",
    "FrameTooLarge",
    "IncompleteFrame",
    "LengthPrefixed",
    "Lines",
    "Server",
    "WriteBufferFull",
    "__version__",
    "callback_handler",
    "connect",
    "run",
    "serve",
]
