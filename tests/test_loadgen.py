"""The load generator: its verification logic, and short runs against real servers.

The unit tests drive ``EchoClient`` with a fake transport, so every byte the
"server" returns is under the test's control: a correct echo in any chunking
must verify, and a corrupted, reordered, dropped, duplicated or extra frame
must be reported as an error. The smoke tests run the generator for about a
second against real echo servers on 127.0.0.1 (port 0) and check that it
reports frames and no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastnet import LengthPrefixed, Lines, loadgen
from fastnet._cliargs import framing_text
from fastnet.loadgen import (
    BenchParams,
    BufferedEchoClient,
    EchoClient,
    Histogram,
    Ring,
    Stats,
    bench,
    parse_framing,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_ECHO = ROOT / "benchmarks" / "servers" / "protocol_echo.py"
STREAMS_ECHO = ROOT / "benchmarks" / "servers" / "streams_echo.py"
PROTOCOL_REFLECT = ROOT / "benchmarks" / "servers" / "protocol_reflect.py"


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64", 64),
        ("0", 0),
        ("16K", 16384),
        ("16KB", 16384),
        ("64KiB", 65536),
        ("1m", 1 << 20),
        ("1MB", 1 << 20),
        ("2MiB", 2 << 20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "-1", "1.5K", "12Q", "1 G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="K, KB or KiB"):
        parse_size(text)


def test_parse_framing() -> None:
    assert parse_framing("length") == LengthPrefixed()
    assert parse_framing("length:2") == LengthPrefixed(length_size=2)
    assert parse_framing("length:8:little") == LengthPrefixed(length_size=8, byteorder="little")
    assert parse_framing("lines") == Lines()
    assert parse_framing("lines:\\r\\n") == Lines(delimiter=b"\r\n")
    # framing_text (shared with the CLI) replaces loadgen.framing_name.
    assert framing_text(parse_framing("length:2")) == "length:2:big"


# "lines:2" was rejected before --framing took lines:DELIM; it is now a line
# ending in "2", so it left this list.
@pytest.mark.parametrize("text", ["length:5", "length:4:middle", "lines:", "json", "length:x"])
def test_parse_framing_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_framing(text)


def test_bad_options_exit_2_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    for argv, message in (
        (["--port", "1", "--loop", "uvloop"], "uvloop is not installed"),
        (["--port", "1", "--size", "64 KB"], "not a size: '64 KB'"),
        (["--port", "1", "--depth", "0"], "must be at least 1"),
        (["--port", "65536"], "port out of range"),
        (["--port", "1", "--framing", "lines:\\z"], "unknown escape"),
    ):
        with pytest.raises(SystemExit) as info:
            loadgen.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m fastnet.loadgen: error: ") and message in err, err
        assert err.count("\n") == 1


def test_bench_checks_the_loop_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ValueError, match="uvloop is not installed"):
        bench(params(1, loop="uvloop"))


# --------------------------------------------------------------------------- ring


@pytest.mark.parametrize(
    ("spec", "size", "depth"),
    [
        (LengthPrefixed(), 64, 16),
        (LengthPrefixed(length_size=2, byteorder="little"), 300, 4),
        (LengthPrefixed(length_size=1), 3, 40),
        (Lines(), 64, 16),
        (LengthPrefixed(), 65536, 4),
    ],
)
def test_ring_layout(spec: LengthPrefixed | Lines, size: int, depth: int) -> None:
    ring = Ring(spec, size, depth, read_size=4096)
    frame_size = ring.frame_size
    frames = [ring.data[i * frame_size : (i + 1) * frame_size] for i in range(ring.frames)]
    # Every frame decodes, with fastnet's own decoder, to a payload of `size` bytes.
    decoded = spec.decoder().feed(ring.data[: ring.period])
    assert len(decoded) == ring.frames
    assert all(len(p) == size for p in decoded)
    # The stream repeats: the tail is the start again, long enough for any read or write.
    assert len(ring.data) == ring.period + ring.tail
    assert ring.data[ring.period :] == ring.data[: ring.tail]
    assert ring.tail >= max(4096, depth * frame_size)
    # Frames closer than 2 x depth + 1 apart differ, so reordering in flight shows.
    assert ring.frames > 2 * depth
    window = 2 * depth + 1
    if size >= 3:  # a 3-byte payload holds the two low hex digits of the index
        for i in range(ring.frames):
            others = {frames[(i + j) % ring.frames] for j in range(1, min(window, 256))}
            assert frames[i] not in others
    if isinstance(spec, Lines):
        assert all(b"\n" not in p and b"\r" not in p for p in decoded)


def test_ring_rejects_sizes_the_framing_cannot_carry() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Ring(LengthPrefixed(length_size=1), 256, 1, 1024)
    with pytest.raises(ValueError, match="exceeds"):
        Ring(Lines(max_length=100), 101, 1, 1024)
    with pytest.raises(ValueError, match="at least 1 byte"):
        Ring(LengthPrefixed(), 0, 1, 1024)


# --------------------------------------------------------------------------- histogram


def test_histogram_percentiles_are_within_one_percent() -> None:
    histogram = Histogram()
    values = [100_000 + 1000 * i for i in range(10000)]  # 100 us .. 10.1 ms, uniform
    for value in values:
        histogram.record(value)
    assert histogram.total == 10000
    for q in (50, 99, 99.9):
        exact = values[int(q / 100 * len(values)) - 1]
        measured = histogram.percentile(q)
        assert measured is not None
        assert abs(measured - exact) / exact < 0.01, (q, measured, exact)
    assert Histogram().percentile(50) is None


def test_histogram_weights_and_merge() -> None:
    a, b = Histogram(), Histogram()
    a.record(100_000, weight=99)
    b.record(10_000_000, weight=1)
    a.merge(b)
    assert a.total == 100
    p50, p100 = a.percentile(50), a.percentile(100)
    # Buckets are 1.024 us wide: the reported value is within half of one.
    assert p50 is not None and abs(p50 - 100_000) <= 512
    assert p100 is not None and abs(p100 - 10_000_000) <= 512


# --------------------------------------------------------------------------- EchoClient


class FakeTransport:
    """Records what the client writes; the test plays the server."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # a plain connection: no "ssl_object"


Mutation = Callable[[list[bytes]], list[bytes]]


def drive(
    client_class: type[EchoClient],
    frames: int,
    mutate: Mutation | None = None,
    *,
    spec: LengthPrefixed | Lines | None = None,
    size: int = 64,
    depth: int = 8,
    seed: int = 0,
) -> tuple[EchoClient, FakeTransport, Stats]:
    """Play an echo server for ``frames`` frames, feeding replies in random chunks.

    ``mutate`` may change the list of frames echoed at each step (each step
    echoes every frame currently in flight).
    """

    async def main() -> tuple[EchoClient, FakeTransport, Stats]:
        the_spec = spec or LengthPrefixed()
        ring = Ring(the_spec, size, depth, loadgen.MAX_READ)
        stats = Stats(recording=True)
        client = client_class(7, ring, depth, stats)
        transport = FakeTransport()
        client.connection_made(transport)  # type: ignore[arg-type]
        client.start()
        rng = random.Random(seed)
        echoed = 0
        fs = ring.frame_size
        while client.done < frames and not client.failed:
            # In flight: everything written and not yet echoed.
            assert len(transport.written) - echoed == depth * fs or client.done == 0
            pending = bytes(transport.written[echoed:])
            echoed = len(transport.written)
            replies = [pending[i : i + fs] for i in range(0, len(pending), fs)]
            if mutate is not None:
                replies = mutate(replies)
            stream = b"".join(replies)
            while stream and not client.failed:
                cut = rng.randint(1, max(1, min(len(stream), 3 * fs)))
                chunk, stream = stream[:cut], stream[cut:]
                if isinstance(client, BufferedEchoClient):
                    buf = client.get_buffer(-1)
                    buf[: len(chunk)] = chunk
                    client.buffer_updated(len(chunk))
                else:
                    client.data_received(chunk)
        return client, transport, stats

    return asyncio.run(main())


CLIENTS = [pytest.param(EchoClient, id="plain"), pytest.param(BufferedEchoClient, id="buffered")]


@pytest.mark.parametrize("client_class", CLIENTS)
@pytest.mark.parametrize(
    ("spec", "size"), [(LengthPrefixed(), 64), (Lines(), 10), (LengthPrefixed(), 5000)]
)
def test_correct_echo_verifies_in_any_chunking(
    client_class: type[EchoClient], spec: LengthPrefixed | Lines, size: int
) -> None:
    for seed in range(3):
        client, transport, stats = drive(client_class, 500, spec=spec, size=size, seed=seed)
        assert stats.errors == 0, stats.messages
        assert not client.failed and not transport.aborted
        assert client.done >= 500
        # Each frame's latency was recorded once, and depth stayed exact.
        assert stats.histogram.total == client.done
        assert client.sent - client.received == 8 * client.ring.frame_size


def _corrupt_one(replies: list[bytes]) -> list[bytes]:
    if len(replies) > 3:
        frame = bytearray(replies[3])
        frame[-1] ^= 0x01
        replies[3] = bytes(frame)
    return replies


def _swap(replies: list[bytes]) -> list[bytes]:
    if len(replies) > 2:
        replies[1], replies[2] = replies[2], replies[1]
    return replies


def _drop(replies: list[bytes]) -> list[bytes]:
    return replies[:2] + replies[3:] if len(replies) > 3 else replies


def _duplicate(replies: list[bytes]) -> list[bytes]:
    return [*replies[:2], replies[1], *replies[2:-1]] if len(replies) > 3 else replies


def _extra(replies: list[bytes]) -> list[bytes]:
    return [*replies, replies[0]]


@pytest.mark.parametrize("client_class", CLIENTS)
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_corrupt_one, "differs"),
        (_swap, "differs"),
        (_drop, "differs"),
        (_duplicate, "differs"),
        (_extra, "differs"),
    ],
    ids=["corrupt", "reorder", "drop", "duplicate", "extra"],
)
def test_wrong_echo_is_an_error(
    client_class: type[EchoClient], mutate: Mutation, message: str
) -> None:
    client, transport, stats = drive(client_class, 100, mutate)
    assert stats.errors == 1
    assert message in stats.messages[0]
    assert "connection 7" in stats.messages[0]
    assert client.failed and transport.aborted


def test_corruption_is_located() -> None:
    _, _, stats = drive(EchoClient, 100, _corrupt_one, size=64, depth=8)
    # Frame 3 of the first batch, last byte: 3 * 68 + 67.
    assert "at byte 271 (frame 3, byte 67 of the frame)" in stats.messages[0]


def test_swapping_identical_frames_is_impossible() -> None:
    """Reordering is detectable because frames in flight are never identical."""
    ring = Ring(LengthPrefixed(), 64, 16, 1024)
    fs = ring.frame_size
    stream = ring.data[: 33 * fs]
    frames = [stream[i : i + fs] for i in range(0, len(stream), fs)]
    assert len(set(frames)) == len(frames)


def test_bytes_beyond_what_was_sent_are_an_error() -> None:
    async def main() -> tuple[Stats, FakeTransport]:
        ring = Ring(LengthPrefixed(), 64, 4, 1024)
        stats = Stats()
        client = EchoClient(2, ring, 4, stats)
        transport = FakeTransport()
        client.connection_made(transport)  # type: ignore[arg-type]
        client.start()
        stats.stopping = True  # no new frames: all 4 are in flight
        client.data_received(bytes(transport.written) + b"\x00")
        return stats, transport

    stats, transport = asyncio.run(main())
    assert stats.errors == 1
    assert "connection 2: received 1 bytes more than it sent" in stats.messages[0]
    assert transport.aborted


def test_lost_connection_is_an_error() -> None:
    async def main() -> Stats:
        ring = Ring(LengthPrefixed(), 64, 4, 1024)
        stats = Stats()
        client = EchoClient(3, ring, 4, stats)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        client.start()
        client.connection_lost(ConnectionResetError("reset by peer"))
        return stats

    stats = asyncio.run(main())
    assert stats.errors == 1
    assert "connection 3 closed by the server after 0 frames: reset by peer" in stats.messages[0]


def test_a_tls_record_in_reply_to_plain_frames_names_tls() -> None:
    async def main() -> Stats:
        ring = Ring(LengthPrefixed(), 64, 4, 1024)
        stats = Stats()
        stats.connected = 1
        client = EchoClient(5, ring, 4, stats)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        client.start()
        client.data_received(b"\x15\x03\x03\x00\x02\x02\x46")  # a TLS alert record
        assert stats.all_failed.is_set()  # the only connection failed: the run may end
        return stats

    stats = asyncio.run(main())
    assert stats.errors == 1
    assert "connection 5: the server answered with a TLS record" in stats.messages[0]
    assert "--tls" in stats.messages[0]


def test_orderly_close_after_drain_is_not_an_error() -> None:
    async def main() -> tuple[Stats, bool]:
        ring = Ring(LengthPrefixed(), 64, 4, 1024)
        stats = Stats()
        client = EchoClient(0, ring, 4, stats)
        transport = FakeTransport()
        client.connection_made(transport)  # type: ignore[arg-type]
        client.start()
        stats.stopping = True
        drained = client.begin_drain()
        client.data_received(bytes(transport.written))  # every frame comes back
        client.close()
        client.connection_lost(None)
        return stats, drained.done()

    stats, drained = asyncio.run(main())
    assert drained
    assert stats.errors == 0


# --------------------------------------------------------------------------- real servers


class ThreadServer:
    """An asyncio echo server in a background thread; ``mangle`` may corrupt replies."""

    def __init__(self, mangle: Callable[[int, bytes], bytes] | None = None) -> None:
        self.mangle = mangle
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        mangle = self.mangle

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport
                self.seen = 0

            def data_received(self, data: bytes) -> None:
                if mangle is not None:
                    data = mangle(self.seen, data)
                self.seen += len(data)
                self.transport.write(data)

        async def start() -> asyncio.Server:
            return await self.loop.create_server(Echo, "127.0.0.1", 0)

        self.server = self.loop.run_until_complete(start())
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


@pytest.fixture
def reflector() -> Iterator[ThreadServer]:
    server = ThreadServer()
    yield server
    server.close()


def params(port: int, **overrides: Any) -> BenchParams:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "connections": 8,
        "depth": 4,
        "size": 64,
        "duration": 0.5,
        "warmup": 0.1,
        "framing": "length:4:big",
        "loop": "asyncio",
    }
    values.update(overrides)
    return BenchParams(**values)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("framing", ["length:4:big", "length:2:little", "lines", "lines:\\r\\n"])
def test_bench_against_a_correct_echo(reflector: ThreadServer, loop: str, framing: str) -> None:
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    report = bench(params(reflector.port, loop=loop, framing=framing))
    assert report["errors"] == 0, report["error_messages"]
    assert report["framing"] == framing
    assert report["frames"] > 0
    assert report["connected"] == 8
    assert report["latency_ms"]["p50"] > 0
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["latency_ms"]["p99"] <= report["latency_ms"]["p99.9"]
    assert report["loadgen_cpu_s"] > 0


def test_bench_reports_a_corrupting_server() -> None:
    def flip_one_byte(seen: int, data: bytes) -> bytes:
        # Flip the byte at stream offset 1000 on every connection.
        if seen <= 1000 < seen + len(data):
            at = 1000 - seen
            return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        return data

    server = ThreadServer(flip_one_byte)
    try:
        report = bench(params(server.port, connections=3))
    finally:
        server.close()
    assert report["errors"] == 3
    assert all("differs from what was sent at byte 1000" in m for m in report["error_messages"])


def test_bench_counts_unreachable_connections() -> None:
    server = ThreadServer()
    port = server.port
    server.close()  # nothing listens there any more
    report = bench(params(port, connections=2, duration=0.2, warmup=0))
    assert report["errors"] == 2
    assert report["frames"] == 0
    assert all("cannot connect" in m for m in report["error_messages"])


def test_processes_split_the_connections(reflector: ThreadServer) -> None:
    report = bench(params(reflector.port, connections=5, processes=2, duration=0.5))
    assert report["errors"] == 0, report["error_messages"]
    assert report["processes"] == 2
    assert report["connected"] == 5
    assert report["frames"] > 0


def test_processes_parse_a_module_framing_themselves(
    reflector: ThreadServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The --framing text, not the spec, goes to the workers ("spawn"), which
    # import the module again: sys.path travels with them.
    (tmp_path / "benchframings.py").write_text(
        "import fastnet\nPIPE = fastnet.Lines(delimiter=b'|', max_length=100)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    report = bench(params(reflector.port, connections=2, processes=2, framing="benchframings:PIPE"))
    assert report["errors"] == 0, report["error_messages"]
    assert report["processes"] == 2
    assert report["frames"] > 0
    assert report["framing"] == "lines:|"
    with pytest.raises(ValueError, match="exceeds the 100-byte limit"):
        bench(params(reflector.port, size=101, framing="benchframings:PIPE"))


def test_split() -> None:
    assert loadgen._split(5, 2) == [3, 2]
    assert loadgen._split(64, 3) == [22, 21, 21]


def _start(
    command: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, int(line.rsplit(":", 1)[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the server; on POSIX it must shut down cleanly (status 0).

    Windows has no SIGTERM: ``terminate()`` kills the process outright, so
    only its ending is checked there.
    """
    proc.terminate()
    code = proc.wait(15)
    assert proc.stdout is not None
    proc.stdout.close()
    if sys.platform != "win32":
        assert code == 0


def _cli(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastnet.loadgen", "--port", str(port), "--duration", "1",
         "--warmup", "0.2", "--connections", "16", "--depth", "8", "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("script", [PROTOCOL_ECHO, STREAMS_ECHO], ids=["protocol", "streams"])
def test_smoke_cli_against_baseline_servers(script: Path) -> None:
    """``python -m fastnet.loadgen --json`` for a second: exit 0, no errors, no progress line."""
    proc, port = _start([sys.executable, str(script), "--port", "0"])
    try:
        done = _cli(port, "--server-pid", str(proc.pid))
    finally:
        _stop(proc)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == 0
    assert report["frames"] > 0
    assert report["frames_per_s"] > 0
    assert "\r" not in done.stderr  # stderr is a pipe: no progress line
    if sys.platform == "linux":
        assert report["server_cpu_s"] > 0


@pytest.mark.parametrize("no_extensions", ["", "1"], ids=["c", "py"])
def test_smoke_against_fastnet_echo(no_extensions: str) -> None:
    """The issue's smoke test: the generator against ``fastnet serve echo`` for a second."""
    env = dict(os.environ)
    env.pop("FASTNET_NO_EXTENSIONS", None)
    if no_extensions:
        env["FASTNET_NO_EXTENSIONS"] = no_extensions
    proc, port = _start([sys.executable, "-m", "fastnet", "serve", "echo", "--port", "0"], env)
    try:
        done = _cli(port)
    finally:
        _stop(proc)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_messages"]
    assert report["frames"] > 0


def test_cli_exit_status_on_errors() -> None:
    server = ThreadServer()
    port = server.port
    server.close()
    done = _cli(port)
    assert done.returncode == 1
    assert json.loads(done.stdout)["errors"] == 16


def test_cli_rejects_bad_parameters() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastnet.loadgen", "--port", "1", "--framing", "length:1",
         "--size", "300"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "does not fit" in done.stderr


def test_add_arguments_and_run_for_the_cli(reflector: ThreadServer) -> None:
    # What it checks is the plumbing; the load is kept small and the window
    # long enough that a busy machine still echoes a frame in it (64
    # connections x 16 for 0.3 s, against a reflector sharing this process's
    # GIL, once echoed none in a CI run).
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    args = parser.parse_args(
        ["--port", str(reflector.port), "--connections", "4", "--depth", "2",
         "--duration", "1", "--warmup", "0", "--loop", "asyncio"]
    )  # fmt: skip
    assert loadgen.run(args) == 0


def test_struct_layout_matches_baselines() -> None:
    """The baselines speak fastnet's default framing: 4-byte big-endian length."""
    ring = Ring(LengthPrefixed(), 64, 1, 64)
    assert struct.unpack_from(">I", ring.data)[0] == 64


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSFiles:
    """PEM files made by trustme: one CA, a server certificate, a client certificate."""

    ca: Path
    server: Path  # certificate chain and key in one file
    client: Path  # the client's certificate chain
    client_key: Path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    trustme = pytest.importorskip("trustme")
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    files = TLSFiles(
        ca=where / "ca.pem",
        server=where / "server.pem",
        client=where / "client.pem",
        client_key=where / "client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(files.server)
    )
    client = ca.issue_cert("bench-client@example.org")
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(files.client), append=True)
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


def _tls_server(files: TLSFiles, *extra: str) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ)
    env.pop("FASTNET_NO_EXTENSIONS", None)
    command = [sys.executable, "-m", "fastnet", "serve", "echo", "--port", "0",
               "--log-level", "warning", "--tls-cert", str(files.server), *extra]  # fmt: skip
    return _start(command, env)


@pytest.mark.parametrize("verify", [True, False], ids=["ca", "no-ca"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_bench_against_fastnet_serve(tls_files: TLSFiles, verify: bool, loop: str) -> None:
    """``--tls`` with and without ``--tls-ca``, small frames and large (BufferedProtocol)."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    proc, port = _tls_server(tls_files, "--loop", loop)
    try:
        ca = ["--tls-ca", str(tls_files.ca)] if verify else []
        done = _cli(port, "--tls", *ca, "--loop", loop)
        large = _cli(port, "--tls", *ca, "--size", "64K", "--processes", "2")
    finally:
        _stop(proc)
    for run in (done, large):
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["errors"] == 0, report["error_messages"]
        assert report["frames"] > 0
        assert report["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
        assert report["tls"]["verified"] is verify
    assert json.loads(large.stdout)["processes"] == 2


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_bench_against_the_tls_protocol_baseline(tls_files: TLSFiles, loop: str) -> None:
    """compare.py --set tls's baseline: the reflecting Protocol with ``--tls-cert``."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    proc, port = _start(
        [sys.executable, str(PROTOCOL_REFLECT), "--port", "0", "--loop", loop,
         "--tls-cert", str(tls_files.server)]
    )  # fmt: skip
    try:
        done = _cli(port, "--tls", "--tls-ca", str(tls_files.ca), "--size", "64K")
    finally:
        _stop(proc)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_messages"]
    assert report["frames"] > 0 and report["tls"]["verified"]


def test_tls_summary_says_whether_the_server_was_verified(tls_files: TLSFiles) -> None:
    proc, port = _tls_server(tls_files)
    try:
        unverified = subprocess.run(
            [sys.executable, "-m", "fastnet", "bench", "--port", str(port), "--tls",
             "--connections", "2", "--duration", "0.3", "--warmup", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        _stop(proc)
    assert unverified.returncode == 0, unverified.stderr
    assert "(server NOT verified)" in unverified.stdout.splitlines()[0]


def test_tls_verification_failure_is_a_clear_error(tls_files: TLSFiles) -> None:
    proc, port = _tls_server(tls_files)
    try:
        done = _cli(port, "--tls", "--tls-ca", str(tls_files.ca), "--tls-server-name", "other")
    finally:
        _stop(proc)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["errors"] == 16 and report["frames"] == 0
    assert "TLS handshake" in report["error_messages"][0]
    assert "CERTIFICATE_VERIFY_FAILED" in report["error_messages"][0]
    assert "--tls-server-name" in report["error_messages"][0]


def test_tls_mutual_with_a_client_certificate(tls_files: TLSFiles) -> None:
    proc, port = _tls_server(tls_files, "--tls-ca", str(tls_files.ca))
    try:
        with_cert = _cli(
            port, "--tls", "--tls-ca", str(tls_files.ca), "--tls-cert", str(tls_files.client),
            "--tls-key", str(tls_files.client_key), "--processes", "2",
        )  # fmt: skip
        without = _cli(port, "--tls", "--tls-ca", str(tls_files.ca))
    finally:
        _stop(proc)
    assert with_cert.returncode == 0, with_cert.stderr
    report = json.loads(with_cert.stdout)
    assert report["errors"] == 0, report["error_messages"]
    assert report["frames"] > 0
    assert report["tls"]["client_certificate"] is True
    # Without a certificate the server refuses: every connection is an error.
    assert without.returncode == 1
    refused = json.loads(without.stdout)
    assert refused["frames"] == 0 and refused["errors"] == 16


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_plain_bench_against_a_tls_server_fails_fast_and_says_why(
    tls_files: TLSFiles, loop: str
) -> None:
    """Without ``--tls`` a TLS server hangs up: an error naming --tls, at once, not a hang."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    proc, port = _tls_server(tls_files, "--loop", loop)
    try:
        started = time.monotonic()
        done = _cli(port, "--duration", "30", "--warmup", "1")
        elapsed = time.monotonic() - started
    finally:
        _stop(proc)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["frames"] == 0 and report["errors"] == 16
    assert all("--tls" in m for m in report["error_messages"]), report["error_messages"]
    # Every connection failed at once: the run ends then, not after 31 s.
    assert elapsed < 15, elapsed


def test_tls_bench_against_a_plain_server_is_a_handshake_error() -> None:
    proc, port = _start([sys.executable, str(PROTOCOL_ECHO), "--port", "0"])
    try:
        done = _cli(port, "--tls")
    finally:
        _stop(proc)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["frames"] == 0 and report["errors"] == 16
    assert all("TLS handshake" in m for m in report["error_messages"]), report["error_messages"]


def test_tls_options_need_tls_and_files_are_named(tls_files: TLSFiles) -> None:
    for extra, message in (
        (["--tls-ca", str(tls_files.ca)], "--tls-ca needs --tls"),
        (["--tls-server-name", "x", "--tls-cert", "c"], "--tls-cert, --tls-server-name need --tls"),
        (["--tls", "--tls-key", str(tls_files.client_key)], "--tls-key needs --tls-cert"),
        (["--tls", "--tls-ca", "/nonexistent/ca.pem"], "CA file /nonexistent/ca.pem"),
        (["--tls", "--tls-cert", str(tls_files.client_key)], "no PEM certificate"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "fastnet", "bench", "--port", "1", *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (extra, done.stderr)
        assert message in done.stderr, (extra, done.stderr)


def test_bench_help_says_tls_is_unverified_without_a_ca() -> None:
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "without --tls-ca the server's certificate is NOT verified" in text
