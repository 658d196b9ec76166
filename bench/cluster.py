"""Cluster benchmark: one gateway with one member and with two, failover time after a
member is killed, and requests lost during a rolling restart; then one relay machine with one
worker process and with two (``serve --workers 2``, the Redis registry), the agent holding a
tunnel to each worker or, for comparison, one tunnel that the other worker forwards to.
The worker setups run twice: as they come, sharing the machine's cores with the agent, the
sample API and wrk, and with every relay worker held to ``--core-quota`` of a core
(bench/corecap.py), so that the relay is the bottleneck and each worker stands for one core of
a relay machine that its relay fills.

    .venv/bin/python bench/cluster.py [--seconds 10] [--rounds 2] [--core-quota 0.5]
        [--redis-url URL] [--output bench/CLUSTER-RESULTS.md]

Everything runs on loopback with real relay and agent processes (``backhaul.devstack``);
throughput is measured with wrk (``bash bench/setup.sh`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
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

import corecap
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
#: (label, workers, the agent's [tunnel] per_worker).
WORKER_SETUPS: tuple[tuple[str, int, bool], ...] = (
    ("1 worker", 1, True),
    ("2 workers, a tunnel to each", 2, True),
    ("2 workers, one tunnel (half forwarded)", 2, False),
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


def relay_workers(pid: int) -> list[int]:
    """The relay's worker processes: itself when it serves alone, else its children (the
    supervisor only watches them)."""
    children = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return children or [pid]


def one_setup(
    root: Path,
    label: str,
    workers: int,
    per_worker: bool,
    redis: str,
    seconds: int,
    quota: float | None,
) -> tuple[float, list[float]]:
    """Requests/s of wrk -c64 through one relay with ``workers`` worker processes, each
    held to ``quota`` of a core (None: not held), and the cores each of the relay's processes
    used meanwhile (CPU seconds over wall seconds)."""
    args = ["--workers", str(workers), "--redis-url", redis] if workers > 1 else []
    with (
        DevStack(Path(tempfile.mkdtemp(dir=root)), env=FAST) as stack,
        contextlib.ExitStack() as held,
    ):
        stack.start_relay(extra=args)
        token = stack.create_admin()
        api = stack.start_api()
        gateway, agent_dir = stack.enroll(name="agent", allow=[api])
        stack.set_agent_config(agent_dir, tunnel={"per_worker": per_worker})
        stack.start_agent(agent_dir)
        want = workers if per_worker else 1
        deadline = time.monotonic() + 30
        while stack.agent_status(agent_dir).get("tunnels") != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: the agent did not reach {want} tunnels")
            time.sleep(0.1)
        cid = stack.connection(gateway, api)
        url = f"{stack.relay_url}/v1/connections/{cid}/invoke/small"
        pid = stack.procs["relay"].pid
        if quota is not None:
            cap = held.enter_context(corecap.CoreCap(quota))
            for worker in relay_workers(pid):
                cap.hold(worker)
        wrk(url, token, 2)  # warm up: every worker's caches, the agent's pool
        cpu, wall = relay_cpu(pid), time.monotonic()
        rate = wrk(url, token, seconds)
        after, elapsed = relay_cpu(pid), time.monotonic() - wall
    # Per process, busiest first (a supervisor that only watches its workers rounds to 0).
    cores = sorted(((t - cpu.get(p, 0.0)) / elapsed for p, t in after.items()), reverse=True)
    return rate, [c for c in cores if c >= 0.005]


def workers_rows(
    root: Path, redis: str, seconds: int, rounds: int, quota: float | None
) -> list[tuple[str, str]]:
    """Each configuration ``rounds`` times, as it comes and (with ``quota``) with its workers
    held to that much of a core, taking turns; the medians, and every round."""
    holds: list[float | None] = [None] if quota is None else [None, quota]
    runs = [(setup, hold) for hold in holds for setup in WORKER_SETUPS]
    rates: dict[tuple[str, float | None], list[float]] = {}
    cores: dict[tuple[str, float | None], list[list[float]]] = {}
    for _ in range(rounds):
        for (label, workers, per_worker), hold in runs:
            rate, used = one_setup(root, label, workers, per_worker, redis, seconds, hold)
            rates.setdefault((label, hold), []).append(rate)
            cores.setdefault((label, hold), []).append(used)
    rows = []
    for hold in holds:
        held = "" if hold is None else f", each worker held to {hold:g} of a core"
        for label, _, _ in WORKER_SETUPS:
            key = (label, hold)
            each = " / ".join(f"{r:,.0f}" for r in rates[key])
            rate = statistics.median(rates[key])
            rows.append(
                (
                    f"Requests/s, relay with {label}{held} (wrk -c64, 1 KiB; rounds: {each})",
                    f"{rate:,.0f}",
                )
            )
            total = statistics.median(sum(used) for used in cores[key])
            split = ", ".join(" + ".join(f"{c:.2f}" for c in used) for used in cores[key])
            rows.append(
                (
                    f"Cores the relay used, {label}{held} (by process, rounds: {split})",
                    f"{total:.2f}",
                )
            )
            per_request = statistics.median(
                sum(used) * 1000 / r for used, r in zip(cores[key], rates[key], strict=True)
            )
            rows.append((f"Relay CPU per request, {label}{held} (ms)", f"{per_request:.3f}"))
        one = statistics.median(rates[(WORKER_SETUPS[0][0], hold)])
        spread = statistics.median(rates[(WORKER_SETUPS[1][0], hold)])
        forwarded = statistics.median(rates[(WORKER_SETUPS[2][0], hold)])
        rows.append((f"Two workers / one, a tunnel to each{held}", f"{spread / one:.2f}x"))
        rows.append((f"Two workers / one, one tunnel{held}", f"{forwarded / one:.2f}x"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the worker setups")
    parser.add_argument(
        "--core-quota",
        type=float,
        default=0.5,
        help="the share of a core each relay worker is held to in the second set of worker "
        "setups (0: leave that set out)",
    )
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
            quota: float | None = args.core_quota or None
            why = corecap.unavailable()
            if quota is not None and why is not None:
                rows.append(("Relay workers held to a share of a core", f"not measured: {why}"))
                quota = None
            rows += workers_rows(root, args.redis_url, args.seconds, args.rounds, quota)
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
        f".venv/bin/python bench/cluster.py --seconds {args.seconds} --rounds {args.rounds}"
        f" --core-quota {args.core_quota:g}",
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
