#!/usr/bin/env python3
"""Fuzz the PROXY protocol parser (fastnet.proxy): invariants, not a differential.

The parser has no C twin, so instead of comparing two backends the harness
checks what must hold for any input:

1. nothing but ``ProxyHeaderError`` (with a ``cause`` from ``CAUSES``) ever
   escapes ``feed``/``eof``, for each accepted version (v1, v2, any);
2. fed in random chunks, the parser gives what it gives fed whole: the same
   header and the same bytes after it, or an error of the same cause
   (a chunked feed may stop early at an incomplete header, never differ);
3. a byte-exact reader (peek with ``header_length``, or ``need``-sized
   reads) takes exactly the header's bytes and no more;
4. a parsed header re-encodes (``fastnet.proxy.encode``) to the bytes it was
   parsed from (version 1 TCP6 lines: to bytes that parse to the same
   header, since IPv6 has several spellings), and its TLV properties read
   without error.

The first input byte picks the version accepted and seeds the chunking; the
rest is the stream. ``check(data)`` runs without atheris too
(tests/test_proxy.py replays the corpus through it).

Run (see the Makefile's ``fuzz`` target for the sanitizer environment):
    python fuzz/fuzz_proxy.py -max_total_time=60 fuzz/corpus/proxy
"""

from __future__ import annotations

import random
import sys

try:
    import atheris
except ImportError:  # check() alone (the corpus replay test)
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["fastnet.proxy"]):
        from fastnet.proxy import CAUSES, ProxyHeaderError, ProxyParser, encode, parse
else:
    from fastnet.proxy import CAUSES, ProxyHeaderError, ProxyParser, encode, parse

ACCEPT = ("any", "v1", "v2")


def whole(stream: bytes, accept: str) -> tuple[str, object, bytes]:
    """("header", header, rest), ("more", None, b"") or ("error", cause, b"")."""
    parser = ProxyParser(accept)
    try:
        header = parser.feed(stream)
        if header is None:
            try:
                parser.eof()
            except ProxyHeaderError as exc:
                assert exc.cause == "truncated", exc.cause
            return "more", None, b""
    except ProxyHeaderError as exc:
        assert exc.cause in CAUSES, exc.cause
        return "error", exc.cause, b""
    return "header", header, parser.rest


def chunked(stream: bytes, accept: str, rng: random.Random) -> tuple[str, object, bytes]:
    parser = ProxyParser(accept)
    pos = 0
    try:
        while pos < len(stream):
            step = rng.randint(1, 24)
            header = parser.feed(stream[pos : pos + step])
            pos += step
            if header is not None:
                return "header", header, parser.rest + stream[pos:]
    except ProxyHeaderError as exc:
        return "error", exc.cause, b""
    return "more", None, b""


def exact(stream: bytes, accept: str, rng: random.Random, peek: bool) -> tuple[str, object, bytes]:
    # The reader of fastnet._proxy_io over a socket whose data arrives in
    # random segments: it never takes a byte past the header.
    parser = ProxyParser(accept)
    arrived = 0
    pos = 0
    try:
        while True:
            if pos == arrived:
                if arrived == len(stream):
                    return "more", None, b""
                arrived = min(len(stream), arrived + rng.randint(1, 64))
                continue
            available = stream[pos:arrived]
            if peek:
                count = parser.header_length(available[: parser.limit])
                assert 1 <= count <= len(available), (count, len(available))
            else:
                count = min(parser.need, len(available))
                assert count >= 1, count
            header = parser.feed(available[:count])
            pos += count
            if header is not None:
                assert parser.rest == b"", "read past the header"
                return "header", header, stream[pos:]
    except ProxyHeaderError as exc:
        return "error", exc.cause, b""


def check(data: bytes) -> None:
    """Every invariant above, for one input."""
    if not data:
        return
    accept = ACCEPT[data[0] % 3]
    rng = random.Random(data[0])
    stream = data[1:]
    reference = whole(stream, accept)
    kind, value, rest = reference
    for result in (
        chunked(stream, accept, rng),
        exact(stream, accept, rng, peek=True),
        exact(stream, accept, rng, peek=False),
    ):
        if result[0] == "more" and kind == "error":
            continue  # stopped before the byte that fails; fine
        assert result[0] == kind, (accept, reference, result)
        if kind == "header":
            assert result[1] == value and result[2] == rest, (reference, result)
        elif kind == "error":
            assert result[1] == value, (reference, result)
    if kind != "header":
        return
    header = value
    header_bytes = stream[: len(stream) - len(rest)]
    # The TLV views never fail on a parsed header.
    _ = (header.alpn, header.authority, header.crc32c, header.unique_id, header.netns, header.peer)
    if header.ssl is not None:
        ssl = header.ssl
        _ = (ssl.version, ssl.cn, ssl.cipher, ssl.sig_alg, ssl.key_alg, ssl.verified)
    again = encode(header)
    if header.version == 1 and header.family == "INET6":
        assert parse(again, "v1")[0] == header, (header_bytes, again)
    else:
        assert again == header_bytes, (header_bytes, again)


def test_one_input(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    assert atheris is not None, "pip install atheris"
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
