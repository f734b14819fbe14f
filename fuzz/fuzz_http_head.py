#!/usr/bin/env python3
"""Fuzz the metrics endpoint's HTTP request-head parser (``health.parse_request_head``).

It has no C twin, so the harness checks invariants instead of a difference:

- any bytes give a ``Request`` or ``BadRequest``, never another exception;
- a parsed request is well formed (a token method, a path starting with
  ``/``, HTTP/1.0 or 1.1, lower-case header names) and parsing is a pure
  function (the same bytes parse the same way twice);
- a head built from the input's own choices (method, path, headers) parses
  back to exactly those choices.

Run (the Makefile's ``fuzz`` target sets up the sanitizer environment):
    python fuzz/fuzz_http_head.py -max_total_time=60 CORPUS_DIR
"""

from __future__ import annotations

import string
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["fastnet"]):
    from fastnet.health import BadRequest, Request, parse_request_head

TOKEN_CHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
PATH_CHARS = "/abcxyz019-._~%?=&"
VALUE_CHARS = string.ascii_letters + string.digits + " ,;=/-_.:"


def check_parsed(head: bytes, request: Request) -> None:
    assert request.method and all(c in TOKEN_CHARS for c in request.method), request
    assert request.path.startswith("/"), request
    assert request.version in ("HTTP/1.0", "HTTP/1.1"), request
    for name in request.headers:
        assert name == name.lower() and all(c in TOKEN_CHARS for c in name), request
    assert parse_request_head(head) == request  # a pure function


def pick(fdp: Any, chars: str, low: int, high: int) -> str:
    return "".join(
        chars[fdp.ConsumeIntInRange(0, len(chars) - 1)]
        for _ in range(fdp.ConsumeIntInRange(low, high))
    )


def built_head(fdp: Any) -> tuple[bytes, str, str, dict[str, str]]:
    method = pick(fdp, TOKEN_CHARS, 1, 8)
    path = "/" + pick(fdp, PATH_CHARS.replace("?", ""), 0, 12)
    headers: dict[str, str] = {}
    lines = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = pick(fdp, TOKEN_CHARS, 1, 10)
        value = pick(fdp, VALUE_CHARS, 0, 16).strip(" ")
        if name.lower() in headers:
            continue  # repeated headers are joined: kept out of the exact check
        headers[name.lower()] = value
        lines.append(f"{name}: {value}")
    version = "HTTP/1.1" if fdp.ConsumeBool() else "HTTP/1.0"
    text = "\r\n".join([f"{method} {path} {version}", *lines]) + "\r\n\r\n"
    return text.encode(), method, path, headers


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        head = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            request = parse_request_head(head)
        except BadRequest:
            return
        check_parsed(head, request)
        return
    head, method, path, headers = built_head(fdp)
    request = parse_request_head(head)
    check_parsed(head, request)
    assert (request.method, request.path, request.headers) == (method, path, headers), (
        head,
        request,
    )


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
