"""Run many agent tunnels in one process (for bench/scale.py).

    python bench/scale_clients.py RELAY_URL CA_FILE PIN FOLDER

FOLDER holds members.json (member id, gateway id, key file per member) as written by
bench/scale.py. Each member gets a real ``agent.link.Link``; streams are refused at once.
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


async def main(relay: str, ca_file: str, pin: str, folder: str) -> None:
    stop = asyncio.Event()
    links = []
    for member in json.loads(Path(folder, "members.json").read_text()):
        cfg = config_from_dict(
            {
                "relay_url": relay,
                "member_id": member["member_id"],
                "gateway_id": member["gateway_id"],
                "name": "scale",
                "ca_file": ca_file,
                "pinned_fingerprint": pin or None,
                "tunnel": {"backoff_max_seconds": 20},
            },
            folder,
        )
        state = AgentState(relay=relay, member_id=cfg.member_id, gateway_id=cfg.gateway_id)
        key = load_signing_key(Path(member["key"]))
        links.append(asyncio.create_task(Link(cfg, key, state, refuse).run(stop)))
    await asyncio.gather(*links)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
