"""User-space instructions per frame of each echo server under load, counted by callgrind.

Usage::

    python benchmarks/server_instructions.py            # rpc and many: fastnet, Tokio, ...
    python benchmarks/server_instructions.py --fastnet-before OTHER_VENV/bin/python

compare.py measures time, which this shared machine's other work moves by
±15% between runs of the same server: more than a change to the per-read
path moves it. Instructions do not move. Each server here runs under
``valgrind --tool=callgrind`` with instrumentation off; the C generator
(``loadgen_c/cloadgen.c``) connects and warms up, callgrind counts only
while the generator measures (``callgrind_control -i on/off``), and the
server's instructions in that window divided by the frames the generator
counted in it is the figure. It covers everything the server process runs
in user space (the event loop, CPython, fastnet, the libc calls), for
Tokio too, and nothing of the kernel's work, which ``perf`` shows is the
same per frame for all of them (docs/design.md §5). Under valgrind a server
runs some 50 times slower, so more frames may wait per read than at full
speed; at one frame in flight per connection (rpc, many) a read still holds
one frame.

The servers and workloads are compare.py's (the same commands, no pinning).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import compare

DEFAULT_SERVERS = ("fastnet", "fastnet-task", "protocol-reflect", "protocol", "tokio")
START_TIMEOUT = 120.0  # a Python server under valgrind takes seconds to start


def totals(path: Path) -> dict[str, int]:
    """The events a callgrind output file counted, by name (its ``events:`` and ``totals:``)."""
    names: list[str] = []
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("totals:"):
            for name, value in zip(names, line.split()[1:], strict=True):
                counts[name] = counts.get(name, 0) + int(value)
    return counts


def count(kind: compare.ServerKind, workload: compare.Workload, args: argparse.Namespace) -> dict:
    """One server under callgrind: its user-space instructions per frame in the measured window."""
    loop = compare.NATIVE_LOOP if kind.native else args.loop
    with tempfile.TemporaryDirectory() as where:
        out = Path(where) / "callgrind.out"
        wrap = (
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            *(["--cache-sim=yes"] if args.cache_sim or args.cache_ll else []),
            *([f"--LL={args.cache_ll},8,64"] if args.cache_ll else []),
        )  # fmt: skip
        server = compare.ServerProcess(kind, loop, pin=False, wrap=wrap)
        pid = str(server.proc.pid)
        try:
            generator = subprocess.Popen(
                [
                    compare.EXTERNAL["cloadgen"], "--host", server.host, "--port", str(server.port),
                    "--connections", str(workload.connections), "--depth", str(workload.depth),
                    "--size", str(workload.size), "--duration", str(args.duration),
                    "--warmup", str(args.warmup), "--json",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            time.sleep(args.warmup)
            subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=True)
            time.sleep(args.duration)
            subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, check=True)
            report, _ = generator.communicate(timeout=args.duration + 60)
        finally:
            problem = server.stop()  # valgrind writes its file as the server exits
        result = json.loads(report)
        frames = int(result["frames"])
        counted = totals(out)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            kept = args.keep / f"callgrind.{workload.name}.{kind.name}.{loop}"
            shutil.copyfile(out, kept)
            print(f"kept {kept} (callgrind_annotate --inclusive=yes {kept})", file=sys.stderr)
    if result.get("errors"):
        # The generator checks every echo: a count of a server that answered wrongly is void.
        raise RuntimeError(f"{kind.name} {workload.name}: {result['errors']} echo errors")
    if problem:
        print(f"warning: {kind.name} {problem}", file=sys.stderr)
    row = {
        "workload": workload.name,
        "server": kind.name,
        "loop": loop,
        "frames": frames,
        "instructions": counted.get("Ir", 0),
        "per_frame": counted.get("Ir", 0) / frames if frames else None,
    }
    if (args.cache_sim or args.cache_ll) and frames:
        # Simulated first-level data misses and last-level misses (data and code).
        row["d1_misses_per_frame"] = (counted["D1mr"] + counted["D1mw"]) / frames
        row["ll_misses_per_frame"] = (counted["DLmr"] + counted["DLmw"] + counted["ILmr"]) / frames
    return row


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# User-space instructions per frame (callgrind)",
        "",
        f"- command: `{command}`",
        "- each server under `valgrind --tool=callgrind`, counted only while the C generator",
        "  measured; the server's instructions in that window ÷ the frames it echoed",
        "",
        "| workload | server | loop | frames counted | instructions per frame | ÷ Tokio |",
        "|---|---|---|---:|---:|---:|",
    ]
    misses = any("ll_misses_per_frame" in row for row in rows)
    if misses:
        lines[-2] += " L1 data misses per frame | last-level misses per frame |"
        lines[-1] += "---:|---:|"
    for row in rows:
        tokio = next(
            (r["per_frame"] for r in rows if r["server"] == "tokio"
             and r["workload"] == row["workload"]),
            None,
        )  # fmt: skip
        ratio = f"{row['per_frame'] / tokio:.2f}x" if tokio and row["per_frame"] else "-"
        per_frame = f"{row['per_frame']:,.0f}" if row["per_frame"] else "-"
        lines.append(
            f"| {row['workload']} | {row['server']} | {row['loop']} | {row['frames']:,} "
            f"| {per_frame} | {ratio} |"
        )
        if misses:
            d1, ll = row.get("d1_misses_per_frame", 0), row.get("ll_misses_per_frame", 0)
            lines[-1] += f" {d1:.1f} | {ll:.1f} |"
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="rpc,many", help="of: small, rpc, large, many")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS))
    parser.add_argument(
        "--fastnet-before",
        metavar="PYTHON",
        help="also fastnet-before and fastnet-task-before from this interpreter",
    )
    parser.add_argument("--loop", default="uvloop", choices=compare.LOOPS)
    parser.add_argument("--duration", type=float, default=6.0, help="counted seconds (6)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before counting (3)")
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate the caches: data misses per frame (slower)",
    )
    parser.add_argument(
        "--cache-ll",
        type=int,
        metavar="BYTES",
        help="simulate the caches with a last-level cache of BYTES (8-way, 64-byte lines): "
        "callgrind's LL stands for the host's L3; 262144, smaller than every server's "
        "per-connection data at 1,000 connections, makes its misses per frame the cache "
        "lines of per-connection data a frame touches",
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep each callgrind profile in DIR, for callgrind_annotate",
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install valgrind)")
    compare.START_TIMEOUT = START_TIMEOUT
    compare.EXTERNAL["cloadgen"] = str(compare.build_cloadgen())
    names = args.servers.split(",")
    if args.fastnet_before:
        compare.EXTERNAL["before"] = args.fastnet_before
        names += list(compare.BEFORE_SERVERS)
    if "tokio" in names:
        try:
            binary, _ = compare.build_tokio()
            compare.EXTERNAL["tokio"] = str(binary)
        except compare.BuildError as exc:
            print(f"SKIPPED tokio: {exc}", file=sys.stderr)
            names.remove("tokio")
    kinds = {kind.name: kind for kind in compare.SERVERS}
    workloads = {w.name: w for w in compare.WORKLOADS}
    rows = []
    for workload_name in args.workloads.split(","):
        for name in names:
            row = count(kinds[name], workloads[workload_name], args)
            rows.append(row)
            misses = ""
            if "d1_misses_per_frame" in row:
                misses = (f"  {row['d1_misses_per_frame']:6.1f} L1d misses/frame"
                          f"  {row['ll_misses_per_frame']:5.2f} LL misses/frame")  # fmt: skip
            print(f"{row['workload']:6} {row['server']:20} {row['loop']:15} "
                  f"{row['frames']:>9,} frames  {row['per_frame'] or 0:>9,.0f} instructions/frame"
                  f"{misses}", flush=True)  # fmt: skip
    # No machine's paths in the record: the interpreter is PYTHON, another path PATH.
    argv = sys.argv[1:]
    command = "python benchmarks/server_instructions.py " + " ".join(
        a if not a.startswith("/") else "PYTHON" if argv[i - 1] == "--fastnet-before" else "PATH"
        for i, a in enumerate(argv)
    )
    text = markdown(rows, command.strip())
    print()
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
