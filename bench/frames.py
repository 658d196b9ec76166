"""What a tunnel message costs each end's WebSocket connection, in one process.

A message is fed to the connection's ``data_received`` as the transport would feed it and
handed to the tunnel's feed (``push_to``), on the relay (masked client frames, uvicorn's
protocol) and on the agent (unmasked server frames, websockets' client connection): a small
message in one read, and a 256 KiB DATA message in 16 KiB reads. Best of several rounds, in
microseconds per message. Run it against a build with ``PYTHONPATH``:

    PYTHONPATH=build/compiled .venv/bin/python bench/frames.py
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import uvicorn
import uvicorn.server
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from agent.link import TunnelClientConnection
from backhaul import malloc_tuning
from backhaul.aio.wsframes import binary_frame
from relay.wsprotocol import TunnelWebSocketProtocol

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


class _Transport(asyncio.Transport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8443), "peername": ("127.0.0.1", 5555)}.get(name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def relay_end(feed: Callable[[bytes], bool]) -> Callable[[bytes], None]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.Event().wait()  # the tunnel's handshake never comes

    config = uvicorn.Config(app, ws_per_message_deflate=False, ws_max_size=2**24)
    config.load()
    logging.getLogger("uvicorn.error").disabled = True  # the parked application's end
    protocol = TunnelWebSocketProtocol(
        config=config, server_state=uvicorn.server.ServerState(), app_state={}
    )
    protocol.connection_made(_Transport())
    protocol.data_received(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + _KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    protocol.conn.state = State.OPEN  # as after the application's accept
    await asyncio.sleep(0)
    while not protocol.queue.empty():
        protocol.queue.get_nowait()
    assert protocol.push_to(feed)
    return protocol.data_received


async def agent_end(feed: Callable[[bytes], bool]) -> Callable[[bytes], None]:
    protocol = ClientProtocol(parse_uri("wss://relay.example/tunnel"), max_size=2**24)
    request = protocol.connect()
    protocol.send_request(request)
    accept = base64.b64encode(
        hashlib.sha1(request.headers["Sec-WebSocket-Key"].encode() + _GUID).digest()
    )
    connection = TunnelClientConnection(protocol)
    connection.connection_made(_Transport())
    connection.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    assert protocol.state is State.OPEN
    assert connection.push_to(feed)
    return connection.data_received


def measure(receive: Callable[[bytes], None], reads: list[bytes], count: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(count):
            for read in reads:
                receive(read)
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=50_000, help="small messages per round")
    parser.add_argument("--large", type=int, default=300, help="256 KiB messages per round")
    args = parser.parse_args()
    malloc_tuning.tune()  # as both ends run: no mmap per large buffer
    got = 0

    def feed(data: bytes) -> bool:
        nonlocal got
        got += 1
        return True

    small = os.urandom(300)
    large = os.urandom(256 * 1024)
    for name, make, masked in (("relay", relay_end, True), ("agent", agent_end, False)):
        receive = await make(feed)
        one = [b"".join(binary_frame(small, masked))]
        whole = b"".join(binary_frame(large, masked))
        pieces = [whole[i : i + 16_384] for i in range(0, len(whole), 16_384)]
        got = 0
        small_us = measure(receive, one, args.small)
        assert got == 5 * args.small, got
        got = 0
        large_us = measure(receive, pieces, args.large)
        assert got == 5 * args.large, got
        print(f"{name}: 300 B message {small_us:.2f} us, 256 KiB message {large_us:.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
