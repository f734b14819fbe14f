"""The metrics and health endpoint: a small HTTP/1.1 responder on the server's own event loop.

``HealthEndpoint(server, host, port, registry=...)`` answers

    GET /metrics    the registry in Prometheus text format, or OpenMetrics when
                    the request's Accept asks for application/openmetrics-text
                    (404 when no registry was given: metrics are off)
    GET /healthz    200 while the process runs its event loop
    GET /readyz     200 while the server accepts and is not draining; 503 from
                    the moment a drain begins (``server.draining``)
    anything else   404 (405 for a method other than GET and HEAD)

It runs on the loop that serves the framed connections: no thread and no
extra process, so a scrape reads the counters where they are kept, and a
``/healthz`` answer proves that this loop turns. A handler that blocks the
loop makes the endpoint time out too, which is what a liveness probe is for.

Strategy: each HTTP connection carries exactly one request. The request head
(request line and headers) is read in one piece, up to ``MAX_REQUEST_HEAD``
bytes and within ``request_timeout`` seconds of the connection's accept; it is
parsed with ``parse_request_head`` (plain bytes in, a ``Request`` out: no I/O,
tested alone), answered, and the connection is closed (``Connection: close``).
A malformed head or one over the bound gets a 400, a head not complete in
time is closed without an answer (the slowloris case), and none of this
touches the framed server: the endpoint has its own listening socket, its
own connection bound (``max_connections``: at the bound, a new connection
closes the one that has waited longest for its request head, so idle or
trickling clients cannot hold the probes at 503; only when every slot is
answering is a new one refused with a 503) and its own timeouts. A request
body is never read.

prometheus_client is imported only when a registry is served
(``default_registry``, or the first scrape); without it, asking for metrics
raises ``RuntimeError`` naming ``pip install 'fastnet[metrics]'``, as
``Server(metrics=True)`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .listener import format_address, format_peer

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from .server import Server

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_REQUEST_TIMEOUT",
    "MAX_REQUEST_HEAD",
    "PROMETHEUS_MISSING",
    "BadRequest",
    "HealthEndpoint",
    "Request",
    "default_registry",
    "parse_request_head",
]

logger = logging.getLogger("fastnet.health")

# The request line and headers of a scrape or a probe are a few hundred bytes
# (Prometheus sends about 300, curl about 80). 8 KiB is the limit of nginx's
# and Apache's default request line buffers; anything longer here is abuse.
MAX_REQUEST_HEAD = 8 * 1024

# Seconds from accept to the end of the request head (and, separately, for
# writing the response): a prober sends its request at once, so a client that
# has not finished in 5 s is trickling (slowloris) or gone. A guess, well
# above a loaded machine's scheduling delays and below a probe's usual timeout
# (Kubernetes: 1 s by default; Prometheus: scrape_timeout, 10 s by default).
DEFAULT_REQUEST_TIMEOUT = 5.0

# Concurrent HTTP connections: a Prometheus or two, a load balancer's probes
# and an operator's curl need a handful; 32 leaves room for several of each
# and bounds what a flood of idle connections can hold (each is also bounded
# by the request timeout). Over it, a 503 and an immediate close.
DEFAULT_MAX_CONNECTIONS = 32

PROMETHEUS_MISSING = "metrics need prometheus_client: pip install 'fastnet[metrics]'"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

_TEXT = "text/plain; charset=utf-8"


def default_registry() -> CollectorRegistry:
    """Return prometheus_client's global ``REGISTRY`` (importing prometheus_client).

    Raises:
        RuntimeError: prometheus_client is not installed; the message says
            ``pip install 'fastnet[metrics]'`` (as ``Server(metrics=True)``).
    """
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        raise RuntimeError(PROMETHEUS_MISSING) from None
    return REGISTRY


# ----------------------------------------------------------------- parsing


class BadRequest(ValueError):
    """Raised by ``parse_request_head`` for a malformed request head (answered with 400)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A parsed request head: ``method``, ``path`` (without the query), ``headers`` (lower-case)."""

    method: str
    path: str
    version: str
    headers: dict[str, str]


# RFC 9110 token characters (methods, header names).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")


def parse_request_head(head: bytes) -> Request:
    """Parse an HTTP/1.x request head: the request line and headers, ending in a blank line.

    Args:
        head: the bytes up to and including the first ``\\r\\n\\r\\n``.

    Returns:
        The request; repeated headers are joined with ``", "``.

    Raises:
        BadRequest: not a request line of three parts, a method or header
            name that is not a token, a version other than HTTP/1.0 or
            HTTP/1.1, a target that is not an absolute path, a header line
            without a colon, a bare CR or LF, obsolete line folding, or a
            byte that is not ASCII.
    """
    if not head.endswith(b"\r\n\r\n"):
        raise BadRequest("the request head does not end with a blank line")
    lines = head[:-4].split(b"\r\n")
    request_line, header_lines = lines[0], lines[1:]
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("the request line is not METHOD TARGET VERSION")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest("the method is not a token")
    if not _VERSION.fullmatch(version):
        raise BadRequest("not HTTP/1.0 or HTTP/1.1")
    if not target.startswith(b"/") or any(c <= 0x20 or c >= 0x7F for c in target):
        raise BadRequest("the target is not an absolute path")
    headers: dict[str, str] = {}
    for line in header_lines:
        if b"\r" in line or b"\n" in line:
            raise BadRequest("a bare CR or LF in the head")
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest("a header line is not NAME: VALUE")
        try:
            text = value.strip(b" \t").decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("a header value is not ASCII") from None
        key = name.decode("ascii").lower()
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path = target.split(b"?", 1)[0].decode("ascii")
    return Request(method.decode("ascii"), path, version.decode("ascii"), headers)


# ---------------------------------------------------------------- responses


@dataclasses.dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _TEXT
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        lines += [f"{name}: {value}" for name, value in self.extra_headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


_BAD_REQUEST = _Response(400, b"bad request\n")
_BUSY = _Response(503, b"too many connections\n")


# ----------------------------------------------------------------- endpoint


class HealthEndpoint:
    """The metrics and health endpoint of ``server``, on its own TCP port.

    Args:
        server: the fastnet ``Server`` whose readiness ``/readyz`` reports
            (``server.draining``, and whether it is listening).
        host: the interface to bind (127.0.0.1 by default: expose it on
            purpose, as the framed port).
        port: the TCP port; 0 picks a free one (see ``port``, ``address``).
        registry: the ``prometheus_client`` registry ``/metrics`` serves
            (the one given to ``Server(metrics=...)``); None answers
            ``/metrics`` with 404 and never imports prometheus_client.
        request_timeout: seconds a client has from its connection to the end
            of its request head, and again to take the response.
        max_connections: HTTP connections served at once; more get a 503
            and are closed.

    Use ``async with HealthEndpoint(...)`` (or ``await start()`` and
    ``await close()``). It must start on the loop that runs ``server``.
    """

    def __init__(
        self,
        server: Server,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registry: CollectorRegistry | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {request_timeout}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.server = server
        self.registry = registry
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._host = host
        self._port = port
        self._listener: asyncio.AbstractServer | None = None
        self._sockname: Any = None
        # The connections in progress: each one's task and stream writer.
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # The connections still waiting for their request head, oldest first.
        self._waiting: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._routes: dict[str, Callable[[Request], _Response]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    def __repr__(self) -> str:
        return f"<fastnet.HealthEndpoint {self.address}>"

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for; 0 before ``start``)."""
        return int(self._sockname[1]) if self._sockname is not None else self._port

    @property
    def address(self) -> str:
        """``HOST:PORT`` (``[V6]:PORT``) of the endpoint, with the real port once started."""
        if self._sockname is not None:
            return format_address(self._sockname[0], self._sockname[1])
        return format_address(self._host, self._port)

    async def start(self) -> None:
        """Bind and start answering.

        Raises:
            OSError: the address cannot be bound; the message names it.
            RuntimeError: already started.
        """
        if self._listener is not None:
            raise RuntimeError("the endpoint was already started")
        try:
            listener = await asyncio.start_server(
                self._accept, self._host, self._port, limit=MAX_REQUEST_HEAD
            )
        except OSError as exc:
            # asyncio's message wraps the reason ("error while attempting to
            # bind on address ..."): give the system's own words, as bind_tcp.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            message = f"cannot listen on {self.address} (metrics): {reason}"
            raise OSError(exc.errno, message) from None
        self._listener = listener
        self._sockname = listener.sockets[0].getsockname()
        logger.info("metrics and health endpoint on http://%s", self.address)

    async def close(self) -> None:
        """Stop listening and close the connections in progress. Idempotent."""
        listener = self._listener
        if listener is None:
            return
        listener.close()
        # Abort the connections in progress rather than cancel their tasks:
        # each task sees its connection lost and ends as usual (asyncio 3.12.1
        # logs a cancelled client_connected_cb task as an error).
        tasks = list(self._clients)
        for writer in self._clients.values():
            writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=self.request_timeout)
        # Every connection is closed by now; wait_closed returns at once
        # (on 3.12+ it waits for them).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(listener.wait_closed(), self.request_timeout)

    async def __aenter__(self) -> HealthEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = format_peer(writer.get_extra_info("peername"))
        if len(self._clients) >= self.max_connections:
            if self._waiting:
                # Make room by closing the connection that has waited longest
                # for its request head: a probe sends its request at once,
                # so idle or trickling connections cannot keep /healthz and
                # /readyz from answering (they would read as 503: down).
                oldest = next(iter(self._waiting))
                self._waiting.pop(oldest).transport.abort()
                logger.debug("metrics endpoint: closed the oldest idle connection for %s", peer)
            else:
                # Every slot is answering: refuse without reading.
                logger.debug(
                    "metrics endpoint: %s refused, %d connections", peer, len(self._clients)
                )
                writer.write(_BUSY.encode())  # a few hundred bytes: the socket takes them
                writer.close()
                return
        self._clients[task] = writer
        self._waiting[task] = writer
        try:
            await self._serve_one(reader, writer, peer)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            logger.debug("metrics endpoint: %s: %s", peer, exc.__class__.__name__)
        finally:
            del self._clients[task]
            self._waiting.pop(task, None)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        response: _Response
        head_only = False
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout)
        except asyncio.TimeoutError:
            # A slowloris client, or one that connected and said nothing.
            logger.debug("metrics endpoint: %s sent no complete request in time", peer)
            return
        except asyncio.LimitOverrunError:
            logger.debug("metrics endpoint: %s: request head over %d bytes", peer, MAX_REQUEST_HEAD)
            response = _BAD_REQUEST
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return  # connected and closed: a TCP probe
            logger.debug("metrics endpoint: %s: the request ended early", peer)
            response = _BAD_REQUEST
        else:
            try:
                request = parse_request_head(head)
            except BadRequest as exc:
                logger.debug("metrics endpoint: %s: bad request: %s", peer, exc)
                response = _BAD_REQUEST
            else:
                head_only = request.method == "HEAD"
                response = self._respond(request)
        self._waiting.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if writer.transport.is_closing():  # aborted by close()
            return
        writer.write(response.encode(head_only))
        # A client that does not read its response gets the same bound; then
        # the finally clause of _accept aborts the connection.
        await asyncio.wait_for(writer.drain(), self.request_timeout)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), self.request_timeout)

    # ---------------------------------------------------------------- routing

    def _respond(self, request: Request) -> _Response:
        route = self._routes.get(request.path)
        if route is None:
            return _Response(404, b"not found\n")
        if request.method not in ("GET", "HEAD"):
            return _Response(405, b"method not allowed\n", extra_headers=(("Allow", "GET, HEAD"),))
        return route(request)

    def _healthz(self, request: Request) -> _Response:
        # Answering at all is the proof: this runs on the server's loop.
        return _Response(200, b"ok\n")

    def _readyz(self, request: Request) -> _Response:
        server = self.server
        if server.draining:
            return _Response(503, b"draining\n")
        if not server.sockets:
            return _Response(503, b"not listening\n")
        return _Response(200, b"ready\n")

    def _metrics(self, request: Request) -> _Response:
        registry = self.registry
        if registry is None:
            return _Response(404, b"metrics are off\n")
        from prometheus_client.exposition import choose_encoder

        # prometheus_client's own negotiation (what its HTTP handlers use): the
        # classic text format with its matching content type unless the
        # Accept header asks for application/openmetrics-text.
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        try:
            body = encoder(registry)
        except Exception:
            logger.exception("metrics endpoint: collecting the metrics failed")
            return _Response(500, b"collecting the metrics failed\n")
        return _Response(200, body, content_type)
