"""The relay's listeners: the public one over TLS, and an optional plain one on loopback.

Everything that reaches the relay from another machine comes over TLS. ``local_listen`` adds
a second listener for callers on the relay's own machine: a TLS-terminating sidecar or proxy
(nginx, Envoy, a service mesh's), or a service deployed beside the relay. It serves the same
application through the same HTTP front as the public listener, with nothing but TLS left
out, and the configuration only accepts loopback addresses for it, so nothing crosses a
network in clear. It is the relay's counterpart of the port ``ssh -R`` opens on the server,
which also binds loopback unless ``GatewayPorts`` says otherwise.

Callers there authenticate exactly as on the public listener; a sidecar's own address goes in
``trusted_proxies`` for the relay to believe its ``X-Forwarded-For``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn

from relay.config import RelayConfig, split_listen


def bind(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Listening sockets for ``host:port``, one per address the host resolves to, made as
    asyncio's ``create_server`` makes them (address reuse; IPv6 sockets are v6-only)."""
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_local(config: RelayConfig) -> list[socket.socket]:
    """The plain listener's sockets, bound before the relay starts (none without
    ``local_listen``), so a taken port stops the start with its name."""
    if config.local_listen is None:
        return []
    return bind(*split_listen(config.local_listen))


class RelayServer(uvicorn.Server):
    """Uvicorn's server, also accepting plain HTTP on ``local_sockets``.

    The plain servers join uvicorn's own list, so a shutdown stops and drains them with the
    public listener's.
    """

    def __init__(self, config: uvicorn.Config, local_sockets: Sequence[socket.socket] = ()) -> None:
        super().__init__(config)
        self.local_sockets = list(local_sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit or not self.local_sockets:
            return
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )
            return protocol

        loop = asyncio.get_running_loop()
        for sock in self.local_sockets:
            server = await loop.create_server(
                create_protocol, sock=sock, ssl=None, backlog=config.backlog
            )
            self.servers.append(server)
