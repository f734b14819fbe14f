#!/usr/bin/env python3
"""Differential fuzzer of OutQueue: the extension against its twin and the encoder.

Run: ``python fuzz/fuzz_outq.py -max_total_time=60`` (needs ``pip install
atheris`` and the extension built; any libFuzzer flag works, e.g. a corpus
directory as the first argument).

Each input is read as a program: a framing spec (length-prefixed with any
field size, byte order, adjustment and limit, or lines with any delimiter
and limit), an unjoined threshold, then a series of calls (``append``,
``extend``, ``extend`` of an iterator that fails half way, ``take``,
``clear``) with frames of every kind a caller may pass: bytes, bytearray,
memoryview slices, ``array('h')``, non-contiguous views, str, int. The
program runs on ``fastnet._outq`` (with ``fastnet._frame``'s encoders) and on
``fastnet._outq_py`` (with ``fastnet._frame_py``'s); the two must agree on
every result, error type, error message and size, and every batch taken
must be the bytes ``encode_many`` gives for the frames queued since the
last ``take``. Any difference raises ``AssertionError``, which atheris
reports with the input that caused it.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator
from typing import Any

from differential import Reader

from fastnet import _frame, _frame_py, _outq, _outq_py
from fastnet.errors import FrameError
from fastnet.framing import LengthPrefixed, Lines

# Bounds that keep one input fast: a few dozen calls, frames under 1 KiB.
MAX_OPS = 40
MAX_FRAME_BYTES = 1024
MAX_EXTEND = 8

THRESHOLDS = (0, 1, 8, 64, 300)
DELIMITERS = (b"\n", b"\r\n", b"\x00", b"END", b"aa", b"aab")


class Stop(Exception):
    """Raised by a failing iterator passed to extend()."""


def read_spec(r: Reader) -> LengthPrefixed | Lines:
    if r.byte() & 1:
        length_size = (1, 2, 3, 4, 8)[r.byte() % 5]
        byteorder = "big" if r.byte() & 1 else "little"
        adjustment = r.byte() % 21 - 10
        # A limit the field can announce, and at least the adjustment: a
        # layout LengthPrefixed accepts.
        low = max(0, adjustment)
        high = min(MAX_FRAME_BYTES + 64, (1 << (8 * length_size)) - 1 + adjustment)
        return LengthPrefixed(
            length_size=length_size,
            byteorder=byteorder,
            adjustment=adjustment,
            max_frame=low + r.u16() % (high - low + 1),
        )
    choice = r.byte()
    delimiter = DELIMITERS[choice % len(DELIMITERS)] if choice < 200 else r.take(1 + choice % 3)
    return Lines(delimiter=delimiter or b"\n", max_length=r.u16() % (MAX_FRAME_BYTES + 64))


def read_frame(r: Reader) -> tuple[str, bytes]:
    """A frame description: (kind, payload bytes); made into objects per backend."""
    kind = ("bytes", "bytearray", "view", "array", "strided", "str", "int")[r.byte() % 7]
    size = r.u16() % MAX_FRAME_BYTES
    chunk = r.take(min(size, 16)) or b"x"
    payload = (chunk * (size // len(chunk) + 1))[:size]
    return kind, payload


def make_frame(kind: str, payload: bytes) -> Any:
    """A fresh object for each backend, so neither can see the other's frames."""
    if kind == "bytearray":
        return bytearray(payload)
    if kind == "view":
        return memoryview(b"<" + payload + b">")[1:-1]
    if kind == "array":
        return array("h", payload[: len(payload) // 2 * 2])
    if kind == "strided":
        return memoryview(payload + payload)[::2]
    if kind == "str":
        return payload.decode("latin-1")
    if kind == "int":
        return len(payload)
    return bytes(payload)


def read_program(r: Reader) -> list[tuple[str, Any]]:
    program: list[tuple[str, Any]] = []
    while r.more() and len(program) < MAX_OPS:
        op = r.byte() % 6
        if op in (0, 1):
            program.append(("append", read_frame(r)))
        elif op == 2:
            program.append(("extend", [read_frame(r) for _ in range(r.byte() % MAX_EXTEND)]))
        elif op == 3:
            stop = r.byte() % MAX_EXTEND
            program.append(("extend-failing", ([read_frame(r) for _ in range(stop + 1)], stop)))
        elif op == 4:
            program.append(("take", None))
        else:
            program.append(("clear", None))
    return program


def flatten(out: Any) -> bytes:
    if out is None:
        return b""
    if isinstance(out, bytes):
        return out
    return b"".join(bytes(memoryview(part).cast("B")) for part in out)


def run(frame_mod: Any, outq_mod: Any, spec: Any, threshold: int, program: list) -> list:
    """Run ``program`` on one backend; check it against that backend's encoder; log it."""
    if isinstance(spec, Lines):
        encoder = frame_mod.LineEncoder(spec)
    else:
        encoder = frame_mod.LengthPrefixedEncoder(spec)
    queue = outq_mod.OutQueue(encoder, threshold)
    pending: list[Any] = []  # frames queued since the last take/clear
    log: list[Any] = []
    for op, arg in program:
        try:
            if op == "append":
                frame = make_frame(*arg)
                try:
                    queue.append(frame)
                except Exception as exc:
                    _same_error_as_encode(encoder, [frame], exc)
                    raise
                pending.append(frame)
            elif op == "extend":
                frames = [make_frame(*a) for a in arg]
                try:
                    queue.extend(frames)
                except Exception as exc:
                    _same_error_as_encode(encoder, frames, exc)
                    raise
                pending.extend(frames)
            elif op == "extend-failing":
                descriptions, stop = arg

                def failing(items: list = descriptions, stop: int = stop) -> Iterator[Any]:
                    for i, description in enumerate(items):
                        if i == stop:
                            raise Stop(f"stopped at {i}")
                        yield make_frame(*description)

                before = (queue.nframes, queue.nbytes)
                try:
                    queue.extend(failing())
                finally:
                    assert (queue.nframes, queue.nbytes) == before, "extend did not roll back"
            elif op == "take":
                nbytes = queue.nbytes
                out = queue.take()
                expected = encoder.encode_many(pending)
                assert flatten(out) == expected, "take() differs from encode_many"
                assert nbytes == len(expected), "nbytes is not the wire size"
                assert (out is None) == (not pending)
                log.append(("take", None if out is None else type(out).__name__, flatten(out)))
                pending = []
            else:
                queue.clear()
                pending = []
        except (FrameError, TypeError, BufferError, Stop) as exc:
            log.append((op, type(exc).__name__, str(exc)))
        assert queue.nbytes == len(encoder.encode_many(pending)), "nbytes drifted"
        log.append((queue.nframes, queue.nbytes, len(queue), bool(queue)))
    return log


def _same_error_as_encode(encoder: Any, frames: list, exc: Exception) -> None:
    """The first frame encode() refuses must raise the queue's error type and args."""
    for frame in frames:
        try:
            encoder.encode(frame)
        except Exception as by_encode:
            assert type(by_encode) is type(exc), (by_encode, exc)
            if isinstance(exc, FrameError):
                assert by_encode.args == exc.args, (by_encode, exc)
            return
    raise AssertionError(f"the queue refused frames that encode() accepts: {exc!r}")


def check(data: bytes) -> None:
    """One fuzz input: the extension and the twin must agree, and match the encoder."""
    r = Reader(data)
    try:
        spec = read_spec(r)
    except ValueError:  # an impossible spec: the framing layer refuses it, nothing to fuzz
        return
    threshold = THRESHOLDS[r.byte() % len(THRESHOLDS)]
    program = read_program(r)
    c_log = run(_frame, _outq, spec, threshold, program)
    py_log = run(_frame_py, _outq_py, spec, threshold, program)
    assert c_log == py_log, f"backends differ:\nc:  {c_log}\npy: {py_log}"


def main() -> None:
    import atheris

    atheris.instrument_all()  # coverage of the twin and the harness guides the fuzzer
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
