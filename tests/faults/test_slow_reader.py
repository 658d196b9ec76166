"""A caller that reads one byte a second: flow control parks its stream, the tunnel keeps
serving everyone else at full speed, and neither process buffers the backlog."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from backhaul.devstack import DevStack, rss_kib
from tests.faults.harness import relay_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MiB = 1024 * 1024


def _latencies(stack: DevStack, cid: str, n: int = 20) -> list[float]:
    out = []
    with stack.client() as client:
        for _ in range(n):
            started = time.monotonic()
            assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200
            out.append(time.monotonic() - started)
    return out


def _download_seconds(stack: DevStack, cid: str, size: int) -> float:
    started = time.monotonic()
    received = 0
    with stack.client() as client:
        with client.stream("GET", f"/v1/connections/{cid}/invoke/bytes/{size}") as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += len(chunk)
    assert received == size
    return time.monotonic() - started


def test_a_one_byte_per_second_reader_slows_nobody_and_grows_nothing(
    stack: DevStack, api: str, fresh_agent: tuple[str, Path, str]
) -> None:
    gateway_id, agent_dir, name = fresh_agent
    cid = stack.connection(gateway_id, api)
    pids = {"relay": stack.procs["relay"].pid, "agent": stack.procs[name].pid}
    _latencies(stack, cid, 5)  # warm up
    base_latency = statistics.median(_latencies(stack, cid))
    base_download = _download_seconds(stack, cid, 32 * MiB)

    # The slow caller: a small receive buffer, one byte a second, a body that never ends.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", relay_port(stack)))
    slow = stack.tls().wrap_socket(raw, server_hostname="127.0.0.1")
    slow.sendall(
        (
            f"GET /v1/connections/{cid}/invoke/bytes/{1 << 40} HTTP/1.1\r\nHost: relay\r\n"
            f"Authorization: Bearer {stack.admin_token}\r\n\r\n"
        ).encode()
    )
    got = bytearray()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                got.extend(slow.recv(1))
            except OSError:
                return
            stop.wait(1.0)

    reader = threading.Thread(target=trickle, daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(got) > 0, 20)
        time.sleep(2.0)  # let every buffer on the way fill up: the stream is now parked
        before = {n: rss_kib(p) for n, p in pids.items()}

        latencies = _latencies(stack, cid)
        download = _download_seconds(stack, cid, 32 * MiB)
        time.sleep(1.0)
        after = {n: rss_kib(p) for n, p in pids.items()}

        # Other streams on the same tunnel are served as before.
        assert statistics.median(latencies) < 3 * base_latency + 0.05, (latencies, base_latency)
        assert max(latencies) < 1.0, latencies
        assert download < 3 * base_download + 1.0, (download, base_download)
        # The parked stream costs its window, not its backlog.
        for n in pids:
            growth = after[n] - before[n]
            assert growth < 24 * 1024, f"{n} grew by {growth // 1024} MiB"
        assert stack.agent_status(agent_dir)["inflight"] == 1  # still open, just slow
        assert b"HTTP/1.1 200 OK".startswith(bytes(got)), bytes(got)
    finally:
        stop.set()
        slow.close()
        reader.join(5)
    # The caller is gone: the relay cancels the stream and the agent lets go of the API.
    wait_for(lambda: stack.agent_status(agent_dir)["inflight"] == 0, 15, 0.2)
