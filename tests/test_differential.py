"""Hypothesis differential tests: the extension and the twin agree on every stream and chunking.

For random layouts, random (often hostile) streams and random chunkings, both
backends must return equal frames call by call, equal ``pending`` counts, and
errors of equal type, arguments and ``.frames``. Streams are built from valid
frames with random bytes spliced in, so they exercise both the happy path and
every error path, including large frames that take the direct-receive path.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastnet import FrameError, LengthPrefixed, Lines
from fastnet import _frame_py as py_impl

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def length_specs(draw: st.DrawFn) -> LengthPrefixed:
    """Layouts that can be built: max_frame within what the field announces."""
    size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    offset = draw(st.integers(0, 3))
    adjustment = draw(st.integers(-8, 8))
    largest = (1 << (8 * size)) - 1 + adjustment
    max_frame = min(largest, draw(st.sampled_from([0, 7, 300, 40_000, 70_000, 8 << 20])))
    max_frame = max(max_frame, adjustment)
    strip = draw(st.one_of(st.none(), st.integers(0, offset + size + min(3, max_frame))))
    return LengthPrefixed(
        length_size=size,
        byteorder=draw(st.sampled_from(["big", "little"])),
        offset=offset,
        adjustment=adjustment,
        strip=strip,
        max_frame=max_frame,
    )


@st.composite
def length_streams(draw: st.DrawFn, spec: LengthPrefixed) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["frame", "frame", "frame", "large", "junk"]))
        if kind == "junk":
            parts.append(draw(st.binary(max_size=12)))
            continue
        body = draw(st.integers(0, 60)) if kind == "frame" else draw(st.integers(32_000, 70_000))
        field = max(0, body - spec.adjustment) % (1 << (8 * spec.length_size))
        real = max(0, field + spec.adjustment)
        parts.append(
            b"\x5a" * spec.offset
            + field.to_bytes(spec.length_size, spec.byteorder)
            + bytes([body & 0xFF]) * real
        )
    return b"".join(parts)


@st.composite
def line_specs(draw: st.DrawFn) -> Lines:
    return Lines(
        delimiter=draw(st.sampled_from([b"\n", b"\r\n", b"\x00", b"END", b"\n\n"])),
        max_length=draw(st.sampled_from([0, 1, 5, 20, 1000])),
        strip=draw(st.booleans()),
        on_too_long=draw(st.sampled_from(["error", "skip"])),
    )


def line_streams() -> st.SearchStrategy[bytes]:
    return st.lists(
        st.sampled_from([b"a", b"b", b"\r", b"\n", b"E", b"N", b"D", b"\x00", b"xyzw" * 3]),
        max_size=80,
    ).map(b"".join)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def transcript(decoder: Any, chunks: list[bytes], how: str, hint: int) -> list[tuple]:
    """Every call's outcome: frames and pending, or the error's type, args and frames.

    Window sizes are recorded too: which bytes the kernel may write where is
    part of the contract (direct receive, the header-sized window after it);
    so is a line decoder's count of skipped over-long lines.
    """
    out: list[tuple] = []

    def state() -> tuple:
        return decoder.pending, decoder.missing, getattr(decoder, "skipped", None)

    def record(call: Any) -> None:
        try:
            out.append(("ok", call(), *state()))
        except FrameError as exc:
            out.append(("error", type(exc), exc.args, exc.frames, *state()))

    for chunk in chunks:
        if how == "feed":
            record(lambda chunk=chunk: decoder.feed(chunk))
            continue
        pos = 0
        while pos < len(chunk):
            try:
                view = decoder.get_buffer(hint)
            except FrameError as exc:
                out.append(("error", type(exc), exc.args, exc.frames, decoder.pending))
                break
            out.append(("window", len(view)))
            n = min(len(view), len(chunk) - pos, hint if hint > 0 else 65536)
            view[:n] = chunk[pos : pos + n]
            view.release()
            pos += n
            record(lambda n=n: decoder.buffer_updated(n))
    record(decoder.eof)
    record(decoder.eof)
    return out


def c_backend() -> Any:
    from fastnet import _frame

    return _frame


@pytest.mark.c_extension
@SETTINGS
@given(
    data=st.data(), how=st.sampled_from(["feed", "buffer"]), hint=st.sampled_from([-1, 1, 3, 4096])
)
def test_length_prefixed_backends_agree(data: st.DataObject, how: str, hint: int) -> None:
    spec = data.draw(length_specs())
    stream = data.draw(length_streams(spec))
    chunks = cut(stream, data.draw(st.lists(st.integers(0, 1 << 20), max_size=10)))
    c = c_backend()
    expected = transcript(py_impl.LengthPrefixedDecoder(spec), chunks, how, hint)
    assert transcript(c.LengthPrefixedDecoder(spec), chunks, how, hint) == expected


@pytest.mark.c_extension
@SETTINGS
@given(data=st.data(), how=st.sampled_from(["feed", "buffer"]), hint=st.sampled_from([-1, 1, 2, 7]))
def test_lines_backends_agree(data: st.DataObject, how: str, hint: int) -> None:
    spec = data.draw(line_specs())
    stream = data.draw(line_streams())
    chunks = cut(stream, data.draw(st.lists(st.integers(0, 200), max_size=10)))
    c = c_backend()
    expected = transcript(py_impl.LineDecoder(spec), chunks, how, hint)
    assert transcript(c.LineDecoder(spec), chunks, how, hint) == expected


@pytest.mark.c_extension
@SETTINGS
@given(data=st.data())
def test_encoders_agree(data: st.DataObject) -> None:
    c = c_backend()
    payloads = data.draw(st.lists(st.binary(max_size=300), max_size=8))
    if data.draw(st.booleans()):
        spec: Any = data.draw(length_specs())
        pair = (py_impl.LengthPrefixedEncoder(spec), c.LengthPrefixedEncoder(spec))
    else:
        spec = data.draw(line_specs())
        pair = (py_impl.LineEncoder(spec), c.LineEncoder(spec))

    def outcome(encoder: Any) -> tuple:
        try:
            return ("ok", encoder.encode_many(payloads), [encoder.encode(p) for p in payloads[:2]])
        except FrameError as exc:
            return ("error", type(exc), exc.args)

    assert outcome(pair[1]) == outcome(pair[0])


@SETTINGS
@given(data=st.data())
def test_round_trip_any_chunking(frame_impl: Any, data: st.DataObject) -> None:
    """Whatever the chunking, decode(encode(payloads)) == payloads, on each backend alone."""
    spec = data.draw(length_specs().filter(lambda s: s.strip is None and s.offset == 0))
    field_max = (1 << (8 * spec.length_size)) - 1
    low, high = max(0, spec.adjustment), min(spec.max_frame, field_max + spec.adjustment, 2000)
    payloads = (
        data.draw(st.lists(st.binary(min_size=low, max_size=high), max_size=6))
        if low <= high
        else []
    )
    stream = frame_impl.LengthPrefixedEncoder(spec).encode_many(payloads)
    chunks = cut(stream, data.draw(st.lists(st.integers(0, 1 << 16), max_size=12)))
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    frames = [f for chunk in chunks for f in decoder.feed(chunk)]
    assert frames + decoder.eof() == payloads
