"""A private two-namespace network for fault tests, and a forwarder into it.

``NetnsPair`` creates two network namespaces joined by a veth pair on a /30 that exists only
inside them: the *relay side* (``R``) and the *agent side* (``A``). Nothing is added to the
host's own namespace. The relay process stays on the host's loopback, where the tests reach
it; a :class:`Forwarder` in this test process listens *inside* ``R`` (a socket created from
a thread that joined ``R``) and relays each connection to the relay's loopback port, like a
TCP load balancer in front of it. The agent runs inside ``A`` (``ip netns exec``).

:meth:`NetnsPair.blackhole` then drops every packet on the agent's veth inside ``A`` with
nftables — no RST, no ICMP: a half-open network, as when a NAT or firewall forgets the flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None when the tests can build namespaces here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tests/faults/setup.sh installs it)"
    return None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def in_namespace(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that joined network namespace ``name`` (setns(2) is per
    thread); a socket it creates stays in that namespace."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            with open(f"/var/run/netns/{name}") as ns:
                if _libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({name}) failed")
            result["value"] = fn()  # the thread ends here; its namespace goes with it
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    value: T = result["value"]
    return value


class NetnsPair:
    """Relay-side and agent-side namespaces on a private /30; deleted by :meth:`close`."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.relay_ns = f"bhf{tag}r"
        self.agent_ns = f"bhf{tag}a"
        self._relay_if = f"bhf{tag}r0"
        self._agent_if = f"bhf{tag}a0"
        block = random.randrange(64) * 4
        octet = random.randrange(1, 255)
        #: 10.254.x.y/30: only ever configured inside the two namespaces made here.
        self.relay_ip = f"10.254.{octet}.{block + 1}"
        self.agent_ip = f"10.254.{octet}.{block + 2}"
        self._created: list[str] = []

    def __enter__(self) -> NetnsPair:
        try:
            for ns in (self.relay_ns, self.agent_ns):
                _run("ip", "netns", "add", ns)
                self._created.append(ns)
            _run(
                "ip", "link", "add", self._relay_if, "netns", self.relay_ns,
                "type", "veth", "peer", "name", self._agent_if, "netns", self.agent_ns,
            )  # fmt: skip
            for ns, ifname, ip in (
                (self.relay_ns, self._relay_if, self.relay_ip),
                (self.agent_ns, self._agent_if, self.agent_ip),
            ):
                _run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", ifname)
                _run("ip", "-n", ns, "link", "set", ifname, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete both namespaces (the veth pair goes with them)."""
        while self._created:
            ns = self._created.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the agent's namespace."""
        return ["ip", "netns", "exec", self.agent_ns, *argv]

    def listen_on_relay_side(self) -> socket.socket:
        """A listening TCP socket on the relay side's address, port chosen by the kernel."""

        def make() -> socket.socket:
            sock = socket.socket()
            sock.bind((self.relay_ip, 0))
            sock.listen(64)
            return sock

        return in_namespace(self.relay_ns, make)

    def blackhole(self) -> None:
        """Drop every packet to and from the agent's veth, silently."""
        rules = (
            "table inet backhaul_fault {\n"
            "  chain input { type filter hook input priority 0; "
            f'iifname "{self._agent_if}" drop; }}\n'
            "  chain output { type filter hook output priority 0; "
            f'oifname "{self._agent_if}" drop; }}\n'
            "}\n"
        )
        done = subprocess.run(
            ["ip", "netns", "exec", self.agent_ns, "nft", "-f", "-"],
            input=rules,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nft: {done.stderr.strip()}")

    def restore(self) -> None:
        _run(
            "ip", "netns", "exec", self.agent_ns, "nft", "delete", "table", "inet", "backhaul_fault"
        )


def namespaces_left(prefix: str = "bhf") -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


class Forwarder:
    """Relays every connection accepted on ``listener`` to ``target`` (a TCP proxy on its
    own event loop thread)."""

    def __init__(self, listener: socket.socket, target: tuple[str, int]) -> None:
        self.listener = listener
        self.target = target
        self.port = int(listener.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def __enter__(self) -> Forwarder:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self.listener.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, sock=self.listener)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def private_network() -> Iterator[NetnsPair]:
    with NetnsPair() as pair:
        yield pair
