"""The relay's plain-HTTP listener for callers on its own machine (``local_listen``), through
real relay and agent processes: the same invoke path as over TLS, the same authentication,
and a start that refuses an address off the machine or a port already taken."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backhaul.devstack import DevStack, command, free_port
from backhaul.sampleapi import pattern_sha256
from tests.e2e.conftest import FAST_ENV

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevStack, str, str]]:
    """A relay with a local listener, an enrolled agent and a connection: (stack, the local
    listener's URL, the connection's invoke path)."""
    port = free_port()
    with DevStack(tmp_path_factory.mktemp("local"), env=FAST_ENV) as stack:
        stack.start_relay(extra=["--local-listen", f"127.0.0.1:{port}"])
        stack.create_admin()
        api = stack.start_api()
        gateway_id, agent_dir = stack.enroll(name="agent", allow=[api])
        stack.start_agent(agent_dir)
        invoke = f"/v1/connections/{stack.connection(gateway_id, api)}/invoke"
        yield stack, f"http://127.0.0.1:{port}", invoke


def test_callers_on_the_machine_reach_the_api_in_plain_http(
    local: tuple[DevStack, str, str],
) -> None:
    stack, url, invoke = local
    auth = {"Authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
        small = client.get(f"{invoke}/small")
        assert small.status_code == 200 and len(small.content) == 1024
        # A body each way, larger than a tunnel window, whole and in order.
        body = bytes(range(256)) * 16384  # 4 MiB
        upload = client.post(f"{invoke}/upload", content=body)
        assert upload.status_code == 200, upload.text
        assert upload.json() == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        download = client.get(f"{invoke}/bytes/{8 << 20}")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == pattern_sha256(8 << 20)
    # The public listener serves the same relay over TLS, as before.
    with stack.client() as client:
        assert client.get(f"{invoke}/small").status_code == 200


def test_the_local_listener_authenticates_callers_as_the_public_one_does(
    local: tuple[DevStack, str, str],
) -> None:
    _, url, invoke = local
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get(f"{invoke}/small").status_code == 401
        wrong = client.get(f"{invoke}/small", headers={"Authorization": "Bearer bh_nothing"})
        assert wrong.status_code == 401
        assert client.get("/v1/gateways").status_code == 401


def test_the_public_listener_still_refuses_plain_http(local: tuple[DevStack, str, str]) -> None:
    stack, _, invoke = local
    host, port = stack.relay_url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {invoke}/small HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1 200" not in answer


def _serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [command("backhaul-relay"), "serve", "--dev", "--data-dir", str(tmp_path)]
    argv += ["--listen", f"127.0.0.1:{free_port()}", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_local_listener_off_loopback_stops_the_start(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--local-listen", "0.0.0.0:8080")
    assert done.returncode == 2
    assert "local_listen" in done.stderr and "not a loopback address" in done.stderr


def test_a_taken_local_port_stops_the_start_with_its_name(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(tmp_path, "--local-listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"cannot listen on local_listen 127.0.0.1:{port}" in done.stderr
