"""Send-queue micro-benchmarks: OutQueue against today's list + encode_many, c and py.

Run: ``python -m pytest benchmarks/bench_outq.py`` (pytest-benchmark; the
summary table at the end gives frames/s per case and backend).

What a connection does per batch of replies, on both backends:

- ``OutQueue``: ``append`` per frame (validated and copied at once), then
  ``nbytes`` (the byte counter) and ``take()`` (one bytes object, or
  ``[header, payload]`` iovecs);
- ``list + encode_many``: ``list.append`` per frame, then
  ``encoder.encode_many(list)``;
- ``list + _flush``: what protocol.py does today: ``list.append`` per frame,
  then ``_flush``'s scan for a large payload (``max(map(len, out))``), and
  ``encode_many``, or for a batch with large payloads ``_flush_large``
  (``encoder.header(len(frame))`` and the payload object, no copy).

Workloads: 64-byte frames in batches of 16 (a pipelining client) and of 1
(request/response), and 64 KiB frames in batches of 4, kept unjoined by
OutQueue (threshold 32 KiB, protocol.LARGE_FRAME) and, for reference,
copied (threshold 0).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import pytest

from fastnet import LengthPrefixed

SMALL = 64
LARGE = 64 * 1024
LARGE_FRAME = 32 * 1024  # protocol.LARGE_FRAME
FRAMES_PER_ROUND = 1024  # small frames per benchmark round, whatever the batch size
LARGE_PER_ROUND = 64

spec = LengthPrefixed(max_frame=2 * LARGE)


def impl_id(frame_impl: ModuleType) -> str:
    return "c" if frame_impl.__name__.endswith("_frame") else "py"


def outq_for(frame_impl: ModuleType) -> ModuleType:
    name = "fastnet._outq" if impl_id(frame_impl) == "c" else "fastnet._outq_py"
    return importlib.import_module(name)


def small_batches(batch: int) -> list[list[bytes]]:
    frames = [bytes([i % 256]) * SMALL for i in range(FRAMES_PER_ROUND)]
    return [frames[i : i + batch] for i in range(0, FRAMES_PER_ROUND, batch)]


def run_outq(queue: Any, batches: list[list[bytes]]) -> int:
    """OutQueue: append per frame; per batch, nbytes (the byte counter) and take()."""
    written = 0
    for batch in batches:
        for frame in batch:
            queue.append(frame)
        written += queue.nbytes
        queue.take()
    return written


def run_encode_many(encoder: Any, batches: list[list[bytes]]) -> int:
    """list.append per frame, encode_many per batch."""
    written = 0
    for batch in batches:
        out: list[bytes] = []
        for frame in batch:
            out.append(frame)
        written += len(encoder.encode_many(out))
    return written


def run_flush(encoder: Any, batches: list[list[bytes]]) -> int:
    """What protocol.py does today per batch: list.append per frame, then _flush.

    _flush first looks for a large payload (``max(map(len, out))``); a batch
    with one goes through _flush_large (header + payload object per large
    frame, encode_many for the runs between, the sizes summed), any other
    through one encode_many.
    """
    written = 0
    header = encoder.header
    encode_many = encoder.encode_many
    for batch in batches:
        out: list[bytes] = []
        for frame in batch:
            out.append(frame)
        n = len(out)
        if len(out[0]) >= LARGE_FRAME if n == 1 else max(map(len, out)) >= LARGE_FRAME:
            buffers: list[bytes] = []
            start = 0
            for i, frame in enumerate(out):
                size = len(frame)
                if size >= LARGE_FRAME and type(frame) is bytes:
                    if i > start:
                        buffers.append(encode_many(out[start:i]))
                    buffers.append(header(size))
                    buffers.append(frame)
                    start = i + 1
            if start < n:
                buffers.append(encode_many(out[start:]))
            written += sum(map(len, buffers))
        else:
            written += len(encode_many(out))
    return written


WAYS = {"OutQueue": run_outq, "list + encode_many": run_encode_many, "list + _flush": run_flush}


@pytest.mark.parametrize("batch", [16, 1])
@pytest.mark.parametrize("way", list(WAYS))
def test_small_frames(
    benchmark: Any, record: Any, frame_impl: ModuleType, batch: int, way: str
) -> None:
    encoder = frame_impl.LengthPrefixedEncoder(spec)
    batches = small_batches(batch)
    target = outq_for(frame_impl).OutQueue(encoder, LARGE_FRAME) if way == "OutQueue" else encoder
    assert WAYS[way](target, batches) == FRAMES_PER_ROUND * (SMALL + 4)
    benchmark.group = f"send {batch} x 64 B per batch"
    benchmark(WAYS[way], target, batches)
    case = f"send {batch} x 64 B/batch: {way}"
    record(case, impl_id(frame_impl), FRAMES_PER_ROUND, "frames/s", benchmark)


@pytest.mark.parametrize(
    "way, threshold",
    [
        ("OutQueue", LARGE_FRAME),  # unjoined: [header, payload] per frame
        ("list + _flush", None),  # today: header + payload object per frame
        ("OutQueue", 0),  # joined: every payload copied
        ("list + encode_many", None),  # every payload copied
    ],
    ids=["OutQueue unjoined", "list + _flush", "OutQueue joined", "list + encode_many"],
)
def test_large_frames(
    benchmark: Any, record: Any, frame_impl: ModuleType, way: str, threshold: int | None
) -> None:
    encoder = frame_impl.LengthPrefixedEncoder(spec)
    frames = [bytes([i]) * LARGE for i in range(LARGE_PER_ROUND)]
    batches = [frames[i : i + 4] for i in range(0, LARGE_PER_ROUND, 4)]
    target = encoder if threshold is None else outq_for(frame_impl).OutQueue(encoder, threshold)
    assert WAYS[way](target, batches) == LARGE_PER_ROUND * (LARGE + 4)
    benchmark.group = "send 4 x 64 KiB per batch"
    benchmark(WAYS[way], target, batches)
    label = way if threshold is None else f"{way} {'unjoined' if threshold else 'joined'}"
    case = f"send 4 x 64 KiB/batch: {label}"
    record(case, impl_id(frame_impl), LARGE_PER_ROUND, "frames/s", benchmark)
