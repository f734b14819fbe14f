"""Length-prefixed decoding: every layout option and edge, every chunking, both backends."""

from __future__ import annotations

from types import ModuleType

import pytest
from codec_driver import HOWS, chunkings, collect

from fastnet import FrameError, FrameTooLarge, IncompleteFrame, LengthPrefixed


def wire(
    spec: LengthPrefixed, body: bytes, *, prefix: bytes | None = None, length: int | None = None
) -> bytes:
    """One wire frame: ``offset`` prefix bytes, the length field, the body."""
    if prefix is None:
        prefix = bytes(range(0xA0, 0xA0 + spec.offset))
    if length is None:
        length = len(body) - spec.adjustment
    return prefix + length.to_bytes(spec.length_size, spec.byteorder) + body


def case(
    spec: LengthPrefixed, stream: bytes, frames: list[bytes], errors: list[type] = ()
) -> pytest.param:  # type: ignore[assignment]
    return (spec, stream, frames, list(errors))


BODIES = [b"", b"a", b"hello", bytes(range(256)) * 3]

CASES = {}
for size in (1, 2, 3, 4, 8):
    for order in ("big", "little"):
        spec = LengthPrefixed(
            length_size=size,
            byteorder=order,
            max_frame=(1 << (8 * size)) - 1 if size < 3 else 8 << 20,
        )
        bodies = [b for b in BODIES if len(b) <= spec.max_frame]
        CASES[f"field{size}-{order}"] = case(spec, b"".join(wire(spec, b) for b in bodies), bodies)

_off = LengthPrefixed(length_size=2, offset=3)
CASES["offset"] = case(_off, wire(_off, b"abc") + wire(_off, b""), [b"abc", b""])
_s0 = LengthPrefixed(length_size=2, offset=1, strip=0)
CASES["strip-0-keeps-header"] = case(_s0, wire(_s0, b"xy", prefix=b"\x07"), [b"\x07\x00\x02xy"])
_sh = LengthPrefixed(length_size=2, offset=1, strip=3)
CASES["strip-header"] = case(_sh, wire(_sh, b"xy", prefix=b"\x07"), [b"xy"])
_sp = LengthPrefixed(length_size=2, offset=1, strip=5)
CASES["strip-past-header"] = case(
    _sp, wire(_sp, b"xyz", prefix=b"\x07") + wire(_sp, b"AB"), [b"z", b""]
)
_sf = LengthPrefixed(length_size=2, strip=1)
CASES["strip-inside-field"] = case(_sf, wire(_sf, b"q"), [b"\x01q"])
# Positive adjustment: the field counts the body minus 2 (e.g. a trailing checksum it leaves out).
_pa = LengthPrefixed(length_size=2, adjustment=2)
CASES["adjustment-positive"] = case(_pa, wire(_pa, b"abcd") + wire(_pa, b"ok"), [b"abcd", b"ok"])
# Negative adjustment: the field counts itself too (a very common layout).
_na = LengthPrefixed(length_size=4, adjustment=-4)
CASES["adjustment-negative"] = case(_na, wire(_na, b"hello") + wire(_na, b""), [b"hello", b""])
_nb = LengthPrefixed(length_size=2, offset=2, adjustment=-4, strip=0)
CASES["length-counts-whole-frame"] = case(_nb, b"\x01\x02\x00\x07abc", [b"\x01\x02\x00\x07abc"])
CASES["empty-stream"] = case(LengthPrefixed(), b"", [])
CASES["only-empty-bodies"] = case(LengthPrefixed(), b"\x00\x00\x00\x00" * 5, [b""] * 5)

_mx = LengthPrefixed(length_size=2, max_frame=10)
CASES["body-at-max"] = case(_mx, wire(_mx, b"x" * 10), [b"x" * 10])
CASES["body-over-max"] = case(
    _mx, wire(_mx, b"ok") + wire(_mx, b"x" * 11) + wire(_mx, b"lost"), [b"ok"], [FrameTooLarge]
)
CASES["over-max-header-only"] = case(_mx, wire(_mx, b"ok") + b"\xff\xff", [b"ok"], [FrameTooLarge])
CASES["over-max-by-adjustment"] = case(
    LengthPrefixed(length_size=1, adjustment=5, max_frame=10),
    b"\x05" + b"z" * 10 + b"\x06",
    [b"z" * 10],
    [FrameTooLarge],
)
CASES["max-frame-zero"] = case(
    LengthPrefixed(length_size=1, max_frame=0), b"\x00\x00\x01x", [b"", b""], [FrameTooLarge]
)
CASES["huge-8-byte-length"] = case(LengthPrefixed(length_size=8), b"\xff" * 8, [], [FrameTooLarge])

_neg = LengthPrefixed(length_size=1, adjustment=-4)
CASES["negative-body"] = case(_neg, wire(_neg, b"fine") + b"\x02", [b"fine"], [FrameError])
_past = LengthPrefixed(length_size=1, strip=6)
CASES["strip-past-frame-end"] = case(
    _past,
    wire(_past, b"123456") + wire(_past, b"12345") + wire(_past, b"1234"),
    [b"6", b""],
    [FrameError],
)

_eof = LengthPrefixed(length_size=4, offset=1)
CASES["eof-mid-offset"] = case(_eof, wire(_eof, b"done") + b"\x00", [b"done"], [IncompleteFrame])
CASES["eof-mid-header"] = case(
    _eof, wire(_eof, b"done") + b"\x00\x00\x00", [b"done"], [IncompleteFrame]
)
CASES["eof-mid-body"] = case(
    _eof, wire(_eof, b"done") + wire(_eof, b"body")[:-1], [b"done"], [IncompleteFrame]
)
CASES["eof-after-header"] = case(_eof, wire(_eof, b"body")[:5], [], [IncompleteFrame])

_big = LengthPrefixed()
_large = bytes(range(256)) * 400  # 100 KiB: received directly into its final object
CASES["large-frames"] = case(
    _big,
    wire(_big, b"a") + wire(_big, _large) + wire(_big, b"b") + wire(_big, _large[:40000]),
    [b"a", _large, b"b", _large[:40000]],
)
_stripbig = LengthPrefixed(length_size=2, offset=2, max_frame=65535, strip=1)
CASES["large-frame-strip-0-offset"] = case(
    _stripbig,
    wire(_stripbig, _large[:60000], prefix=b"PQ"),
    [b"Q" + (60000).to_bytes(2, "big") + _large[:60000]],
)
CASES["large-frame-eof-inside"] = case(_big, wire(_big, _large)[:-1], [], [IncompleteFrame])


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_table(frame_impl: ModuleType, name: str, how: str) -> None:
    spec, stream, expected_frames, expected_errors = CASES[name]
    for chunking, chunks in chunkings(stream, seed=len(name)):
        decoder = frame_impl.LengthPrefixedDecoder(spec)
        frames, errors = collect(decoder, chunks, how)
        assert (frames, errors) == (expected_frames, expected_errors), f"{chunking} via {how}"


def test_error_carries_frames_before_it(frame_impl: ModuleType) -> None:
    spec = LengthPrefixed(length_size=2, max_frame=4)
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"\x00\x01a\x00\x02bc\x00\x05hello\x00\x01z")
    assert info.value.frames == [b"a", b"bc"]
    assert (info.value.size, info.value.limit) == (5, 4)
    assert info.value.args == (5, 4)
    assert "5 bytes" in str(info.value) and "4 bytes" in str(info.value)


def test_failed_decoder_raises_on_every_later_call(frame_impl: ModuleType) -> None:
    spec = LengthPrefixed(length_size=1, adjustment=-2)
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    with pytest.raises(FrameError) as first:
        decoder.feed(b"\x01")
    assert type(first.value) is FrameError
    for call in (lambda: decoder.feed(b"\x03x"), lambda: decoder.get_buffer(-1), decoder.eof):
        with pytest.raises(FrameError) as again:
            call()
        assert type(again.value) is FrameError
        assert again.value.args == first.value.args
        assert again.value.frames == []


def test_too_large_is_raised_from_the_header_alone(frame_impl: ModuleType) -> None:
    """A hostile header is rejected before a single body byte arrives or memory is reserved."""
    decoder = frame_impl.LengthPrefixedDecoder(LengthPrefixed(max_frame=1 << 20))
    view = decoder.get_buffer(-1)
    view[:4] = (1 << 30).to_bytes(4, "big")
    view.release()
    with pytest.raises(FrameTooLarge) as info:
        decoder.buffer_updated(4)
    assert info.value.size == 1 << 30
    assert decoder.pending == 0


def test_pending_counts_unfinished_bytes(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LengthPrefixedDecoder(LengthPrefixed())
    assert decoder.pending == 0
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.pending == 2
    assert decoder.feed(b"\x00\x03ab") == []
    assert decoder.pending == 6
    assert decoder.feed(b"c\x00") == [b"abc"]
    assert decoder.pending == 1


def test_eof_error_is_incomplete_frame_with_count(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LengthPrefixedDecoder(LengthPrefixed())
    assert decoder.feed(b"\x00\x00\x00\x01x\x00\x00\x00\x09abc") == [b"x"]
    with pytest.raises(IncompleteFrame) as info:
        decoder.eof()
    assert info.value.pending == 7
    assert info.value.frames == []


def test_feed_accepts_any_bytes_like(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LengthPrefixedDecoder(LengthPrefixed(length_size=1))
    assert decoder.feed(bytearray(b"\x01a")) == [b"a"]
    assert decoder.feed(memoryview(b"\x02bc\x01")[1:]) == []  # a sliced view: no prefix
    assert decoder.pending == 3
    with pytest.raises(TypeError):
        decoder.feed("text")  # type: ignore[arg-type]


def test_frames_are_bytes_not_views(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LengthPrefixedDecoder(LengthPrefixed(length_size=1))
    view = decoder.get_buffer(-1)
    view[:6] = b"\x02ab\x01cX"
    frames = decoder.buffer_updated(6)
    view[:6] = b"ZZZZZZ"  # writing through a stale view must not change delivered frames
    view.release()
    assert frames == [b"ab", b"c"]
    assert all(type(f) is bytes for f in frames)


def test_buffer_updated_protocol_errors(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LengthPrefixedDecoder(LengthPrefixed())
    with pytest.raises(RuntimeError):
        decoder.buffer_updated(1)
    view = decoder.get_buffer(16)
    size = len(view)
    view.release()
    with pytest.raises(ValueError):
        decoder.buffer_updated(size + 1)
    decoder.get_buffer(16).release()
    with pytest.raises(ValueError):
        decoder.buffer_updated(-1)
    decoder.get_buffer(16).release()
    decoder.feed(b"")  # feeding closes the window get_buffer opened
    with pytest.raises(RuntimeError):
        decoder.buffer_updated(1)
