"""Cluster benchmark: one gateway with one member and with two, failover time after a
member is killed, and requests lost during a rolling restart.

    .venv/bin/python bench/cluster.py [--seconds 10] [--output bench/CLUSTER-RESULTS.md]

Everything runs on loopback with real relay and agent processes (``backhaul.devstack``);
throughput is measured with wrk (``bash bench/setup.sh`` installs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from backhaul.devstack import DevStack

FAST = {
    "BACKHAUL_RELAY_PING_INTERVAL_SECONDS": "2",
    "BACKHAUL_AGENT_TUNNEL__PING_INTERVAL_SECONDS": "2",
    "BACKHAUL_AGENT_TUNNEL__BACKOFF_MAX_SECONDS": "2",
    "BACKHAUL_RELAY_LOG_LEVEL": "warning",
    "BACKHAUL_AGENT_LOG__LEVEL": "warning",
}


def wrk(url: str, token: str, seconds: int) -> float:
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{seconds}s", "-H", f"Authorization: Bearer {token}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} failed responses:\n{out}")
    assert match, out
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("CLUSTER-RESULTS.md")
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: run bash bench/setup.sh")
    root = Path(tempfile.mkdtemp(prefix="bh-cluster-"))
    rows: list[tuple[str, str]] = []
    failures: list[str] = []
    try:
        with DevStack(root, env=FAST) as stack:
            stack.start_relay()
            token = stack.create_admin()
            api = stack.start_api()
            gateway, dir_a = stack.enroll(name="a", allow=[api])
            _, dir_b = stack.enroll(gateway, name="b", allow=[api])
            cid = stack.connection(gateway, api)
            url = f"{stack.relay_url}/v1/connections/{cid}/invoke/small"
            stack.start_agent(dir_a)
            one = wrk(url, token, args.seconds)
            stack.start_agent(dir_b)
            two = wrk(url, token, args.seconds)
            rows += [
                ("Requests/s, one member (wrk -c64, 1 KiB)", f"{one:,.0f}"),
                ("Requests/s, two members", f"{two:,.0f}"),
                ("Two members / one", f"{two / one:.2f}x"),
            ]

            stack.call(
                "PATCH", f"/v1/gateways/{gateway}", json={"load_balancing": "primary-failover"}
            )
            with stack.client() as client:
                assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200
                stack.stop_process("a", signal.SIGKILL)
                killed = time.monotonic()
                while True:
                    try:
                        if client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200:
                            break
                    except httpx.HTTPError as exc:
                        failures.append(f"during failover: {exc!r}")
                failover_ms = (time.monotonic() - killed) * 1000
            rows.append(("Member killed → first success on the other (ms)", f"{failover_ms:.1f}"))
            stack.start_agent(dir_a, "a")

            count = [0]
            done = threading.Event()

            def load() -> None:
                with stack.client(timeout=30) as client:
                    while not done.is_set():
                        try:
                            r = client.get(f"/v1/connections/{cid}/invoke/hello")
                            if r.status_code != 200:
                                failures.append(f"{r.status_code} {r.text[:160]}")
                        except httpx.HTTPError as exc:
                            failures.append(repr(exc))
                        count[0] += 1

            workers = [threading.Thread(target=load) for _ in range(4)]
            for w in workers:
                w.start()
            for name, config_dir in (("a", dir_a), ("b", dir_b)):
                time.sleep(1)
                stack.stop_process(name, signal.SIGTERM, timeout=30)
                stack.start_agent(config_dir, name)
            time.sleep(1)
            done.set()
            for w in workers:
                w.join()
            rows.append(
                (
                    "Rolling restart of both members: requests / failed",
                    f"{count[0]:,} / {len(failures)}",
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        "# Cluster benchmark",
        "",
        "```",
        f".venv/bin/python bench/cluster.py --seconds {args.seconds}",
        "```",
        "",
        "| Measurement | Result |",
        "|---|---:|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        f"Machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
        f"{dt.date.today().isoformat()}. Relay, agents, sample API and wrk share the machine.",
        "",
    ]
    args.output.write_text("\n".join(lines))
    for failure in sorted(set(failures)):
        print("failed:", failure)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
