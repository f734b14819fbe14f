"""OutQueue: frames validated and encoded when queued, on both backends.

The reference for every byte is the encoder of the same backend:
``take()`` must give what ``encoder.encode_many`` gives for the same frames,
and every refused frame must raise what ``encoder.encode`` raises, with
nothing queued. The differential tests run the extension and the twin side
by side on the same calls.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from array import array
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from conftest import outq_module
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet import FrameError, FrameTooLarge, LengthPrefixed, Lines

PAYLOADS = [b"", b"x", b"hello world", bytes(range(256)) * 5, b"\n\r\x00" * 3]

LP_SPECS = [
    LengthPrefixed(),
    LengthPrefixed(byteorder="little"),
    LengthPrefixed(length_size=1, max_frame=255),
    LengthPrefixed(length_size=1, byteorder="little", adjustment=-1, max_frame=254),
    LengthPrefixed(length_size=2),
    LengthPrefixed(length_size=2, byteorder="little", adjustment=-2, strip=2),
    LengthPrefixed(length_size=3),
    LengthPrefixed(length_size=3, byteorder="little", adjustment=7, offset=2),
    LengthPrefixed(length_size=4, adjustment=-4),
    LengthPrefixed(length_size=8),
    LengthPrefixed(length_size=8, byteorder="little", adjustment=-8),
]

LINE_SPECS = [
    Lines(),
    Lines(delimiter=b"\r\n"),
    Lines(delimiter=b"END"),
    Lines(delimiter=b"\x00", max_length=300),
]

# Threshold used where a test wants some frames unjoined; small, so tests
# stay small. protocol.py passes LARGE_FRAME (32 KiB).
THRESHOLD = 100


def encoder_for(frame_impl: ModuleType, spec: LengthPrefixed | Lines) -> Any:
    if isinstance(spec, Lines):
        return frame_impl.LineEncoder(spec)
    return frame_impl.LengthPrefixedEncoder(spec)


def wire(out: bytes | list[Any] | None) -> bytes:
    """The bytes a write of ``take()``'s result puts on the wire."""
    if out is None:
        return b""
    if isinstance(out, bytes):
        return out
    return b"".join(bytes(memoryview(part).cast("B")) for part in out)


def capacity(queue: Any, encoder: Any) -> int:
    """Bytes of buffer ``queue`` holds: its size less that of a new, empty queue."""
    return sys.getsizeof(queue) - sys.getsizeof(type(queue)(encoder))


def make(outq_impl: ModuleType, encoder: Any, threshold: int = 0) -> Any:
    return outq_impl.OutQueue(encoder, threshold)


# --- bytes: equal to encode_many, for every option ----------------------------


@pytest.mark.parametrize("spec", LP_SPECS + LINE_SPECS, ids=repr)
def test_take_equals_encode_many(
    frame_impl: ModuleType, outq_impl: ModuleType, spec: LengthPrefixed | Lines
) -> None:
    encoder = encoder_for(frame_impl, spec)
    payloads = [p for p in PAYLOADS if _encodable(encoder, p)]
    assert len(payloads) >= 3  # the table must exercise something
    expected = encoder.encode_many(payloads)
    assert expected == b"".join(encoder.encode(p) for p in payloads)

    queue = make(outq_impl, encoder)
    for payload in payloads:
        queue.append(payload)
    assert (queue.nframes, len(queue), queue.nbytes) == (len(payloads),) * 2 + (len(expected),)
    out = queue.take()
    assert type(out) is bytes
    assert out == expected
    assert (queue.nframes, queue.nbytes, len(queue), bool(queue)) == (0, 0, 0, False)

    queue.extend(iter(payloads))  # the same queue, reused: same bytes
    assert queue.take() == expected
    queue.extend(tuple(payloads))
    assert queue.take() == expected


def _encodable(encoder: Any, payload: bytes) -> bool:
    try:
        encoder.encode(payload)
    except FrameError:
        return False
    return True


def test_wire_layout(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    lp = make(outq_impl, encoder_for(frame_impl, LengthPrefixed(length_size=2)))
    lp.extend([b"ab", b"", bytearray(b"c")])
    assert lp.take() == b"\x00\x02ab\x00\x00\x00\x01c"
    le = make(outq_impl, encoder_for(frame_impl, Lines(delimiter=b"\r\n")))
    le.append(b"one")
    le.append(memoryview(b"xtwox")[1:4])
    assert le.take() == b"one\r\ntwo\r\n"


def test_empty_queue(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    queue = make(outq_impl, encoder_for(frame_impl, LengthPrefixed()))
    assert queue.take() is None
    assert not queue
    queue.extend([])
    assert queue.take() is None
    queue.append(b"")
    assert queue and queue.nbytes == 4
    assert queue.take() == b"\x00\x00\x00\x00"
    assert queue.take() is None


def test_many_frames_grow_the_buffer(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=2))
    payloads = [bytes([i % 251]) * (i % 97) for i in range(10_000)]
    queue = make(outq_impl, encoder)
    for payload in payloads:
        queue.append(payload)
    expected = encoder.encode_many(payloads)
    assert queue.nbytes == len(expected)
    assert queue.take() == expected


# --- errors: those of encode, with nothing queued -----------------------------

BAD = [
    (LengthPrefixed(max_frame=4), b"12345", FrameTooLarge),
    (LengthPrefixed(length_size=1), b"x" * 256, FrameTooLarge),
    (LengthPrefixed(length_size=1, adjustment=-1), b"x" * 255, FrameTooLarge),
    (LengthPrefixed(adjustment=3), b"ab", FrameError),
    (Lines(max_length=4), b"12345", FrameTooLarge),
    (Lines(), b"a\nb", FrameError),
    (Lines(delimiter=b"END"), b"xENDx", FrameError),
    (LengthPrefixed(), "text", TypeError),
    (Lines(), 5, TypeError),
    (LengthPrefixed(), memoryview(b"abcdef")[::2], BufferError),
    (Lines(), memoryview(b"abcdef")[::2], BufferError),
]


@pytest.mark.parametrize("spec, frame, exc", BAD, ids=repr)
@pytest.mark.parametrize("threshold", [0, 1])
def test_refused_frame_raises_encode_error(
    frame_impl: ModuleType,
    outq_impl: ModuleType,
    spec: LengthPrefixed | Lines,
    frame: Any,
    exc: type[Exception],
    threshold: int,
) -> None:
    encoder = encoder_for(frame_impl, spec)
    with pytest.raises(exc) as by_encode:
        encoder.encode(frame)
    queue = make(outq_impl, encoder, threshold)
    queue.append(b"okay")
    before = queue.nbytes
    with pytest.raises(exc) as by_append:
        queue.append(frame)
    assert type(by_append.value) is type(by_encode.value)
    if isinstance(by_encode.value, FrameError):
        assert by_append.value.args == by_encode.value.args
        assert str(by_append.value) == str(by_encode.value)
    assert (queue.nframes, queue.nbytes) == (1, before)
    with pytest.raises(exc):
        queue.extend([b"fine", frame, b"never reached"])
    assert (queue.nframes, queue.nbytes) == (1, before)
    queue.append(b"more")  # the queue stays usable
    assert wire(queue.take()) == encoder.encode_many([b"okay", b"more"])


def test_not_a_buffer_message(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    # The same words on both backends (the extension's PyObject_GetBuffer's).
    queue = make(outq_impl, encoder_for(frame_impl, LengthPrefixed()))
    with pytest.raises(TypeError, match=r"^a bytes-like object is required, not 'str'$"):
        queue.append("text")
    with pytest.raises(TypeError, match=r"^a bytes-like object is required, not 'int'$"):
        queue.extend([b"a", 7])
    assert queue.take() is None


# --- extend: all or nothing ---------------------------------------------------


@pytest.mark.parametrize("threshold", [0, THRESHOLD])
def test_extend_rolls_back(frame_impl: ModuleType, outq_impl: ModuleType, threshold: int) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=2, max_frame=1000))
    queue = make(outq_impl, encoder, threshold)
    first = [b"a", b"L" * 200, b"b"]  # the large one is unjoined when threshold > 0
    queue.extend(first)
    state = (queue.nframes, queue.nbytes)
    with pytest.raises(FrameTooLarge):
        queue.extend([b"c", b"M" * 300, b"d", b"x" * 1001, b"e"])
    assert (queue.nframes, queue.nbytes) == state

    def failing() -> Iterator[bytes]:
        yield b"f"
        yield b"N" * 150
        raise LookupError("from the iterator")

    with pytest.raises(LookupError, match="from the iterator"):
        queue.extend(failing())
    assert (queue.nframes, queue.nbytes) == state
    with pytest.raises(TypeError):
        queue.extend(5)  # not iterable
    queue.append(b"z")
    out = queue.take()
    assert wire(out) == encoder.encode_many([*first, b"z"])
    assert isinstance(out, list) == (threshold > 0)
    assert queue.nbytes == 0


# --- unjoined payloads --------------------------------------------------------


def test_unjoined_layout(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=2))
    queue = make(outq_impl, encoder, THRESHOLD)
    big = b"B" * THRESHOLD
    second = bytearray(b"C" * 150)
    queue.extend([big, b"s1", second, b"s2", b"s3"])
    assert queue.nbytes == 5 * 2 + THRESHOLD + 150 + 6
    out = queue.take()
    # Each payload is the caller's object; its length field ends the bytes before it.
    assert out == [b"\x00\x64", big, b"\x00\x02s1\x00\x96", second, b"\x00\x02s2\x00\x02s3"]
    assert out[1] is big and out[3] is second
    assert [type(part) for part in out] == [bytes, bytes, bytes, bytearray, bytes]
    queue.append(big)  # unjoined last: nothing after it
    out = queue.take()
    assert out == [b"\x00\x64", big] and out[1] is big
    queue.append(b"B" * (THRESHOLD - 1))  # one byte short: joined
    assert queue.take() == encoder.encode(b"B" * (THRESHOLD - 1))


def test_unjoined_only_for_flat_buffers(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=4))
    queue = make(outq_impl, encoder, THRESHOLD)
    flat_view = memoryview(b"v" * 200)[50:]
    ints = array("i", range(100))  # 400 bytes, item size 4: len() counts items
    int_view = memoryview(ints)
    grid = memoryview(bytes(range(200))).cast("B", (10, 20))  # 2-D, C-contiguous
    for frame in (flat_view, ints, int_view, grid):
        queue.append(frame)
        assert queue.nbytes == 4 + memoryview(frame).nbytes
        out = queue.take()
        if frame is flat_view:
            assert out == [b"\x00\x00\x00\x96", flat_view] and out[1] is flat_view
        else:  # encoded (copied) as encode() does, counting bytes
            assert out == encoder.encode(frame)
            assert out[:4] == (memoryview(frame).nbytes).to_bytes(4, "big")
    strided = memoryview(b"s" * 400)[::2]
    with pytest.raises(BufferError):
        encoder.encode(strided)
    with pytest.raises(BufferError):
        queue.append(strided)
    assert queue.take() is None


def test_lines_ignore_threshold(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    queue = make(outq_impl, encoder_for(frame_impl, Lines()), THRESHOLD)
    queue.extend([b"L" * 500, b"short"])
    assert queue.take() == b"L" * 500 + b"\nshort\n"


def test_nbytes_is_exact(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=3, adjustment=-3))
    queue = make(outq_impl, encoder, THRESHOLD)
    frames: list[Any] = []
    for i in range(300):
        frame = bytes([i % 256]) * ((i * 37) % 400)
        frames.append(frame if i % 3 else bytearray(frame))
        queue.append(frames[-1])
        assert queue.nframes == i + 1
    nbytes = queue.nbytes
    out = queue.take()
    assert isinstance(out, list)
    assert nbytes == sum(memoryview(part).nbytes for part in out)
    assert wire(out) == encoder.encode_many(frames)


# --- copies and references ----------------------------------------------------


def test_joined_frame_is_copied(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    for spec in (LengthPrefixed(length_size=1), Lines()):
        queue = make(outq_impl, encoder_for(frame_impl, spec), THRESHOLD)
        frame = bytearray(b"before")
        queue.append(frame)
        frame[:] = b"AFTER!"
        frame.extend(b"and more")
        assert queue.take() == encoder_for(frame_impl, spec).encode(b"before")


def test_unjoined_frame_is_kept_by_reference(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    queue = make(outq_impl, encoder_for(frame_impl, LengthPrefixed(length_size=1)), THRESHOLD)
    frame = bytearray(b"a" * 120)
    queue.append(frame)
    frame[0:1] = b"Z"  # documented: do not do this; shown so the contract is known
    out = queue.take()
    assert out == [bytes([120]), frame] and out[1] is frame and out[1][0:1] == b"Z"


# --- memory: reused, doubled, shrunk ------------------------------------------


def hold_the_spare(outq_impl: ModuleType, encoder: Any) -> Any:
    """A queue holding whatever buffer earlier queues lent: the spare slot is empty after."""
    holder = make(outq_impl, encoder)
    holder.append(b"h")  # takes the spare, or allocates; not taken, so not lent back
    return holder


def test_buffer_grows_by_doubling_and_shrinks(
    frame_impl: ModuleType, outq_impl: ModuleType
) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=4))
    holder = hold_the_spare(outq_impl, encoder)
    queue = make(outq_impl, encoder)
    other = make(outq_impl, encoder)
    initial, keep = outq_impl.INITIAL_SIZE, outq_impl.KEEP_SIZE
    assert capacity(queue, encoder) <= 1  # nothing allocated before the first frame
    queue.append(b"x" * 60)
    assert initial <= capacity(queue, encoder) <= initial + 1  # (a bytearray keeps one spare byte)
    queue.append(b"x" * initial)  # 68 + initial bytes: one doubling
    assert 2 * initial <= capacity(queue, encoder) <= 2 * initial + 1
    queue.clear()
    assert capacity(queue, encoder) <= 1  # lent: the next queue without one takes it
    other.append(b"y")
    assert 2 * initial <= capacity(other, encoder) <= 2 * initial + 1  # the lent buffer
    for _ in range(20):
        queue.append(b"y" * 50_000)  # a 1 MB batch
    assert capacity(queue, encoder) >= queue.nbytes > 20 * 50_000
    assert len(queue.take()) == 20 * 50_004
    assert capacity(queue, encoder) <= 1  # lent, shrunk to KEEP_SIZE first
    queue.append(b"again")
    assert keep <= capacity(queue, encoder) <= keep + 1  # took it back
    assert queue.take() == encoder.encode(b"again")
    assert other.take() == encoder.encode(b"y")
    # The slot held the KEEP_SIZE buffer: lending took it in exchange.
    assert keep <= capacity(other, encoder) <= keep + 1
    assert holder.take() == encoder.encode(b"h")


def test_queues_filled_together_keep_their_own_buffers(
    frame_impl: ModuleType, outq_impl: ModuleType
) -> None:
    # Connections whose replies are queued in one loop iteration and written
    # at its end (task handlers): each lends its buffer and takes back the
    # one the slot held, so none of them allocates per batch.
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=4))
    holder = hold_the_spare(outq_impl, encoder)
    queues = [make(outq_impl, encoder) for _ in range(4)]
    for _ in range(3):
        for i, queue in enumerate(queues):
            queue.append(b"%d" % i)
        assert [queue.take() for queue in queues] == [encoder.encode(b"%d" % i) for i in range(4)]
    # Every queue but the first got a buffer back; the first one's is the spare.
    assert capacity(queues[0], encoder) <= 1
    assert all(capacity(queue, encoder) > 1 for queue in queues[1:])
    assert holder.take() == encoder.encode(b"h")


def test_unjoined_payloads_take_no_buffer(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed())
    holder = hold_the_spare(outq_impl, encoder)
    queue = make(outq_impl, encoder, THRESHOLD)
    payloads = [b"p" * 1_000_000] * 4
    queue.extend(payloads)
    assert queue.nbytes == 4 * 1_000_004
    # Only the length fields were copied.
    assert capacity(queue, encoder) <= outq_impl.INITIAL_SIZE + 1
    assert queue.take() == [b"\x00\x0f\x42\x40", payloads[0]] * 4
    assert holder.take() == encoder.encode(b"h")


# --- re-entrancy --------------------------------------------------------------


@pytest.mark.parametrize("call", ["append", "extend", "take", "clear", "__init__"])
def test_reentrant_call_from_iterator_raises(
    frame_impl: ModuleType, outq_impl: ModuleType, call: str
) -> None:
    encoder = encoder_for(frame_impl, LengthPrefixed(length_size=1))
    queue = make(outq_impl, encoder, THRESHOLD)
    queue.append(b"kept")
    args = {"append": (b"x",), "extend": ([b"x"],), "__init__": (encoder,)}.get(call, ())
    seen: list[BaseException] = []

    def frames() -> Iterator[bytes]:
        yield b"one"
        yield b"L" * 200
        try:
            getattr(queue, call)(*args)
        except RuntimeError as exc:
            seen.append(exc)
            raise

    with pytest.raises(RuntimeError, match="re-entrantly"):
        queue.extend(frames())
    assert len(seen) == 1
    assert (queue.nframes, queue.nbytes) == (1, 5)  # rolled back to before the call
    queue.append(b"then")
    assert queue.take() == b"\x04kept\x04then"


def test_reading_sizes_inside_extend_is_allowed(
    frame_impl: ModuleType, outq_impl: ModuleType
) -> None:
    queue = make(outq_impl, encoder_for(frame_impl, Lines()))
    seen = []

    def frames() -> Iterator[bytes]:
        for word in (b"a", b"bb", b"ccc"):
            seen.append((queue.nframes, queue.nbytes, len(queue)))
            yield word

    queue.extend(frames())
    assert seen == [(0, 0, 0), (1, 2, 1), (2, 5, 2)]
    assert queue.take() == b"a\nbb\nccc\n"


# --- construction -------------------------------------------------------------


@pytest.mark.parametrize(
    "threshold, exc, words",
    [
        (-1, ValueError, "between 0 and"),
        (2**48 + 1, ValueError, "between 0 and"),
        (1.5, TypeError, "must be an int, not float"),
        (True, TypeError, "must be an int, not bool"),
        ("32", TypeError, "must be an int, not str"),
    ],
)
def test_bad_threshold(
    frame_impl: ModuleType, outq_impl: ModuleType, threshold: Any, exc: type, words: str
) -> None:
    with pytest.raises(exc, match=words):
        outq_impl.OutQueue(encoder_for(frame_impl, LengthPrefixed()), threshold)


def test_bad_encoder(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    with pytest.raises(TypeError, match="LengthPrefixedEncoder or LineEncoder"):
        outq_impl.OutQueue(LengthPrefixed())
    with pytest.raises(TypeError, match="LengthPrefixedEncoder or LineEncoder"):
        outq_impl.OutQueue(object())


@pytest.mark.c_extension
def test_backends_do_not_mix() -> None:
    c, py = importlib.import_module("fastnet._frame"), importlib.import_module("fastnet._frame_py")
    c_queue, py_queue = outq_module(c).OutQueue, outq_module(py).OutQueue
    for spec in (LengthPrefixed(), Lines()):
        with pytest.raises(TypeError, match=r"of fastnet\._frame, not fastnet\._frame_py\."):
            c_queue(encoder_for(py, spec))
        with pytest.raises(TypeError, match=r"of fastnet\._frame_py, not fastnet\._frame\."):
            py_queue(encoder_for(c, spec))


def test_reinit_empties(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    queue = make(outq_impl, encoder_for(frame_impl, LengthPrefixed(length_size=1)))
    queue.append(b"gone")
    queue.__init__(encoder_for(frame_impl, Lines()))
    assert queue.take() is None
    queue.append(b"line")
    assert queue.take() == b"line\n"


@pytest.mark.c_extension
def test_docstrings_match_twin() -> None:
    c, py = importlib.import_module("fastnet._outq"), importlib.import_module("fastnet._outq_py")

    def doc(obj: Any, name: str) -> str:
        text = inspect.cleandoc(obj.__doc__ or "")
        first, _, rest = text.partition("\n")
        # embedsignature puts "name(args)" before a compiled docstring.
        signed = first.startswith((f"{name}(", f"OutQueue.{name}("))
        return inspect.cleandoc(rest) if signed else text

    for name in ("append", "extend", "take", "clear", "nbytes", "nframes"):
        assert doc(getattr(c.OutQueue, name), name) == doc(getattr(py.OutQueue, name), name)
        assert doc(getattr(py.OutQueue, name), name), name
    assert doc(c.OutQueue, "OutQueue") == doc(py.OutQueue, "OutQueue")
    assert c.REENTRANT == py.REENTRANT
    assert (c.INITIAL_SIZE, c.KEEP_SIZE) == (py.INITIAL_SIZE, py.KEEP_SIZE)


@pytest.mark.parametrize("no_ext", [None, "1"], ids=["default", "FASTNET_NO_EXTENSIONS"])
def test_framing_exports_outqueue_of_its_backend(
    no_ext: str | None, request: pytest.FixtureRequest
) -> None:
    if no_ext is None and request.config.getoption("--no-c-extensions"):
        pytest.skip("--no-c-extensions")
    env = {k: v for k, v in os.environ.items() if k != "FASTNET_NO_EXTENSIONS"}
    if no_ext:
        env["FASTNET_NO_EXTENSIONS"] = no_ext
    code = (
        "from fastnet import framing as f\n"
        "q = f.OutQueue(f.LengthPrefixed(length_size=1).encoder)\n"
        "q.append(b'hi')\n"
        "print(f.OutQueue.__module__, f.LengthPrefixedEncoder.__module__, q.take())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    expected = "fastnet._outq_py fastnet._frame_py" if no_ext else "fastnet._outq fastnet._frame"
    assert out.stdout.split() == [*expected.split(), "b'\\x02hi'"]


# --- properties (hypothesis) --------------------------------------------------


def _layout_or_none(**kwargs: Any) -> LengthPrefixed | None:
    # LengthPrefixed refuses layouts no frame fits (a 1-byte field cannot
    # announce 600 bytes): those are skipped, not tested.
    try:
        return LengthPrefixed(**kwargs)
    except ValueError:
        return None


lp_specs = st.builds(
    _layout_or_none,
    length_size=st.sampled_from([1, 2, 3, 4, 8]),
    byteorder=st.sampled_from(["big", "little"]),
    adjustment=st.integers(-10, 4),
    max_frame=st.integers(0, 600),
).filter(lambda spec: spec is not None)
line_specs = st.builds(
    Lines,
    delimiter=st.sampled_from([b"\n", b"\r\n", b"\x00", b"END", b"aa"]),
    max_length=st.integers(0, 600),
)
payloads = st.binary(max_size=700) | st.sampled_from([b"", b"aa", b"\n", b"xENDx", b"a\r\n"])
kinds = st.sampled_from(["bytes", "bytearray", "memoryview", "array"])


def as_kind(payload: bytes, kind: str) -> Any:
    if kind == "bytearray":
        return bytearray(payload)
    if kind == "memoryview":
        return memoryview(b"<" + payload + b">")[1:-1]
    if kind == "array" and len(payload) % 2 == 0:
        return array("h", payload)
    return payload


@settings(max_examples=300, deadline=None)
@given(
    spec=lp_specs | line_specs,
    batches=st.lists(st.lists(st.tuples(payloads, kinds), max_size=8), max_size=5),
    threshold=st.sampled_from([0, 1, 50, 300]),
    use_extend=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_property_matches_encoder(
    frame_impl: ModuleType,
    spec: LengthPrefixed | Lines,
    batches: list[list[tuple[bytes, str]]],
    threshold: int,
    use_extend: list[bool],
) -> None:
    encoder = encoder_for(frame_impl, spec)
    queue = outq_module(frame_impl).OutQueue(encoder, threshold)
    for batch, extend in zip(batches, use_extend, strict=False):
        frames = [as_kind(p, k) for p, k in batch]
        try:
            expected = encoder.encode_many(frames)
        except FrameError as exc:
            if extend:
                before = (queue.nframes, queue.nbytes)
                with pytest.raises(type(exc)) as info:
                    queue.extend(frames)
                assert info.value.args == exc.args
                assert (queue.nframes, queue.nbytes) == before
                continue
        queued = frames
        if extend:
            queue.extend(frames)
        else:
            queued = []
            for frame in frames:
                try:
                    queue.append(frame)
                    queued.append(frame)
                except FrameError as exc:
                    with pytest.raises(type(exc)) as info:
                        encoder.encode(frame)
                    assert info.value.args == exc.args
            expected = encoder.encode_many(queued)
        assert (queue.nframes, queue.nbytes) == (len(queued), len(expected))
        out = queue.take()
        assert wire(out) == expected
        unjoined = [f for f in queued if eligible(spec, threshold, f)]
        if not queued:
            assert out is None
        elif unjoined:
            assert isinstance(out, list)
            # Each unjoined payload appears by reference, in order (a greedy
            # match: a one-byte header may be the very object of a payload).
            found = 0
            for part in out:
                if found < len(unjoined) and part is unjoined[found]:
                    found += 1
            assert found == len(unjoined)
        else:
            assert isinstance(out, bytes)


def eligible(spec: LengthPrefixed | Lines, threshold: int, frame: Any) -> bool:
    """Whether OutQueue keeps ``frame`` unjoined (as made by as_kind)."""
    return (
        isinstance(spec, LengthPrefixed)
        and threshold > 0
        and not isinstance(frame, array)
        and memoryview(frame).nbytes >= threshold
    )


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.tuples(payloads, kinds)),
        st.tuples(st.just("extend"), st.lists(st.tuples(payloads, kinds), max_size=6)),
        st.tuples(st.just("take"), st.none()),
        st.tuples(st.just("clear"), st.none()),
    ),
    max_size=30,
)


def _run_ops(frame_impl: ModuleType, spec: Any, threshold: int, program: Any) -> list[Any]:
    queue = outq_module(frame_impl).OutQueue(encoder_for(frame_impl, spec), threshold)
    log: list[Any] = []
    for op, arg in program:
        try:
            if op == "append":
                queue.append(as_kind(*arg))
            elif op == "extend":
                queue.extend([as_kind(*a) for a in arg])
            elif op == "take":
                out = queue.take()
                shape = None if out is None else "bytes" if isinstance(out, bytes) else len(out)
                log.append(("take", shape, wire(out)))
            else:
                queue.clear()
        except Exception as exc:
            log.append((op, type(exc).__name__, str(exc), exc.args))
        log.append((queue.nframes, queue.nbytes, len(queue), bool(queue)))
    return log


@pytest.mark.c_extension
@settings(max_examples=300, deadline=None)
@given(spec=lp_specs | line_specs, threshold=st.sampled_from([0, 1, 50, 300]), program=ops)
def test_property_backends_agree(spec: Any, threshold: int, program: Any) -> None:
    c, py = importlib.import_module("fastnet._frame"), importlib.import_module("fastnet._frame_py")
    assert _run_ops(c, spec, threshold, program) == _run_ops(py, spec, threshold, program)


@pytest.mark.c_extension
def test_fuzz_harness_runs() -> None:
    # The fuzz harness's check(), on fixed pseudo-random inputs: keeps it
    # working between fuzzing runs, and adds 500 differential programs.
    import importlib.util
    import random
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_outq.py"
    if str(path.parent) not in sys.path:
        # The harness imports its sibling differential.py; run alone, this
        # test failed without it (other modules had put fuzz/ on the path).
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("fuzz_outq", path)
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    rng = random.Random(20261201)
    for _ in range(500):
        harness.check(rng.randbytes(rng.randrange(400)))


def test_append_takes_its_frame_by_position(frame_impl: ModuleType, outq_impl: ModuleType) -> None:
    # Positional-only on both backends (the extension's append is METH_O).
    queue = make(outq_impl, encoder_for(frame_impl, Lines()))
    with pytest.raises(TypeError):
        queue.append(frame=b"x")
    with pytest.raises(TypeError):
        queue.append()
    with pytest.raises(TypeError):
        queue.take(1)
    assert queue.take() is None
