"""The client's cost: fastnet.Client against a hand-written asyncio client, on router-echo.

    python benchmarks/client_bench.py [--runs 5] [--duration 2] [--loops uvloop,asyncio]

One ``fastnet serve router-echo`` server (extension built) is pinned to CPU 0;
the client runs in this process, pinned to CPU 1 (``taskset``/affinity;
unpinned with a warning where that is impossible). Each case runs 64
concurrent callers, each awaiting ``call(64-byte body)`` in a loop, for
``--duration`` seconds after a warmup; cases are interleaved round by round
and each figure is the median of ``--runs``. Per case: calls/s and the client
process's CPU microseconds per call (``time.process_time``), the fair
comparison when the server is the limit.

Cases:

- ``mux``: ``fastnet.Client``, one connection, 64 calls in flight on it
  (multiplexed by request id, replies matched by id);
- ``conns``: ``fastnet.Client``, 64 connections, one call in flight on each;
- ``raw``: the baseline, a hand-written ``asyncio.Protocol`` client doing the
  same thing with no more work than the job needs: one connection, each call
  packs the 12-byte header and the body behind a 4-byte length, stores a
  Future under its id, and ``data_received`` cuts the replies and resolves
  the futures. No balancing, no breaker, no retries, no timeout.

Issue 13's targets: mux ≥ 0.8x conns in calls/s; Client (mux) CPU per call
≤ 1.5x raw's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import fastnet

HEADER = struct.Struct(">IBBHII")  # length, then the router header
CALLERS = 64
BODY = b"x" * 64
SERVER_CPU = 0
CLIENT_CPU = 1


class RawClient(asyncio.Protocol):
    """The baseline: router requests on one connection, replies matched by id."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.buffer = b""
        self.next_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        offset = 0
        end = len(buffer)
        pending = self.pending
        while end - offset >= 16:
            length, _kind, _, _, id_, _ = HEADER.unpack_from(buffer, offset)
            if end - offset - 4 < length:
                break
            future = pending.pop(id_, None)
            if future is not None and not future.done():
                future.set_result(buffer[offset + 16 : offset + 4 + length])
            offset += 4 + length
        self.buffer = buffer[offset:]

    def call(self, body: bytes) -> asyncio.Future[bytes]:
        self.next_id = id_ = self.next_id % 0xFFFFFFFF + 1
        future = asyncio.get_running_loop().create_future()
        self.pending[id_] = future
        assert self.transport is not None
        self.transport.write(HEADER.pack(12 + len(body), 1, 0, 1, id_, 0) + body)
        return future


async def measure(
    call: Callable[[], Awaitable[Any]], duration: float, warmup: float
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    state = {"count": 0, "measuring": False, "stop": False}

    async def caller() -> None:
        while not state["stop"]:
            await call()
            if state["measuring"]:
                state["count"] += 1

    tasks = [loop.create_task(caller()) for _ in range(CALLERS)]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.sleep(duration)
    state["measuring"] = False
    elapsed, cpu_used = time.perf_counter() - began, time.process_time() - cpu
    state["stop"] = True
    await asyncio.gather(*tasks)
    count = state["count"]
    return {"calls_per_s": count / elapsed, "client_cpu_us_per_call": cpu_used / count * 1e6}


async def run_case(case: str, port: int, duration: float, warmup: float) -> dict[str, float]:
    if case == "raw":
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(RawClient, "127.0.0.1", port)
        try:
            return await measure(lambda: protocol.call(BODY), duration, warmup)
        finally:
            transport.close()
    per_endpoint, in_flight = (1, CALLERS) if case == "mux" else (CALLERS, 1)
    client = fastnet.Client(
        [("127.0.0.1", port)],
        connections_per_endpoint=per_endpoint,
        max_in_flight=in_flight,
    )
    try:
        return await measure(lambda: client.call(BODY, type=1), duration, warmup)
    finally:
        await client.close()


def start_server(pin: bool) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, "-m", "fastnet", "serve", "router-echo", "--port", "0"]
    command += ["--log-level", "warning", "--max-connections", "1000"]
    if pin:
        command = ["taskset", "-c", str(SERVER_CPU), *command]
    env = dict(os.environ)
    env.pop("FASTNET_NO_EXTENSIONS", None)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--loops", default="uvloop,asyncio")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    pin = shutil.which("taskset") is not None and {0, 1} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    else:
        print("warning: not pinned (taskset or two CPUs missing)", file=sys.stderr)
    cases = ("mux", "conns", "raw")
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for loop_name in args.loops.split(","):
        results[loop_name] = {case: [] for case in cases}
        for round_ in range(args.runs):
            for case in cases:
                proc, port = start_server(pin)
                try:
                    figures = fastnet.runner.run_coroutine(
                        run_case(case, port, args.duration, args.warmup), loop=loop_name
                    )
                finally:
                    proc.terminate()
                    proc.communicate(timeout=30)
                results[loop_name][case].append(figures)
                print(
                    f"{loop_name:<8} round {round_ + 1} {case:<6} "
                    f"{figures['calls_per_s']:>10,.0f} calls/s "
                    f"{figures['client_cpu_us_per_call']:6.2f} us/call",
                    file=sys.stderr,
                )
    where = f"server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if pin else "unpinned"
    runs = f"medians of {args.runs} runs of {args.duration} s"
    print(f"\n{CALLERS} callers, 64 B bodies, {runs}; {where}")
    print("| loop | case | calls/s | client CPU µs/call |")
    print("|---|---|---:|---:|")
    summary: dict[str, Any] = {}
    for loop_name, by_case in results.items():
        summary[loop_name] = {}
        for case, runs in by_case.items():
            rate = statistics.median(r["calls_per_s"] for r in runs)
            cpu = statistics.median(r["client_cpu_us_per_call"] for r in runs)
            summary[loop_name][case] = {"calls_per_s": rate, "client_cpu_us_per_call": cpu}
            print(f"| {loop_name} | {case} | {rate:,.0f} | {cpu:.2f} |")
    print("\n| loop | mux ÷ conns (calls/s, target ≥ 0.8) | mux ÷ raw (CPU/call, target ≤ 1.5) |")
    print("|---|---:|---:|")
    for loop_name, by_case in summary.items():
        ratio = by_case["mux"]["calls_per_s"] / by_case["conns"]["calls_per_s"]
        cpu = by_case["mux"]["client_cpu_us_per_call"] / by_case["raw"]["client_cpu_us_per_call"]
        print(f"| {loop_name} | {ratio:.2f} | {cpu:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": results, "summary": summary, "argv": sys.argv[1:]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
