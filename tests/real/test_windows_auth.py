"""Windows authentication end to end: a caller → real relay → real agent → real Apache with
mod_auth_gssapi, authenticated against a real MIT KDC (and NTLM through gss-ntlmssp), plus the
channel-binding server on pyspnego's NTLM acceptor. Everything runs on loopback as this test's
own processes (tests/real/servers.py); `make test` installs the packages first
(tests/real/setup.sh), and if a server cannot start the tests fail, they do not skip."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import spnego
from spnego.channel_bindings import GssChannelBindings

from backhaul.devstack import DevStack, StackError, command, rss_kib
from tests.e2e.conftest import FAST_ENV
from tests.real.servers import (
    NTLM_DOMAIN,
    REALM,
    SERVICE_USER,
    SKEW_USER,
    USERS,
    RealServers,
)

pytestmark = pytest.mark.real

ALICE_KRB = {"username": f"alice@{REALM}", "password": USERS["alice"]}
ALICE_NTLM = {"username": f"{NTLM_DOMAIN}\\alice", "password": USERS["alice"]}
BOB_NTLM = {"username": f"{NTLM_DOMAIN}\\bob", "password": USERS["bob"]}
WRONG = "Not-the-password-1!"
MiB = 1024 * 1024


@dataclass
class World:
    servers: RealServers
    stack: DevStack
    gateway_id: str
    agent_dir: Path

    @property
    def http(self) -> str:
        return self.servers.apache.http_url

    @property
    def https(self) -> str:
        return self.servers.apache.https_url

    def connect(self, base_url: str, credentials: dict[str, str], **connector: Any) -> str:
        return self.stack.connection(self.gateway_id, base_url, "windows", credentials, **connector)

    def invoke(self, connection_id: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.stack.client(timeout=120) as client:
            return client.request(
                str(kwargs.pop("method", "GET")),
                f"/v1/connections/{connection_id}/invoke/{path}",
                **kwargs,
            )


def enroll(stack: DevStack, name: str, allow: list[str], target_ca: Path) -> tuple[str, Path]:
    """``backhaul-agent enroll`` with ``--target-ca-file``, as an operator runs it."""
    gateway = stack.call("POST", "/v1/gateways", json={"name": f"{name}-gw"})
    config_dir = stack.root / name
    argv = [command("backhaul-agent"), "enroll", "--relay", stack.relay_url]
    argv += ["--token", gateway["enrollment_token"], "--ca-file", str(stack.ca_file)]
    argv += ["--config-dir", str(config_dir), "--name", name, "--target-ca-file", str(target_ca)]
    for prefix in allow:
        argv += ["--allow", prefix]
    done = subprocess.run(argv, capture_output=True, env=stack.env, check=False)
    if done.returncode != 0:
        raise StackError(f"enroll failed: {done.stdout.decode()} {done.stderr.decode()}")
    return str(gateway["id"]), config_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with RealServers() as servers:
        # KRB5_CONFIG comes from the environment; the service keytab from agent.toml.
        env = FAST_ENV | {
            "KRB5_CONFIG": str(servers.realm.krb5_conf),
            "BACKHAUL_AGENT_LOG__LEVEL": "debug",
        }
        with DevStack(tmp_path_factory.mktemp("winauth"), env=env) as stack:
            stack.start_relay()
            stack.create_admin()
            allow = [servers.apache.http_url, servers.apache.https_url, servers.cbserver.url]
            gateway_id, agent_dir = enroll(stack, "agent-win", allow, servers.pki.ca_file)
            stack.set_agent_config(
                agent_dir, kerberos={"client_keytab": str(servers.realm.service_keytab)}
            )
            stack.start_agent(agent_dir)
            yield World(servers, stack, gateway_id, agent_dir)


def whoami(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def problem(r: httpx.Response, reason: str) -> dict[str, Any]:
    assert r.status_code == 502, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    doc: dict[str, Any] = r.json()
    assert doc["title"] == "Upstream authentication failed"
    assert doc["reason"] == reason, doc
    assert not doc["detail"].startswith("["), doc
    for secret in (*USERS.values(), SKEW_USER[1], WRONG):
        assert secret not in r.text
    return doc


def peak_kib(pid: int) -> int:
    """The process's resident high-water mark (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def logged(world: World, path: str, count: int, timeout: float = 10) -> list[str]:
    """Apache's access-log lines for ``path``, once there are ``count`` (it writes a line only
    after the response has gone out, so the last one may trail the answer a little)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = world.servers.apache.requests_logged(path)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def token_legs(world: World, path: str) -> int:
    """Requests Apache logged for ``path`` that carried a Negotiate/NTLM token."""
    pattern = re.compile(rf'"[A-Z]+ {re.escape(path)}[^"]*" \d+ \S+ (Negotiate|NTLM) ')
    return sum(1 for line in world.servers.apache.requests_logged(path) if pattern.search(line))


# -- the enrollment wrote the internal CA -------------------------------------------------------


def test_enroll_writes_the_target_ca_into_agent_toml(world: World) -> None:
    doc = tomllib.loads((world.agent_dir / "agent.toml").read_text())
    assert doc["upstream"]["ca_file"] == "target-ca.pem"
    copied = (world.agent_dir / "target-ca.pem").read_bytes()
    assert copied == world.servers.pki.ca_file.read_bytes()


# -- each scheme ---------------------------------------------------------------------------


def test_kerberos_with_a_password_over_https(world: World) -> None:
    cxn = world.connect(world.https + "krb/", ALICE_KRB, windows_scheme="kerberos")
    doc = whoami(world.invoke(cxn, "whoami"))
    assert doc == {"user": f"alice@{REALM}", "auth_type": "Negotiate", "https": "on"}


def test_kerberos_keeps_the_connection_and_the_ticket(world: World) -> None:
    cxn = world.connect(world.http + "krb/", ALICE_KRB, windows_scheme="kerberos")
    kdc_log = world.servers.realm.kdc.directory / "kdc-events.log"
    tgs_before = kdc_log.read_text().count("TGS_REQ")
    legs_before = token_legs(world, "/krb/whoami")
    for _ in range(20):
        assert whoami(world.invoke(cxn, "whoami"))["user"] == f"alice@{REALM}"
    # One handshake for twenty requests on the kept-alive connection...
    assert token_legs(world, "/krb/whoami") - legs_before == 1
    # ...and the service ticket came from the KDC at most once (the TGT was cached too).
    assert kdc_log.read_text().count("TGS_REQ") - tgs_before <= 1


def test_kerberos_with_the_service_identity_from_a_keytab(world: World) -> None:
    cxn = world.connect(world.https + "krb/", {"identity": "service"}, windows_scheme="kerberos")
    doc = whoami(world.invoke(cxn, "whoami"))
    assert doc["user"] == f"{SERVICE_USER}@{REALM}"


def test_ntlm(world: World) -> None:
    legs_before = token_legs(world, "/ntlm/whoami")
    cxn = world.connect(world.https + "ntlm/", ALICE_NTLM, windows_scheme="ntlm")
    doc = whoami(world.invoke(cxn, "whoami"))
    assert doc == {"user": f"{NTLM_DOMAIN}\\alice", "auth_type": "NTLM", "https": "on"}
    for _ in range(5):
        whoami(world.invoke(cxn, "whoami"))
    # NEGOTIATE and AUTHENTICATE once, then five requests on the authenticated connection.
    assert token_legs(world, "/ntlm/whoami") - legs_before == 2


def test_negotiate_uses_kerberos(world: World) -> None:
    cxn = world.connect(world.https + "negotiate/", ALICE_KRB)  # the default scheme
    doc = whoami(world.invoke(cxn, "whoami"))
    assert (doc["user"], doc["auth_type"]) == (f"alice@{REALM}", "Negotiate")


def test_negotiate_falls_back_to_ntlm_without_an_spn(world: World) -> None:
    cxn = world.connect(
        world.http + "negotiate/", BOB_NTLM, windows_scheme="negotiate", spn="HTTP/nosuch.localhost"
    )
    doc = whoami(world.invoke(cxn, "whoami"))
    assert doc["user"] == f"{NTLM_DOMAIN}\\bob"


# -- failures reach the caller as problems with a reason ------------------------------------------


@pytest.mark.parametrize(
    ("path", "credentials", "connector", "reason", "words"),
    [
        ("krb/", {"username": f"alice@{REALM}", "password": WRONG}, {}, "wrong_password",
         "wrong password"),
        ("krb/", {"username": f"nobody@{REALM}", "password": WRONG}, {}, "unknown_user",
         "unknown user"),
        ("krb/", {"username": f"{SKEW_USER[0]}@SKEW.TEST", "password": SKEW_USER[1]}, {},
         "clock_skew", "clock skew"),
        ("krb/", {"username": "dave@DEAD.TEST", "password": WRONG}, {}, "kdc_unreachable",
         "no KDC"),
        ("krb/", ALICE_KRB, {"spn": "HTTP/nosuch.localhost"}, "spn_not_found",
         "HTTP/nosuch.localhost"),
        ("ntlm/", {"username": f"{NTLM_DOMAIN}\\alice", "password": WRONG},
         {"windows_scheme": "ntlm"}, "credentials_rejected", "refused NTLM"),
        ("basic/", ALICE_KRB, {"windows_scheme": "negotiate"}, "no_common_scheme",
         "offers Basic"),
    ],
)  # fmt: skip
def test_failures_are_specific_problems(
    world: World,
    path: str,
    credentials: dict[str, str],
    connector: dict[str, str],
    reason: str,
    words: str,
) -> None:
    connector = {"windows_scheme": "kerberos"} | connector
    cxn = world.connect(world.http + path, credentials, **connector)
    doc = problem(world.invoke(cxn, "whoami"), reason)
    assert words in doc["detail"], doc


# -- channel bindings ----------------------------------------------------------------------------


def test_a_server_requiring_channel_bindings_accepts_ours(world: World) -> None:
    cxn = world.connect(world.servers.cbserver.url, ALICE_NTLM, windows_scheme="ntlm")
    doc = whoami(world.invoke(cxn, "anything"))
    assert doc["channel_bindings"] == "verified" and doc["user"] == f"{NTLM_DOMAIN}\\alice"
    assert f"ACCEPT {NTLM_DOMAIN}\\alice" in world.servers.log_text("cbserver")


@pytest.mark.parametrize("bindings", ["none", "wrong"])
def test_the_channel_binding_server_refuses_clients_without_the_right_ones(
    world: World, bindings: str
) -> None:
    """A pyspnego NTLM client as the plain httpx NTLM packages use it: no (or other) bindings."""
    cb = None
    if bindings == "wrong":
        cb = GssChannelBindings(application_data=b"tls-server-end-point:" + b"\x01" * 32)
    ctx = spnego.client(
        ALICE_NTLM["username"],
        ALICE_NTLM["password"],
        protocol="ntlm",
        channel_bindings=cb,
        options=spnego.NegotiateOptions.use_ntlm,
    )
    tls = ssl.create_default_context(cafile=str(world.servers.pki.ca_file))
    with httpx.Client(verify=tls) as client:
        first = client.get(
            world.servers.cbserver.url,
            headers={"Authorization": "NTLM " + base64.b64encode(ctx.step()).decode()},
        )
        assert first.status_code == 401
        challenge = base64.b64decode(first.headers["www-authenticate"].split()[1])
        last = client.get(
            world.servers.cbserver.url,
            headers={"Authorization": "NTLM " + base64.b64encode(ctx.step(challenge)).decode()},
        )
    assert last.status_code == 401
    expected = "missing-bindings" if bindings == "none" else "wrong-bindings"
    assert f"REJECT {expected}" in world.servers.log_text("cbserver")


# -- a large upload --------------------------------------------------------------------------


def test_a_100_mib_upload_to_an_ntlm_location(world: World) -> None:
    cxn = world.connect(world.https + "ntlm/", BOB_NTLM, windows_scheme="ntlm")
    agent = world.stack.procs["agent-win"]
    digest = hashlib.sha256()
    block = bytes(range(256)) * 4096  # 1 MiB

    def body() -> Iterator[bytes]:
        for i in range(100):
            chunk = block[i:] + block[:i]
            digest.update(chunk)
            yield chunk

    rss_before = rss_kib(agent.pid)
    r = world.invoke(
        cxn,
        "upload.cgi",
        method="POST",
        content=body(),
        headers={"Content-Length": str(100 * MiB), "Content-Type": "application/octet-stream"},
    )
    doc = whoami(r)
    assert doc["bytes"] == 100 * MiB and doc["sha256"] == digest.hexdigest()
    assert (doc["user"], doc["auth_type"], doc["method"]) == (f"{NTLM_DOMAIN}\\bob", "NTLM", "POST")
    # The body streamed: the agent never held it (its peak resident size grew by far less).
    assert peak_kib(agent.pid) - rss_before < 40 * 1024
    # The NEGOTIATE leg was an empty POST; only the AUTHENTICATE leg carried the 100 MiB.
    lines = logged(world, "/ntlm/upload.cgi", 2)
    received = [int(line.split('" ', 1)[1].split()[1]) for line in lines]
    assert len(received) == 2, lines
    assert received[0] < 16 * 1024 and received[1] > 100 * MiB


# -- no secret anywhere ----------------------------------------------------------------------------


def test_no_password_in_any_log(world: World) -> None:
    texts = [world.stack.log_text(name) for name in ("relay", "agent-win")]
    assert '"level": "debug"' in texts[1]  # the agent really logged at debug level
    for text in texts:
        for secret in (*USERS.values(), SKEW_USER[1], WRONG):
            assert secret not in text
    statuses = json.dumps(world.stack.agent_status(world.agent_dir))
    assert USERS["alice"] not in statuses


# -- the ticket cache against the real KDC -----------------------------------------------------


def test_tickets_are_cached_per_credential_until_they_expire(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import krb5

    from agent import tickets

    monkeypatch.setenv("KRB5_CONFIG", str(world.servers.realm.krb5_conf))
    now = [time.time()]
    cache = tickets.TicketCache(clock=lambda: now[0])
    try:
        first = cache.ccache_for(f"alice@{REALM}", USERS["alice"])
        assert cache.ccache_for(f"alice@{REALM}", USERS["alice"]) == first
        assert cache.as_exchanges == 1
        with pytest.raises(krb5.Krb5Error):
            cache.ccache_for(f"alice@{REALM}", WRONG)  # another credential: its own AS exchange
        # Close to the end of the TGT's life the credential gets a fresh cache.
        now[0] += 10 * 3600 - 60
        renewed = cache.ccache_for(f"alice@{REALM}", USERS["alice"])
        assert renewed != first and cache.as_exchanges == 2
    finally:
        cache.clear()
