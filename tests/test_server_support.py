"""Shared fixtures and helpers of the server-layer tests (it holds no tests itself).

Every in-process behaviour test is written once and runs four ways: both
codec backends (the ``codec`` fixture of conftest.py, ids ``c``/``py``) times
both event loops (``loop_name``, ids ``asyncio``/``uvloop``), in the spirit of
uvloop's ``_TestTCP``. Test modules import the fixtures they use from here.

Process tests start ``python -m fastnet`` (the real CLI) and send real
signals; ``ServerProcess`` waits for its ``listening on`` line and bounds
every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import ModuleType
from typing import Any, TypeVar

import pytest

import fastnet
from fastnet.runner import run_coroutine

T = TypeVar("T")

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - uvloop is a test dependency where it installs
    HAVE_UVLOOP = False

LOOP_PARAMS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "uvloop",
        id="uvloop",
        marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
    ),
]

# Per-test bound on an in-process scenario: generous for a loaded CI machine,
# far below pytest-timeout's 120 s so a hang fails with a clear message.
SCENARIO_TIMEOUT = 30.0


@pytest.fixture(params=LOOP_PARAMS)
def loop_name(request: pytest.FixtureRequest) -> str:
    """The event loop under test: "asyncio" or "uvloop"."""
    return str(request.param)


Runner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture
def arun(codec: ModuleType, loop_name: str) -> Runner[Any]:
    """Run a coroutine to completion on a fresh loop of the kind under test, bounded in time."""

    def run(coro: Coroutine[Any, Any, T], timeout: float = SCENARIO_TIMEOUT) -> T:
        return run_coroutine(asyncio.wait_for(coro, timeout), loop=loop_name)

    return run


@contextlib.asynccontextmanager
async def serving(handler: Any, **kwargs: Any) -> AsyncIterator[fastnet.Server]:
    """A started server on 127.0.0.1, port 0, shut down (drain timeout 5 s) on exit."""
    kwargs.setdefault("drain_timeout", 5.0)
    server = fastnet.Server(handler, "127.0.0.1", 0, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


async def roundtrip(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
    """Send ``frames`` and collect as many replies."""
    conn.send_many(frames)
    replies: list[bytes] = []
    while len(replies) < len(frames):
        replies += await conn.recv_batch()
    return replies


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` every 5 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def frame_bytes(payload: bytes, size: int = 4) -> bytes:
    """One length-prefixed frame (big-endian field of ``size`` bytes), built by hand."""
    return len(payload).to_bytes(size, "big") + payload


# ----------------------------------------------------------------- processes

# Bound on a subprocess reaching "listening on": interpreter start and imports
# take well under a second; a loaded CI machine gets ten times that.
START_TIMEOUT = 15.0


@pytest.fixture(
    params=[
        pytest.param(("asyncio", "c"), id="asyncio-c", marks=pytest.mark.c_extension),
        pytest.param(("asyncio", "py"), id="asyncio-py"),
        pytest.param(
            ("uvloop", "c"),
            id="uvloop-c",
            marks=[
                pytest.mark.c_extension,
                pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
            ],
        ),
        pytest.param(
            ("uvloop", "py"),
            id="uvloop-py",
            marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
        ),
    ]
)
def process_variant(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(loop, backend) for a server subprocess."""
    variant: tuple[str, str] = request.param
    if variant[1] == "c":
        pytest.importorskip("fastnet._frame", reason="the extension is not built")
    return variant


def process_env(backend: str = "c") -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTNET_NO_EXTENSIONS", None)
    if backend == "py":
        env["FASTNET_NO_EXTENSIONS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """``python -m fastnet serve ...`` in a subprocess, with its address once it listens."""

    def __init__(
        self,
        args: list[str],
        *,
        backend: str = "c",
        cwd: str | os.PathLike[str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastnet", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=process_env(backend),
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        assert self.proc.stdout is not None
        line = _readline_with_timeout(self.proc, START_TIMEOUT)
        if not line.startswith("listening on "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=START_TIMEOUT)
            raise AssertionError(f"server did not start: {line!r}\n{err.decode(errors='replace')}")
        self.first_line = line
        self.address = line[len("listening on ") :].strip()
        host, _, port = self.address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port) if port.isdigit() else 0

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the exit; return (status, the rest of stdout, stderr)."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=START_TIMEOUT)


def _readline_with_timeout(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise AssertionError(f"no output from the server within {timeout} s")
    return proc.stdout.readline().decode(errors="replace")


@contextlib.contextmanager
def server_process(args: list[str], **kwargs: Any) -> Iterator[ServerProcess]:
    """A ``ServerProcess`` that is killed on exit if the test left it running."""
    proc = ServerProcess(args, **kwargs)
    try:
        yield proc
    finally:
        proc.kill()


def blocking_roundtrip(port: int, payloads: list[bytes], timeout: float = 5.0) -> list[bytes]:
    """Send length-prefixed frames over a plain socket and read as many replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(frame_bytes(p) for p in payloads))
        return read_frames(sock, len(payloads))


def read_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` length-prefixed frames from a blocking socket (fewer at EOF)."""
    decoder = fastnet.LengthPrefixed().decoder()
    frames: list[bytes] = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames += decoder.feed(data)
    return frames


def sigterm_then_wait(proc: ServerProcess, timeout: float) -> tuple[int, str, str, float]:
    """SIGTERM the server; return (status, stdout, stderr, seconds until it exited)."""
    start = time.monotonic()
    proc.signal(signal.SIGTERM)
    status, out, err = proc.wait(timeout)
    return status, out, err, time.monotonic() - start
