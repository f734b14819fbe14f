"""Shared fixtures: every codec test runs against both backends.

``frame_impl`` is the backend module, ``fastnet._frame`` (id ``c``) or
``fastnet._frame_py`` (id ``py``). ``--no-c-extensions`` deselects the C leg;
without that flag a missing extension is an error, not a skip, so a broken
build cannot pass as a pure-Python run.

``codec`` goes one step further for the asyncio layer: it makes
``fastnet.framing`` hand out the chosen backend's decoders and encoders for
the duration of a test (with the same backend's ``OutQueue`` and connection
core), so a whole server runs on either backend in-process.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest

from fastnet import framing

BACKEND_NAMES = ("LengthPrefixedDecoder", "LengthPrefixedEncoder", "LineDecoder", "LineEncoder")
# The router's per-frame path and header codec, from _message or _message_py.
MESSAGE_NAMES = (
    "ALL_STATES",
    "Dispatcher",
    "Route",
    "encode_message",
    "error_body",
    "pack_header",
    "parse_error_body",
    "parse_header",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        default=False,
        help="run only the pure-Python backend (for FASTNET_NO_EXTENSIONS builds)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--no-c-extensions"):
        return
    skip = pytest.mark.skip(reason="--no-c-extensions")
    for item in items:
        if "c_extension" in item.keywords:
            item.add_marker(skip)


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"fastnet.{name}")


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("_frame", marks=pytest.mark.c_extension, id="c"),
        pytest.param("_frame_py", id="py"),
    ],
)
def frame_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The codec backend module under test."""
    return _load(request.param)


@pytest.fixture
def codec(frame_impl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Route ``fastnet.framing`` (and so every spec made in the test) to ``frame_impl``."""
    for name in BACKEND_NAMES:
        monkeypatch.setattr(framing, name, getattr(frame_impl, name))
    monkeypatch.setattr(framing, "OutQueue", outq_module(frame_impl).OutQueue)
    monkeypatch.setattr(framing, "ConnectionCore", core_module(frame_impl).ConnectionCore)
    message = message_module(frame_impl)
    for name in MESSAGE_NAMES:
        monkeypatch.setattr(framing, name, getattr(message, name))
    yield frame_impl


def outq_module(frame_impl: ModuleType) -> ModuleType:
    """The OutQueue module of ``frame_impl``'s backend: ``_outq`` or ``_outq_py``."""
    return _load("_outq" if frame_impl.__name__ == "fastnet._frame" else "_outq_py")


def core_module(frame_impl: ModuleType) -> ModuleType:
    """The connection core of ``frame_impl``'s backend: ``_core`` or ``_core_py``."""
    return _load("_core" if frame_impl.__name__ == "fastnet._frame" else "_core_py")


def message_module(frame_impl: ModuleType) -> ModuleType:
    """The router's per-frame path of ``frame_impl``'s backend: ``_message`` or ``_message_py``."""
    return _load("_message" if frame_impl.__name__ == "fastnet._frame" else "_message_py")


@pytest.fixture
def message_impl(frame_impl: ModuleType) -> ModuleType:
    """The router's per-frame module of the backend under test (ids ``c`` and ``py``)."""
    return message_module(frame_impl)


@pytest.fixture
def outq_impl(frame_impl: ModuleType) -> ModuleType:
    """The OutQueue module of the backend under test (ids ``c`` and ``py``, as frame_impl)."""
    return outq_module(frame_impl)
