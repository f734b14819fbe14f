"""Worker processes: ``fastnet serve APP --workers N`` and ``fastnet.run(..., workers=N)``.

A supervisor process binds the listening socket(s) once and runs N workers,
each a whole fastnet server (its own event loop, ``runner.serve``) on a
socket it inherits. The supervisor serves no connection itself: it starts,
watches, replaces and retires workers, and (with ``--metrics``) serves one
``/metrics``, ``/healthz`` and ``/readyz`` with the totals of all of them.

Strategy:

- **Processes.** A worker is ``python -m fastnet.workers`` started with
  ``subprocess.Popen(pass_fds=...)``: a fresh interpreter that inherits two
  descriptors, its listening socket and its end of a control socketpair, and
  nothing else (``close_fds``). Not ``multiprocessing``: its ``fork`` start
  method would copy a process whose event loop (and, under uvloop, libuv's
  threads and descriptors) exists, and its ``spawn`` method passes a socket
  by pickling it through a resource-sharer thread and re-imports the
  parent's ``__main__``; a subprocess states exactly what it inherits. So
  the app is named, not passed: ``APP`` as on the command line (a built-in
  or ``module:function``), imported by each worker, never by the
  supervisor. Each worker runs in its own session (``start_new_session``),
  so a Ctrl-C at the terminal reaches the supervisor alone, which then
  drains the workers in order: one signal each, not two.

- **Sockets.** A *slot* is a worker position (0..N-1) with its listening
  socket. By default every slot shares one socket, so every worker accepts
  from one kernel queue. With ``reuse_port`` each slot has its own
  SO_REUSEPORT socket, all bound by the supervisor to the same address: the
  kernel spreads new connections over them by a hash of the 4-tuple, with no
  thundering herd (only one worker is woken per connection). The price is
  that a connection the kernel queued on a socket can only be accepted from
  that socket: if the socket closes, its queue is reset. fastnet keeps a
  slot's socket open in the supervisor for the slot's life, so a worker's
  replacement (after a crash, a hang, or in a rolling restart, where old and
  new share the slot's socket during the overlap) accepts what was queued
  for its predecessor: nothing is dropped. Only removing a slot (SIGTTOU)
  closes its socket: the retiring worker keeps accepting during its drain
  delay, then connections still queued on that one socket are reset
  (Linux's ``net.ipv4.tcp_migrate_req=1`` migrates them to the group's
  other sockets instead).

- **Health.** The supervisor pings each worker over its control socket every
  ``heartbeat_interval`` seconds; the worker answers from its event loop,
  with ``metrics.snapshot(server)`` when metrics are on. A worker that has
  not answered for ``worker_timeout`` seconds (its loop is blocked, or the
  process is stopped) is killed (SIGKILL) and replaced; one that exits is
  replaced. Replacements of a slot whose workers keep dying young are
  delayed (0.5 s doubling to 30 s) so a crash loop cannot spin. At start-up
  every worker must report ready: one that fails (the app cannot be
  imported, a TLS file is bad) stops the supervisor with its one-line error
  (``WorkerStartError``; exit status 1 from the CLI).

- **Signals** (to the supervisor). SIGINT/SIGTERM: every worker gets SIGTERM
  and drains as a single server does (``drain_delay``, then at most
  ``drain_timeout``), the supervisor waits for all and returns; a second
  signal kills every worker and exits at once. SIGHUP: a rolling restart,
  one slot at a time: start the replacement, wait until it is ready, then
  retire the old worker (SIGTERM: it drains while the new one already
  accepts); a replacement that fails aborts the roll and the old workers
  stay. New workers build their TLS context from the files, so SIGHUP is
  also how the workers pick up renewed certificates. SIGTTIN adds a worker,
  SIGTTOU retires the last one (never the only one).

- **Messages** on a control socket are pickled tuples behind a 4-byte
  length, between a supervisor and the children it started (no one else
  holds either end). Supervisor to worker: the ``WorkerSpec`` first, then
  ``("ping",)``. Worker to supervisor: ``("ready", snapshot)``,
  ``("error", line)``, ``("pong", snapshot)``, ``("bye", snapshot)`` (the
  last counts, sent after the worker's drain). End of file means the worker
  is gone; the supervisor holds no copy of the worker's end.

Metrics: ``FastnetCollector.from_snapshots`` over the workers' latest
snapshots (at most one heartbeat old) plus those of the workers already gone
(their last snapshot, with no open connections), so totals never go back
when a worker is replaced; a killed worker loses at most its last heartbeat
interval of counts. Beside them, per slot: ``fastnet_worker_connections_
accepted_total{worker="0"}`` (the spread), ``fastnet_workers`` and
``fastnet_worker_restarts_total{reason}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from .listener import bind_tcp, bind_unix, format_address

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_WORKER_TIMEOUT",
    "START_TIMEOUT",
    "WorkerSpec",
    "WorkerStartError",
    "WorkerSupervisor",
    "run_workers",
]

logger = logging.getLogger("fastnet.workers")

# Seconds between pings. A scrape sees counts at most this old; one per
# second costs a worker a snapshot (a few dicts) per second.
DEFAULT_HEARTBEAT_INTERVAL = 1.0

# Seconds without an answer before a worker is declared hung and killed.
# A handler that blocks its loop that long takes its worker (and its
# connections) with it: that is the point, as with gunicorn's --timeout (30 s)
# and a Kubernetes liveness probe (3 failures x 10 s).
DEFAULT_WORKER_TIMEOUT = 30.0

# Seconds a new worker may take to import the app, bind nothing (the socket is
# given) and report ready: an interpreter starts in about 0.2 s here; a big
# app on a loaded machine gets a hundred times that.
START_TIMEOUT = 30.0

# Restart back-off: a slot whose worker died within BACKOFF_RESET seconds of
# being ready waits BACKOFF_FIRST, doubled per such death up to BACKOFF_MAX,
# before its next worker starts. Guesses: quick enough to not matter for a
# one-off crash, slow enough that a crash loop costs little.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET = 10.0

# Seconds a retiring worker gets beyond its drain delay and drain timeout to
# exit (interpreter teardown) before it is killed.
EXIT_GRACE = 5.0

_LENGTH = struct.Struct(">I")
_MAX_MESSAGE = 64 * 1024 * 1024  # a snapshot is a few KiB; anything near this is a bug


class WorkerStartError(RuntimeError):
    """Raised by ``run_workers`` when a worker fails at start-up; the message is one line."""


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What each worker is told to serve (pickled to it over its control socket).

    Args:
        app: the handler's name: a built-in app (``echo``, ...) or
            ``module:function``, imported by the worker.
        options: keyword arguments for ``Server`` (picklable: framing specs,
            ``TLSFiles``, numbers, strings).
        loop: ``auto``, ``asyncio`` or ``uvloop``.
        drain_delay: as ``runner.serve``.
        metrics: keep metrics (the supervisor exports them).
        log_level, log_format: the worker's logging (as ``fastnet serve``).
        sys_path: entries the worker adds to ``sys.path`` before importing
            the app (the supervisor's, so a script's directory is found).
    """

    app: str
    options: dict[str, Any]
    loop: str = "auto"
    drain_delay: float = 0.0
    metrics: bool = False
    log_level: str = "info"
    log_format: str = "text"
    sys_path: tuple[str, ...] = ()


# ------------------------------------------------------------------ messages


def _encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def _receive(reader: asyncio.StreamReader) -> Any:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > _MAX_MESSAGE:
        raise ConnectionError(f"control message of {size} bytes")
    return pickle.loads(await reader.readexactly(size))  # from our own child only


def _receive_blocking(sock: socket.socket) -> Any:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the supervisor closed the control socket")
            data += chunk
        return data

    (size,) = _LENGTH.unpack(exactly(_LENGTH.size))
    return pickle.loads(exactly(size))  # from our own parent only


# -------------------------------------------------------------- the supervisor


class _Worker:
    """One worker process, as the supervisor sees it."""

    def __init__(self, slot: int, proc: subprocess.Popen[bytes]) -> None:
        self.slot = slot
        self.proc = proc
        self.pid = proc.pid
        self.state = "starting"  # starting -> ready -> retiring -> gone
        self.started_at = time.monotonic()
        self.ready_at = 0.0
        self.last_answer = time.monotonic()
        self.snapshot: dict[str, Any] | None = None
        self.error: str | None = None
        self.hung = False
        self.writer: asyncio.StreamWriter | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.gone = asyncio.Event()

    def __repr__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"

    def send(self, message: Any) -> None:
        writer = self.writer
        if writer is not None and not writer.is_closing():
            writer.write(_encode(message))

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


@dataclasses.dataclass
class _Slot:
    index: int
    sock: socket.socket
    worker: _Worker | None = None
    short_lives: int = 0  # consecutive workers that died young (the back-off)
    restart: asyncio.TimerHandle | None = None


class _Readiness:
    """What ``HealthEndpoint`` asks of a server, answered for the supervisor."""

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self._supervisor = supervisor

    @property
    def draining(self) -> bool:
        return self._supervisor.draining

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return self._supervisor.sockets if self._supervisor.ready_workers else ()


class WorkerSupervisor:
    """Runs ``workers`` processes serving ``spec`` on sockets it binds (see the module doc).

    Args:
        spec: what the workers serve.
        host, port: the address to bind (``unix`` in ``spec.options`` for a
            Unix socket instead).
        workers: the initial number of workers (at least 1).
        reuse_port: one SO_REUSEPORT socket per worker instead of one shared.
        backlog: the listen(2) backlog of each socket.
        worker_timeout: seconds without a heartbeat answer before a worker is
            killed and replaced.
        heartbeat_interval: seconds between pings.
        drain_timeout: the workers' drain timeout (bounds their exit).
    """

    def __init__(
        self,
        spec: WorkerSpec,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        workers: int = 2,
        reuse_port: bool = False,
        backlog: int = 1024,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        drain_timeout: float = 30.0,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not worker_timeout > 0 or not heartbeat_interval > 0:
            raise ValueError("worker_timeout and heartbeat_interval must be positive")
        self.spec = spec
        self._host = host
        self._port = port
        self._unix: str | None = spec.options.get("unix")
        if reuse_port and self._unix is not None:
            raise ValueError("reuse_port needs TCP, not a Unix socket")
        self.count = workers
        self.reuse_port = reuse_port
        self.backlog = backlog
        self.worker_timeout = worker_timeout
        self.heartbeat_interval = min(heartbeat_interval, worker_timeout / 2)
        self.drain_timeout = drain_timeout
        self.start_timeout = start_timeout
        self.address = ""
        self.draining = False
        self._slots: dict[int, _Slot] = {}
        self._retiring: set[_Worker] = set()
        self._starting: set[_Worker] = set()
        self._shared: socket.socket | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done: asyncio.Event | None = None
        self._rolling = False
        self._roll_again = False
        # Metrics of workers already gone: their last snapshots, merged.
        self._gone_snapshots: list[dict[str, Any]] = []
        self._gone_accepted: dict[int, int] = {}
        self.restarts: dict[str, int] = {"exited": 0, "hung": 0}

    # ------------------------------------------------------------ properties

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (one shared, or one per slot with ``reuse_port``)."""
        if self._shared is not None:
            return (self._shared,)
        return tuple(slot.sock for slot in self._slots.values())

    @property
    def ready_workers(self) -> list[_Worker]:
        return [s.worker for s in self._slots.values() if s.worker and s.worker.state == "ready"]

    def _live(self) -> Iterator[_Worker]:
        for slot in self._slots.values():
            if slot.worker is not None:
                yield slot.worker
        yield from self._retiring
        yield from self._starting

    @property
    def pids(self) -> dict[int, int]:
        """Slot -> pid of each slot's current worker."""
        return {i: s.worker.pid for i, s in sorted(self._slots.items()) if s.worker is not None}

    # --------------------------------------------------------------- binding

    async def _bind(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self._unix is not None:
            if self._shared is not None:
                return self._shared
            sock, _ = bind_unix(self._unix)
        elif self._shared is not None and not self.reuse_port:
            return self._shared
        else:
            port = self._port
            if self.reuse_port and self._slots:
                # Later sockets join the first one's port (it may have been 0).
                port = next(iter(self._slots.values())).sock.getsockname()[1]
            sock = await bind_tcp(loop, self._host, port, reuse_port=self.reuse_port)
        try:
            sock.listen(self.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {self._host}: {exc.strerror}") from None
        if not self.reuse_port:
            self._shared = sock
        if not self.address:
            name = sock.getsockname()
            self.address = (
                format_address(name[0], name[1]) if isinstance(name, tuple) else f"unix:{name}"
            )
        return sock

    async def _add_slot(self, index: int) -> _Slot:
        slot = _Slot(index, await self._bind())
        self._slots[index] = slot
        return slot

    # -------------------------------------------------------------- workers

    async def _spawn(self, slot: _Slot) -> _Worker:
        parent, child = socket.socketpair()
        listen_fd = slot.sock.fileno()
        command = [
            sys.executable,
            "-m",
            "fastnet.workers",
            "--slot",
            str(slot.index),
            "--control-fd",
            str(child.fileno()),
            "--listen-fd",
            str(listen_fd),
        ]
        try:
            proc = subprocess.Popen(
                command,
                pass_fds=(child.fileno(), listen_fd),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the worker's end: EOF on ours means the worker is gone
        worker = _Worker(slot.index, proc)
        self._starting.add(worker)
        reader, writer = await asyncio.open_connection(sock=parent)
        worker.writer = writer
        worker.send(self.spec)
        self._spawn_task(self._read(worker, reader))
        logger.debug("started %r", worker)
        return worker

    async def _start(self, slot: _Slot) -> _Worker | None:
        """Start a worker in ``slot``, wait until it is ready, and make it the slot's.

        Returns:
            The slot's previous worker (None if it had none), for the caller
            to retire.

        Raises:
            WorkerStartError: it failed or did not report ready in time (it
                is killed), or the slot went away meanwhile (it is retired).
        """
        worker = await self._spawn(slot)
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout)
        except asyncio.TimeoutError:
            worker.kill()
            raise WorkerStartError(
                f"{worker!r} did not report ready within {self.start_timeout:g} s"
            ) from None
        except BaseException:
            worker.kill()
            raise
        finally:
            self._starting.discard(worker)
        if worker.state == "gone":
            raise WorkerStartError(f"{worker!r} exited as soon as it was ready")
        if self._stopping or self._slots.get(slot.index) is not slot:
            self._retire(worker)
            raise WorkerStartError(f"{worker!r} is not needed any more")
        old, slot.worker = slot.worker, worker
        return old

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await _receive(reader)
                kind = message[0]
                worker.last_answer = time.monotonic()
                if kind == "ready":
                    worker.snapshot = message[1]
                    if worker.state == "starting":
                        worker.state = "ready"
                        worker.ready_at = time.monotonic()
                    if not worker.ready.done():
                        worker.ready.set_result(None)
                elif kind == "error":
                    worker.error = str(message[1])
                elif kind in ("pong", "bye") and message[1] is not None:
                    worker.snapshot = message[1]
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError, OSError):
            pass
        finally:
            if worker.writer is not None:
                worker.writer.close()
        # End of file: the worker is exiting. Reap it (bounded; kill if it lingers).
        deadline = time.monotonic() + EXIT_GRACE
        while worker.proc.poll() is None:
            if time.monotonic() > deadline:
                worker.kill()
                deadline = time.monotonic() + EXIT_GRACE
            await asyncio.sleep(0.02)
        self._exited(worker)

    def _exited(self, worker: _Worker) -> None:
        previous = worker.state
        worker.state = "gone"
        status = worker.proc.returncode
        self._retiring.discard(worker)
        self._starting.discard(worker)
        if worker.snapshot is not None:
            snap = dict(worker.snapshot)
            snap["stats"] = dict(snap["stats"], active=0)
            snap["draining"] = False
            from .metrics import merge_snapshots

            self._gone_snapshots = merge_snapshots([*self._gone_snapshots, snap])
            accepted = snap["stats"].get("accepted", 0)
            self._gone_accepted[worker.slot] = self._gone_accepted.get(worker.slot, 0) + accepted
            worker.snapshot = None
        if not worker.ready.done():
            why = worker.error or f"exited with status {status} before it was ready"
            worker.ready.set_exception(WorkerStartError(f"{worker!r} failed to start: {why}"))
        worker.gone.set()
        slot = self._slots.get(worker.slot)
        if slot is None or slot.worker is not worker:
            # Retired (drained), or a new worker that failed: its starter reports that.
            if previous == "retiring":
                logger.info("%r exited (status %s)", worker, status)
            return
        slot.worker = None
        if self._stopping:
            return
        reason = "hung" if worker.hung else "exited"
        self.restarts[reason] += 1
        lived = time.monotonic() - worker.ready_at if worker.ready_at else 0.0
        slot.short_lives = slot.short_lives + 1 if lived < BACKOFF_RESET else 0
        delay = 0.0
        if slot.short_lives:
            delay = min(BACKOFF_FIRST * 2 ** (slot.short_lives - 1), BACKOFF_MAX)
        logger.warning(
            "%r %s (status %s): replacing it in %g s",
            worker,
            "was hung and killed" if worker.hung else "died",
            status,
            delay,
        )
        loop = asyncio.get_running_loop()
        slot.restart = loop.call_later(delay, self._replace, slot)

    def _replace(self, slot: _Slot) -> None:
        slot.restart = None
        if self._stopping or self._slots.get(slot.index) is not slot or slot.worker is not None:
            return

        async def replace() -> None:
            try:
                await self._start(slot)
            except (WorkerStartError, OSError) as exc:
                logger.error("replacing worker %d failed: %s", slot.index, exc)
                slot.short_lives += 1
                delay = min(BACKOFF_FIRST * 2 ** (slot.short_lives - 1), BACKOFF_MAX)
                if not self._stopping:
                    slot.restart = asyncio.get_running_loop().call_later(delay, self._replace, slot)
                return
            logger.info("%r replaces the worker of slot %d", slot.worker, slot.index)

        self._spawn_task(replace())

    def _retire(self, worker: _Worker) -> None:
        """SIGTERM ``worker`` (it drains), and kill it if it outlives its bound."""
        if worker.state == "gone":
            return
        worker.state = "retiring"
        self._retiring.add(worker)
        worker.kill(signal.SIGTERM)
        bound = self.spec.drain_delay + self.drain_timeout + EXIT_GRACE

        async def bounded() -> None:
            try:
                await asyncio.wait_for(worker.gone.wait(), bound)
            except asyncio.TimeoutError:
                logger.warning("%r did not exit within %g s: killing it", worker, bound)
                worker.kill()

        self._spawn_task(bounded())

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------- heartbeat

    async def _heartbeat(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.heartbeat_interval)
            now = time.monotonic()
            for worker in list(self._live()):
                if worker.state == "ready" and now - worker.last_answer > self.worker_timeout:
                    if not worker.hung:
                        logger.warning(
                            "%r has not answered for %g s: killing it",
                            worker,
                            now - worker.last_answer,
                        )
                        worker.hung = True
                        worker.kill()
                    continue
                worker.send(("ping",))

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind, start every worker and wait until each is ready.

        Raises:
            OSError: the address cannot be bound (the message names it).
            WorkerStartError: a worker failed at start-up; all are stopped.
        """
        self._done = asyncio.Event()
        try:
            slots = [await self._add_slot(i) for i in range(self.count)]
        except BaseException:
            self._close_sockets()
            raise
        results = await asyncio.gather(
            *(self._start(slot) for slot in slots), return_exceptions=True
        )
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self._stop_all(kill=True)
            self._close_sockets()
            raise failure
        self._spawn_task(self._heartbeat())
        logger.info("%d workers serving %s", self.count, self.address)

    async def serve_forever(self) -> None:
        assert self._done is not None
        await self._done.wait()

    async def shutdown(self) -> None:
        """Drain every worker (each within its drain delay and timeout), then close."""
        if self._stopping:
            return
        self._stopping = True
        self.draining = True
        await self._stop_all(kill=False)
        self._close_sockets()
        logger.info("all workers stopped")
        if self._done is not None:
            self._done.set()

    async def _stop_all(self, kill: bool) -> None:
        self._stopping = True
        for slot in self._slots.values():
            if slot.restart is not None:
                slot.restart.cancel()
        workers = list(self._live())
        for worker in workers:
            if kill:
                worker.kill()
            elif worker.state != "retiring":
                self._retire(worker)
        if workers:
            bound = self.spec.drain_delay + self.drain_timeout + 2 * EXIT_GRACE
            await asyncio.wait(
                [asyncio.ensure_future(w.gone.wait()) for w in workers], timeout=bound
            )

    def kill_all(self) -> None:
        """SIGKILL every worker at once (the second signal)."""
        self._stopping = True
        for worker in list(self._live()):
            worker.kill()

    def _close_sockets(self) -> None:
        for sock in {id(s): s for s in self.sockets}.values():
            sock.close()
        if self._unix is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix)

    # ------------------------------------------------------- rolling, scaling

    async def roll(self) -> bool:
        """Replace every worker, one slot at a time, each new one ready before the old retires.

        Returns:
            True when every slot was replaced; False when a replacement
            failed (the roll stops there; the remaining old workers stay).
        """
        if self._rolling:
            self._roll_again = True
            logger.info("SIGHUP during a rolling restart: another roll follows this one")
            return True
        self._rolling = True
        try:
            while True:
                self._roll_again = False
                logger.info("rolling restart of %d workers", len(self._slots))
                for index in sorted(self._slots):
                    slot = self._slots.get(index)
                    if slot is None or self._stopping:
                        continue
                    try:
                        old = await self._start(slot)
                    except (WorkerStartError, OSError) as exc:
                        if self._stopping:
                            return False
                        logger.error("rolling restart aborted: %s", exc)
                        return False
                    if old is not None:
                        self._retire(old)
                    logger.info("%r replaced %r", slot.worker, old)
                if not self._roll_again or self._stopping:
                    logger.info("rolling restart done")
                    return True
        finally:
            self._rolling = False

    async def add_worker(self) -> None:
        """Start one more worker (SIGTTIN)."""
        index = max(self._slots, default=-1) + 1
        slot = await self._add_slot(index)
        try:
            await self._start(slot)
        except (WorkerStartError, OSError) as exc:
            logger.error("adding a worker failed: %s", exc)
            if self._slots.get(index) is slot:
                del self._slots[index]
            if self.reuse_port:
                slot.sock.close()
            return
        self.count = len(self._slots)
        logger.info("%r added: %d workers", slot.worker, self.count)

    def remove_worker(self) -> None:
        """Retire the last worker (SIGTTOU); the only one stays."""
        if len(self._slots) <= 1:
            logger.info("SIGTTOU: one worker left; not removing it")
            return
        index = max(self._slots)
        slot = self._slots.pop(index)
        if slot.restart is not None:
            slot.restart.cancel()
        if slot.worker is not None:
            self._retire(slot.worker)
        if self.reuse_port:
            # The retiring worker holds its own descriptor: the socket lives
            # (and accepts, during its drain delay) until the worker closes it.
            slot.sock.close()
        self.count = len(self._slots)
        logger.info("worker %d retired: %d workers", index, self.count)

    # --------------------------------------------------------------- metrics

    def snapshots(self) -> list[dict[str, Any]]:
        """The snapshots to sum: the live workers' latest, and the gone workers' merged."""
        live = [w.snapshot for w in self._live() if w.snapshot is not None]
        return [*self._gone_snapshots, *live]

    def accepted_by_worker(self) -> dict[int, int]:
        """Connections accepted per slot, over every worker the slot has had."""
        totals = dict(self._gone_accepted)
        for index in self._slots:
            totals.setdefault(index, 0)
        for worker in self._live():
            if worker.snapshot is not None:
                accepted = worker.snapshot["stats"].get("accepted", 0)
                totals[worker.slot] = totals.get(worker.slot, 0) + accepted
        return dict(sorted(totals.items()))


class _WorkerCollector:
    """The per-worker families: accepts by slot, the worker count, the restarts."""

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self._supervisor = supervisor

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sup = self._supervisor
        accepted = CounterMetricFamily(
            "fastnet_worker_connections_accepted",
            "Connections accepted, per worker slot (every worker the slot has had).",
            labels=["worker"],
        )
        for index, count in sup.accepted_by_worker().items():
            accepted.add_metric([str(index)], count)
        yield accepted
        workers = GaugeMetricFamily("fastnet_workers", "Worker processes ready.")
        workers.add_metric([], len(sup.ready_workers))
        yield workers
        restarts = CounterMetricFamily(
            "fastnet_worker_restarts",
            "Workers replaced after they died (exited) or stopped answering (hung).",
            labels=["reason"],
        )
        for reason, count in sorted(sup.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts


def metrics_registry(supervisor: WorkerSupervisor) -> Any:
    """A prometheus_client registry with the workers' totals and the per-worker families."""
    from prometheus_client import CollectorRegistry

    from .metrics import FastnetCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FastnetCollector.from_snapshots(supervisor.snapshots))
    registry.register(_WorkerCollector(supervisor))
    return registry


# ------------------------------------------------------------------- running


def run_workers(
    app: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    workers: int,
    loop: str = "auto",
    reuse_port: bool = False,
    drain_delay: float = 0.0,
    metrics_address: tuple[str, int] | None = None,
    on_ready: Callable[[WorkerSupervisor], object] | None = None,
    on_metrics_ready: Callable[[Any], object] | None = None,
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    log_level: str | None = None,
    log_format: str = "text",
    **options: Any,
) -> None:
    """Serve ``app`` from ``workers`` processes until SIGINT/SIGTERM (``fastnet.run(workers=N)``).

    Args:
        app: the handler by name: a built-in app or ``module:function`` (the
            workers import it; a function object cannot be sent to a fresh
            interpreter). A script's own module works when its directory is
            on ``sys.path`` (it is, for the script being run).
        workers: processes to start (SIGTTIN/SIGTTOU change it).
        reuse_port: one SO_REUSEPORT socket per worker (see the module doc).
        metrics_address: the supervisor's ``/metrics``, ``/healthz``,
            ``/readyz``; the workers keep metrics and send them over.
        on_ready: called with the ``WorkerSupervisor`` once every worker is
            ready (``address`` is the real one).
        on_metrics_ready: called with the ``HealthEndpoint`` once it listens.
        worker_timeout, heartbeat_interval: see ``WorkerSupervisor``.
        log_level, log_format: the workers' logging (default: the level of
            the ``fastnet`` logger here).
        loop, drain_delay, **options: as ``run`` and ``Server``; ``options``
            must be picklable (no ``hooks``, ``admit`` or registry objects).

    Raises:
        OSError: an address cannot be bound.
        WorkerStartError: a worker failed at start-up (one line).
        TypeError: ``app`` is not a string.
    """
    if not isinstance(app, str):
        raise TypeError(
            "with workers, give the handler by name ('module:function' or a built-in app): "
            f"each worker imports it; got {type(app).__name__}"
        )
    from .runner import run_coroutine

    options.pop("handle_signals", None)
    metrics = options.pop("metrics", None)
    for name in ("hooks", "admit", "sock"):
        if options.get(name) is not None:
            raise TypeError(f"{name}= cannot be sent to worker processes")
    if log_level is None:
        level = logging.getLogger("fastnet").getEffectiveLevel()
        log_level = logging.getLevelName(level).lower()
    drain_timeout = float(options.get("drain_timeout", 30.0))
    backlog = int(options.get("backlog", 1024))
    spec = WorkerSpec(
        app=app,
        options=options,
        loop=loop,
        drain_delay=drain_delay,
        metrics=bool(metrics) or metrics_address is not None,
        log_level=log_level,
        log_format=log_format,
        sys_path=tuple(p for p in sys.path if p),
    )
    supervisor = WorkerSupervisor(
        spec,
        host,
        port,
        workers=workers,
        reuse_port=reuse_port,
        backlog=backlog,
        worker_timeout=worker_timeout,
        heartbeat_interval=heartbeat_interval,
        drain_timeout=drain_timeout,
    )
    run_coroutine(
        _supervise(supervisor, metrics_address, on_ready, on_metrics_ready),
        loop="asyncio" if loop == "asyncio" else "auto",
    )


async def _supervise(
    supervisor: WorkerSupervisor,
    metrics_address: tuple[str, int] | None,
    on_ready: Callable[[WorkerSupervisor], object] | None,
    on_metrics_ready: Callable[[Any], object] | None,
) -> None:
    from .health import HealthEndpoint

    loop = asyncio.get_running_loop()
    await supervisor.start()
    endpoint = None
    restore: Callable[[], None] | None = None
    try:
        if metrics_address is not None:
            registry = metrics_registry(supervisor)
            endpoint = HealthEndpoint(
                cast(Any, _Readiness(supervisor)), *metrics_address, registry=registry
            )
            await endpoint.start()
        restore = _install_signals(loop, supervisor)
        if on_ready is not None:
            on_ready(supervisor)
        if on_metrics_ready is not None and endpoint is not None:
            on_metrics_ready(endpoint)
        await supervisor.serve_forever()
    finally:
        if restore is not None:
            restore()
        await supervisor.shutdown()
        if endpoint is not None:
            await endpoint.close()


def _install_signals(
    loop: asyncio.AbstractEventLoop, supervisor: WorkerSupervisor
) -> Callable[[], None]:
    tasks: list[asyncio.Task[Any]] = []

    def keep(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.append(task)
        task.add_done_callback(tasks.remove)

    def on_stop(signum: int) -> None:
        name = signal.Signals(signum).name
        if supervisor.draining:
            logger.warning("%s again: killing every worker and exiting now", name)
            supervisor.kill_all()
            os._exit(128 + signum)
        logger.info("%s received: draining every worker (a second signal exits at once)", name)
        keep(supervisor.shutdown())

    def on_hup() -> None:
        if supervisor.draining:
            return
        logger.info("SIGHUP received: rolling restart")
        keep(supervisor.roll())

    def on_ttin() -> None:
        if not supervisor.draining:
            keep(supervisor.add_worker())

    def on_ttou() -> None:
        if not supervisor.draining:
            supervisor.remove_worker()

    handlers: dict[int, Callable[..., None]] = {
        signal.SIGINT: lambda: on_stop(signal.SIGINT),
        signal.SIGTERM: lambda: on_stop(signal.SIGTERM),
        signal.SIGHUP: on_hup,
        signal.SIGTTIN: on_ttin,
        signal.SIGTTOU: on_ttou,
    }
    installed = []
    for sig, handler in handlers.items():
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return restore


# ---------------------------------------------------------------- the worker


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its message, with where it was raised when not ours."""
    from ._cliargs import UsageError
    from .tls import TLSConfigError

    if isinstance(exc, (UsageError, TLSConfigError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        where = f" ({os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"
        tb = tb.tb_next
    return f"{type(exc).__name__}: {exc}{where}"


def _name_worker_logs(slot: int, log_format: str) -> None:
    """Say which worker logged each line: in the text, or as a ``worker`` field in JSON."""

    def tag(record: logging.LogRecord) -> bool:
        record.worker = slot
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
        if log_format == "text":
            handler.setFormatter(
                logging.Formatter(
                    f"%(asctime)s %(levelname)s %(name)s [worker {slot} pid {os.getpid()}]: "
                    "%(message)s"
                )
            )


def worker_main(argv: list[str] | None = None) -> int:
    """The worker process: serve the spec read from the control socket; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastnet.workers")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    listen = socket.socket(fileno=args.listen_fd)
    spec: WorkerSpec = _receive_blocking(control)

    def fail(exc: BaseException) -> int:
        logger.debug("worker %d failed to start", args.slot, exc_info=exc)
        with contextlib.suppress(OSError):
            control.sendall(_encode(("error", _one_line(exc))))
        return 1

    try:
        from .cli import _configure_logging, resolve_app

        _configure_logging(spec.log_level, spec.log_format)
        _name_worker_logs(args.slot, spec.log_format)
        for entry in spec.sys_path:
            if entry not in sys.path:
                sys.path.append(entry)
        handler = resolve_app(spec.app)
        options = dict(spec.options)
        for name in ("unix", "reuse_port", "backlog"):
            options.pop(name, None)
        if spec.metrics:
            from prometheus_client import CollectorRegistry

            options["metrics"] = CollectorRegistry(auto_describe=False)
    except Exception as exc:
        return fail(exc)
    from .runner import run_coroutine

    started: list[bool] = []
    try:
        run_coroutine(
            _worker_serve(handler, listen, control, spec, options, started), loop=spec.loop
        )
    except Exception as exc:
        if started:
            raise
        return fail(exc)
    return 0


async def _worker_serve(
    handler: Any,
    listen: socket.socket,
    control: socket.socket,
    spec: WorkerSpec,
    options: dict[str, Any],
    started: list[bool],
) -> None:
    from .metrics import snapshot
    from .runner import serve
    from .server import Server

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=control)
    servers: list[Server] = []
    tasks: list[asyncio.Task[None]] = []

    def snap() -> dict[str, Any] | None:
        return snapshot(servers[0]) if spec.metrics and servers else None

    async def answer() -> None:
        # Each ping is answered from this loop: the answer proves it turns.
        try:
            while True:
                message = await _receive(reader)
                if message[0] == "ping":
                    writer.write(_encode(("pong", snap())))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        server = servers[0]
        if not server.draining:
            # The supervisor is gone: drain as if it had sent SIGTERM.
            logger.warning("the supervisor is gone: shutting down")
            os.kill(os.getpid(), signal.SIGTERM)

    def ready(server: Server) -> None:
        servers.append(server)
        started.append(True)
        writer.write(_encode(("ready", snap())))
        tasks.append(loop.create_task(answer()))

    try:
        await serve(handler, sock=listen, on_ready=ready, drain_delay=spec.drain_delay, **options)
    finally:
        for task in tasks:
            task.cancel()
        if servers and not writer.is_closing():
            with contextlib.suppress(OSError, ConnectionError):
                writer.write(_encode(("bye", snap())))
                await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()


if __name__ == "__main__":
    sys.exit(worker_main())
