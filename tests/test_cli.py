"""The ``fastnet`` command: real processes for serve/info, in-process for parsing."""

from __future__ import annotations

import argparse
import asyncio
import errno
import re
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
from fastnet import _cliargs, cli
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
    with server_process(["kv-text", "--host", f"unix:{path}"]) as server:
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
    args = ["kv-text", "--port", "0", "--framing", "lines", "--max-frame", "64"]
    args += ["--loop", "asyncio"]
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
def test_app_errors_are_usage_errors_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    app: str,
    message: str,
) -> None:
    # Status 2, as the README says of usage errors (it was 1 before).
    (tmp_path / "myapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["serve", app, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnet serve: error: ") and message in err and err.count("\n") == 1


def test_unknown_app_exits_2_from_the_command_line() -> None:
    result = _fastnet("serve", "nosuch", "--port", "0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "fastnet serve: error: unknown app 'nosuch': use a built-in (echo, echo-task, kv, "
        "kv-text, router-echo, router-echo-async) or module:function"
    ]


USAGE_ERRORS = [
    ([], "the following arguments are required"),
    (["serve"], "the following arguments are required: APP"),
    (["serve", "echo", "--port", "70000"], "port out of range"),
    (["serve", "echo", "--loop", "trio"], "unknown loop 'trio'"),
    (["serve", "echo", "--max-connections", "0"], "must be at least 1"),
    (["serve", "echo", "--idle-timeout", "-1"], "must be positive"),
    (["serve", "echo", "--idle-timeout", "inf"], "finite"),
    (["serve", "echo", "--drain-timeout", "nan"], "finite"),
    (["serve", "echo", "--max-frame", "lots"], "not a size: 'lots'"),
    (["serve", "echo", "--max-frame", "64QB"], "K, KB or KiB"),
    (["serve", "echo", "--host", "unix:"], "unix:PATH needs a path"),
    (["serve", "echo", "--framing", "json"], "bad framing 'json'"),
    (["serve", "echo", "--framing", "length:5"], "bad framing 'length:5'"),
    (["serve", "echo", "--framing", "lines:\\q"], "unknown escape"),
    (["serve", "echo", "--framing", "nosuchmodule_xyz:SPEC"], "cannot import 'nosuchmodule_xyz'"),
    (["serve", "echo", "--framing", "fastnet:Server"], "not a framing spec"),
    (["serve", "echo", "--max-frame", "1000000G"], "--max-frame 1073741824000000"),
    (["serve", "echo", "--frame-timeout", "0"], "must be positive"),
    # an impossible combination is refused when the spec is built (issue 14 §3)
    (
        ["serve", "echo", "--framing", "length:2", "--max-frame", "100000"],
        "max_frame 100000 does not fit a 2-byte length field",
    ),
    (["serve", "echo", "--frame-timeout", "soon"], "not a number of seconds"),
    (["bench", "--port", "1", "--size", "1.5K"], "not a size: '1.5K'"),
    (["bench", "--port", "1", "--framing", "lines:"], "needs a delimiter"),
    (["bench", "--port", "1", "--connections", "0"], "must be at least 1"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    # argparse's errors leave through SystemExit(2), the ones found after
    # parsing (APP, --framing with --max-frame) return 2: the same to a shell.
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    assert status == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert err.startswith(("fastnet: error: ", "fastnet serve: error: ", "fastnet bench: error: "))


def test_usage_error_exits_2_from_the_command_line() -> None:
    result = _fastnet("serve", "echo", "--max-frame", "64 furlongs")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "not a size: '64 furlongs'" in result.stderr


def test_loop_uvloop_without_uvloop_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "echo", "--loop", "uvloop"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "uvloop is not installed" in err and err.count("\n") == 1


def test_a_runtime_error_inside_serve_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failure that is not the user's (here: a bug in starting the server)
    # must not be shortened to a usage line: it propagates, traceback and all.
    async def broken_start(self: fastnet.Server) -> None:
        raise RuntimeError("a bug inside serve")

    monkeypatch.setattr(fastnet.Server, "start", broken_start)
    with pytest.raises(RuntimeError, match="a bug inside serve"):
        cli.main(["serve", "echo", "--port", "0", "--loop", "asyncio"])


BROKEN_APP = textwrap.dedent(
    """
    import fastnet

    async def start(self):
        raise RuntimeError("the app broke the server")

    fastnet.Server.start = start  # stands for any bug that surfaces inside serve

    @fastnet.callback_handler
    def handler(conn, frames):
        return frames
    """
)


def test_an_app_bug_shows_a_traceback_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "brokenapp.py").write_text(BROKEN_APP)
    result = subprocess.run(
        [sys.executable, "-m", "fastnet", "serve", "brokenapp:handler", "--port", "0"],
        capture_output=True,
        text=True,
        env=process_env(),
        cwd=tmp_path,
        timeout=START_TIMEOUT,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "RuntimeError: the app broke the server" in result.stderr.splitlines()
    assert "fastnet: " not in result.stderr  # not shortened to a one-line message


FRAMINGS = textwrap.dedent(
    """
    import fastnet

    # A 2-byte little-endian length that counts itself too.
    SELF_COUNTING = fastnet.LengthPrefixed(length_size=2, byteorder="little", adjustment=-2)

    class Specs:
        NUL = fastnet.Lines(delimiter=b"\\0")

    not_a_spec = "length"
    """
)


def test_parse_framing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.parse_framing("length") == fastnet.LengthPrefixed()
    assert cli.parse_framing("length:2") == fastnet.LengthPrefixed(length_size=2)
    assert cli.parse_framing("LENGTH:8:Little", 1000) == fastnet.LengthPrefixed(
        length_size=8, byteorder="little", max_frame=1000
    )
    assert cli.parse_framing("lines", 80) == fastnet.Lines(max_length=80)
    # lines:DELIM, with escapes; the delimiter keeps its case and spaces.
    assert cli.parse_framing("lines:\\r\\n") == fastnet.Lines(delimiter=b"\r\n")
    assert cli.parse_framing("lines:\\0", 10) == fastnet.Lines(delimiter=b"\0", max_length=10)
    assert cli.parse_framing("lines:\\x00\\xfF") == fastnet.Lines(delimiter=b"\0\xff")
    assert cli.parse_framing("Lines:END\\t") == fastnet.Lines(delimiter=b"END\t")
    assert cli.parse_framing("lines:\\\\") == fastnet.Lines(delimiter=b"\\")
    assert cli.parse_framing("lines: ") == fastnet.Lines(delimiter=b" ")
    assert cli.parse_framing("lines::") == fastnet.Lines(delimiter=b":")
    assert cli.parse_framing("lines:3") == fastnet.Lines(delimiter=b"3")
    # module:NAME, imported as APP is (the current directory is importable).
    (tmp_path / "myframings.py").write_text(FRAMINGS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = fastnet.LengthPrefixed(length_size=2, byteorder="little", adjustment=-2)
    assert cli.parse_framing("myframings:SELF_COUNTING") == spec
    assert cli.parse_framing("myframings:Specs.NUL") == fastnet.Lines(delimiter=b"\0")
    # --max-frame replaces a module spec's own limit.
    limited = cli.parse_framing("myframings:SELF_COUNTING", 500)
    assert limited == fastnet.LengthPrefixed(
        length_size=2, byteorder="little", adjustment=-2, max_frame=500
    )
    bad = {
        "": "expected length",
        "length:x": "SIZE must be",
        "length:\u00b2": "SIZE must be",
        "length:4:middle": "ORDER must be big or little",
        "length:4:big:x": "expected length",
        "length:": "expected length",
        "json": "expected length",
        "lines:": "needs a delimiter",
        "lines:\\x4": "unknown escape",
        "lines:ab\\": "unknown escape",
        "myframings:not_a_spec": "is a str, not a framing spec",
        "myframings:missing": "module 'myframings' has no attribute 'missing'",
        "nosuchmodule_xyz:SPEC": "cannot import 'nosuchmodule_xyz' for framing",
    }
    for text, message in bad.items():
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            cli.parse_framing(text)


def test_max_frame_the_framing_cannot_take_names_both(capsys: pytest.CaptureFixture[str]) -> None:
    # 2**48 is the largest limit a spec takes.
    assert cli.main(["serve", "echo", "--framing", "lines", "--max-frame", "1048576G"]) == 2
    err = capsys.readouterr().err
    assert "--max-frame 1125899906842624 does not suit --framing lines" in err


def test_framing_text_round_trips() -> None:
    for text in ("length:4:big", "length:2:little", "lines", "lines:\\r\\n", "lines:\\0|\\x01"):
        spec = cli.parse_framing(text)
        assert _cliargs.framing_text(spec) == text
        assert cli.parse_framing(_cliargs.framing_text(spec) or "") == spec
    assert _cliargs.framing_text(fastnet.LengthPrefixed(offset=2)) is None
    assert _cliargs.framing_text(fastnet.Lines(strip=False)) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("100b", 100),
        ("64K", 65536),
        ("64k", 65536),
        ("64KB", 65536),
        ("64kb", 65536),
        ("64KiB", 65536),
        ("64kib", 65536),
        (" 8M ", 8 << 20),
        ("8MB", 8 << 20),
        ("8MiB", 8 << 20),
        ("8mIb", 8 << 20),
        ("1g", 1 << 30),
        ("1GB", 1 << 30),
        ("1GiB", 1 << 30),
    ],
)
def test_parse_size_accepts_the_common_spellings(text: str, expected: int) -> None:
    # KB and MB are binary, as in nginx, PostgreSQL and Docker: --max-frame
    # 64KB must admit a 65536-byte frame.
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "-1", "+1", "1.5M", "12X", "K", "64 KB", "64KBs", "1e3", "\u0664"]
)
def test_parse_size_says_what_it_accepts(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        cli.parse_size(text)
    message = str(info.value)
    assert message.startswith(f"not a size: {text!r}")
    for spelling in ("K, KB or KiB", "M, MB or MiB", "G, GB or GiB", "64KB"):
        assert spelling in message


def test_cli_and_loadgen_share_one_definition_of_each_parser() -> None:
    from fastnet import loadgen

    assert cli.parse_size is loadgen.parse_size is _cliargs.parse_size
    assert cli.parse_framing is loadgen.parse_framing is _cliargs.parse_framing
    bench = cli.build_parser(with_bench=True)
    args = bench.parse_args(["bench", "--port", "9", "--size", "64KB", "--loop", "asyncio"])
    assert args.size == 65536 and args.loop == "asyncio"
    serve = bench.parse_args(["serve", "echo", "--max-frame", "64KB", "--loop", "ASYNCIO"])
    assert serve.max_frame == 65536 and serve.loop == "asyncio"


def test_frame_timeout_is_passed_only_when_given() -> None:
    parser = cli.build_parser()
    assert "frame_timeout" not in cli.server_options(parser.parse_args(["serve", "echo"]))
    given = cli.server_options(parser.parse_args(["serve", "echo", "--frame-timeout", "2.5"]))
    assert given["frame_timeout"] == 2.5
    off = cli.server_options(parser.parse_args(["serve", "echo", "--frame-timeout", "off"]))
    assert off["frame_timeout"] is None


def test_server_options_from_the_command_line() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["serve", "kv-text", "--host", "unix:app.sock", "--framing", "lines:\\0",
         "--max-frame", "1KB", "--idle-timeout", "5", "--max-connections", "3"]
    )  # fmt: skip
    options = cli.server_options(args)
    assert options["framing"] == fastnet.Lines(delimiter=b"\0", max_length=1024)
    assert options["unix"] == "app.sock"
    assert options["idle_timeout"] == 5.0
    assert options["max_connections"] == 3


def test_serve_a_module_framing_and_a_delimiter_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "myframings.py").write_text(FRAMINGS)
    # A self-counting 2-byte little-endian length, from a module spec.
    args = ["echo", "--port", "0", "--framing", "myframings:SELF_COUNTING", "--max-frame", "1KB"]
    with server_process(args, cwd=tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"\x07\x00hello")
            data = b""
            while len(data) < 7:
                data += sock.recv(100)
            assert data == b"\x07\x00hello"
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err
    # NUL-terminated lines, kv-text app: replies end with NUL too.
    with server_process(["kv-text", "--port", "0", "--framing", "lines:\\0"]) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"SET k a\nb\0GET k\0")
            data = b""
            while data.count(b"\0") < 2:
                data += sock.recv(100)
            assert data == b"+OK\0$a\nb\0"
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err


def test_resolve_app_builtins() -> None:
    assert cli.resolve_app("echo") is echo
    kv = cli.resolve_app("kv")
    assert isinstance(kv, fastnet.Router)
    assert cli.resolve_app("kv") is not kv  # a fresh store each time
    kv_text = cli.resolve_app("kv-text")
    assert isinstance(kv_text, fastnet.CallbackHandler)
    assert not isinstance(kv_text, fastnet.Router)


def test_serve_kv_on_the_router_without_framing_options() -> None:
    # No --framing: the server speaks the router's own framing.
    options = cli.server_options(cli.build_parser().parse_args(["serve", "kv"]))
    assert options["framing"] is None

    async def client(port: int) -> None:
        async with await fastnet.open_channel("127.0.0.1", port) as channel:
            key = b"k"
            set_body = len(key).to_bytes(2, "big") + key + b"hello world"
            assert await channel.call(set_body, type=2, timeout=5) == b""
            assert await channel.call(key, type=1, timeout=5) == b"hello world"
            assert await channel.call(key, type=3, timeout=5) == b"\x01"
            with pytest.raises(fastnet.RequestError) as missing:
                await channel.call(key, type=1, timeout=5)
            assert missing.value.code == 404
            with pytest.raises(fastnet.RequestError) as bad:
                await channel.call(b"\x00\x09k", type=2, timeout=5)
            assert bad.value.code == 400
            # Pipelined: 100 SETs then 100 GETs, all in flight at once.
            sets = [
                channel.call(b"\x00\x02k%d" % (i % 10) + b"v%d" % i, type=2, timeout=5)
                for i in range(10, 110)
            ]
            assert await asyncio.gather(*sets) == [b""] * 100

    with server_process(["kv", "--port", "0"]) as server:
        asyncio.run(client(server.port))
        server.signal(signal.SIGTERM)
        status, _, err = server.wait(10)
    assert status == 0, err


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


@pytest.mark.parametrize("framing", ["lines", "length:2", "length:4:little"])
def test_serve_a_router_with_a_framing_it_cannot_speak_is_a_usage_error(
    framing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Router's frames are LengthPrefixed()'s: another --framing would start
    # a server no client could talk to; refused at once, status 2.
    assert cli.main(["serve", "kv", "--port", "0", "--framing", framing]) == 2
    err = capsys.readouterr().err
    assert "--framing: a Router speaks 4-byte big-endian length-prefixed frames" in err


def test_serve_a_router_with_a_frame_limit_is_fine() -> None:
    options = cli.server_options(
        cli.build_parser().parse_args(["serve", "kv", "--max-frame", "1KB"])
    )
    router = cli.resolve_app("kv")
    assert isinstance(router, fastnet.Router)
    router.check_framing(options["framing"])  # length, 1 KiB: the router's layout
    with pytest.raises(ValueError, match="too small"):
        router.check_framing(fastnet.LengthPrefixed(max_frame=11))
