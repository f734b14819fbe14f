"""Encoders: round trips through the decoders, batching, and every encode error, both backends."""

from __future__ import annotations

from types import ModuleType

import pytest

from fastnet import FrameError, FrameTooLarge, LengthPrefixed, Lines

PAYLOADS = [b"", b"x", b"hello world", bytes(range(256)) * 5, b"\n\r\x00" * 3]

LP_SPECS = [
    LengthPrefixed(),
    LengthPrefixed(length_size=1, max_frame=255),
    LengthPrefixed(length_size=2, byteorder="little"),
    LengthPrefixed(length_size=3),
    LengthPrefixed(length_size=8, byteorder="little"),
    LengthPrefixed(length_size=4, adjustment=-4),  # field counts itself
    LengthPrefixed(length_size=2, adjustment=-2, strip=2),
]


@pytest.mark.parametrize("spec", LP_SPECS, ids=repr)
def test_length_prefixed_round_trip(frame_impl: ModuleType, spec: LengthPrefixed) -> None:
    encoder = frame_impl.LengthPrefixedEncoder(spec)
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    payloads = [p for p in PAYLOADS if len(p) <= spec.max_frame]
    one_by_one = b"".join(encoder.encode(p) for p in payloads)
    assert encoder.encode_many(payloads) == one_by_one
    assert encoder.encode_many(iter(payloads)) == one_by_one
    assert encoder.encode_many(tuple(payloads)) == one_by_one
    assert decoder.feed(one_by_one) == payloads
    assert decoder.eof() == []


def test_length_prefixed_wire_layout(frame_impl: ModuleType) -> None:
    enc = frame_impl.LengthPrefixedEncoder
    assert enc(LengthPrefixed()).encode(b"abc") == b"\x00\x00\x00\x03abc"
    assert enc(LengthPrefixed(length_size=2, byteorder="little")).encode(b"abc") == b"\x03\x00abc"
    assert enc(LengthPrefixed(length_size=3)).encode(b"a") == b"\x00\x00\x01a"
    assert enc(LengthPrefixed(length_size=4, adjustment=-4)).encode(b"ab") == b"\x00\x00\x00\x06ab"
    assert enc(LengthPrefixed(length_size=1, adjustment=2)).encode(b"abc") == b"\x01abc"
    assert enc(LengthPrefixed(length_size=8)).header(5) == b"\x00" * 7 + b"\x05"


def test_encode_accepts_bytes_like(frame_impl: ModuleType) -> None:
    encoder = frame_impl.LengthPrefixedEncoder(LengthPrefixed(length_size=1))
    assert encoder.encode(bytearray(b"ab")) == b"\x02ab"
    assert encoder.encode(memoryview(b"xabx")[1:3]) == b"\x02ab"
    assert encoder.encode_many([b"a", bytearray(b"b"), memoryview(b"c")]) == b"\x01a\x01b\x01c"
    assert encoder.encode_many([]) == b""
    with pytest.raises(TypeError):
        encoder.encode("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encoder.encode_many([b"a", 5])  # type: ignore[list-item]


def test_length_prefixed_encode_errors(frame_impl: ModuleType) -> None:
    enc = frame_impl.LengthPrefixedEncoder
    with pytest.raises(FrameTooLarge) as info:
        enc(LengthPrefixed(max_frame=4)).encode(b"12345")
    assert info.value.args == (5, 4)
    with pytest.raises(FrameTooLarge) as info:  # value does not fit a one-byte field
        enc(LengthPrefixed(length_size=1)).encode(b"x" * 256)
    assert info.value.args == (256, 255)
    with pytest.raises(FrameTooLarge):  # ... also when the adjustment pushes it over
        enc(LengthPrefixed(length_size=1, adjustment=-1)).encode(b"x" * 255)
    with pytest.raises(FrameError) as err:  # negative field value
        enc(LengthPrefixed(adjustment=3)).encode(b"ab")
    assert type(err.value) is FrameError
    assert "negative" in str(err.value)
    with pytest.raises(FrameTooLarge):
        enc(LengthPrefixed(max_frame=10)).header(11)


def test_encode_many_is_all_or_nothing(frame_impl: ModuleType) -> None:
    encoder = frame_impl.LengthPrefixedEncoder(LengthPrefixed(max_frame=3))
    with pytest.raises(FrameTooLarge):
        encoder.encode_many([b"ok", b"fine"])
    line_encoder = frame_impl.LineEncoder(Lines())
    with pytest.raises(FrameError):
        line_encoder.encode_many([b"ok", b"bad\n", b"fine"])


@pytest.mark.parametrize(
    "spec",
    [
        Lines(),
        Lines(delimiter=b"\r\n"),
        Lines(delimiter=b"END", strip=True),
        Lines(delimiter=b"\x00"),
    ],
    ids=repr,
)
def test_lines_round_trip(frame_impl: ModuleType, spec: Lines) -> None:
    encoder = frame_impl.LineEncoder(spec)
    decoder = frame_impl.LineDecoder(spec)
    payloads = [b"", b"a", b"hello world", b"E N D", b"\r mid"]
    stream = encoder.encode_many(payloads)
    assert stream == b"".join(encoder.encode(p) for p in payloads)
    assert stream == b"".join(p + spec.delimiter for p in payloads)
    assert decoder.feed(stream) == payloads


def test_lines_encode_errors(frame_impl: ModuleType) -> None:
    encoder = frame_impl.LineEncoder(Lines(max_length=4))
    with pytest.raises(FrameTooLarge) as info:
        encoder.encode(b"12345")
    assert info.value.args == (5, 4)
    with pytest.raises(FrameError) as err:
        encoder.encode(b"a\nb")
    assert type(err.value) is FrameError
    word = frame_impl.LineEncoder(Lines(delimiter=b"END"))
    assert word.encode(b"EN") == b"ENEND"
    with pytest.raises(FrameError):
        word.encode(b"xENDx")


def test_spec_methods_use_active_backend() -> None:
    spec = LengthPrefixed(length_size=2)
    assert spec.encode(b"hi") == b"\x00\x02hi"
    assert spec.encode_many([b"a", b"b"]) == b"\x00\x01a\x00\x01b"
    assert spec.decoder().feed(b"\x00\x01z") == [b"z"]
    lines = Lines()
    assert lines.encode_many([b"a", b"b"]) == b"a\nb\n"
    assert lines.decoder().feed(b"x\r\n") == [b"x"]


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"length_size": 5}, ValueError),
        ({"length_size": True}, ValueError),
        ({"byteorder": "middle"}, ValueError),
        ({"offset": -1}, ValueError),
        ({"strip": -1}, ValueError),
        ({"max_frame": -1}, ValueError),
        ({"max_frame": 1.5}, TypeError),
        ({"adjustment": 2**60}, ValueError),
    ],
)
def test_length_prefixed_spec_validation(kwargs: dict, exc: type) -> None:
    with pytest.raises(exc):
        LengthPrefixed(**kwargs)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        # The case: a 2-byte field announces at most 65,535 bytes.
        ({"length_size": 2, "max_frame": 100_000}, ["100000", "2-byte", "65535"]),
        ({"length_size": 1, "max_frame": 256}, ["256", "1-byte", "255"]),
        ({"length_size": 3, "max_frame": 1 << 24}, [str(1 << 24), "3-byte", str((1 << 24) - 1)]),
        ({"length_size": 4, "max_frame": 1 << 32}, [str(1 << 32), "4-byte"]),
        # The length counts the header: 6 of the field's 65,535 are not body.
        ({"length_size": 2, "adjustment": -6, "max_frame": 65530}, ["65530", "-6", "65529"]),
        ({"length_size": 1, "adjustment": -300}, ["-300", "negative"]),
        # Every body is at least `adjustment` bytes: none would pass max_frame.
        ({"adjustment": 10, "max_frame": 5}, ["adjustment 10", "max_frame 5"]),
        # Every frame is shorter than what is to be stripped from it.
        ({"max_frame": 2, "strip": 7}, ["strip 7", "max_frame 2"]),
    ],
)
def test_impossible_layouts_are_refused_when_built(kwargs: dict, names: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        LengthPrefixed(**kwargs)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs, max_frame",
    [
        ({}, 8 * 1024 * 1024),
        ({"length_size": 1}, 255),
        ({"length_size": 2}, 65535),
        ({"length_size": 2, "adjustment": -6}, 65529),
        ({"length_size": 2, "adjustment": 6}, 65541),
        ({"length_size": 3}, 8 * 1024 * 1024),
        ({"length_size": 8}, 8 * 1024 * 1024),
        ({"length_size": 2, "max_frame": 65535}, 65535),
        ({"length_size": 3, "max_frame": (1 << 24) - 1}, (1 << 24) - 1),
        ({"length_size": 8, "max_frame": 2**48}, 2**48),
        ({"adjustment": 5, "max_frame": 5}, 5),
        ({"max_frame": 2, "strip": 6}, 2),
    ],
)
def test_default_max_frame_fits_the_field(kwargs: dict, max_frame: int) -> None:
    spec = LengthPrefixed(**kwargs)
    assert spec.max_frame == max_frame
    assert type(spec.max_frame) is int
    assert spec == LengthPrefixed(**{**kwargs, "max_frame": max_frame})


def test_largest_allowed_frame_round_trips(frame_impl: ModuleType) -> None:
    """What max_frame allows, the field can announce: encoding never fails on the field alone."""
    for spec in (
        LengthPrefixed(length_size=1),
        LengthPrefixed(length_size=2, adjustment=-2),
        LengthPrefixed(length_size=2, adjustment=3),
    ):
        encoder = frame_impl.LengthPrefixedEncoder(spec)
        largest = b"L" * spec.max_frame
        assert frame_impl.LengthPrefixedDecoder(spec).feed(encoder.encode(largest)) == [largest]
        with pytest.raises(FrameTooLarge) as info:
            encoder.encode(largest + b"+")
        assert info.value.args == (spec.max_frame + 1, spec.max_frame)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"delimiter": b""}, ValueError),
        ({"delimiter": "\n"}, ValueError),
        ({"max_length": -1}, ValueError),
        ({"strip": 1}, TypeError),
    ],
)
def test_lines_spec_validation(kwargs: dict, exc: type) -> None:
    with pytest.raises(exc):
        Lines(**kwargs)


def test_specs_are_immutable_values() -> None:
    assert LengthPrefixed(length_size=2) == LengthPrefixed(length_size=2)
    assert hash(Lines()) == hash(Lines())
    assert LengthPrefixed().strip_size == 4
    assert LengthPrefixed(offset=2, length_size=2).header_size == 4
    with pytest.raises(AttributeError):
        LengthPrefixed().max_frame = 1  # type: ignore[misc]
