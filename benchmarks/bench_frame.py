"""Codec micro-benchmarks: the extension and the pure-Python twin side by side.

Run: ``python -m pytest benchmarks/bench_frame.py`` (``make bench`` does).
Cases, each on both backends:

- 64-byte frames fed in 64 KiB chunks (frames/s);
- 1 MiB frames received through get_buffer/buffer_updated, the way asyncio's
  BufferedProtocol drives a decoder (B/s), next to a plain copy of the same
  1 MiB into a preallocated buffer measured in the same run: the simulated
  kernel write is the only copy a perfect decoder would make;
- ``encode_many`` of 1,000 payloads of 64 bytes (frames/s).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from fastnet import LengthPrefixed

SMALL = 64
CHUNK = 64 * 1024
LARGE = 1 << 20
LARGE_FRAMES = 16

spec = LengthPrefixed(max_frame=2 * LARGE)


def impl_id(frame_impl: ModuleType) -> str:
    return "c" if frame_impl.__name__.endswith("_frame") else "py"


def test_decode_small_frames(benchmark: Any, record: Any, frame_impl: ModuleType) -> None:
    frame = spec.encode(b"x" * SMALL)
    count = CHUNK // len(frame)
    chunk = frame * count  # 64 KiB of whole frames...
    chunks = [chunk[:1000], chunk[1000:] + chunk[:1000], chunk[1000:]]  # ...cut mid-frame too
    decoder = frame_impl.LengthPrefixedDecoder(spec)

    def run() -> int:
        n = 0
        for piece in chunks:
            n += len(decoder.feed(piece))
        return n

    assert run() == 2 * count
    benchmark.group = "decode 64 B frames"
    benchmark(run)
    record(
        "decode 64 B frames, 64 KiB chunks", impl_id(frame_impl), 2 * count, "frames/s", benchmark
    )


def receive(decoder: Any, stream: memoryview) -> int:
    """Copy ``stream`` into the decoder's windows, as recv_into would, and count frames."""
    frames = 0
    pos = 0
    end = len(stream)
    while pos < end:
        view = decoder.get_buffer(-1)
        n = min(len(view), end - pos)
        view[:n] = stream[pos : pos + n]
        pos += n
        frames += len(decoder.buffer_updated(n))
    return frames


def test_decode_large_frames(benchmark: Any, record: Any, frame_impl: ModuleType) -> None:
    stream = memoryview(spec.encode_many([bytes([i]) * LARGE for i in range(LARGE_FRAMES)]))
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    assert receive(decoder, stream) == LARGE_FRAMES
    benchmark.group = "decode 1 MiB frames"
    benchmark(receive, decoder, stream)
    record(
        "decode 1 MiB frames via get_buffer",
        impl_id(frame_impl),
        LARGE_FRAMES * LARGE,
        "B/s",
        benchmark,
    )


def test_memcpy_baseline(benchmark: Any, record: Any) -> None:
    """The same bytes copied once into a preallocated buffer, 1 MiB at a time."""
    stream = memoryview(spec.encode_many([bytes([i]) * LARGE for i in range(LARGE_FRAMES)]))
    target = memoryview(bytearray(LARGE))

    def copy() -> None:
        for i in range(LARGE_FRAMES):
            target[:] = stream[i * LARGE : (i + 1) * LARGE]

    benchmark.group = "decode 1 MiB frames"
    benchmark(copy)
    record("decode 1 MiB frames via get_buffer", "memcpy", LARGE_FRAMES * LARGE, "B/s", benchmark)


def test_encode_many(benchmark: Any, record: Any, frame_impl: ModuleType) -> None:
    payloads = [bytes([i % 256]) * SMALL for i in range(1000)]
    encoder = frame_impl.LengthPrefixedEncoder(spec)
    assert len(encoder.encode_many(payloads)) == 1000 * (SMALL + 4)
    benchmark.group = "encode_many 1000 x 64 B"
    benchmark(encoder.encode_many, payloads)
    record("encode_many 1000 x 64 B", impl_id(frame_impl), 1000, "frames/s", benchmark)


@pytest.mark.parametrize("size", [SMALL])
def test_decode_lines(benchmark: Any, record: Any, frame_impl: ModuleType, size: int) -> None:
    from fastnet import Lines

    lines = Lines()
    chunk = (b"y" * size + b"\r\n") * (CHUNK // (size + 2))
    decoder = frame_impl.LineDecoder(lines)
    count = len(decoder.feed(chunk))
    benchmark.group = "decode 64 B lines"
    benchmark(decoder.feed, chunk)
    record("decode 64 B lines, 64 KiB chunks", impl_id(frame_impl), count, "frames/s", benchmark)
