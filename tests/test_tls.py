"""TLS: real clients, every bad input, the session a handler sees, drain and reload.

In-process tests run on both codec backends and both event loops (``arun``).
Each abuse test opens a healthy TLS connection first (the *witness*) and
checks after the abuse that it still echoes: one bad peer must cost only its
own connection. Failed handshakes are checked three ways: the server's
counter, the one DEBUG line naming the peer's address, and what the client
saw.

Process tests run ``python -m fastnet serve`` with ``--tls-*`` and talk to it
with Debian's ``openssl s_client`` (a client that is not Python's ssl module)
or with blocking ``ssl`` sockets. Certificates come from ``trustme``, made
once per session (tls_support.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_server_support import (
    START_TIMEOUT,
    Runner,
    ServerProcess,
    frame_bytes,
    read_frames,
    roundtrip,
    server_process,
    serving,
    wait_until,
)
from tls_support import CLIENT_NAME, TLSCerts, make_certs, tls_connect

import fastnet
from fastnet import ConnectionBrokenError
from fastnet.apps import echo, echo_task
from fastnet.runner import run_coroutine
from fastnet.tls import TLSConfigError, TLSFiles, client_context, server_context

# The loop/backend fixtures (arun, loop_name) live there.
pytest_plugins = ["test_server_support"]

ALPN = ("fastnet/1",)
# Client-side bound on a handshake, far above what one takes on loopback.
CLIENT_HANDSHAKE_TIMEOUT = 5.0
# Bound on any single read the tests wait for.
READ_TIMEOUT = 5.0

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(
    OPENSSL is None, reason="openssl (the command) is not installed: apt-get install openssl"
)


# ------------------------------------------------------------------ helpers


async def open_raw(port: int | None) -> tuple[socket.socket, int]:
    """A connected non-blocking TCP socket to 127.0.0.1:``port``, and its local port."""
    assert port is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock, sock.getsockname()[1]


async def tls_over(sock: socket.socket, ctx: ssl.SSLContext) -> fastnet.Connection:
    """A client ``Connection``: a TLS handshake (for ``localhost``) over a connected ``sock``."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await loop.create_connection(
            lambda: fastnet.Connection(fastnet.LengthPrefixed()),
            sock=sock,
            ssl=ctx,
            server_hostname="localhost",
            ssl_handshake_timeout=CLIENT_HANDSHAKE_TIMEOUT,
        )
    except BaseException:
        sock.close()
        raise
    return conn


async def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends on a raw socket until it closes it (EOF or reset)."""
    loop = asyncio.get_running_loop()
    received = b""
    for _ in range(1000):
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    raise AssertionError("the server kept sending")


# Frames the witness (below) sends: one before the abuse, two after it.
WITNESS_FRAMES = 3


@contextlib.asynccontextmanager
async def witnessed(server: fastnet.Server, ctx: ssl.SSLContext) -> AsyncIterator[None]:
    """A healthy TLS connection, open before the body runs and checked after it."""
    witness = await tls_connect(server.port, ctx, ssl_handshake_timeout=CLIENT_HANDSHAKE_TIMEOUT)
    try:
        assert await roundtrip(witness, [b"before"]) == [b"before"]
        yield
        after = [b"after", bytes(range(256)) * 400]
        assert await roundtrip(witness, after) == after
    finally:
        witness.close()
    await asyncio.wait_for(witness.wait_closed(), READ_TIMEOUT)


async def rejected(port: int | None, ctx: ssl.SSLContext) -> tuple[int, BaseException]:
    """Connect with ``ctx`` expecting the server to refuse; the local port and the error.

    With TLS 1.3 the client finishes its side of the handshake before the
    server has checked the client's certificate, so the refusal may show only
    at the first read: either is accepted, a reply is not.
    """
    sock, local_port = await open_raw(port)
    try:
        conn = await tls_over(sock, ctx)
    except (ssl.SSLError, OSError) as exc:
        return local_port, exc
    try:
        conn.send(b"are you there?")
        with pytest.raises(ConnectionBrokenError) as info:
            await asyncio.wait_for(conn.recv(), READ_TIMEOUT)
    finally:
        conn.abort()
    return local_port, info.value


def tls_log_lines(caplog: pytest.LogCaptureFixture, port: int) -> list[str]:
    """The DEBUG lines of logger "fastnet" about a TLS handshake with 127.0.0.1:``port``."""
    prefix = f"TLS handshake with 127.0.0.1:{port} "
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastnet" and r.levelno == logging.DEBUG and r.getMessage().startswith(prefix)
    ]


def assert_one_failure_logged(caplog: pytest.LogCaptureFixture, port: int) -> str:
    lines = tls_log_lines(caplog, port)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"TLS handshake with 127.0.0.1:{port} failed: "), lines
    return lines[0]


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    """The session's certificates, made by trustme (see tls_support.py)."""
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog, recording logger "fastnet" from DEBUG up."""
    caplog.set_level(logging.DEBUG, logger="fastnet")
    return caplog


# ---------------------------------------------------------- every bad input


def test_a_plain_frame_sent_to_a_tls_port_is_a_handshake_error(
    arun: Runner[Any], tls_certs: TLSCerts, debug_log: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[int, bytes, dict[str, int]]:
        # A handshake timeout that a stalled handshake would hit: the test
        # must see an error, not a wait.
        ssl_ctx = tls_certs.server_context()
        async with serving(echo, ssl=ssl_ctx, tls_handshake_timeout=3.0) as server:
            async with witnessed(server, tls_certs.client_context()):
                sock, port = await open_raw(server.port)
                with sock:
                    await asyncio.get_running_loop().sock_sendall(sock, frame_bytes(b"hello"))
                    received = await read_until_closed(sock)
                await wait_until(lambda: server.stats()["tls_handshake_errors"] == 1)
            return port, received, server.stats()

    port, received, stats = arun(scenario())
    assert b"hello" not in received
    assert stats["tls_handshake_errors"] == 1
    assert stats["tls_handshake_timeouts"] == 0
    assert stats["tls_handshakes"] == 1  # the witness
    assert stats["frames_in"] == WITNESS_FRAMES  # nothing from the plain client
    # OpenSSL's reason: the bytes are no TLS record.
    assert assert_one_failure_logged(debug_log, port).endswith("failed: wrong version number")


def test_tls_sent_to_a_plain_port_is_a_framing_error(
    arun: Runner[Any], tls_certs: TLSCerts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastnet")

    async def scenario() -> tuple[int, BaseException, dict[str, int]]:
        async with serving(echo) as server:
            # The witness is plain TCP here: the server speaks no TLS.
            witness = await fastnet.connect("127.0.0.1", server.port)
            assert await roundtrip(witness, [b"before"]) == [b"before"]
            sock, port = await open_raw(server.port)
            with pytest.raises((ssl.SSLError, OSError)) as info:
                await tls_over(sock, tls_certs.client_context())
            await wait_until(lambda: server.stats()["frame_errors"] == 1)
            assert await roundtrip(witness, [b"after"]) == [b"after"]
            witness.close()
            await asyncio.wait_for(witness.wait_closed(), READ_TIMEOUT)
            return port, info.value, server.stats()

    port, _, stats = arun(scenario())
    assert stats["frame_errors"] == 1
    assert stats["tls_handshakes"] == stats["tls_handshake_errors"] == 0
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"framing error from 127.0.0.1:{port}:")
    ]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


def test_garbage_instead_of_a_client_hello_is_a_handshake_error(
    arun: Runner[Any], tls_certs: TLSCerts, debug_log: pytest.LogCaptureFixture
) -> None:
    garbage = random.Random(9).randbytes(2048)

    async def scenario() -> tuple[int, dict[str, int]]:
        ssl_ctx = tls_certs.server_context()
        async with serving(echo, ssl=ssl_ctx, tls_handshake_timeout=3.0) as server:
            async with witnessed(server, tls_certs.client_context()):
                sock, port = await open_raw(server.port)
                with sock:
                    await asyncio.get_running_loop().sock_sendall(sock, garbage)
                    await read_until_closed(sock)
                await wait_until(lambda: server.stats()["tls_handshake_errors"] == 1)
            return port, server.stats()

    port, stats = arun(scenario())
    assert stats["tls_handshake_errors"] == 1
    assert stats["tls_handshake_timeouts"] == 0
    assert_one_failure_logged(debug_log, port)


def test_a_silent_client_times_out_and_frees_its_slot(
    arun: Runner[Any], tls_certs: TLSCerts, debug_log: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[int, dict[str, int], dict[str, int]]:
        ssl_ctx = tls_certs.server_context()
        client_ctx = tls_certs.client_context()
        async with serving(
            echo, ssl=ssl_ctx, tls_handshake_timeout=0.3, max_connections=2
        ) as server:
            async with witnessed(server, client_ctx):
                silent, port = await open_raw(server.port)
                with silent:
                    # Both slots are taken: the witness's and the silent one's.
                    await wait_until(lambda: server.stats()["accepted"] == 2)
                    # This client waits in the accept queue until the silent
                    # one's handshake times out and its slot is freed.
                    late = await tls_connect(
                        server.port, client_ctx, ssl_handshake_timeout=CLIENT_HANDSHAKE_TIMEOUT
                    )
                    at_late_handshake = server.stats()
                    async with late:
                        assert await roundtrip(late, [b"late"]) == [b"late"]
                    # The server closed the silent connection.
                    assert await read_until_closed(silent) == b""
            return port, at_late_handshake, server.stats()

    port, at_late_handshake, stats = arun(scenario())
    assert at_late_handshake["tls_handshake_timeouts"] == 1
    assert stats["tls_handshake_timeouts"] == 1
    assert stats["tls_handshake_errors"] == 0
    assert stats["tls_handshakes"] == 2  # the witness and the late client
    assert tls_log_lines(debug_log, port) == [
        f"TLS handshake with 127.0.0.1:{port} timed out after 0.3 s"
    ]


async def handshake_then_go_silent(port: int | None, ctx: ssl.SSLContext) -> socket.socket:
    """A TLS client (memory BIOs) that completes its handshake, then neither reads nor writes.

    It will never answer the server's close_notify: only the socket's own
    buffers take it.
    """
    loop = asyncio.get_running_loop()
    sock, _ = await open_raw(port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        for _ in range(20):  # a handshake takes two or three flights
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    await loop.sock_sendall(sock, outgoing.read())
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT)
                assert data, "the server closed during the handshake"
                incoming.write(data)
        else:
            raise AssertionError("the handshake did not complete")
        if outgoing.pending:
            await loop.sock_sendall(sock, outgoing.read())
    except BaseException:
        sock.close()
        raise
    return sock


def test_a_silent_tls_client_is_closed_by_the_idle_timeout_and_frees_its_slot(
    arun: Runner[Any], tls_certs: TLSCerts
) -> None:
    async def scenario() -> dict[str, int]:
        ssl_ctx = tls_certs.server_context()
        client_ctx = tls_certs.client_context()
        options: dict[str, Any] = {"idle_timeout": 0.3, "tls_shutdown_timeout": 0.5}
        async with serving(echo, ssl=ssl_ctx, max_connections=1, **options) as server:
            silent = await handshake_then_go_silent(server.port, client_ctx)
            with silent:
                await wait_until(lambda: server.stats()["tls_handshakes"] == 1)
                # The only slot is taken: this client is served once the
                # silent one has been closed (idle, then no close_notify back).
                async with await tls_connect(
                    server.port, client_ctx, ssl_handshake_timeout=CLIENT_HANDSHAKE_TIMEOUT
                ) as late:
                    assert await roundtrip(late, [b"late"]) == [b"late"]
            await wait_until(lambda: server.stats()["active"] == 0)
            return server.stats()

    stats = arun(scenario())
    assert stats["idle_timeouts"] == 1
    assert stats["tls_handshakes"] == 2
    assert stats["accepted"] == stats["closed"] == 2


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param(False, id="plain"),
        pytest.param(True, id="tls"),
    ],
)
def test_a_client_that_sent_nothing_does_not_hold_up_shutdown(
    arun: Runner[Any], tls_certs: TLSCerts, caplog: pytest.LogCaptureFixture, tls: bool
) -> None:
    # A connected client that has sent nothing has no request in flight:
    # shutdown closes it at once, as it does a plain idle connection, and
    # does not wait for it until the drain timeout.
    caplog.set_level(logging.INFO, logger="fastnet")
    options: dict[str, Any] = {"drain_timeout": 1.0}
    if tls:
        options.update(ssl=tls_certs.server_context(), tls_handshake_timeout=10.0)

    async def scenario() -> bytes:
        server = fastnet.Server(echo, "127.0.0.1", 0, **options)
        await server.start()
        try:
            silent, _ = await open_raw(server.port)
            with silent:
                await wait_until(lambda: server.stats()["accepted"] == 1)
                await server.shutdown()
                return await read_until_closed(silent)
        finally:
            await server.shutdown()

    assert arun(scenario()) == b""
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


def test_an_expired_server_certificate_fails_the_clients_verification(
    arun: Runner[Any], tls_certs: TLSCerts, debug_log: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[int, BaseException, dict[str, int]]:
        ssl_ctx = server_context(tls_certs.expired_server_cert, tls_certs.expired_server_key)
        async with serving(echo, ssl=ssl_ctx) as server:
            # No verifying client can be healthy here: the witness skips verification.
            async with witnessed(server, client_context(verify=False)):
                sock, port = await open_raw(server.port)
                with pytest.raises(ssl.SSLCertVerificationError) as info:
                    await tls_over(sock, tls_certs.client_context())
                await wait_until(lambda: server.stats()["tls_handshake_errors"] == 1)
            return port, info.value, server.stats()

    port, error, stats = arun(scenario())
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert "expired" in error.verify_message
    assert stats["tls_handshake_errors"] == 1
    assert stats["tls_handshakes"] == 1  # the witness
    assert_one_failure_logged(debug_log, port)


@pytest.mark.parametrize(
    ("client_cert", "reason"),
    [
        pytest.param("expired_client", "certificate has expired", id="expired"),
        pytest.param("wrong_client", "unable to get local issuer certificate", id="wrong-ca"),
        pytest.param(None, "peer did not return a certificate", id="missing"),
    ],
)
def test_mtls_refuses_a_bad_client_certificate(
    arun: Runner[Any],
    tls_certs: TLSCerts,
    debug_log: pytest.LogCaptureFixture,
    client_cert: str | None,
    reason: str,
) -> None:
    cert = None if client_cert is None else getattr(tls_certs, client_cert)

    async def scenario() -> tuple[int, BaseException, dict[str, int]]:
        ssl_ctx = tls_certs.server_context(mtls=True)
        async with serving(echo, ssl=ssl_ctx) as server:
            async with witnessed(server, tls_certs.client_context(cert=tls_certs.client)):
                port, error = await rejected(server.port, tls_certs.client_context(cert=cert))
                await wait_until(lambda: server.stats()["tls_handshake_errors"] == 1)
            return port, error, server.stats()

    port, _, stats = arun(scenario())
    assert stats["tls_handshake_errors"] == 1
    assert stats["tls_handshakes"] == 1  # the witness
    assert stats["frames_in"] == WITNESS_FRAMES  # nothing from the refused client
    assert reason in assert_one_failure_logged(debug_log, port)


# ------------------------------------------------------------ bad files


@pytest.mark.parametrize("which", ["cert", "key", "ca", "missing-cert"])
def test_a_bad_file_at_start_up_is_one_line_naming_it(tls_certs: TLSCerts, which: str) -> None:
    cert, key, ca = tls_certs.server_cert, tls_certs.server_key, tls_certs.ca
    bad = tls_certs.not_a_cert
    if which == "cert":
        cert = bad
    elif which == "key":
        key = bad
    elif which == "ca":
        ca = bad
    else:
        cert = bad = tls_certs.dir / "no-such-file.pem"
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
    result = subprocess.run(
        [sys.executable, "-m", "fastnet", "serve", "echo", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastnet: "), lines
    assert str(bad) in lines[0]
    if which == "cert":
        assert lines[0] == f"fastnet: certificate file {bad}: no PEM certificate in it"


def test_reload_tls_keeps_the_old_certificate_when_the_new_file_is_bad(
    arun: Runner[Any], tls_certs: TLSCerts, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="fastnet")
    cert, key = tls_certs.copy_server_files(tmp_path)
    client_ctx = tls_certs.client_context()

    async def served_serial(port: int | None) -> str:
        async with await tls_connect(port, client_ctx) as conn:
            assert await roundtrip(conn, [b"x"]) == [b"x"]
            info = conn.tls
            assert info is not None and info.peer_cert is not None
            return str(info.peer_cert["serialNumber"])

    async def scenario() -> tuple[list[str], list[bool]]:
        serials: list[str] = []
        outcomes: list[bool] = []
        async with (
            serving(echo, ssl=TLSFiles(str(cert), str(key))) as server,
            witnessed(server, client_ctx),
        ):
            serials.append(await served_serial(server.port))
            shutil.copyfile(tls_certs.not_a_cert, cert)
            outcomes.append(server.reload_tls())
            serials.append(await served_serial(server.port))
            # Renewed files: the next handshake gets the new certificate.
            shutil.copyfile(tls_certs.server2_cert, cert)
            shutil.copyfile(tls_certs.server2_key, key)
            outcomes.append(server.reload_tls())
            serials.append(await served_serial(server.port))
        return serials, outcomes

    serials, outcomes = arun(scenario())
    assert outcomes == [False, True]
    old, new = tls_certs.server_serial, tls_certs.server2_serial
    assert serials == [old, old, new]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "TLS reload failed, the old certificate stays in use: "
        f"certificate file {cert}: no PEM certificate in it"
    ]


def test_reload_tls_arguments(tls_certs: TLSCerts) -> None:
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        fastnet.Server(echo, ssl=TLSFiles(str(tls_certs.not_a_cert), str(tls_certs.server_key)))
    with pytest.raises(RuntimeError, match="does not serve TLS"):
        fastnet.Server(echo).reload_tls()
    server = fastnet.Server(echo, ssl=tls_certs.server_context())
    with pytest.raises(RuntimeError, match="pass a context"):
        server.reload_tls()
    with pytest.raises(TypeError):
        server.reload_tls("not a context")  # type: ignore[arg-type]
    renewed = server_context(tls_certs.server2_cert, tls_certs.server2_key)
    assert server.reload_tls(renewed) is True
    assert server.ssl is renewed


# ------------------------------------------------------------- conn.tls


def _describe_tls(conn: fastnet.Connection) -> bytes:
    info = conn.tls
    if info is None:
        return f"no TLS, strategy {conn.strategy}".encode()
    peer = info.peer_cert or {}
    subject = {k: v for rdn in peer.get("subject", ()) for k, v in rdn}
    return json.dumps(
        {
            "version": info.version,
            "cipher": info.cipher,
            "alpn": info.alpn_protocol,
            "peer_cn": subject.get("commonName"),
            "peer_serial": peer.get("serialNumber"),
            "peer_der": None if info.peer_cert_der is None else info.peer_cert_der.hex(),
            "strategy": conn.strategy,
        }
    ).encode()


async def describe_tls(conn: fastnet.Connection) -> None:
    """Answer every frame with what ``conn.tls`` says, in JSON."""
    async for _ in conn:
        conn.send(_describe_tls(conn))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_conn_tls_describes_the_session_on_both_sides(
    arun: Runner[Any], tls_certs: TLSCerts, version: ssl.TLSVersion
) -> None:
    client_ctx = tls_certs.client_context(cert=tls_certs.client, alpn=ALPN)
    client_ctx.maximum_version = version

    async def scenario() -> tuple[dict[str, Any], fastnet.tls.TLSInfo | None]:
        ssl_ctx = tls_certs.server_context(mtls=True, alpn=ALPN)
        async with (
            serving(describe_tls, ssl=ssl_ctx) as server,
            await tls_connect(server.port, client_ctx) as conn,
        ):
            (reply,) = await roundtrip(conn, [b"?"])
            return json.loads(reply), conn.tls

    seen_by_server, seen_by_client = arun(scenario())
    name = "TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
    assert seen_by_client is not None
    assert seen_by_server["version"] == seen_by_client.version == name
    assert seen_by_server["cipher"] and seen_by_server["cipher"] == seen_by_client.cipher
    assert seen_by_server["alpn"] == seen_by_client.alpn_protocol == "fastnet/1"
    # The transport strategy for TLS (joined writes, no fast path of the raw socket).
    assert seen_by_server["strategy"] == "tls"
    # The client's certificate, as the server sees it.
    assert seen_by_server["peer_cn"] == CLIENT_NAME
    assert seen_by_server["peer_serial"] == tls_certs.client_serial
    client_pem = tls_certs.client.read_text()
    cert_pem = client_pem[client_pem.index("-----BEGIN CERTIFICATE-----") :]
    assert bytes.fromhex(seen_by_server["peer_der"]) == ssl.PEM_cert_to_DER_cert(cert_pem)
    # The server's certificate, as the client sees it.
    assert seen_by_client.peer_cert is not None
    assert seen_by_client.peer_cert["serialNumber"] == tls_certs.server_serial


def test_conn_tls_without_alpn_or_client_certificate(
    arun: Runner[Any], tls_certs: TLSCerts
) -> None:
    async def scenario() -> dict[str, Any]:
        ssl_ctx = tls_certs.server_context(alpn=ALPN)
        async with (
            serving(describe_tls, ssl=ssl_ctx) as server,
            await tls_connect(server.port, tls_certs.client_context()) as conn,
        ):
            (reply,) = await roundtrip(conn, [b"?"])
            return dict(json.loads(reply))

    seen = arun(scenario())
    assert seen["alpn"] is None
    assert seen["peer_cn"] is seen["peer_serial"] is seen["peer_der"] is None
    assert seen["version"] == "TLSv1.3"


def test_conn_tls_is_none_on_plain_tcp(arun: Runner[Any]) -> None:
    async def scenario() -> tuple[bytes, object]:
        async with (
            serving(describe_tls) as server,
            await fastnet.connect("127.0.0.1", server.port) as conn,
        ):
            (reply,) = await roundtrip(conn, [b"?"])
            return reply, conn.tls

    reply, client_side = arun(scenario())
    assert reply.startswith(b"no TLS, strategy ")
    assert reply != b"no TLS, strategy tls"
    assert client_side is None


# ------------------------------------------------------------- integrity


@pytest.mark.parametrize("handler", [echo, echo_task], ids=["callback", "task"])
def test_frames_of_several_sizes_echo_intact_over_tls(
    arun: Runner[Any], tls_certs: TLSCerts, handler: Any
) -> None:
    rng = random.Random(5)
    payloads = [rng.randbytes(size) for size in (1, 64 * 1024, 3 * 1024 * 1024, 0, 7)]

    async def scenario() -> tuple[list[bytes], list[bytes], dict[str, int]]:
        async with serving(handler, ssl=tls_certs.server_context()) as server:
            async with await tls_connect(server.port, tls_certs.client_context()) as conn:
                one_by_one = [(await roundtrip(conn, [p]))[0] for p in payloads]
                pipelined = await roundtrip(conn, payloads)
            await wait_until(lambda: server.stats()["active"] == 0)
            return one_by_one, pipelined, server.stats()

    one_by_one, pipelined, stats = arun(scenario())
    for got in (one_by_one, pipelined):
        assert [len(g) for g in got] == [len(p) for p in payloads]
        assert got == payloads
    assert stats["frames_in"] == stats["frames_out"] == 2 * len(payloads)
    assert stats["tls_handshakes"] == 1


# ------------------------------------------------- openssl s_client, a real client


def tls_serve_args(certs: TLSCerts, *extra: str) -> list[str]:
    return [
        "echo",
        "--framing",
        "lines",
        "--port",
        "0",
        "--log-level",
        "debug",
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        *extra,
    ]


def s_client(
    port: int, certs: TLSCerts, *args: str, line: bytes = b"hello fastnet\n"
) -> tuple[bytes, str]:
    """Run ``openssl s_client``, send ``line``, and return (its stdout, its stderr).

    Its stdin stays open until the echo of ``line`` has been read (or the
    server closed): at EOF on stdin s_client sends close_notify, and a TLS
    connection cannot be half-closed.
    """
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief"]
    command += ["-CAfile", str(certs.ca), "-verify_return_error", *args]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = b""
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(line)
            proc.stdin.flush()
        deadline = time.monotonic() + READ_TIMEOUT
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while line not in out:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                data = os.read(fd, 65536)
                if not data:
                    break
                out += data
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        # s_client writes little to stderr (a pipe holds 64 KiB): waiting
        # for its exit before reading cannot block it.
        proc.wait(timeout=READ_TIMEOUT)
        out += proc.stdout.read()
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=READ_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
    return out, err.decode(errors="replace")


def stop_server(server: ServerProcess) -> str:
    """SIGTERM the server; check it exits 0 and return its stderr (the log)."""
    server.signal(signal.SIGTERM)
    status, _, err = server.wait(10)
    assert status == 0, err
    assert "Traceback" not in err
    return err


def handshake_failures(log: str) -> list[str]:
    return [line for line in log.splitlines() if "TLS handshake with 127.0.0.1:" in line]


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_echoes_a_line(tls_certs: TLSCerts, version: str) -> None:
    with server_process(tls_serve_args(tls_certs)) as server:
        out, err = s_client(server.port, tls_certs, version, "-verify_hostname", "localhost")
        log = stop_server(server)
    assert out == b"hello fastnet\n", err
    assert "Verification: OK" in err
    assert f"Protocol version: TLSv1.{version[-1]}" in err
    assert handshake_failures(log) == []


@needs_openssl
def test_openssl_s_client_with_a_client_certificate_under_mtls(tls_certs: TLSCerts) -> None:
    args = tls_serve_args(tls_certs, "--tls-ca", str(tls_certs.ca))
    with server_process(args) as server:
        out, err = s_client(server.port, tls_certs, "-cert", str(tls_certs.client))
        log = stop_server(server)
    assert out == b"hello fastnet\n", err
    assert handshake_failures(log) == []


@needs_openssl
def test_openssl_s_client_without_a_client_certificate_is_refused_under_mtls(
    tls_certs: TLSCerts,
) -> None:
    args = tls_serve_args(tls_certs, "--tls-ca", str(tls_certs.ca))
    with server_process(args) as server:
        out, err = s_client(server.port, tls_certs)
        log = stop_server(server)
    assert b"hello" not in out, err
    (failure,) = handshake_failures(log)
    assert "failed: peer did not return a certificate" in failure


@needs_openssl
def test_openssl_s_client_tls_1_1_is_refused_by_the_server(tls_certs: TLSCerts) -> None:
    # SECLEVEL=0 lets OpenSSL 3 offer TLS 1.1 at all: the ClientHello goes
    # out, and the refusal seen is the server's (its log names the reason).
    with server_process(tls_serve_args(tls_certs)) as server:
        out, err = s_client(server.port, tls_certs, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        log = stop_server(server)
    assert b"hello" not in out
    assert "CONNECTION ESTABLISHED" not in err
    (failure,) = handshake_failures(log)
    assert "failed: unsupported protocol" in failure


# ------------------------------------------------------------ drain, reload

SLOW_APP = textwrap.dedent(
    """
    import asyncio

    async def slow(conn):
        async for frame in conn:
            conn.send(b"working on " + frame)
            await asyncio.sleep(0.5)
            conn.send(b"done " + frame)
    """
)


def blocking_tls(port: int, certs: TLSCerts) -> ssl.SSLSocket:
    """A blocking TLS client socket (with a read timeout); a missing close_notify raises."""
    ctx = certs.client_context()
    raw = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
    return ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_graceful_drain_over_tls(tls_certs: TLSCerts, tmp_path: Path, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    args = ["slowapp:slow", "--port", "0", "--loop", loop]
    args += ["--tls-cert", str(tls_certs.server_cert), "--tls-key", str(tls_certs.server_key)]
    with server_process(args, cwd=tmp_path) as server:
        client = blocking_tls(server.port, tls_certs)
        with client:
            client.sendall(frame_bytes(b"job"))
            assert read_frames(client, 1) == [b"working on job"]
            server.signal(signal.SIGTERM)
            assert read_frames(client, 1) == [b"done job"]
            # Then an orderly end: close_notify (a bare TCP close would
            # raise SSLEOFError here, suppress_ragged_eofs being off).
            assert client.recv(100) == b""
        status, _, err = server.wait(10)
    assert status == 0, err
    assert "Traceback" not in err


class StderrReader:
    """Reads a server subprocess's stderr (the log) as it comes, without blocking."""

    def __init__(self, server: ServerProcess) -> None:
        assert server.proc.stderr is not None
        self.fd = server.proc.stderr.fileno()
        self.text = ""

    def wait_for(self, needle: str, timeout: float = READ_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while needle not in self.text:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"{needle!r} not logged; the log so far:\n{self.text}")
                data = os.read(self.fd, 65536)
                if not data:
                    raise AssertionError(f"the server exited; its log:\n{self.text}")
                self.text += data.decode(errors="replace")


def established_to(port: int) -> int:
    """How many TCP connections to local ``port`` are established (Linux's /proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "01":
                count += 1
    return count


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="counts connections in /proc")
def test_sighup_reloads_the_certificate_under_load(tls_certs: TLSCerts, tmp_path: Path) -> None:
    cert, key = tls_certs.copy_server_files(tmp_path)
    old, new = tls_certs.server_serial, tls_certs.server2_serial
    client_ctx = tls_certs.client_context()
    connections = 8

    async def served_serial(port: int | None) -> str:
        async with await tls_connect(port, client_ctx) as conn:
            assert await roundtrip(conn, [b"probe"]) == [b"probe"]
            assert conn.tls is not None and conn.tls.peer_cert is not None
            return str(conn.tls.peer_cert["serialNumber"])

    async def reloads(server: ServerProcess, log: StderrReader, bench: Any) -> list[str]:
        # The bench's connections and one of ours are made before the reloads.
        port = server.port
        await wait_until(lambda: established_to(port) >= connections, 10, "the bench to connect")
        async with await tls_connect(port, client_ctx) as before:
            assert await roundtrip(before, [b"before"]) == [b"before"]
            serials = [await served_serial(port)]
            # A bad file first: the old certificate stays in use.
            shutil.copyfile(tls_certs.not_a_cert, cert)
            server.signal(signal.SIGHUP)
            await asyncio.to_thread(log.wait_for, "TLS reload failed")
            serials.append(await served_serial(port))
            # Then the renewed files: new handshakes get the new certificate.
            shutil.copyfile(tls_certs.server2_cert, cert)
            shutil.copyfile(tls_certs.server2_key, key)
            server.signal(signal.SIGHUP)
            await asyncio.to_thread(log.wait_for, "TLS reloaded")
            serials.append(await served_serial(port))
            # The connection made before the reload keeps working, on the old one.
            assert await roundtrip(before, [b"after"]) == [b"after"]
            assert before.tls is not None and before.tls.peer_cert is not None
            serials.append(str(before.tls.peer_cert["serialNumber"]))
        # All of it happened under load (else the test proves less than it says).
        assert bench.poll() is None, "the bench ended before the reloads were done"
        return serials

    args = ["echo", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)]
    with server_process(args) as server:
        log = StderrReader(server)
        bench_command = [sys.executable, "-m", "fastnet", "bench", "--port", str(server.port)]
        bench_command += ["--tls", "--tls-ca", str(tls_certs.ca), "--tls-server-name", "localhost"]
        bench_command += ["--connections", str(connections), "--depth", "4", "--size", "2K"]
        bench_command += ["--warmup", "0.2", "--duration", "3", "--loop", "asyncio", "--json"]
        bench = subprocess.Popen(
            bench_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            serials = run_coroutine(reloads(server, log, bench), loop="asyncio")
            bench_out, bench_err = bench.communicate(timeout=30)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.communicate(timeout=READ_TIMEOUT)
        server.signal(signal.SIGTERM)
        status, _, rest = server.wait(10)
    assert serials == [old, old, new, old]
    assert bench.returncode == 0, bench_out + bench_err
    report = json.loads(bench_out)
    assert report["errors"] == 0, report["error_messages"]
    assert report["frames"] > 0
    assert status == 0, log.text + rest
    errors = [line for line in (log.text + rest).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "TLS reload failed" in errors[0], errors
    assert "Traceback" not in log.text + rest


# ------------------------------------------------------------------ memory


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (Linux's /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_two_thousand_idle_tls_connections(tls_certs: TLSCerts) -> None:
    count, batch = 2000, 100
    client_ctx = tls_certs.client_context()
    args = ["echo", "--port", "0", "--max-connections", str(count + 10)]
    args += ["--tls-cert", str(tls_certs.server_cert), "--tls-key", str(tls_certs.server_key)]

    async def hold(server: ServerProcess) -> tuple[int, int]:
        # Warm up (imports, the first handshake), then measure the RSS
        # before and after `count` connections have completed a handshake.
        async with await tls_connect(server.port, client_ctx) as conn:
            assert await roundtrip(conn, [b"warm"]) == [b"warm"]
        before = rss_kib(server.proc.pid)
        conns: list[fastnet.Connection] = []
        try:
            for _ in range(count // batch):
                conns += await asyncio.wait_for(
                    asyncio.gather(*(tls_connect(server.port, client_ctx) for _ in range(batch))),
                    60,
                )
            # Every connection was served (a handshake, then an echo).
            for conn in conns:
                conn.send(b"x")
            for conn in conns:
                assert await asyncio.wait_for(conn.recv(), READ_TIMEOUT) == b"x"
            after = rss_kib(server.proc.pid)
        finally:
            for conn in conns:
                conn.close()
            await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in conns)), 30)
        return before, after

    with server_process(args) as server:
        before, after = run_coroutine(hold(server), loop="asyncio")
        stop_server(server)
    per_connection = (after - before) * 1024 / count
    print(
        f"\nserver RSS {before} KiB -> {after} KiB: {per_connection:.0f} B per idle TLS connection"
    )
    # Not a benchmark: only a bound that a leak of buffers per connection
    # (e.g. a 1 MiB read window each) would break.
    assert per_connection < 512 * 1024


# ------------------------------------------------- found by the new-user study


def test_a_frame_cut_off_without_close_notify_is_an_incomplete_frame(
    arun: Runner[Any], tls_certs: TLSCerts
) -> None:
    """A client that sends a frame and part of another, then a TCP FIN with no
    close_notify (a killed client): a framing error (incomplete) on both loops. uvloop's
    TLS layer reports that end without eof_received; it counted as a clean close."""
    reasons: list[str] = []
    hooks = fastnet.metrics.Hooks(on_close=lambda conn, info: reasons.append(info.reason))

    def killed_client(port: int) -> bytes:
        sock = blocking_tls(port, tls_certs)
        try:
            sock.sendall(frame_bytes(b"whole") + frame_bytes(b"x" * 100)[:11])
            reply = sock.recv(100)
            socket.socket.shutdown(sock, socket.SHUT_WR)  # FIN, no close_notify
            with contextlib.suppress(OSError):
                while sock.recv(100):
                    pass
            return reply
        finally:
            sock.close()

    async def scenario() -> dict[str, int]:
        async with serving(echo, ssl=tls_certs.server_context(), hooks=hooks) as server:
            assert server.port is not None
            reply = await asyncio.get_running_loop().run_in_executor(
                None, killed_client, server.port
            )
            assert reply == frame_bytes(b"whole")
            await wait_until(lambda: server.stats()["closed"] == 1)
            return server.stats()

    stats = arun(scenario())
    assert stats["frame_errors"] == 1
    assert stats["frames_in"] == 1
    assert reasons == ["frame_error"]


def test_sighup_is_ignored_by_a_server_without_tls_files() -> None:
    """`kill -HUP` meant for a TLS server must not end a plain one (its default would)."""
    with server_process(["echo", "--port", "0", "--log-level", "info"]) as server:
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert server.proc.poll() is None, "SIGHUP ended a server without TLS"
        with socket.create_connection((server.host, server.port), timeout=READ_TIMEOUT) as sock:
            sock.sendall(frame_bytes(b"still here"))
            assert read_frames(sock, 1) == [b"still here"]
        log = stop_server(server)
    assert "SIGHUP received: nothing to reload (no TLS files); ignored" in log


@pytest.mark.parametrize("case", ["cert-without-key", "cert-as-key", "key-without-cert"])
def test_a_missing_or_wrong_key_is_named(tls_certs: TLSCerts, case: str) -> None:
    cert = str(tls_certs.server_cert)
    with pytest.raises(fastnet.tls.TLSConfigError) as info:
        if case == "cert-without-key":
            server_context(cert)
        elif case == "cert-as-key":
            server_context(cert, cert)
        else:
            client_context(key=str(tls_certs.server_key))
    message = str(info.value)
    assert "PEM lib" not in message
    assert {
        "cert-without-key": f"certificate file {cert}: no private key in it",
        "cert-as-key": f"key file {cert}: no PEM private key in it",
        "key-without-cert": "given without a certificate",
    }[case] in message
