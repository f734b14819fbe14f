"""Buffer management seen from outside: direct receive of large frames, bounded and released memory.

These run on both backends: the window a decoder hands out for a large
unfinished frame, and the memory a decoder keeps between reads, are part of
the shared contract.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import pickle
import random
import subprocess
import sys
import tracemalloc
from types import ModuleType
from typing import Any

import pytest

from fastnet import FrameTooLarge, LengthPrefixed, Lines
from fastnet._tunables import DIRECT_ROOM
from fastnet.framing import DIRECT_THRESHOLD, MAX_READ, READ_SIZE

LARGE = 1 << 20


def push(decoder: Any, data: bytes, hint: int = -1) -> list[bytes]:
    """Receive ``data`` through get_buffer/buffer_updated, as asyncio would."""
    frames: list[bytes] = []
    pos = 0
    while pos < len(data):
        view = decoder.get_buffer(hint)
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        view.release()
        pos += n
        frames += decoder.buffer_updated(n)
    return frames


def test_large_frame_window_is_the_missing_payload_and_a_header(frame_impl: ModuleType) -> None:
    spec = LengthPrefixed()
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    payload = bytes(range(256)) * (LARGE // 256)
    stream = spec.encode(payload) + spec.encode(b"next")
    assert push(decoder, stream[:1000]) == []
    # The rest of the frame goes straight into its final object: the window
    # is the missing payload and room for the next header, no more, so one
    # read can end this frame and start the next one's direct receive.
    for _ in range(3):
        view = decoder.get_buffer(-1)
        assert len(view) == 4 + LARGE - decoder.pending + 4
        view.release()
    assert push(decoder, stream[1000:]) == [payload, b"next"]
    assert decoder.pending == 0


def test_large_frame_window_shrinks_as_it_fills(frame_impl: ModuleType) -> None:
    spec = LengthPrefixed(length_size=2, max_frame=65535)
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    payload = b"\xab" * 60000
    stream = spec.encode(payload)
    push(decoder, stream[:30])
    received = 30
    while received < len(stream):
        view = decoder.get_buffer(-1)
        assert len(view) == len(stream) - received + 2  # and the next 2-byte header
        n = min(7000, len(stream) - received)
        view[:n] = stream[received : received + n]
        view.release()
        received += n
        frames = decoder.buffer_updated(n)
        assert decoder.pending == (0 if frames else received)
    assert frames == [payload]


def windows_for(decoder: Any, stream: bytes) -> tuple[list[int], list[bytes]]:
    """Receive ``stream`` as a kernel filling every window would; return the window sizes."""
    sizes: list[int] = []
    frames: list[bytes] = []
    pos = 0
    while pos < len(stream):
        view = decoder.get_buffer(-1)
        sizes.append(len(view))
        n = min(len(view), len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        view.release()
        pos += n
        frames += decoder.buffer_updated(n)
    return sizes, frames


def test_back_to_back_large_frames_cost_one_read_each(frame_impl: ModuleType) -> None:
    # Back-to-back 64 KiB frames: the first read ends 4 bytes short of the
    # first frame; the next ends it and fetches the second frame's header,
    # and from then on each read is one frame's payload and the next header,
    # every payload byte received straight into its frame.
    spec = LengthPrefixed()
    payloads = [bytes([i]) * 65536 for i in range(3)]
    sizes, frames = windows_for(frame_impl.LengthPrefixedDecoder(spec), spec.encode_many(payloads))
    assert frames == payloads
    assert sizes == [65536, 8, 65540, 65540]


def test_missing_counts_what_a_direct_receive_still_needs(frame_impl: ModuleType) -> None:
    spec = LengthPrefixed()
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    wire = spec.encode(b"m" * 40000) + spec.encode(b"small")
    assert decoder.missing == 0
    assert push(decoder, wire[:1000]) == []
    assert decoder.missing == 40004 - 1000  # and the window is that and a header
    view = decoder.get_buffer(-1)
    assert len(view) == decoder.missing + 4
    view.release()
    assert push(decoder, wire[1000:40004]) == [b"m" * 40000]
    assert decoder.missing == 0
    assert push(decoder, wire[40004:]) == [b"small"]  # small frames never count
    assert decoder.missing == 0
    lines = frame_impl.LineDecoder(Lines())
    lines.feed(b"x" * 50000)
    assert lines.missing == 0


def test_header_window_covers_offset_and_strip(frame_impl: ModuleType) -> None:
    # The short window must hold what starting a direct receive needs: the
    # length field with the bytes before it, and every byte stripped.
    spec = LengthPrefixed(offset=2, length_size=2, adjustment=4, strip=8, max_frame=65535)
    payloads = [bytes([i]) * (40000 + i) for i in range(3)]
    wire = [b"\x01\x02" + len(p).to_bytes(2, "big") + b"abcd" + p for p in payloads]
    sizes, frames = windows_for(frame_impl.LengthPrefixedDecoder(spec), b"".join(wire))
    assert frames == payloads
    assert sizes == [65536, 14489, 40010]  # frame 0 fits the first read whole


def test_a_header_past_the_room_limit_gets_a_read_of_its_own(frame_impl: ModuleType) -> None:
    # A header longer than DIRECT_ROOM would add its size to every large
    # frame's object: its frames keep windows of their own bytes alone, each
    # followed by a header-sized read, on both backends.
    spec = LengthPrefixed(offset=DIRECT_ROOM)  # a header of DIRECT_ROOM + 4 bytes
    header = DIRECT_ROOM + 4
    payloads = [bytes([i]) * 40000 for i in range(3)]
    wire = b"".join(bytes(DIRECT_ROOM) + len(p).to_bytes(4, "big") + p for p in payloads)
    sizes, frames = windows_for(frame_impl.LengthPrefixedDecoder(spec), wire)
    assert frames == payloads
    first_rest = 2 * (header + 40000) - READ_SIZE  # frame 1's bytes the first read left
    assert sizes == [READ_SIZE, first_rest, header, 40000]


def test_small_frames_after_a_large_one_cost_no_extra_read(frame_impl: ModuleType) -> None:
    # The read that ends the large frame brings the first small header; the
    # next frame is small, so the next window is a full one.
    spec = LengthPrefixed()
    small = [b"x" * 10] * 100
    stream = spec.encode(b"L" * 65536) + spec.encode_many(small)
    sizes, frames = windows_for(frame_impl.LengthPrefixedDecoder(spec), stream)
    assert frames == [b"L" * 65536, *small]
    assert sizes == [65536, 8, 65536]


def read_once(decoder: Any, data: bytes) -> list[bytes]:
    """One receive of ``data`` into the next window, which must hold all of it."""
    view = decoder.get_buffer(-1)
    assert len(view) >= len(data)
    view[: len(data)] = data
    view.release()
    return decoder.buffer_updated(len(data))


def assert_sound(frame: bytes) -> None:
    """A delivered frame is an ordinary bytes object: its size, and the NUL C code expects."""
    assert type(frame) is bytes
    assert sys.getsizeof(frame) == sys.getsizeof(b"") + len(frame)
    if sys.implementation.name == "cpython":  # ob_sval ends one byte before getsizeof
        assert ctypes.string_at(id(frame) + sys.getsizeof(frame) - 1, 1) == b"\0"


def test_the_read_that_ends_a_large_frame_may_end_inside_the_next_header(
    frame_impl: ModuleType,
) -> None:
    # Little-endian: the byte the frame's NUL overwrites is not 0 already.
    spec = LengthPrefixed(byteorder="little")
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    big = b"\xff" * 40000
    wire = spec.encode(big) + spec.encode(b"\xee" * 40000)
    assert read_once(decoder, wire[:1000]) == []
    # The frame's rest and 2 of the next header's 4 bytes: the header bytes
    # are kept, and the next window is the 2 that complete the header.
    frames = read_once(decoder, wire[1000 : 40004 + 2])
    assert frames == [big]
    assert_sound(frames[0])
    assert decoder.pending == 2
    assert decoder.missing == 0
    view = decoder.get_buffer(-1)
    assert len(view) == 2
    view.release()
    assert read_once(decoder, wire[40006:40008]) == []
    assert decoder.missing == 40000  # the header is whole: the next frame is received directly
    assert read_once(decoder, wire[40008:]) == [b"\xee" * 40000]


def test_the_next_header_a_large_frame_brings_is_decoded_like_any_other(
    frame_impl: ModuleType,
) -> None:
    spec = LengthPrefixed(byteorder="little", max_frame=50000)
    big = bytes(range(256)) * 160  # 40 KiB, received directly
    # An empty frame fits in the bytes past the large one: delivered with it.
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    assert read_once(decoder, spec.encode(big)[:500]) == []
    frames = read_once(decoder, spec.encode(big)[500:] + spec.encode(b""))
    assert frames == [big, b""]
    assert_sound(frames[0])
    assert decoder.pending == 0
    # A header over the limit there: the frame before it is still delivered,
    # on the error, and the decoder is failed.
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    assert read_once(decoder, spec.encode(big)[:500]) == []
    with pytest.raises(FrameTooLarge) as caught:
        read_once(decoder, spec.encode(big)[500:] + (50001).to_bytes(4, "little"))
    assert caught.value.frames == [big]
    assert_sound(caught.value.frames[0])
    with pytest.raises(FrameTooLarge):
        decoder.get_buffer(-1)


def test_feed_ends_the_header_window(frame_impl: ModuleType) -> None:
    spec = LengthPrefixed()
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    wire = spec.encode(b"L" * 40000)
    assert push(decoder, wire[:1000]) == []  # a short read starts the direct receive
    assert push(decoder, wire[1000:]) == [b"L" * 40000]
    view = decoder.get_buffer(-1)
    assert len(view) == 4
    view.release()
    assert decoder.feed(b"") == []
    view = decoder.get_buffer(2)  # and a size hint below the header still bounds it
    assert len(view) == 2
    view.release()
    view = decoder.get_buffer(-1)
    assert len(view) == 65536
    view.release()


def retained(make: Any, run: Any) -> int:
    """Bytes of traced memory a decoder keeps after ``run`` and after its frames are dropped."""
    gc.collect()
    tracemalloc.start()
    try:
        decoder = make()
        before = tracemalloc.get_traced_memory()[0]
        frames = run(decoder)
        del frames
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_no_large_buffer_outlives_a_large_frame(frame_impl: ModuleType) -> None:
    spec = LengthPrefixed(max_frame=4 * LARGE)
    stream = spec.encode(b"z" * (2 * LARGE)) + spec.encode(b"small")
    kept = retained(lambda: frame_impl.LengthPrefixedDecoder(spec), lambda d: push(d, stream))
    assert kept < 4096


def test_idle_decoder_mid_header_keeps_little(frame_impl: ModuleType) -> None:
    """A peer that stops after half a header pins a few hundred bytes, not a read window."""
    spec = LengthPrefixed()
    stream = spec.encode_many([b"q" * 100] * 50) + b"\x00\x00"
    kept = retained(lambda: frame_impl.LengthPrefixedDecoder(spec), lambda d: push(d, stream))
    assert kept < 2048


def test_long_line_buffer_is_released(frame_impl: ModuleType) -> None:
    spec = Lines(max_length=4 * LARGE)
    stream = b"L" * (2 * LARGE) + b"\nshort\npart"
    kept = retained(lambda: frame_impl.LineDecoder(spec), lambda d: push(d, stream))
    assert kept < 4096


def test_stale_view_cannot_corrupt_later_frames(frame_impl: ModuleType) -> None:
    """A view kept past buffer_updated stays valid memory and never aliases a later frame."""
    spec = LengthPrefixed(length_size=1)
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    stale = decoder.get_buffer(-1)
    stale[:2] = b"\x01a"
    assert decoder.buffer_updated(2) == [b"a"]
    frames = push(decoder, spec.encode_many([b"x" * 200] * 1000) + b"\x05ab")
    stale[: len(stale)] = b"\xee" * len(stale)  # scribble over the old window
    assert frames == [b"x" * 200] * 1000
    assert push(decoder, b"cde") == [b"abcde"]


def test_arena_growth_is_bounded_by_frame_limit(frame_impl: ModuleType) -> None:
    """With a small max_frame, asking for a huge window does not allocate past what frames need."""
    decoder = frame_impl.LengthPrefixedDecoder(LengthPrefixed(max_frame=100))
    for _ in range(20):
        push(decoder, b"\x00\x00\x00\x05ab")  # unfinished frame stays buffered, window regrows
        view = decoder.get_buffer(-1)
        assert len(view) <= 1 << 17
        view.release()
        push(decoder, b"cde")


@pytest.mark.parametrize(
    "spec, tail",
    [(LengthPrefixed(), b""), (LengthPrefixed(), b"\x00\x00"), (Lines(), b""), (Lines(), b"abc")],
)
@pytest.mark.parametrize("end", ["eof", "feed"])
def test_a_window_left_unfilled_is_released(
    frame_impl: ModuleType, spec: Any, tail: bytes, end: str
) -> None:
    """get_buffer(64 KiB), then the stream ends (or feed takes over): no 64 KiB stays behind."""
    if end == "eof" and tail and isinstance(spec, LengthPrefixed):
        tail = b""  # eof() mid-frame fails the decoder (and releases all): a test of its own

    def run(decoder: Any) -> list[bytes]:
        decoder.get_buffer(65536).release()
        if end == "feed":
            return decoder.feed(tail)
        decoder.feed(tail)
        return decoder.eof()

    decoder_class = (
        frame_impl.LengthPrefixedDecoder
        if isinstance(spec, LengthPrefixed)
        else frame_impl.LineDecoder
    )
    kept = retained(lambda: decoder_class(spec), run)
    assert kept < 2048


RSS_SCRIPT = """
import os, sys, importlib
from fastnet import LengthPrefixed
impl = importlib.import_module(sys.argv[1])
count = int(sys.argv[2])

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

spec = LengthPrefixed(max_frame=8 << 20)
decoders = [impl.LengthPrefixedDecoder(spec) for _ in range(count)]
header = (8 << 20).to_bytes(4, "big")
before = rss()
views = []
for decoder in decoders:
    assert decoder.feed(header) == []
    views.append(decoder.get_buffer(-1))  # the window stays open, as between two reads
assert all(len(view) == (8 << 20) + 4 for view in views)  # and the next header
print(rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_a_bare_header_commits_no_frame_memory(frame_impl: ModuleType) -> None:
    """A header announcing 8 MiB, then a window for it: memory is committed only as bytes arrive.

    The window is the whole missing payload and the next header on both
    backends (the contract the differential tests compare), but its pages
    are not touched up front.
    Before the fix the twin zero-filled it: 32 decoders took 256 MiB.
    """
    count = 32
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, frame_impl.__name__, str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    grown = int(out.stdout)
    assert grown < count * (256 << 10), f"{grown / count / 1024:.0f} KiB per decoder"


def test_backends_share_the_tunables(frame_impl: ModuleType) -> None:
    """The window sizes and the direct-receive threshold framing.py exports are the backend's."""
    spec = LengthPrefixed()
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    for hint, size in ((-1, READ_SIZE), (2**40, MAX_READ), (MAX_READ - 1, MAX_READ - 1)):
        view = decoder.get_buffer(hint)
        assert len(view) == size
        view.release()
    below = frame_impl.LengthPrefixedDecoder(spec)
    assert below.feed(spec.encode(b"b" * (DIRECT_THRESHOLD - 1))[:100]) == []
    assert below.missing == 0
    at = frame_impl.LengthPrefixedDecoder(spec)
    assert at.feed(spec.encode(b"a" * DIRECT_THRESHOLD)[:100]) == []
    assert at.missing == 4 + DIRECT_THRESHOLD - 100


def test_a_stale_view_never_aliases_another_decoders_read(frame_impl: ModuleType) -> None:
    """A view kept past its read cannot reach the bytes another decoder is still assembling.

    The extension passes an emptied read block on to the next decoder that
    reads (see ``_read_block``); it must not while an old view of it lives.
    """
    spec = LengthPrefixed()
    first = frame_impl.LengthPrefixedDecoder(spec)
    stale = first.get_buffer(-1)
    stale[:6] = spec.encode(b"hi")
    assert first.buffer_updated(6) == [b"hi"]  # the arena is empty again: its block is free
    second = frame_impl.LengthPrefixedDecoder(spec)
    body = bytes(range(256)) * 80  # 20 KiB: assembled in the arena, below the direct receive
    wire = spec.encode(body)
    view = second.get_buffer(-1)
    view[:10_000] = wire[:10_000]
    view.release()
    assert second.buffer_updated(10_000) == []
    stale[: len(stale)] = b"\xee" * len(stale)  # scribble over the old window
    assert push(second, wire[10_000:]) == [body]
    stale.release()


def test_reads_that_leave_nothing_pending_reuse_one_block() -> None:
    """The extension's decoders take turns with one read block instead of allocating per read."""
    _frame = pytest.importorskip("fastnet._frame")
    import ctypes

    spec = LengthPrefixed()
    decoders = [_frame.LengthPrefixedDecoder(spec) for _ in range(3)]
    addresses = set()
    for _ in range(4):
        for decoder in decoders:
            view = decoder.get_buffer(-1)
            addresses.add(ctypes.addressof(ctypes.c_char.from_buffer(view)))
            view[:8] = spec.encode(b"abcd")
            view.release()
            assert decoder.buffer_updated(8) == [b"abcd"]
    assert len(addresses) == 1
    # A read that leaves much of a frame pending keeps its block (a small tail
    # would move to a small block); the next decoder gets another.
    view = decoders[0].get_buffer(-1)
    kept = ctypes.addressof(ctypes.c_char.from_buffer(view))
    view[:10_000] = spec.encode(b"p" * 20_000)[:10_000]
    view.release()
    assert decoders[0].buffer_updated(10_000) == []
    view = decoders[1].get_buffer(-1)
    assert ctypes.addressof(ctypes.c_char.from_buffer(view)) != kept
    view.release()


@pytest.mark.parametrize("seed", range(8))
def test_interleaved_decoders_with_stale_views_lose_nothing(
    frame_impl: ModuleType, seed: int
) -> None:
    """Many decoders reading in turn, as a server's connections do, with views kept and scribbled.

    Each decoder gets its own random stream of frames (small, mid-sized, and
    past the direct-receive threshold) in random chunks; reads of different
    decoders interleave at random; some windows are kept past their read and
    scribbled over after every read once their own decoder has read its whole stream (before
    that a stale view may still be the decoder's own arena, and a direct
    window is the delivered frame itself: the contract leaves both to the
    caller). Every decoder still delivers exactly its frames: a kept view
    never reaches another decoder's bytes.
    """
    rng = random.Random(seed)
    spec = LengthPrefixed(max_frame=4 * DIRECT_THRESHOLD)
    streams, expected = [], []
    for _ in range(8):
        frames = [
            bytes([rng.randrange(256)])
            * rng.choice((0, 60, 3000, 20_000, 20_000, DIRECT_THRESHOLD + 7))
            for _ in range(rng.choice((2, 4, 40)))  # some end early, leaving their views
        ]
        expected.append(frames)
        streams.append(spec.encode_many(frames))
    decoders = [frame_impl.LengthPrefixedDecoder(spec) for _ in streams]
    positions = [0] * len(streams)
    got: list[list[bytes]] = [[] for _ in streams]
    stale: list[Any] = []
    for _ in range(100_000):
        pending = [i for i, pos in enumerate(positions) if pos < len(streams[i])]
        if not pending:
            break
        i = rng.choice(pending)
        direct = decoders[i].missing > 0  # the window is the frame's own bytes object
        view = decoders[i].get_buffer(rng.choice((-1, -1, -1, 5000)))
        if type(view) is not memoryview:
            view = memoryview(view)
        n = min(len(view), len(streams[i]) - positions[i], rng.choice((7, 700, 70_000, 70_000)))
        view[:n] = streams[i][positions[i] : positions[i] + n]
        positions[i] += n
        if not direct and rng.random() < 0.2:
            stale.append((i, view))  # kept past its read, against the contract
        else:
            view.release()
        got[i] += decoders[i].buffer_updated(n)
        for owner, old in stale:
            if positions[owner] == len(streams[owner]):
                old[: len(old)] = bytes([rng.randrange(256)]) * len(old)
    assert got == expected
    for _, old in stale:
        old.release()


def test_a_window_object_copies_safely_or_not_at_all(frame_impl: ModuleType) -> None:
    """The object under a window (what a plain socket transport may be handed) is safe to copy.

    The extension's exports decoder memory by pointer, so it refuses copying
    and pickling (a copy would share or free that memory); the twin's is a
    bytearray, whose copies are independent.
    """
    view = frame_impl.LengthPrefixedDecoder(LengthPrefixed()).get_buffer(-1)
    window = view.obj
    for duplicate in (copy.copy, lambda w: pickle.loads(pickle.dumps(w))):
        try:
            other = duplicate(window)
        except TypeError:
            continue
        memoryview(other)[:4] = b"copy"
        assert bytes(view[:4]) != b"copy"
    view.release()
