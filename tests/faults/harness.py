"""Shared pieces of the fault tests: fast timings, raw HTTP over TLS, a relay certificate
that also names a private address, and log polling."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from backhaul.devstack import DevStack
from relay.tls import generate_dev_certificate
from tests.e2e.conftest import FAST_ENV

#: Keepalive every second on both ends, dead after two silent seconds; backoff capped at 2 s.
FAULT_ENV = FAST_ENV | {
    "BACKHAUL_AGENT_TUNNEL__PING_TIMEOUT_SECONDS": "2",
    "BACKHAUL_AGENT_TUNNEL__BACKOFF_INITIAL_SECONDS": "0.2",
    "BACKHAUL_RELAY_INVOKE_TIMEOUT_SECONDS": "2",
    "BACKHAUL_RELAY_INVOKE_TIMEOUT_MAX_SECONDS": "3",
}
DEFAULT_DEADLINE = 2.0
MAX_DEADLINE = 3.0
PING_INTERVAL = 1.0
BACKOFF_MAX = float(FAST_ENV["BACKHAUL_AGENT_TUNNEL__BACKOFF_MAX_SECONDS"])


def relay_port(stack: DevStack) -> int:
    return int(stack.relay_url.rsplit(":", 1)[1])


def tls_socket(stack: DevStack, timeout: float = 10, source: str | None = None) -> ssl.SSLSocket:
    """A TLS connection to the relay, nothing sent yet."""
    raw = socket.create_connection(
        ("127.0.0.1", relay_port(stack)),
        timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    return stack.tls().wrap_socket(raw, server_hostname="127.0.0.1")


def read_response(sock: ssl.SSLSocket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length body (what the relay's problems use)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def problem_of(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    assert {"type", "title", "status", "detail"} <= set(doc), doc
    return doc


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout``, reading what it sends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def log_events(stack: DevStack, name: str, event: str) -> list[dict[str, Any]]:
    found = []
    for line in stack.log_text(name).splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            doc = json.loads(line)
            if doc.get("event") == event:
                found.append(doc)
    return found


def wait_for(check: Any, timeout: float, step: float = 0.05) -> float:
    """Poll ``check`` until true; returns the seconds it took, raises on timeout."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - started


def write_relay_certificate(relay_dir: Path, *ips: str) -> None:
    """The relay's development certificate, also valid for ``ips`` (written where
    ``backhaul-relay serve --dev`` finds and reuses it)."""
    relay_dir.mkdir(parents=True, exist_ok=True)
    relay_dir.chmod(0o700)
    tls = relay_dir / "tls"
    generate_dev_certificate(tls / "relay.crt", tls / "relay.key", ips)
