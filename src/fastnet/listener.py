"""The listener: bind (TCP over IPv4/IPv6, Unix sockets, a given socket) and the accept loop.

It knows nothing of connections: it hands each accepted socket, with its
peer address and the connection slot it holds, to a callback (the server's
supervisor), after asking the admission hook whether to take it at all.

Strategy: the accept loop is fastnet's own, not ``loop.create_server``, for
one reason: it takes a connection slot *before* it accepts. With
``max_connections`` connections open, the loop waits on the slot semaphore
and does not call accept(2); clients that arrive meanwhile wait in the
kernel's listen backlog instead of being accepted and dropped, and are
served, in order, as slots free up. Accept errors are classified (trio's
table): a capacity error backs off, a dead connection is skipped, and
nothing ends the loop. While accept(2) keeps succeeding, the loop yields to
the event loop every ``ACCEPT_BATCH`` accepts, so a burst of connects cannot
hold the loop from the connections already open. ``pause_accepting()``
(overload, see ``fastnet.limits``) makes the loop wait before it takes a
slot, as it waits at ``max_connections``, until ``resume_accepting()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

from .metrics import accept_error_kind

__all__ = [
    "ACCEPT_BATCH",
    "ACCEPT_CAPACITY_ERRNOS",
    "ACCEPT_IGNORABLE_ERRNOS",
    "DEFAULT_BACKLOG",
    "Admission",
    "Listener",
    "bind_tcp",
    "bind_unix",
    "format_address",
    "format_peer",
]

logger = logging.getLogger("fastnet")

# Connections beyond max_connections wait in the kernel's accept queue, so it
# should hold a burst: 1024 (Linux caps it at net.core.somaxconn, 4096 by
# default since 5.4). asyncio's default of 100 is tuned for servers that
# accept everything at once.
DEFAULT_BACKLOG = 1024

# accept(2) errors, classified as trio's _highlevel_socket.py and
# _highlevel_serve_listeners.py do. These mean the process or the system is
# out of a resource (descriptors, memory, buffers): accepting again at once
# would fail again, so back off; connections already open will free some.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# These concern one connection that died (or was refused by a firewall)
# between the handshake and accept(2); the next one is fine: retry at once.
ACCEPT_IGNORABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
# Back-off after a capacity error: trio sleeps a fixed 100 ms; we start there
# and double up to 1 s while the errors persist, so a long outage costs one
# log line a second instead of ten.
ACCEPT_BACKOFF_MIN = 0.1
ACCEPT_BACKOFF_MAX = 1.0

# Most connections accepted in one go before the accept loop yields to the
# event loop. An accept with its task costs about 30 µs here, so a burst of
# 10,000 connects held the loop for 0.3 s; 64 bound that to about 2 ms
# (Twisted accepts up to 100 per readiness event, libuv until EAGAIN). The
# backlog keeps the rest meanwhile.
ACCEPT_BATCH = 64

# The admission hook: called with each accepted socket and its peer address
# before a connection is set up; True admits it, False rejects it (the
# socket is closed and its slot freed). Per-peer limits and the PROXY
# protocol plug in here.
Admission = Callable[[socket.socket, Any], bool]


def format_address(host: str, port: int | None) -> str:
    """``HOST:PORT``, or ``[V6]:PORT`` for an IPv6 address."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def format_peer(peer: Any) -> str:
    """A peer address (as the socket module gives it) for log lines."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_address(str(peer[0]), peer[1])
    return str(peer) if peer else "unix peer"


async def bind_tcp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, *, reuse_port: bool = False
) -> socket.socket:
    """A TCP socket bound to ``host``'s first address (IPv6 binds IPv6 only); not listening.

    Raises:
        OSError: the name does not resolve or the address cannot be bound;
            the message names the address.
    """
    where = format_address(host, port)
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot resolve {where}: {exc.strerror}") from None
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {where}")
    family, type_, proto, _, address = infos[0]  # one interface: the first address
    sock = socket.socket(family, type_, proto)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not supported here")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Bind IPv6 only: "::" must not also take the IPv4 port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
    return sock


def bind_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A Unix socket bound to ``path`` (a stale socket file is replaced), with the file's identity.

    Returns:
        The socket, and ``(st_dev, st_ino)`` of its file, so that the server
        removes only its own file when it stops.

    Raises:
        OSError: the path cannot be bound; the message names it.
    """
    where = f"unix:{path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISSOCK(st.st_mode) and not _unix_socket_in_use(path):
            os.unlink(path)  # stale: left behind by a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


def _unix_socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _set_result(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Listener:
    """Accepts connections on one listening socket, within a number of slots.

    Args:
        sock: the listening socket (non-blocking, ``listen`` already called).
        slots: the connection slots; one is taken before each accept and
            handed on with the socket.
        on_accept: ``on_accept(sock, peer, release)`` takes an admitted
            socket; it must call ``release()`` once, when the connection is
            closed, to free the slot.
        admit: the admission hook (``Admission``); None admits everyone.
        error_counts: a dict to count accept errors in, by errno name (metrics).

    Attributes:
        accepted, accept_errors, rejected: counters.
    """

    def __init__(
        self,
        sock: socket.socket,
        slots: asyncio.Semaphore,
        on_accept: Callable[[socket.socket, Any, Callable[[], None]], None],
        *,
        admit: Admission | None = None,
        error_counts: dict[str, int] | None = None,
    ) -> None:
        self.sock = sock
        self._error_counts = error_counts
        self._slots = slots
        self._on_accept = on_accept
        self._admit = admit
        self._task: asyncio.Task[None] | None = None
        # Set while accepting is paused; resume_accepting() completes it.
        self._paused: asyncio.Future[None] | None = None
        # The accept loop's wait for the listening socket to be readable
        # (pause_accepting() ends it, so that no client is accepted after).
        self._readable: asyncio.Future[None] | None = None
        self.accepted = 0
        self.accept_errors = 0
        self.rejected = 0

    def start(self) -> None:
        """Start the accept loop in a task of its own."""
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    @property
    def accepting_paused(self) -> bool:
        """True between ``pause_accepting()`` and ``resume_accepting()``."""
        return self._paused is not None

    def pause_accepting(self) -> None:
        """Stop calling accept(2) until ``resume_accepting()``; new clients wait in the backlog.

        The loop stops waiting for the listening socket at once and then
        waits for ``resume_accepting()``, holding no slot.
        """
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()
            readable = self._readable
            if readable is not None:
                _set_result(readable)

    def resume_accepting(self) -> None:
        """Accept again after ``pause_accepting()``."""
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    async def stop(self) -> None:
        """Stop accepting (the socket stays open; the caller closes it)."""
        # The loop must be gone before the socket is closed: it watches the
        # socket's descriptor, and closing a watched descriptor upsets uvloop.
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        slots = self._slots
        listener = self.sock
        backoff = ACCEPT_BACKOFF_MIN
        in_a_row = 0  # accepts since the loop last waited or yielded
        while True:
            # Step 0: while accepting is paused (overload), wait here,
            # before taking a slot: clients queue in the kernel backlog.
            paused = self._paused
            if paused is not None:
                await paused
                continue
            # Step 1: take a slot first. At max_connections this waits, and
            # new clients queue in the kernel backlog rather than being
            # accepted and dropped.
            await slots.acquire()
            if self._paused is not None:  # paused while waiting for the slot
                slots.release()
                continue
            try:
                # Step 2: accept one connection; errors never end the loop.
                while True:
                    if in_a_row >= ACCEPT_BATCH:
                        # accept(2) keeps succeeding: let the rest of the
                        # loop run before taking more.
                        in_a_row = 0
                        await asyncio.sleep(0)
                    try:
                        accepted = await self._accept(loop, listener)
                    except OSError as exc:
                        in_a_row = 0
                        self.accept_errors += 1
                        counts = self._error_counts
                        if counts is not None:
                            kind = accept_error_kind(exc)
                            counts[kind] = counts.get(kind, 0) + 1
                        if exc.errno in ACCEPT_IGNORABLE_ERRNOS:
                            logger.debug("accept failed (%s); accepting the next one", exc)
                            continue
                        if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                            level = logging.ERROR
                        else:  # unknown: log loudly, but keep serving
                            level = logging.CRITICAL
                        logger.log(level, "accept failed (%s); retrying in %.1f s", exc, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                        continue
                    break
            except BaseException:
                slots.release()
                raise
            if accepted is None:  # paused while waiting for a client: back to step 0
                slots.release()
                continue
            sock, peer, waited = accepted
            in_a_row = 1 if waited else in_a_row + 1
            backoff = ACCEPT_BACKOFF_MIN
            # Step 3: admission. A rejected socket is closed and frees its slot.
            if self._admit is not None and not self._admitted(sock, peer):
                self.rejected += 1
                sock.close()
                slots.release()
                continue
            self.accepted += 1
            # Step 4: the supervisor takes it from here (and gives the slot
            # back when the connection is closed).
            self._on_accept(sock, peer, slots.release)

    def _admitted(self, sock: socket.socket, peer: Any) -> bool:
        assert self._admit is not None
        try:
            return bool(self._admit(sock, peer))
        except Exception:
            logger.exception("the admission hook failed for %s; rejected", format_peer(peer))
            return False

    async def _accept(
        self, loop: asyncio.AbstractEventLoop, listener: socket.socket
    ) -> tuple[socket.socket, Any, bool] | None:
        # accept(2) is called here, synchronously, after waiting for the
        # listening socket to be readable; not through loop.sock_accept,
        # whose future may hold an accepted socket when the accept loop is
        # cancelled at shutdown, and then lose it (a descriptor leak in both
        # asyncio and uvloop). Cancellation can only strike while no
        # socket exists. Returns the socket, its peer, and whether it waited;
        # None once accepting is paused.
        waited = False
        while True:
            if self._paused is not None:
                return None
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                pass
            else:
                sock.setblocking(False)
                return sock, peer, waited
            waited = True
            waiter = loop.create_future()
            self._readable = waiter
            fd = listener.fileno()
            try:
                loop.add_reader(fd, _set_result, waiter)
            except NotImplementedError:  # Windows' proactor loop has no add_reader
                sock, peer = await loop.sock_accept(listener)
                return sock, peer, True
            try:
                await waiter
            finally:
                self._readable = None
                loop.remove_reader(fd)
