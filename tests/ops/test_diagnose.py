"""``backhaul-agent diagnose`` against a real relay, and against broken setups: a CA that did
not sign the relay's certificate, a closed port, a wrong pin, a revoked member, an unreachable
target, a proxy that refuses CONNECT, and an agent.toml that does not load."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import load_config
from agent.diagnose import diagnose
from backhaul.devstack import DevStack, command, free_port
from tests.ops.helpers import PASSWORD, api_base, relay_port, status
from tests.ops.squid import Squid

pytestmark = pytest.mark.e2e

RELAY_STEPS = ["dns", "tcp", "proxy", "tls", "websocket", "handshake", "rtt"]


@pytest.fixture(scope="module")
def enrolled(ops_stack: DevStack) -> Path:
    dead = f"http://127.0.0.1:{free_port()}/"
    _gateway, config_dir = ops_stack.enroll(name="diag", allow=[api_base(ops_stack), dead])
    return config_dir


def variant(source: Path, dest: Path, **changes: Any) -> Path:
    """A copy of an enrolled agent's directory with some agent.toml keys changed."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("run"))
    path = dest / "agent.toml"
    doc = tomllib.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path.write_text(tomli_w.dumps(doc))
    return dest


def steps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in report["steps"]}


def run_cli(config_dir: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [command("backhaul-agent"), "diagnose", "--config-dir", str(config_dir), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def test_healthy_agent_and_an_unreachable_target(ops_stack: DevStack, enrolled: Path) -> None:
    """Every relay step passes while the agent runs, and its own tunnel stays up: the probe is
    never routed to. The dead allow-list entry fails with its reason."""
    ops_stack.start_agent(enrolled, "diag")
    try:
        session = status(enrolled)["session_id"]
        code, report = run_cli(enrolled)
        assert code == 1 and report["ok"] is False
        names = [step["name"] for step in report["steps"]]
        assert names[:2] == ["config", "keys"] and names[2:9] == RELAY_STEPS
        by_name = steps(report)
        for name in ["config", "keys", *RELAY_STEPS]:
            assert by_name[name]["ok"], by_name[name]
        assert "not used" in by_name["proxy"]["detail"]
        assert "pin matches" in by_name["tls"]["detail"]
        assert "accepted member" in by_name["handshake"]["detail"]
        assert "PING/PONG" in by_name["rtt"]["detail"]
        api = by_name[f"target {api_base(ops_stack)}"]
        assert api["ok"] and "reachable: GET answered HTTP" in api["detail"]
        dead = next(s for s in report["steps"] if s["name"].startswith("target") and not s["ok"])
        assert "refused the connection" in dead["detail"] and dead["hint"]
        # The running agent kept its session: the probe did not replace its tunnel.
        doc = status(enrolled)
        assert doc["connected"] and doc["session_id"] == session
        members = ops_stack.call("GET", f"/v1/gateways/{doc['gateway_id']}")["members"]
        assert [m["session_id"] for m in members] == [session]
    finally:
        ops_stack.stop_process("diag")


def other_ca(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


async def test_wrong_ca(enrolled: Path, tmp_path: Path) -> None:
    ca = other_ca(tmp_path / "other-ca.pem")
    bad = variant(enrolled, tmp_path / "agent", ca_file=str(ca))
    report = (await diagnose(load_config(bad, {}), environ={})).to_json()
    tls = steps(report)["tls"]
    assert not tls["ok"]
    assert (
        "presented a certificate for localhost issued by localhost (self-signed)" in tls["detail"]
    )
    assert f"ca_file {ca} do not vouch for" in tls["detail"]
    assert "set ca_file" in tls["hint"]
    for name in ("websocket", "handshake", "rtt"):
        assert steps(report)[name]["skipped"]
    assert not report["ok"]


async def test_closed_port(enrolled: Path, tmp_path: Path) -> None:
    port = free_port()
    bad = variant(enrolled, tmp_path / "agent", relay_url=f"https://127.0.0.1:{port}")
    report = (await diagnose(load_config(bad, {}), environ={})).to_json()
    tcp = steps(report)["tcp"]
    assert not tcp["ok"]
    assert tcp["detail"] == f"relay 127.0.0.1:{port} refused the connection"
    assert "relay_url's port" in tcp["hint"]
    assert all(steps(report)[n].get("skipped") for n in RELAY_STEPS[2:])


async def test_bad_pin(enrolled: Path, tmp_path: Path) -> None:
    pin = "sha256:" + "0" * 64
    bad = variant(enrolled, tmp_path / "agent", pinned_fingerprint=pin)
    report = (await diagnose(load_config(bad, {}), environ={})).to_json()
    tls = steps(report)["tls"]
    assert not tls["ok"]
    assert f"does not match the pinned {pin}" in tls["detail"]
    assert "pinned_fingerprint" in tls["hint"]


async def test_proxy_steps_through_squid(
    ops_stack: DevStack, enrolled: Path, tmp_path: Path, squid: Callable[..., Squid]
) -> None:
    proxy = squid("basic", users={"alice": PASSWORD})
    env = {"HTTPS_PROXY": f"http://alice:{PASSWORD}@127.0.0.1:{proxy.port}"}
    report = (await diagnose(load_config(enrolled, {}), environ=env)).to_json()
    by_name = steps(report)
    assert all(by_name[n]["ok"] for n in RELAY_STEPS), report
    assert by_name["dns"]["detail"].startswith("proxy 127.0.0.1")
    assert "basic authentication as alice" in by_name["proxy"]["detail"]
    assert PASSWORD not in json.dumps(report)
    refusing = squid("open", deny_ports=[relay_port(ops_stack)])
    report = await diagnose(load_config(enrolled, {}), environ={"HTTPS_PROXY": refusing.url})
    by_name = steps(report.to_json())
    assert by_name["tcp"]["ok"] and not by_name["proxy"]["ok"]
    assert "403 Forbidden (ERR_ACCESS_DENIED 0)" in by_name["proxy"]["detail"]
    assert "allow CONNECT" in by_name["proxy"]["hint"]
    assert by_name["tls"]["skipped"]


async def test_revoked_member(ops_stack: DevStack, tmp_path: Path) -> None:
    gateway_id, config_dir = ops_stack.enroll(name="revoked", allow=[api_base(ops_stack)])
    cfg = load_config(config_dir, {})
    ops_stack.call("DELETE", f"/v1/gateways/{gateway_id}/members/{cfg.member_id}")
    report = (await diagnose(cfg, environ={})).to_json()
    handshake = steps(report)["handshake"]
    assert not handshake["ok"]
    assert handshake["detail"] == "the relay refused this member: member revoked"
    assert "enroll again" in handshake["hint"]
    assert steps(report)["websocket"]["ok"] and steps(report)["rtt"]["skipped"]


def test_broken_config(enrolled: Path, tmp_path: Path) -> None:
    bad = variant(enrolled, tmp_path / "agent")
    (bad / "agent.toml").write_text((bad / "agent.toml").read_text() + "\n[tunnel]\nping = 1\n")
    code, report = run_cli(bad)
    assert code == 1
    assert report["steps"][0]["name"] == "config" and not report["ok"]
    assert "tunnel.ping: unknown key" in report["steps"][0]["detail"]
