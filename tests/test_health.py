"""The metrics and health endpoint (``fastnet.health``), ``--drain-delay`` and ``--log-format``.

In-process tests run the endpoint beside a framed echo server on one loop
(both loops, both backends: ``arun``), with real sockets on 127.0.0.1 port 0.
Every abuse of the HTTP port is followed, and where it lasts accompanied, by
a framed round trip on the main port: the endpoint never disturbs it.
Process tests start ``python -m fastnet serve`` and send real signals; the
scrape test runs a real Prometheus (Debian's ``prometheus`` package) against
a real server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from test_server_support import (
    START_TIMEOUT,
    Runner,
    ServerProcess,
    blocking_roundtrip,
    frame_bytes,
    process_env,
    read_frames,
    roundtrip,
    server_process,
    serving,
)

import fastnet
from fastnet import cli
from fastnet.apps import echo
from fastnet.health import (
    MAX_REQUEST_HEAD,
    BadRequest,
    HealthEndpoint,
    Request,
    parse_request_head,
)
from fastnet.jsonlog import JSONFormatter
from fastnet.runner import serve

pytest_plugins = ["test_server_support"]

# The request timeout of the in-process endpoints: short, so the slowloris
# cases take half a second, not the default five.
REQUEST_TIMEOUT = 0.5

# Bound on any one HTTP exchange in these tests.
HTTP_TIMEOUT = 5.0


# ------------------------------------------------------------------ helpers


@contextlib.asynccontextmanager
async def with_endpoint(
    registry: CollectorRegistry | None = None, **kwargs: Any
) -> AsyncIterator[tuple[fastnet.Server, HealthEndpoint]]:
    """An echo server (metrics into ``registry`` when given) and its endpoint."""
    async with serving(echo, metrics=registry) as server:
        endpoint = HealthEndpoint(
            server, registry=registry, request_timeout=REQUEST_TIMEOUT, **kwargs
        )
        async with endpoint:
            yield server, endpoint


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` raw, return everything the endpoint sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), HTTP_TIMEOUT)
    finally:
        writer.close()


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(" ")[1])
        self.headers = {
            name.lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }


async def get(port: int, path: str, *headers: str, method: str = "GET") -> Reply:
    extra = "".join(f"{h}\r\n" for h in headers)
    request = f"{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()
    return Reply(await exchange(port, request))


async def framed_client_works(server: fastnet.Server, conn: fastnet.Connection) -> None:
    """The main port serves: the open client and a new one each get an echo."""
    assert await roundtrip(conn, [b"still here"]) == [b"still here"]
    fresh = await fastnet.connect("127.0.0.1", server.port)
    try:
        assert await roundtrip(fresh, [b"new"]) == [b"new"]
    finally:
        fresh.close()


def value_of(families: list[Any], sample_name: str) -> float:
    for family in families:
        for sample in family.samples:
            if sample.name == sample_name:
                return float(sample.value)
    raise AssertionError(f"no sample {sample_name}")


# ------------------------------------------------------------ request parsing


def test_parse_request_head_good() -> None:
    head = (
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/plain\r\n"
        b"accept:  application/openmetrics-text \r\n\r\n"
    )
    assert parse_request_head(head) == Request(
        "GET",
        "/metrics",
        "HTTP/1.1",
        {"host": "a", "accept": "text/plain, application/openmetrics-text"},
    )
    assert parse_request_head(b"HEAD / HTTP/1.0\r\n\r\n") == Request("HEAD", "/", "HTTP/1.0", {})


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET  /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\n\r\n",
        b"GET /healthz http/1.1\r\n\r\n",
        b"GET healthz HTTP/1.1\r\n\r\n",
        b"GET http://x/healthz HTTP/1.1\r\n\r\n",
        b"G(T /healthz HTTP/1.1\r\n\r\n",
        b"GET /he\xffz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nName : x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nA: b\nC: d\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nA: \xe9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello, more or less
        b"GET /healthz HTTP/1.1\r\n",  # no blank line
    ],
)
def test_parse_request_head_refuses(head: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request_head(head)


# ----------------------------------------------------------- the endpoints


def test_metrics_text_and_openmetrics(arun: Runner[Any]) -> None:
    registry = CollectorRegistry()
    mine = Counter("app_things", "A metric of the application's own.", registry=registry)
    mine.inc(3)

    async def main() -> None:
        async with with_endpoint(registry) as (server, endpoint):
            for _ in range(2):
                conn = await fastnet.connect("127.0.0.1", server.port)
                assert await roundtrip(conn, [b"a", b"b", b"c"]) == [b"a", b"b", b"c"]
                conn.close()
            reply = await get(endpoint.port, "/metrics")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert int(reply.headers["content-length"]) == len(reply.body)
            assert reply.headers["connection"] == "close"
            families = list(text_string_to_metric_families(reply.body.decode()))
            listener = f'{{listener="{server.address}"}}'
            text = reply.body.decode()
            assert f"fastnet_connections_accepted_total{listener} 2.0" in text
            assert f"fastnet_frames_received_total{listener} 6.0" in text
            assert value_of(families, "fastnet_frames_per_read_sum") == 6
            assert value_of(families, "app_things_total") == 3
            # OpenMetrics when the Accept header asks for it (as Prometheus does).
            accept = (
                "Accept: application/openmetrics-text;version=1.0.0;q=0.5,"
                "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            )
            om = await get(endpoint.port, "/metrics", accept)
            assert om.status == 200
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.body.endswith(b"# EOF\n")
            assert f"fastnet_connections_accepted_total{listener} 2.0".encode() in om.body
            plain = await get(endpoint.port, "/metrics", "Accept: application/openmetrics-text")
            assert plain.headers["content-type"].startswith("application/openmetrics-text")
            # HEAD: the same head, no body.
            head = await get(endpoint.port, "/metrics", method="HEAD")
            assert head.status == 200 and head.body == b""
            assert int(head.headers["content-length"]) > 0

    arun(main())


def test_health_ready_and_not_found(arun: Runner[Any]) -> None:
    async def main() -> None:
        async with with_endpoint() as (server, endpoint):
            port = endpoint.port
            healthz = await get(port, "/healthz")
            assert (healthz.status, healthz.body) == (200, b"ok\n")
            assert healthz.status_line == "HTTP/1.1 200 OK"
            readyz = await get(port, "/readyz?verbose")
            assert (readyz.status, readyz.body) == (200, b"ready\n")
            assert (await get(port, "/nope")).status == 404
            assert (await get(port, "/")).status == 404
            # No registry: metrics are off, and said to be.
            off = await get(port, "/metrics")
            assert (off.status, off.body) == (404, b"metrics are off\n")
            post = await get(port, "/readyz", method="POST")
            assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
            # HTTP/1.0 is answered too.
            raw = await exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
            # A drain announced: not ready, still alive, still serving frames.
            conn = await fastnet.connect("127.0.0.1", server.port)
            server.announce_drain()
            readyz = await get(port, "/readyz")
            assert (readyz.status, readyz.body) == (503, b"draining\n")
            assert (await get(port, "/healthz")).status == 200
            await framed_client_works(server, conn)
            conn.close()
            # And after the shutdown, for as long as the endpoint runs.
            await server.shutdown()
            assert (await get(port, "/readyz")).status == 503
            assert (await get(port, "/healthz")).status == 200

    arun(main())


def test_not_listening_is_not_ready(arun: Runner[Any]) -> None:
    async def main() -> None:
        server = fastnet.Server(echo)
        async with HealthEndpoint(server) as endpoint:
            reply = await get(endpoint.port, "/readyz")
            assert (reply.status, reply.body) == (503, b"not listening\n")

    arun(main())


BAD_REQUESTS = {
    "garbage": b"GARBAGE\r\n\r\n",
    "binary": bytes(range(256)) + b"\r\n\r\n",
    "http2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "no-colon": b"GET /metrics HTTP/1.1\r\nHost\r\n\r\n",
    "bad-version": b"GET /metrics HTTP/9.9\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_malformed_request_gets_400_and_the_server_serves_on(
    arun: Runner[Any], request_bytes: bytes
) -> None:
    async def main() -> None:
        async with with_endpoint() as (server, endpoint):
            conn = await fastnet.connect("127.0.0.1", server.port)
            reply = Reply(await exchange(endpoint.port, request_bytes))
            assert reply.status == 400
            assert reply.headers["connection"] == "close"
            await framed_client_works(server, conn)
            assert (await get(endpoint.port, "/healthz")).status == 200
            conn.close()

    arun(main())


def test_a_request_that_ends_early_gets_400(arun: Runner[Any]) -> None:
    async def main() -> None:
        async with with_endpoint() as (server, endpoint):
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            writer.write_eof()  # half-closed: it can still read the answer
            raw = await asyncio.wait_for(reader.read(), HTTP_TIMEOUT)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 400 ")
            # Connected and closed at once (a TCP probe): nothing to answer.
            _, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.close()
            conn = await fastnet.connect("127.0.0.1", server.port)
            await framed_client_works(server, conn)
            conn.close()

    arun(main())


def test_a_1mb_header_is_refused_and_the_server_serves_on(arun: Runner[Any]) -> None:
    async def main() -> None:
        async with with_endpoint() as (server, endpoint):
            conn = await fastnet.connect("127.0.0.1", server.port)
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            big = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
            received = b""
            try:
                writer.write(big)
                # The endpoint answers after MAX_REQUEST_HEAD bytes and closes
                # with most of the megabyte unread: the kernel may turn the
                # close into a reset before the 400 is read.
                received = await asyncio.wait_for(reader.read(), HTTP_TIMEOUT)
            except ConnectionResetError:
                pass
            finally:
                writer.close()
            assert received == b"" or received.startswith(b"HTTP/1.1 400 "), received[:100]
            # Just over the bound, sent whole and read: 400.
            over = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n"
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.write(over)
            with contextlib.suppress(ConnectionResetError):
                received = await asyncio.wait_for(reader.read(), HTTP_TIMEOUT)
                assert received.startswith(b"HTTP/1.1 400 ")
            writer.close()
            # Just under it: served.
            under = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (MAX_REQUEST_HEAD - 100)
            assert (Reply(await exchange(endpoint.port, under + b"\r\n\r\n"))).status == 200
            await framed_client_works(server, conn)
            conn.close()

    arun(main())


def test_slowloris_is_closed_after_the_timeout_and_the_server_serves_on(
    arun: Runner[Any],
) -> None:
    async def main() -> None:
        async with with_endpoint() as (server, endpoint):
            conn = await fastnet.connect("127.0.0.1", server.port)
            loop = asyncio.get_running_loop()
            start = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.write(b"GET /metr")  # half a request line, then nothing
            # While it stalls, everyone else is served.
            await framed_client_works(server, conn)
            assert (await get(endpoint.port, "/healthz")).status == 200
            assert await asyncio.wait_for(reader.read(), HTTP_TIMEOUT) == b""  # closed
            elapsed = loop.time() - start
            writer.close()
            assert REQUEST_TIMEOUT * 0.9 <= elapsed < REQUEST_TIMEOUT + 3, elapsed
            await framed_client_works(server, conn)
            conn.close()

    arun(main())


def test_idle_connections_at_the_bound_cannot_hold_the_probes(arun: Runner[Any]) -> None:
    """At the bound, a new connection closes the one that has waited longest for its
    request head: idle or trickling clients cannot keep /healthz from answering."""

    async def main() -> None:
        async with with_endpoint(max_connections=2) as (server, endpoint):
            stalled = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(2)]
            stalled[1][1].write(b"GET /hea")  # one idle, one trickling
            await asyncio.sleep(0.05)  # both accepted and counted
            for _ in range(3):
                assert (await get(endpoint.port, "/healthz")).status == 200
                assert (await get(endpoint.port, "/readyz")).status == 200
            # The oldest was closed first, then the other.
            for r, w in stalled:
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(r.read(), HTTP_TIMEOUT) == b""
                w.close()
            conn = await fastnet.connect("127.0.0.1", server.port)
            await framed_client_works(server, conn)
            conn.close()

    arun(main())


def test_close_ends_connections_in_progress(arun: Runner[Any]) -> None:
    async def main() -> None:
        server = fastnet.Server(echo)
        endpoint = HealthEndpoint(server, request_timeout=60)
        await endpoint.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"GET /he")
        await asyncio.sleep(0.05)
        await asyncio.wait_for(endpoint.close(), HTTP_TIMEOUT)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), HTTP_TIMEOUT) == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", endpoint.port)

    arun(main())


def test_endpoint_bind_error_names_the_address(arun: Runner[Any]) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            endpoint = HealthEndpoint(fastnet.Server(echo), "127.0.0.1", port)
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} \\(metrics\\)"):
                await endpoint.start()

    arun(main())


def test_serve_with_a_metrics_address(arun: Runner[Any]) -> None:
    # The Python API: serve(..., metrics_address=...) runs the endpoint on its loop.
    registry = CollectorRegistry()

    async def main() -> None:
        ready: list[Any] = []
        task = asyncio.ensure_future(
            serve(
                echo,
                handle_signals=False,
                metrics=registry,
                metrics_address=("127.0.0.1", 0),
                on_ready=ready.append,
                on_metrics_ready=ready.append,
            )
        )
        while len(ready) < 2:
            await asyncio.sleep(0.01)
        server, endpoint = ready
        assert isinstance(endpoint, HealthEndpoint) and endpoint.port > 0
        assert endpoint.address == f"127.0.0.1:{endpoint.port}"
        conn = await fastnet.connect("127.0.0.1", server.port)
        assert await roundtrip(conn, [b"hello"]) == [b"hello"]
        conn.close()
        reply = await get(endpoint.port, "/metrics")
        assert reply.status == 200 and b"fastnet_connections_accepted_total" in reply.body
        assert (await get(endpoint.port, "/readyz")).status == 200
        await server.shutdown()
        await asyncio.wait_for(task, HTTP_TIMEOUT)
        with pytest.raises(OSError):  # the endpoint closed with the server
            await asyncio.open_connection("127.0.0.1", endpoint.port)

    arun(main())


def test_serve_rejects_a_bad_drain_delay(arun: Runner[Any]) -> None:
    with pytest.raises(ValueError, match="drain_delay"):
        arun(serve(echo, handle_signals=False, drain_delay=-1))


def test_modules_do_not_import_prometheus_client_until_asked() -> None:
    code = (
        "import sys, fastnet, fastnet.health, fastnet.runner, fastnet.cli, fastnet.jsonlog\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=START_TIMEOUT
    )
    assert result.returncode == 0, result.stderr


def test_metrics_without_prometheus_client_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    assert cli.main(["serve", "echo", "--port", "0", "--metrics", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "fastnet serve: error: --metrics: metrics need prometheus_client" in err
    assert "pip install 'fastnet[metrics]'" in err
    from fastnet.health import default_registry

    with pytest.raises(RuntimeError, match="fastnet\\[metrics\\]"):
        default_registry()


# ----------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9100", ("::1", 9100)),
        ("localhost:80", ("localhost", 80)),
        ("9100", ("127.0.0.1", 9100)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert cli.parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metrics", "127.0.0.1:"], "not a port number"),
        (["--metrics", ":9100"], "expected HOST:PORT"),
        (["--metrics", "::1:9100"], "put an IPv6 address in brackets"),
        (["--metrics", "127.0.0.1:99999"], "port out of range"),
        (["--drain-delay", "-1"], "must not be negative"),
        (["--drain-delay", "inf"], "finite"),
        (["--log-format", "xml"], "invalid choice"),
    ],
)
def test_new_options_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "echo", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_metrics_bind_error_is_one_line_and_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fastnet", "serve", "echo", "--port", "0",
             "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, env=process_env(), timeout=START_TIMEOUT,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"fastnet: cannot listen on 127.0.0.1:{port} (metrics): ")
    assert "Traceback" not in result.stderr


def _metrics_address(server: ServerProcess) -> tuple[str, int]:
    """The second stdout line, ``metrics on HOST:PORT``, read within START_TIMEOUT."""
    # Not a select() on the pipe, as for the first line: reading that line may
    # have buffered this one already, and the pipe would then look empty. A
    # thread reads it; killing the process on timeout ends the read.
    assert server.proc.stdout is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.proc.stdout.readline)
        try:
            line = future.result(START_TIMEOUT).decode(errors="replace")
        except concurrent.futures.TimeoutError:
            server.proc.kill()
            raise AssertionError(f"no metrics line within {START_TIMEOUT} s") from None
    assert line.startswith("metrics on "), line
    host, _, port = line[len("metrics on ") :].strip().rpartition(":")
    return host, int(port)


def _http_get(port: int, path: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_readyz_turns_503_on_sigterm_while_the_server_still_serves(
    process_variant: tuple[str, str],
) -> None:
    # --drain-delay 1: SIGTERM makes /readyz 503 at once, and for that second
    # the listener still accepts and every connection is served; then the
    # graceful drain, and status 0.
    loop, backend = process_variant
    args = ["echo", "--port", "0", "--metrics", "127.0.0.1:0", "--drain-delay", "1",
            "--loop", loop]  # fmt: skip
    with server_process(args, backend=backend) as server:
        assert server.first_line == f"listening on 127.0.0.1:{server.port}\n"
        _, metrics_port = _metrics_address(server)
        assert _http_get(metrics_port, "/readyz") == (200, b"ready\n")
        live = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        live.sendall(frame_bytes(b"before"))
        assert read_frames(live, 1) == [b"before"]

        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        deadline = signalled + 5
        while _http_get(metrics_port, "/readyz")[0] != 503:
            assert time.monotonic() < deadline, "/readyz never turned 503"
            time.sleep(0.01)
        # The delay is running: the live client is served, a new one accepted.
        live.sendall(frame_bytes(b"during"))
        assert read_frames(live, 1) == [b"during"]
        assert blocking_roundtrip(server.port, [b"new", b"client"]) == [b"new", b"client"]
        assert _http_get(metrics_port, "/healthz") == (200, b"ok\n")
        assert _http_get(metrics_port, "/readyz") == (503, b"draining\n")
        # The new connection was accepted after /readyz turned 503: the
        # listener was still open then (after the delay it refuses).

        status, out, err = server.wait(10)
        exited = time.monotonic()
        assert live.recv(1) == b""  # the drain closed it: end of input, then EOF
        live.close()
    assert status == 0, err
    assert out == ""
    assert exited - signalled >= 1.0
    assert "draining for 1 s" in err and "Traceback" not in err
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_a_second_signal_during_the_drain_delay_exits_at_once() -> None:
    args = ["echo", "--port", "0", "--drain-delay", "60"]
    with server_process(args) as server:
        assert blocking_roundtrip(server.port, [b"x"]) == [b"x"]
        server.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert blocking_roundtrip(server.port, [b"still"]) == [b"still"]  # in the delay
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        status, _, _ = server.wait(10)
    assert status == -signal.SIGTERM
    assert time.monotonic() - start < 5


def test_json_log_lines_parse_and_carry_the_fields() -> None:
    args = ["echo", "--port", "0", "--log-format", "json", "--log-level", "debug",
            "--max-frame", "16"]  # fmt: skip
    with server_process(args) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(frame_bytes(b"x" * 100))  # over --max-frame: a framing error
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(100):
                    pass
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err
    lines = err.splitlines()
    assert len(lines) >= 3
    now = datetime.datetime.now(datetime.timezone.utc)
    for line in lines:
        record = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= record.keys(), record
        assert record["ts"].endswith("Z")
        ts = datetime.datetime.fromisoformat(record["ts"][:-1] + "+00:00")
        assert abs((now - ts).total_seconds()) < 120
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert record["logger"].startswith("fastnet")
    messages = [json.loads(line)["message"] for line in lines]
    assert f"listening on 127.0.0.1:{server.port}" in messages
    assert any("framing error" in m for m in messages), messages


def test_json_formatter_writes_extra_fields_and_tracebacks() -> None:
    formatter = JSONFormatter()
    record = logging.LogRecord("fastnet", logging.WARNING, __file__, 1, "closed %s", ("x",), None)
    record.peer = "198.51.100.7:50212"
    record.listener = "127.0.0.1:9000"
    record.ts = "an extra named as a field of the line"
    record.obj = object()
    line = json.loads(formatter.format(record))
    assert line["message"] == "closed x"
    assert line["level"] == "WARNING" and line["logger"] == "fastnet"
    assert line["peer"] == "198.51.100.7:50212" and line["listener"] == "127.0.0.1:9000"
    assert line["_ts"] == "an extra named as a field of the line"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert line["obj"].startswith("<object object")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc_record = logging.LogRecord(
            "fastnet", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = formatter.format(exc_record)
    assert "\n" not in text
    parsed = json.loads(text)
    assert "ValueError: boom" in parsed["exc"] and parsed["message"] == "failed"
    # Through a logger, with extra=.
    stream = _Capture()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("fastnet.test_health")
    log.addHandler(handler)
    try:
        log.warning("slow peer", extra={"peer": "10.0.0.1:1234", "frames": 3})
    finally:
        log.removeHandler(handler)
    parsed = json.loads(stream.text)
    assert parsed["peer"] == "10.0.0.1:1234" and parsed["frames"] == 3


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


# ------------------------------------------------------- a real Prometheus

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)

# Bound on Prometheus starting, scraping and answering with the expected
# values: it scrapes every second; its start takes one or two on a CI machine.
SCRAPE_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(api_port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{api_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:
        data = json.load(reply)
    assert data["status"] == "success", data
    result = data["data"]["result"]
    if not result:
        return None
    return float(result[0]["value"][1])


@pytest.mark.slow
@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not installed (Debian: apt-get install prometheus; .ci/run does it)",
)
def test_a_real_prometheus_scrapes_fastnet(tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    connections, frames_each = 3, 4
    with server_process(["echo", "--port", "0", "--metrics", "127.0.0.1:0"]) as server:
        _, metrics_port = _metrics_address(server)
        for i in range(connections):
            frames = [b"frame %d.%d" % (i, j) for j in range(frames_each)]
            assert blocking_roundtrip(server.port, frames) == frames
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: fastnet\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        api_port = _free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{api_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            expected = {
                'up{job="fastnet"}': 1.0,
                "sum(fastnet_connections_accepted_total)": float(connections),
                "sum(fastnet_frames_received_total)": float(connections * frames_each),
                # Frames delivered per read: the sum is every frame, whatever the reads.
                "sum(fastnet_frames_per_read_sum)": float(connections * frames_each),
                "sum(fastnet_connections_active)": 0.0,
                "sum(fastnet_draining)": 0.0,
            }
            seen: dict[str, float | None] = {}
            deadline = time.monotonic() + SCRAPE_TIMEOUT
            while True:
                assert prom.poll() is None, _prometheus_failed(tmp_path, "exited")
                try:
                    seen = {expr: _query(api_port, expr) for expr in expected}
                    reads = _query(api_port, "sum(fastnet_frames_per_read_count)")
                except OSError:  # not listening yet
                    seen, reads = {}, None
                if seen == expected and reads is not None:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        _prometheus_failed(tmp_path, f"values {seen}, expected {expected}")
                    )
                time.sleep(0.25)
            # Each connection's frames came in at least one read, at most one each.
            assert connections <= reads <= connections * frames_each
        finally:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(10)
            log.close()
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err


def _prometheus_failed(tmp_path: Path, what: str) -> str:
    log = (tmp_path / "prometheus.log").read_text(errors="replace")
    return f"prometheus: {what}\n--- its log (tail) ---\n{log[-3000:]}"
