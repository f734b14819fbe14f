"""The C load generator (benchmarks/loadgen_c/cloadgen.c), built as compare.py builds it.

It is compiled once per session with compare.py's own ``build_cloadgen`` (gcc
-O2), then run for about half a second against real servers on 127.0.0.1
(port 0): fastnet's echo on both backends and the reflecting Protocol
baseline must verify with no error, and the report must carry the CPU
figures in the JSON shape compare.py reads; servers that flip
a byte, swap two frames or close early must be reported as errors that name
what went wrong. Skipped without gcc, and off Linux (epoll, /proc).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "benchmarks" / "compare.py"
REFLECT = ROOT / "benchmarks" / "servers" / "protocol_reflect.py"

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="cloadgen uses epoll and /proc (Linux only)"
)

# The generator's frame: a 4-byte length field, then the payload.
HEADER = struct.Struct(">I")


def _load_compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_harness", COMPARE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up while it runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return _load_compare()


@pytest.fixture(scope="module")
def cloadgen(compare: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    binary: Path = compare.build_cloadgen(tmp_path_factory.mktemp("cloadgen"))
    return binary


def run(
    binary: Path, port: int, *extra: str, connections: int = 8, depth: int = 4, size: str = "64"
) -> tuple[int, dict[str, Any]]:
    """Run the generator for half a second; return its exit status and its report."""
    done = subprocess.run(
        [str(binary), "--port", str(port), "--connections", str(connections),
         "--depth", str(depth), "--size", size, "--duration", "0.5", "--warmup", "0.1",
         "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.stdout.strip(), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, report


# --------------------------------------------------------------------------- fastnet's echo


@pytest.fixture(params=["", "1"], ids=["c", "py"])
def fastnet_echo(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    """``python -m fastnet serve echo`` on port 0, on either backend: (its pid, its port)."""
    env = dict(os.environ)
    env.pop("FASTNET_NO_EXTENSIONS", None)
    if request.param:
        env["FASTNET_NO_EXTENSIONS"] = request.param
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnet", "serve", "echo", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    yield proc.pid, int(line.rsplit(":", 1)[1])
    proc.terminate()
    assert proc.wait(15) == 0
    proc.stdout.close()


def test_verifies_fastnet_echo(
    cloadgen: Path, fastnet_echo: tuple[int, int], compare: ModuleType
) -> None:
    pid, port = fastnet_echo
    status, report = run(cloadgen, port, "--server-pid", str(pid))
    assert status == 0, report["error_messages"]
    assert report["errors"] == 0
    assert report["connected"] == 8
    assert report["frames"] > 0
    assert report["frames_per_s"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert report["server_pid"] == pid
    assert report["server_cpu_s"] > 0
    assert report["loadgen_cpu_s"] >= 0
    # The fields compare.py reads from either generator are all there.
    flat = compare.flatten(report)
    assert flat["server_cpu_us_per_frame"] > 0
    assert flat["errors"] == 0


def test_verifies_large_frames(cloadgen: Path, fastnet_echo: tuple[int, int]) -> None:
    """64 KiB frames: partial sends and reads, and the ring's wrap-around, verify too."""
    _, port = fastnet_echo
    status, report = run(cloadgen, port, connections=3, depth=4, size="64K")
    assert status == 0, report["error_messages"]
    assert report["errors"] == 0
    assert report["size"] == 65536
    assert report["frames"] > 0


@pytest.mark.parametrize("size", ["64", "64K"])
def test_verifies_the_reflecting_protocol(cloadgen: Path, size: str) -> None:
    """The reflecting baseline echoes every byte, whole reads or frames split over many."""
    proc = subprocess.Popen(
        [sys.executable, str(REFLECT), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        status, report = run(cloadgen, int(line.rsplit(":", 1)[1]), size=size)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        proc.stdout.close()
    assert status == 0, report["error_messages"]
    assert report["errors"] == 0
    assert report["frames"] > 0


# --------------------------------------------------------------------------- wrong servers


class ThreadServer:
    """An asyncio server in a background thread, speaking whatever ``factory`` makes."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]) -> None:
        self.factory = factory
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            self.loop.create_server(self.factory, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class FlipByte(asyncio.Protocol):
    """Echoes, but flips the byte at stream offset 1000 of every connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.seen = 0

    def data_received(self, data: bytes) -> None:
        at = 1000 - self.seen
        if 0 <= at < len(data):
            data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
        self.seen += len(data)
        self.transport.write(data)


class SwapFrames(asyncio.Protocol):
    """Echoes frame by frame, but sends frame 4 before frame 3 (counting from 0)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""
        self.count = 0
        self.held = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + size:
                break
            frame = self.buffer[: HEADER.size + size]
            self.buffer = self.buffer[HEADER.size + size :]
            if self.count == 3:
                self.held = frame
            else:
                out.append(frame)
                if self.count == 4:
                    out.append(self.held)
            self.count += 1
        self.transport.write(b"".join(out))


class CloseEarly(asyncio.Protocol):
    """Echoes the first 100 bytes of a connection, then closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.seen = 0

    def data_received(self, data: bytes) -> None:
        self.transport.write(data[: max(0, 100 - self.seen)])
        self.seen += len(data)
        if self.seen >= 100:
            self.transport.close()


def run_against(
    binary: Path, factory: Callable[[], asyncio.Protocol]
) -> tuple[int, dict[str, Any]]:
    server = ThreadServer(factory)
    try:
        return run(binary, server.port, connections=3)
    finally:
        server.close()


def test_flipped_byte_is_an_error(cloadgen: Path) -> None:
    status, report = run_against(cloadgen, FlipByte)
    assert status == 1
    assert report["errors"] == 3
    # 64-byte payloads: frames of 68 bytes, so byte 1000 is byte 48 of frame 14.
    assert sorted(report["error_messages"]) == [
        f"connection {n}: echo differs from what was sent at byte 1000 "
        "(frame 14, byte 48 of the frame)"
        for n in range(3)
    ]


def test_reordered_frames_are_an_error(cloadgen: Path) -> None:
    """Frames carry their index, so two frames in flight swapped differ from the ring."""
    status, report = run_against(cloadgen, SwapFrames)
    assert status == 1
    assert report["errors"] == 3
    # The headers are equal; the first payload byte (the index) differs.
    assert all(
        m.endswith(f"at byte {3 * 68 + 4} (frame 3, byte 4 of the frame)")
        for m in report["error_messages"]
    ), report["error_messages"]


def test_early_close_is_an_error(cloadgen: Path) -> None:
    status, report = run_against(cloadgen, CloseEarly)
    assert status == 1
    assert report["errors"] == 3
    assert all("closed by the server after 1 frames" in m for m in report["error_messages"])


def test_refused_connections_are_errors(cloadgen: Path) -> None:
    server = ThreadServer(asyncio.Protocol)
    port = server.port
    server.close()  # nothing listens there any more
    status, report = run(cloadgen, port, connections=2)
    assert status == 1
    assert report["errors"] == 2
    assert report["connected"] == 0
    assert report["frames"] == 0
    assert all("cannot connect" in m for m in report["error_messages"])


@pytest.mark.parametrize(
    "arguments",
    [[], ["--port", "1", "--size", "0"], ["--port", "x"], ["--port", "1", "--bogus", "2"]],
    ids=["no-port", "empty-payload", "bad-port", "unknown-option"],
)
def test_bad_arguments_exit_2(cloadgen: Path, arguments: list[str]) -> None:
    done = subprocess.run([str(cloadgen), *arguments], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "cloadgen:" in done.stderr
