"""Run many agent tunnels in one process (for bench/scale.py).

    python bench/scale_clients.py RELAY_URL CA_FILE PIN FOLDER

FOLDER holds members.json (member id, gateway id, key file per member) as written by
bench/scale.py. Each member gets a real ``agent.link.Link``, connecting from a loopback
address of its own (``tunnel.local_address``); streams are refused at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agent.config import config_from_dict
from agent.link import Link
from agent.state import AgentState
from backhaul.aio.tunnel import TunnelStream
from backhaul.keys import load_signing_key
from backhaul.wire import ErrorCode


async def refuse(stream: TunnelStream) -> None:
    await stream.reset(ErrorCode.REFUSED_STREAM, "bench client serves no requests")


def source_address(index: int) -> str:
    """A loopback address per agent: 127.1.0.1 to 127.1.0.250, then 127.1.1.1, ..."""
    return f"127.1.{index // 250}.{1 + index % 250}"


async def main(relay: str, ca_file: str, pin: str, folder: str) -> None:
    stop = asyncio.Event()
    links = []
    for i, member in enumerate(json.loads(Path(folder, "members.json").read_text())):
        cfg = config_from_dict(
            {
                "relay_url": relay,
                "member_id": member["member_id"],
                "gateway_id": member["gateway_id"],
                "name": "scale",
                "ca_file": ca_file,
                "pinned_fingerprint": pin or None,
                # Each agent from an address of its own (127.1.0.1, 127.1.0.2, ...), as
                # separate servers would be: the relay caps pending handshakes per address.
                "tunnel": {"backoff_max_seconds": 20, "local_address": source_address(i)},
            },
            folder,
        )
        state = AgentState(relay=relay, member_id=cfg.member_id, gateway_id=cfg.gateway_id)
        key = load_signing_key(Path(member["key"]))
        links.append(asyncio.create_task(Link(cfg, key, state, refuse).run(stop)))
    await asyncio.gather(*links)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
