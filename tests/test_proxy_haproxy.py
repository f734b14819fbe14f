"""The PROXY protocol behind a real HAProxy (Debian's ``haproxy``, /usr/sbin/haproxy).

Each test writes a configuration on loopback ports (``mode tcp``, one
frontend, one backend server: the fastnet server under test with
``send-proxy`` or ``send-proxy-v2``), starts ``haproxy -f CFG -db`` as a
subprocess (not the Debian service), and connects through it **from
127.0.0.2** (the client's socket is bound there; Linux routes all of
127.0.0.0/8 to the loopback interface). HAProxy itself connects to fastnet
from 127.0.0.1, the only trusted proxy: the handler must report 127.0.0.2
and the client's port, not HAProxy's address. Skipped, saying so, when the
haproxy binary is missing (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server_support import Runner, frame_bytes, wait_until
from tls_support import TLSCerts, make_certs

import fastnet

pytest_plugins = ["test_server_support"]

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="no haproxy binary (Debian: apt-get install haproxy)"
)

CLIENT_ADDRESS = "127.0.0.2"
TIMEOUT = 10.0  # every wait: HAProxy starting, connecting, replying


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def haproxy(tmp_path: Path, backend_port: int, server_options: str) -> Iterator[int]:
    """HAProxy relaying 127.0.0.1:FRONT to the fastnet server; yields FRONT. Killed on exit."""
    assert HAPROXY is not None
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        textwrap.dedent(
            f"""\
            global
                maxconn 100

            defaults
                mode tcp
                timeout connect 5s
                timeout client 30s
                timeout server 30s

            frontend fe
                bind 127.0.0.1:{front}
                unique-id-format fastnet-%ci-%cp
                default_backend be

            backend be
                server s1 127.0.0.1:{backend_port} {server_options}
            """
        )
    )
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(
        [HAPROXY, "-f", str(config), "-db"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # ready once the frontend accepts
            if proc.poll() is not None:
                out, err = proc.communicate(timeout=TIMEOUT)
                raise AssertionError(f"haproxy exited ({proc.returncode}): {out!r} {err!r}")
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex(("127.0.0.1", front)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy did not listen on {front} within {TIMEOUT} s")
            time.sleep(0.02)
        yield front
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)


seen: list[fastnet.Connection] = []


async def describe(conn: fastnet.Connection) -> None:
    """Reply to each frame with what the connection knows of its client."""
    seen.append(conn)
    header = conn.proxy
    async for _ in conn:
        assert header is not None
        conn.send(
            json.dumps(
                {
                    "peer": list(conn.peer[:2]),
                    "proxy": list(header.proxy_address[:2]),
                    "version": header.version,
                    "command": header.command,
                    "crc32c": header.crc32c,
                    "unique_id": None if header.unique_id is None else header.unique_id.decode(),
                    "tls": conn.tls is not None,
                }
            ).encode()
        )


@contextlib.asynccontextmanager
async def fastnet_server(**kwargs: Any) -> AsyncIterator[fastnet.Server]:
    seen.clear()
    server = fastnet.Server(
        describe,
        "127.0.0.1",
        0,
        proxy_protocol="any",
        trusted_proxies=["127.0.0.1"],  # HAProxy; 127.0.0.2 (the client) is not trusted
        drain_timeout=5.0,
        **kwargs,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


async def ask(front: int, count: int = 2, **tls: Any) -> tuple[list[dict[str, Any]], int]:
    """Connect through HAProxy from 127.0.0.2; send `count` frames; the replies and our port."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", front, local_addr=(CLIENT_ADDRESS, 0), **tls),
        TIMEOUT,
    )
    try:
        port = int(writer.get_extra_info("sockname")[1])
        assert writer.get_extra_info("sockname")[0] == CLIENT_ADDRESS
        writer.write(b"".join(frame_bytes(b"%d" % i) for i in range(count)))
        decoder = fastnet.LengthPrefixed().decoder()
        frames: list[bytes] = []
        while len(frames) < count:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            assert data, f"closed after {len(frames)} replies"
            frames += decoder.feed(data)
        return [json.loads(f) for f in frames], port
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


@pytest.mark.parametrize(
    ("options", "version"),
    [
        ("send-proxy", 1),
        ("send-proxy-v2", 2),
        ("send-proxy-v2 proxy-v2-options crc32c,unique-id", 2),
    ],
    ids=["send-proxy", "send-proxy-v2", "send-proxy-v2-crc32c-unique-id"],
)
def test_handler_sees_the_client_not_haproxy(
    arun: Runner[Any], tmp_path: Path, options: str, version: int
) -> None:
    async def scenario() -> None:
        async with fastnet_server() as server:
            assert server.port is not None
            with haproxy(tmp_path, server.port, options) as front:
                replies, port = await ask(front)
                for reply in replies:
                    assert reply["peer"] == [CLIENT_ADDRESS, port]
                    assert reply["proxy"][0] == "127.0.0.1"
                    assert reply["version"] == version
                    assert reply["command"] == "PROXY"
                if "crc32c" in options:
                    assert isinstance(replies[0]["crc32c"], int)  # verified by the parser
                    assert replies[0]["unique_id"] == f"fastnet-{CLIENT_ADDRESS}-{port}"
            stats = server.stats()
            assert stats["proxy_header_errors"] == 0
            assert stats["proxy_untrusted"] == 0

    arun(scenario())


def test_haproxy_health_checks_send_local(arun: Runner[Any], tmp_path: Path) -> None:
    # HAProxy's health checks of a send-proxy-v2 server send the header too,
    # with the LOCAL command; they are neither errors nor proxied clients.
    async def scenario() -> None:
        async with fastnet_server() as server:
            assert server.port is not None
            with haproxy(tmp_path, server.port, "send-proxy-v2 check inter 100ms"):
                await wait_until(
                    lambda: any(c.proxy and c.proxy.command == "LOCAL" for c in seen),
                    timeout=TIMEOUT,
                    what="a LOCAL health check",
                )
                local = next(c for c in seen if c.proxy and c.proxy.command == "LOCAL")
                assert local.proxy is not None
                assert local.peer == local.proxy.proxy_address  # the socket's own peer
            assert server.stats()["proxy_header_errors"] == 0

    arun(scenario())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    return make_certs(tmp_path_factory.mktemp("haproxy-tls"))


def test_tls_through_haproxy(arun: Runner[Any], tmp_path: Path, certs: TLSCerts) -> None:
    # HAProxy relays the client's TLS bytes (mode tcp) after its PROXY header:
    # fastnet reads the header, then does the TLS handshake with the client.
    async def scenario() -> None:
        async with fastnet_server(ssl=certs.server_context()) as server:
            assert server.port is not None
            with haproxy(tmp_path, server.port, "send-proxy-v2") as front:
                replies, port = await ask(
                    front, ssl=certs.client_context(), server_hostname="localhost"
                )
                assert replies[0]["peer"] == [CLIENT_ADDRESS, port]
                assert replies[0]["tls"] is True
            stats = server.stats()
            assert stats["tls_handshakes"] >= 1
            assert stats["proxy_header_errors"] == 0

    arun(scenario())


def test_direct_connection_from_an_untrusted_address_is_closed(arun: Runner[Any]) -> None:
    # The same client, straight to fastnet (no HAProxy): 127.0.0.2 is not a
    # trusted proxy, so its PROXY header claiming any address is never read.
    async def scenario() -> None:
        async with fastnet_server() as server:
            assert server.port is not None
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", server.port, local_addr=(CLIENT_ADDRESS, 0)),
                TIMEOUT,
            )
            writer.write(b"PROXY TCP4 10.9.9.9 127.0.0.1 1 2\r\n" + frame_bytes(b"x"))
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(100), TIMEOUT) == b""
            writer.close()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
            await wait_until(lambda: server.stats()["proxy_untrusted"] == 1, what="refused")
            assert seen == []

    arun(scenario())
