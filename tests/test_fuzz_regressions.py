"""What the fuzzers found, kept as tests, and the fuzz corpora replayed.

Each finding of the harnesses in ``fuzz/`` becomes a plain test here, on both
backends, written from the calls the harness printed (the harnesses stop at the
first call where the extension and the twin disagree and print the last
calls). The corpora the fuzzers keep in ``fuzz/corpus/`` are replayed through
the harnesses too, when atheris is installed (``make asan`` installs it, and
runs this file under AddressSanitizer and UBSan); without atheris that test
is skipped, and the findings above still run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fastnet import FrameTooLarge, LengthPrefixed, Lines

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"
HARNESSES = ("length_prefixed", "lines", "encoders", "http_head", "outq", "message")


@pytest.mark.parametrize("nbytes", [-1, 65537, 1 << 21])
def test_refused_buffer_updated_keeps_the_window(frame_impl: ModuleType, nbytes: int) -> None:
    """A buffer_updated() refused for its nbytes leaves the window usable (twin asserted).

    Found by fuzz_length_prefixed and fuzz_lines: ``get_buffer(-1)``,
    ``buffer_updated(-1)`` (ValueError), then ``buffer_updated(0)``. The
    extension accepted the retry; the twin had dropped the window's buffer
    with the refused call and failed an internal assertion.
    """
    spec = LengthPrefixed(length_size=1, max_frame=10)
    decoder = frame_impl.LengthPrefixedDecoder(spec)
    view = decoder.get_buffer(-1)
    assert len(view) == 65536
    view[:4] = b"\x02ab\x01"
    view.release()
    with pytest.raises(ValueError, match="outside the buffer"):
        decoder.buffer_updated(nbytes)
    assert decoder.pending == 0
    assert decoder.buffer_updated(4) == [b"ab"]
    assert decoder.pending == 1
    assert decoder.feed(b"c") == [b"c"]


def test_refused_buffer_updated_then_empty_read_lines(frame_impl: ModuleType) -> None:
    """The line decoder's form of the same finding: the retry is an empty read."""
    decoder = frame_impl.LineDecoder(Lines(delimiter=b"\n\n", max_length=2, strip=True))
    decoder.get_buffer(-1).release()
    with pytest.raises(ValueError, match="outside the buffer"):
        decoder.buffer_updated(1100750)
    assert decoder.buffer_updated(0) == []
    assert decoder.pending == 0
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"abc\n\nok\n\n")
    assert decoder.feed(b"") == [b"ok"]


def _harness(name: str) -> ModuleType:
    if str(FUZZ_DIR) not in sys.path:
        sys.path.insert(0, str(FUZZ_DIR))  # the harnesses import their sibling differential.py
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ_DIR / f"fuzz_{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.c_extension
@pytest.mark.parametrize("name", HARNESSES)
def test_corpus_replays_without_difference(name: str) -> None:
    """Every input kept in fuzz/corpus/<name>/ runs through its harness: no difference, no crash."""
    pytest.importorskip("atheris", reason="the harnesses need atheris (pip install '.[fuzz]')")
    corpus = FUZZ_DIR / "corpus" / name
    if not corpus.is_dir():
        pytest.skip(f"no {corpus.name} corpus (an install without the fuzz/ folder)")
    inputs = sorted(p for p in corpus.iterdir() if p.is_file())
    assert inputs, f"{corpus} is empty"
    harness = _harness(name)
    # The harness's entry point: test_one_input, or check (fuzz_outq.py).
    one_input = getattr(harness, "test_one_input", None) or harness.check
    for path in inputs:
        one_input(path.read_bytes())
