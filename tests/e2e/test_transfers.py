"""1 GiB down and 1 GiB up through the tunnel with flat memory on both sides: flow control
back-pressures instead of buffering."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from backhaul.devstack import rss_kib
from backhaul.sampleapi import pattern_sha256
from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e

GIB = 1024**3
LIMIT_KIB = 100 * 1024


class Peak:
    """Samples the resident memory of the relay and the agent while a transfer runs."""

    def __init__(self, world: World) -> None:
        self.pids = {n: world.stack.procs[n].pid for n in ("relay", "agent1")}
        self.base = {n: rss_kib(p) for n, p in self.pids.items()}
        self.peak = dict(self.base)
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

    def assert_flat(self) -> None:
        for name in self.pids:
            growth = self.peak[name] - self.base[name]
            assert growth < LIMIT_KIB, f"{name} grew by {growth // 1024} MiB"


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
