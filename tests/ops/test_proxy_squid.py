"""The tunnel through a real squid: open, Basic auth, NTLM, a refusing ACL, and NO_PROXY.

The relay, the agent and squid are real processes on loopback; the agent is pointed at squid
through ``HTTPS_PROXY`` or ``[proxy] url`` exactly as an operator would, and squid's own
access log proves which way each tunnel went.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from agent.proxy import ProxyAuthRequired, ProxyRoute, open_tunnel
from backhaul.devstack import DevStack, StackError
from tests.ops.helpers import PASSWORD, agent, api_base, connected, relay_port, wait_status
from tests.ops.squid import Squid

pytestmark = pytest.mark.e2e


def tunnel_lines(proxy: Squid, port: int) -> list[str]:
    return [line for line in proxy.access().splitlines() if f"CONNECT 127.0.0.1:{port} " in line]


def test_tunnel_through_squid_from_https_proxy(
    ops_stack: DevStack, squid: Callable[..., Squid]
) -> None:
    """The tunnel takes HTTPS_PROXY; the internal API is still called directly, even with
    HTTP_PROXY and HTTPS_PROXY both set (the proxy is for the way out only)."""
    proxy = squid("open")
    env = {"HTTPS_PROXY": proxy.url, "HTTP_PROXY": proxy.url}
    with agent(ops_stack, "via-env", env) as config_dir:
        doc = wait_status(ops_stack, config_dir, connected)
        assert doc["last_error"] is None
        connection_id = ops_stack.connection(doc["gateway_id"], api_base(ops_stack))
        with ops_stack.client() as client:
            response = client.get(f"/v1/connections/{connection_id}/invoke/hello")
        assert response.status_code == 200, response.text
    # squid writes a tunnel's line when it closes: the agent has stopped now.
    lines = tunnel_lines(proxy, relay_port(ops_stack))
    assert any("TCP_TUNNEL/200" in line for line in lines), proxy.access()
    api_port = str(urlsplit(api_base(ops_stack)).port)
    assert api_port not in proxy.access()


def test_request_flows_through_squid_with_basic_auth(
    ops_stack: DevStack, squid: Callable[..., Squid]
) -> None:
    proxy = squid("basic", users={"alice": PASSWORD})
    port = proxy.port
    with agent(
        ops_stack,
        "via-basic",
        {},
        proxy={"url": f"http://alice:{PASSWORD.replace('!', '%21')}@127.0.0.1:{port}"},
    ) as config_dir:
        wait_status(ops_stack, config_dir, connected)
        gateway = next(
            g for g in ops_stack.call("GET", "/v1/gateways") if g["name"] == "via-basic-gw"
        )
        connection_id = ops_stack.connection(gateway["id"], api_base(ops_stack))
        with ops_stack.client() as client:
            response = client.get(f"/v1/connections/{connection_id}/invoke/hello")
        assert response.status_code == 200, response.text
        # The agent's log never shows the proxy password.
        assert PASSWORD not in ops_stack.log_text("via-basic")
    lines = tunnel_lines(proxy, relay_port(ops_stack))
    assert any("TCP_TUNNEL/200" in line and " alice " in line for line in lines), proxy.access()


def test_407_without_credentials_is_named(ops_stack: DevStack, squid: Callable[..., Squid]) -> None:
    proxy = squid("basic", users={"alice": PASSWORD})
    with agent(ops_stack, "no-creds", {"HTTPS_PROXY": proxy.url}) as config_dir:
        doc = wait_status(ops_stack, config_dir, lambda d: bool(d.get("last_error")))
        assert not doc["connected"]
        assert (
            'requires authentication (407; it offers Basic realm="backhaul-test")'
            in (doc["last_error"])
        )
        assert "[proxy] username and password" in doc["last_error"]
    with agent(
        ops_stack,
        "bad-creds",
        {"HTTPS_PROXY": proxy.url},
        proxy={"username": "alice", "password": "wrong"},
    ) as config_dir:
        doc = wait_status(ops_stack, config_dir, lambda d: bool(d.get("last_error")))
        assert "rejected the Basic credentials of user 'alice'" in doc["last_error"]


def test_refused_connect_reports_squids_status(
    ops_stack: DevStack, squid: Callable[..., Squid]
) -> None:
    proxy = squid("open", deny_ports=[relay_port(ops_stack)])
    with agent(ops_stack, "refused", {"HTTPS_PROXY": proxy.url}) as config_dir:
        doc = wait_status(ops_stack, config_dir, lambda d: bool(d.get("last_error")))
    assert not doc["connected"]
    assert (
        f"refused CONNECT 127.0.0.1:{relay_port(ops_stack)}: 403 Forbidden (ERR_ACCESS_DENIED 0)"
        in doc["last_error"]
    )
    assert "TCP_DENIED/403" in proxy.access()


def test_no_proxy_goes_direct(ops_stack: DevStack, squid: Callable[..., Squid]) -> None:
    proxy = squid("open")
    env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"}
    with agent(ops_stack, "bypass", env) as config_dir:
        wait_status(ops_stack, config_dir, connected)
    assert tunnel_lines(proxy, relay_port(ops_stack)) == []


async def test_ntlm_handshake_with_squid(squid: Callable[..., Squid]) -> None:
    """squid's ntlm_fake_auth runs the real three-message NTLM exchange (and accepts any
    account); squid offers NTLM and Basic, and the stronger one is chosen."""
    pytest.importorskip("spnego")
    proxy = squid("ntlm", users={"alice": PASSWORD})
    route = ProxyRoute("127.0.0.1", proxy.port, "test", "CORP\\alice", PASSWORD)
    target = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    result = await open_tunnel(route, "127.0.0.1", port, 10)
    result.sock.close()
    assert (result.status, result.scheme, result.legs) == (200, "ntlm", 3)
    with pytest.raises(ProxyAuthRequired, match="offers NTLM, Basic"):
        await open_tunnel(ProxyRoute("127.0.0.1", proxy.port, "test"), "127.0.0.1", port, 10)
    target.close()


def test_enroll_through_squid(ops_stack: DevStack, squid: Callable[..., Squid]) -> None:
    """Enrollment is the agent's first call out: it takes the same proxy, with its 407."""
    proxy = squid("basic", users={"alice": PASSWORD})
    saved = dict(ops_stack.env)
    ops_stack.env["HTTPS_PROXY"] = f"http://alice:{PASSWORD}@127.0.0.1:{proxy.port}"
    try:
        _gateway, config_dir = ops_stack.enroll(name="enrolled-via-proxy")
    finally:
        ops_stack.env.clear()
        ops_stack.env.update(saved)
    assert (config_dir / "agent.toml").exists()
    lines = tunnel_lines(proxy, relay_port(ops_stack))
    tunnels = [line for line in lines if "TCP_TUNNEL/200" in line]
    assert tunnels and all(" alice " in line for line in tunnels), proxy.access()
    refusing = squid("open", deny_ports=[relay_port(ops_stack)])
    ops_stack.env["HTTPS_PROXY"] = refusing.url
    try:
        with pytest.raises(StackError, match=r"403 Forbidden \(ERR_ACCESS_DENIED 0\)"):
            ops_stack.enroll(name="enroll-refused")
    finally:
        ops_stack.env.clear()
        ops_stack.env.update(saved)
