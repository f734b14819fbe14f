"""Drive a decoder through a stream in the ways a caller can: one test body, many chunkings.

``collect`` pushes chunks through ``feed`` or through the BufferedProtocol
pair ``get_buffer``/``buffer_updated``, gathers every frame (including those an
error carries in ``.frames``) and the types of the errors raised, and ends with
``eof()``, repeated after a recoverable error until it returns. A
length-prefixed decoder stops at its first error (it is failed afterwards); a
line decoder goes on, as a server would.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

from fastnet import FrameError

HOWS = ("feed", "buffer", "small-buffer")


def chunkings(
    data: bytes, *, seed: int = 0, bytewise_limit: int = 4096
) -> Iterator[tuple[str, list[bytes]]]:
    """Yield (name, chunks): whole, bytewise (small streams), random cuts, an empty chunk."""
    yield "whole", [data]
    if len(data) <= bytewise_limit:
        yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    rnd = random.Random(seed)
    for k in range(3):
        cuts = sorted(rnd.sample(range(len(data) + 1), min(len(data) + 1, rnd.randint(1, 12))))
        bounds = [0, *cuts, len(data)]
        yield f"random{k}", [data[a:b] for a, b in itertools.pairwise(bounds)]
    half = len(data) // 2
    yield "with-empty", [data[:half], b"", data[half:]]


def collect(decoder: Any, chunks: list[bytes], how: str) -> tuple[list[bytes], list[type]]:
    """Push ``chunks`` into ``decoder`` and return (frames, error types) through eof()."""
    frames: list[bytes] = []
    errors: list[type] = []
    resumable = type(decoder).__name__ == "LineDecoder"

    def run(call: Callable[[], list[bytes]]) -> bool:
        try:
            frames.extend(call())
        except FrameError as exc:
            frames.extend(exc.frames)
            errors.append(type(exc))
            return resumable
        return True

    for chunk in chunks:
        if how == "feed":
            if not run(lambda chunk=chunk: decoder.feed(chunk)):
                return frames, errors
            continue
        pos = 0
        while pos < len(chunk):
            view = decoder.get_buffer(-1 if how == "buffer" else 1 + pos % 7)
            assert len(view) >= 1
            n = min(len(view), len(chunk) - pos)
            view[:n] = chunk[pos : pos + n]
            view.release()
            pos += n
            if not run(lambda n=n: decoder.buffer_updated(n)):
                return frames, errors
    # A line decoder recovers from an over-long line inside eof() too: call again to go on.
    for _ in range(sum(map(len, chunks)) + 1):
        ok = run(decoder.eof)
        if not resumable or (ok and decoder.pending == 0):
            break
    return frames, errors
