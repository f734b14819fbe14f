"""One test per entry of ``fastnet._internals``: what fastnet borrows from asyncio and uvloop.

A new Python or uvloop release that renames or changes one of them fails
here, by name, instead of silently losing a fast path or, worse, keeping a
fast path on a transport it does not fit. Also: the transport strategy is
chosen again when the transport changes (``Connection.start_tls``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_server_support import HAVE_UVLOOP, Runner, serving

import fastnet
from fastnet import _internals
from fastnet._wakeup import _AwaitWakeup, _Wakeup
from fastnet.server import new_event_loop, run_coroutine
from fastnet.transports import choose_strategy

pytest_plugins = ["test_server_support"]

unix_only = pytest.mark.skipif(sys.platform == "win32", reason="selector socket transport")


async def _socket_pair_transport() -> tuple[asyncio.Transport, socket.socket]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    return transport, b  # type: ignore[return-value]


@unix_only
def test_selector_socket_transport_is_recognised_by_exact_type() -> None:
    assert _internals.SELECTOR_SOCKET_TRANSPORT is not None, "asyncio renamed its transport"

    async def scenario() -> None:
        transport, other = await _socket_pair_transport()
        assert type(transport) is _internals.SELECTOR_SOCKET_TRANSPORT
        assert _internals.is_selector_socket_transport(transport)
        assert choose_strategy(transport).kind == "selector"
        transport.close()
        other.close()

    run_coroutine(scenario(), loop="asyncio")


@unix_only
def test_fatal_error_fails_the_selector_transport_with_its_cause() -> None:
    lost: list[Any] = []

    class Recorder(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(Recorder, a)
        assert hasattr(transport, "_fatal_error"), "asyncio removed _fatal_error"
        error = ConnectionResetError("reset by the test")
        _internals.fatal_error(transport, error, "test")
        await asyncio.sleep(0.01)
        assert lost == [error]
        b.close()

    run_coroutine(scenario(), loop="asyncio")


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
def test_uvloop_stream_transports_are_recognised_and_tls_is_not_one() -> None:
    assert len(_internals.UVLOOP_STREAM_TRANSPORTS) == 2, "uvloop renamed its transports"

    async def scenario() -> None:
        transport, other = await _socket_pair_transport()
        assert _internals.is_uvloop_stream_transport(transport)
        assert choose_strategy(transport).kind == "uvloop"
        transport.close()
        other.close()

    run_coroutine(scenario(), loop="uvloop")
    import uvloop.loop

    assert uvloop.loop._SSLProtocolTransport not in _internals.UVLOOP_STREAM_TRANSPORTS


def test_current_task_is_the_fast_lookup() -> None:
    async def scenario() -> None:
        assert _internals.current_task(asyncio.get_running_loop()) is asyncio.current_task()

    run_coroutine(scenario(), loop="asyncio")
    if sys.version_info < (3, 12):
        # the dict lookup, not the Python wrapper around it
        assert _internals.current_task == asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


def _wakeup_classes() -> list[Any]:
    """The twin's _Wakeup, and the extension's compiled one where it is built."""
    try:
        from fastnet._core import Wakeup
    except ImportError:
        return [_Wakeup]
    return [_Wakeup, Wakeup]


@pytest.mark.parametrize("wakeup_class", _wakeup_classes(), ids=lambda c: c.__module__)
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_task_suspends_on_the_duck_typed_wakeup(loop_name: str, wakeup_class: Any) -> None:
    # Entry 5a: the Task protocol _Wakeup relies on, on both loops' Tasks.
    if loop_name == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        wakeup = wakeup_class(loop)
        events: list[str] = []

        # The twin awaits (wakeup,); the compiled Wakeup is awaitable itself.
        awaitable = wakeup if hasattr(wakeup_class, "__await__") else _AwaitWakeup((wakeup,))

        async def waiter() -> None:
            wakeup._asyncio_future_blocking = True
            await awaitable
            events.append("resumed")

        # A wake-up calls the Task's callback with a finished Future
        # (wakeup._resolved); the Task reads its result and resumes. It
        # would read the wake-up's own result() as well (the duck-typed
        # protocol), were it called with the wake-up.
        assert type(wakeup._resolved) is asyncio.Future and wakeup._resolved.result() is None
        for woken_with in (wakeup._resolved, wakeup):
            task = loop.create_task(waiter())
            await asyncio.sleep(0)
            assert wakeup._callback is not None, "the Task did not register on the wake-up"
            callback, wakeup._callback = wakeup._callback, None
            # Called directly from a loop callback (no task running), as
            # buffer_updated does: the Task resumes the coroutine right there.
            loop.call_soon(lambda c=callback, w=woken_with: (c(w), events.append("called")))
            await asyncio.wait_for(task, 5)
            assert events == ["resumed", "called"]  # resumed inside the call
            events.clear()
        # Cancelling goes through cancel(), which calls the callback with a
        # Future cancelled with the message: the Task raises CancelledError.
        task2 = loop.create_task(waiter())
        await asyncio.sleep(0)
        task2.cancel("stop")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task2, 5)
        assert task2.cancelled() and events == []
        assert wakeup.result() is None and not wakeup.cancelled()
        return events

    assert run_coroutine(scenario(), loop=loop_name) == []


@unix_only
def test_selector_transport_write_of_nothing_runs_its_checks() -> None:
    # Entry 5b: write(b"") raises after write_eof(), and writes nothing.
    async def scenario() -> None:
        transport, other = await _socket_pair_transport()
        transport.write(b"")
        assert transport.get_write_buffer_size() == 0
        transport.write_eof()
        with pytest.raises(RuntimeError):
            transport.write(b"")
        transport.close()
        other.close()

    run_coroutine(scenario(), loop="asyncio")


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_protocol_methods_are_looked_up_on_the_instance(loop_name: str) -> None:
    # Entry 5c: a slot holding a bound method replaces get_buffer/buffer_updated.
    if loop_name == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    got: list[bytes] = []

    class Slotted(asyncio.BufferedProtocol):
        __slots__ = ("buf", "buffer_updated", "get_buffer")

        def __init__(self) -> None:
            self.buf = bytearray(100)
            self.get_buffer = lambda hint: memoryview(self.buf)  # type: ignore[method-assign]
            self.buffer_updated = lambda n: got.append(bytes(self.buf[:n]))  # type: ignore[method-assign]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(Slotted, a)
        b.sendall(b"hello")
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.005)
        transport.close()
        b.close()

    ev = new_event_loop(loop_name)
    ev.close()
    run_coroutine(scenario(), loop=loop_name)
    assert got == [b"hello"]


@unix_only
def test_plain_transports_take_a_window_that_is_only_a_buffer(loop_name: str) -> None:
    # Entry 5d: the read buffer is used only through the buffer protocol and len().
    if loop_name == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    _frame = pytest.importorskip("fastnet._frame", reason="the window object is the extension's")
    spec = fastnet.LengthPrefixed()
    decoder = _frame.LengthPrefixedDecoder(spec)
    got: list[bytes] = []
    kinds: set[str] = set()

    class Windowed(asyncio.BufferedProtocol):
        def get_buffer(self, sizehint: int) -> Any:
            window = decoder.get_buffer(sizehint).obj  # the _Block under the view: no slicing
            kinds.add(type(window).__name__)
            return window

        def buffer_updated(self, nbytes: int) -> None:
            got.extend(decoder.buffer_updated(nbytes))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(Windowed, a)
        b.sendall(spec.encode_many([b"hello", b"x" * 100_000, b"bye"]))
        for _ in range(400):
            if len(got) == 3:
                break
            await asyncio.sleep(0.005)
        transport.close()
        b.close()

    run_coroutine(scenario(), loop=loop_name)
    assert kinds == {"_Block"}
    assert got == [b"hello", b"x" * 100_000, b"bye"]


def test_uvloop_reads_plain_without_get_buffer_and_switches_on_set_protocol() -> None:
    # Entry 5e: no get_buffer means data_received(bytes); set_protocol from
    # inside a read callback switches the way of reading, losing no byte.
    if not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    got: list[tuple[str, bytes]] = []
    switch_at = 3  # each side hands over after this many reads

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(4)  # small reads: several per send
            self.transport: Any = None
            self.reads = 0

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> Any:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            got.append(("buffered", bytes(self.buf[:nbytes])))
            self.reads += 1
            if self.reads == switch_at:
                self.transport.set_protocol(plain)

    class Plain:  # no get_buffer: uvloop reads into its own buffer
        def __init__(self) -> None:
            self.reads = 0

        def data_received(self, data: bytes) -> None:
            assert type(data) is bytes
            got.append(("plain", data))
            self.reads += 1
            if self.reads == switch_at:
                buffered.transport.set_protocol(buffered)

    buffered = Buffered()
    plain = Plain()
    sent = bytes(range(256)) * 4

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(lambda: buffered, a)
        assert choose_strategy(transport).plain_reads
        for i in range(0, len(sent), 2):  # many sends, with time to read each
            b.sendall(sent[i : i + 2])
            await asyncio.sleep(0.001)
            if sum(len(d) for _, d in got) == len(sent):
                break
        for _ in range(400):
            if sum(len(d) for _, d in got) == len(sent):
                break
            await asyncio.sleep(0.005)
        transport.close()
        b.close()

    run_coroutine(scenario(), loop="uvloop")
    assert b"".join(d for _, d in got) == sent
    kinds = [kind for kind, _ in got]
    assert kinds[:switch_at] == ["buffered"] * switch_at
    assert kinds[switch_at : 2 * switch_at] == ["plain"] * switch_at
    assert kinds[2 * switch_at] == "buffered"


# ------------------------------------------------ the strategy after start_tls


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl program is needed (.ci/run installs it)")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", os.fspath(key), "-out", os.fspath(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_start_tls_chooses_the_strategy_again(
    arun: Runner[Any], tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=os.fspath(cert))
    kinds: dict[str, str] = {}
    big = bytes(range(256)) * 512  # 128 KiB: written unjoined on a plain socket

    async def starttls(conn: fastnet.Connection) -> None:
        assert await conn.recv() == b"STARTTLS"
        kinds["server_before"] = conn.strategy
        kinds["window_before"] = type(conn.get_buffer(-1)).__name__
        conn.send(b"GO")
        await conn.start_tls(server_ctx)
        kinds["server_after"] = conn.strategy
        kinds["window_after"] = type(conn.get_buffer(-1)).__name__
        async for frame in conn:
            conn.send(frame)

    async def scenario() -> None:
        async with serving(starttls) as server:
            conn = await fastnet.connect("127.0.0.1", server.port)
            conn.send(b"STARTTLS")
            assert await conn.recv() == b"GO"
            await conn.start_tls(client_ctx, server_hostname="localhost")
            assert conn.strategy == "tls"
            assert conn.transport.get_extra_info("ssl_object") is not None
            conn.send_many([b"small", big, b"after"])
            got = [await conn.recv() for _ in range(3)]
            assert got == [b"small", big, b"after"]
            conn.close()
            await conn.wait_closed()
        assert kinds["server_before"] in ("selector", "uvloop")
        assert kinds["server_after"] == "tls"
        # The extension's connection hands a plain socket transport its window
        # object, and a TLS transport (which slices it) a memoryview (entry 5d).
        raw = fastnet.framing.ConnectionCore.__module__ == "fastnet._core"
        assert kinds["window_before"] == ("_Block" if raw else "memoryview")
        assert kinds["window_after"] == "memoryview"

    arun(scenario())


@unix_only
def test_a_failed_write_leaves_the_socket_open_in_connection_lost(loop_name: str) -> None:
    # Entry 5f: the input the socket holds can still be read in connection_lost.
    if loop_name == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    seen: list[Any] = []

    class ReadsWhatIsLeft(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def connection_lost(self, exc: Exception | None) -> None:
            fd = self.transport.get_extra_info("socket").fileno()
            seen.append(exc)
            seen.append(os.read(fd, 100))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(ReadsWhatIsLeft, a)
        transport.pause_reading()
        b.sendall(b"unread")
        b.close()
        transport.write(b"x")  # EPIPE: the peer is gone
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.005)
        transport.close()

    run_coroutine(scenario(), loop=loop_name)
    assert isinstance(seen[0], BrokenPipeError), seen
    assert seen[1] == b"unread"
