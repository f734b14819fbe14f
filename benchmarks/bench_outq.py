"""Send-queue micro-benchmarks: OutQueue against today's list + encode_many, c and py.

Run: ``python -m pytest benchmarks/bench_outq.py`` (pytest-benchmark; the
summary table at the end gives frames/s per case and backend).

What a connection does per batch of replies, three ways, on both backends:

- ``OutQueue``: ``append`` per frame (validated and copied at once), then
  ``take()`` (one bytes object, or ``[header, payload]`` iovecs);
- ``list``: what protocol.py does today: ``list.append`` per frame, then
  ``encoder.encode_many(list)`` when the batch is flushed;
- for 64 KiB payloads, ``list`` is today's ``_flush_large`` path instead:
  ``encoder.header(len(frame))`` and the payload object, no copy.

Workloads: 64-byte frames in batches of 16 (a pipelining client) and of 1
(request/response), and 64 KiB frames in batches of 4, kept unjoined by
OutQueue (threshold 32 KiB, protocol.LARGE_FRAME) and, for reference,
copied (threshold 0, against encode_many).
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
    written = 0
    for batch in batches:
        for frame in batch:
            queue.append(frame)
        written += len(queue.take())
    return written


def run_list(encoder: Any, batches: list[list[bytes]]) -> int:
    written = 0
    encode_many = encoder.encode_many
    for batch in batches:
        out: list[bytes] = []
        for frame in batch:
            out.append(frame)
        written += len(encode_many(out))
    return written


def run_list_large(encoder: Any, batches: list[list[bytes]]) -> int:
    """protocol._flush_large for a batch of large bytes payloads: header + payload, no copy."""
    written = 0
    header = encoder.header
    for batch in batches:
        out: list[bytes] = []
        for frame in batch:
            out.append(frame)
        buffers: list[bytes] = []
        for frame in out:
            size = len(frame)
            if size >= LARGE_FRAME and type(frame) is bytes:
                buffers.append(header(size))
                buffers.append(frame)
        written += len(buffers)
    return written


@pytest.mark.parametrize("batch", [16, 1])
@pytest.mark.parametrize("way", ["OutQueue", "list"])
def test_small_frames(
    benchmark: Any, record: Any, frame_impl: ModuleType, batch: int, way: str
) -> None:
    encoder = frame_impl.LengthPrefixedEncoder(spec)
    batches = small_batches(batch)
    if way == "OutQueue":
        queue = outq_for(frame_impl).OutQueue(encoder, LARGE_FRAME)
        assert run_outq(queue, batches) == FRAMES_PER_ROUND * (SMALL + 4)
        args: tuple[Any, ...] = (run_outq, queue, batches)
    else:
        assert run_list(encoder, batches) == FRAMES_PER_ROUND * (SMALL + 4)
        args = (run_list, encoder, batches)
    benchmark.group = f"send {batch} x 64 B per batch"
    benchmark(*args)
    case = f"send {batch} x 64 B/batch: {way}"
    record(case, impl_id(frame_impl), FRAMES_PER_ROUND, "frames/s", benchmark)


@pytest.mark.parametrize("way", ["OutQueue unjoined", "list + header", "OutQueue joined", "list"])
def test_large_frames(benchmark: Any, record: Any, frame_impl: ModuleType, way: str) -> None:
    encoder = frame_impl.LengthPrefixedEncoder(spec)
    frames = [bytes([i]) * LARGE for i in range(LARGE_PER_ROUND)]
    batches = [frames[i : i + 4] for i in range(0, LARGE_PER_ROUND, 4)]
    if way == "OutQueue unjoined":
        queue = outq_for(frame_impl).OutQueue(encoder, LARGE_FRAME)
        assert run_outq(queue, batches) == 2 * LARGE_PER_ROUND  # [header, payload] per frame
        args: tuple[Any, ...] = (run_outq, queue, batches)
    elif way == "OutQueue joined":
        queue = outq_for(frame_impl).OutQueue(encoder, 0)
        assert run_outq(queue, batches) == LARGE_PER_ROUND * (LARGE + 4)
        args = (run_outq, queue, batches)
    elif way == "list + header":
        assert run_list_large(encoder, batches) == 2 * LARGE_PER_ROUND
        args = (run_list_large, encoder, batches)
    else:
        assert run_list(encoder, batches) == LARGE_PER_ROUND * (LARGE + 4)
        args = (run_list, encoder, batches)
    benchmark.group = "send 4 x 64 KiB per batch"
    benchmark(*args)
    case = f"send 4 x 64 KiB/batch: {way}"
    record(case, impl_id(frame_impl), LARGE_PER_ROUND, "frames/s", benchmark)
