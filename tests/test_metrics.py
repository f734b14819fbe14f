"""Metrics and hooks: every metric moves as a scripted scenario says, on both loops and backends.

Each test runs a server with ``metrics=`` a fresh ``CollectorRegistry`` and
reads the exported samples back with ``registry.get_sample_value``, the
numbers Prometheus would scrape, after doing known things to it: frames each
way, a framing error, a handler error, an idle timeout, a refused
connection, a failed and a completed TLS handshake, a drain. The hooks are
checked in the same scenarios.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from test_server_support import Runner, frame_bytes, roundtrip, serving, wait_until
from tls_support import TLSCerts, make_certs, tls_connect

import fastnet
from fastnet.apps import echo
from fastnet.metrics import CloseInfo, Hooks

prometheus_client = pytest.importorskip("prometheus_client")
CollectorRegistry = prometheus_client.CollectorRegistry

pytest_plugins = ["test_server_support"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    return make_certs(Path(tmp_path_factory.mktemp("metrics-tls")))


class Recorder:
    """Hooks that record every event as a tuple."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def hooks(self) -> Hooks:
        return Hooks(
            on_open=lambda conn: self.events.append(("open",)),
            on_close=lambda conn, info: self.events.append(("close", info)),
            on_handler_error=lambda conn, exc: self.events.append(("handler_error", exc)),
            on_frame_error=lambda conn, exc: self.events.append(("frame_error", exc)),
            on_tls_handshake=lambda conn, s: self.events.append(("tls_ok", s)),
            on_tls_error=lambda peer, cause, exc: self.events.append(("tls_error", cause)),
        )

    def closes(self) -> list[CloseInfo]:
        return [e[1] for e in self.events if e[0] == "close"]

    def kinds(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]


def sample(registry: Any, server: fastnet.Server, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"listener": server.address, **labels})
    assert value is not None, f"{name} {labels} is not exported"
    return float(value)


@fastnet.callback_handler
def echo_or_fail(conn: fastnet.Connection, frames: list[bytes]) -> list[bytes]:
    if b"boom" in frames:
        raise RuntimeError("boom requested")
    return frames


async def raw_exchange(port: int | None, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


def test_every_metric_moves(arun: Runner[Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="fastnet")  # the handler error's traceback
    registry = CollectorRegistry()
    recorder = Recorder()
    refuse = {"next": False}

    def admit(sock: Any, peer: Any) -> bool:
        if refuse["next"]:
            refuse["next"] = False
            return False
        return True

    async def scenario() -> None:
        async with serving(
            echo_or_fail,
            framing=fastnet.LengthPrefixed(max_frame=1000),
            metrics=registry,
            hooks=recorder.hooks(),
            idle_timeout=0.3,
            admit=admit,
        ) as server:
            s = lambda name, **labels: sample(registry, server, name, **labels)  # noqa: E731
            assert s("fastnet_connections_active") == 0
            assert s("fastnet_draining") == 0
            # Frames each way: three batches of ten.
            conn = await fastnet.connect("127.0.0.1", server.port)
            for _ in range(3):
                assert len(await roundtrip(conn, [b"x" * 10] * 10)) == 10
            assert s("fastnet_connections_active") == 1
            assert s("fastnet_frames_received_total") == 30
            assert s("fastnet_frames_sent_total") == 30
            assert s("fastnet_bytes_received_total") == 30 * 14
            assert s("fastnet_bytes_sent_total") == 30 * 14
            writes = s("fastnet_writes_total")
            assert 3 <= writes <= 30
            reads = s("fastnet_frames_per_read_count")
            assert 3 <= reads <= 30 and s("fastnet_frames_per_read_sum") == 30
            assert s("fastnet_frames_per_read_bucket", le="+Inf") == reads
            assert s("fastnet_handler_latency_seconds_count") == reads  # one call per read
            assert 0 < s("fastnet_handler_latency_seconds_sum") < 5
            conn.close()
            await conn.wait_closed()
            # A framing error: a header over max_frame.
            assert await raw_exchange(server.port, frame_bytes(b"y" * 2000)) == b""
            # A handler error.
            assert await raw_exchange(server.port, frame_bytes(b"boom")) == b""
            # An idle timeout: connect, send nothing.
            assert await raw_exchange(server.port, b"") == b""
            # A refused connection (the admission hook).
            refuse["next"] = True
            assert await raw_exchange(server.port, b"") == b""
            await wait_until(lambda: s("fastnet_connections_closed_total") == 4)
            assert s("fastnet_connections_accepted_total") == 4
            assert s("fastnet_connections_rejected_total", cause="admission") == 1
            assert s("fastnet_frame_errors_total", kind="too_large") == 1
            assert s("fastnet_handler_errors_total") == 1
            assert s("fastnet_idle_timeouts_total") == 1
            assert s("fastnet_connection_duration_seconds_count") == 4
            assert s("fastnet_connection_duration_seconds_bucket", le="+Inf") == 4
            server.announce_drain()
            assert s("fastnet_draining") == 1

    arun(scenario())
    reasons = sorted(info.reason for info in recorder.closes())
    assert reasons == ["closed", "frame_error", "handler_error", "idle_timeout"]
    assert len(recorder.kinds("open")) == 4
    assert [type(e[1]).__name__ for e in recorder.kinds("frame_error")] == ["FrameTooLarge"]
    assert [str(e[1]) for e in recorder.kinds("handler_error")] == ["boom requested"]
    first = next(info for info in recorder.closes() if info.reason == "closed")
    assert (first.frames_in, first.frames_out, first.bytes_in) == (30, 30, 30 * 14)
    assert first.duration > 0


def test_task_handler_latency_is_timed_from_wakeup_to_next_wait(arun: Runner[Any]) -> None:
    registry = CollectorRegistry()

    async def slow_echo(conn: fastnet.Connection) -> None:
        while True:
            try:
                frames = await conn.recv_batch()
            except fastnet.ConnectionClosedError:
                return
            await asyncio.sleep(0.02)  # the handler's own work: counted
            conn.send_many(frames)

    async def scenario() -> None:
        async with (
            serving(slow_echo, metrics=registry) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            for _ in range(5):
                assert await roundtrip(conn, [b"ping"]) == [b"ping"]
            await wait_until(
                lambda: sample(registry, server, "fastnet_handler_latency_seconds_count") >= 5
            )
            count = sample(registry, server, "fastnet_handler_latency_seconds_count")
            total = sample(registry, server, "fastnet_handler_latency_seconds_sum")
            assert count == 5
            assert 5 * 0.02 <= total < 5.0
            # Each run took at least 20 ms: none in the buckets below 10 ms.
            assert (
                sample(registry, server, "fastnet_handler_latency_seconds_bucket", le="0.01") == 0
            )

    arun(scenario())


def test_tls_metrics(arun: Runner[Any], certs: TLSCerts) -> None:
    registry = CollectorRegistry()
    recorder = Recorder()

    async def scenario() -> None:
        async with serving(
            echo, ssl=certs.server_context(), metrics=registry, hooks=recorder.hooks()
        ) as server:
            conn = await tls_connect(server.port, certs.client_context())
            assert await roundtrip(conn, [b"hello"]) == [b"hello"]
            conn.close()
            await conn.wait_closed()
            assert await raw_exchange(server.port, frame_bytes(b"plain")) == b""
            s = lambda name, **labels: sample(registry, server, name, **labels)  # noqa: E731
            await wait_until(lambda: s("fastnet_connections_closed_total") == 2)
            assert s("fastnet_tls_handshakes_total") == 1
            assert s("fastnet_tls_handshake_errors_total", cause="not_tls") == 1
            assert s("fastnet_tls_handshake_duration_seconds_count") == 1
            assert s("fastnet_tls_handshake_timeouts_total") == 0

    arun(scenario())
    assert [e[1] for e in recorder.kinds("tls_error")] == ["not_tls"]
    assert len(recorder.kinds("tls_ok")) == 1


def test_metrics_off_costs_no_histograms(arun: Runner[Any]) -> None:
    async def scenario() -> None:
        async with serving(echo) as server:
            assert server.metrics is None
            async with await fastnet.connect("127.0.0.1", server.port) as conn:
                assert await roundtrip(conn, [b"a"]) == [b"a"]
                (live,) = server._connections
                assert live._read_stats is None

    arun(scenario())


def test_a_failing_hook_is_logged_and_ignored(
    arun: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    def explode(conn: Any) -> None:
        raise ValueError("hook bug")

    async def scenario() -> None:
        async with (
            serving(echo, hooks=Hooks(on_open=explode)) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            assert await roundtrip(conn, [b"still served"]) == [b"still served"]

    arun(scenario())
    assert any("the on_open hook raised" in r.getMessage() for r in caplog.records)


def test_servers_sharing_a_registry_are_told_apart_by_listener(arun: Runner[Any]) -> None:
    registry = CollectorRegistry()

    async def scenario() -> None:
        async with (
            serving(echo, metrics=registry) as one,
            serving(echo, metrics=registry) as two,
        ):
            async with await fastnet.connect("127.0.0.1", one.port) as conn:
                assert await roundtrip(conn, [b"a", b"b"]) == [b"a", b"b"]
            await wait_until(lambda: sample(registry, one, "fastnet_connections_closed_total") == 1)
            assert sample(registry, one, "fastnet_frames_received_total") == 2
            assert sample(registry, two, "fastnet_frames_received_total") == 0

    arun(scenario())


def test_metrics_without_prometheus_client_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_prometheus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("prometheus_client"):
            raise ImportError("No module named 'prometheus_client'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(RuntimeError, match=r"pip install 'fastnet\[metrics\]'"):
        fastnet.Server(echo, metrics=True)


def test_snapshots_of_workers_sum_into_one_scrape(arun: Runner[Any]) -> None:
    """Two servers stand for two worker processes of one listener: the supervisor's
    collector, fed their snapshots, exports the sums (and histogram buckets add up)."""
    from fastnet.metrics import FastnetCollector, snapshot

    snaps: list[dict[str, Any]] = []

    async def scenario() -> None:
        for frames in (2, 3):
            async with serving(echo, metrics=CollectorRegistry()) as server:
                async with await fastnet.connect("127.0.0.1", server.port) as conn:
                    assert len(await roundtrip(conn, [b"z"] * frames)) == frames
                await wait_until(lambda: server.stats()["closed"] == 1)
                snap = snapshot(server)
                snap["listener"] = "0.0.0.0:9000"  # one shared listening socket
                snaps.append(snap)

    arun(scenario())
    registry = CollectorRegistry()
    registry.register(FastnetCollector.from_snapshots(lambda: snaps))
    labels = {"listener": "0.0.0.0:9000"}
    assert registry.get_sample_value("fastnet_frames_received_total", labels) == 5
    assert registry.get_sample_value("fastnet_connections_accepted_total", labels) == 2
    assert registry.get_sample_value("fastnet_connection_duration_seconds_count", labels) == 2
    reads = registry.get_sample_value("fastnet_frames_per_read_count", labels)
    assert reads is not None and 2 <= reads <= 5
    assert registry.get_sample_value("fastnet_frames_per_read_sum", labels) == 5


def test_a_reset_is_counted_and_reported_as_such(arun: Runner[Any]) -> None:
    """A peer that resets mid-frame: `resets` +1, `on_close` reason `reset`, and the
    labelled counters export their known label values at 0 meanwhile."""
    import socket
    import struct

    registry = CollectorRegistry()
    recorder = Recorder()

    async def scenario() -> None:
        async with serving(echo, metrics=registry, hooks=recorder.hooks()) as server:
            s = lambda name, **labels: sample(registry, server, name, **labels)  # noqa: E731
            assert s("fastnet_frame_errors_total", kind="incomplete") == 0
            assert s("fastnet_tls_handshake_errors_total", cause="not_tls") == 0
            assert s("fastnet_connections_reset_total") == 0
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame_bytes(b"z" * 1000)[:500])
            await writer.drain()
            await wait_until(lambda: server.stats()["bytes_in"] == 500)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await wait_until(lambda: server.stats()["closed"] == 1)
            assert s("fastnet_connections_reset_total") == 1
            assert s("fastnet_frame_errors_total", kind="incomplete") == 0
            assert server.stats()["resets"] == 1

    arun(scenario())
    assert [info.reason for info in recorder.closes()] == ["reset"]


def test_router_events_are_exported(arun: Runner[Any], codec: Any) -> None:
    # A Router's counters are fastnet_handler_events_total{event}: each known
    # event from the first scrape (0), and each moves when it happens.
    registry = CollectorRegistry()
    router = fastnet.Router()

    @router.handler(1)
    def ok(conn: fastnet.Connection, body: bytes) -> bytes:
        return body

    async def scenario() -> None:
        async with serving(router, metrics=registry) as server:

            def event(name: str) -> float:
                return sample(registry, server, "fastnet_handler_events_total", event=name)

            assert event("unknown_type") == 0
            assert event("pings") == 0
            async with await fastnet.open_channel("127.0.0.1", server.port) as channel:
                assert await channel.call(b"x", type=1, timeout=5) == b"x"
                with pytest.raises(fastnet.UnknownMessageType):
                    await channel.call(b"x", type=9, timeout=5)
                await channel.ping(timeout=5)
            assert event("unknown_type") == 1
            assert event("pings") == 1
            assert event("internal_errors") == 0

    arun(scenario())
