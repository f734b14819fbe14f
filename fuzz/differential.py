"""Lockstep differential driver shared by the fuzz harnesses.

Strategy: a harness turns the fuzzer's bytes into a framing spec and a script
of calls (``feed``, ``get_buffer``/``buffer_updated``, ``eof``, the encoders),
drawing every decision from one ``atheris.FuzzedDataProvider``. ``Lockstep``
makes each call on the extension (``fastnet._frame``) and on the pure-Python
twin (``fastnet._frame_py``) right after the other and compares what came
back before the next decision is drawn, so a difference is reported at the
first call where the backends part, with the spec and the call in the
message. After every decoder call ``pending`` and ``missing`` are compared
too, and for ``get_buffer`` the size of the window handed out.

What counts as the same outcome: equal return values; or errors of the same
type, and for the errors fastnet raises on purpose (``FrameError`` and its
subclasses, the ``ValueError``/``RuntimeError`` of a misused
``buffer_updated``) equal ``args``, equal messages and equal ``.frames``.
``TypeError`` and ``BufferError`` come from CPython's buffer protocol, whose
wording differs between the C API and ``memoryview``: only their type is
compared. Any other exception (``SystemError``, ``MemoryError``, an
``AttributeError`` from a code path that forgot a case) propagates, and the
fuzzer reports it as a crash; so does a sanitizer report from the extension.

This module imports no fuzzer: the regression tests replay inputs through it
with any object that has the few ``FuzzedDataProvider`` methods used here.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from fastnet import FrameError

# Calls in one script at most: enough to reach every state (a large frame
# received through a dozen windows, errors, a reused line decoder) while each
# input stays a few milliseconds of work.
MAX_CALLS = 48


class Mismatch(AssertionError):
    """The backends disagreed; the message names the spec, the call and both outcomes."""


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """Run ``call`` and describe what happened in a form that compares across backends."""
    try:
        return ("ok", call())
    except FrameError as exc:
        return ("error", type(exc), exc.args, str(exc), exc.frames)
    except (ValueError, RuntimeError) as exc:
        return ("error", type(exc), str(exc))
    except (TypeError, BufferError) as exc:
        return ("error", type(exc))


class Lockstep:
    """A pair of objects (C first, twin second) driven by the same calls.

    Args:
        c: the object made by ``fastnet._frame``.
        py: the same object made by ``fastnet._frame_py``.
        context: what to print on a mismatch (the spec, as a repr).
    """

    def __init__(self, c: Any, py: Any, context: str) -> None:
        self.c = c
        self.py = py
        self.context = context
        self.calls: list[str] = []

    def fail(self, what: str, c_result: object, py_result: object) -> Mismatch:
        history = "\n  ".join(self.calls[-12:])
        return Mismatch(
            f"{what} differs for {self.context}\n  C:  {c_result!r}\n  py: {py_result!r}\n"
            f"last calls:\n  {history}"
        )

    def call(self, name: str, *args: Any) -> tuple[Any, ...]:
        """Call ``name(*args)`` on both objects and return the (equal) outcome."""
        self.calls.append(f"{name}{tuple(map(_short, args))}")
        c_out = self._run("C", lambda: getattr(self.c, name)(*args))
        py_out = self._run("py", lambda: getattr(self.py, name)(*args))
        if c_out != py_out:
            raise self.fail(name, c_out, py_out)
        return c_out

    def _run(self, side: str, call: Callable[[], Any]) -> tuple[Any, ...]:
        """``outcome(call)``; an unexpected exception is re-raised with the call history."""
        try:
            return outcome(call)
        except Exception as exc:
            history = "\n  ".join(self.calls[-12:])
            raise Mismatch(
                f"{side} raised {exc!r} for {self.context}\nlast calls:\n  {history}"
            ) from exc

    def check_state(self) -> None:
        """Compare ``pending`` and ``missing`` of two decoders."""
        c_state = (self.c.pending, self.c.missing)
        py_state = (self.py.pending, self.py.missing)
        if c_state != py_state:
            raise self.fail("(pending, missing)", c_state, py_state)

    def open_window(self, sizehint: object) -> tuple[memoryview, memoryview] | None:
        """``get_buffer(sizehint)`` on both; the two views, or None after equal errors."""
        self.calls.append(f"get_buffer({sizehint!r})")
        c_view = self._run("C", lambda: self.c.get_buffer(sizehint))
        py_view = self._run("py", lambda: self.py.get_buffer(sizehint))
        sizes = [len(v[1]) if v[0] == "ok" else v for v in (c_view, py_view)]
        if sizes[0] != sizes[1]:
            raise self.fail("get_buffer window", *sizes)
        if c_view[0] != "ok":
            return None
        if sizes[0] < 1:
            raise self.fail("get_buffer window (must be >= 1)", *sizes)
        return c_view[1], py_view[1]

    def receive(self, sizehint: object, data: bytes, take: int) -> int:
        """One BufferedProtocol read: ``get_buffer``, copy, ``buffer_updated``.

        Copies ``min(window, len(data), take)`` bytes of ``data`` into each
        decoder's window, as a transport writes at most the window's size.

        Returns:
            The number of bytes of ``data`` delivered (0 when get_buffer failed).
        """
        views = self.open_window(sizehint)
        if views is None:
            return 0
        n = min(len(views[0]), len(data), take)
        for view in views:
            view[:n] = data[:n]
            view.release()
        self.call("buffer_updated", n)
        return n


def _short(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 24:
        return f"<{type(value).__name__} of {len(value)} bytes>"
    if isinstance(value, list) and len(value) > 4:
        return f"<list of {len(value)}>"
    return value


def backends() -> tuple[ModuleType, ModuleType]:
    """``fastnet._frame`` and ``fastnet._frame_py``; the extension must be importable."""
    from fastnet import _frame, _frame_py

    return _frame, _frame_py


def release(views: tuple[memoryview, memoryview] | None) -> None:
    for view in views or ():
        view.release()


def as_buffer(fdp: Any, data: bytes) -> bytes | bytearray | memoryview:
    """``data`` as bytes, a bytearray or a memoryview (contiguous or a slice of one)."""
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 1:
        return bytearray(data)
    if kind == 2:
        return memoryview(data)
    if kind == 3:
        return memoryview(b"\x00" + data + b"\x00")[1:-1]
    return data


def drive_decoder(fdp: Any, pair: Lockstep, stream: bytes) -> None:
    """Push ``stream`` into both decoders of ``pair`` by calls the fuzzer chooses.

    Chunks go through ``feed`` (as bytes, bytearray or memoryview) or through a
    BufferedProtocol read with a chosen size hint; misuse of
    ``buffer_updated`` and ``eof`` in mid-stream are drawn too. The script
    ends with two ``eof`` calls.
    """
    pos = 0
    for _ in range(MAX_CALLS):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 15)
        chunk_len = fdp.ConsumeIntInRange(0, 1 << fdp.ConsumeIntInRange(0, 17))
        data = stream[pos : pos + chunk_len]
        if op <= 5:
            pair.call("feed", as_buffer(fdp, data))
            pos += len(data)
        elif op <= 12:
            hint = fdp.PickValueInList([-1, 0, 1, 2, 3, 5, 64, 4096, 65536, 1 << 20, 3 << 20, None])
            if hint is None:
                hint = fdp.ConsumeIntInRange(-2, 1 << 21)
            pos += pair.receive(hint, data, chunk_len)
        elif op == 13:
            # buffer_updated out of turn: without a window, or past its end.
            choice = fdp.ConsumeIntInRange(0, 2)
            if choice == 0:
                pair.call("buffer_updated", 0)
            else:
                release(pair.open_window(fdp.PickValueInList([-1, 1, 7])))
                bad = -1 if choice == 1 else fdp.ConsumeIntInRange(1 << 20, (1 << 20) + 70000)
                pair.call("buffer_updated", bad)
        elif op == 14:
            # A window is opened, then data arrives through feed() instead.
            release(pair.open_window(fdp.PickValueInList([-1, 2, 4096])))
            pair.call("feed", data)
            pos += len(data)
        else:
            pair.call("eof")
        pair.check_state()
    pair.call("eof")
    pair.check_state()
    pair.call("eof")
    pair.check_state()


def require_sanitizers(coverage: bool = False) -> None:
    """Exit non-zero unless the imported extension is a sanitizer build with its runtime loaded.

    ``make asan`` runs this after installing, so a build that silently lost
    its sanitizer flags (a stale build directory, a cached wheel) cannot pass
    for one. With ``coverage`` (``--require-coverage``, after the clang build
    ``make fuzz`` makes) each extension module must also carry libFuzzer's
    edge counters (``-fsanitize=fuzzer-no-link``) and the process must have a
    libFuzzer loaded ahead of atheris (the preloaded ``asan_with_fuzzer.so``),
    or the fuzzer would not see the C code's edges.
    """
    import sys
    from pathlib import Path

    from fastnet import _core, _frame, _outq

    problems = []
    markers = [b"__asan_report", b"__ubsan_handle"]
    if coverage:
        markers.append(b"__sanitizer_cov_8bit_counters_init")
    for module in (_frame, _outq, _core):
        library = Path(module.__file__).read_bytes()
        for marker in markers:
            if marker not in library:
                problems.append(f"{module.__file__} has no {marker.decode()}* calls")
        if b".debug_info" not in library:
            problems.append(f"{module.__file__} has no debug information (symbols for reports)")
    maps = Path("/proc/self/maps")
    if maps.exists():
        loaded = maps.read_bytes()
        if b"libasan" not in loaded and b"asan_with_fuzzer" not in loaded:
            problems.append("the ASan runtime is not loaded (LD_PRELOAD)")
        if coverage and b"asan_with_fuzzer" not in loaded:
            problems.append("atheris's asan_with_fuzzer.so is not loaded (LD_PRELOAD)")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    what = "sanitizer and libFuzzer coverage build" if coverage else "sanitizer build"
    print(f"{what}: {_frame.__file__}")


if __name__ == "__main__":
    import sys

    flags = sys.argv[1:]
    if flags not in (["--require-sanitizers"], ["--require-sanitizers", "--require-coverage"]):
        sys.exit("usage: python fuzz/differential.py --require-sanitizers [--require-coverage]")
    require_sanitizers(coverage="--require-coverage" in flags)


class Reader:
    """Consumes the fuzzer's bytes as a script; reads past the end give zeros.

    For the harnesses that read their input directly (fuzz_outq.py,
    fuzz_message.py) rather than through atheris's FuzzedDataProvider.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\x00"), "big")

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out
