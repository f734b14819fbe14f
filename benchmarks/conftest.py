"""Fixtures and the summary table for the codec micro-benchmarks (bench_frame.py).

Every case runs on both backends (ids ``c`` and ``py``); the summary printed
at the end puts them side by side with their ratio and the target each case
is held to.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import pytest

# (case) -> {impl: (rate, unit)}
RESULTS: dict[str, dict[str, tuple[float, str]]] = {}


@pytest.fixture(
    scope="session",
    params=[pytest.param("_frame", id="c"), pytest.param("_frame_py", id="py")],
)
def frame_impl(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(f"fastnet.{request.param}")


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Any:
    """record(case, impl, amount_per_round, unit, benchmark): store amount / median time."""

    def _record(case: str, impl: str, amount: float, unit: str, benchmark: Any) -> None:
        RESULTS.setdefault(case, {})[impl] = (amount / benchmark.stats.stats.median, unit)

    return _record


# case -> (numerator impl, denominator impl, minimum ratio): the targets.
TARGETS = {
    "decode 64 B frames, 64 KiB chunks": ("c", "py", 10.0),
    "decode 1 MiB frames via get_buffer": ("c", "memcpy", 0.70),
    "encode_many 1000 x 64 B": ("c", "py", 5.0),
}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("| case | c | py | memcpy | ratio | target | met |")
    write("|---|---:|---:|---:|---:|---:|---|")
    for case, by_impl in RESULTS.items():
        cells = []
        for impl in ("c", "py", "memcpy"):
            if impl in by_impl:
                rate, unit = by_impl[impl]
                cells.append(
                    f"{rate / 1e9:.2f} G{unit}" if rate >= 1e9 else f"{rate / 1e6:.2f} M{unit}"
                )
            else:
                cells.append("")
        num, den, minimum = TARGETS.get(case, ("c", "py", 0.0))
        if num in by_impl and den in by_impl:
            ratio = by_impl[num][0] / by_impl[den][0]
            verdict = "yes" if ratio >= minimum else "NO"
            ratio_cell = f"{ratio:.2f}x {num}/{den}"
            write(f"| {case} | {' | '.join(cells)} | {ratio_cell} | {minimum:g}x | {verdict} |")
        else:
            write(f"| {case} | {' | '.join(cells)} | | | |")
