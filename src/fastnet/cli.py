"""The ``fastnet`` command: ``serve``, ``info`` and ``bench`` (argparse only).

A thin wrapper over ``fastnet.server.run``. It binds 127.0.0.1 unless told
otherwise, prints exactly one line to stdout (``listening on HOST:PORT``,
with the real port when ``--port 0``) once the server accepts connections,
and logs to stderr. Exit status: 0 after a graceful shutdown, 1 when the
address cannot be bound or the app cannot be loaded (one line on stderr, no
traceback), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .framing import ACCELERATED, Framing, LengthPrefixed, Lines
from .server import DEFAULT_BACKLOG, DEFAULT_MAX_CONNECTIONS, CallbackHandler, Handler, run

__all__ = ["build_parser", "main", "parse_framing", "parse_size", "resolve_app"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOOPS = ("auto", "asyncio", "uvloop")


class CLIError(Exception):
    """A problem reported as one line on stderr, with exit status 1."""


def parse_size(text: str) -> int:
    """Parse a byte count: ``4096``, ``64K``/``64KiB`` (x1024), ``8M``/``8MiB``, ``1G``/``1GiB``.

    Raises:
        argparse.ArgumentTypeError: not a non-negative size.
    """
    units = {
        "": 1,
        "k": 1024,
        "kib": 1024,
        "m": 1024**2,
        "mib": 1024**2,
        "g": 1024**3,
        "gib": 1024**3,
    }
    raw = text.strip().lower()
    digits = raw.rstrip("kmgib")
    unit = raw[len(digits) :]
    if not digits.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 64K, 8MiB)")
    return int(digits) * units[unit]


def parse_framing(text: str, max_frame: int | None = None) -> Framing:
    """Parse ``length[:SIZE[:ORDER]]`` or ``lines`` into a framing spec.

    ``length`` is a 4-byte big-endian length field, ``length:2`` a 2-byte
    one, ``length:4:little`` a little-endian one; ``lines`` is
    newline-terminated frames. ``max_frame`` becomes the spec's
    ``max_frame`` (or ``max_length`` for lines).

    Raises:
        argparse.ArgumentTypeError: an unknown layout or a bad parameter.
    """
    parts = text.strip().lower().split(":")
    limit: dict[str, Any] = {}
    try:
        if parts == ["lines"]:
            if max_frame is not None:
                limit["max_length"] = max_frame
            return Lines(**limit)
        if parts[0] == "length" and len(parts) <= 3:
            size = int(parts[1]) if len(parts) > 1 else 4
            order = parts[2] if len(parts) > 2 else "big"
            if max_frame is not None:
                limit["max_frame"] = max_frame
            return LengthPrefixed(length_size=size, byteorder=order, **limit)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"bad --framing {text!r}: {exc}") from None
    raise argparse.ArgumentTypeError(
        f"bad --framing {text!r}: expected length[:SIZE[:big|little]] or lines"
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {text!r}")
    return value


def resolve_app(name: str) -> Handler:
    """Return the handler that ``APP`` names.

    ``APP`` is a built-in app (``echo``, ``echo-task``, ``kv``) or
    ``module:attribute`` (dotted attribute paths allowed): an ``async def
    handler(conn)``, an object whose ``__call__`` is one, or a
    ``fastnet.CallbackHandler``. The current directory is importable, so
    ``examples.echo_server:handler`` works from a checkout.

    Raises:
        CLIError: the module or attribute cannot be loaded, or is not a handler.
    """
    from .apps import APPS

    if name in APPS:
        return APPS[name]()
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        raise CLIError(
            f"unknown app {name!r}: use a built-in ({', '.join(APPS)}) or module:function"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {module_name!r} for app {name!r}: {exc}") from None
    try:
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise CLIError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if isinstance(obj, CallbackHandler):
        return obj
    if inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - looking for an async __call__
    ):
        return obj  # type: ignore[no-any-return]
    raise CLIError(
        f"app {name!r} is not a handler: expected an async function of one argument "
        "(the connection) or a fastnet.CallbackHandler"
    )


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    """Return the ``fastnet`` argument parser.

    Args:
        with_bench: import ``fastnet.loadgen`` and register its options
            under ``bench``; otherwise ``bench`` is listed but its options
            are only added when it is the command being run.
    """
    parser = argparse.ArgumentParser(
        prog="fastnet",
        description="Production TCP services that speak a framed protocol.",
    )
    parser.add_argument("--version", action="version", version=f"fastnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run a server",
        description="Serve APP until SIGINT or SIGTERM, then shut down gracefully "
        "(a second signal exits at once).",
    )
    serve.add_argument(
        "app",
        metavar="APP",
        help="echo, echo-task, kv, or module:function (an async handler of one connection)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind: an IPv4 or IPv6 address, a name, or unix:PATH (127.0.0.1)",
    )
    serve.add_argument("--port", type=_port, default=8080, help="TCP port; 0 picks one (8080)")
    serve.add_argument(
        "--framing",
        default="length",
        metavar="length[:SIZE[:ORDER]]|lines",
        help="wire layout: length-prefixed (SIZE 1, 2, 3, 4 or 8 bytes, ORDER big or "
        "little; default length:4:big) or newline-terminated lines",
    )
    serve.add_argument(
        "--max-frame",
        type=parse_size,
        metavar="BYTES",
        help="largest frame accepted (default 8MiB for length, 64KiB for lines)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"connections served at once; more wait in the backlog ({DEFAULT_MAX_CONNECTIONS})",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_positive_float,
        metavar="S",
        help="close a connection that sends nothing for S seconds while its handler waits",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="on shutdown, wait at most S seconds for handlers to finish (30)",
    )
    serve.add_argument(
        "--backlog",
        type=_positive_int,
        default=DEFAULT_BACKLOG,
        metavar="N",
        help=f"listen backlog ({DEFAULT_BACKLOG})",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so several processes can serve the same port",
    )
    serve.add_argument(
        "--loop", choices=LOOPS, default="auto", help="event loop; auto uses uvloop if installed"
    )
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", type=str.lower, help="(info)"
    )
    serve.set_defaults(func=_serve)

    info = commands.add_parser(
        "info", help="show the version, the codec backend and the event loops available"
    )
    info.set_defaults(func=_info)

    bench = commands.add_parser(
        "bench",
        help="load-test a running echo server",
        description="Load-test a running fastnet echo server (fastnet.loadgen).",
    )
    if with_bench:
        try:
            from . import loadgen
        except ImportError as exc:
            bench.set_defaults(func=_bench_missing(exc))
        else:
            loadgen.add_arguments(bench)
            bench.set_defaults(func=loadgen.run)
    return parser


def _bench_missing(exc: ImportError) -> Any:
    def report(args: argparse.Namespace) -> int:
        raise CLIError(f"fastnet bench is not available: {exc}")

    return report


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        framing = parse_framing(args.framing, args.max_frame)
    except argparse.ArgumentTypeError as exc:
        raise CLIError(str(exc)) from None
    handler = resolve_app(args.app)
    options: dict[str, Any] = {
        "framing": framing,
        "max_connections": args.max_connections,
        "idle_timeout": args.idle_timeout,
        "drain_timeout": args.drain_timeout,
        "backlog": args.backlog,
        "reuse_port": args.reuse_port,
    }
    host: str = args.host
    if host.startswith("unix:"):
        path = host[len("unix:") :]
        if not path:
            raise CLIError("--host unix:PATH needs a path")
        options["unix"] = path

    def ready(server: Any) -> None:
        print(f"listening on {server.address}", flush=True)

    try:
        run(handler, host, args.port, loop=args.loop, on_ready=ready, **options)
    except OSError as exc:  # bind or listen failed; the message names the address
        raise CLIError(exc.strerror or str(exc)) from None
    except RuntimeError as exc:  # --loop uvloop without uvloop
        raise CLIError(str(exc)) from None
    return 0


def _info(args: argparse.Namespace) -> int:
    lines = [f"fastnet {__version__}"]
    impl = sys.implementation.name
    lines.append(f"python {sys.version.split()[0]} ({impl})")
    if ACCELERATED:
        lines.append("extension: active (fastnet._frame, Cython)")
    elif os.environ.get("FASTNET_NO_EXTENSIONS"):
        lines.append("extension: inactive, FASTNET_NO_EXTENSIONS is set (pure Python)")
    else:
        lines.append("extension: inactive, fastnet._frame is not built (pure Python)")
    loops = ["asyncio"]
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        auto = "asyncio"
    else:
        loops.append(f"uvloop {getattr(uvloop, '__version__', '')}".rstrip())
        auto = "uvloop"
    lines.append(f"loops: {', '.join(loops)} (auto: {auto})")
    print("\n".join(lines))
    return 0


def _command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastnet`` command line and return its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_bench=_command(args_list) == "bench")
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"fastnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the server installed its handlers
        return 130
