"""The agent's local status endpoint: ``GET /status`` (JSON) and ``GET /metrics`` (Prometheus).

It listens on a Unix socket in the config dir (``run/status.sock``, directory 0700, socket
0600), so only the service account and root can read it, and optionally on a TCP address
(``[status] listen``) for a Prometheus scraper. Nothing on it can change the agent; the status
document names ids and the relay URL, never a key or a credential.

The server is a few dozen lines of h11 (RFC 9112 framing done by a sans-I/O library) on asyncio
streams instead of a web framework: it must stay up while the rest of the agent is busy or
failing, and it has two read-only routes.

Status document (``StatusDocument``)::

    {"connected": bool, "relay": str, "session_id": str | null, "member_id": str,
     "gateway_id": str, "rtt_ms": float | null, "uptime_seconds": float,
     "connected_since": "2025-01-01T12:00:00+00:00" | null, "inflight": int, "total": int,
     "failed": int, "last_error": str | null, "version": str, "reconnects": int,
     "draining": bool, "tunnels": int}

``tunnels`` counts the open tunnels: one, plus one per further worker process of the relay
(``agent.spread``); ``inflight`` sums their streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypedDict

import h11
import httpx
import structlog

from agent import metrics as agent_metrics
from agent.config import AgentConfig
from agent.errors import AgentError, AgentNotRunning

__all__ = [
    "StatusDocument",
    "StatusServer",
    "fetch_status",
]

log = structlog.get_logger("backhaul.agent.status")

_MAX_REQUEST = 16 * 1024
_IDLE_SECONDS = 10.0


class StatusDocument(TypedDict):
    connected: bool
    relay: str
    session_id: str | None
    member_id: str
    gateway_id: str
    rtt_ms: float | None
    uptime_seconds: float
    connected_since: str | None
    inflight: int
    total: int
    failed: int
    last_error: str | None
    version: str
    reconnects: int
    draining: bool
    tunnels: int


class StatusServer:
    """Serves ``/status`` from ``provider()`` and ``/metrics`` from ``metrics()``."""

    def __init__(
        self,
        provider: Callable[[], StatusDocument | dict[str, Any]],
        metrics: Callable[[], bytes] = agent_metrics.render,
    ) -> None:
        self._provider = provider
        self._metrics = metrics
        self._servers: list[asyncio.Server] = []
        self._socket_path: Path | None = None

    async def start(self, socket_path: Path | None, listen: tuple[str, int] | None = None) -> None:
        """Listen on the Unix socket (0600, in a 0700 directory) and optionally on TCP."""
        if socket_path is not None:
            await _prepare_socket_path(socket_path)
            server = await asyncio.start_unix_server(self._handle, path=str(socket_path))
            os.chmod(socket_path, 0o600)
            self._servers.append(server)
            self._socket_path = socket_path
        if listen is not None:
            host, port = listen
            self._servers.append(await asyncio.start_server(self._handle, host, port))

    @classmethod
    async def for_config(
        cls,
        cfg: AgentConfig,
        provider: Callable[[], StatusDocument | dict[str, Any]],
        metrics: Callable[[], bytes] = agent_metrics.render,
    ) -> StatusServer:
        """Build and start a server on the socket and address from ``cfg.status``."""
        server = cls(provider, metrics)
        await server.start(cfg.status.socket, cfg.status.listen_address)
        return server

    @property
    def tcp_addresses(self) -> list[tuple[str, int]]:
        """The bound TCP addresses (useful when listening on port 0)."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    name = sock.getsockname()
                    out.append((str(name[0]), int(name[1])))
        return out

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
            self._socket_path = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _route(self, request: h11.Request) -> tuple[int, str, bytes]:
        target = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode("latin-1")
        if target not in ("/status", "/metrics"):
            return 404, "application/json", b'{"error": "not found"}\n'
        if method not in ("GET", "HEAD"):
            return 405, "application/json", b'{"error": "method not allowed"}\n'
        try:
            if target == "/metrics":
                return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
            body = json.dumps(self._provider(), indent=None, separators=(",", ":"))
            return 200, "application/json", body.encode() + b"\n"
        except Exception:
            log.exception("status provider failed", path=target)
            return 500, "application/json", b'{"error": "internal error"}\n'

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        request: h11.Request | None = None
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send(writer, conn, 400, "text/plain", b"bad request\n", False)
                    break
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(_IDLE_SECONDS):
                        data = await reader.read(65536)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    status, ctype, body = self._route(request)
                    head_only = request.method == b"HEAD"
                    await self._send(writer, conn, status, ctype, body, head_only)
                    request = None
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        break
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
        except (TimeoutError, ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        conn: h11.Connection,
        status: int,
        ctype: str,
        body: bytes,
        head_only: bool,
    ) -> None:
        headers = [
            ("content-type", ctype),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
        ]
        if status >= 400:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if not head_only:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()


def _exists(path: Path) -> bool:
    """A cheap local stat; a dangling symlink counts as present so it gets replaced."""
    return os.path.lexists(path)


async def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if not _exists(path):
        return
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        os.unlink(path)  # left over from an agent that did not shut down cleanly
        return
    writer.close()
    raise AgentError(f"another agent is already serving {path}; is it running for this config dir?")


async def fetch_status(cfg: AgentConfig, wait_seconds: float = 5.0) -> dict[str, Any]:
    """Read the running agent's status document through its Unix socket."""
    path = cfg.status.socket
    not_running = AgentNotRunning(f"agent is not running (no status socket at {path})")
    if not _exists(path):
        raise not_running
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(
        transport=transport, timeout=wait_seconds, trust_env=False
    ) as client:
        try:
            response = await client.get("http://agent/status")
        except httpx.TransportError:
            raise not_running from None
    if response.status_code != 200:
        raise AgentError(f"status endpoint answered {response.status_code}")
    doc = response.json()
    if not isinstance(doc, dict):
        raise AgentError("status endpoint returned something other than a JSON object")
    return doc
