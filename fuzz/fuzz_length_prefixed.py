#!/usr/bin/env python3
"""Fuzz the length-prefixed decoder: the extension against the pure-Python twin.

Strategy: the input chooses a layout (field size 1/2/3/4/8, byte order,
offset, adjustment, strip, max_frame), builds a stream from pieces that are
mostly well-formed (valid frames, some past ``DIRECT_THRESHOLD`` so they take
the direct-receive path, headers with arbitrary length fields, raw bytes), and
then a script of calls that deliver it: ``feed`` and BufferedProtocol reads
with chosen size hints, out-of-turn ``buffer_updated``, ``eof``. Both backends
run the script in lockstep (``differential.Lockstep``); any difference, any
unexpected exception and any sanitizer report is a finding.

Run (see the Makefile's ``fuzz`` target for the sanitizer environment):
    python fuzz/fuzz_length_prefixed.py -max_total_time=60 CORPUS_DIR
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["fastnet", "differential"]):
    import differential

    from fastnet import LengthPrefixed

# max_frame values: 0 and tiny limits (every frame too large), around the
# direct-receive threshold (32 KiB), and the default 8 MiB. Larger limits
# only let a random header ask for more memory per input, which libFuzzer's
# malloc limit would report as a crash.
MAX_FRAMES = [0, 1, 7, 255, 300, 32767, 32768, 40_000, 70_000, 1 << 20, 8 << 20]


def make_spec(fdp: Any) -> LengthPrefixed:
    size = fdp.PickValueInList([1, 2, 3, 4, 8])
    offset = fdp.ConsumeIntInRange(0, 5)
    strip = fdp.ConsumeIntInRange(-1, offset + size + 4)
    return LengthPrefixed(
        length_size=size,
        byteorder=fdp.PickValueInList(["big", "little"]),
        offset=offset,
        adjustment=fdp.ConsumeIntInRange(-12, 12),
        strip=None if strip < 0 else strip,
        max_frame=fdp.PickValueInList(MAX_FRAMES),
    )


def make_stream(fdp: Any, spec: LengthPrefixed) -> bytes:
    """Pieces of a stream: frames (small and large), bare headers, raw bytes."""
    field_range = 1 << (8 * spec.length_size)
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind == 0:
            parts.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)))
            continue
        if kind == 1:
            # A header with any field value (often too large or negative once adjusted).
            field = fdp.ConsumeIntInRange(0, field_range - 1)
            parts.append(fdp.ConsumeBytes(spec.offset).ljust(spec.offset, b"\x00"))
            parts.append(field.to_bytes(spec.length_size, spec.byteorder))
            continue
        body = fdp.ConsumeIntInRange(0, 300) if kind < 5 else fdp.ConsumeIntInRange(32_000, 70_000)
        field = max(0, body - spec.adjustment) % field_range
        real = max(0, field + spec.adjustment)
        parts.append(fdp.ConsumeBytes(spec.offset).ljust(spec.offset, b"\x5a"))
        parts.append(field.to_bytes(spec.length_size, spec.byteorder))
        parts.append(bytes([body & 0xFF]) * real)
    return b"".join(parts)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    try:
        spec = make_spec(fdp)
    except ValueError:  # a layout the spec refuses when built (tests/test_encode.py covers it)
        return
    stream = make_stream(fdp, spec)
    c, py = differential.backends()
    pair = differential.Lockstep(
        c.LengthPrefixedDecoder(spec), py.LengthPrefixedDecoder(spec), repr(spec)
    )
    differential.drive_decoder(fdp, pair, stream)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
