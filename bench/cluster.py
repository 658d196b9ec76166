"""Cluster benchmark: one gateway with one member and with two, failover time after a
member is killed, and requests lost during a rolling restart; then one relay machine with one
worker process and with two (``serve --workers 2``, the Redis registry), the agent holding a
tunnel to each worker or, for comparison, one tunnel that the other worker forwards to.

    .venv/bin/python bench/cluster.py [--seconds 10] [--rounds 2] [--redis-url URL]
        [--output bench/CLUSTER-RESULTS.md]

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
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

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


#: The relay's worker configurations, in the order each round runs them:
#: (label, serve arguments, the agent's [tunnel] per_worker).
WORKER_SETUPS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("1 worker", (), True),
    ("2 workers, a tunnel to each", ("--workers", "2"), True),
    ("2 workers, one tunnel (half forwarded)", ("--workers", "2"), False),
)


def relay_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of the relay process and of each of its worker processes, by pid."""
    proc = psutil.Process(pid)
    out: dict[int, float] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[p.pid] = times.user + times.system
    return out


def one_setup(
    root: Path, label: str, extra: tuple[str, ...], per_worker: bool, redis: str, seconds: int
) -> tuple[float, list[float]]:
    """Requests/s of wrk -c64 through one relay set up as ``extra`` says, and the cores each
    of the relay's processes used meanwhile (CPU seconds over wall seconds)."""
    args = [*extra, "--redis-url", redis] if extra else []
    with DevStack(Path(tempfile.mkdtemp(dir=root)), env=FAST) as stack:
        stack.start_relay(extra=args)
        token = stack.create_admin()
        api = stack.start_api()
        gateway, agent_dir = stack.enroll(name="agent", allow=[api])
        stack.set_agent_config(agent_dir, tunnel={"per_worker": per_worker})
        stack.start_agent(agent_dir)
        want = 2 if extra and per_worker else 1
        deadline = time.monotonic() + 30
        while stack.agent_status(agent_dir).get("tunnels") != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: the agent did not reach {want} tunnels")
            time.sleep(0.1)
        cid = stack.connection(gateway, api)
        url = f"{stack.relay_url}/v1/connections/{cid}/invoke/small"
        wrk(url, token, 2)  # warm up: every worker's caches, the agent's pool
        pid = stack.procs["relay"].pid
        cpu, wall = relay_cpu(pid), time.monotonic()
        rate = wrk(url, token, seconds)
        after, elapsed = relay_cpu(pid), time.monotonic() - wall
    # Per process, busiest first (a supervisor that only watches its workers rounds to 0).
    cores = sorted(((t - cpu.get(p, 0.0)) / elapsed for p, t in after.items()), reverse=True)
    return rate, [c for c in cores if c >= 0.005]


def workers_rows(root: Path, redis: str, seconds: int, rounds: int) -> list[tuple[str, str]]:
    """Each configuration ``rounds`` times, taking turns; the medians, and every round."""
    rates: dict[str, list[float]] = {label: [] for label, _, _ in WORKER_SETUPS}
    cores: dict[str, list[list[float]]] = {label: [] for label, _, _ in WORKER_SETUPS}
    for _ in range(rounds):
        for label, extra, per_worker in WORKER_SETUPS:
            rate, used = one_setup(root, label, extra, per_worker, redis, seconds)
            rates[label].append(rate)
            cores[label].append(used)
    rows = []
    for label, _, _ in WORKER_SETUPS:
        each = " / ".join(f"{r:,.0f}" for r in rates[label])
        rows.append(
            (
                f"Requests/s, relay with {label} (wrk -c64, 1 KiB; rounds: {each})",
                f"{statistics.median(rates[label]):,.0f}",
            )
        )
        total = statistics.median(sum(used) for used in cores[label])
        split = ", ".join(" + ".join(f"{c:.2f}" for c in used) for used in cores[label])
        rows.append(
            (f"Cores the relay used, {label} (by process, rounds: {split})", f"{total:.2f}")
        )
    one = statistics.median(rates[WORKER_SETUPS[0][0]])
    spread = statistics.median(rates[WORKER_SETUPS[1][0]])
    forwarded = statistics.median(rates[WORKER_SETUPS[2][0]])
    rows.append(("Two workers / one, a tunnel to each", f"{spread / one:.2f}x"))
    rows.append(("Two workers / one, one tunnel", f"{forwarded / one:.2f}x"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the worker setups")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/6",
        help="the registry of the worker setups (a database number of their own)",
    )
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
        try:
            import redis

            redis.Redis.from_url(args.redis_url).ping()
        except Exception as exc:
            rows.append(("Worker processes", f"not measured: no Redis at {args.redis_url} ({exc})"))
        else:
            rows += workers_rows(root, args.redis_url, args.seconds, args.rounds)
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
        f".venv/bin/python bench/cluster.py --seconds {args.seconds} --rounds {args.rounds}",
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
