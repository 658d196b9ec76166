"""Scale benchmark on one relay: many idle agent tunnels, many streams on one tunnel, and
how fast every agent is back after the relay restarts.

    .venv/bin/python bench/scale.py [--agents 1000] [--streams 1000]

The agents are real tunnel clients (``agent.link.Link``: TLS, pinned certificate, Ed25519
handshake, keepalive, jittered backoff) run by the thousand in one helper process, each a
member of its own gateway, because a thousand agent processes would not fit this machine.
The many-streams test uses a real ``backhaul-agent`` process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from backhaul.devstack import DevStack, rss_kib


def metric(stack: DevStack, name: str) -> float:
    text = httpx.get(f"{stack.relay_url}/metrics", verify=stack.tls()).text
    match = re.search(rf"^{name} ([\d.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def enroll_many(stack: DevStack, count: int, out: Path) -> None:
    """Create ``count`` gateways with one member each, through the relay's API."""
    from backhaul.keys import generate_signing_key, public_key_text, save_signing_key
    from backhaul.seal import GatewayKeyPair

    gateway_key = GatewayKeyPair.generate()
    members = []
    with stack.client() as client:
        for i in range(count):
            gw = client.post("/v1/gateways", json={"name": f"scale-{i}"}).json()
            key = generate_signing_key()
            body = {
                "token": gw["enrollment_token"],
                "name": f"m{i}",
                "hostname": "scale",
                "version": "bench",
                "signing_public_key": public_key_text(key),
                "hpke_public_key": gateway_key.public_text(),
            }
            member = client.post("/v1/enroll", json=body).json()
            path = out / f"m{i}.key"
            save_signing_key(path, key)
            members.append(
                {"member_id": member["member_id"], "gateway_id": gw["id"], "key": str(path)}
            )
    (out / "members.json").write_text(json.dumps(members))


async def many_streams(stack: DevStack, cid: str, streams: int) -> tuple[int, float]:
    started = time.monotonic()
    results = await stack.get_many(f"/v1/connections/{cid}/invoke/slow/2", streams)
    took = time.monotonic() - started
    ok = sum(1 for r in results if isinstance(r, httpx.Response) and r.status_code == 200)
    return ok, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("SCALE-RESULTS.md"))
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    root = Path(tempfile.mkdtemp(prefix="bh-scale-"))
    env = {
        "BACKHAUL_RELAY_LOG_LEVEL": "warning",
        "BACKHAUL_AGENT_LOG__LEVEL": "warning",
        "BACKHAUL_AGENT_TUNNEL__MAX_CONCURRENT_STREAMS": str(max(args.streams, 256)),
    }
    with DevStack(root, env=env) as stack:
        port = int(stack.start_relay().rsplit(":", 1)[1])
        stack.create_admin()
        api = stack.start_api()

        # The real agent process (its pin is reused by the many in-process tunnels).
        gateway, agent_dir = stack.enroll(name="agent", allow=[api])
        stack.start_agent(agent_dir)
        cid = stack.connection(gateway, api)

        # 1. Many idle tunnels, measured on a relay that has served nothing else yet.
        folder = root / "members"
        folder.mkdir()
        started = time.monotonic()
        enroll_many(stack, args.agents, folder)
        rows.append(
            (
                f"Enrolling {args.agents} gateways + members (API)",
                f"{time.monotonic() - started:.1f} s",
            )
        )
        relay_pid = stack.procs["relay"].pid
        before = rss_kib(relay_pid)
        toml = (agent_dir / "agent.toml").read_text()
        match = re.search(r'pinned_fingerprint = "([^"]+)"', toml)
        pin = match.group(1) if match else ""
        script = str(Path(__file__).with_name("scale_clients.py"))
        argv = [sys.executable, script, stack.relay_url, str(stack.ca_file), pin, str(folder)]
        clients = stack.spawn("clients", argv)
        expected = args.agents + 1
        started = time.monotonic()
        while metric(stack, "backhaul_relay_tunnels") < expected:
            if time.monotonic() - started > 180:
                raise SystemExit(f"only {metric(stack, 'backhaul_relay_tunnels')} tunnels up")
            time.sleep(0.5)
        rows.append(
            (f"{args.agents} agents connected from cold", f"{time.monotonic() - started:.1f} s")
        )
        # Steady state: the relay returns the handshakes' freed memory once tunnel churn has
        # been quiet for memory_trim_seconds (2 s by default; relay/allocator.py).
        time.sleep(5)
        after = rss_kib(relay_pid)
        rows.append(
            (
                f"Relay RSS with {args.agents} idle tunnels (MiB)",
                f"{after / 1024:.0f} ({(after - before) / 1024:.0f} for the tunnels; "
                f"{(after - before) / args.agents:.0f} KiB each)",
            )
        )

        # 2. Relay restart: how long until every agent is back.
        stack.stop_process("relay", signal.SIGKILL)
        time.sleep(1)
        started = time.monotonic()
        stack.start_relay(port)
        while metric(stack, "backhaul_relay_tunnels") < expected:
            if time.monotonic() - started > 120:
                break
            time.sleep(0.25)
        back = metric(stack, "backhaul_relay_tunnels")
        rows.append(
            (
                f"Relay restarted: all {expected} agents back after",
                f"{time.monotonic() - started:.1f} s ({back:.0f} connected)",
            )
        )

        # 3. Many concurrent streams on one tunnel (the real agent, back after the restart).
        stack.wait_connected(agent_dir, "agent")
        ok, took = asyncio.run(many_streams(stack, cid, args.streams))
        rows.append(
            (
                f"{args.streams} concurrent streams on one tunnel (GET /slow/2)",
                f"{ok} ok in {took:.1f} s",
            )
        )
        clients.send_signal(signal.SIGTERM)
    lines = [
        "# Scale benchmark",
        "",
        "```",
        f".venv/bin/python bench/scale.py --agents {args.agents} --streams {args.streams}",
        "```",
        "",
        "| Measurement | Result |",
        "|---|---:|",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        f"Machine: {os.cpu_count()} cores; relay, agents, sample API and the load share it.",
        "",
    ]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
