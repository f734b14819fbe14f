"""Two fastnet instances behind one real HAProxy: one drains, no request fails (issue 11 §4).

HAProxy (Debian's ``haproxy``) balances a frontend over two ``fastnet serve
echo`` processes, speaking PROXY v2 to them and health-checking each one's
``/readyz`` (``option httpchk``, every 100 ms). While clients send requests
through HAProxy, each on a connection of its own, one instance gets SIGTERM
with ``--drain-delay``: ``/readyz`` turns 503 at once, HAProxy takes the
instance out of rotation, the instance keeps serving what it has, then
drains and exits 0. Every request sent must be answered; the other instance
takes the rest. Skipped, saying so, when the haproxy binary is missing
(.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_proxy_haproxy import HAPROXY, free_port
from test_server_support import frame_bytes, read_frames, server_process

pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="no haproxy binary (apt-get install haproxy)"),
    pytest.mark.slow,
]

TIMEOUT = 10.0  # every single wait: HAProxy starting, a reply, an exit
DRAIN_DELAY = 2.0
CLIENTS = 4


@contextlib.contextmanager
def balancer(tmp_path: Path, backends: list[tuple[int, int]]) -> Iterator[int]:
    """HAProxy on 127.0.0.1:FRONT over (framed port, metrics port) backends; yields FRONT."""
    assert HAPROXY is not None
    front = free_port()
    servers = "\n".join(
        f"    server s{i} 127.0.0.1:{port} send-proxy-v2 check port {metrics}"
        " inter 100ms fall 1 rise 2"
        for i, (port, metrics) in enumerate(backends)
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        textwrap.dedent(
            """\
            global
                maxconn 200

            defaults
                mode tcp
                timeout connect 5s
                timeout client 30s
                timeout server 30s
                timeout check 1s

            frontend fe
                bind 127.0.0.1:{front}
                default_backend be

            backend be
                balance roundrobin
                option httpchk GET /readyz
            """
        ).format(front=front)
        + servers
        + "\n"
    )
    proc = subprocess.Popen(
        [HAPROXY, "-f", str(config), "-db"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # ready once the frontend accepts
            assert proc.poll() is None, f"haproxy exited: {proc.communicate(timeout=TIMEOUT)}"
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex(("127.0.0.1", front)) == 0:
                    break
            assert time.monotonic() < deadline, "haproxy did not listen"
            time.sleep(0.02)
        yield front
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)


def request(front: int, payload: bytes) -> bytes | None:
    """One request on a connection of its own through HAProxy; the reply, or None."""
    try:
        with socket.create_connection(("127.0.0.1", front), timeout=TIMEOUT) as sock:
            sock.sendall(frame_bytes(payload))
            replies = read_frames(sock, 1)
    except OSError:
        return None
    return replies[0] if replies else None


def instance(metrics_port: int) -> list[str]:
    return [
        "echo",
        "--port",
        "0",
        "--proxy-protocol",
        "v2",
        "--trusted-proxy",
        "127.0.0.1/32",
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        "--drain-delay",
        str(DRAIN_DELAY),
        "--log-level",
        "warning",
    ]


def wait_ready(front: int, count: int) -> None:
    # Until both instances are in rotation (rise 2 x 100 ms) and answering.
    deadline = time.monotonic() + TIMEOUT
    answered = 0
    while answered < count:
        assert time.monotonic() < deadline, "the balancer did not come up"
        answered = answered + 1 if request(front, b"warm-up") == b"warm-up" else 0
        time.sleep(0.05)


def test_draining_one_instance_behind_haproxy_loses_no_request(tmp_path: Path) -> None:
    metrics = [free_port(), free_port()]
    with (
        server_process(instance(metrics[0])) as first,
        server_process(instance(metrics[1])) as second,
    ):
        backends = [(first.port, metrics[0]), (second.port, metrics[1])]
        with balancer(tmp_path, backends) as front:
            time.sleep(0.5)  # both health-checked twice (rise 2)
            wait_ready(front, 10)
            failures: list[str] = []
            sent = [0] * CLIENTS  # per client thread
            stop = threading.Event()

            def client(number: int) -> None:
                seq = 0
                while not stop.is_set() and seq < 100_000:
                    seq += 1
                    payload = b"client %d request %d" % (number, seq)
                    sent[number] += 1
                    if request(front, payload) != payload:
                        failures.append(payload.decode())

            threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
            for thread in threads:
                thread.start()
            try:
                time.sleep(1.0)
                started = time.monotonic()
                first.proc.send_signal(signal.SIGTERM)
                status = first.proc.wait(timeout=DRAIN_DELAY + TIMEOUT)
                drained_after = time.monotonic() - started
                time.sleep(1.0)  # the other instance takes everything now
            finally:
                stop.set()
                for thread in threads:
                    thread.join(TIMEOUT)
            _, err = first.proc.communicate(timeout=TIMEOUT)
    assert status == 0, err
    assert drained_after >= DRAIN_DELAY, drained_after  # it kept serving through the delay
    total = sum(sent)
    assert failures == [], f"{len(failures)} of {total} requests failed: {failures[:5]}"
    assert total > 50, f"only {total} requests ran"
