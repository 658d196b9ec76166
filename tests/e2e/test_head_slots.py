"""Head slots through real relay and agent processes: a connection's sealed credentials cross
the tunnel once, not with every request (docs/protocol.md, "Head slots")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e

#: What the agent may read per small request from the tunnel and the API together: 444 bytes
#: measured with head slots, 2,299 before them, when every OPEN carried the connection's
#: fields (the sealed blob is about 1.6 KiB of base64).
READ_PER_REQUEST = 1500


def _read_so_far(pid: int) -> int:
    """Bytes the process has read, sockets included (``rchar``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/<pid>/io")


def test_the_sealed_credentials_cross_the_tunnel_once_per_connection(world: World) -> None:
    agent = world.stack.procs[world.agent_dir.name]
    connections = [world.none_id, world.basic_id, world.header_key_id, world.query_key_id]
    rounds = 25
    with world.stack.client() as client:

        def call(connection_id: str) -> None:
            r = client.get(f"/v1/connections/{connection_id}/invoke/hello")
            assert r.status_code == 200, r.text

        for connection_id in connections:  # whichever slots these take, they hold them now
            call(connection_id)
        before = _read_so_far(agent.pid)
        for _ in range(rounds):
            for connection_id in connections:
                call(connection_id)
        read = _read_so_far(agent.pid) - before
    per_request = read / (rounds * len(connections))
    assert per_request < READ_PER_REQUEST, per_request
