"""`make demo`: a whole Backhaul on this machine, one real request through the tunnel.

Starts the relay (SQLite, a development certificate), the sample internal API (Basic auth),
enrolls an agent and runs it, creates a connector and a connection with sealed credentials,
calls the internal API through the relay, and shows both status tables. Everything it starts
stops at the end; the data stays in ./demo-data for a look around.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from backhaul.devstack import DevStack, command

console = Console()
ROOT = Path(__file__).resolve().parent.parent / "demo-data"


def step(text: str) -> None:
    console.print(f"[bold cyan]==>[/] {text}")


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    with DevStack(ROOT) as stack:
        step("Starting the relay (TLS with a development certificate, SQLite store)")
        relay = stack.start_relay()
        token = stack.create_admin("demo-admin")
        console.print(f"    relay {relay}, CA file {stack.ca_file}")

        step("Starting the sample internal API (requires Basic auth alice / ********)")
        api = stack.start_api(basic=("alice", "wonderland"))
        console.print(f"    internal API {api} - reachable only from this 'private network'")

        step("Creating a gateway and enrolling an agent (Ed25519 + ML-KEM-768/X25519 keys)")
        gateway_id, agent_dir = stack.enroll(name="demo-agent", allow=[api])
        console.print(f"    gateway {gateway_id}, agent config in {agent_dir}")

        step("Running the agent: it dials out to the relay and opens the tunnel")
        stack.start_agent(agent_dir)

        step("Creating a connector and a connection (credentials sealed to the gateway)")
        connection_id = stack.connection(
            gateway_id, api, "basic", {"username": "alice", "password": "wonderland"}
        )
        console.print(f"    connection {connection_id}")

        url = f"{relay}/v1/connections/{connection_id}/invoke/basic/hello"
        step(f"Calling the internal API through the relay:\n    GET {url}")
        with stack.client(token) as client:
            response = client.get(f"/v1/connections/{connection_id}/invoke/basic/hello")
        console.print(f"    HTTP {response.status_code}  {response.text.strip()}")

        step("Relay status (backhaul status)")
        subprocess.run(
            [
                command("backhaul"),
                "--relay",
                relay,
                "--token",
                token,
                "--ca-file",
                str(stack.ca_file),
                "status",
            ],
            check=False,
        )
        step("Agent status (backhaul-agent status)")
        subprocess.run(
            [command("backhaul-agent"), "status", "--config-dir", str(agent_dir)], check=False
        )
        ok = response.status_code == 200
    step("Stopped everything. " + ("The demo worked." if ok else "The request failed."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
