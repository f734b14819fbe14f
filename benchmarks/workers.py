#!/usr/bin/env python3
"""Worker processes (``fastnet serve --workers N``): accept spread, scrape time, echo throughput.

Usage::

    python benchmarks/workers.py [--connections 1000] [--runs 3] [--duration 3]

Three measurements, each against ``python -m fastnet serve echo`` started
here with ``--metrics 127.0.0.1:0``:

1. Accept spread: ``--connections`` connections (20 open at a time, each one
   round trip) to 2 workers, with the default shared socket and with
   ``--reuse-port``; the per-worker accepts come from the supervisor's
   ``fastnet_worker_connections_accepted_total{worker=...}``; max/min.
2. Scrape time with 4 workers: 200 ``GET /metrics`` of the supervisor, after
   some traffic; median and 99th percentile, and the body size.
3. Echo throughput, 64 connections x 16 frames in flight x 64 B, with the C
   epoll generator (compare.py's ``cloadgen``) on the same 2 cores, not
   pinned: ``--workers 1`` vs ``--workers 2`` vs no supervisor, medians of
   ``--runs`` runs.

Results: benchmarks/results/workers.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (the C generator's build)

RESULTS = HERE / "results"
START_TIMEOUT = 30.0


class Served:
    """``fastnet serve echo ...`` with its port and metrics address."""

    def __init__(self, *extra: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "fastnet", "serve", "echo", "--port", "0"]
        command += ["--metrics", "127.0.0.1:0", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        self.port = int(self._line("listening on ").rsplit(":", 1)[1])
        self.metrics = self._line("metrics on ").split()[-1]

    def _line(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        # Bounded: the server is killed if the line does not come (a select on
        # the pipe would miss a line already in the file object's buffer).
        watchdog = threading.Timer(START_TIMEOUT, self.proc.kill)
        watchdog.start()
        try:
            line = self.proc.stdout.readline().decode().strip()
        finally:
            watchdog.cancel()
        if not line.startswith(prefix):
            self.proc.kill()
            raise RuntimeError(f"unexpected output: {line!r}")
        return line

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def per_worker(text: str) -> dict[str, int]:
    pattern = r'fastnet_worker_connections_accepted_total\{worker="(\d+)"\} (\S+)'
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(pattern, text)}


async def _connections(port: int, count: int, concurrency: int = 20) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00\x00\x00\x02hi")
            await reader.readexactly(6)
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(count)))


def accept_spread(connections: int, reuse_port: bool) -> dict[str, Any]:
    server = Served("--workers", "2", *(["--reuse-port"] if reuse_port else []))
    try:
        time.sleep(1.0)
        asyncio.run(_connections(server.port, connections))
        deadline = time.monotonic() + 10
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = per_worker(server.scrape())
            if sum(counts.values()) >= connections:
                break
            time.sleep(0.2)
    finally:
        server.stop()
    values = list(counts.values())
    return {
        "mode": "reuse-port" if reuse_port else "shared socket",
        "per_worker": counts,
        "max_over_min": round(max(values) / max(min(values), 1), 2),
    }


def scrape_time(workers: int = 4, scrapes: int = 200) -> dict[str, Any]:
    server = Served("--workers", str(workers))
    try:
        asyncio.run(_connections(server.port, 200))
        time.sleep(1.5)  # a heartbeat: every worker's snapshot is in
        times = []
        size = 0
        for _ in range(scrapes):
            start = time.perf_counter()
            size = len(server.scrape())
            times.append((time.perf_counter() - start) * 1000)
    finally:
        server.stop()
    times.sort()
    return {
        "workers": workers,
        "scrapes": scrapes,
        "median_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[int(len(times) * 0.99) - 1], 2),
        "bytes": size,
    }


def echo(generator: Path, extra: list[str], duration: float) -> dict[str, Any]:
    server = Served(*extra)
    try:
        time.sleep(1.0)
        command = [str(generator), "--port", str(server.port), "--connections", "64"]
        command += ["--depth", "16", "--size", "64", "--duration", str(duration)]
        command += ["--warmup", "1", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
        report: dict[str, Any] = json.loads(done.stdout)
    finally:
        server.stop()
    return report


def markdown(results: dict[str, Any]) -> str:
    """benchmarks/results/workers.md from the results."""
    lines = [
        "# Worker processes: accept spread, scrape time, echo throughput",
        "",
        f"Measured {results['date']} on the {results['cpus']}-core development VM, shared with "
        "other engineers' runs, by `python benchmarks/workers.py` (raw: workers.json).",
        "",
        "## Accept spread: 1,000 connections, 2 workers",
        "",
        "One client opening 1,000 connections, 20 open at a time, each one round trip; the "
        'per-worker counts are `fastnet_worker_connections_accepted_total{worker="N"}` from the '
        "supervisor's `/metrics`.",
        "",
        "| socket mode | worker 0 | worker 1 | max / min |",
        "|---|---:|---:|---:|",
    ]
    for row in results["spread"]:
        counts = row["per_worker"]
        lines.append(
            f"| {row['mode']} | {counts.get('0', 0)} | {counts.get('1', 0)} "
            f"| {row['max_over_min']:.2f} |"
        )
    scrape = results["scrape"]
    lines += [
        "",
        f"## Scrape time with {scrape['workers']} workers",
        "",
        f"{scrape['scrapes']} sequential `GET /metrics` of the supervisor (urllib, a new "
        "connection each, after 200 connections were served), the whole HTTP round trip: "
        f"median **{scrape['median_ms']} ms**, 99th percentile {scrape['p99_ms']} ms, "
        f"{scrape['bytes']:,} bytes of text. A scrape never waits for a worker: it sums the "
        "snapshots that came with the last heartbeat.",
        "",
        "## Echo throughput on the same 2 cores",
        "",
        "`fastnet serve echo` (uvloop, extension), the C epoll generator "
        "(`benchmarks/.build/cloadgen`, from compare.py) with 64 connections x 16 frames in "
        "flight x 64 B, 1 s warm-up + 3 s, nothing pinned: the generator, the worker(s) and the "
        "supervisor share the VM's 2 cores (and share them with other engineers' runs).",
        "",
        "| server | frames/s, median | runs | CPU of all but the generator (cores) |",
        "|---|---:|---|---:|",
    ]
    for row in results["echo"]:
        runs = ", ".join(f"{r / 1e6:.2f} M" for r in row["runs"])
        lines.append(
            f"| {row['server']} | {row['median_frames_per_s'] / 1e6:.2f} M | {runs} "
            f"| {row['other_cpu_cores']} |"
        )
    lines += [
        "",
        "It does not double, and cannot here: the generator needs most of a core, so two "
        "workers get the remaining one and a fraction between them, and the two cores are "
        "shared with other engineers' runs. The supervisor does no per-frame work (one ping "
        "per worker per second, a snapshot in reply); where `--workers 1` and one process "
        "differ, compare it with the spread of their runs and with the other engineers' load "
        "in the last column before reading anything into it. Every server here has metrics on "
        "(`--metrics`), as the scrape needs.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite workers.md from workers.json"
    )
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / "workers.json").read_text())
        (RESULTS / "workers.md").write_text(markdown(saved))
        return 0

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    results["spread"] = [accept_spread(args.connections, mode) for mode in (False, True)]
    for row in results["spread"]:
        print("spread", row, flush=True)
    results["scrape"] = scrape_time()
    print("scrape", results["scrape"], flush=True)
    generator = compare.build_cloadgen()
    echo_rows = []
    for label, extra in (
        ("one process (no supervisor)", []),
        ("--workers 1", ["--workers", "1"]),
        ("--workers 2", ["--workers", "2"]),
    ):
        rates = []
        other = []
        for _ in range(args.runs):
            report = echo(generator, extra, args.duration)
            rates.append(float(report["frames_per_s"]))
            other.append(float(report.get("other_cpu_util") or 0.0))
        row: dict[str, Any] = {"server": label, "runs": [round(r) for r in rates]}
        row["median_frames_per_s"] = round(statistics.median(rates))
        # CPU used by every process but the generator (servers, workers, and
        # the other engineers' runs on this shared machine), in cores.
        row["other_cpu_cores"] = round(statistics.median(other), 2)
        echo_rows.append(row)
        print("echo", row, flush=True)
    results["echo"] = echo_rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "workers.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
