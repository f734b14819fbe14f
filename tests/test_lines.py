"""Line decoding: CRLF, split delimiters, over-long lines, recovery, end of stream."""

from __future__ import annotations

from types import ModuleType

import pytest
from codec_driver import HOWS, chunkings, collect

from fastnet import FrameTooLarge, Lines

CASES = {
    "lf": (Lines(), b"a\nbc\n\n", [b"a", b"bc", b""], []),
    "crlf": (Lines(), b"a\r\nbc\r\n\r\n", [b"a", b"bc", b""], []),
    "mixed-endings": (Lines(), b"one\r\ntwo\nthree\r\n", [b"one", b"two", b"three"], []),
    "only-one-cr-removed": (Lines(), b"x\r\r\n", [b"x\r"], []),
    "cr-inside-line-kept": (Lines(), b"a\rb\n", [b"a\rb"], []),
    "tail-at-eof": (Lines(), b"a\nrest", [b"a", b"rest"], []),
    "tail-with-cr-at-eof": (Lines(), b"a\nrest\r", [b"a", b"rest"], []),
    "empty-stream": (Lines(), b"", [], []),
    "no-strip": (Lines(strip=False), b"a\r\nb\nc", [b"a\r\n", b"b\n", b"c"], []),
    "crlf-delimiter": (Lines(delimiter=b"\r\n"), b"a\nb\r\nc\r\r\n", [b"a\nb", b"c\r"], []),
    "nul-delimiter": (Lines(delimiter=b"\x00"), b"k=v\x00\x00x", [b"k=v", b"", b"x"], []),
    "word-delimiter": (Lines(delimiter=b"END"), b"aENbENDENDcEN", [b"aENb", b"", b"cEN"], []),
    "word-delimiter-no-strip": (
        Lines(delimiter=b"END", strip=False),
        b"aENDbEND",
        [b"aEND", b"bEND"],
        [],
    ),
    "at-max-length": (Lines(max_length=3), b"abc\nab\r\n", [b"abc", b"ab"], []),
    # The stripped \r counts towards max_length.
    "cr-counts-towards-max": (Lines(max_length=3), b"abc\r\nok\n", [b"ok"], [FrameTooLarge]),
    "over-long-then-recovery": (
        Lines(max_length=5),
        b"ok\n" + b"x" * 40 + b"\nfine\n" + b"y" * 6 + b"\nlast",
        [b"ok", b"fine", b"last"],
        [FrameTooLarge, FrameTooLarge],
    ),
    "over-long-word-delimiter": (
        Lines(delimiter=b"<>", max_length=4),
        b"abcd<>abcde<>xy<>",
        [b"abcd", b"xy"],
        [FrameTooLarge],
    ),
    "over-long-unterminated-dropped": (
        Lines(max_length=4),
        b"a\n" + b"z" * 30,
        [b"a"],
        [FrameTooLarge],
    ),
    "over-long-tail-at-eof": (
        Lines(delimiter=b"\r\n", max_length=4),
        b"a\r\nzzzzz",
        [b"a"],
        [FrameTooLarge],
    ),
    "max-length-zero": (Lines(max_length=0), b"\n\nx\n\n", [b"", b"", b""], [FrameTooLarge]),
    "long-line": (Lines(max_length=1 << 20), b"q" * 300_000 + b"\nz\n", [b"q" * 300_000, b"z"], []),
    # End of stream, as tokio-util's LinesCodec::decode_eof: a remainder of
    # exactly b"\r" is no line; any other loses one trailing \r.
    "lone-cr-at-eof": (Lines(), b"a\n\r", [b"a"], []),
    "only-cr": (Lines(), b"\r", [], []),
    "empty-line-then-cr": (Lines(), b"\r\n\r", [b""], []),
    "two-cr-at-eof": (Lines(), b"a\n\r\r", [b"a", b"\r"], []),
    "cr-x-at-eof": (Lines(), b"\rx", [b"\rx"], []),
    "lone-cr-kept-without-strip": (Lines(strip=False), b"a\n\r", [b"a\n", b"\r"], []),
    "lone-cr-kept-other-delimiter": (Lines(delimiter=b"\x00"), b"a\x00\r", [b"a", b"\r"], []),
    "lone-cr-within-max-length-1": (Lines(max_length=1), b"\r", [], []),
    # The \r counts towards max_length on the last line too (tokio: an error).
    "lone-cr-over-max-length-0": (Lines(max_length=0), b"\r", [], [FrameTooLarge]),
    "tail-cr-over-max-length": (Lines(max_length=3), b"abc\r", [], [FrameTooLarge]),
    "tail-cr-at-max-length": (Lines(max_length=4), b"abc\r", [b"abc"], []),
    "discarding-at-eof": (Lines(max_length=2), b"abcd\r", [], [FrameTooLarge]),
}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_table(frame_impl: ModuleType, name: str, how: str) -> None:
    spec, stream, expected_frames, expected_errors = CASES[name]
    for chunking, chunks in chunkings(stream, seed=len(name)):
        decoder = frame_impl.LineDecoder(spec)
        frames, errors = collect(decoder, chunks, how)
        assert (frames, errors) == (expected_frames, expected_errors), f"{chunking} via {how}"


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_skip_mode_drops_what_error_mode_raises_for(
    frame_impl: ModuleType, name: str, how: str
) -> None:
    """on_too_long="skip": the same lines, no error, and every dropped line counted."""
    spec, stream, expected_frames, expected_errors = CASES[name]
    skipping = Lines(spec.delimiter, spec.max_length, spec.strip, on_too_long="skip")
    for chunking, chunks in chunkings(stream, seed=len(name)):
        decoder = frame_impl.LineDecoder(skipping)
        frames, errors = collect(decoder, chunks, how)
        assert (frames, errors) == (expected_frames, []), f"{chunking} via {how}"
        assert decoder.skipped == len(expected_errors), f"{chunking} via {how}"
        raising = frame_impl.LineDecoder(spec)
        collect(raising, chunks, how)
        assert raising.skipped == len(expected_errors), f"{chunking} via {how}"


def test_skip_mode_goes_on_in_the_same_call(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LineDecoder(Lines(max_length=3, on_too_long="skip"))
    assert decoder.feed(b"a\n" + b"x" * 10 + b"\nb\nyyyy") == [b"a", b"b"]
    assert decoder.skipped == 2  # the second over-long line is still arriving
    assert decoder.pending == 0  # its bytes are dropped as they come
    assert decoder.feed(b"yy\nc\n") == [b"c"]
    assert decoder.eof() == []
    assert decoder.skipped == 2
    assert decoder.feed(b"zzzz") == []
    assert decoder.skipped == 3
    assert decoder.eof() == []


def test_over_long_tail_at_eof_is_counted(frame_impl: ModuleType) -> None:
    # Over-long only once the stream ends: the delimiter's first bytes turn out
    # to be line bytes.
    for mode, raised in (("error", [FrameTooLarge]), ("skip", [])):
        decoder = frame_impl.LineDecoder(Lines(delimiter=b"END", max_length=3, on_too_long=mode))
        assert decoder.feed(b"abcEN") == []
        errors = []
        try:
            assert decoder.eof() == []
        except FrameTooLarge as exc:
            errors.append(type(exc))
            assert exc.args == (5, 3)
        assert (errors, decoder.skipped) == (raised, 1)


def test_on_too_long_is_validated() -> None:
    with pytest.raises(ValueError, match="on_too_long"):
        Lines(on_too_long="drop")  # type: ignore[arg-type]
    assert Lines().on_too_long == "error"


def test_cr_and_lf_split_across_chunks(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LineDecoder(Lines())
    assert decoder.feed(b"hello\r") == []
    assert decoder.pending == 6
    assert decoder.feed(b"\nworld\r") == [b"hello"]
    assert decoder.feed(b"\n") == [b"world"]
    assert decoder.pending == 0


def test_too_long_raises_as_soon_as_limit_passed(frame_impl: ModuleType) -> None:
    """The error comes when max_length + 1 bytes have arrived, not when the delimiter does."""
    decoder = frame_impl.LineDecoder(Lines(max_length=8))
    assert decoder.feed(b"ok\n12345678") == [b"ok"]
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"9")
    assert (info.value.size, info.value.limit) == (9, 8)
    assert info.value.frames == []
    # Discarding through the next delimiter, then decoding resumes.
    assert decoder.feed(b"more junk") == []
    assert decoder.pending == 0
    assert decoder.feed(b"...\nnext\n") == [b"next"]


def test_recovery_continues_with_buffered_bytes(frame_impl: ModuleType) -> None:
    """After an over-long complete line, feed(b"") decodes what followed it in the same chunk."""
    decoder = frame_impl.LineDecoder(Lines(max_length=3))
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"a\nbbbbbb\nc\nd")
    assert info.value.frames == [b"a"]
    assert info.value.size == 6
    assert decoder.pending == 3
    assert decoder.feed(b"") == [b"c"]
    assert decoder.eof() == [b"d"]


def test_eof_resets_for_a_new_stream(frame_impl: ModuleType) -> None:
    decoder = frame_impl.LineDecoder(Lines())
    assert decoder.feed(b"a\nb") == [b"a"]
    assert decoder.eof() == [b"b"]
    assert decoder.pending == 0
    assert decoder.eof() == []
    assert decoder.feed(b"c\n") == [b"c"]


def test_long_line_search_is_linear(frame_impl: ModuleType) -> None:
    """A 4 MiB line fed in 4 KiB chunks is searched once, not rescanned per chunk.

    Rescanning would read about 2e9 bytes and take minutes, not milliseconds.
    """
    decoder = frame_impl.LineDecoder(Lines(max_length=8 << 20))
    chunk = b"x" * 4096
    for _ in range(1024):
        assert decoder.feed(chunk) == []
    assert decoder.pending == 4 << 20
    assert decoder.feed(b"\n") == [b"x" * (4 << 20)]
