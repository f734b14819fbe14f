"""A router whose one message type is a small msgspec struct, for compare.py --set router.

    fastnet serve router_msgspec:router      (with benchmarks/servers on PYTHONPATH)

Type 1 is ``Quote`` (a symbol, a price, a size), MessagePack through
``fastnet.bodies.Msgpack``; the handler decodes it, builds a new ``Quote``
from its fields and returns it, so every request pays a decode, a handler
call and an encode, and the reply's bytes equal the request's (msgspec
encodes a struct's fields in order), which lets the load generator verify
each reply. ``SAMPLE`` is the body the generator sends (``--body-hex``).
"""

from __future__ import annotations

import msgspec

import fastnet
from fastnet.bodies import Msgpack

router = fastnet.Router(codec=Msgpack())


@router.message(1)
class Quote(msgspec.Struct):
    symbol: str
    price: float
    size: int


@router.handler(Quote)
def quote(conn: fastnet.Connection, msg: Quote) -> Quote:
    return Quote(msg.symbol, msg.price, msg.size)


SAMPLE = msgspec.msgpack.encode(Quote(symbol="ACME", price=101.25, size=300))
