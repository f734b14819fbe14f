"""Built-in apps for ``fastnet serve``: ``echo`` and ``kv``.

``echo`` sends every frame back, in order. It is a callback handler: it runs
inside the read callback with each batch, so a read costs one decoder call,
one encode and one write however many frames it carries, and no task switch.
``echo_task`` is the same app as an ``async def`` handler taking whole batches
(``recv_batch``): one task wake-up per read on top of that.

``kv`` is a small in-memory key-value store in the spirit of tokio's
mini-redis, over any framing. Each request is one frame, each reply one frame,
in request order (clients may pipeline).

Requests (the command name is case-insensitive; a key is 1 to 512 bytes
without spaces; a value is every byte after the space that follows the key,
so it may be empty and may hold spaces or any binary data):

    GET <key>            -> $<value>   or  _           (no such key)
    SET <key> <value>    -> +OK
    DEL <key>            -> :1         or  :0          (how many keys were removed)
    PING                 -> +PONG

Replies start with a type byte, as RESP does: ``+`` status, ``$`` a value
(the rest of the frame, possibly empty), ``_`` nil, ``:`` an integer, ``-`` an
error (``-ERR <message>``: unknown command, wrong arguments, store full). An
error reply answers one bad request; the connection stays open.
"""

from __future__ import annotations

from collections.abc import Callable

from .connection import Connection
from .server import CallbackHandler, Handler, callback_handler

__all__ = ["APPS", "KVStore", "echo", "echo_task", "kv"]


@callback_handler
def echo(conn: Connection, frames: list[bytes]) -> list[bytes]:
    """Send every frame back, in order."""
    return frames


async def echo_task(conn: Connection) -> None:
    """Send every frame back, in order; return when the peer has gone."""
    recv_batch = conn.recv_batch
    send_many = conn.send_many
    while True:
        # Ends with ConnectionBrokenError (peer gone) or ConnectionClosedError
        # (shutdown, idle timeout): the server takes both as a normal end.
        send_many(await recv_batch())


# A key longer than this is refused: keys are names, not payloads.
MAX_KEY = 512
# At most this many keys: an example store must not eat the machine's memory
# when a client loops on SET. A million small keys is about 100-200 MB.
MAX_KEYS = 1_000_000

_OK = b"+OK"
_PONG = b"+PONG"
_NIL = b"_"
_ONE = b":1"
_ZERO = b":0"


class KVStore:
    """The ``kv`` app's store: a dict shared by every connection of one server.

    ``handler()`` returns its callback handler: ``fastnet.run(KVStore().handler())``.

    Args:
        max_keys: the most keys stored at once; SET of a new key beyond it
            answers ``-ERR store full``.
    """

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.data: dict[bytes, bytes] = {}
        self.max_keys = max_keys

    def execute(self, request: bytes) -> bytes:
        """Return the reply to one request frame."""
        command, _, rest = request.partition(b" ")
        command = command.upper()
        if command == b"GET":
            if not _valid_key(rest):
                return _bad_key(rest)
            value = self.data.get(rest)
            return _NIL if value is None else b"$" + value
        if command == b"SET":
            key, space, value = rest.partition(b" ")
            if not space:
                return b"-ERR SET needs a key and a value"
            if not _valid_key(key):
                return _bad_key(key)
            data = self.data
            if key not in data and len(data) >= self.max_keys:
                return b"-ERR store full"
            data[key] = value
            return _OK
        if command == b"DEL":
            if not _valid_key(rest):
                return _bad_key(rest)
            return _ONE if self.data.pop(rest, None) is not None else _ZERO
        if command == b"PING" and not rest:
            return _PONG
        shown = command[:32].decode("ascii", "replace")
        return f"-ERR unknown command {shown!r}".encode()

    def handler(self) -> CallbackHandler:
        """Return a callback handler that answers each request from this store."""
        execute = self.execute

        def kv(conn: Connection, frames: list[bytes]) -> list[bytes]:
            return [execute(request) for request in frames]

        return CallbackHandler(kv)


def _valid_key(key: bytes) -> bool:
    return 0 < len(key) <= MAX_KEY and b" " not in key


def _bad_key(key: bytes) -> bytes:
    if not key:
        return b"-ERR missing key"
    if len(key) > MAX_KEY:
        return b"-ERR key longer than %d bytes" % MAX_KEY
    return b"-ERR a key cannot contain spaces"


def kv() -> CallbackHandler:
    """Return a new ``kv`` handler with an empty store."""
    return KVStore().handler()


# Built-in apps for the CLI, by name: each factory returns a fresh handler.
APPS: dict[str, Callable[[], Handler]] = {
    "echo": lambda: echo,
    "echo-task": lambda: echo_task,
    "kv": kv,
}
