"""The ``fastnet`` command: ``serve``, ``info`` and ``bench`` (argparse only).

A thin wrapper over ``fastnet.server.run``. It binds 127.0.0.1 unless told
otherwise, prints one line to stdout (``listening on HOST:PORT``, with the
real port when ``--port 0``) once the server accepts connections, and logs
to stderr (``--log-format json``: one JSON object per line). With
``--metrics HOST:PORT`` it also serves ``/metrics``, ``/healthz`` and
``/readyz`` there (``fastnet.health``) and prints a second line, ``metrics on
HOST:PORT``, after the first; ``--drain-delay S`` keeps serving S seconds
after the first SIGTERM/SIGINT, with ``/readyz`` answering 503. ``--workers N``
runs N worker processes under a supervisor (``fastnet.workers``); there a worker
that cannot start (APP cannot be imported, a TLS file is bad) is status 1.

Exit status: 0 after a graceful shutdown; 2 for a usage error (a bad option
value, an unknown or unloadable ``APP``, a bad ``--framing``, ``--loop
uvloop`` without uvloop, ``--metrics`` without prometheus_client,
``--proxy-protocol`` without ``--trusted-proxy``, ``--overload-low`` above
``--overload-high``), reported
as one line on stderr; 1 when the server cannot start (an address, the
server's or the metrics endpoint's, cannot be bound or resolved, a TLS file is bad),
reported as one line naming the address or the file. Anything else is a
bug, in fastnet or in the app: it propagates with its traceback (status 1)
rather than being shortened to a line that hides where it came from. A
second SIGINT or SIGTERM during the shutdown ends the process at once, killed
by that signal (with ``--workers``, the supervisor exits with 128 + its number).

The spellings the options accept (sizes, framings, loops, ports) are defined
once in ``fastnet._cliargs``, shared with ``fastnet bench``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, _compat
from ._cliargs import (
    FRAMING_HELP,
    FRAMING_METAVAR,
    SIZE_SPELLINGS,
    ArgumentParser,
    UsageError,
    add_loop_argument,
    load_attribute,
    non_negative_float,
    parse_framing,
    parse_host,
    parse_port,
    parse_size,
    positive_float,
    positive_int,
    resolve_loop,
    uvloop_version,
)
from .framing import ACCELERATED
from .health import PROMETHEUS_MISSING
from .jsonlog import JSONFormatter
from .limits import Limits
from .proxy import ACCEPT_MODES, DEFAULT_PROXY_HEADER_TIMEOUT, parse_networks
from .router import Router
from .server import DEFAULT_BACKLOG, DEFAULT_MAX_CONNECTIONS, CallbackHandler, Handler, run
from .tls import DEFAULT_HANDSHAKE_TIMEOUT, TLSConfigError, TLSFiles

__all__ = [
    "CLIError",
    "UsageError",
    "build_parser",
    "main",
    "parse_framing",
    "parse_host_port",
    "parse_size",
    "resolve_app",
    "server_options",
]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

EXIT_STATUS = (
    "Exit status: 0 after a graceful shutdown; 1 when the server cannot start (the address "
    "cannot be bound or resolved, a TLS file is bad), with one line on stderr; 2 for a usage "
    "error (a bad option value, an unknown or unloadable APP, a bad --framing), with one line "
    "on stderr. A second SIGINT or SIGTERM during the shutdown ends the process at once, "
    "killed by that signal (a shell shows 130 or 143); with --workers the supervisor exits "
    "with 130 or 143."
)


class CLIError(Exception):
    """The server could not start (e.g. a bind error): one line on stderr, exit status 1."""


def _frame_timeout(text: str) -> float | None:
    """Parse ``--frame-timeout``: seconds above 0, or ``off`` (None)."""
    if text.strip().lower() == "off":
        return None
    return positive_float(text)


def _trusted_proxy(text: str) -> str:
    """Parse ``--trusted-proxy``: an address or a CIDR network (checked, kept as given)."""
    try:
        parse_networks([text])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return text


def parse_rate(text: str) -> tuple[float, int | None]:
    """Parse ``RATE[:BURST]`` (``--conn-rate``, ``--frame-rate``): a rate per second above 0
    and an optional whole bucket size of at least 1 (default: a second's worth).

    Raises:
        UsageError: not a positive rate, or a bad burst.
    """
    rate_text, colon, burst_text = text.partition(":")
    try:
        rate = float(rate_text)
    except ValueError:
        rate = -1.0
    if not (rate > 0 and rate != float("inf")):
        raise UsageError(f"expected RATE[:BURST], a rate per second above 0, got {text!r}")
    if not colon:
        return rate, None
    try:
        burst = int(burst_text)
    except ValueError:
        burst = 0
    if burst < 1:
        raise UsageError(f"expected RATE[:BURST], BURST a whole number of at least 1, got {text!r}")
    return rate, burst


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``--metrics``: ``HOST:PORT``, ``[V6]:PORT``, or ``PORT`` alone (on 127.0.0.1).

    Raises:
        UsageError: no port, a bad port, or an empty host.
    """
    host, colon, port = text.rpartition(":")
    if not colon:
        host = "127.0.0.1"
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"put an IPv6 address in brackets: [{host}]:{port}")
    if not host:
        raise UsageError(f"expected HOST:PORT, e.g. 127.0.0.1:9100, got {text!r}")
    return host, parse_port(port)


def resolve_app(name: str) -> Handler:
    """Return the handler that ``APP`` names.

    ``APP`` is a built-in app (``echo``, ``echo-task``, ``kv``, ``kv-text``,
    ``router-echo``, ``router-echo-async``) or
    ``module:attribute`` (dotted attribute paths allowed): an ``async def
    handler(conn)``, an object whose ``__call__`` is one, or a
    ``fastnet.CallbackHandler``. The current directory is importable, so
    ``examples.echo_server:handler`` works from a checkout.

    Raises:
        UsageError: an unknown built-in, a module or attribute that cannot be
            loaded, or an object that is not a handler. An exception raised by
            the module's own code while it is imported propagates unchanged.
    """
    from .apps import APPS

    if name in APPS:
        return APPS[name]()
    if ":" not in name:
        raise UsageError(
            f"unknown app {name!r}: use a built-in ({', '.join(APPS)}) or module:function"
        )
    obj = load_attribute(name, "app")
    if isinstance(obj, CallbackHandler):
        return obj
    if inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - looking for an async __call__
    ):
        return obj  # type: ignore[no-any-return]
    raise UsageError(
        f"app {name!r} is not a handler: expected an async function of one argument "
        "(the connection), a fastnet.CallbackHandler or a fastnet.Router"
    )


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    """Return the ``fastnet`` argument parser.

    Args:
        with_bench: import ``fastnet.loadgen`` and register its options
            under ``bench``; otherwise ``bench`` is listed but its options
            are only added when it is the command being run.
    """
    parser = ArgumentParser(
        prog="fastnet",
        description="Production TCP services that speak a framed protocol.",
        epilog=EXIT_STATUS,
    )
    parser.add_argument("--version", action="version", version=f"fastnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run a server",
        description="Serve APP until SIGINT or SIGTERM, then shut down gracefully "
        "(a second signal exits at once).",
        epilog=EXIT_STATUS,
    )
    serve.add_argument(
        "app",
        metavar="APP",
        help="echo, echo-task, kv (on the router), kv-text, router-echo, router-echo-async, "
        "or module:NAME (an async handler "
        "of one connection, a fastnet.CallbackHandler or a fastnet.Router)",
    )
    serve.add_argument(
        "--host",
        type=parse_host,
        default="127.0.0.1",
        help="interface to bind: an IPv4 or IPv6 address, a name, or unix:PATH (127.0.0.1)",
    )
    serve.add_argument("--port", type=parse_port, default=8080, help="TCP port; 0 picks one (8080)")
    serve.add_argument("--framing", default=None, metavar=FRAMING_METAVAR, help=FRAMING_HELP)
    serve.add_argument(
        "--max-frame",
        type=parse_size,
        metavar="BYTES",
        help=f"largest frame accepted (default 8MiB for length, 64KiB for lines); {SIZE_SPELLINGS}",
    )
    serve.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"connections served at once; more wait in the backlog ({DEFAULT_MAX_CONNECTIONS})",
    )
    serve.add_argument(
        "--idle-timeout",
        type=positive_float,
        metavar="S",
        help="close a connection that sends nothing for S seconds while its handler waits",
    )
    serve.add_argument(
        "--frame-timeout",
        type=_frame_timeout,
        default=argparse.SUPPRESS,
        metavar="S|off",
        help="close a connection whose frame in progress is not complete within S seconds "
        "(slow senders holding a slot); off disables it (default: the server's)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=30.0,
        metavar="S",
        help="on shutdown, wait at most S seconds for handlers to finish (30)",
    )
    serve.add_argument(
        "--backlog",
        type=positive_int,
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
        "--workers",
        type=positive_int,
        metavar="N",
        help="run N worker processes under a supervisor that binds the socket once, "
        "replaces a worker that dies or hangs, drains all on SIGTERM, restarts them one by "
        "one on SIGHUP, and adds or removes one on SIGTTIN/SIGTTOU (fastnet.workers); "
        "with --reuse-port, one SO_REUSEPORT socket per worker (default: one process)",
    )
    serve.add_argument(
        "--worker-timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="with --workers: kill and replace a worker whose event loop has not answered "
        "the supervisor's heartbeat for S seconds (30)",
    )
    serve.add_argument(
        "--drain-delay",
        type=non_negative_float,
        default=0.0,
        metavar="S",
        help="on the first SIGTERM/SIGINT, report not ready (/readyz: 503) but keep accepting "
        "and serving for S seconds before the graceful shutdown, so a load balancer can "
        "take the server out of rotation first (0)",
    )
    serve.add_argument(
        "--metrics",
        type=parse_host_port,
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz over HTTP on HOST:PORT "
        "(0 picks a port; a second stdout line names it); turns the metrics on; "
        "needs pip install 'fastnet[metrics]'",
    )
    tls = serve.add_argument_group(
        "TLS", "serve TLS 1.2+ (SIGHUP reloads the files; a bad file keeps the old certificate)"
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain (turns TLS on)")
    tls.add_argument("--tls-key", metavar="FILE", help="PEM private key (default: in --tls-cert)")
    tls.add_argument(
        "--tls-ca", metavar="FILE", help="require client certificates signed by these CAs (mTLS)"
    )
    tls.add_argument(
        "--tls-handshake-timeout",
        type=positive_float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="S",
        help=f"abort a TLS handshake after S seconds ({DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    proxy = serve.add_argument_group(
        "PROXY protocol",
        "behind HAProxy or another proxy that sends the PROXY protocol: every connection "
        "must begin with a header, which names the client (never guessed: without a valid "
        "header the connection is closed)",
    )
    proxy.add_argument(
        "--proxy-protocol",
        choices=ACCEPT_MODES,
        type=str.lower,
        help="read a PROXY header of this version (any: v1 or v2) first on every connection; "
        "needs --trusted-proxy",
    )
    proxy.add_argument(
        "--trusted-proxy",
        action="append",
        type=_trusted_proxy,
        metavar="CIDR",
        help="an address or network (e.g. 10.0.0.0/8) the proxies connect from; repeatable; "
        "connections from elsewhere are closed before a byte is read",
    )
    proxy.add_argument(
        "--proxy-header-timeout",
        type=positive_float,
        default=DEFAULT_PROXY_HEADER_TIMEOUT,
        metavar="S",
        help=f"close a connection whose PROXY header is not complete within S seconds "
        f"({DEFAULT_PROXY_HEADER_TIMEOUT:g})",
    )
    limits = serve.add_argument_group(
        "limits and overload protection",
        "per client address (the PROXY header's with --proxy-protocol; IPv6 by /64), per "
        "connection, and for the whole process; over a per-peer limit a new connection is "
        "closed at once, without a reply",
    )
    limits.add_argument(
        "--conn-rate",
        type=parse_rate,
        metavar="RATE[:BURST]",
        help="new connections per second a client address may open, BURST at once "
        "(default: a second's worth)",
    )
    limits.add_argument(
        "--conns-per-peer",
        type=positive_int,
        metavar="N",
        help="connections a client address may have open at once",
    )
    limits.add_argument(
        "--frame-rate",
        type=parse_rate,
        metavar="RATE[:BURST]",
        help="frames per second read from one connection; over it, reading pauses "
        "(backpressure, no disconnect)",
    )
    limits.add_argument(
        "--overload-high",
        type=parse_size,
        metavar="BYTES",
        help="stop accepting while the connections buffer more than BYTES in all (output "
        f"not yet sent, input not yet taken); {SIZE_SPELLINGS}",
    )
    limits.add_argument(
        "--overload-low",
        type=parse_size,
        metavar="BYTES",
        help="accept again at BYTES or less (default: half of --overload-high)",
    )
    add_loop_argument(serve)
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", type=str.lower, help="(info)"
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        type=str.lower,
        help="text, or json: one JSON object per line with ts, level, logger, message and "
        "the record's fields such as peer (text)",
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


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments ``fastnet serve`` gives ``run``/``Server``, from its options.

    Options the user did not give and that have no CLI default
    (``--frame-timeout``) are left out, so the server's own default applies.

    Raises:
        UsageError: ``--framing`` is bad, or does not take ``--max-frame``;
            ``--proxy-protocol`` without ``--trusted-proxy`` (on TCP) or the
            other way round.
    """
    # No --framing: the app's own (a Router's), else length-prefixed frames.
    framing = None
    if args.framing is not None or args.max_frame is not None:
        framing = parse_framing(args.framing or "length", args.max_frame)
    options: dict[str, Any] = {
        "framing": framing,
        "max_connections": args.max_connections,
        "idle_timeout": args.idle_timeout,
        "drain_timeout": args.drain_timeout,
        "backlog": args.backlog,
        "reuse_port": args.reuse_port,
    }
    # Absent unless given (argparse.SUPPRESS): None is what "off" means.
    if "frame_timeout" in vars(args):
        options["frame_timeout"] = args.frame_timeout
    if args.host.startswith("unix:"):
        options["unix"] = args.host[len("unix:") :]
    if args.tls_cert is not None:
        options["ssl"] = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca)
        options["tls_handshake_timeout"] = args.tls_handshake_timeout
    elif args.tls_key is not None or args.tls_ca is not None:
        raise UsageError("--tls-key and --tls-ca need --tls-cert")
    if args.proxy_protocol is not None:
        if not args.trusted_proxy and "unix" not in options:
            raise UsageError(
                "--proxy-protocol needs --trusted-proxy CIDR: the addresses the proxies "
                "connect from (only they may send the header)"
            )
        options["proxy_protocol"] = args.proxy_protocol
        options["trusted_proxies"] = list(args.trusted_proxy or ())
        options["proxy_header_timeout"] = args.proxy_header_timeout
    elif args.trusted_proxy:
        raise UsageError("--trusted-proxy needs --proxy-protocol")
    limits = _limits(args)
    if limits is not None:
        options["limits"] = limits
    return options


def _limits(args: argparse.Namespace) -> Limits | None:
    # The limits group's options as a fastnet.Limits, or None when none is given.
    conn_rate, conn_burst = args.conn_rate or (None, None)
    frame_rate, frame_burst = args.frame_rate or (None, None)
    if args.overload_low is not None and args.overload_high is None:
        raise UsageError("--overload-low needs --overload-high")
    values = {
        "conn_rate": conn_rate,
        "conn_burst": conn_burst,
        "conns_per_peer": args.conns_per_peer,
        "frame_rate": frame_rate,
        "frame_burst": frame_burst,
        "overload_high": args.overload_high,
        "overload_low": args.overload_low,
    }
    if all(value is None for value in values.values()):
        return None
    try:
        return Limits(**values)
    except ValueError as exc:  # e.g. --overload-low above --overload-high
        raise UsageError(str(exc)) from None


def _configure_logging(level: str, log_format: str) -> None:
    stream = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        stream.setFormatter(JSONFormatter())
    else:
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[stream])


def _serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, args.log_format)
    # With --workers the supervisor never imports APP: each worker does.
    handler = resolve_app(args.app) if args.workers is None else None
    options = server_options(args)
    if args.metrics is not None:
        # Checked before binding anything, as --loop uvloop is: one line, status 2.
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise UsageError(f"--metrics: {PROMETHEUS_MISSING}") from None
        options["metrics_address"] = args.metrics
        options["on_metrics_ready"] = _print_metrics_address
    if isinstance(handler, Router) and options["framing"] is not None:
        try:
            handler.check_framing(options["framing"])
        except ValueError as exc:
            raise UsageError(f"--framing: {exc}") from None
    if args.workers is not None:
        return _serve_workers(args, options)
    assert handler is not None
    started = False

    def ready(server: Any) -> None:
        nonlocal started
        started = True
        print(f"listening on {server.address}", flush=True)

    try:
        run(
            handler,
            args.host,
            args.port,
            loop=args.loop,
            on_ready=ready,
            drain_delay=args.drain_delay,
            **options,
        )
    except TLSConfigError as exc:  # a certificate, key or CA file (it names the file)
        raise CLIError(str(exc)) from None
    except OSError as exc:
        if started:  # not a bind error: a failure while serving, shown whole
            raise
        # Bind, listen or name resolution failed; the message names the address.
        raise CLIError(exc.strerror or str(exc)) from None
    return 0


def _serve_workers(args: argparse.Namespace, options: dict[str, Any]) -> int:
    # A worker that cannot import APP is a start-up failure: one line, status 1.
    # Imported by name: fastnet.workers imports this module (for its workers), and a
    # static import both ways leaves mypy's view of the import cycle unresolved.
    workers = importlib.import_module("fastnet.workers")
    WorkerStartError, run_workers = workers.WorkerStartError, workers.run_workers

    options.pop("on_metrics_ready", None)
    started = False

    def ready(supervisor: Any) -> None:
        nonlocal started
        started = True
        print(f"listening on {supervisor.address}", flush=True)

    try:
        run_workers(
            args.app,
            args.host,
            args.port,
            workers=args.workers,
            loop=args.loop,
            on_ready=ready,
            on_metrics_ready=_print_metrics_address,
            drain_delay=args.drain_delay,
            worker_timeout=args.worker_timeout,
            log_level=args.log_level,
            log_format=args.log_format,
            **options,
        )
    except WorkerStartError as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        if started:
            raise
        raise CLIError(exc.strerror or str(exc)) from None
    return 0


def _print_metrics_address(endpoint: Any) -> None:
    # The second stdout line, after "listening on": the real port with :0.
    print(f"metrics on {endpoint.address}", flush=True)


def _info(args: argparse.Namespace) -> int:
    lines = [f"fastnet {__version__}"]
    impl = sys.implementation.name
    lines.append(f"python {sys.version.split()[0]} ({impl})")
    if ACCELERATED:
        lines.append("extension: active (fastnet._frame, Cython)")
    elif _compat.NO_EXTENSIONS:
        # _compat chose the twin: by FASTNET_NO_EXTENSIONS, or because this
        # is not CPython (then the variable plays no part).
        why = "FASTNET_NO_EXTENSIONS is set" if impl == "cpython" else f"{impl} uses the twin"
        lines.append(f"extension: inactive, {why} (pure Python)")
    else:
        lines.append("extension: inactive, fastnet._frame is not built (pure Python)")
    uvloop = uvloop_version()
    loops = ["asyncio"] if uvloop is None else ["asyncio", f"uvloop {uvloop}".rstrip()]
    lines.append(f"loops: {', '.join(loops)} (auto: {resolve_loop('auto')})")
    print("\n".join(lines))
    return 0


def _command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastnet`` command line and return its exit status.

    Returns:
        0 on success; 1 when the server cannot start (one line on stderr);
        2 for a usage error (one line on stderr; argparse's own errors exit
        through ``SystemExit(2)``).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = _command(args_list)
    parser = build_parser(with_bench=command == "bench")
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"fastnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CLIError as exc:
        print(f"fastnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the server installed its handlers
        return 130
