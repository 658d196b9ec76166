"""DirectSSLObject (backhaul/sslobject.py): real TLS connections on both event loops, with
the C object's methods in place of the standard library's."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from backhaul.sslobject import DIRECT_METHODS, DirectSSLObject, direct_records
from relay.tls import generate_dev_certificate

MiB = 1024 * 1024


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    generate_dev_certificate(cert, key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return direct_records(server), direct_records(client)


def test_the_per_record_methods_are_the_c_objects_own() -> None:
    context = direct_records(ssl.create_default_context())
    made = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="example.com")
    assert isinstance(made, DirectSSLObject)
    inner = made._sslobj  # type: ignore[attr-defined]
    for name in DIRECT_METHODS:
        method = getattr(made, name)
        assert type(method).__name__ == "builtin_function_or_method"
        assert method.__self__ is inner
    assert made.pending() == 0
    # What is not per record is the standard library's, as before.
    assert made.server_hostname == "example.com"
    assert made.version() is None


async def echo_through_tls(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """A TLS echo server and client on 127.0.0.1: 4 MiB each way, checked, and the peer's
    certificate read through the TLS object the transport exposes."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, DirectSSLObject)
        assert ssl_object.getpeercert() is not None
        payload = bytes(range(256)) * (4 * MiB // 256)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof() if writer.can_write_eof() else None

        sender = asyncio.create_task(send())
        received = await reader.readexactly(len(payload))
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "new_loop",
    [asyncio.new_event_loop, uvloop.new_event_loop],
    ids=["asyncio", "uvloop"],
)
def test_a_tls_connection_carries_data_both_ways_on_either_loop(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    server_ctx, client_ctx = contexts
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(asyncio.wait_for(echo_through_tls(server_ctx, client_ctx), 30))
