"""Built-in apps for ``fastnet serve``: ``echo``, ``kv`` and ``kv-text``.

``echo`` sends every frame back, in order. It is a callback handler: it runs
inside the read callback with each batch, so a read costs one decoder call,
one encode and one write however many frames it carries, and no task switch.
``echo_task`` is the same app as an ``async def`` handler taking whole batches
(``recv_batch``): one task wake-up per read on top of that.

``router-echo`` answers every message of type 1 (a router request) with its
body, from a plain handler; ``router-echo-async`` does it from an ``async
def`` handler. They measure what the router adds to ``echo``.

``kv`` is a small in-memory key-value store on the router (``fastnet.Router``,
the wire format of ``fastnet.wire``), raw bodies, one message type per
command, every handler inline:

    type 1 GET   body: the key                   reply: the value
    type 2 SET   body: key length (2 bytes, big-endian), the key, the value
                                                 reply: empty
    type 3 DEL   body: the key                   reply: 1 byte, how many keys were removed

Errors are error replies with the application's codes: 404 no such key (GET),
400 a bad request (an empty or too long key, a SET body shorter than its
key), 507 the store is full. ``kv-text`` is the same store in the spirit of
tokio's mini-redis, over any framing: each request is one frame, each reply
one frame, in request order (clients may pipeline).

``kv-text`` requests (the command name is case-insensitive; a key is 1 to 512 bytes
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
from .router import Router
from .server import CallbackHandler, Handler, callback_handler
from .wire import RequestError

__all__ = [
    "APPS",
    "KVStore",
    "echo",
    "echo_task",
    "kv",
    "kv_text",
    "router_echo",
    "router_echo_async",
]


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


def router_echo() -> Router:
    """A router answering every message of type 1 with its body: a plain handler, inline."""
    router = Router()

    @router.handler(1)
    def echo(conn: Connection, body: bytes) -> bytes:
        return body

    return router


def router_echo_async() -> Router:
    """``router-echo`` with an ``async def`` handler (one that finishes without awaiting)."""
    router = Router()

    @router.handler(1)
    async def echo(conn: Connection, body: bytes) -> bytes:
        return body

    return router


# A key longer than this is refused: keys are names, not payloads.
MAX_KEY = 512
# At most this many keys: an example store must not eat the machine's memory
# when a client loops on SET. A million small keys is about 100-200 MB.
MAX_KEYS = 1_000_000

# The kv app's message types and error codes.
KV_GET = 1
KV_SET = 2
KV_DEL = 3
KV_BAD_REQUEST = 400
KV_NOT_FOUND = 404
KV_FULL = 507
_ONE_BYTE = b"\x01"
_ZERO_BYTE = b"\x00"

_OK = b"+OK"
_PONG = b"+PONG"
_NIL = b"_"
_ONE = b":1"
_ZERO = b":0"


class KVStore:
    """The ``kv`` and ``kv-text`` apps' store: a dict shared by every connection of one server.

    ``handler()`` returns its ``kv-text`` callback handler (text requests, as
    ``examples/kv_server.py`` and ``examples/client.py`` use):
    ``fastnet.run(KVStore().handler())``. ``router()`` returns its ``kv``
    router (``fastnet.wire`` messages).

    Args:
        max_keys: the most keys stored at once; SET of a new key beyond it
            answers ``-ERR store full`` (``kv-text``) or error 507 (``kv``).
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

    def router(self) -> Router:
        """Return a ``Router`` serving this store (the ``kv`` app's wire format)."""
        router = Router()
        data = self.data

        @router.handler(KV_GET)
        def get(conn: Connection, key: bytes) -> bytes:
            value = data.get(_router_key(key))
            if value is None:
                raise RequestError("no such key", code=KV_NOT_FOUND)
            return value

        @router.handler(KV_SET)
        def set_(conn: Connection, body: bytes) -> None:
            if len(body) < 2:
                raise RequestError("SET needs a 2-byte key length", code=KV_BAD_REQUEST)
            size = int.from_bytes(body[:2], "big")
            if len(body) < 2 + size:
                raise RequestError(
                    f"SET body of {len(body)} bytes is shorter than its {size}-byte key",
                    code=KV_BAD_REQUEST,
                )
            key = _router_key(body[2 : 2 + size])
            if key not in data and len(data) >= self.max_keys:
                raise RequestError("store full", code=KV_FULL)
            data[key] = body[2 + size :]

        @router.handler(KV_DEL)
        def delete(conn: Connection, key: bytes) -> bytes:
            return _ONE_BYTE if data.pop(_router_key(key), None) is not None else _ZERO_BYTE

        return router

    def handler(self) -> CallbackHandler:
        """Return a callback handler that answers each ``kv-text`` request from this store."""
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


def _router_key(key: bytes) -> bytes:
    if not 0 < len(key) <= MAX_KEY:
        raise RequestError(
            "missing key" if not key else f"key longer than {MAX_KEY} bytes", code=KV_BAD_REQUEST
        )
    return key


def kv() -> Router:
    """Return a new ``kv`` router with an empty store."""
    return KVStore().router()


def kv_text() -> CallbackHandler:
    """Return a new ``kv-text`` handler with an empty store."""
    return KVStore().handler()


# Built-in apps for the CLI, by name: each factory returns a fresh handler.
APPS: dict[str, Callable[[], Handler]] = {
    "echo": lambda: echo,
    "echo-task": lambda: echo_task,
    "kv": kv,
    "kv-text": kv_text,
    "router-echo": router_echo,
    "router-echo-async": router_echo_async,
}
