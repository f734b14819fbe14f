"""A notes service on fastnet's router: typed messages, states, deadlines, drain.

    pip install 'fastnet[msgspec]'
    fastnet serve examples.notes:router --port 7000     # the server (or: notes.py serve)
    python examples/notes.py client --port 7000        # a client session against it

A client must log in first (the connection's protocol state moves from "new"
to "user"); then it can save notes and list them. ``List`` is an ``async
def`` handler (it could await a database); the others run inline.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import msgspec

import fastnet
from fastnet.bodies import Msgpack

router = fastnet.Router(codec=Msgpack(), states=("new", "user"))
NOTES: dict[str, list[str]] = {}  # user -> notes, shared by every connection


@router.message(1)
class Login(msgspec.Struct):
    user: str


@router.message(2)
class Save(msgspec.Struct):
    text: str


@router.message(3)
class List(msgspec.Struct):
    limit: int = 10


@router.message(100, reply_only=True)
class Saved(msgspec.Struct):
    count: int


@router.message(101, reply_only=True)
class Notes(msgspec.Struct):
    notes: list[str]


@router.handler(Login, states="new")
def login(conn: fastnet.Connection, msg: Login) -> None:
    if not msg.user.isalnum():
        raise fastnet.RequestError("a user name is letters and digits", code=400)
    conn.state.user = msg.user  # the application's own per-connection state
    router.set_state(conn, "user")


@router.handler(Save, states="user")
def save(conn: fastnet.Connection, msg: Save) -> Saved:
    notes = NOTES.setdefault(conn.state.user, [])
    notes.append(msg.text)
    return Saved(count=len(notes))


@router.handler(List, states="user")
async def list_notes(conn: fastnet.Connection, msg: List) -> Notes:
    await asyncio.sleep(0.01)  # stands for a database query
    return Notes(notes=NOTES.get(conn.state.user, [])[-msg.limit :])


async def client(host: str, port: int) -> int:
    channel = await fastnet.open_channel(host, port, router=router)
    async with channel:
        try:
            await channel.call(Save(text="too early"), timeout=2)
        except fastnet.Forbidden as exc:
            print("before login:", exc)
        await channel.call(Login(user="ada"), timeout=2)
        # Pipelined: three saves in flight at once, each reply matched by id.
        saved = await asyncio.gather(
            *(channel.call(Save(text=f"note {i}"), timeout=2) for i in range(3))
        )
        print("saved:", [s.count for s in saved])
        notes = await channel.call(List(limit=2), timeout=2)
        print("last two:", notes.notes)
        print(f"ping: {await channel.ping(timeout=2) * 1e6:.0f} us")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="the notes example: serve, or run a client")
    parser.add_argument("mode", choices=("serve", "client"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    args = parser.parse_args()
    if args.mode == "serve":
        fastnet.run(router, args.host, args.port)
        return 0
    return asyncio.run(client(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
