"""Floor: a hand-written asyncio.Protocol that writes every read back unparsed.

Not a framed server: it never looks at a length field, so it cannot refuse a
bad frame, and it is an echo of frames only because an echo of bytes is one.
It measures the least a Python protocol can do per read on a given event loop:
one ``data_received`` call and one ``transport.write`` of the very ``bytes``
object the loop delivered (the write bound once per connection). Whatever a
framed Python server costs beyond this figure is its own work; the figure's
distance from Tokio is the event loop's and CPython's, and no framing library
on that loop can be faster than it.

Reading pauses while the transport's write buffer is above its high-water
mark, so a client that does not read cannot grow memory.

Usage::

    python benchmarks/servers/raw_echo.py --port 0 [--loop asyncio|uvloop]

prints ``listening on HOST:PORT`` once it accepts connections, and exits 0 on
SIGINT or SIGTERM (protocol_reflect.py's runner).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from protocol_reflect import main


class RawEchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.data_received: Callable[[bytes], object] = self._not_connected

    def _not_connected(self, data: bytes) -> None:
        raise RuntimeError("data before connection_made")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # The instance attribute shadows the method: the loop calls the
        # transport's bound write directly, with no Python frame per read.
        # uvloop looked data_received up before connection_made: set_protocol
        # makes it look again (asyncio's transport looks it up per read).
        self.data_received = transport.write  # type: ignore[attr-defined]
        transport.set_protocol(self)  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


if __name__ == "__main__":
    sys.exit(main(protocol=RawEchoProtocol, description=__doc__.split("\n\n")[0]))
