"""Where a router message's CPU goes: the per-frame path, taken apart.

    python benchmarks/router_split.py [--batch 16] [--rounds 7] [--json]

Drives a router's dispatcher (the function a server calls with each read's
frames) in-process with batches of ready frames, on both backends, and times,
per message (medians of ``--rounds`` runs, nanoseconds):

- ``dispatch``: the whole per-frame path: header, route, body decode,
  handler, reply encode and header (what the server adds to ``echo`` per
  message, without the socket);
- ``decode``, ``handler``, ``encode``: each of those steps alone, called the
  same number of times in a plain loop, less what that loop costs with an
  empty lambda; ``router`` is ``dispatch`` minus the three: the header,
  routing, the body's and the reply's bytes (for ``raw-async``, the handler
  figure is a Python-level coroutine send and StopIteration, which the C
  path replaces with ``PyIter_Send``, so ``router`` comes out low).

Cases: ``raw-sync`` (raw bytes, a plain handler echoing the body),
``raw-async`` (the same as ``async def``, finishing without awaiting: its
first step runs inline), and ``msgspec`` (a small ``msgspec.Struct`` request
and reply through ``fastnet.bodies.Msgpack``). No socket is involved, so
this measures the router and not the machine's network stack; the
end-to-end figures are ``compare.py --set router``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import fastnet
from fastnet import _message, _message_py, bodies, framing
from fastnet.wire import REQUEST


class _Conn:
    """What a dispatcher touches on a connection, when no handler suspends."""

    _session = None
    peer = ("127.0.0.1", 0)


def _router_raw(is_async: bool) -> fastnet.Router:
    router = fastnet.Router()
    if is_async:

        @router.handler(1)
        async def echo_async(conn: Any, body: bytes) -> bytes:
            return body

    else:

        @router.handler(1)
        def echo(conn: Any, body: bytes) -> bytes:
            return body

    return router


def _router_msgspec() -> tuple[fastnet.Router, Any, Any]:
    import msgspec

    router = fastnet.Router(codec=bodies.Msgpack())

    @router.message(1)
    class Quote(msgspec.Struct):
        symbol: str
        price: float
        size: int

    @router.message(2, reply_only=True)
    class Ack(msgspec.Struct):
        symbol: str
        accepted: bool

    @router.handler(Quote)
    def quote(conn: Any, msg: Quote) -> Ack:
        return Ack(msg.symbol, msg.size > 0)

    return router, Quote(symbol="ACME", price=12.5, size=100), Ack


def _dispatcher(module: Any, router: fastnet.Router) -> Any:
    # Router._bind with one backend's classes (a server uses framing's).
    saved = {name: getattr(framing, name) for name in ("Dispatcher", "Route")}
    try:
        framing.Dispatcher = module.Dispatcher
        framing.Route = module.Route
        router._dispatcher = None
        return router._bind()
    finally:
        for name, value in saved.items():
            setattr(framing, name, value)


def _per_message(fn: Callable[[], Any], messages: int, rounds: int, repeat: int) -> float:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter_ns()
        for _ in range(repeat):
            fn()
        samples.append((time.perf_counter_ns() - began) / (repeat * messages))
    return statistics.median(samples)


def measure(case: str, backend: str, batch: int, rounds: int, repeat: int) -> dict[str, Any]:
    module = _message if backend == "c" else _message_py
    if case == "msgspec":
        router, request, _ = _router_msgspec()
        body = router.codec.encoder(type(request))(request)
        decode = router.codec.decoder(type(request))
        handler = router._handlers[1][0]
        encode = router.codec.encoder(type(request))
        sample = decode(body)
        reply = handler(None, sample)
    else:
        router = _router_raw(case == "raw-async")
        body = b"x" * 64
        decode = None
        handler = router._handlers[1][0]
        encode = None
        sample = body
    dispatcher = _dispatcher(module, router)
    frames = [module.encode_message(REQUEST, 1, i + 1, 0, body) for i in range(batch)]
    conn = _Conn()
    replies = dispatcher(conn, frames)
    assert replies is not None and len(replies) == batch, replies
    result: dict[str, Any] = {"case": case, "backend": backend, "batch": batch}
    result["dispatch_ns"] = _per_message(lambda: dispatcher(conn, frames), batch, rounds, repeat)

    def loop_of(step: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(batch):
                step()

        return run

    # What the plain loop and a lambda call cost, taken off each step alone.
    overhead = _per_message(loop_of(lambda: None), batch, rounds, repeat)
    result["loop_overhead_ns"] = overhead

    def step(fn: Callable[[], Any]) -> float:
        return max(_per_message(loop_of(fn), batch, rounds, repeat) - overhead, 0.0)

    if decode is not None:
        result["decode_ns"] = step(lambda: decode(body))
    else:
        result["decode_ns"] = 0.0
    if case == "raw-async":

        def call_async() -> None:
            coro = handler(None, sample)
            with contextlib.suppress(StopIteration):
                coro.send(None)

        result["handler_ns"] = step(call_async)
    else:
        result["handler_ns"] = step(lambda: handler(None, sample))
    if encode is not None:
        result["encode_ns"] = step(lambda: encode(reply))
    else:
        result["encode_ns"] = 0.0
    result["router_ns"] = (
        result["dispatch_ns"] - result["decode_ns"] - result["handler_ns"] - result["encode_ns"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="frames per read (16)")
    parser.add_argument("--rounds", type=int, default=7, help="timed runs per figure (7)")
    parser.add_argument("--repeat", type=int, default=20000, help="batches per run (20000)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    cases = ["raw-sync", "raw-async"]
    try:
        import msgspec  # noqa: F401

        cases.append("msgspec")
    except ImportError:
        print("msgspec is not installed: the msgspec case is skipped")
    rows = [
        measure(case, backend, args.batch, args.rounds, args.repeat)
        for case in cases
        for backend in ("c", "py")
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"ns per message, batches of {args.batch}, medians of {args.rounds} runs")
    print(f"{'case':<10} {'backend':<8} {'dispatch':>9} {'decode':>8} {'handler':>8} "
          f"{'encode':>8} {'router':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['case']:<10} {r['backend']:<8} {r['dispatch_ns']:>9.0f} {r['decode_ns']:>8.0f} "
            f"{r['handler_ns']:>8.0f} {r['encode_ns']:>8.0f} {r['router_ns']:>8.0f}"
        )


if __name__ == "__main__":
    main()
