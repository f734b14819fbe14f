"""fastnet: production TCP services that speak a framed protocol.

Layout (data flows top to bottom on receive; docs/design.md §0 draws what runs per read):

    framing.py      framing specs (LengthPrefixed, Lines); picks the backend (codecs and core)
    _frame.pyx      Cython hot path: streaming decoders over self-managed buffers, encoders
    _outq.pyx       OutQueue: frames validated and encoded as they are sent
    _core.pyx       ConnectionCore: a connection's per-read and per-send path, in C
    *_py.py         the pure-Python twin of each extension module, identical behaviour
    errors.py       exception hierarchy shared by both backends
    transports.py   the transport strategy: how to write and read on each transport
    _internals.py   every private asyncio/uvloop name fastnet relies on, one test each
    protocol.py     FrameProtocol: once per connection (set-up, end of input, lifecycle, finish)
    lifecycle.py    the lifecycle states and their allowed transitions
    connection.py   Connection, what a handler sees (recv, send, drain, close, spawn); connect()
    listener.py     bind, the accept loop (slots, back-off, admission hook)
    supervisor.py   one connection's life: handler kinds, errors, lingering close, timeouts
    lingering.py    the lingering close (FIN, then close once nothing can be lost), both sides
    limits.py       Limits: per-peer connection rate and cap, frames/s, the overload marks
    proxy.py        the PROXY protocol v1/v2: sans-IO header parser, encoder, CRC32C
    _proxy_io.py    reading that header byte-exact from an accepted socket (before TLS)
    server.py       Server, the public facade: wiring, stats, shutdown
    runner.py       loop choice, serve()/run(), signals (SIGHUP reloads TLS files), drain delay
    metrics.py      Prometheus collector read at scrape time; event hooks
    health.py       HTTP /metrics, /healthz, /readyz on the server's own loop
    jsonlog.py      JSONFormatter: one JSON object per log line (--log-format json)
    tls.py          TLS contexts from certificate files, Connection.tls, reload
    wire.py         the router's wire format (the spec), error codes, RequestError
    _message.pyx    the router's per-frame path in C: header, route, call, reply (twin: *_py)
    router.py       Router: typed messages, one handler per type, states, deadlines, drain
    bodies.py       body codecs for the router: Raw, Packed (struct), Msgpack (msgspec)
    channel.py      Channel: the router's client side on one connection, calls multiplexed by id
    client.py       Client: calls over several servers: balanced, breakers, retries, drain
    pool.py         Pool: exclusive connections for plain framed protocols, bounded waits
    breaker.py      CircuitBreaker: closed/open/half-open over a sliding window (per endpoint)
    retry.py        RetryPolicy, RetryBudget (a share of calls), Backoff (jittered)
    balancer.py     Balancer: power of two choices, outlier ejection
    _events.py      a client-side object's events: counts, hook, Prometheus
    apps.py         built-in apps for `fastnet serve`: echo, kv
    cli.py          the `fastnet` command (serve, info, bench); __main__.py runs it
    _cliargs.py     the parsers the command and the load generator share
"""

from __future__ import annotations

from . import bodies, tls, wire
from .breaker import BreakerPolicy, CircuitBreaker, CircuitOpen
from .channel import Channel, Draining, NoReply, open_channel
from .client import Client, NoEndpointAvailable
from .connection import Connection, WriteBufferFull, connect
from .errors import (
    ConnectionBrokenError,
    ConnectionBusyError,
    ConnectionClosedError,
    FastnetError,
    FrameError,
    FrameTooLarge,
    IncompleteFrame,
)
from .framing import (
    ACCELERATED,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_LINE_LENGTH,
    LengthPrefixed,
    Lines,
)
from .lifecycle import Lifecycle
from .limits import Limits
from .pool import ConnectError, ConnectTimeout, Pool, PoolClosedError, PoolTimeout
from .proxy import ProxyHeader, ProxyHeaderError
from .retry import Backoff, RetryBudget, RetryPolicy
from .router import Router
from .runner import run, serve
from .server import CallbackHandler, Server, callback_handler
from .wire import (
    DeadlineExceeded,
    DecodeFailed,
    ErrorCode,
    Forbidden,
    HeaderError,
    InternalError,
    Overloaded,
    RequestError,
    UnknownMessageType,
)

__version__ = "0.1.0"

__all__ = [
    "ACCELERATED",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_LINE_LENGTH",
    "Backoff",
    "BreakerPolicy",
    "CallbackHandler",
    "Channel",
    "CircuitBreaker",
    "CircuitOpen",
    "Client",
    "ConnectError",
    "ConnectTimeout",
    "Connection",
    "ConnectionBrokenError",
    "ConnectionBusyError",
    "ConnectionClosedError",
    "DeadlineExceeded",
    "DecodeFailed",
    "Draining",
    "ErrorCode",
    "FastnetError",
    "Forbidden",
    "FrameError",
    "FrameTooLarge",
    "HeaderError",
    "IncompleteFrame",
    "InternalError",
    "LengthPrefixed",
    "Lifecycle",
    "Limits",
    "Lines",
    "NoEndpointAvailable",
    "NoReply",
    "Overloaded",
    "Pool",
    "PoolClosedError",
    "PoolTimeout",
    "ProxyHeader",
    "ProxyHeaderError",
    "RequestError",
    "RetryBudget",
    "RetryPolicy",
    "Router",
    "Server",
    "UnknownMessageType",
    "WriteBufferFull",
    "__version__",
    "bodies",
    "callback_handler",
    "connect",
    "open_channel",
    "run",
    "serve",
    "tls",
    "wire",
]
