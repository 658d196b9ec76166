"""``backhaul-relay``: serve the relay, create the first admin, migrate the database.

``create-admin`` prints only the new token on stdout so a script can capture it
(``TOKEN=$(backhaul-relay create-admin alice)``); everything else goes to stderr.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import structlog
import typer

from backhaul.errors import BackhaulError
from backhaul.version import build
from relay.config import RelayConfig, ensure_data_dir, load_config

if TYPE_CHECKING:
    from relay.store.migrate import Prepared
    from relay.tls import TLSFiles

app = typer.Typer(
    name="backhaul-relay",
    help="The Backhaul relay: tunnel endpoint and HTTP API.",
    no_args_is_help=True,
    add_completion=False,
)
log = structlog.get_logger()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="relay.toml; env BACKHAUL_RELAY_* and flags win")
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="database, dev certificate")]
DevOpt = Annotated[
    bool | None,
    typer.Option("--dev/--no-dev", help="self-signed localhost certificate; for development"),
]


def _configure_logging(config: RelayConfig) -> None:
    """Use the shared logging setup when present; otherwise keep structlog off stdout."""
    try:
        from backhaul import logging as backhaul_logging
    except ImportError:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        return
    configure: Any = backhaul_logging.configure
    configure(config.log_format, config.log_level)


def _load(config_path: Path | None, **flags: Any) -> RelayConfig:
    try:
        config = load_config(config_path, flags)
    except BackhaulError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _configure_logging(config)
    return config


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@app.command()
def serve(
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    dev: DevOpt = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to listen on")] = None,
    local_listen: Annotated[
        str | None,
        typer.Option(help="loopback HOST:PORT for plain-HTTP callers on this machine"),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL, e.g. postgresql+asyncpg://host/db")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="redis://host:6379/0 to share tunnels between instances")
    ] = None,
    advertise_url: Annotated[
        str | None, typer.Option(help="https URL other relay instances use to reach this one")
    ] = None,
    instance_id: Annotated[str | None, typer.Option(help="name of this relay instance")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="worker processes (0: one per CPU); other than 1 needs --redis-url"),
    ] = None,
) -> None:
    """Serve the HTTP API and the agent tunnel over TLS."""
    from relay import tls
    from relay.app import create_app
    from relay.listeners import RelayServer
    from relay.workers import server_config

    config = _load(
        config_file,
        data_dir=data_dir,
        dev=dev,
        listen=listen,
        local_listen=local_listen,
        tls_cert=tls_cert,
        tls_key=tls_key,
        database_url=database_url,
        redis_url=redis_url,
        advertise_url=advertise_url,
        instance_id=instance_id,
        workers=workers,
    )
    try:
        files = tls.resolve(config)
    except tls.TLSSetupError as exc:
        raise _fail(str(exc)) from exc
    local = _bind_local(config)
    if config.workers != 1:
        _serve_workers(config, files, local)
        return
    server = RelayServer(server_config(create_app(config), config, files), local)
    _announce(config, files)
    try:
        server.run()
    finally:
        for sock in local:
            sock.close()
    if getattr(server, "started", True) is False:
        raise typer.Exit(1)


def _bind_local(config: RelayConfig) -> list[socket.socket]:
    from relay.listeners import bind_local

    try:
        return bind_local(config)
    except OSError as exc:
        what = exc.strerror or exc
        raise _fail(f"cannot listen on local_listen {config.local_listen}: {what}") from exc


def _announce(config: RelayConfig, files: TLSFiles, workers: int = 1) -> None:
    url = config.base_url
    log.info(
        "relay starting",
        url=url,
        ca_file=str(files.ca_file) if files.ca_file else None,
        data_dir=str(config.data_dir),
        workers=workers,
        local_url=config.local_url,
        build=build(),
    )
    typer.echo(
        f"backhaul-relay listening on {url}"
        + (f" with {workers} worker processes" if workers != 1 else "")
        + (f" (dev CA file: {files.ca_file})" if files.ca_file else "")
        + (f", and on {config.local_url} for callers on this machine" if config.local_url else ""),
        err=True,
    )


def _serve_workers(config: RelayConfig, files: TLSFiles, local: list[socket.socket]) -> None:
    """The supervisor (relay/workers.py): migrate once, bind once, then run the workers."""
    from relay import workers
    from relay.listeners import bind

    try:
        asyncio.run(_migrate(config))
    except Exception as exc:  # the database is down or refuses: say so, as a single relay would
        raise _fail(f"cannot bring the database to the current schema: {exc}") from exc
    try:
        sockets = bind(config.host, config.port)
    except OSError as exc:
        raise _fail(f"cannot listen on {config.listen}: {exc.strerror or exc}") from exc
    count = config.worker_count
    _announce(config, files, count)
    supervisor = workers.Supervisor(config, files, sockets, count, local)
    try:
        status = supervisor.run()
    finally:
        for sock in [*sockets, *local]:
            sock.close()
    if status:
        raise _fail(f"the relay did not start: {supervisor.problem}")


async def _migrate(config: RelayConfig) -> Prepared:
    from relay.store.db import make_engine
    from relay.store.migrate import prepare

    if config.database_url.startswith("sqlite"):
        ensure_data_dir(config.data_dir)
    engine = make_engine(config.database_url)
    try:
        return await prepare(engine)
    finally:
        await engine.dispose()


async def _create_admin(config: RelayConfig, name: str) -> str:
    from relay.identity import ADMIN, hash_token, new_api_token
    from relay.store import queries
    from relay.store.db import make_engine, make_session_factory
    from relay.store.migrate import prepare

    ensure_data_dir(config.data_dir)
    engine = make_engine(config.database_url)
    try:
        await prepare(engine)
        async with make_session_factory(engine)() as session:
            user = await queries.create_user(session, name, ADMIN)
            token = new_api_token()
            await queries.add_api_token(session, user.id, hash_token(token))
            await session.commit()
            log.info("admin created", user_id=user.id, name=name)
            return token
    finally:
        await engine.dispose()


@app.command("create-admin")
def create_admin(
    name: Annotated[str, typer.Argument(help="user name of the new admin")],
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create an admin user and print its API token (only the token, on stdout)."""
    from relay.api.users import UserCreate
    from relay.store import Conflict

    try:
        UserCreate(name=name)
    except ValueError as exc:
        raise _fail(f"invalid user name {name!r}: letters, digits, . _ @ - (max 64)") from exc
    config = _load(config_file, data_dir=data_dir, dev=True)
    try:
        token = asyncio.run(_create_admin(config, name))
    except Conflict as exc:
        raise _fail(str(exc)) from exc
    sys.stdout.write(token + "\n")


@app.command()
def migrate(config_file: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Bring the database to the current schema (``serve`` also does this at start)."""
    config = _load(config_file, data_dir=data_dir, dev=True)
    done = asyncio.run(_migrate(config))
    typer.echo(f"database is at the current schema ({done.value})", err=True)


def main() -> None:
    app()
