"""End-to-end comparison: fastnet's echo server against asyncio and Tokio baselines.

Usage::

    python benchmarks/compare.py            # the full run: results in benchmarks/results/
    python benchmarks/compare.py --quick    # one short run of each case; prints, writes nothing
    python benchmarks/compare.py --fastnet-before OTHER/bin/python   # before/after in one sitting
    python benchmarks/compare.py --render benchmarks/results/compare.json  # redraw only
    python benchmarks/compare.py --set tls  # the TLS set: results/tls.{json,md} (make bench-tls)
    python benchmarks/compare.py --help

For every workload, every server and both event loops, the harness starts the
server pinned to CPU 0 (``taskset``), runs the load generator pinned to CPU 1
against it, and stops the server. Without ``taskset`` or a second CPU it warns
and runs unpinned.

The load generator is ``loadgen_c/cloadgen.c`` (``--generator c``, the
default): a C epoll client that keeps the same frames in flight, verifies
every echoed byte against a ring of counter-tagged frames, and prints the same
JSON report as ``python -m fastnet.loadgen`` (``--generator python``, the
fallback when gcc is missing). Per read the C one makes one ``recv`` and one
``send`` and little else, so its CPU per frame is mostly the kernel's: 10-40%
below the Python generator's, yet about Tokio's own (the same syscalls per
read). Near Tokio's figures either generator is the limit; those cases are
marked, and there the servers' CPU per frame is the comparison.
It is compiled with ``gcc -O2`` on demand into ``benchmarks/.build/``.

Workloads (connections x frames in flight per connection x payload):
small pipelined 64 x 16 x 64 B, rpc 64 x 1 x 64 B, large 8 x 4 x 64 KiB,
many connections 1,000 x 1 x 128 B.

Servers (4-byte big-endian length prefix, 8 MiB limit, all but the floor):

- fastnet's ``echo`` (callback handler) with the extension, the same with
  ``FASTNET_NO_EXTENSIONS=1``, and ``echo-task`` (an ``async def`` handler);
- the idiomatic asyncio-streams echo (``servers/streams_echo.py``), the
  hand-written asyncio.Protocol that cuts and re-encodes each frame
  (``servers/protocol_echo.py``), and the reflecting Protocol that writes each
  read's complete frames back untouched (``servers/protocol_reflect.py``, the
  strongest Python baseline), each on asyncio and on uvloop;
- on request (``--servers raw-echo``), the floor: a Protocol that writes every
  read back unparsed, the loop calling the transport's write directly
  (``servers/raw_echo.py``). Not framed (the 4-byte prefix and the limit mean
  nothing to it); the least any Python server does per read on that loop;
- Tokio 1.x + tokio-util's ``LengthDelimitedCodec`` on the current_thread
  runtime (``servers/tokio_echo/``), once per workload. It is built with
  ``cargo build --release --offline`` from Debian's packaged crates
  (``librust-tokio-dev``, ``librust-tokio-util-dev``, ``librust-futures-dev``
  in ``/usr/share/cargo/registry``) into ``benchmarks/.build/``, and skipped
  with one message where cargo or the crates are missing;
- with ``--fastnet-before PYTHON``, ``fastnet-before`` and
  ``fastnet-task-before``: the two fastnet echoes run by another interpreter
  (another venv or checkout), to measure a change before and after.

Each case runs ``--runs`` times (3), each time with a fresh server process;
rounds are interleaved (all cases once, then all again) so that a burst of
noise on the machine spreads over the cases instead of hitting one. A figure
is the median of the runs, with the min-max spread. The server's CPU seconds
per frame come from its own CPU time (``/proc/PID/stat``, read by the load
generator at the edges of its measured window), which stays a fair measure
when the generator is the limit. The generator's CPU use is recorded too: a
case where it kept its core busy, or used most of the server's CPU time per
frame, is marked as generator-bound, since there the frames/s of the server
may be understated; the tables and the targets then say so, and server CPU
per frame is the comparison.

Outputs (unless ``--quick``): ``results/compare.json``, ``results/compare.md``
(the tables, issue 8's targets judged met or not met, the generator's
headroom and the memory figures of ``memory.py``), and
``results/compare.png`` (matplotlib).

At the default settings (3 runs of 2 s after 0.5 s of warmup) the whole run
takes about 10 minutes on a 2-core machine, plus a minute to build Tokio the
first time.

The TLS set (``--set tls``, issue 9) writes ``results/tls.json`` and
``results/tls.md`` instead. Certificates are made at run time by trustme (the
test extra) in a temporary directory. The servers are fastnet's callback echo
(``fastnet serve echo --tls-cert ... --loop L``) and the reflecting Protocol
serving TLS (``servers/protocol_reflect.py --tls-cert ...``: ``ssl=`` on
``create_server``), each on uvloop and on asyncio. The C generator speaks no
TLS, so:

- TLS echo, 64 x 16 x 64 B and 8 x 4 x 64 KiB: ``python -m fastnet.loadgen
  --tls`` (``--tls-generator-processes``, 1 by default: its one pinned core
  is all it can use), with the server's CPU per frame from /proc, the fair
  comparison when the generator is the limit;
- new TLS connections per second: ``tls_load.py rate``, a bounded number of
  connections (``--tls-connections``) over ``--tls-concurrency`` workers,
  each a full handshake, one echoed frame and a close, with the server's CPU
  per connection;
- memory per idle TLS connection: ``tls_load.py idle``, the server's RSS
  growth over ``--tls-idle-connections`` handshaken idle connections.

In the same rounds, fastnet on uvloop runs the plain-TCP small and rpc
workloads with compare.py's generator (and, with ``--fastnet-before PYTHON``,
the same fastnet before a change), next to the published figures of
``results/compare.json``, to show the plain path unchanged. tls.md judges
issue 9's targets. About 5 minutes at 3 runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVERS_DIR = HERE / "servers"
RESULTS_DIR = HERE / "results"
# Built on demand, ignored by git: the C load generator and the Tokio server.
BUILD_DIR = HERE / ".build"
CLOADGEN_SOURCE = HERE / "loadgen_c" / "cloadgen.c"
TOKIO_SOURCE = SERVERS_DIR / "tokio_echo"
# Where Debian's librust-*-dev packages put their crates, and which of them the
# Tokio baseline needs (with their packages, for the message when missing).
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
TOKIO_CRATES = {
    "tokio": "librust-tokio-dev",
    "tokio-util": "librust-tokio-util-dev",
    "futures": "librust-futures-dev",
}
# Debian's documented way to build against its packaged crates: replace
# crates.io with the directory source. Written into the build directory, never
# into the source tree, so no machine path is committed.
CARGO_CONFIG = """\
[source.debian-packages]
directory = "{registry}"

[source.crates-io]
replace-with = "debian-packages"
"""
# Seconds a build may take: cargo compiles tokio, futures and their
# dependencies once (about a minute here, several on a busy machine).
BUILD_TIMEOUT = 900.0

SERVER_CPU = "0"
LOAD_CPU = "1"

# Seconds to wait for a server's "listening on" line. Python start-up plus
# importing uvloop takes well under a second; 20 s leaves room for a machine
# that is busy with other work.
START_TIMEOUT = 20.0

# Seconds a server gets to exit after SIGTERM before it is killed. fastnet
# drains gracefully, but the generator has closed every connection by then.
STOP_TIMEOUT = 15.0

# The generator cannot be said to out-drive a server when it spends at least
# this fraction of the server's CPU time per frame (both have one core):
# such cases are marked in the table, and frames/s there may be the
# generator's figure as much as the server's.
GENERATOR_BOUND = 0.90

# ... nor when it kept its own core this busy (CPU seconds per second of the
# measured window): then it, not the server, set the pace.
GENERATOR_BUSY = 0.90

# A run during which other processes used more than this many CPU cores
# (of the two that server and generator are pinned to) is run again, up to
# NOISY_RETRIES times; the cleanest attempt is kept. Half a core: enough
# that a pinned process loses a large share of its CPU to someone else.
NOISY_LOAD = 0.5
NOISY_RETRIES = 2


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    connections: int
    depth: int
    size: int


@dataclass(frozen=True)
class ServerKind:
    name: str
    title: str
    no_extensions: bool = False
    app: str = "echo"  # fastnet's built-in app, for the fastnet servers
    script: str | None = None  # servers/<script>, for the Python baselines
    native: bool = False  # a compiled server with its own runtime: run once, not per loop
    before: bool = False  # fastnet from the --fastnet-before interpreter
    protocol: str = "frames"  # the generators' --protocol: "router" for a router server
    # A fixed request body (the C generator's --body-hex), for a typed router
    # whose reply must re-encode to the request's bytes: "msgspec" is
    # servers/router_msgspec.py's SAMPLE.
    body: str | None = None


WORKLOADS = (
    Workload("small", "small pipelined: 64 conns x 16 in flight x 64 B", 64, 16, 64),
    Workload("rpc", "rpc: 64 conns x 1 in flight x 64 B", 64, 1, 64),
    Workload("large", "large: 8 conns x 4 in flight x 64 KiB", 8, 4, 64 * 1024),
    Workload("many", "many connections: 1,000 conns x 1 in flight x 128 B", 1000, 1, 128),
)

SERVERS = (
    ServerKind("fastnet", "fastnet echo (extension)"),
    ServerKind("fastnet-py", "fastnet echo (pure Python)", no_extensions=True),
    ServerKind("streams", "asyncio streams baseline", script="streams_echo.py"),
    ServerKind("protocol", "asyncio.Protocol baseline", script="protocol_echo.py"),
    # fastnet's echo written as an `async def` handler (recv_batch/send_many,
    # one task per connection): the model DESIGN.md is built around. It is in
    # the default run so the published table never shows only the callback
    # handler, which costs what a hand-written Protocol does.
    ServerKind("fastnet-task", "fastnet echo-task (extension)", app="echo-task"),
    # The strongest Python baseline: reflects each read's complete frames
    # without re-encoding them (servers/protocol_reflect.py).
    ServerKind("protocol-reflect", "reflecting Protocol baseline", script="protocol_reflect.py"),
    # The floor of any Python server on a loop: each read written back
    # unparsed, the loop calling the transport's write directly
    # (servers/raw_echo.py). Not framed; not in the default run.
    ServerKind("raw-echo", "raw echo floor (reads written back unparsed)", script="raw_echo.py"),
    # Tokio + tokio-util's LengthDelimitedCodec, current_thread runtime
    # (servers/tokio_echo/), built from Debian's packaged crates.
    ServerKind("tokio", "Tokio (tokio-util codec)", native=True),
    # The same two fastnet echoes from another interpreter/venv
    # (--fastnet-before PYTHON), to measure a change before and after in one sitting.
    ServerKind("fastnet-before", "fastnet echo, before", before=True),
    ServerKind("fastnet-task-before", "fastnet echo-task, before", app="echo-task", before=True),
    # The router set (--set router, issue 12): fastnet's router answering type
    # 1 with the body, from a plain handler, from an async def handler, and
    # with a small msgspec struct decoded and encoded (servers/router_msgspec.py).
    ServerKind("router-echo", "router-echo, plain handler", app="router-echo", protocol="router"),
    ServerKind(
        "router-echo-async",
        "router-echo, async handler",
        app="router-echo-async",
        protocol="router",
    ),
    ServerKind(
        "router-msgspec",
        "router, msgspec struct",
        app="router_msgspec:router",
        protocol="router",
        body="msgspec",
    ),
)
DEFAULT_SERVERS = (
    "fastnet",
    "fastnet-task",
    "fastnet-py",
    "streams",
    "protocol",
    "protocol-reflect",
    "tokio",
)
BEFORE_SERVERS = ("fastnet-before", "fastnet-task-before")
# What benchmarks/memory.py measures alongside: the Python servers it knows how to start.
MEMORY_SERVERS = ("fastnet", "fastnet-task", "fastnet-py", "streams", "protocol")

LOOPS = ("asyncio", "uvloop")
# The "loop" of a native server: Tokio's single-threaded runtime.
NATIVE_LOOP = "current_thread"


# --------------------------------------------------------------------------- processes


def pinning_available() -> bool:
    """True when ``taskset`` exists and CPUs 0 and 1 can both be used."""
    if shutil.which("taskset") is None:
        return False
    try:
        available = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return False
    return {0, 1} <= available


def pinned(cpu: str, command: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", cpu, *command] if pin else command


# Set by main(): the built Tokio binary and the --fastnet-before interpreter,
# which server_command() needs for the "tokio" and "*-before" servers.
EXTERNAL: dict[str, str] = {}


def server_command(
    kind: ServerKind,
    loop: str,
    max_connections: int | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The command line of a server; ``max_connections`` raises fastnet's limit.

    ``extra`` is appended (the TLS set's ``--tls-cert FILE --tls-key FILE``,
    which fastnet serve and the reflecting Protocol both take).
    """
    if kind.native:
        if "tokio" not in EXTERNAL:
            raise RuntimeError("the Tokio baseline is not built (see build_tokio)")
        return [EXTERNAL["tokio"], "--host", "127.0.0.1", "--port", "0", *extra]
    if kind.script is not None:
        script = SERVERS_DIR / kind.script
        return [sys.executable, str(script), "--port", "0", "--loop", loop, *extra]
    python = sys.executable
    if kind.before:
        if "before" not in EXTERNAL:
            raise RuntimeError(f"{kind.name} needs --fastnet-before PYTHON")
        python = EXTERNAL["before"]
    command = [python, "-m", "fastnet", "serve", kind.app, "--port", "0"]
    command += ["--loop", loop, "--log-level", "warning"]
    if max_connections is not None:
        command += ["--max-connections", str(max_connections)]
    return command + list(extra)


def server_env(kind: ServerKind) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTNET_NO_EXTENSIONS", None)
    if kind.no_extensions:
        env["FASTNET_NO_EXTENSIONS"] = "1"
    if ":" in kind.app:  # an app module of servers/ (router_msgspec:router)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SERVERS_DIR), env.get("PYTHONPATH")]))
    return env


class ServerProcess:
    """A server subprocess, started and waited for until it listens.

    ``wrap`` goes before the server's command line (``valgrind ...`` for
    server_instructions.py).
    """

    def __init__(
        self,
        kind: ServerKind,
        loop: str,
        pin: bool,
        max_connections: int | None = None,
        extra: tuple[str, ...] = (),
        wrap: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        # Closed in stop(); it outlives this method, so no `with` block.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        command = [*wrap, *server_command(kind, loop, max_connections, extra)]
        self.proc = subprocess.Popen(
            pinned(SERVER_CPU, command, pin),
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=server_env(kind),
        )
        self.host, self.port = self._wait_listening()

    def _wait_listening(self) -> tuple[str, int]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT
        # The server prints exactly one line when ready; read it with a
        # deadline so that a server which hangs cannot hang the harness.
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if poller.poll(min(remaining, 0.2) * 1000):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break  # the server exited
                data += chunk
        line = data.decode(errors="replace").split("\n", 1)[0].strip()
        if not line.startswith("listening on "):
            reason = self.error_output() or line or "no output"
            self.stop()
            command = shown(server_command(self.kind, "LOOP"))
            raise RuntimeError(f"{self.kind.title} did not start ({command}): {reason}")
        host, _, port = line[len("listening on ") :].rpartition(":")
        return host.strip("[]"), int(port)

    def error_output(self) -> str:
        if self.stderr.closed:
            return ""
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip()
        return text.splitlines()[-1] if text else ""

    def stop(self) -> str | None:
        """Stop the server (SIGTERM, then SIGKILL); return a problem, or None if it exited 0."""
        problem = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                problem = f"did not exit within {STOP_TIMEOUT:g} s of SIGTERM"
        if problem is None and self.proc.returncode != 0:
            problem = f"exited with status {self.proc.returncode}: {self.error_output()}"
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()
        return problem


def shown(command: list[str]) -> str:
    """``command`` as text for messages and results, with no machine path in it."""
    text = " ".join(command)
    for label, path in EXTERNAL.items():
        text = text.replace(path, f"<{label}>")
    return text.replace(sys.executable, "python").replace(str(HERE.parent) + os.sep, "")


def loadgen_command(
    server: ServerProcess, workload: Workload, args: argparse.Namespace
) -> list[str]:
    """The generator's command line: the C one when built, else ``python -m fastnet.loadgen``."""
    if args.generator == "c":
        command = [EXTERNAL["cloadgen"]]
    else:
        loop = "uvloop" if args.generator_loop == "uvloop" else args.generator_loop
        command = [sys.executable, "-m", "fastnet.loadgen", "--loop", loop]
    return [*command, *load_args(server, workload, args)]


def load_args(server: ServerProcess, workload: Workload, args: argparse.Namespace) -> list[str]:
    """The options both generators take: address, workload, timing, the server's pid.

    A server that speaks the router's wire format (``protocol="router"``)
    adds ``--protocol router``; for the others the options are unchanged.
    """
    options = [
        "--host", server.host,
        "--port", str(server.port),
        "--connections", str(workload.connections),
        "--depth", str(workload.depth),
        "--size", str(workload.size),
        "--duration", str(args.duration),
        "--warmup", str(args.warmup),
        "--server-pid", str(server.proc.pid),
        "--json",
    ]  # fmt: skip
    if server.kind.protocol != "frames":
        options += ["--protocol", server.kind.protocol]
    if server.kind.body is not None:
        options += ["--body-hex", request_body(server.kind.body).hex()]
    return options


def request_body(name: str) -> bytes:
    """A ServerKind's fixed request body: "msgspec" is servers/router_msgspec.py's SAMPLE."""
    if name != "msgspec":
        raise ValueError(f"unknown request body {name!r}")
    sys.path.insert(0, str(SERVERS_DIR))
    try:
        import router_msgspec
    finally:
        sys.path.remove(str(SERVERS_DIR))
    return bytes(router_msgspec.SAMPLE)


def run_load(
    server: ServerProcess, workload: Workload, args: argparse.Namespace, pin: bool
) -> dict[str, Any]:
    command = loadgen_command(server, workload, args)
    timeout = args.duration + args.warmup + 60.0
    done = subprocess.run(
        pinned(LOAD_CPU, command, pin), capture_output=True, text=True, timeout=timeout
    )
    if not done.stdout.strip():
        raise RuntimeError(f"load generator failed: {done.stderr.strip()}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


# --------------------------------------------------------------------------- builds


class BuildError(RuntimeError):
    """A baseline or the C generator could not be built here; the message says why."""


def build_cloadgen(build_dir: Path = BUILD_DIR) -> Path:
    """Compile ``loadgen_c/cloadgen.c`` with ``gcc -O2`` unless the binary is up to date.

    Returns:
        The path of the binary.

    Raises:
        BuildError: no gcc, or the compilation failed.
    """
    binary = build_dir / "cloadgen"
    if binary.exists() and binary.stat().st_mtime >= CLOADGEN_SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which("gcc")
    if compiler is None:
        raise BuildError("gcc is not installed")
    build_dir.mkdir(parents=True, exist_ok=True)
    partial = build_dir / "cloadgen.partial"
    command = [compiler, "-O2", "-Wall", "-o", str(partial), str(CLOADGEN_SOURCE)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        errors = [line for line in lines if "error" in line] or lines or [str(done.returncode)]
        raise BuildError(f"gcc failed: {errors[0].strip()}")
    partial.replace(binary)
    return binary


def _copy_if_changed(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` unless equal, so cargo sees unchanged mtimes."""
    data = source.read_bytes()
    if not target.exists() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def build_tokio(build_dir: Path = BUILD_DIR) -> tuple[Path, dict[str, str]]:
    """Build ``servers/tokio_echo`` offline from Debian's packaged crates.

    The sources are copied into ``build_dir/tokio_echo`` next to a generated
    ``.cargo/config.toml`` that replaces crates.io with Debian's directory
    source, and ``cargo build --release --offline`` runs there (a no-op when
    nothing changed). Nothing is written into the source tree.

    Returns:
        The path of the binary, and the versions cargo resolved for tokio,
        tokio-util and futures (from the build's Cargo.lock).

    Raises:
        BuildError: no cargo, Debian's crates missing, or the build failed.
    """
    cargo = shutil.which("cargo")
    if cargo is None:
        raise BuildError("cargo is not installed (apt-get install cargo)")
    missing = [
        package
        for crate, package in TOKIO_CRATES.items()
        if not any(DEBIAN_REGISTRY.glob(f"{crate}-[0-9]*"))
    ]
    if missing:
        raise BuildError(
            f"Debian's packaged crates are missing from {DEBIAN_REGISTRY} "
            f"(apt-get install {' '.join(missing)})"
        )
    project = build_dir / "tokio_echo"
    _copy_if_changed(TOKIO_SOURCE / "Cargo.toml", project / "Cargo.toml")
    _copy_if_changed(TOKIO_SOURCE / "src" / "main.rs", project / "src" / "main.rs")
    config = project / ".cargo" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(CARGO_CONFIG.format(registry=DEBIAN_REGISTRY))
    try:
        done = subprocess.run(
            [cargo, "build", "--release", "--offline", "--quiet"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise BuildError(f"cargo build took more than {BUILD_TIMEOUT:g} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise BuildError("cargo build --offline failed: " + " / ".join(lines[:3]))
    versions: dict[str, str] = {}
    lock = (project / "Cargo.lock").read_text()
    for block in lock.split("[[package]]")[1:]:
        fields = dict(line.split(" = ", 1) for line in block.strip().splitlines() if " = " in line)
        name = fields.get("name", "").strip('"')
        if name in TOKIO_CRATES:
            versions[name] = fields.get("version", "").strip('"')
    return project / "target" / "release" / "tokio_echo", versions


# --------------------------------------------------------------------------- statistics


METRICS = (
    "frames_per_s",
    "mib_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu_us_per_frame",
    "server_cpu_util",
    "loadgen_cpu_util",
    "loadgen_cpu_us_per_frame",
    "other_cpu_util",
)


def flatten(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "frames_per_s": report["frames_per_s"],
        "mib_per_s": report["mib_per_s"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "server_cpu_us_per_frame": report["server_cpu_us_per_frame"],
        "server_cpu_util": report["server_cpu_util"],
        "loadgen_cpu_util": report["loadgen_cpu_util"],
        "loadgen_cpu_us_per_frame": report["loadgen_cpu_us_per_frame"],
        "other_cpu_util": report.get("other_cpu_util"),
        "errors": report["errors"],
        "error_messages": report["error_messages"],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each metric over the successful runs."""
    summary: dict[str, Any] = {"runs": len(runs)}
    for metric in METRICS:
        values = [r[metric] for r in runs if r.get(metric) is not None]
        if values:
            summary[metric] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
        else:
            summary[metric] = None
    summary["errors"] = sum(r["errors"] for r in runs)
    return summary


def median(summary: dict[str, Any] | None, metric: str) -> float | None:
    if not summary or not summary.get(metric):
        return None
    value: float = summary[metric]["median"]
    return value


# --------------------------------------------------------------------------- the run


def run_once(
    kind: ServerKind, workload: Workload, loop: str, args: argparse.Namespace, pin: bool, label: str
) -> dict[str, Any]:
    """One run: a fresh server, the generator against it, the server stopped."""
    server = ServerProcess(kind, loop, pin)
    try:
        report = run_load(server, workload, args, pin)
    finally:
        problem = server.stop()
        if problem:
            print(f"{label} warning: the server {problem}", file=sys.stderr, flush=True)
    return flatten(report)


def run_quietly(
    kind: ServerKind,
    workload: Workload,
    loop: str,
    args: argparse.Namespace,
    pin: bool,
    label: str,
) -> dict[str, Any]:
    """``run_once``, repeated while other processes loaded the machine; the quietest attempt."""
    attempts = []
    for attempt in range(1 + args.noisy_retries):
        result = run_once(kind, workload, loop, args, pin, label)
        attempts.append(result)
        other = result["other_cpu_util"]
        if other is None or other <= args.noisy_load:
            break
        then = "again" if attempt < args.noisy_retries else "kept, no retries left"
        print(f"{label} noisy ({other:.2f} cores of other load): {then}", file=sys.stderr)
    best = min(attempts, key=lambda r: r["other_cpu_util"] or 0.0)
    best["attempts"] = len(attempts)
    return best


def run_all(args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    servers = [s for s in SERVERS if s.name in args.servers]
    loops = [loop for loop in LOOPS if loop in args.loops]
    cases = [
        (w, s, loop)
        for w in workloads
        for s in servers
        for loop in ([NATIVE_LOOP] if s.native else loops)
    ]
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {
        (w.name, s.name, loop): [] for w, s, loop in cases
    }
    failures: dict[tuple[str, str, str], str] = {}
    total = len(cases) * args.runs
    started = time.monotonic()
    step = 0
    for round_number in range(args.runs):
        for workload, kind, loop in cases:
            key = (workload.name, kind.name, loop)
            step += 1
            if key in failures:
                continue
            label = f"[{step}/{total}] {workload.name:<5} {kind.name:<19} {loop:<14}"
            try:
                result = run_quietly(kind, workload, loop, args, pin, label)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                failures[key] = str(exc)
                print(f"{label} FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            result["round"] = round_number
            runs[key].append(result)
            gen = result["loadgen_cpu_util"] or 0.0
            srv = result["server_cpu_util"] or 0.0
            other = result["other_cpu_util"]
            print(
                f"{label} {result['frames_per_s']:>12,.0f} frames/s  "
                f"server {srv:4.2f} cpu  generator {gen:4.2f} cpu  "
                f"other {'-' if other is None else f'{other:4.2f}'} cpu  "
                f"errors {result['errors']}  ({time.monotonic() - started:5.0f} s)"
                + ("  generator-bound" if generator_bound(result) else ""),
                file=sys.stderr,
                flush=True,
            )
    cases_out = []
    for workload, kind, loop in cases:
        key = (workload.name, kind.name, loop)
        cases_out.append(
            {
                "workload": workload.name,
                "server": kind.name,
                "loop": loop,
                "runs": runs[key],
                "summary": summarise(runs[key]) if runs[key] else None,
                "failure": failures.get(key),
            }
        )
    return {
        "cases": cases_out,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------- machine


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for module in ("fastnet", "uvloop"):
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}; print({module}.__version__)"],
            capture_output=True,
            text=True,
        )
        versions[module] = probe.stdout.strip() or "not installed"
    accelerated = subprocess.run(
        [sys.executable, "-c", "import fastnet; print(fastnet.ACCELERATED)"],
        capture_output=True,
        text=True,
        env=server_env(SERVERS[0]),
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "fastnet": versions["fastnet"],
        "uvloop": versions["uvloop"],
        "extension_built": accelerated == "True",
    }


# --------------------------------------------------------------------------- output


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def fmt_num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def find(cases: list[dict[str, Any]], workload: str, server: str, loop: str) -> dict[str, Any]:
    for case in cases:
        if (case["workload"], case["server"], case["loop"]) == (workload, server, loop):
            return case
    return {"summary": None}


def markdown(result: dict[str, Any]) -> str:
    cases = result["cases"]
    meta = result["meta"]
    lines = [
        "# fastnet end-to-end comparison",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cpus']} CPUs, "
        f"{meta['machine']['system']}; Python {meta['machine']['python']}, "
        f"uvloop {meta['machine']['uvloop']}, fastnet {meta['machine']['fastnet']} "
        f"(extension built: {meta['machine']['extension_built']})",
        f"- command: `{meta['command']}`",
        f"- pinning: {meta['pinning']}",
        f"- each figure: median of {meta['runs']} runs of {meta['duration_s']:g} s "
        f"after {meta['warmup_s']:g} s warmup; spread = min-max over the runs",
        f"- whole run: {result['elapsed_s']:.0f} s",
        f"- noise: {noise_statement(cases, meta)}",
        f"- load generator: {meta.get('generator', 'python -m fastnet.loadgen')}",
    ]
    if meta.get("tokio"):
        versions = ", ".join(f"{name} {version}" for name, version in meta["tokio"].items())
        lines.append(f"- Tokio baseline: {versions} (Debian's packaged crates)")
    if meta.get("fastnet_before"):
        before = meta["fastnet_before"]
        lines.append(
            f"- before: fastnet {before['fastnet']} on Python {before['python']} "
            f"(extension built: {before['extension_built']}), the *-before servers"
        )
    lines += [
        "",
        "Columns: frames/s echoed; payload MiB/s each way; round-trip latency; the server's",
        "own CPU time per frame (user + system, all threads, over the measured window);",
        "ratios of frames/s and of CPU efficiency (streams CPU per frame / this one's)",
        "against the streams baseline on the same loop; frames/s against the Protocol and",
        "the reflecting Protocol on the same loop and against Tokio; server CPU per frame",
        "divided by Tokio's (the issue's measure: lower is better, 1.00x is Tokio's cost);",
        "the generator's own CPU time per frame. † marks cases where the generator was the",
        f"limit or close to it: it kept {GENERATOR_BUSY:.0%} of its core busy, or spent at least",
        f"{GENERATOR_BOUND:.0%} of the server's CPU time per frame. There frames/s may be the",
        "generator's figure, and the server-CPU-per-frame columns are the fair comparison.",
        "",
    ]
    for workload in WORKLOADS:
        rows = [c for c in cases if c["workload"] == workload.name]
        if not rows:
            continue
        lines += [
            f"## {workload.title}",
            "",
            "| server | loop | frames/s | spread | MiB/s | p50 ms | p99 ms | server µs/frame "
            "| x streams | CPU x streams | x protocol | x reflect | x tokio | µs ÷ tokio "
            "| generator µs/frame |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        tokio = find(cases, workload.name, "tokio", NATIVE_LOOP)["summary"]
        for case in rows:
            kind = next(s for s in SERVERS if s.name == case["server"])
            s = case["summary"]
            if s is None:
                lines.append(
                    f"| {kind.title} | {case['loop']} | failed: {case['failure']} "
                    "| | | | | | | | | | | | |"
                )
                continue
            streams = find(cases, workload.name, "streams", case["loop"])["summary"]
            protocol = find(cases, workload.name, "protocol", case["loop"])["summary"]
            reflect = find(cases, workload.name, "protocol-reflect", case["loop"])["summary"]
            fps = median(s, "frames_per_s")
            spread = s["frames_per_s"]
            cpu = median(s, "server_cpu_us_per_frame")
            gen = median(s, "loadgen_cpu_us_per_frame")
            mark = " †" if generator_bound(s) else ""
            errors = f" ({s['errors']} errors)" if s["errors"] else ""
            lines.append(
                f"| {kind.title}{errors} | {case['loop']} | {fmt_rate(fps)} "
                f"| {fmt_rate(spread['min'])}-{fmt_rate(spread['max'])} "
                f"| {fmt_num(median(s, 'mib_per_s'), 1)} "
                f"| {fmt_num(median(s, 'p50_ms'), 3)} | {fmt_num(median(s, 'p99_ms'), 3)} "
                f"| {fmt_num(cpu, 3)} "
                f"| {fmt_ratio(fps, median(streams, 'frames_per_s'))} "
                f"| {fmt_ratio(median(streams, 'server_cpu_us_per_frame'), cpu)} "
                f"| {fmt_ratio(fps, median(protocol, 'frames_per_s'))} "
                f"| {fmt_ratio(fps, median(reflect, 'frames_per_s'))} "
                f"| {fmt_ratio(fps, median(tokio, 'frames_per_s'))} "
                f"| {fmt_ratio(cpu, median(tokio, 'server_cpu_us_per_frame'))} "
                f"| {fmt_num(gen, 3)}{mark} |"
            )
        lines.append("")
    lines += targets_section(cases)
    lines += generator_section(cases)
    if result.get("memory"):
        lines += memory_section(result["memory"])
    return "\n".join(lines) + "\n"


def _metric(values: dict[str, Any], metric: str) -> float | None:
    """A metric of one run, or the median of a summary's."""
    value = values.get(metric)
    if isinstance(value, dict):
        return median(values, metric)
    return value


def generator_bound(values: dict[str, Any]) -> bool:
    """True when the generator was, or was close to, the limit (a summary or one run).

    Either it kept its core busy (``GENERATOR_BUSY``), or it spent at least
    ``GENERATOR_BOUND`` of the server's CPU time per frame.
    """
    busy = _metric(values, "loadgen_cpu_util")
    if busy is not None and busy >= GENERATOR_BUSY:
        return True
    gen = _metric(values, "loadgen_cpu_us_per_frame")
    server = _metric(values, "server_cpu_us_per_frame")
    return gen is not None and server is not None and gen >= GENERATOR_BOUND * server


def noise_statement(cases: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """How much CPU everything else on the machine used during the measured windows."""
    values = sorted(
        run["other_cpu_util"]
        for case in cases
        for run in case["runs"]
        if run.get("other_cpu_util") is not None
    )
    if not values:
        return "not measured (needs Linux /proc/stat)"
    retried = sum(run.get("attempts", 1) - 1 for case in cases for run in case["runs"])
    return (
        f"other processes used a median of {statistics.median(values):.2f} CPU cores "
        f"(max {values[-1]:.2f}) while runs were measured; server and generator are "
        "pinned, but others' work still shares their CPUs. Runs with more than "
        f"{meta.get('noisy_load', NOISY_LOAD):g} cores of other load were repeated "
        f"(at most {meta.get('noisy_retries', NOISY_RETRIES)} times, "
        f"keeping the quietest attempt): {retried} repetitions"
    )


@dataclass(frozen=True)
class Target:
    """One of issue 8's targets: ``ours`` against ``base`` on one workload.

    ``measure`` is ``"fps"`` (ours' frames/s at least ``bound`` x base's),
    ``"cpu"`` (ours' server CPU per frame at most ``bound`` x base's) or
    ``"both"`` (frames/s at least ``bound`` x and CPU per frame at most
    1/``bound`` x base's: "at least as good").
    """

    workload: str
    ours: tuple[str, str]  # (server, loop)
    base: tuple[str, str]
    measure: str
    bound: float


# Issue 8 ("connection core"), fastnet's callback echo on uvloop against Tokio
# and the reflecting Protocol, the task echo against the callback echo, and on
# CPython's own loop every figure against the same fastnet before the change.
TARGETS = (
    Target("small", ("fastnet", "uvloop"), ("tokio", NATIVE_LOOP), "cpu", 1.1),
    Target("rpc", ("fastnet", "uvloop"), ("protocol-reflect", "uvloop"), "fps", 1.0),
    Target("rpc", ("fastnet", "uvloop"), ("tokio", NATIVE_LOOP), "fps", 0.9),
    Target("many", ("fastnet", "uvloop"), ("protocol-reflect", "uvloop"), "fps", 1.0),
    Target("many", ("fastnet", "uvloop"), ("tokio", NATIVE_LOOP), "fps", 0.9),
    Target("large", ("fastnet", "uvloop"), ("tokio", NATIVE_LOOP), "fps", 1.0),
    Target("small", ("fastnet-task", "uvloop"), ("fastnet", "uvloop"), "cpu", 1.3),
    *(
        Target(workload.name, (ours, "asyncio"), (f"{ours}-before", "asyncio"), "both", 1.0)
        for workload in WORKLOADS
        for ours in ("fastnet", "fastnet-task")
    ),
)


def judge(target: Target, ours: dict[str, Any], base: dict[str, Any]) -> tuple[str, str, str]:
    """The frames/s ratio, the CPU-per-frame ratio (ours / base) and the verdict."""
    rate = _ratio(median(ours, "frames_per_s"), median(base, "frames_per_s"))
    cpu = _ratio(median(ours, "server_cpu_us_per_frame"), median(base, "server_cpu_us_per_frame"))
    if rate is None or cpu is None:
        return fmt_num(rate), fmt_num(cpu), "no data"
    note = " (generator-bound)" if generator_bound(ours) or generator_bound(base) else ""
    cpu_met = cpu <= (target.bound if target.measure == "cpu" else 1.0 / target.bound)
    if target.measure == "cpu":
        verdict = "met" if cpu_met else "not met"
    else:
        rate_met = rate >= target.bound
        if rate_met and (cpu_met or target.measure == "fps"):
            verdict = "met"
        elif cpu_met and note:
            verdict = "met on CPU per frame only"
        else:
            verdict = "not met"
    return fmt_num(rate), fmt_num(cpu), verdict + note


def targets_section(cases: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Targets (issue 8, connection core)",
        "",
        "Each row: a fastnet server against a baseline. Frames/s ratio = ours ÷ baseline",
        "(higher is better); CPU ratio = ours' server µs/frame ÷ the baseline's (lower is",
        "better). A frames/s target missed where the generator was the limit (it is, near",
        "Tokio's figures) is judged on CPU per frame instead, and says so.",
        "",
        "| workload | server | baseline | target | frames/s ratio | CPU ratio | verdict |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for target in TARGETS:
        ours = find(cases, target.workload, *target.ours)["summary"]
        base = find(cases, target.workload, *target.base)["summary"]
        if ours is None or base is None:
            continue
        wanted = {
            "cpu": f"CPU/frame ≤ {target.bound:g}x",
            "fps": f"frames/s ≥ {target.bound:g}x",
            "both": "at least as good",
        }[target.measure]
        rate, cpu, verdict = judge(target, ours, base)
        lines.append(
            f"| {target.workload} | {target.ours[0]} {target.ours[1]} "
            f"| {target.base[0]} {target.base[1]} | {wanted} | {rate}x | {cpu}x | {verdict} |"
        )
    lines.append("")
    return lines


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def generator_section(cases: list[dict[str, Any]]) -> list[str]:
    """Was the generator the bottleneck? Server busy time, and CPU per frame on each side."""
    lines = [
        "## Load generator headroom",
        "",
        "Server and generator each have one core. Two checks that the figures are the",
        "servers' own: the server's CPU use during the window (a server busy 100% of its core",
        "is the limit whatever drives it; its idle share bounds how much faster it could have",
        "gone), and the generator's own CPU use and CPU per frame (a generator busy near",
        "100% of its core set the pace; below the server's CPU per frame, one generator",
        "core out-drives one server core). Per workload: the fastest server, the least busy",
        "server, and the cases marked † above, where the generator was the bottleneck or",
        "close to it: compare those by server CPU per frame.",
        "",
        "| workload | fastest server | frames/s | its CPU busy | server us/frame "
        "| generator busy | generator us/frame | generator ceiling | least busy server "
        "| † cases |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for workload in WORKLOADS:
        rows = [c for c in cases if c["workload"] == workload.name and c["summary"]]
        if not rows:
            continue
        best = max(rows, key=lambda c: median(c["summary"], "frames_per_s") or 0.0)
        idle = min(rows, key=lambda c: median(c["summary"], "server_cpu_util") or 0.0)
        kind = next(s for s in SERVERS if s.name == best["server"])
        gen_us = median(best["summary"], "loadgen_cpu_us_per_frame")
        busy = median(best["summary"], "server_cpu_util")
        least = median(idle["summary"], "server_cpu_util")
        bound = [f"{c['server']} {c['loop']}" for c in rows if generator_bound(c["summary"])]
        lines.append(
            f"| {workload.name} | {kind.title}, {best['loop']} "
            f"| {fmt_rate(median(best['summary'], 'frames_per_s'))} "
            f"| {fmt_percent(busy)} "
            f"| {fmt_num(median(best['summary'], 'server_cpu_us_per_frame'), 3)} "
            f"| {fmt_percent(median(best['summary'], 'loadgen_cpu_util'))} "
            f"| {fmt_num(gen_us, 3)} "
            f"| {fmt_rate(1e6 / gen_us) if gen_us else '-'} "
            f"| {idle['server']} {idle['loop']}: {fmt_percent(least)} "
            f"| {', '.join(bound) if bound else 'none'} |"
        )
    lines.append("")
    return lines


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def memory_section(memory: dict[str, Any]) -> list[str]:
    lines = [
        "## Memory: server RSS with idle connections",
        "",
        f"{memory['connections']:,} idle connections (`benchmarks/memory.py`); "
        "RSS growth divided by the number of connections.",
        "",
        "| server | loop | RSS before | RSS with connections | per connection "
        "| after one 128 B echo each | per connection |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in memory["servers"]:
        if row.get("failure"):
            lines.append(f"| {row['title']} | {row['loop']} | failed: {row['failure']} | | | | |")
            continue
        lines.append(
            f"| {row['title']} | {row['loop']} | {row['rss_before_kib'] / 1024:.1f} MiB "
            f"| {row['rss_connected_kib'] / 1024:.1f} MiB "
            f"| {row['per_connection_kib']:.1f} KiB "
            f"| {row['rss_after_echo_kib'] / 1024:.1f} MiB "
            f"| {row['per_connection_after_echo_kib']:.1f} KiB |"
        )
    lines.append("")
    return lines


def chart(result: dict[str, Any], path: Path) -> None:
    """Bar chart: frames/s (top row) and server CPU per frame (bottom row) per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    workloads = [w for w in WORKLOADS if any(c["workload"] == w.name for c in cases)]
    servers = [s for s in SERVERS if any(c["server"] == s.name for c in cases)]
    width_each = max(4.6, 0.55 * len(servers))
    fig, axes = plt.subplots(
        2, len(workloads), figsize=(width_each * len(workloads), 8.4), squeeze=False
    )
    colours = {"asyncio": "#8fb0d0", "uvloop": "#2f5f8f", NATIVE_LOOP: "#b5562b"}
    width = 0.38
    rows = (
        ("frames_per_s", 1e-3, "thousand frames/s (higher is better)"),
        ("server_cpu_us_per_frame", 1.0, "server CPU us per frame (lower is better)"),
    )
    for row, (metric, scale, ylabel) in enumerate(rows):
        for column, workload in enumerate(workloads):
            ax = axes[row][column]
            for offset, loop in enumerate((*LOOPS, NATIVE_LOOP)):
                xs, heights, low, high = [], [], [], []
                for index, kind in enumerate(servers):
                    s = find(cases, workload.name, kind.name, loop)["summary"]
                    if s is None or s.get(metric) is None:
                        continue
                    value = s[metric]
                    # A native server has one bar, centred; the others one per loop.
                    xs.append(index if kind.native else index + (offset - 0.5) * width)
                    heights.append(value["median"] * scale)
                    low.append((value["median"] - value["min"]) * scale)
                    high.append((value["max"] - value["median"]) * scale)
                if xs:
                    ax.bar(
                        xs, heights, width, yerr=[low, high], capsize=3, label=loop,
                        color=colours[loop],
                    )  # fmt: skip
            ax.set_xticks(range(len(servers)))
            ax.set_xticklabels(
                [textwrap.fill(s.title, CHART_LABEL_WIDTH) for s in servers],
                fontsize=7,
            )
            if column == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if row == 0:
                ax.set_title(workload.title, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    meta = result["meta"]
    fig.suptitle(
        f"fastnet echo vs baselines: median of {meta['runs']} runs, bars span min-max "
        f"({meta['date']}, {meta['machine']['cpu']}, server and generator on one core each)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_memory(args: argparse.Namespace) -> dict[str, Any] | None:
    command = [sys.executable, str(HERE / "memory.py"), "--json"]
    command += ["--servers", ",".join(MEMORY_SERVERS), "--loops", ",".join(LOOPS)]
    if args.memory_connections:
        command += ["--connections", str(args.memory_connections)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not done.stdout.strip():
        print(f"memory.py failed: {done.stderr.strip()}", file=sys.stderr)
        return None
    memory: dict[str, Any] = json.loads(done.stdout)
    return memory


# Characters per line of a server's name under its bars: fits the bars of two
# loops at the chart's size, with up to nine servers per workload.
CHART_LABEL_WIDTH = 12


# --------------------------------------------------------------------------- the TLS set


# The TLS set (--set tls, issue 9): fastnet's callback echo against the
# reflecting Protocol, both serving TLS on the same loop, with certificates
# made by trustme at run time. The C generator speaks no TLS: the echo
# workloads use python -m fastnet.loadgen --tls, and the connection workloads
# benchmarks/tls_load.py. Alongside, plain-TCP fastnet on uvloop (compare.py's
# generator), to show the plain path unchanged by TLS support.
TLS_LOAD = HERE / "tls_load.py"
# --------------------------------------------------------------------------- the router set

ROUTER_SERVERS = ("fastnet", "router-echo", "router-echo-async", "router-msgspec")
# Issue 12's targets: (server, workload, least ratio to fastnet's plain echo frames/s).
ROUTER_TARGETS = (
    ("router-echo", "small", 0.8),
    ("router-echo", "rpc", 0.8),
    ("router-echo-async", "small", 0.6),
)


def router_markdown(result: dict[str, Any]) -> str:
    """router.md: each router server against plain echo, per workload and loop; the targets."""
    meta = result.get("meta", {})
    cases = {(c["workload"], c["server"], c["loop"]): c for c in result["cases"]}
    lines = [
        "# The router against plain echo",
        "",
        f"Command: `{meta.get('command', 'python benchmarks/compare.py --set router')}`, "
        f"{meta.get('date', '')}; {meta.get('runs', '?')} runs of "
        f"{meta.get('duration_s', '?')} s per case, interleaved; medians; "
        f"{meta.get('pinning', '')}. Generator: the C one (`loadgen_c/cloadgen.c --protocol "
        "router`), every reply matched by id and its body compared.",
        "",
        "Servers: `fastnet` is `fastnet serve echo` (the callback handler, raw frames); "
        "`router-echo` answers router requests from a plain handler, `router-echo-async` from "
        "an `async def` one (it does not await: its first step runs inline), `router-msgspec` "
        "decodes a 36-byte msgpack struct, builds a new one and encodes it "
        "(`servers/router_msgspec.py`). Cells: frames/s · server CPU µs per frame · ratio to "
        "`fastnet` in the same loop and workload.",
        "",
    ]
    workloads = [w for w in WORKLOADS if any(c["workload"] == w.name for c in result["cases"])]
    loops = sorted({c["loop"] for c in result["cases"]}, key=LOOPS.index)
    for workload in workloads:
        lines += [f"## {workload.title}", ""]
        lines.append("| server | " + " | ".join(loops) + " |")
        lines.append("|---|" + "---:|" * len(loops))
        for server in ROUTER_SERVERS:
            cells = []
            for loop in loops:
                case = cases.get((workload.name, server, loop))
                base = cases.get((workload.name, "fastnet", loop))
                summary = case and case["summary"]
                if not summary:
                    cells.append("failed" if case and case["failure"] else "-")
                    continue
                fps = summary["frames_per_s"]["median"]
                cpu = summary["server_cpu_us_per_frame"]
                cell = f"{fps:,.0f} · {cpu['median']:.2f}" if cpu else f"{fps:,.0f}"
                if base and base["summary"] and server != "fastnet":
                    ratio = fps / base["summary"]["frames_per_s"]["median"]
                    cell += f" · {ratio:.2f}x"
                cells.append(cell)
            lines.append(f"| {server} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets", "", "| target | loop | ratio | verdict |", "|---|---|---:|---|"]
    for server, workload, least in ROUTER_TARGETS:
        for loop in loops:
            case = cases.get((workload, server, loop))
            base = cases.get((workload, "fastnet", loop))
            if not (case and case["summary"] and base and base["summary"]):
                continue
            ratio = (
                case["summary"]["frames_per_s"]["median"]
                / base["summary"]["frames_per_s"]["median"]
            )
            verdict = "met" if ratio >= least else "not met"
            lines.append(
                f"| {server} ≥ {least}x echo, {workload} | {loop} | {ratio:.2f}x | {verdict} |"
            )
    lines.append("")
    return "\n".join(lines)


TLS_SERVERS = ("fastnet", "protocol-reflect")
TLS_BASELINE = "protocol-reflect"
TLS_ECHO_WORKLOADS = ("small", "large")
TLS_PLAIN_WORKLOADS = ("small", "rpc")
TLS_LOOPS = ("uvloop", "asyncio")
# Issue 9's targets: fastnet ÷ the TLS Protocol on the same loop (frames/s or
# connections/s at least `bound`), and RSS per idle TLS connection on uvloop.
TLS_TARGETS = (("small", 1.0), ("large", 1.5), ("connect", 0.9))
TLS_IDLE_TARGET_KIB = 64.0
# Python generator processes for the TLS echo workloads: the generator has
# one core (CPU 1), and processes pinned to one core only share it, so one.
TLS_GENERATOR_PROCESSES = 1


@dataclass(frozen=True)
class TLSCase:
    """One case of the TLS set.

    ``mode``: ``echo`` (TLS echo, the Python generator), ``plain`` (plain
    TCP, compare.py's generator), ``connect`` (new TLS connections per second)
    or ``idle`` (RSS per idle TLS connection).
    """

    mode: str
    workload: str  # a WORKLOADS name for echo and plain; "connect" or "idle"
    server: str
    loop: str

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.workload}"


@dataclass(frozen=True)
class TLSCertificates:
    """PEM files trustme made: a CA, and a server certificate for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path
    key_type: str

    def server_args(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key))


def make_certificates(directory: Path) -> TLSCertificates:
    """A fresh CA and server certificate (trustme's default key type) in ``directory``."""
    try:
        import trustme
    except ImportError:
        raise SystemExit(
            "compare.py --set tls: trustme is needed (pip install trustme; in the test extra)"
        ) from None
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    certs = TLSCertificates(
        ca=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        key_type="",
    )
    ca.cert_pem.write_to_path(str(certs.ca))
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(certs.cert), append=True)
    issued.private_key_pem.write_to_path(str(certs.key))
    key = load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key_type = f"ECDSA {key.curve.name}"
    elif isinstance(key, rsa.RSAPrivateKey):
        key_type = f"RSA {key.key_size}"
    else:
        key_type = type(key).__name__
    return TLSCertificates(certs.ca, certs.cert, certs.key, key_type)


def tls_cases(args: argparse.Namespace) -> list[TLSCase]:
    loops = [loop for loop in TLS_LOOPS if loop in args.loops]
    cases = [
        TLSCase("echo", workload, server, loop)
        for workload in TLS_ECHO_WORKLOADS
        for server in TLS_SERVERS
        for loop in loops
    ]
    plain_servers = ["fastnet"] + (["fastnet-before"] if args.fastnet_before else [])
    cases += [
        TLSCase("plain", workload, server, "uvloop")
        for workload in TLS_PLAIN_WORKLOADS
        for server in plain_servers
    ]
    cases += [TLSCase("connect", "connect", s, loop) for s in TLS_SERVERS for loop in loops]
    cases += [TLSCase("idle", "idle", s, loop) for s in TLS_SERVERS for loop in loops]
    return cases


def tls_loadgen_command(
    server: ServerProcess, workload: Workload, args: argparse.Namespace, certs: TLSCertificates
) -> list[str]:
    loop = args.generator_loop
    return [
        sys.executable, "-m", "fastnet.loadgen", "--loop", loop,
        "--tls", "--tls-ca", str(certs.ca),
        "--processes", str(args.tls_generator_processes),
        *load_args(server, workload, args),
    ]  # fmt: skip


def tls_load_command(
    server: ServerProcess, case: TLSCase, args: argparse.Namespace, certs: TLSCertificates
) -> list[str]:
    command = [
        sys.executable, str(TLS_LOAD), "rate" if case.mode == "connect" else "idle",
        "--port", str(server.port),
        "--server-pid", str(server.proc.pid),
        "--loop", "uvloop" if args.generator_loop != "asyncio" else "asyncio",
        "--json",
    ]  # fmt: skip
    if case.mode == "connect":
        command += ["--connections", str(args.tls_connections)]
        command += ["--concurrency", str(args.tls_concurrency)]
        command += ["--warmup-connections", str(max(1, args.tls_connections // 10))]
    else:
        command += ["--connections", str(args.tls_idle_connections)]
    return command


def tls_run_once(
    case: TLSCase, args: argparse.Namespace, pin: bool, certs: TLSCertificates, label: str
) -> dict[str, Any]:
    """One run of a TLS-set case: a fresh server, its load, the server stopped."""
    kind = next(s for s in SERVERS if s.name == case.server)
    extra = () if case.mode == "plain" else certs.server_args()
    limit = args.tls_idle_connections + 10 if case.mode == "idle" else None
    # The idle case pins nothing: it measures memory, not time.
    server = ServerProcess(kind, case.loop, pin and case.mode != "idle", limit, extra)
    try:
        if case.mode in ("echo", "plain"):
            workload = next(w for w in WORKLOADS if w.name == case.workload)
            if case.mode == "plain":
                command = loadgen_command(server, workload, args)
            else:
                command = tls_loadgen_command(server, workload, args, certs)
            timeout = args.duration + args.warmup + 60.0
        else:
            command = tls_load_command(server, case, args, certs)
            timeout = 300.0
        done = subprocess.run(
            pinned(LOAD_CPU, command, pin and case.mode != "idle"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if not done.stdout.strip():
            raise RuntimeError(f"load failed: {done.stderr.strip()[-500:]}")
        report: dict[str, Any] = json.loads(done.stdout)
    finally:
        problem = server.stop()
        if problem:
            print(f"{label} warning: the server {problem}", file=sys.stderr, flush=True)
    return flatten(report) if case.mode in ("echo", "plain") else report


def tls_run_quietly(
    case: TLSCase, args: argparse.Namespace, pin: bool, certs: TLSCertificates, label: str
) -> dict[str, Any]:
    """``tls_run_once``, repeated while other processes loaded the machine (as ``run_quietly``)."""
    attempts = []
    for attempt in range(1 + args.noisy_retries):
        result = tls_run_once(case, args, pin, certs, label)
        attempts.append(result)
        other = result.get("other_cpu_util")
        if other is None or other <= args.noisy_load:
            break
        then = "again" if attempt < args.noisy_retries else "kept, no retries left"
        print(f"{label} noisy ({other:.2f} cores of other load): {then}", file=sys.stderr)
    best = min(attempts, key=lambda r: r.get("other_cpu_util") or 0.0)
    best["attempts"] = len(attempts)
    return best


TLS_METRICS = {
    "connect": (
        "conns_per_s",
        "server_cpu_us_per_conn",
        "server_cpu_util",
        "client_cpu_util",
        "client_cpu_us_per_conn",
        "other_cpu_util",
    ),
    "idle": (
        "rss_before_kib",
        "rss_connected_kib",
        "rss_after_echo_kib",
        "per_connection_kib",
        "per_connection_after_echo_kib",
    ),
}


def tls_summarise(mode: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    if mode in ("echo", "plain"):
        return summarise(runs)
    summary: dict[str, Any] = {"runs": len(runs)}
    for metric in TLS_METRICS[mode]:
        values = [r[metric] for r in runs if r.get(metric) is not None]
        summary[metric] = (
            {"median": statistics.median(values), "min": min(values), "max": max(values)}
            if values
            else None
        )
    summary["errors"] = sum(r.get("errors", 0) for r in runs)
    return summary


def run_tls_set(args: argparse.Namespace, pin: bool, certs: TLSCertificates) -> dict[str, Any]:
    cases = tls_cases(args)
    runs: dict[TLSCase, list[dict[str, Any]]] = {case: [] for case in cases}
    failures: dict[TLSCase, str] = {}
    total = len(cases) * args.runs
    started = time.monotonic()
    step = 0
    sys.path.insert(0, str(HERE))
    import tls_load

    # The idle case's server holds one descriptor per connection: it inherits this limit.
    tls_load.raise_fd_limit(args.tls_idle_connections + tls_load.FD_MARGIN)
    for round_number in range(args.runs):
        for case in cases:
            step += 1
            if case in failures:
                continue
            label = f"[{step}/{total}] {case.label:<13} {case.server:<16} {case.loop:<8}"
            try:
                result = tls_run_quietly(case, args, pin, certs, label)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                failures[case] = str(exc)
                print(f"{label} FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            result["round"] = round_number
            runs[case].append(result)
            print(f"{label} {tls_progress(case, result)}  ({time.monotonic() - started:4.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    return {
        "cases": [
            {
                "mode": case.mode,
                "workload": case.workload,
                "server": case.server,
                "loop": case.loop,
                "runs": runs[case],
                "summary": tls_summarise(case.mode, runs[case]) if runs[case] else None,
                "failure": failures.get(case),
            }
            for case in cases
        ],
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def tls_progress(case: TLSCase, result: dict[str, Any]) -> str:
    if case.mode == "idle":
        return (
            f"{result['per_connection_kib']:7.1f} KiB per idle connection, "
            f"{result['per_connection_after_echo_kib']:7.1f} after one echo"
        )
    if case.mode == "connect":
        return (
            f"{result['conns_per_s']:>9,.0f} conns/s  server "
            f"{result['server_cpu_us_per_conn']:,.0f} us/conn  "
            f"server {result['server_cpu_util']:.2f} cpu  client "
            f"{result['client_cpu_util']:.2f} cpu  other {result['other_cpu_util']:.2f}  "
            f"errors {result['errors']}"
        )
    other = result["other_cpu_util"]
    return (
        f"{result['frames_per_s']:>10,.0f} frames/s  server {result['server_cpu_us_per_frame']:.3f}"
        f" us/frame  server {result['server_cpu_util'] or 0:.2f} cpu  generator "
        f"{result['loadgen_cpu_util'] or 0:.2f} cpu  other "
        f"{'-' if other is None else f'{other:.2f}'}  errors {result['errors']}"
        + ("  generator-bound" if generator_bound(result) else "")
    )


def tls_find(cases: list[dict[str, Any]], mode: str, workload: str, server: str, loop: str) -> Any:
    for case in cases:
        if (case["mode"], case["workload"], case["server"], case["loop"]) == (
            mode,
            workload,
            server,
            loop,
        ):
            return case["summary"]
    return None


def stored_plain_figures(path: Path = RESULTS_DIR / "compare.json") -> dict[str, Any]:
    """fastnet uvloop's small and rpc figures in the published compare.json, with its date."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    figures: dict[str, Any] = {"date": stored.get("meta", {}).get("date")}
    for case in stored.get("cases", []):
        if case["server"] == "fastnet" and case["loop"] == "uvloop" and case["summary"]:
            figures[case["workload"]] = {
                "frames_per_s": median(case["summary"], "frames_per_s"),
                "server_cpu_us_per_frame": median(case["summary"], "server_cpu_us_per_frame"),
            }
    return figures


def tls_markdown(result: dict[str, Any]) -> str:
    cases = result["cases"]
    meta = result["meta"]
    machine = meta["machine"]
    lines = [
        "# fastnet over TLS: echo, new connections, idle memory (issue 9)",
        "",
        f"- date: {meta['date']}; fastnet {machine['fastnet']} ({meta['fastnet_source']}), "
        f"extension built: {machine['extension_built']}",
        f"- machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['system']}; "
        f"Python {machine['python']}, uvloop {machine['uvloop']}, {meta['openssl']}",
        f"- command: `{meta['command']}`",
        f"- pinning: {meta['pinning']} (the idle-memory cases are not pinned: they time nothing)",
        f"- TLS: {meta['tls']}",
        f"- each figure: median of {meta['runs']} runs (fresh server each), rounds interleaved; "
        f"echo runs {meta['duration_s']:g} s after {meta['warmup_s']:g} s warmup; "
        "spread = min-max",
        f"- noise: {tls_noise(cases, meta)}",
        f"- whole run: {result['elapsed_s']:.0f} s",
        "",
        "## TLS echo and new TLS connections",
        "",
        f"Echo: `python -m fastnet.loadgen --tls` ({meta['tls_generator_processes']} "
        "process, uvloop), which verifies every echoed byte. New connections: "
        f"`benchmarks/tls_load.py rate`, {meta['tls_connections']:,} connections over "
        f"{meta['tls_concurrency']} concurrent workers, each: TCP connect, full TLS handshake "
        "(no resumption), one 64 B frame echoed, close_notify and close. Server µs = the "
        "server's own CPU time (user + system) per frame or per connection over the measured "
        "window. The ratios are fastnet ÷ the TLS reflecting Protocol on the same loop: rate "
        "(higher is better) and CPU per frame or connection (lower is better). † = the "
        f"client kept at least {GENERATOR_BUSY:.0%} of its core busy: it set the pace, the rate "
        "is a lower bound of the server's, and server µs is the fair comparison.",
        "",
        "| workload | server | loop | frames/s or conns/s | spread | p50 ms | server µs "
        "| server busy | client busy | client µs | rate ÷ Protocol | CPU ÷ Protocol |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    titles = {
        "small": "echo 64 x 16 x 64 B",
        "large": "echo 8 x 4 x 64 KiB",
        "connect": "new connections",
    }
    for workload, mode in (("small", "echo"), ("large", "echo"), ("connect", "connect")):
        for case in cases:
            if case["mode"] != mode or case["workload"] != workload:
                continue
            lines.append(tls_row(titles[workload], case, cases))
    lines += ["", "## Memory per idle TLS connection", ""]
    lines += [
        f"`benchmarks/tls_load.py idle`: one warm-up connection, then "
        f"{meta['tls_idle_connections']:,} TLS connections handshaken and left idle; the "
        "server's RSS growth (VmRSS, settled) divided by their number; then one 128 B frame "
        "echoed on each and the RSS again.",
        "",
        "| server | loop | RSS before | RSS with the idle connections | per idle connection "
        "| spread | after one echo each | per connection |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        if case["mode"] != "idle":
            continue
        s = case["summary"]
        name = server_title(case["server"], tls=True)
        if s is None:
            lines.append(f"| {name} | {case['loop']} | failed: {case['failure']} | | | | | |")
            continue
        per = s["per_connection_kib"]
        mib = {key: s[key]["median"] / 1024 for key in TLS_METRICS["idle"][:3]}
        lines.append(
            f"| {name} | {case['loop']} | {mib['rss_before_kib']:.1f} MiB "
            f"| {mib['rss_connected_kib']:.1f} MiB "
            f"| {per['median']:.1f} KiB | {per['min']:.1f}-{per['max']:.1f} "
            f"| {mib['rss_after_echo_kib']:.1f} MiB "
            f"| {s['per_connection_after_echo_kib']['median']:.1f} KiB |"
        )
    lines += tls_plain_section(cases, meta)
    lines += tls_targets_section(cases, meta.get("noisy_load", NOISY_LOAD))
    return "\n".join(lines) + "\n"


def server_title(name: str, tls: bool) -> str:
    titles = {
        "fastnet": "fastnet echo (callback)",
        "protocol-reflect": "reflecting Protocol",
        "fastnet-before": "fastnet echo, before TLS support",
    }
    return titles.get(name, name) + (" TLS" if tls else "")


def tls_row(title: str, case: dict[str, Any], cases: list[dict[str, Any]]) -> str:
    s = case["summary"]
    name = server_title(case["server"], tls=True)
    if s is None:
        return f"| {title} | {name} | {case['loop']} | failed: {case['failure']} | | | | | | | | |"
    base = tls_find(cases, case["mode"], case["workload"], TLS_BASELINE, case["loop"])
    if case["mode"] == "connect":
        rate_key, cpu_key, busy_key, client_key = (
            "conns_per_s",
            "server_cpu_us_per_conn",
            "client_cpu_util",
            "client_cpu_us_per_conn",
        )
        p50 = "-"
        digits = 0
    else:
        rate_key, cpu_key, busy_key, client_key = (
            "frames_per_s",
            "server_cpu_us_per_frame",
            "loadgen_cpu_util",
            "loadgen_cpu_us_per_frame",
        )
        p50 = fmt_num(median(s, "p50_ms"), 3)
        digits = 3
    bound = tls_client_bound(s)
    rate = median(s, rate_key)
    cpu = median(s, cpu_key)
    spread = s[rate_key]
    ratio = "-" if case["server"] == TLS_BASELINE else fmt_ratio(rate, median(base, rate_key))
    cpu_ratio = "-" if case["server"] == TLS_BASELINE else fmt_ratio(cpu, median(base, cpu_key))
    errors = f" ({s['errors']} errors)" if s["errors"] else ""
    return (
        f"| {title} | {name}{errors} | {case['loop']} | {fmt_rate(rate)} "
        f"| {fmt_rate(spread['min'])}-{fmt_rate(spread['max'])} | {p50} "
        f"| {fmt_num(cpu, digits)} | {fmt_percent(median(s, 'server_cpu_util'))} "
        f"| {fmt_percent(median(s, busy_key))}{' †' if bound else ''} "
        f"| {fmt_num(median(s, client_key), digits)} | {ratio} | {cpu_ratio} |"
    )


def tls_client_bound(values: dict[str, Any]) -> bool:
    """True when the client (echo generator or connection client) kept its core busy.

    Only busy time counts here, not compare.py's second test (a generator
    that spends as much CPU per frame as the server): over TLS both sides
    pay the same cipher per byte, so that test marks nearly every case,
    including ones where neither side was near its core's limit and the pace
    was set by the server's flow of records.
    """
    busy = _metric(values, "client_cpu_util")
    if busy is None:
        busy = _metric(values, "loadgen_cpu_util")
    return busy is not None and busy >= GENERATOR_BUSY


def tls_noise(cases: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    values = sorted(
        run["other_cpu_util"]
        for case in cases
        for run in case["runs"]
        if run.get("other_cpu_util") is not None
    )
    if not values:
        return "not measured"
    retried = sum(run.get("attempts", 1) - 1 for case in cases for run in case["runs"])
    return (
        f"other processes used a median of {statistics.median(values):.2f} CPU cores "
        f"(max {values[-1]:.2f}) during the timed runs; runs above "
        f"{meta['noisy_load']:g} cores were repeated (at most {meta['noisy_retries']} times, "
        f"the quietest kept): {retried} repetitions"
    )


def tls_plain_section(cases: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    stored = meta.get("stored_plain") or {}
    lines = [
        "",
        "## Plain TCP, same sitting: unchanged by TLS support?",
        "",
        f"fastnet's callback echo on uvloop, plain TCP, {meta['generator']}. "
        + (
            "`fastnet-before` is fastnet before TLS support "
            f"({meta.get('fastnet_before_note', 'the --fastnet-before interpreter')}), "
            "run in the same rounds. "
            if any(c["server"] == "fastnet-before" for c in cases)
            else ""
        )
        + f"The last columns are the published figures (results/compare.json, "
        f"{stored.get('date', '-')}, before TLS support; another sitting).",
        "",
        "| workload | server | frames/s | spread | server µs/frame | frames/s ÷ before "
        "| µs ÷ before | published frames/s | published µs/frame |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        if case["mode"] != "plain":
            continue
        s = case["summary"]
        name = server_title(case["server"], tls=False)
        if s is None:
            lines.append(f"| {case['workload']} | {name} | failed: {case['failure']} | | | | | | |")
            continue
        before = tls_find(cases, "plain", case["workload"], "fastnet-before", case["loop"])
        published = stored.get(case["workload"]) or {}
        is_before = case["server"] == "fastnet-before"
        fps = median(s, "frames_per_s")
        cpu = median(s, "server_cpu_us_per_frame")
        mark = " †" if generator_bound(s) else ""
        lines.append(
            f"| {case['workload']} | {name} | {fmt_rate(fps)}{mark} "
            f"| {fmt_rate(s['frames_per_s']['min'])}-{fmt_rate(s['frames_per_s']['max'])} "
            f"| {fmt_num(cpu, 3)} "
            f"| {'-' if is_before else fmt_ratio(fps, median(before, 'frames_per_s'))} "
            f"| {'-' if is_before else fmt_ratio(cpu, median(before, 'server_cpu_us_per_frame'))} "
            f"| {fmt_rate(published.get('frames_per_s'))} "
            f"| {fmt_num(published.get('server_cpu_us_per_frame'), 3)} |"
        )
    return lines


def tls_targets_section(cases: list[dict[str, Any]], noisy_load: float = NOISY_LOAD) -> list[str]:
    lines = [
        "",
        "## Targets (issue 9)",
        "",
        "Rate targets: fastnet's rate ÷ the TLS reflecting Protocol's on the same loop. A rate",
        "set by the client (†: it kept its core busy) is a lower bound of the server's: a",
        "ratio above the bound with fastnet's side client-bound still holds, and one below it",
        "with the Protocol's side client-bound too. Otherwise the rate cannot decide, and the",
        "verdict is taken on the CPU efficiency ratio (the Protocol's server µs per frame or",
        "connection ÷ fastnet's, against the same bound): what one server core delivers.",
        "So is it when the runs were noisy (other processes used more than the noisy-load",
        "threshold, median over the kept runs of either side) and neither side kept its core",
        "busy: then both ran on what CPU the others left, and the rates say little.",
        "",
        "| target | loop | rate ratio | CPU efficiency ratio | verdict |",
        "|---|---|---:|---:|---|",
    ]
    names = {
        "small": ("echo", "TLS echo 64 x 16 x 64 B", "frames_per_s", "server_cpu_us_per_frame"),
        "large": ("echo", "TLS echo 8 x 4 x 64 KiB", "frames_per_s", "server_cpu_us_per_frame"),
        "connect": ("connect", "new TLS conns/s", "conns_per_s", "server_cpu_us_per_conn"),
    }
    for workload, bound in TLS_TARGETS:
        mode, title, rate_key, cpu_key = names[workload]
        for loop in TLS_LOOPS:
            ours = tls_find(cases, mode, workload, "fastnet", loop)
            base = tls_find(cases, mode, workload, TLS_BASELINE, loop)
            if ours is None or base is None:
                continue
            rate = _ratio(median(ours, rate_key), median(base, rate_key))
            efficiency = _ratio(median(base, cpu_key), median(ours, cpu_key))
            ours_bound, base_bound = tls_client_bound(ours), tls_client_bound(base)
            rate_met = rate is not None and rate >= bound
            cpu_met = efficiency is not None and efficiency >= bound
            others = [median(x, "other_cpu_util") or 0.0 for x in (ours, base)]
            starved = max(others) > noisy_load and not (ours_bound or base_bound)
            on_cpu = f"{'met' if cpu_met else 'not met'} on CPU per unit"
            if starved:
                verdict = f"{on_cpu} (noisy: {max(others):.2f} cores of other load)"
            elif rate_met and not base_bound:
                verdict = "met"
            elif not rate_met and not ours_bound:
                verdict = "not met"
            else:
                verdict = f"{on_cpu} (rate client-bound)"
            marks = " ".join(
                f"{side} †" for side, bound_ in (("fastnet", ours_bound), ("Protocol", base_bound))
                if bound_
            )  # fmt: skip
            lines.append(
                f"| {title} ≥ {bound:g}x Protocol | {loop} | {fmt_num(rate)}x "
                f"| {fmt_num(efficiency)}x | {verdict}{f' ({marks})' if marks else ''} |"
            )
    for loop in TLS_LOOPS:
        s = tls_find(cases, "idle", "idle", "fastnet", loop)
        if s is None:
            continue
        per = median(s, "per_connection_kib")
        base = median(tls_find(cases, "idle", "idle", TLS_BASELINE, loop), "per_connection_kib")
        if loop == "uvloop":
            verdict = "met" if per is not None and per <= TLS_IDLE_TARGET_KIB else "not met"
            wanted = f"RSS per idle TLS connection ≤ {TLS_IDLE_TARGET_KIB:g} KiB"
        else:
            verdict = "no target (asyncio's SSLProtocol buffers)"
            wanted = "RSS per idle TLS connection (informational)"
        lines.append(
            f"| {wanted} | {loop} | {fmt_num(per, 1)} KiB | Protocol: {fmt_num(base, 1)} KiB "
            f"| {verdict} |"
        )
    lines.append("")
    return lines


def tls_main(args: argparse.Namespace, pin: bool, machine: dict[str, Any]) -> int:
    """``--set tls``: certificates, the cases, the results in tls.json and tls.md."""
    import ssl

    extras = prepare(args)
    with tempfile.TemporaryDirectory(prefix="fastnet-tls-bench-") as directory:
        certs = make_certificates(Path(directory))
        print(f"certificates ({certs.key_type}) in {directory}", file=sys.stderr, flush=True)
        result = run_tls_set(args, pin, certs)
    source = subprocess.run(
        [sys.executable, "-c", "import fastnet, os; print(os.path.dirname(fastnet.__file__))"],
        capture_output=True,
        text=True,
        env=server_env(SERVERS[0]),
    ).stdout.strip()
    given = list(args.argv)
    if args.fastnet_before:
        given = [w.replace(args.fastnet_before, "PYTHON") for w in given]
    result["meta"] = {
        **extras,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "fastnet_source": args.fastnet_label or source.replace(str(HERE.parent) + os.sep, ""),
        "openssl": ssl.OPENSSL_VERSION,
        "tls": f"certificates by trustme ({certs.key_type}), made at run time; TLS 1.3 as "
        "negotiated (the generators report the session); the echo client verifies the "
        "server against the CA, the connection client does not (it would cost the client, "
        "not the server)",
        "command": "python benchmarks/compare.py" + (" " + " ".join(given) if given else ""),
        "pinning": f"server on CPU {SERVER_CPU}, client on CPU {LOAD_CPU} (taskset)"
        if pin
        else "none (server and client unpinned)",
        "runs": args.runs,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "noisy_load": args.noisy_load,
        "noisy_retries": args.noisy_retries,
        "tls_generator_processes": args.tls_generator_processes,
        "tls_connections": args.tls_connections,
        "tls_concurrency": args.tls_concurrency,
        "tls_idle_connections": args.tls_idle_connections,
        "stored_plain": stored_plain_figures(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.fastnet_before_note:
        result["meta"]["fastnet_before_note"] = args.fastnet_before_note
    text = tls_markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tls.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "tls.md").write_text(text)
        print(f"wrote {args.out}/tls.{{json,md}}", file=sys.stderr)
    failed = any(c["failure"] for c in result["cases"])
    errors = any(c["summary"] and c["summary"]["errors"] for c in result["cases"])
    return 1 if failed or errors else 0


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--set",
        choices=("plain", "tls", "router"),
        default="plain",
        help="plain: the comparison above (compare.{json,md,png}); tls: the TLS set "
        "(issue 9: TLS echo, new TLS connections/s, RSS per idle TLS connection, and plain "
        "fastnet uvloop in the same sitting), into tls.{json,md}; router: the router set "
        "(issue 12: router-echo plain and async, a msgspec struct, against plain echo, "
        "small and rpc), into router.{json,md} (default plain)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per case (3)")
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds (2)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warmup seconds (0.5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 run of 1 s after 0.25 s per case, no repeats, no memory; "
        "prints the table, writes no file",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS),
    )
    parser.add_argument(
        "--servers",
        default=None,
        help="comma-separated, from: "
        + ", ".join(s.name for s in SERVERS)
        + " (default: "
        + ", ".join(DEFAULT_SERVERS)
        + ", and with --fastnet-before also "
        + ", ".join(BEFORE_SERVERS)
        + ")",
    )
    parser.add_argument(
        "--fastnet-before",
        default=None,
        metavar="PYTHON",
        help="an interpreter (e.g. another venv's bin/python) whose fastnet runs as the "
        + " and ".join(BEFORE_SERVERS)
        + " servers, to compare before and after a change",
    )
    parser.add_argument(
        "--generator",
        choices=("c", "python"),
        default="c",
        help="load generator: c = loadgen_c/cloadgen.c, compiled with gcc -O2 on demand "
        "(python if that fails); python = python -m fastnet.loadgen (default c)",
    )
    parser.add_argument(
        "--loops", default=",".join(LOOPS), help="comma-separated subset of: asyncio, uvloop"
    )
    parser.add_argument(
        "--generator-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop of the Python load generator (auto: uvloop if installed)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--noisy-load",
        type=float,
        default=NOISY_LOAD,
        metavar="CORES",
        help="repeat a run when other processes used more CPU cores than this (%(default)s)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=NOISY_RETRIES,
        metavar="N",
        help="repeat a noisy run at most N times (%(default)s; 0 disables)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip benchmarks/memory.py")
    parser.add_argument(
        "--memory-connections", type=int, default=None, help="idle connections for memory.py"
    )
    tls = parser.add_argument_group("the TLS set (--set tls)")
    tls.add_argument(
        "--tls-generator-processes",
        type=int,
        default=TLS_GENERATOR_PROCESSES,
        metavar="K",
        help="python -m fastnet.loadgen --processes for the TLS echo (%(default)s: the "
        "generator has one pinned core)",
    )
    tls.add_argument(
        "--tls-connections",
        type=int,
        default=2000,
        metavar="N",
        help="new TLS connections measured per run (%(default)s)",
    )
    tls.add_argument(
        "--tls-concurrency",
        type=int,
        default=32,
        metavar="M",
        help="concurrent connecting workers (%(default)s)",
    )
    tls.add_argument(
        "--tls-idle-connections",
        type=int,
        default=2000,
        metavar="N",
        help="idle TLS connections for RSS per connection (%(default)s)",
    )
    tls.add_argument(
        "--fastnet-label",
        default=None,
        metavar="TEXT",
        help="what the measured fastnet is (e.g. a commit, when PYTHONPATH points at a "
        "checkout), for tls.md (default: where it is imported from)",
    )
    tls.add_argument(
        "--fastnet-before-label",
        default=None,
        metavar="TEXT",
        help="what the --fastnet-before interpreter's fastnet is (e.g. a commit), for tls.md",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: redraw compare.md and compare.png from a compare.json "
        "(with --set tls: tls.md from a tls.json)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for compare.{json,md,png} (default benchmarks/results; "
        "with --quick, nothing is written unless --out is given)",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.fastnet_before_note = args.fastnet_before_label
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 1.0, 0.25
        args.no_memory = True
        args.noisy_retries = 0
        args.tls_connections = min(args.tls_connections, 300)
        args.tls_idle_connections = min(args.tls_idle_connections, 300)
    if args.set == "tls":
        args.servers = ",".join(TLS_SERVERS + (("fastnet-before",) if args.fastnet_before else ()))
    if args.set == "router":
        args.servers = ",".join(ROUTER_SERVERS)
        if args.workloads == ",".join(w.name for w in WORKLOADS):
            args.workloads = "small,rpc"
        args.no_memory = True
    if min(args.tls_generator_processes, args.tls_connections, args.tls_concurrency) < 1:
        parser.error("--tls-generator-processes, --tls-connections, --tls-concurrency: at least 1")
    if args.tls_idle_connections < 1:
        parser.error("--tls-idle-connections must be at least 1")
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR
    if args.servers is None:
        args.servers = ",".join(DEFAULT_SERVERS + (BEFORE_SERVERS if args.fastnet_before else ()))
    for name, known in (
        ("workloads", [w.name for w in WORKLOADS]),
        ("servers", [s.name for s in SERVERS]),
        ("loops", list(LOOPS)),
    ):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {name}: {', '.join(unknown)} (known: {', '.join(known)})")
        setattr(args, name, chosen)
    if set(BEFORE_SERVERS) & set(args.servers) and not args.fastnet_before:
        parser.error(f"{' and '.join(BEFORE_SERVERS)} need --fastnet-before PYTHON")
    if args.runs < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--runs must be at least 1, --duration positive, --warmup not negative")
    return args


def render(path: Path, out: Path) -> int:
    """Redraw the table and the chart from a saved result."""
    result = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / "compare.md").write_text(text)
    chart(result, out / "compare.png")
    print(text)
    print(f"wrote {out}/compare.{{md,png}} from {path}", file=sys.stderr)
    return 0


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Build the C generator and the Tokio baseline, check --fastnet-before.

    What cannot be built is skipped with one message (the Tokio rows) or
    replaced (the Python generator instead of the C one); a --fastnet-before
    interpreter that cannot import fastnet ends the run.

    Returns:
        What the results' ``meta`` records about them.
    """
    extras: dict[str, Any] = {}
    if args.generator == "c":
        try:
            EXTERNAL["cloadgen"] = str(build_cloadgen())
        except (BuildError, OSError, subprocess.TimeoutExpired) as exc:
            print(
                f"warning: cannot build the C load generator ({exc}); "
                "using python -m fastnet.loadgen instead",
                file=sys.stderr,
            )
            args.generator = "python"
    if args.generator == "c":
        extras["generator"] = "C epoll, benchmarks/loadgen_c/cloadgen.c (gcc -O2)"
    else:
        extras["generator"] = f"python -m fastnet.loadgen (loop {args.generator_loop})"
    if "tokio" in args.servers:
        print("building the Tokio baseline (cargo --offline) ...", file=sys.stderr, flush=True)
        try:
            binary, versions = build_tokio()
        except (BuildError, OSError) as exc:
            print(f"SKIPPED tokio: {exc}", file=sys.stderr)
            args.servers = [s for s in args.servers if s != "tokio"]
        else:
            EXTERNAL["tokio"] = str(binary)
            extras["tokio"] = versions
            print(
                "Tokio baseline: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
                file=sys.stderr,
            )
    if args.fastnet_before:
        probe = subprocess.run(
            [args.fastnet_before, "-c", "import fastnet, platform; "
             "print(fastnet.__version__, fastnet.ACCELERATED, platform.python_version())"],
            capture_output=True,
            text=True,
            env=server_env(SERVERS[0]),
        )  # fmt: skip
        words = probe.stdout.split()
        if probe.returncode != 0 or len(words) != 3:
            reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"compare.py: --fastnet-before cannot import fastnet: {reason}")
        EXTERNAL["before"] = args.fastnet_before
        extras["fastnet_before"] = {
            "fastnet": words[0],
            "extension_built": words[1] == "True",
            "python": words[2],
        }
        if words[1] != "True":
            print(
                "warning: the --fastnet-before interpreter's fastnet has no extension built; "
                "its rows measure the pure-Python twin",
                file=sys.stderr,
            )
    return extras


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None and args.set == "tls":
        result = json.loads(args.render.read_text())
        text = tls_markdown(result)
        out = args.out or args.render.parent
        (out / "tls.md").write_text(text)
        print(text)
        return 0
    if args.render is not None and args.set == "router":
        text = router_markdown(json.loads(args.render.read_text()))
        ((args.out or args.render.parent) / "router.md").write_text(text)
        print(text)
        return 0
    if args.render is not None:
        return render(args.render, args.out or args.render.parent)
    pin = not args.no_pin and pinning_available()
    if not args.no_pin and not pin:
        print(
            "warning: taskset or a second CPU is not available; running unpinned, so server "
            "and generator share CPUs and the figures are less repeatable",
            file=sys.stderr,
        )
    machine = machine_description()
    if args.set == "tls":
        if not machine["extension_built"]:
            print("warning: fastnet's extension is not built: the fastnet rows measure the "
                  "pure-Python twin", file=sys.stderr)  # fmt: skip
        return tls_main(args, pin, machine)
    if "fastnet" in args.servers and not machine["extension_built"]:
        print(
            "warning: fastnet's extension is not built; the 'fastnet echo (extension)' rows "
            "would measure the pure-Python twin, so they are left out "
            "(build it: python setup.py build_ext --inplace)",
            file=sys.stderr,
        )
        args.servers = [s for s in args.servers if s not in ("fastnet", "fastnet-task")]
    extras = prepare(args)
    result = run_all(args, pin)
    given = list(argv if argv is not None else sys.argv[1:])
    if args.fastnet_before:
        # The interpreter's path names this machine: keep it out of the results.
        given = [
            "PYTHON" if word == args.fastnet_before else
            word.replace(args.fastnet_before, "PYTHON") for word in given
        ]  # fmt: skip
    command = "python benchmarks/compare.py" + (" " + " ".join(given) if given else "")
    result["meta"] = {
        **extras,
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "command": command,
        "pinning": f"server on CPU {SERVER_CPU}, generator on CPU {LOAD_CPU} (taskset)"
        if pin
        else "none (server and generator unpinned)",
        "runs": args.runs,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "noisy_load": args.noisy_load,
        "noisy_retries": args.noisy_retries,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if not args.no_memory:
        result["memory"] = run_memory(args)
    if args.set == "router":
        text = router_markdown(result)
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "router.json").write_text(json.dumps(result, indent=1) + "\n")
            (args.out / "router.md").write_text(text)
            print(f"wrote {args.out}/router.{{json,md}}", file=sys.stderr)
        failed = any(c["failure"] for c in result["cases"])
        errors = any(c["summary"] and c["summary"]["errors"] for c in result["cases"])
        return 1 if failed or errors else 0
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "compare.md").write_text(text)
        chart(result, args.out / "compare.png")
        print(f"wrote {args.out}/compare.{{json,md,png}}", file=sys.stderr)
    failed = any(c["failure"] for c in result["cases"])
    errors = any(c["summary"] and c["summary"]["errors"] for c in result["cases"])
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
