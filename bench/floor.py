"""What the relay's HTTP front costs on its own: uvicorn as the relay configures it, serving
a 1 KiB answer from an empty ASGI application, over TLS and in clear.

    .venv/bin/python bench/floor.py [--seconds 6] [--connections 64]

The server is started with the relay's own settings (``relay.workers.server_config``: the
httptools protocol with the relay's head guard and write coalescing, the development
certificate) in a child process, and ``wrk`` puts the same load on it as ``bench/run.py``
puts on ``GET /small``. Prints requests/s and the server's CPU time per request: the part of
the relay's cost per request that is the HTTPS front, not the invoke path or the tunnel.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import run as bench  # noqa: E402
from starlette.types import Receive, Scope, Send  # noqa: E402

from backhaul.devstack import free_port  # noqa: E402

BODY = b"x" * 1024


async def small_answer(scope: Scope, receive: Receive, send: Send) -> None:
    """A 1 KiB answer to every request, as the sample API's GET /small."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", b"1024"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def serve(mode: str, port: int, data_dir: Path) -> None:
    """The child process: uvicorn with the relay's server settings."""
    import uvicorn

    from relay import tls
    from relay.config import load_config
    from relay.workers import server_config

    config = load_config(
        None, {"dev": True, "data_dir": data_dir, "listen": f"127.0.0.1:{port}"}, environ={}
    )
    settings = server_config(small_answer, config, tls.resolve(config))
    if mode == "clear":
        settings.ssl_certfile = settings.ssl_keyfile = None
    uvicorn.Server(settings).run()


def measure(mode: str, seconds: int, connections: int) -> str:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="backhaul-floor-") as tmp:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", mode, "--port", str(port), "--data-dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            bench.wait_for("server", lambda: bench.port_open(port), 30, child)
            scheme = "https" if mode == "tls" else "http"
            target = bench.Target(mode, f"{scheme}://127.0.0.1:{port}")
            bench.run_wrk(target, connections, min(2, connections), 1)  # warm up
            before = bench.tree_cpu(child.pid)
            out = bench.run_wrk(target, connections, min(2, connections), seconds)
            used = bench.tree_cpu(child.pid) - before
            rate, requests = bench.wrk_rate(out)
        finally:
            child.terminate()
            child.wait(10)
    per = 1e6 * used / max(1, requests)
    return f"{mode:5s}  {rate:10,.0f} requests/s  {per:6.1f} us of server CPU per request"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--serve", choices=("tls", "clear"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.data_dir)
        return 0
    print(f"uvicorn with the relay's settings, 1 KiB answers, wrk -c{args.connections}:")
    for mode in ("tls", "clear"):
        print(measure(mode, args.seconds, args.connections))
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
