"""1 GiB down and 1 GiB up through the tunnel with flat memory on both sides: flow control
back-pressures instead of buffering, and the processes reuse their buffers instead of
faulting in fresh pages for every TLS read."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backhaul.devstack import rss_kib
from backhaul.sampleapi import pattern_sha256
from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e

GIB = 1024**3
LIMIT_KIB = 100 * 1024


def minor_faults(pid: int) -> int:
    """Page faults a process has taken without I/O (``minflt``, /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[7])


class Peak:
    """Samples the resident memory of the relay and the agent while a transfer runs."""

    def __init__(self, world: World) -> None:
        self.pids = {n: world.stack.procs[n].pid for n in ("relay", "agent1")}
        self.base = {n: rss_kib(p) for n, p in self.pids.items()}
        self.peak = dict(self.base)
        self.faults = {n: minor_faults(p) for n, p in self.pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_kib(pid))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for name, pid in self.pids.items():
            self.faults[name] = minor_faults(pid) - self.faults[name]

    def assert_flat(self) -> None:
        for name in self.pids:
            growth = self.peak[name] - self.base[name]
            assert growth < LIMIT_KIB, f"{name} grew by {growth // 1024} MiB"

    def assert_few_page_faults(self, size: int) -> None:
        """Buffers reused, not mapped afresh per TLS read (backhaul/malloc_tuning.py): with
        glibc's adaptive thresholds the agent took ~200 faults per MiB uploaded, tuned 1."""
        for name, faults in self.faults.items():
            per_mib = faults / (size / 2**20)
            assert per_mib < 16, f"{name}: {faults} page faults, {per_mib:.0f} per MiB"


def test_one_gib_download_with_flat_memory(world: World) -> None:
    digest = hashlib.sha256()
    size = 0
    with Peak(world) as peak, world.stack.client(timeout=300) as client:
        url = f"/v1/connections/{world.none_id}/invoke/bytes/{GIB}"
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(GIB)
            for chunk in response.iter_raw(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    assert size == GIB
    assert digest.hexdigest() == pattern_sha256(GIB)
    peak.assert_flat()
    peak.assert_few_page_faults(GIB)


def test_one_gib_upload_with_flat_memory(world: World) -> None:
    block = b"\xa5" * (1 << 20)

    def body() -> Iterator[bytes]:
        for _ in range(GIB // len(block)):
            yield block

    expected = hashlib.sha256()
    for _ in range(GIB // len(block)):
        expected.update(block)
    with Peak(world) as peak, world.stack.client(timeout=300) as client:
        response = client.post(
            f"/v1/connections/{world.none_id}/invoke/upload",
            content=body(),
            headers={"Content-Length": str(GIB)},
        )
    assert response.status_code == 200, response.text
    assert response.json() == {"bytes": GIB, "sha256": expected.hexdigest()}
    peak.assert_flat()
    peak.assert_few_page_faults(GIB)


def test_download_yields_to_small_requests_and_both_arrive_whole(world: World) -> None:
    """Small requests on the same tunnel while a download runs: the download holds fewer
    bytes in flight while they come (backhaul.wire.flow), and still completes intact, and
    every small answer arrives. How long they wait is measured in bench/, not asserted."""
    size = 256 * 1024**2
    digest = hashlib.sha256()
    received = 0
    answers: list[int] = []
    done = threading.Event()

    def small_requests() -> None:
        with world.stack.client(timeout=60) as client:
            url = f"/v1/connections/{world.none_id}/invoke/small"
            while not done.is_set() or len(answers) < 20:
                r = client.get(url)
                answers.append(r.status_code if len(r.content) == 1024 else -1)

    caller = threading.Thread(target=small_requests, daemon=True)
    with world.stack.client(timeout=300) as client:
        url = f"/v1/connections/{world.none_id}/invoke/bytes/{size}"
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            caller.start()
            for chunk in response.iter_raw(1 << 20):
                digest.update(chunk)
                received += len(chunk)
        done.set()
    caller.join(timeout=60)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert len(answers) >= 20 and set(answers) == {200}


class CuttingAPI:
    """An API that declares a 4 MiB body, sends 1 MiB of it and closes: more than one read,
    so the agent takes the rest of the body off the socket unparsed (agent/upstream.py)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                with conn:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 << 20))
                    for _ in range(16):
                        conn.sendall(b"c" * (64 << 10))
                        time.sleep(0.01)

    def close(self) -> None:
        self.server.close()


def test_an_api_cutting_a_long_body_short_cuts_the_callers_and_nothing_else(
    world: World,
) -> None:
    api = CuttingAPI()
    try:
        gateway_id, agent_dir = world.stack.enroll(name="agent-cut", allow=[api.url])
        world.stack.start_agent(agent_dir)
        cut_id = world.stack.connection(gateway_id, api.url)
        received = 0
        with world.stack.client(timeout=30) as client:
            with pytest.raises(httpx.HTTPError):  # the body ends before its length
                with client.stream("GET", f"/v1/connections/{cut_id}/invoke/x") as response:
                    assert response.status_code == 200
                    assert response.headers["content-length"] == str(4 << 20)
                    for chunk in response.iter_raw():
                        received += len(chunk)
            assert received < 4 << 20
            # The tunnel and every other connection are unharmed.
            small = client.get(f"/v1/connections/{world.none_id}/invoke/small")
            assert small.status_code == 200 and len(small.content) == 1024
        assert "broke HTTP while sending the response body" in world.stack.log_text("agent-cut")
    finally:
        world.stack.stop_process("agent-cut")
        api.close()
