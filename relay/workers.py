"""Worker processes: one relay machine uses all its cores.

A relay process runs one event loop, so it uses one core. With ``workers`` other than 1,
``backhaul-relay serve`` is a small supervisor instead: it binds the public listening socket
once and spawns the workers, which all accept on that one socket, so the kernel hands each new
connection (a caller's request or an agent's tunnel) to one of them. One inherited socket
rather than one ``SO_REUSEPORT`` socket per worker, because connections then wait in a single
backlog while a worker restarts, instead of being reset with the dead worker's own socket.

Each worker is a complete relay instance that shares nothing in memory with the others: its
own instance id (``<instance_id>-w<n>``), hub, read cache, limits and metrics, and a private
TLS listener on 127.0.0.1 at a port of its own, whose URL it advertises in the registry. A
request that lands on a worker without the gateway's tunnel reaches the worker that holds it
exactly as between relay instances on separate machines (relay.registry, relay.forward), which
is why workers need ``redis_url``.

Before it reports ready, a worker calls its own peer URL the way the other workers will (same
client, same TLS verification), so a certificate that does not cover 127.0.0.1 stops the start
with the reason instead of failing every forwarded request later.

The supervisor migrates the database before the first worker starts (migrations run once, and
SQLite is in WAL mode before several processes open it), restarts a worker that dies with a
growing delay, and on SIGTERM or SIGINT asks every worker to stop — each drains as a single
relay does — then exits 0. A worker whose supervisor vanished stops by itself, so it never
holds the port against the next start.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import httpx
import structlog
import uvicorn

from backhaul.sslobject import direct_records
from relay import limits
from relay.config import RelayConfig
from relay.listeners import RelayServer, bind
from relay.tls import TLSFiles
from relay.wsprotocol import TunnelWebSocketProtocol

log = structlog.get_logger("backhaul.relay.workers")

#: Where each worker listens for requests forwarded by the other workers.
PEER_HOST = "127.0.0.1"
#: Uvicorn's drain time after SIGTERM: in-flight requests and tunnels get this long.
GRACEFUL_SHUTDOWN_SECONDS = 30
#: How long the supervisor waits for its workers after SIGTERM before it kills them: the
#: drain above plus the application's own shutdown.
STOP_GRACE_SECONDS = GRACEFUL_SHUTDOWN_SECONDS + 10.0
#: A worker that lived this long before dying is restarted after the shortest delay again.
STABLE_SECONDS = 30.0
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0


class _Config(uvicorn.Config):
    """Uvicorn's settings, with TLS objects that hand each record straight to OpenSSL."""

    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            direct_records(self.ssl)


def server_config(app: Any, config: RelayConfig, files: TLSFiles) -> uvicorn.Config:
    """Uvicorn's settings for the relay, the same for a single process and for a worker."""
    return _Config(
        app,
        host=config.host,
        port=config.port,
        ssl_certfile=str(files.cert),
        ssl_keyfile=str(files.key),
        ws=TunnelWebSocketProtocol,
        ws_per_message_deflate=False,
        ws_max_size=limits.WS_MAX_MESSAGE,
        # The tunnel's own PING frames detect a dead peer (backhaul.aio.tunnel): WebSocket
        # pings on top would cost a task and a timer per tunnel for nothing.
        ws_ping_interval=None,
        # A factory, which uvicorn calls as it would a protocol class.
        http=limits.http_protocol(config, app=app),  # type: ignore[arg-type]
        # Forwarded headers only from the proxies the operator names: believing them from
        # anyone would let a caller pick the address it is audited and rate-limited under.
        proxy_headers=bool(config.trusted_proxies),
        forwarded_allow_ips=list(config.trusted_proxies) or None,
        access_log=False,
        # No "server: uvicorn" on every answer: it names the relay's software to anyone.
        server_header=False,
        log_config=None,
        lifespan="on",
        h11_max_incomplete_event_size=config.max_request_header_bytes,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def worker_id(instance_id: str, index: int) -> str:
    return f"{instance_id}-w{index}"


def restart_delay(failures: int) -> float:
    """Delay before a restart after ``failures`` (1, 2, …) quick deaths in a row: short at
    first, so one crash costs a second, and capped, so a crash loop does not spin."""
    return float(min(BACKOFF_FIRST_SECONDS * 2 ** max(failures - 1, 0), BACKOFF_MAX_SECONDS))


# ---------------------------------------------------------------------------- the worker


def _stop_quietly(signum: int, _: FrameType | None) -> None:
    """SIGTERM before uvicorn listens for it (or re-raised by uvicorn once it has drained):
    end with status 0, so the supervisor tells a requested stop from a crash."""
    raise SystemExit(0)


class WorkerServer(RelayServer):
    """Uvicorn's server, plus the report to the supervisor and the watch on it."""

    def __init__(
        self,
        config: uvicorn.Config,
        relay: RelayConfig,
        report: Connection,
        local_sockets: list[socket.socket],
    ) -> None:
        super().__init__(config, local_sockets)
        self.relay = relay
        self.report = report
        self.failed = False
        self._parent = os.getppid()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started or self.should_exit:
            return
        problem = await reach(self.relay)
        if problem is None:
            self.report.send(("ready", self.relay.peer_url))
            return
        log.error("worker.peer_unreachable", url=self.relay.peer_url, error=problem)
        self.report.send(("failed", f"{self.relay.instance_id}: {problem}"))
        self.failed = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0 and not self.should_exit and os.getppid() != self._parent:
            log.warning("worker.orphaned", reason="the supervisor is gone")
            self.should_exit = True
        result: bool = await super().on_tick(counter)
        return result


async def reach(config: RelayConfig) -> str | None:
    """Call ``config.peer_url`` as another worker would; None when it answers, else why not."""
    from relay.app import _peer_ca  # the CA the forwarding client trusts, exactly
    from relay.forward import peer_client

    async with peer_client(_peer_ca(config), 5.0) as client:
        try:
            response = await client.get(f"{config.peer_url}/healthz")
        except httpx.HTTPError as exc:
            return (
                f"cannot reach its own peer URL {config.peer_url}: {exc}; the certificate must "
                f"cover {PEER_HOST} and be trusted by peer_ca_file (or the system CAs)"
            )
    if response.status_code != 200:
        return f"{config.peer_url}/healthz answered {response.status_code}"
    return None


def run_worker(
    index: int,
    config: RelayConfig,
    files: TLSFiles,
    sockets: list[socket.socket],
    local_sockets: list[socket.socket],
    report: Connection,
) -> None:
    """A worker process's entry point: one relay instance on the inherited public (and
    local) sockets and its own peer listener."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_quietly)
    from backhaul import logging as backhaul_logging
    from relay.app import create_app

    backhaul_logging.configure(config.log_format, config.log_level)
    instance_id = worker_id(config.instance_id, index)
    structlog.contextvars.bind_contextvars(worker=instance_id)
    private = bind(PEER_HOST, 0)[0]
    port = int(private.getsockname()[1])
    count = config.worker_count
    config = config.model_copy(
        update={
            "instance_id": instance_id,
            "advertise_url": f"https://{PEER_HOST}:{port}",
            "workers": 1,
        }
    )
    app = create_app(config)
    app.state.workers = count  # told to agents in WELCOME, so each holds a tunnel per worker
    server = WorkerServer(server_config(app, config, files), config, report, local_sockets)
    server.run(sockets=[*sockets, private])
    if server.failed:
        sys.exit(1)


# ---------------------------------------------------------------------------- the supervisor


@dataclass
class _Slot:
    """One worker position: the process in it now, and its restart history."""

    index: int
    instance_id: str
    process: BaseProcess | None = None
    report: Connection | None = None
    started_at: float = 0.0
    ready: bool = False
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Start ``count`` workers on ``sockets``, keep them running, stop them on a signal."""

    def __init__(
        self,
        config: RelayConfig,
        files: TLSFiles,
        sockets: list[socket.socket],
        count: int,
        local_sockets: list[socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.files = files
        self.sockets = sockets
        self.local_sockets = local_sockets or []
        #: Why the start failed, when ``run`` returns 1.
        self.problem = ""
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i, worker_id(config.instance_id, i)) for i in range(1, count + 1)]
        self._signals: list[int] = []
        self._serving = False

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (0) or until a worker fails its first start (1)."""
        wake, wake_writer = socket.socketpair()
        wake.setblocking(False)
        wake_writer.setblocking(False)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous_fd = signal.set_wakeup_fd(wake_writer.fileno())
        try:
            for slot in self._slots:
                self._start(slot)
            status = self._watch(wake)
            self._stop_all(wake)
            return status
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake.close()
            wake_writer.close()

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        self._signals.append(signum)

    def _start(self, slot: _Slot) -> None:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_worker,
            args=(slot.index, self.config, self.files, self.sockets, self.local_sockets, writer),
            name=slot.instance_id,
            # A supervisor that fails with an exception still takes its workers with it.
            daemon=True,
        )
        process.start()
        writer.close()
        slot.process, slot.report = process, reader
        slot.started_at, slot.ready, slot.restart_at = time.monotonic(), False, None
        log.info("worker.started", worker=slot.instance_id, pid=process.pid)

    def _watch(self, wake: socket.socket) -> int:
        while not self._signals:
            reports = {s.report: s for s in self._slots if s.report is not None}
            exits = {s.process.sentinel: s for s in self._slots if s.process is not None}
            due = [s.restart_at for s in self._slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            ready = wait([wake, *reports, *exits], timeout)
            if wake in ready:
                _drain(wake)
            # Reports first: a worker that failed its start says why before it exits.
            for conn, slot in reports.items():
                if conn in ready:
                    self._on_report(slot)
            for sentinel, slot in exits.items():
                if sentinel in ready and not self._on_exit(slot):
                    return 1
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now and not self._signals:
                    self._start(slot)
        return 0

    def _on_report(self, slot: _Slot) -> None:
        assert slot.report is not None
        try:
            kind, detail = slot.report.recv()
        except (EOFError, OSError):
            slot.report.close()
            slot.report = None
            return
        if kind == "failed":
            self.problem = str(detail)
            return
        slot.ready = True
        log.info("worker.ready", worker=slot.instance_id, pid=_pid(slot), peer_url=detail)
        if not self._serving and all(s.ready for s in self._slots):
            self._serving = True
            log.info("workers.ready", count=len(self._slots))

    def _on_exit(self, slot: _Slot) -> bool:
        """Note a worker's death; False when it means the relay cannot start at all."""
        assert slot.process is not None
        slot.process.join()
        code, pid = slot.process.exitcode, slot.process.pid
        lived = time.monotonic() - slot.started_at
        if slot.report is not None:
            slot.report.close()
        slot.process, slot.report = None, None
        if not slot.ready and not self._serving:
            log.error("worker.exited", worker=slot.instance_id, pid=pid, code=code, starting=True)
            self.problem = self.problem or (
                f"worker {slot.instance_id} exited with status {code} while starting "
                "(its log lines above say why)"
            )
            return False
        slot.failures = 1 if lived >= STABLE_SECONDS else slot.failures + 1
        delay = restart_delay(slot.failures)
        slot.restart_at = time.monotonic() + delay
        log.warning("worker.exited", worker=slot.instance_id, pid=pid, code=code, restart_in=delay)
        return True

    def _stop_all(self, wake: socket.socket) -> None:
        """SIGTERM every worker, wait for them to drain; a second signal or the grace
        period running out kills the rest."""
        running = [s for s in self._slots if s.process is not None]
        if self._signals:
            log.info(
                "workers.stopping", signal=signal.Signals(self._signals[0]).name, count=len(running)
            )
        handled = len(self._signals)
        for slot in running:
            assert slot.process is not None
            slot.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        killed = False
        while running:
            if not killed and (time.monotonic() >= deadline or len(self._signals) > handled):
                killed = True
                for slot in running:
                    assert slot.process is not None
                    log.error("worker.killed", worker=slot.instance_id, pid=slot.process.pid)
                    slot.process.kill()
            sentinels = {s.process.sentinel: s for s in running if s.process is not None}
            timeout = 1.0 if killed else max(0.0, deadline - time.monotonic())
            ready = wait([wake, *sentinels], timeout)
            if wake in ready:
                _drain(wake)
            for sentinel, slot in sentinels.items():
                if sentinel in ready:
                    self._reap(slot)
                    running.remove(slot)

    def _reap(self, slot: _Slot) -> None:
        assert slot.process is not None
        slot.process.join()
        log.info(
            "worker.exited",
            worker=slot.instance_id,
            pid=slot.process.pid,
            code=slot.process.exitcode,
        )
        if slot.report is not None:
            slot.report.close()
        slot.process, slot.report = None, None


def _pid(slot: _Slot) -> int | None:
    return slot.process.pid if slot.process is not None else None


def _drain(wake: socket.socket) -> None:
    try:
        while wake.recv(512):
            pass
    except BlockingIOError:
        pass
