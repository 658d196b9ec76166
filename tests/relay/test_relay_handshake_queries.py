"""The store functions the tunnel handshake calls."""

from __future__ import annotations

from relay.store import queries
from tests.relay.relay_helpers import Relay, gateway_with_member


async def test_member_for_handshake_and_touch(relay: Relay) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    async with relay.app.state.db() as session:
        record = await queries.member_for_handshake(session, gw.member_id)
        assert record is not None
        assert record.gateway_id == gw.gateway_id and record.revoked is False
        assert len(record.signing_public_key) == 43
        assert await queries.member_for_handshake(session, "mem_missing") is None
        await queries.touch_member(session, gw.member_id, "0.2.0", "new-host")
    detail = (await relay.call("GET", f"/v1/gateways/{gw.gateway_id}", relay.admin_token)).json()
    member = detail["members"][0]
    assert member["version"] == "0.2.0" and member["hostname"] == "new-host"
    assert member["last_seen_at"] is not None

    url = f"/v1/gateways/{gw.gateway_id}/members/{gw.member_id}"
    assert (await relay.call("DELETE", url, relay.admin_token)).status_code == 204
    async with relay.app.state.db() as session:
        record = await queries.member_for_handshake(session, gw.member_id)
        assert record is not None and record.revoked is True
