"""Router backends for test_client.py: in-process ones with behaviours, and a process app.

``fastnet serve client_app:router`` (cwd tests/) is what the process tests
run: raw bodies; ``ECHO`` answers its body, ``WHO`` answers
``body + b"@" + pid`` (so a client can tell which process served a call,
and that a restarted server is a new one), ``SLEEP`` sleeps ``float(body)``
seconds and answers ``b"slept"``.

``Backend`` is for the in-process tests: a router whose handlers count
every attempt they see and behave as the test sets ``mode`` (answer,
``Overloaded`` on every call or every other call, close the connection
every other call, answer an application error...). The module holds no
tests.
"""

from __future__ import annotations

import asyncio
import os

import fastnet
from fastnet.wire import Overloaded, RequestError

ECHO = 1
WHO = 2
SLEEP = 3
CLOSE = 4  # Backend: closes the connection instead of answering (see ``close_first``)
NOTE = 5  # Backend: one-way messages land in ``notes``
REFUSE = 6  # Backend: an application error reply (code 1000) on every call
BOOM = 7  # Backend: the handler raises ValueError (an INTERNAL error reply)

APP_ERROR = 1000
PID = str(os.getpid()).encode()

router = fastnet.Router()


@router.handler(ECHO)
def echo(conn: fastnet.Connection, body: bytes) -> bytes:
    return body


@router.handler(WHO)
def who(conn: fastnet.Connection, body: bytes) -> bytes:
    return body + b"@" + PID


@router.handler(SLEEP)
async def sleep(conn: fastnet.Connection, body: bytes) -> bytes:
    await asyncio.sleep(float(body))
    return b"slept"


class Backend:
    """An in-process router whose behaviour a test switches with ``mode``.

    Modes of ``ECHO`` (and ``SLEEP``, which sleeps first): ``"ok"`` answers
    the body; ``"overloaded"`` answers ``Overloaded`` to every call;
    ``"half_overloaded"`` to every other call (the 1st, 3rd...: strictly
    alternating, so any two consecutive calls hold exactly one failure);
    ``"half_closed"`` closes the connection on every other call instead.

    Attributes:
        attempts: requests the handlers of ECHO, SLEEP and CLOSE saw.
        concurrent, peak: SLEEP handlers running now, and the most at once.
        conns: the connections that carried a request (by identity).
        notes: bodies of the one-way NOTE messages.
        closed_ids: CLOSE bodies whose connection was already closed once.
    """

    def __init__(self, mode: str = "ok", **router_kwargs: object) -> None:
        self.mode = mode
        self.attempts = 0
        self.concurrent = 0
        self.peak = 0
        self.conns: set[int] = set()
        self.notes: list[bytes] = []
        self.closed_ids: set[bytes] = set()
        self.router = r = fastnet.Router(**router_kwargs)  # type: ignore[arg-type]

        @r.handler(ECHO)
        def echo(conn: fastnet.Connection, body: bytes) -> bytes:
            self._judge(conn)
            return body

        @r.handler(SLEEP)
        async def sleep(conn: fastnet.Connection, body: bytes) -> bytes:
            self._judge(conn)
            self.concurrent += 1
            self.peak = max(self.peak, self.concurrent)
            try:
                await asyncio.sleep(float(body))
            finally:
                self.concurrent -= 1
            return body

        @r.handler(CLOSE)
        def close(conn: fastnet.Connection, body: bytes) -> bytes:
            # The connection is lost with the request in the server's hands;
            # with close_first, only the first attempt of each body.
            self.attempts += 1
            if not body.startswith(b"once:") or body not in self.closed_ids:
                self.closed_ids.add(body)
                conn.abort()
            return body

        @r.handler(NOTE)
        def note(conn: fastnet.Connection, body: bytes) -> None:
            self.notes.append(body)

        @r.handler(REFUSE)
        def refuse(conn: fastnet.Connection, body: bytes) -> bytes:
            raise RequestError("refused: " + body.decode(), code=APP_ERROR)

        @r.handler(BOOM)
        def boom(conn: fastnet.Connection, body: bytes) -> bytes:
            raise ValueError("boom")

    def _judge(self, conn: fastnet.Connection) -> None:
        self.attempts += 1
        self.conns.add(id(conn))
        mode = self.mode
        odd = self.attempts % 2 == 1
        if mode == "overloaded" or (mode == "half_overloaded" and odd):
            raise Overloaded("shedding load")
        if mode == "half_closed" and odd:
            conn.abort()
