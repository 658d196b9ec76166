"""``backhaul-agent``: enroll this machine, run the agent, show its status.

Every expected failure (bad configuration, unsafe key file, relay refusal, agent not running)
is one line on stderr and exit status 1; a traceback means a bug.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.config import load_config
from agent.enroll import enroll as do_enroll
from agent.errors import AgentNotRunning
from backhaul.errors import BackhaulError
from backhaul.version import __version__

__all__ = ["app", "main"]

app = typer.Typer(
    name="backhaul-agent",
    help="The Backhaul on-premises agent: keeps an outbound tunnel to the relay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigDir = Annotated[
    Path,
    typer.Option(
        "--config-dir",
        "-c",
        help="Directory holding agent.toml and keys/.",
        envvar="BACKHAUL_AGENT_CONFIG_DIR",
    ),
]


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except BackhaulError as exc:
        _fail(str(exc))


@app.command()
def enroll(
    relay: Annotated[str, typer.Option(help="Relay base URL, e.g. https://relay.example.com")],
    token: Annotated[
        str,
        typer.Option(help="One-time enrollment token from the admin.", envvar="BACKHAUL_TOKEN"),
    ],
    config_dir: ConfigDir,
    ca_file: Annotated[
        Path | None, typer.Option(help="PEM file of the CA that signed the relay certificate.")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(help="URL prefix this agent may call (repeat for more).", metavar="URL"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Member name (default: host name).")] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="Allow http:// for a relay on loopback (development).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing enrollment in this directory.")
    ] = False,
    join: Annotated[
        bool,
        typer.Option(
            "--join", help="Join a gateway that already has members (needs --recovery-key)."
        ),
    ] = False,
    recovery_key: Annotated[
        str | None,
        typer.Option(
            help="The gateway's recovery key (bhrk_...). First member: one is generated and "
            "printed once when omitted.",
            envvar="BACKHAUL_RECOVERY_KEY",
            show_envvar=True,
        ),
    ] = None,
    target_ca_file: Annotated[
        Path | None,
        typer.Option(
            help="PEM file of the internal CA that HTTPS targets are checked against; copied "
            "next to agent.toml and set as [upstream] ca_file.",
            metavar="PEM",
        ),
    ] = None,
) -> None:
    """Enroll this machine as a gateway member with a one-time token."""
    with _errors():
        result = do_enroll(
            relay,
            token,
            config_dir,
            ca_file=ca_file,
            allow=allow or [],
            name=name,
            dev=dev,
            force=force,
            join=join,
            recovery_key=recovery_key,
            target_ca_file=target_ca_file,
        )
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"{'Joined' if result.joined else 'Enrolled'} member [bold]{result.member_id}[/bold] "
        f"in gateway [bold]{result.gateway_name}[/bold] ({result.gateway_id}), "
        f"gateway key version {result.key_version}."
    )
    if result.recovery_key is not None:
        # Plain print: no markup, no wrapping, nothing that could mangle the key.
        print(
            f"\nRecovery key for gateway {result.gateway_name} ({result.gateway_id}):\n\n"
            f"    {result.recovery_key}\n\n"
            "Store this safely; it is never shown again. It is needed to add members\n"
            "(backhaul-agent enroll --join --recovery-key ...) and to rotate the gateway key\n"
            "(backhaul gateways rotate-key ...). The relay cannot recover it.\n",
            flush=True,
        )
    console.print(f"Configuration: {result.config_file}")
    if result.pinned_fingerprint:
        console.print(f"Relay certificate pinned: {result.pinned_fingerprint}")
    if not allow:
        console.print("No --allow given: add [[allow]] entries to agent.toml before use.")
    console.print(f"Next: backhaul-agent run --config-dir {result.config_file.parent}")


@app.command()
def run(config_dir: ConfigDir) -> None:
    """Run the agent in the foreground (what the service manager starts)."""
    from backhaul.logging import configure

    with _errors():
        config = load_config(config_dir)
        configure(
            config.log.format,
            config.log.level,
            file=config.log.file,
            max_bytes=config.log.max_file_mb * 1024 * 1024,
            max_age_days=config.log.max_age_days,
        )
        try:
            service = importlib.import_module("agent.service")
        except ImportError as exc:
            _fail(f"this build has no agent service: {exc}")
        runner: Callable[[Any], Any] = service.run
        try:
            _fast_event_loop()
            asyncio.run(runner(config))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def _fast_event_loop() -> None:
    """Use libuv's event loop where it exists: the tunnel's hot path is the event loop."""
    try:
        import uvloop
    except ImportError:  # Windows, or a minimal install
        return
    uvloop.install()


def _table(doc: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    connected = doc.get("connected")
    table.add_row("state", "[green]connected[/green]" if connected else "[red]disconnected[/red]")
    rows = [
        ("relay", doc.get("relay")),
        ("session", doc.get("session_id")),
        ("member", doc.get("member_id")),
        ("gateway", doc.get("gateway_id")),
        ("rtt", None if doc.get("rtt_ms") is None else f"{doc['rtt_ms']:.1f} ms"),
        ("connected since", doc.get("connected_since")),
        ("uptime", _duration(doc.get("uptime_seconds"))),
        ("tunnels", doc.get("tunnels")),
        ("in flight", doc.get("inflight")),
        ("requests", f"{doc.get('total', 0)} total, {doc.get('failed', 0)} failed"),
        ("reconnects", doc.get("reconnects")),
        ("last error", doc.get("last_error")),
        ("version", doc.get("version")),
    ]
    for label, value in rows:
        table.add_row(label, "-" if value is None else str(value))
    return table


def _duration(seconds: object) -> str | None:
    if not isinstance(seconds, int | float):
        return None
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


@app.command()
def status(
    config_dir: ConfigDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status document.")] = False,
) -> None:
    """Show whether the local agent is connected, and its counters."""
    from agent.status import fetch_status

    with _errors():
        config = load_config(config_dir)
    try:
        doc = asyncio.run(fetch_status(config))
    except AgentNotRunning as exc:
        if as_json:
            print(json.dumps({"connected": False, "running": False, "error": str(exc)}))
            raise typer.Exit(1) from None
        _fail(str(exc))
    except BackhaulError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({"running": True, **doc}, indent=2))
        return
    Console(highlight=False).print(_table(doc))


@app.command()
def diagnose(
    config_dir: ConfigDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    relay: Annotated[
        str | None, typer.Option(help="Test this relay URL instead of the preferred one.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds each step may take.")] = 10.0,
) -> None:
    """Test the way to the relay step by step, then every allowed target (exit 1 on failure).

    DNS, TCP, proxy CONNECT, TLS (chain, name, expiry, pin), WebSocket upgrade, the member's
    handshake and PING/PONG round trips; each step passes or says why and what to change.
    """
    from agent.diagnose import diagnose as run_diagnose
    from agent.diagnose import failed_config

    try:
        config = load_config(config_dir)
    except BackhaulError as exc:
        report = failed_config(str(exc))
    else:
        report = asyncio.run(run_diagnose(config, relay=relay, limit_seconds=timeout))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        console = Console(highlight=False, soft_wrap=True)
        for step in report.steps:
            mark = "[green]ok  [/green]" if step.ok else "[red]FAIL[/red]"
            if step.skipped:
                mark = "[yellow]skip[/yellow]"
            console.print(f"{mark} [bold]{step.name}[/bold]: {escape(step.detail)}")
            if step.hint:
                console.print(f"       hint: {escape(step.hint)}")
        console.print("[green]all steps passed[/green]" if report.ok else "[red]failed[/red]")
    raise typer.Exit(0 if report.ok else 1)


@app.command("install-service")
def install_service(
    config_dir: Annotated[
        str | None,
        typer.Option(
            "--config-dir",
            "-c",
            help="The enrolled directory the service runs with (Linux: /var/lib/backhaul, "
            "Windows: C:\\ProgramData\\Backhaul).",
        ),
    ] = None,
    user: Annotated[str, typer.Option(help="Service account (Linux).")] = "backhaul",
    executable: Annotated[
        str | None, typer.Option(help="backhaul-agent path in the unit (default: this one).")
    ] = None,
    root: Annotated[
        Path | None, typer.Option(help="Install into this file system tree instead of /.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would change; change nothing.")
    ] = False,
    enable: Annotated[bool, typer.Option(help="Enable the unit at boot.")] = True,
    start: Annotated[bool, typer.Option(help="Start it now (where systemd runs).")] = True,
) -> None:
    """Install the agent as a system service (systemd unit, or a Windows service)."""
    console = Console(highlight=False, soft_wrap=True)
    with _errors():
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows
            from agent import winservice

            for line in winservice.install(config_dir or winservice.DEFAULT_CONFIG_DIR):
                console.print(escape(line))
            return
        from agent import install

        plan = install.install_plan(
            config_dir=config_dir or str(install.DEFAULT_CONFIG_DIR),
            user=user,
            executable=executable,
            root=root,
            enable=enable,
            start=start,
        )
        _carry_out(console, plan, dry_run)


@app.command("uninstall-service")
def uninstall_service(
    root: Annotated[
        Path | None, typer.Option(help="Uninstall from this file system tree instead of /.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would change; change nothing.")
    ] = False,
    purge: Annotated[
        bool, typer.Option("--purge", help="Also remove the enrollment, logs and account.")
    ] = False,
) -> None:
    """Stop and remove the agent's system service (the enrollment is kept unless --purge)."""
    console = Console(highlight=False, soft_wrap=True)
    with _errors():
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows
            from agent import winservice

            for line in winservice.uninstall():
                console.print(escape(line))
            return
        from agent import install

        _carry_out(console, install.uninstall_plan(root=root, purge=purge), dry_run)


def _carry_out(console: Console, plan: Any, dry_run: bool) -> None:
    from agent import install

    for line in plan.describe():
        console.print(("would " if dry_run else "") + escape(line))
    if not dry_run:
        install.apply(plan)
    for note in plan.notes:
        console.print(f"note: {escape(note)}")


logs_app = typer.Typer(help="The agent's logs.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")


@logs_app.command("export")
def logs_export(
    config_dir: ConfigDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="The zip file to write.")],
    max_log_mb: Annotated[int, typer.Option(help="Most log megabytes to include.")] = 50,
    with_diagnose: Annotated[
        bool, typer.Option("--diagnose", help="Also run the network test and include it.")
    ] = False,
) -> None:
    """Write a redacted support bundle: logs, masked config, status, versions (never keys)."""
    from agent.support import export

    with _errors():
        config = load_config(config_dir)
        names = export(config, output, max_log_mb=max_log_mb, with_diagnose=with_diagnose)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"wrote {escape(str(output))}: {', '.join(names)}")


@app.command()
def version() -> None:
    """Print the agent version."""
    print(__version__)


def main() -> None:
    app(prog_name="backhaul-agent")


if __name__ == "__main__":  # pragma: no cover
    main()
