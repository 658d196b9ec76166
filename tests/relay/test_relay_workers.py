"""The supervisor's pure parts: restart delays, worker names, the shared listening sockets."""

from __future__ import annotations

import socket

from relay.listeners import bind
from relay.workers import BACKOFF_MAX_SECONDS, restart_delay, worker_id


def test_restart_delay_grows_then_caps() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert delays == sorted(delays)
    assert delays[-1] == BACKOFF_MAX_SECONDS


def test_worker_ids_derive_from_the_instance_id() -> None:
    assert worker_id("relay-a", 2) == "relay-a-w2"


def test_bind_listens_once_for_every_worker() -> None:
    sockets = bind("127.0.0.1", 0)
    try:
        assert len(sockets) == 1
        (sock,) = sockets
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            conn, _ = sock.accept()
            conn.close()
    finally:
        for sock in sockets:
            sock.close()


def test_bind_ipv6_is_v6_only() -> None:
    try:
        sockets = bind("::1", 0)
    except OSError:  # no IPv6 loopback on this machine
        return
    try:
        assert sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in sockets:
            sock.close()
