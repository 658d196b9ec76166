"""Sequential GET /small: the lean upstream client against the httpx client it replaces.

Both clients run in this process on the same event loop (uvloop when installed); the sample
API runs in a child process so it does not share their CPU. The httpx client is built by the
executor's own factory, so it has exactly the settings the executor used for every call.

    .venv/bin/python bench/upstream_client.py [--requests 5000] [--rounds 3]

Prints, for each client and round, requests per second and this process's CPU time per
request (the client's own cost: the server's CPU is in the child), then the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent import upstream
from agent.config import config_from_dict
from agent.executor import _POOL_SHARDS, Executor
from agent.policy import normalize_url
from backhaul import sampleapi


async def _lean(client: upstream.Client, url: str, n: int) -> None:
    target = normalize_url(url)
    headers = [("User-Agent", "bench")]
    for _ in range(n):
        response = await client.request("GET", target, headers, timeout=30)
        async for _chunk in response.aiter_bytes():
            pass
        await response.aclose()


async def _httpx(client: object, url: str, n: int) -> None:
    import httpx

    assert isinstance(client, httpx.AsyncClient)
    for _ in range(n):
        request = client.build_request("GET", url, headers=[(b"user-agent", b"bench")])
        response = await client.send(request, stream=True, follow_redirects=False)
        async for _chunk in response.aiter_raw():
            pass
        await response.aclose()


async def _timed(run: Callable[[int], Awaitable[None]], n: int) -> tuple[float, float]:
    """Requests per second and CPU microseconds per request."""
    started, cpu = time.perf_counter(), time.process_time()
    await run(n)
    return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6


async def main(requests: int, rounds: int, url: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(
            {
                "relay_url": "https://relay.example.com",
                "member_id": "mbr_bench",
                "gateway_id": "gw_bench",
                "name": "bench",
            },
            Path(tmp),
        )
    per_shard = max(1, cfg.upstream.max_connections // _POOL_SHARDS)
    old = Executor._new_client(cfg, per_shard, None)
    lean = upstream.Client(max_connections=cfg.upstream.max_connections)
    runs: dict[str, Callable[[int], Awaitable[None]]] = {
        "lean (agent.upstream)": lambda n: _lean(lean, url, n),
        "httpx.AsyncClient": lambda n: _httpx(old, url, n),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for run in runs.values():
        await run(200)  # connect, warm caches
    for i in range(rounds):
        order = list(runs.items()) if i % 2 == 0 else list(reversed(runs.items()))
        for name, run in order:
            rate, cpu = await _timed(run, requests)
            results[name].append((rate, cpu))
            print(f"round {i + 1}  {name:22s} {rate:8.0f} req/s {cpu:7.0f} µs CPU/req", flush=True)
    await lean.aclose()
    await old.aclose()
    print()
    medians = {
        name: (statistics.median(r for r, _ in rows), statistics.median(c for _, c in rows))
        for name, rows in results.items()
    }
    for name, (rate, cpu) in medians.items():
        print(f"median  {name:22s} {rate:8.0f} req/s {cpu:7.0f} µs CPU/req")
    fast, slow = medians["lean (agent.upstream)"], medians["httpx.AsyncClient"]
    print(
        f"lean vs httpx: {fast[0] / slow[0]:.2f}x the throughput, {slow[1] / fast[1]:.2f}x less CPU"
    )
    # Above 1: an idle connection outlived the keep-alive expiry while the other client ran.
    print(f"connections opened by lean: {lean.opened}")


def _run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    except ImportError:
        loop_factory = None
    with sampleapi.start_subprocess() as api:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            print(f"loop: {type(runner.get_loop()).__module__}; sample API pid {api.pid}")
            runner.run(main(args.requests, args.rounds, api.url + "/small"))


if __name__ == "__main__":
    _run()
