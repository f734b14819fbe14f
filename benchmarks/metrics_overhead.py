#!/usr/bin/env python3
"""What metrics cost: fastnet's echo with ``--metrics`` on and off, alternating, in one sitting.

Usage::

    python benchmarks/metrics_overhead.py [--runs 5] [--duration 3] [--loop uvloop]

Each run starts ``fastnet serve echo`` (pinned to CPU 0), with metrics off,
then with ``--metrics 127.0.0.1:0`` (the collector registered, the core
filling its per-read histograms; nothing scrapes during the run, as between
Prometheus's scrapes), and drives it with the C epoll generator pinned to
CPU 1 (compare.py's machinery), alternating off/on (in ABBA order, so
neither always runs first) so drift on a shared machine hits both alike. It
reports the median frames/s and server CPU µs per frame of each, and the
ratio on/off, for 64x16x64 B and 64x1x64 B.
Results go to benchmarks/results/metrics_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (the harness's processes, pinning and generator)

WORKLOADS = (
    compare.Workload("small", "64 x 16 x 64 B", 64, 16, 64),
    compare.Workload("rpc", "64 x 1 x 64 B", 64, 1, 64),
)
FASTNET = compare.ServerKind("fastnet", "fastnet echo (extension)")
METRICS_ON = ("--metrics", "127.0.0.1:0")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    pin = compare.pinning_available() and not args.no_pin
    compare.EXTERNAL["cloadgen"] = str(compare.build_cloadgen())
    load_args = argparse.Namespace(
        generator="c", generator_loop="asyncio", duration=args.duration, warmup=args.warmup
    )
    results: dict[str, Any] = {}
    for workload in WORKLOADS:
        samples: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for run in range(args.runs):
            # ABBA order: neither mode always runs first in its pair.
            for mode in ("off", "on") if run % 2 == 0 else ("on", "off"):
                extra = METRICS_ON if mode == "on" else ()
                server = compare.ServerProcess(FASTNET, args.loop, pin, extra=extra)
                try:
                    report = compare.run_load(server, workload, load_args, pin)
                finally:
                    problem = server.stop()
                if problem:
                    raise RuntimeError(f"the server ({mode}) {problem}")
                samples[mode].append(report)
                print(
                    f"{workload.name:6} run {run + 1} metrics {mode:3} "
                    f"{report['frames_per_s']:>12,.0f} frames/s "
                    f"{report['server_cpu_us_per_frame']:6.3f} µs/frame",
                    flush=True,
                )
        row: dict[str, Any] = {"title": workload.title}
        for mode, reports in samples.items():
            row[mode] = {
                "frames_per_s": statistics.median(r["frames_per_s"] for r in reports),
                "server_cpu_us_per_frame": statistics.median(
                    r["server_cpu_us_per_frame"] for r in reports
                ),
                "runs": [r["frames_per_s"] for r in reports],
            }
        row["ratio_frames_per_s"] = row["on"]["frames_per_s"] / row["off"]["frames_per_s"]
        row["ratio_cpu"] = (
            row["on"]["server_cpu_us_per_frame"] / row["off"]["server_cpu_us_per_frame"]
        )
        results[workload.name] = row
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loop": args.loop,
        "runs": args.runs,
        "duration": args.duration,
        "pinned": pin,
        "generator": "C epoll (benchmarks/loadgen_c/cloadgen.c)",
        "workloads": results,
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Metrics on vs off",
        "",
        f"{data['date']}, `fastnet serve echo` on {data['loop']}, "
        f"{'server on CPU 0, generator on CPU 1' if data['pinned'] else 'not pinned'}, "
        f"{data['runs']} alternating runs of {data['duration']:g} s each, medians. "
        "Command: `python benchmarks/metrics_overhead.py`.",
        "",
        "| workload | off frames/s | on frames/s | on ÷ off | off µs/frame | on µs/frame "
        "| CPU on ÷ off |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["workloads"].values():
        off, on = row["off"], row["on"]
        lines.append(
            f"| {row['title']} | {off['frames_per_s']:,.0f} | {on['frames_per_s']:,.0f} "
            f"| {row['ratio_frames_per_s']:.3f} | {off['server_cpu_us_per_frame']:.3f} "
            f"| {on['server_cpu_us_per_frame']:.3f} | {row['ratio_cpu']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    data = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics_overhead.json").write_text(json.dumps(data, indent=2) + "\n")
    text = render(data)
    (args.out / "metrics_overhead.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
