"""Instructions one read costs in the connection, counted by callgrind (not timed).

Usage::

    python benchmarks/per_read_instructions.py            # runs valgrind itself, prints a table
    python benchmarks/per_read_instructions.py --mode conn --reads 20000   # one run, no valgrind

A machine shared with other work makes timings noisy; callgrind counts
instructions, which do not change with the load (the same total twice, once
with the other core busy). Each mode is run twice under
``valgrind --tool=callgrind``, with 0 reads and with ``--reads`` reads, and
the difference divided by the reads is the cost of one read:

- ``conn``: a ``Connection`` with the built-in ``echo`` callback handler on a
  transport that drops what is written: ``get_buffer``, a 68-byte frame
  copied in, ``buffer_updated``: the connection's whole per-read path.
- ``metrics``: ``conn`` with metrics on (the server's ``ReadStats``
  attached): what the two per-read histograms and their clock reads add.
- ``bare``: the decoder, ``encode_many`` and the same ``write``, with no
  connection around them: what the job itself needs.

The backend is the one ``fastnet`` picks (``FASTNET_NO_EXTENSIONS=1`` for
the pure-Python twin).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Any

FRAME = struct.pack(">I", 64) + b"x" * 64


class _DropTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _drive(mode: str, reads: int) -> None:
    import fastnet
    from fastnet.apps import echo

    transport = _DropTransport()
    if mode in ("conn", "metrics"):
        conn = fastnet.Connection(fastnet.LengthPrefixed())
        conn._on_frames = echo.fn
        if mode == "metrics":
            conn._read_stats = conn._new_read_stats()
        conn.connection_made(transport)
        get_buffer, buffer_updated = conn.get_buffer, conn.buffer_updated
        for _ in range(reads):
            get_buffer(-1)[:68] = FRAME
            buffer_updated(68)
    else:
        spec = fastnet.LengthPrefixed()
        decoder = spec.decoder()
        get_buffer, decoded = decoder.get_buffer, decoder.buffer_updated
        encode_many, write = spec.encoder.encode_many, transport.write
        for _ in range(reads):
            get_buffer(-1)[:68] = FRAME
            write(encode_many(decoded(68)))
    assert transport.writes == reads


def _count(mode: str, reads: int) -> int:
    with tempfile.TemporaryDirectory() as where:
        out = os.path.join(where, "callgrind.out")
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             __file__, "--mode", mode, "--reads", str(reads)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{result.stderr}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("conn", "metrics", "bare"))
    parser.add_argument("--reads", type=int, default=20_000)
    args = parser.parse_args()
    if args.mode is not None:
        asyncio.run(_drive(args.mode, args.reads))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    import fastnet

    backend = "extension" if fastnet.ACCELERATED else "pure Python"
    print(f"instructions per read ({backend}, {args.reads} reads, callgrind)")
    for mode in ("conn", "metrics", "bare"):
        per_read = (_count(mode, args.reads) - _count(mode, 0)) / args.reads
        print(f"  {mode:5} {per_read:8,.0f}")


if __name__ == "__main__":
    main()
