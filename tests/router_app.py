"""A router app for test_router.py's process test: ``fastnet serve router_app:router``.

Raw bodies (no codec): ``ECHO`` answers its body; ``SLEEP``'s body is a number
of seconds the handler sleeps before answering ``b"slept " + body``. The
module holds no tests; the test's client imports it for the type numbers.
"""

from __future__ import annotations

import asyncio

import fastnet

ECHO = 1
SLEEP = 2

router = fastnet.Router()


@router.handler(ECHO)
def echo(conn: fastnet.Connection, body: bytes) -> bytes:
    return body


@router.handler(SLEEP)
async def sleep(conn: fastnet.Connection, body: bytes) -> bytes:
    await asyncio.sleep(float(body))
    return b"slept " + body
