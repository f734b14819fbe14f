#!/usr/bin/env python3
"""Fuzz the line decoder: the extension against the pure-Python twin.

Strategy: the input chooses a delimiter (one to four bytes, mostly from a
small alphabet so that partial delimiters, overlaps such as ``b"\\n\\n"`` and
``\\r\\n`` stripping occur), ``max_length`` and ``strip``; the stream is built
from tokens (the delimiter, prefixes of it, ``\\r``, short raw runs, runs
longer than ``max_length``) so that lines end, straddle reads and overflow.
The delivery script and the comparison are ``differential.drive_decoder``'s,
as for the length-prefixed decoder; a line decoder goes on after errors and
after ``eof``, so the script keeps feeding it.

Run (see the Makefile's ``fuzz`` target for the sanitizer environment):
    python fuzz/fuzz_lines.py -max_total_time=60 CORPUS_DIR
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["fastnet", "differential"]):
    import differential

    from fastnet import Lines

# Bytes delimiters are drawn from: with so few, a random stream contains
# delimiters, their prefixes and their overlaps often.
ALPHABET = b"\n\r\x00aEND"
# max_length values: zero, tiny, around the 64 KiB read size, and larger.
MAX_LENGTHS = [0, 1, 2, 3, 5, 20, 255, 1000, 65535, 65536, 70_000, 1 << 20]


def make_spec(fdp: Any) -> Lines:
    if fdp.ConsumeBool():
        delimiter = fdp.PickValueInList([b"\n", b"\r\n", b"\x00", b"\n\n", b"END", b"\r\n\r\n"])
    else:
        size = fdp.ConsumeIntInRange(1, 4)
        delimiter = bytes(
            ALPHABET[fdp.ConsumeIntInRange(0, len(ALPHABET) - 1)] for _ in range(size)
        )
    return Lines(
        delimiter=delimiter,
        max_length=fdp.PickValueInList(MAX_LENGTHS),
        strip=fdp.ConsumeBool(),
    )


def make_stream(fdp: Any, spec: Lines) -> bytes:
    delimiter = spec.delimiter
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        kind = fdp.ConsumeIntInRange(0, 7)
        if kind <= 1:
            parts.append(delimiter)
        elif kind == 2:
            parts.append(delimiter[: fdp.ConsumeIntInRange(1, len(delimiter))])
        elif kind == 3:
            parts.append(b"\r")
        elif kind == 4:
            parts.append(bytes([ALPHABET[fdp.ConsumeIntInRange(0, len(ALPHABET) - 1)]]))
        elif kind == 5:
            parts.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)))
        elif kind == 6:
            parts.append(b"x" * fdp.ConsumeIntInRange(0, 40))
        else:
            # Around a limit: max_length +/- a few bytes, or a run past the read size.
            near = min(spec.max_length, 1 << 17) + fdp.ConsumeIntInRange(-2, 2)
            parts.append(b"y" * max(0, near if fdp.ConsumeBool() else 70_000))
    return b"".join(parts)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    try:
        spec = make_spec(fdp)
    except ValueError:  # a layout the spec refuses when built (tests/test_encode.py covers it)
        return
    stream = make_stream(fdp, spec)
    c, py = differential.backends()
    pair = differential.Lockstep(c.LineDecoder(spec), py.LineDecoder(spec), repr(spec))
    differential.drive_decoder(fdp, pair, stream)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
