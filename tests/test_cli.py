"""The ``fastnet`` command: real processes for serve/info, in-process for parsing."""

from __future__ import annotations

import argparse
import errno
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_server_support import (
    START_TIMEOUT,
    ServerProcess,
    blocking_roundtrip,
    process_env,
    read_frames,
    server_process,
)

import fastnet
from fastnet import cli
from fastnet.apps import echo


def _fastnet(*args: str, backend: str = "c", timeout: float = START_TIMEOUT) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "fastnet", *args],
        capture_output=True,
        text=True,
        env=process_env(backend),
        timeout=timeout,
    )


def test_info_reports_version_backend_and_loops() -> None:
    result = _fastnet("info", backend="c" if fastnet.ACCELERATED else "py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"fastnet {fastnet.__version__}"
    extension = next(line for line in lines if line.startswith("extension: "))
    assert extension.startswith("extension: active") is fastnet.ACCELERATED
    loops = next(line for line in lines if line.startswith("loops: "))
    assert "asyncio" in loops


def test_info_names_the_pure_python_backend() -> None:
    result = _fastnet("info", backend="py")
    assert result.returncode == 0
    assert "extension: inactive, FASTNET_NO_EXTENSIONS is set" in result.stdout


def test_version_flag() -> None:
    result = _fastnet("--version")
    assert result.stdout.strip() == f"fastnet {fastnet.__version__}"


def test_serve_prints_exactly_one_line_and_exits_zero_on_sigint() -> None:
    with server_process(["echo", "--port", "0", "--log-level", "debug"]) as server:
        assert server.first_line == f"listening on 127.0.0.1:{server.port}\n"
        assert server.port > 0
        assert blocking_roundtrip(server.port, [b"hi", b""]) == [b"hi", b""]
        server.signal(signal.SIGINT)
        status, out, err = server.wait(10)
    assert status == 0, err
    assert out == ""  # the one line was all
    assert "listening on" in err  # logs go to stderr
    assert "Traceback" not in err


def test_bind_error_is_one_line_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _fastnet("serve", "echo", "--port", str(port))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"fastnet: cannot listen on 127.0.0.1:{port}: {errno_text(errno.EADDRINUSE)}"
    ]


def errno_text(code: int) -> str:
    import os

    return os.strerror(code)


def test_serve_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "kv.sock"
    with server_process(["kv", "--host", f"unix:{path}"]) as server:
        assert server.address == f"unix:{path}"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(fastnet.LengthPrefixed().encode_many([b"SET a 1", b"GET a"]))
            assert read_frames(sock, 2) == [b"+OK", b"$1"]
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err
    assert not path.exists()


def test_serve_kv_over_lines_with_a_frame_limit() -> None:
    args = ["kv", "--port", "0", "--framing", "lines", "--max-frame", "64", "--loop", "asyncio"]
    with server_process(args) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"SET k hello\r\nGET k\n")
            data = b""
            while data.count(b"\n") < 2:
                data += sock.recv(100)
            assert data == b"+OK\n$hello\n"
            sock.sendall(b"SET k " + b"v" * 100 + b"\n")  # over --max-frame: closed
            rest = b""
            while chunk := sock.recv(100):
                rest += chunk
            assert rest == b""
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err
    assert "framing error" in err


APP = textwrap.dedent(
    """
    import fastnet

    async def shout(conn):
        async for frame in conn:
            conn.send(frame.upper())

    class Handlers:
        @staticmethod
        @fastnet.callback_handler
        def reverse(conn, frames):
            return [f[::-1] for f in frames]

    not_a_handler = 42
    """
)


@pytest.mark.parametrize(
    ("app", "expected"), [("myapp:shout", b"ABC"), ("myapp:Handlers.reverse", b"cba")]
)
def test_serve_loads_module_function_apps_from_the_current_directory(
    tmp_path: Path, app: str, expected: bytes
) -> None:
    (tmp_path / "myapp.py").write_text(APP)
    with server_process([app, "--port", "0"], cwd=tmp_path) as server:
        assert blocking_roundtrip(server.port, [b"abc"]) == [expected]
        server.signal(signal.SIGTERM)
        assert server.wait(10)[0] == 0


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("nosuch", "unknown app 'nosuch'"),
        ("nosuchmodule_xyz:handler", "cannot import 'nosuchmodule_xyz'"),
        ("myapp:missing", "module 'myapp' has no attribute 'missing'"),
        ("myapp:not_a_handler", "is not a handler"),
    ],
)
def test_app_errors_are_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    app: str,
    message: str,
) -> None:
    (tmp_path / "myapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["serve", app, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastnet: ") and message in err and err.count("\n") == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["serve"],
        ["serve", "echo", "--port", "70000"],
        ["serve", "echo", "--loop", "trio"],
        ["serve", "echo", "--max-connections", "0"],
        ["serve", "echo", "--idle-timeout", "-1"],
        ["serve", "echo", "--max-frame", "lots"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
    capsys.readouterr()


def test_bad_framing_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "echo", "--framing", "length:5"]) == 1
    assert "bad --framing 'length:5'" in capsys.readouterr().err


def test_parse_framing() -> None:
    assert cli.parse_framing("length") == fastnet.LengthPrefixed()
    assert cli.parse_framing("length:2") == fastnet.LengthPrefixed(length_size=2)
    assert cli.parse_framing("LENGTH:8:little", 1000) == fastnet.LengthPrefixed(
        length_size=8, byteorder="little", max_frame=1000
    )
    assert cli.parse_framing("lines", 80) == fastnet.Lines(max_length=80)
    for bad in ("", "length:x", "length:4:middle", "lines:3", "length:4:big:x", "json"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_framing(bad)


def test_parse_size() -> None:
    assert cli.parse_size("4096") == 4096
    assert cli.parse_size("64K") == cli.parse_size("64kib") == 65536
    assert cli.parse_size("8MiB") == 8 * 1024 * 1024
    assert cli.parse_size("1g") == 1024**3
    for bad in ("", "-1", "1.5M", "12X", "K"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_size(bad)


def test_resolve_app_builtins() -> None:
    assert cli.resolve_app("echo") is echo
    kv = cli.resolve_app("kv")
    assert isinstance(kv, fastnet.CallbackHandler)
    assert cli.resolve_app("kv") is not kv  # a fresh store each time


def test_bench_is_registered_and_imports_loadgen_lazily(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Building the parser for another command does not import the load generator.
    monkeypatch.delitem(sys.modules, "fastnet.loadgen", raising=False)
    monkeypatch.delattr(fastnet, "loadgen", raising=False)
    parser = cli.build_parser()
    assert "bench" in parser.format_help()
    assert "fastnet.loadgen" not in sys.modules
    # Without the module, `fastnet bench` says so in one line.
    monkeypatch.setitem(sys.modules, "fastnet.loadgen", None)
    assert cli.main(["bench"]) == 1
    assert "fastnet bench is not available" in capsys.readouterr().err


def test_bench_hands_its_arguments_to_loadgen(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import types

    calls: list[argparse.Namespace] = []
    fake = types.ModuleType("fastnet.loadgen")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--port", type=int, required=True)

    def run(args: argparse.Namespace) -> int:
        calls.append(args)
        return 7

    fake.add_arguments = add_arguments  # type: ignore[attr-defined]
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastnet.loadgen", fake)
    monkeypatch.setattr(fastnet, "loadgen", fake, raising=False)
    assert cli.main(["bench", "--port", "9"]) == 7
    assert calls[0].port == 9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE behaviour")
def test_running_out_of_descriptors_is_survived() -> None:
    # The server may hold 24 descriptors: accept(2) fails with EMFILE while
    # clients hold the rest, the error is logged and retried with back-off,
    # and once clients leave the server accepts and serves again.
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    with server_process(["echo", "--port", "0"], preexec_fn=limit) as server:
        clients = []
        try:
            for _ in range(30):
                clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            time.sleep(0.5)  # the accept loop hits EMFILE and backs off
        finally:
            for sock in clients:
                sock.close()
        deadline = time.monotonic() + 10
        while True:  # served again once descriptors are free
            try:
                assert blocking_roundtrip(server.port, [b"again"], timeout=2) == [b"again"]
                break
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err
    assert "Too many open files" in err
    assert "retrying in" in err


def test_server_process_helper_reports_a_failed_start() -> None:
    with pytest.raises(AssertionError, match="did not start"):
        ServerProcess(["nosuchapp"])


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="examples/ is not in this tree")
@pytest.mark.parametrize(
    ("server", "frames", "replies"),
    [
        ("echo_server.py", ["hello", "wor ld"], "hello\nwor ld\n"),
        ("kv_server.py", ["SET k hello", "GET k", "DEL k", "GET k"], "+OK\n$hello\n:1\n_\n"),
    ],
)
def test_examples_run_as_the_readme_shows(server: str, frames: list[str], replies: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / server), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=process_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = line.rsplit(":", 1)[1].strip()
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "client.py"), "--port", port, *frames],
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=START_TIMEOUT,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout == replies
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
