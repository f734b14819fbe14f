"""The PROXY protocol: the sans-IO parser (fastnet.proxy) and the server reading it.

The parser is tested with plain bytes: the spec's examples, CRC32C vectors,
and hypothesis properties over headers built by the encoder below (written
from the spec with ``struct``, independent of ``fastnet.proxy.encode``):

- any valid header parses back to what was encoded, whole, in any chunks,
  and through a simulated socket read byte-exact (peek, or ``need``-sized
  reads): the bytes after the header are never taken;
- any proper prefix of a valid header asks for more (None; never an error,
  never a header), with ``need`` at least 1 and never past the header;
- a single changed byte in the fixed part (signature, version and command,
  family and transport, length) gives the error that byte's meaning implies,
  or a header whose fields say what the changed byte says and that
  re-encodes to the bytes it was parsed from; a changed byte of a header
  with a CRC32C is never accepted while the CRC TLV is still there.

The server tests run on both loops and both codec backends (``arun``), with
real sockets on 127.0.0.1 (and 127.0.0.2 as an untrusted source).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import itertools
import json
import logging
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_server_support import Runner, frame_bytes, server_process, wait_until
from tls_support import TLSCerts, make_certs

import fastnet
from fastnet import proxy
from fastnet.cli import build_parser, server_options
from fastnet.proxy import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyParser,
    ProxySettings,
    crc32c,
    encode,
    parse,
)

pytest_plugins = ["test_server_support"]

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"

# ------------------------------------------------------------ a test encoder

FAMILY_CODE = {"UNSPEC": 0, "INET": 1, "INET6": 2, "UNIX": 3}
TRANSPORT_CODE = {"UNSPEC": 0, "STREAM": 1, "DGRAM": 2}


def v1_line(proto: str, src: str = "", dst: str = "", sport: int = 0, dport: int = 0) -> bytes:
    if proto == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2_block(
    command: int,
    family: str,
    transport: str,
    src: Any = None,
    dst: Any = None,
    tlvs: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
    crc: bool = False,
    length: int | None = None,
) -> bytes:
    """A version 2 header from its parts, as the spec's structs lay it out."""
    if family == "INET":
        addresses = struct.pack(
            "!4s4sHH",
            socket.inet_pton(socket.AF_INET, src[0]),
            socket.inet_pton(socket.AF_INET, dst[0]),
            src[1],
            dst[1],
        )
    elif family == "INET6":
        addresses = struct.pack(
            "!16s16sHH",
            socket.inet_pton(socket.AF_INET6, src[0]),
            socket.inet_pton(socket.AF_INET6, dst[0]),
            src[1],
            dst[1],
        )
    elif family == "UNIX":
        addresses = src.encode().ljust(108, b"\0") + dst.encode().ljust(108, b"\0")
    else:
        addresses = b""
    body = addresses + b"".join(tlv(k, v) for k, v in tlvs)
    if crc:
        body += tlv(0x03, b"\0\0\0\0")
    fam = FAMILY_CODE[family] << 4 | TRANSPORT_CODE[transport]
    size = len(body) if length is None else length
    data = bytearray(V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, fam, size) + body)
    if crc:
        data[-4:] = struct.pack("!I", crc32c(bytes(data)))
    return bytes(data)


# ------------------------------------------------------------- parser basics


def parse_whole(data: bytes, accept: str = "any") -> tuple[ProxyHeader | None, bytes]:
    return parse(data, accept)


def test_spec_v1_example() -> None:
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    header, rest = parse_whole(data)
    assert header == ProxyHeader(
        1, "PROXY", "INET", "STREAM", ("192.168.0.1", 56324), ("192.168.0.11", 443)
    )
    assert header.peer == ("192.168.0.1", 56324)
    assert rest == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",  # 56 bytes
        b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",  # 104
        b"PROXY UNKNOWN\r\n",  # 15
        b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
    ],
    ids=["tcp4-longest", "tcp6-longest", "unknown-short", "worst-case-107"],
)
def test_spec_v1_lengths(line: bytes) -> None:
    header, rest = parse_whole(line + b"x")
    assert header is not None and rest == b"x"
    assert len(line) <= proxy.V1_MAX_LENGTH


def test_v1_unknown_uses_the_real_addresses() -> None:
    header, _ = parse_whole(b"PROXY UNKNOWN anything at all, ignored\r\n")
    assert header is not None
    assert header.family == "UNSPEC" and header.source is None and header.peer is None
    assert header.unknown_rest == b" anything at all, ignored"
    assert encode(header) == b"PROXY UNKNOWN anything at all, ignored\r\n"


def test_v1_line_of_108_bytes_is_oversized() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107
    assert parse_whole(line)[0] is not None
    with pytest.raises(ProxyHeaderError) as info:
        parse_whole(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")
    assert info.value.cause == "oversized"


@pytest.mark.parametrize(
    ("data", "cause"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad_signature"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "bad_signature"),  # a TLS ClientHello
        (b"PROXZ TCP4", "bad_signature"),
        (b"PROXY\r\n", "bad_signature"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "unknown_family"),
        (b"PROXY UNKNOWNX\r\n", "unknown_family"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.04 1.2.3.4 1 2\r\n", "malformed"),  # leading zero
        (b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "malformed"),  # leading zero
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "malformed"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "malformed"),  # the family's format
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "malformed"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed"),  # no zone
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX\r\n", "malformed"),  # a lone CR
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n" + b" " * 80, "oversized"),  # a lone LF never ends it
        (V2_SIGNATURE + b"\x11", "unknown_version"),
        (V2_SIGNATURE + b"\x22", "unknown_command"),
        (V2_SIGNATURE + b"\x21\x41", "unknown_family"),
        (V2_SIGNATURE + b"\x21\x13", "unknown_family"),
        (V2_SIGNATURE + b"\x21\x11\x10\x01", "oversized"),  # 4097 > 4096
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4, "malformed"),  # INET takes 12
        (V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\0" * 12 + b"\x01\x00", "malformed"),  # a TLV?
    ],
)
def test_errors(data: bytes, cause: str) -> None:
    with pytest.raises(ProxyHeaderError) as info:
        header, _ = parse_whole(data)
        assert header is None  # incomplete: the end of the stream makes it an error
        parser = ProxyParser()
        parser.feed(data)
        parser.eof()
    assert info.value.cause == cause, info.value
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, fastnet.FastnetError)


def test_malformed_tlvs() -> None:
    base = ("1.2.3.4", 1), ("5.6.7.8", 2)
    addresses = v2_block(1, "INET", "STREAM", *base)[16:]
    overrun = addresses + b"\x01\x00\x05h2"  # says 5 bytes, has 2
    with pytest.raises(ProxyHeaderError) as info:
        parse_whole(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(overrun)) + overrun)
    assert info.value.cause == "malformed"
    cases = {
        "crc-size": [(0x03, b"\0\0\0")],
        "two-crcs": [(0x03, b"\0\0\0\0"), (0x03, b"\0\0\0\0")],
        "unique-id-129": [(0x05, b"u" * 129)],
        "ssl-short": [(0x20, b"\x01\0\0")],
        "ssl-sub-overrun": [(0x20, b"\x01\0\0\0\0" + b"\x21\x00\x09TLS")],
    }
    for name, tlvs in cases.items():
        data = v2_block(1, "INET", "STREAM", *base, tlvs=tlvs)
        with pytest.raises(ProxyHeaderError) as info:
            parse_whole(data)
        assert info.value.cause == "malformed", name


def test_haproxy_v2_capture() -> None:
    # What HAProxy's send-proxy-v2 wrote before an HTTP request (a capture in
    # seriousben/experiment-proxy-protocol's README).
    data = bytes.fromhex(
        "0d0a0d0a000d0a515549540a"  # the signature
        "2111000c"  # version 2, PROXY; TCP over IPv4; 12 bytes
        "ac130001ac130003a6520050"  # 172.19.0.1:42578 -> 172.19.0.3:80
        "474554202f20"  # GET /
    )
    header, rest = parse_whole(data)
    assert header == ProxyHeader(
        2, "PROXY", "INET", "STREAM", ("172.19.0.1", 42578), ("172.19.0.3", 80)
    )
    assert rest == b"GET / "


def test_v2_local_ignores_addresses() -> None:
    header, _ = parse_whole(v2_block(0, "UNSPEC", "UNSPEC"))
    assert header is not None
    assert header.command == "LOCAL" and header.peer is None
    # A LOCAL header may carry addresses; they are kept, not used.
    header, _ = parse_whole(v2_block(0, "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2)))
    assert header is not None
    assert header.source == ("1.2.3.4", 1) and header.peer is None


def test_v2_unix_and_dgram() -> None:
    data = v2_block(1, "UNIX", "DGRAM", "/run/client.sock", "/run/haproxy.sock")
    header, _ = parse_whole(data)
    assert header is not None
    assert (header.family, header.transport) == ("UNIX", "DGRAM")
    assert header.peer == "/run/client.sock"
    assert header.destination == "/run/haproxy.sock"
    assert encode(header) == data


def test_v2_tlvs_exposed() -> None:
    ssl_value = (
        b"\x07"  # SSL, a certificate on this connection and on the session
        + b"\0\0\0\0"  # verified
        + tlv(0x21, b"TLSv1.3")
        + tlv(0x22, b"client.example")
        + tlv(0x23, b"TLS_AES_256_GCM_SHA384")
        + tlv(0x24, b"RSA-SHA256")
        + tlv(0x25, b"RSA2048")
    )
    data = v2_block(
        1,
        "INET6",
        "STREAM",
        ("2001:db8::7", 40000),
        ("2001:db8::1", 443),
        tlvs=[
            (0x01, b"h2"),
            (0x02, b"api.example.com"),
            (0x04, b"\0\0\0"),
            (0x05, b"conn-42"),
            (0x20, ssl_value),
            (0x30, b"blue"),
            (0xE0, b"custom"),
        ],
        crc=True,
    )
    header, _ = parse_whole(data)
    assert header is not None
    assert header.peer == ("2001:db8::7", 40000)
    assert header.alpn == b"h2"
    assert header.authority == "api.example.com"
    assert header.unique_id == b"conn-42"
    assert header.netns == "blue"
    assert header.tlv(0xE0) == b"custom"
    assert header.crc32c == int.from_bytes(data[-4:], "big")
    tls = header.ssl
    assert tls is not None
    assert tls.tls and tls.client_cert and tls.verified
    assert (tls.version, tls.cn, tls.cipher) == (
        "TLSv1.3",
        "client.example",
        "TLS_AES_256_GCM_SHA384",
    )
    assert (tls.sig_alg, tls.key_alg) == ("RSA-SHA256", "RSA2048")
    assert encode(header) == data


def test_v2_bad_crc() -> None:
    data = bytearray(v2_block(1, "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2), crc=True))
    data[20] ^= 0x01  # the source address
    with pytest.raises(ProxyHeaderError) as info:
        parse_whole(bytes(data))
    assert info.value.cause == "bad_crc"


def test_accept_modes() -> None:
    v1 = v1_line("TCP4", "1.2.3.4", "5.6.7.8", 1, 2)
    v2 = v2_block(1, "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2))
    assert parse(v1, "v1")[0] == parse(v1, "any")[0]
    assert parse(v2, "v2")[0] == parse(v2, "any")[0]
    for data, accept in ((v1, "v2"), (v2, "v1")):
        with pytest.raises(ProxyHeaderError) as info:
            parse(data, accept)
        assert info.value.cause == "bad_signature"
    with pytest.raises(ValueError):
        ProxyParser("v3")


def test_parser_after_the_header_and_after_an_error() -> None:
    parser = ProxyParser()
    assert parser.feed(b"PROXY UNKNOWN\r\nrest") is not None
    assert parser.rest == b"rest"
    assert (parser.need, parser.limit, parser.header_length(b"more")) == (0, 0, 0)
    parser.eof()  # fine: the header is complete
    with pytest.raises(RuntimeError):
        parser.feed(b"x")
    parser = ProxyParser()
    with pytest.raises(ProxyHeaderError) as first:
        parser.feed(b"nope")
    with pytest.raises(ProxyHeaderError) as again:
        parser.feed(b"PROXY UNKNOWN\r\n")
    assert again.value is first.value


def test_truncated_at_eof() -> None:
    parser = ProxyParser()
    assert parser.feed(b"PROXY TCP4 1.2") is None
    with pytest.raises(ProxyHeaderError) as info:
        parser.eof()
    assert info.value.cause == "truncated"
    assert parser.received == 14
    empty = ProxyParser()
    with pytest.raises(ProxyHeaderError) as info:
        empty.eof()
    assert info.value.cause == "truncated" and empty.received == 0


# ------------------------------------------------------------------ CRC32C


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),  # the check value of CRC-32C
        (b"\0" * 32, 0x8A9136AA),  # RFC 3720, B.4
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_vectors(data: bytes, crc: int) -> None:
    assert crc32c(data) == crc


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_crc32c_continues(a: bytes, b: bytes) -> None:
    assert crc32c(b, crc32c(a)) == crc32c(a + b)


# ------------------------------------------------------ hypothesis: headers

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
# Unix paths: printable, no NUL (a NUL would end it), at most 108 bytes.
unix_paths = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100
)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        rest = draw(st.sampled_from([b"", b" ", b" TCP4 1.2.3.4 5.6.7.8 1 2", b" whatever"]))
        header = ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None, unknown_rest=rest)
        return b"PROXY UNKNOWN" + rest + b"\r\n", header
    hosts = ipv4 if kind == "TCP4" else ipv6
    src, dst = draw(hosts), draw(hosts)
    sport, dport = draw(ports), draw(ports)
    family = "INET" if kind == "TCP4" else "INET6"
    header = ProxyHeader(1, "PROXY", family, "STREAM", (src, sport), (dst, dport))
    return v1_line(kind, src, dst, sport, dport), header


@st.composite
def ssl_values(draw: st.DrawFn) -> bytes:
    subs = draw(
        st.lists(
            st.tuples(st.sampled_from([0x21, 0x22, 0x23, 0x24, 0x25]), st.binary(max_size=20)),
            max_size=4,
        )
    )
    head = struct.pack("!BI", draw(st.integers(0, 7)), draw(st.sampled_from([0, 1, 0xFFFFFFFF])))
    return head + b"".join(tlv(k, v) for k, v in subs)


tlv_lists = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x30, 0xE0, 0xF7]), st.binary(max_size=40)),
        st.tuples(st.just(0x05), st.binary(max_size=128)),
        st.tuples(st.just(0x20), ssl_values()),
    ),
    max_size=5,
)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    command = draw(st.sampled_from([0, 1]))
    family = draw(st.sampled_from(["UNSPEC", "INET", "INET6", "UNIX"]))
    transport = draw(st.sampled_from(["UNSPEC", "STREAM", "DGRAM"]))
    src: Any = None
    dst: Any = None
    if family == "INET":
        src, dst = (draw(ipv4), draw(ports)), (draw(ipv4), draw(ports))
    elif family == "INET6":
        src, dst = (draw(ipv6), draw(ports)), (draw(ipv6), draw(ports))
    elif family == "UNIX":
        src, dst = draw(unix_paths), draw(unix_paths)
    tlvs = draw(tlv_lists)
    crc = draw(st.booleans())
    data = v2_block(command, family, transport, src, dst, tlvs, crc)
    expected_tlvs = tuple(tlvs) + (((0x03, data[-4:]),) if crc else ())
    header = ProxyHeader(2, ("LOCAL", "PROXY")[command], family, transport, src, dst, expected_tlvs)
    return data, header


headers = st.one_of(v1_headers(), v2_headers())
trailing = st.binary(max_size=64)
PROPERTY = settings(max_examples=300, deadline=None)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@PROPERTY
@given(headers, trailing, st.lists(st.integers(0, 10_000), max_size=12))
def test_roundtrip(case: tuple[bytes, ProxyHeader], after: bytes, cuts: list[int]) -> None:
    data, expected = case
    assert parse(data + after) == (expected, after)
    # Whole or in chunks: the same header; bytes past it kept in `rest`.
    parser = ProxyParser()
    chunks = chunked(data + after, cuts)
    for i, chunk in enumerate(chunks):
        header = parser.feed(chunk)
        if header is not None:
            assert header == expected
            assert parser.rest + b"".join(chunks[i + 1 :]) == after
            break
    else:
        raise AssertionError("no header")
    # fastnet's own encoder gives the bytes back (IPv6 v1 hosts as Python writes them).
    assert encode(expected) == data
    assert parse(encode(expected, checksum=True))[0] is not None


def read_byte_exact(segments: list[bytes], peek: bool, accept: str = "any") -> tuple[Any, bytes]:
    """What _proxy_io does, over a simulated socket: the header and what stays unread."""
    parser = ProxyParser(accept)
    buffered = b""
    pending = list(segments)
    while True:
        if not buffered:
            if not pending:
                raise AssertionError("the reader wanted more than the stream had")
            buffered += pending.pop(0)
            continue
        if peek:
            peeked = buffered[: parser.limit]
            count = parser.header_length(peeked)
            assert 1 <= count <= len(peeked)
        else:
            count = min(parser.need, len(buffered))
            assert count >= 1
        data, buffered = buffered[:count], buffered[count:]
        header = parser.feed(data)
        if header is not None:
            assert parser.rest == b""  # nothing read past the header
            return header, buffered + b"".join(pending)


@PROPERTY
@given(headers, trailing, st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
def test_byte_exact_reads(
    case: tuple[bytes, ProxyHeader], after: bytes, cuts: list[int], peek: bool
) -> None:
    data, expected = case
    header, unread = read_byte_exact(chunked(data + after, cuts), peek)
    assert header == expected
    assert unread == after


@PROPERTY
@given(headers, st.data())
def test_every_truncation_asks_for_more(case: tuple[bytes, ProxyHeader], data: Any) -> None:
    whole, _ = case
    cut = data.draw(st.integers(0, len(whole) - 1))
    parser = ProxyParser()
    assert parser.feed(whole[:cut]) is None
    left = len(whole) - cut
    assert 1 <= parser.need <= left  # reading `need` never passes the header
    assert parser.limit >= left
    assert parser.header_length(whole[cut:] + b"PROXY trailing") == left
    with pytest.raises(ProxyHeaderError) as info:
        parser.eof()
    assert info.value.cause == "truncated"


def outcome(data: bytes, accept: str = "any") -> tuple[str, Any]:
    """("header", (header, consumed)), ("more", None) or ("error", cause)."""
    parser = ProxyParser(accept)
    try:
        header = parser.feed(data)
    except ProxyHeaderError as exc:
        return "error", exc.cause
    if header is None:
        return "more", None
    return "header", (header, len(data) - len(parser.rest))


@PROPERTY
@given(v2_headers(), st.integers(0, 15), st.integers(0, 255), st.sampled_from(["v2", "any"]))
def test_v2_fixed_part_corruption(
    case: tuple[bytes, ProxyHeader], index: int, value: int, accept: str
) -> None:
    """One byte of the 16-byte fixed part changed: the error its meaning implies, or a
    header that says what the changed byte says and re-encodes to the bytes it came from.

    - signature byte: bad_signature;
    - version/command byte: a version nibble other than 2 is unknown_version; a command
      other than LOCAL/PROXY unknown_command; a valid command parses as that command;
    - family/transport byte: an unassigned nibble is unknown_family; an assigned one
      parses with that family (if the addresses and TLVs still fit: else malformed or,
      with a CRC, bad_crc);
    - length bytes: longer than the limit is oversized; longer than the bytes given asks
      for more; shorter parses the first bytes only (or malformed / bad_crc).
    """
    original, _ = case
    assume(original[index] != value)
    data = bytearray(original)
    data[index] = value
    data = bytes(data)
    kind, result = outcome(data, accept)
    if index < 12:
        assert (kind, result) == ("error", "bad_signature")
        return
    if index == 12:
        if value >> 4 != 2:
            assert (kind, result) == ("error", "unknown_version")
        elif value & 0x0F > 1:
            assert (kind, result) == ("error", "unknown_command")
        else:  # the other command: the same header otherwise
            assert kind == "header"
            assert result[0].command == ("LOCAL", "PROXY")[value & 0x0F]
    elif index == 13:
        if value >> 4 > 3 or value & 0x0F > 2:
            assert (kind, result) == ("error", "unknown_family")
        elif kind == "error":
            assert result in ("malformed", "bad_crc")
        else:
            assert kind == "header"
            assert FAMILY_CODE[result[0].family] == value >> 4
            assert TRANSPORT_CODE[result[0].transport] == value & 0x0F
    else:
        length = int.from_bytes(data[14:16], "big")
        if length > proxy.DEFAULT_MAX_V2_LENGTH:
            assert (kind, result) == ("error", "oversized")
        elif 16 + length > len(data):
            assert kind == "more"
        else:
            assert kind in ("header", "error")
            if kind == "error":
                assert result in ("malformed", "bad_crc")
            else:
                assert result[1] == 16 + length
    if kind == "header":
        header, consumed = result
        assert encode(header) == data[:consumed]


@PROPERTY
@given(v2_headers(), st.data())
def test_v2_crc_catches_any_changed_byte(case: tuple[bytes, ProxyHeader], data: Any) -> None:
    original, header = case
    assume(header.crc32c is not None)
    index = data.draw(st.integers(16, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[index]))
    changed = bytearray(original)
    changed[index] = value
    kind, result = outcome(bytes(changed))
    if kind == "header":  # only when the change removed the CRC TLV itself
        assert result[0].crc32c is None
    else:
        assert kind == "error" and result in ("malformed", "bad_crc")


@PROPERTY
@given(v1_headers(), st.data())
def test_v1_corruption(case: tuple[bytes, ProxyHeader], data: Any) -> None:
    """One byte of a version 1 line changed: an error, a request for more (the CRLF
    is gone), or a line that parses consistently (re-encodes to the same header)."""
    original, _ = case
    index = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[index]))
    changed = bytearray(original)
    changed[index] = value
    kind, result = outcome(bytes(changed), "v1")
    if index < 6:
        assert (kind, result) == ("error", "bad_signature")
    elif kind == "header":
        header, consumed = result
        assert parse(encode(header), "v1")[0] == header
        if header.family != "INET6":
            assert encode(header) == bytes(changed[:consumed])
    elif kind == "error":
        assert result in ("malformed", "unknown_family", "oversized")


# -------------------------------------------------------- settings and CLI


def test_settings_trust() -> None:
    settings_ = ProxySettings.make("v2", ["10.0.0.0/8", "127.0.0.1", "::1"])
    assert settings_.trusts(("10.1.2.3", 5))
    assert settings_.trusts(("127.0.0.1", 5))
    assert not settings_.trusts(("127.0.0.2", 5))
    assert settings_.trusts(("::1", 5, 0, 0))
    assert settings_.trusts(("::ffff:10.0.0.1", 5, 0, 0))  # a dual-stack socket's IPv4 peer
    assert not settings_.trusts(("2001:db8::1", 5, 0, 0))
    assert settings_.trusts("")  # a Unix-socket peer
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        ProxySettings.make("v2", ["10.0.0.0/33"])
    with pytest.raises(ValueError, match="proxy_protocol"):
        ProxySettings.make("v3", ["10.0.0.0/8"])


def test_server_arguments() -> None:
    async def handler(conn: fastnet.Connection) -> None:
        pass

    with pytest.raises(ValueError, match="trusted_proxies"):
        fastnet.Server(handler, proxy_protocol="v1")
    with pytest.raises(ValueError, match="proxy_protocol"):
        fastnet.Server(handler, trusted_proxies=["10.0.0.0/8"])
    with pytest.raises(ValueError, match="not an address"):
        fastnet.Server(handler, proxy_protocol="v1", trusted_proxies=["nope"])
    with pytest.raises(ValueError, match="proxy_header_timeout"):
        fastnet.Server(handler, proxy_protocol="v1", trusted_proxies="::1", proxy_header_timeout=0)
    fastnet.Server(handler, proxy_protocol="any", trusted_proxies="127.0.0.1")


def cli_options(*args: str) -> dict[str, Any]:
    return server_options(build_parser().parse_args(["serve", "echo", *args]))


def test_cli_options() -> None:
    options = cli_options(
        "--proxy-protocol", "V2", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"
    )
    assert options["proxy_protocol"] == "v2"
    assert options["trusted_proxies"] == ["10.0.0.0/8", "::1"]
    assert options["proxy_header_timeout"] == proxy.DEFAULT_PROXY_HEADER_TIMEOUT
    assert "proxy_protocol" not in cli_options()
    options = cli_options("--host", "unix:/tmp/x.sock", "--proxy-protocol", "v1")
    assert options["proxy_protocol"] == "v1" and options["trusted_proxies"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proxy-protocol", "v2"], "--proxy-protocol needs --trusted-proxy"),
        (["--trusted-proxy", "10.0.0.0/8"], "--trusted-proxy needs --proxy-protocol"),
        (["--proxy-protocol", "v3", "--trusted-proxy", "::1"], "invalid choice"),
        (["--proxy-protocol", "v1", "--trusted-proxy", "10.0.0.0/33"], "10.0.0.0/33"),
        (["--proxy-protocol", "v1", "--trusted-proxy", "::1", "--proxy-header-timeout", "0"], ""),
    ],
)
def test_cli_usage_errors(args: list[str], message: str) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "fastnet", "serve", "echo", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_serves_behind_a_proxy_header() -> None:
    args = ["echo", "--port", "0", "--proxy-protocol", "v1", "--trusted-proxy", "127.0.0.1"]
    with server_process(args) as server:
        header = v1_line("TCP4", "198.51.100.9", "127.0.0.1", 5000, 80)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(header + frame_bytes(b"hi"))
            assert sock.recv(100) == frame_bytes(b"hi")


# ---------------------------------------------------------------- the server

TIMEOUT = 5.0


def describe(conn: fastnet.Connection) -> bytes:
    """What the handlers answer: what the connection knows of its peer."""
    header = conn.proxy
    return json.dumps(
        {
            "peer": conn.peer if isinstance(conn.peer, str) else list(conn.peer[:2]),
            "local": list(conn.local[:2]),
            "proxy": None if header is None else list(header.proxy_address[:2]),
            "command": None if header is None else header.command,
            "authority": None if header is None else header.authority,
            "unique_id": None
            if header is None or header.unique_id is None
            else header.unique_id.decode(),
        }
    ).encode()


async def describe_task(conn: fastnet.Connection) -> None:
    async for _ in conn:
        conn.send(describe(conn))


@fastnet.callback_handler
def describe_callback(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
    return [describe(conn) for _ in frames]


HANDLERS = {"task": describe_task, "callback": describe_callback}


@contextlib.asynccontextmanager
async def proxied_server(
    handler: Any = describe_task,
    accept: str = "any",
    trusted: Any = ("127.0.0.1",),
    **kwargs: Any,
) -> AsyncIterator[fastnet.Server]:
    kwargs.setdefault("drain_timeout", 5.0)
    server = fastnet.Server(
        handler, "127.0.0.1", 0, proxy_protocol=accept, trusted_proxies=trusted, **kwargs
    )
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


class Client:
    """A raw client: it writes the header and frames itself, reads length-prefixed replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = fastnet.LengthPrefixed().decoder()
        self.frames: list[bytes] = []

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), TIMEOUT
        )
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    @property
    def port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def replies(self, count: int) -> list[Any]:
        while len(self.frames) < count:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            assert data, f"closed after {len(self.frames)} of {count} replies"
            self.frames += self.decoder.feed(data)
        replies, self.frames = self.frames[:count], self.frames[count:]
        return [json.loads(r) for r in replies]

    async def closed_by_server(self) -> bytes:
        """Wait (bounded) until the server closes: EOF or a reset. Returns what came before."""
        received = b""
        with contextlib.suppress(ConnectionError):
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
                if not data:
                    break
                received += data
        return received

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


@pytest.mark.parametrize("kind", HANDLERS)
def test_v1_peer_is_the_client(arun: Runner[Any], kind: str) -> None:
    async def scenario() -> None:
        async with proxied_server(HANDLERS[kind], accept="v1") as server:
            client = await Client.open(server.port)
            # The header and the first frames in one segment: none is lost.
            await client.send(
                v1_line("TCP4", "203.0.113.7", "192.0.2.1", 4242, 443)
                + frame_bytes(b"a")
                + frame_bytes(b"b")
            )
            first, second = await client.replies(2)
            assert first == second
            assert first["peer"] == ["203.0.113.7", 4242]
            assert first["proxy"] == ["127.0.0.1", client.port]
            assert first["local"] == ["127.0.0.1", server.port]
            assert first["command"] == "PROXY"
            await client.close()

    arun(scenario())


@pytest.mark.parametrize("kind", HANDLERS)
@pytest.mark.parametrize("family", ["INET", "INET6"])
def test_v2_peer_and_tlvs(arun: Runner[Any], kind: str, family: str) -> None:
    src = ("198.51.100.20", 61000) if family == "INET" else ("2001:db8::20", 61000)
    dst = ("192.0.2.1", 443) if family == "INET" else ("2001:db8::1", 443)
    header = v2_block(
        1, family, "STREAM", src, dst, tlvs=[(0x02, b"api.example"), (0x05, b"id-1")], crc=True
    )

    async def scenario() -> None:
        async with proxied_server(HANDLERS[kind], accept="v2") as server:
            client = await Client.open(server.port)
            await client.send(header + frame_bytes(b"x") * 3)
            replies = await client.replies(3)
            assert all(r["peer"] == list(src) for r in replies)
            assert replies[0]["authority"] == "api.example"
            assert replies[0]["unique_id"] == "id-1"
            await client.close()
            assert server.stats()["proxy_header_errors"] == 0

    arun(scenario())


@pytest.mark.parametrize(
    "header",
    [
        v2_block(0, "UNSPEC", "UNSPEC"),
        v2_block(0, "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2)),
    ],
    ids=["local", "local-with-addresses"],
)
def test_v2_local_uses_the_socket_addresses(arun: Runner[Any], header: bytes) -> None:
    async def scenario() -> None:
        async with proxied_server(accept="any") as server:
            client = await Client.open(server.port)
            await client.send(header + frame_bytes(b"x"))
            (reply,) = await client.replies(1)
            assert reply["command"] == "LOCAL"
            assert reply["peer"] == ["127.0.0.1", client.port]
            await client.close()

    arun(scenario())


def test_v1_unknown_uses_the_socket_addresses(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with proxied_server(accept="v1") as server:
            client = await Client.open(server.port)
            await client.send(b"PROXY UNKNOWN\r\n" + frame_bytes(b"x"))
            (reply,) = await client.replies(1)
            assert reply["peer"] == ["127.0.0.1", client.port]
            await client.close()

    arun(scenario())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_split_across_sends(arun: Runner[Any], version: str) -> None:
    if version == "v1":
        header = v1_line("TCP6", "2001:db8::5", "2001:db8::1", 1234, 80)
    else:
        header = v2_block(1, "INET", "STREAM", ("203.0.113.5", 1234), ("192.0.2.1", 80))

    async def scenario() -> None:
        async with proxied_server(accept="any") as server:
            client = await Client.open(server.port)
            # One byte, the rest of the signature, then the rest with the
            # first frame: the server sees each piece as it comes.
            for piece in (header[:1], header[1:7], header[7:20], header[20:]):
                await client.send(piece)
                await asyncio.sleep(0.02)
            await client.send(frame_bytes(b"x"))
            (reply,) = await client.replies(1)
            assert reply["peer"][0] in ("2001:db8::5", "203.0.113.5")
            assert reply["peer"][1] == 1234
            await client.close()

    arun(scenario())


def test_frames_in_the_header_segment_are_kept(arun: Runner[Any]) -> None:
    # A hundred frames right behind the header, in one write: all answered.
    async def scenario() -> None:
        async with proxied_server(describe_callback, accept="v1") as server:
            client = await Client.open(server.port)
            await client.send(
                v1_line("TCP4", "203.0.113.1", "192.0.2.1", 1, 2)
                + b"".join(frame_bytes(b"%d" % i) for i in range(100))
            )
            replies = await client.replies(100)
            assert {r["peer"][0] for r in replies} == {"203.0.113.1"}
            await client.close()

    arun(scenario())


def test_untrusted_source_is_closed_at_once(arun: Runner[Any]) -> None:
    ran = []

    async def handler(conn: fastnet.Connection) -> None:
        ran.append(conn)

    async def scenario() -> None:
        async with proxied_server(handler, trusted=["10.0.0.0/8"], metrics=registry()) as server:
            for source in ("127.0.0.1", "127.0.0.2"):
                client = await Client.open(server.port, source)
                began = time.monotonic()
                await client.send(v1_line("TCP4", "1.2.3.4", "5.6.7.8", 1, 2) + frame_bytes(b"x"))
                assert await client.closed_by_server() == b""
                assert time.monotonic() - began < TIMEOUT
                await client.close()
            await wait_until(lambda: server.stats()["closed"] == 2, what="both closed")
            stats = server.stats()
            assert stats["proxy_untrusted"] == 2
            assert stats["proxy_header_errors"] == 0
            assert stats["active"] == 0
            assert 'cause="untrusted_proxy"' in scrape(server)
        assert ran == []

    arun(scenario())


def registry() -> Any:
    prometheus_client = pytest.importorskip("prometheus_client")
    return prometheus_client.CollectorRegistry()


def scrape(server: fastnet.Server) -> str:
    import prometheus_client

    from fastnet.metrics import FastnetCollector

    reg = prometheus_client.CollectorRegistry()
    collector = FastnetCollector()
    collector.add(server)
    reg.register(collector)
    return prometheus_client.generate_latest(reg).decode()


BAD_HEADERS = {
    "bad_signature": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "oversized": b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n",
    "malformed": b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
    "unknown_version": V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12,
    "bad_crc": v2_block(1, "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2), crc=True)[:-1] + b"?",
    "truncated": b"PROXY TCP4 1.2.3.4 5.",
}


@pytest.mark.parametrize("cause", BAD_HEADERS)
def test_bad_header_is_counted_logged_and_closed(
    arun: Runner[Any], cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastnet")

    async def scenario() -> None:
        async with proxied_server(metrics=registry()) as server:
            # A healthy connection first; it must not notice.
            good = await Client.open(server.port)
            await good.send(v1_line("TCP4", "203.0.113.9", "192.0.2.1", 7, 8) + frame_bytes(b"1"))
            assert (await good.replies(1))[0]["peer"] == ["203.0.113.9", 7]

            bad = await Client.open(server.port)
            await bad.send(BAD_HEADERS[cause] + frame_bytes(b"never read"))
            if cause == "truncated":
                bad.writer.write_eof()  # the header stops here
            assert await bad.closed_by_server() == b""
            await wait_until(lambda: server.stats()["proxy_header_errors"] == 1, what="counted")
            await bad.close()

            await good.send(frame_bytes(b"2") * 2)
            assert [r["peer"][0] for r in await good.replies(2)] == ["203.0.113.9"] * 2
            await good.close()

            assert server.metrics is not None
            assert server.metrics.proxy_errors == {cause: 1}
            assert server.stats()["proxy_header_timeouts"] == 0
            text = scrape(server)
            assert f'fastnet_proxy_header_errors_total{{cause="{cause}"' in text
            lines = [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.DEBUG and "PROXY header" in r.getMessage()
            ]
            assert len(lines) == 1, lines
            assert f"127.0.0.1:{bad.port}" in lines[0] and cause in lines[0]
            record = next(r for r in caplog.records if "PROXY header" in r.getMessage())
            assert record.__dict__.get("cause") == cause

    arun(scenario())


def test_header_timeout_frees_the_slot(arun: Runner[Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastnet")

    async def scenario() -> None:
        async with proxied_server(
            max_connections=1, proxy_header_timeout=0.3, metrics=registry()
        ) as server:
            slow = await Client.open(server.port)
            await slow.send(b"PROXY TCP4 1.2")  # and nothing more
            began = time.monotonic()
            assert await slow.closed_by_server() == b""
            waited = time.monotonic() - began
            assert 0.2 < waited < TIMEOUT
            await slow.close()
            # The one slot is free again: the next connection is served.
            client = await Client.open(server.port)
            await client.send(v1_line("TCP4", "203.0.113.3", "192.0.2.1", 3, 4) + frame_bytes(b"x"))
            assert (await client.replies(1))[0]["peer"] == ["203.0.113.3", 3]
            await client.close()
            stats = server.stats()
            assert stats["proxy_header_timeouts"] == 1
            assert stats["proxy_header_errors"] == 0
            assert "fastnet_proxy_header_timeouts_total" in scrape(server)
            assert any(
                f"no PROXY header from 127.0.0.1:{slow.port}" in r.getMessage()
                for r in caplog.records
            )

    arun(scenario())


def test_a_connection_closed_without_a_byte_is_not_an_error(arun: Runner[Any]) -> None:
    # A TCP health check: connect, close. Closed quietly, not counted.
    async def scenario() -> None:
        async with proxied_server() as server:
            probe = await Client.open(server.port)
            await probe.close()
            await wait_until(lambda: server.stats()["closed"] == 1, what="closed")
            stats = server.stats()
            assert stats["proxy_header_errors"] == 0
            assert stats["proxy_header_timeouts"] == 0

    arun(scenario())


def test_shutdown_does_not_wait_for_a_header(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        server = fastnet.Server(
            describe_task,
            proxy_protocol="v2",
            trusted_proxies=["127.0.0.1"],
            proxy_header_timeout=60,
            drain_timeout=30,
        )
        await server.start()
        assert server.port is not None
        waiting = await Client.open(server.port)
        await waiting.send(V2_SIGNATURE[:5])
        await wait_until(lambda: server.stats()["accepted"] == 1, what="accepted")
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await server.shutdown()
        assert time.monotonic() - began < 2.0
        assert await waiting.closed_by_server() == b""
        await waiting.close()

    arun(scenario())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    return make_certs(tmp_path_factory.mktemp("proxy-tls"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tls_after_the_proxy_header(arun: Runner[Any], certs: TLSCerts, version: str) -> None:
    if version == "v1":
        header = v1_line("TCP4", "203.0.113.77", "192.0.2.1", 5555, 443)
    else:
        header = v2_block(1, "INET", "STREAM", ("203.0.113.77", 5555), ("192.0.2.1", 443))

    async def scenario() -> None:
        async with proxied_server(accept=version, ssl=certs.server_context()) as server:
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.port)), TIMEOUT)
            await asyncio.wait_for(loop.sock_sendall(sock, header), TIMEOUT)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    sock=sock, ssl=certs.client_context(), server_hostname="localhost"
                ),
                TIMEOUT,
            )
            client = Client(reader, writer)
            assert isinstance(writer.get_extra_info("ssl_object"), ssl.SSLObject)
            await client.send(frame_bytes(b"x") * 2)
            replies = await client.replies(2)
            assert replies[0]["peer"] == ["203.0.113.77", 5555]
            await client.close()
            stats = server.stats()
            assert stats["tls_handshakes"] == 1
            assert stats["proxy_header_errors"] == 0

    arun(scenario())


def test_tls_failure_after_the_header_names_the_client(
    arun: Runner[Any], certs: TLSCerts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastnet")

    async def scenario() -> None:
        async with proxied_server(accept="v1", ssl=certs.server_context()) as server:
            client = await Client.open(server.port)
            await client.send(
                v1_line("TCP4", "203.0.113.78", "192.0.2.1", 5556, 443) + b"not TLS at all\r\n"
            )
            await client.closed_by_server()
            await client.close()
            await wait_until(lambda: server.stats()["tls_handshake_errors"] == 1, what="counted")
            assert any(
                "TLS handshake with 203.0.113.78:5556 failed" in r.getMessage()
                for r in caplog.records
            )

    arun(scenario())


def test_off_by_default(arun: Runner[Any]) -> None:
    # Without proxy_protocol a header is data like any other, and conn.proxy is None.
    async def scenario() -> None:
        server = fastnet.Server(describe_task, "127.0.0.1", 0, drain_timeout=5)
        async with server:
            assert server.port is not None
            client = await Client.open(server.port)
            await client.send(frame_bytes(b"x"))
            (reply,) = await client.replies(1)
            assert reply["proxy"] is None and reply["peer"] == ["127.0.0.1", client.port]
            await client.close()

    arun(scenario())


# ------------------------------------------------------------- fuzz corpus


def test_fuzz_corpus_replays() -> None:
    """Every input kept in fuzz/corpus/proxy/ passes the harness's checks (no atheris needed)."""
    corpus = FUZZ_DIR / "corpus" / "proxy"
    if not corpus.is_dir():
        pytest.skip("no fuzz/ folder (an installed package)")
    spec = importlib.util.spec_from_file_location("fuzz_proxy", FUZZ_DIR / "fuzz_proxy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = sorted(corpus.iterdir())
    assert inputs
    for path in inputs:
        module.check(path.read_bytes())


def test_ipaddress_forms_match_the_socket_module() -> None:
    # conn.peer from a header and from accept(2) write hosts the same way.
    for text in ("2001:db8::1", "::1", "fe80::1:2"):
        packed = socket.inet_pton(socket.AF_INET6, text)
        assert str(ipaddress.IPv6Address(packed)) == socket.inet_ntop(socket.AF_INET6, packed)
