"""``backhaul``: the admin CLI against a relay's HTTP API.

Every failure ends in one line on stderr and exit code 1: an operator who typed the wrong URL,
token or CA file needs the reason, not a traceback.
"""

from __future__ import annotations

import json
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlencode

import httpx
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="backhaul",
    help="Administer a Backhaul relay: gateways, members, connectors, connections.",
    no_args_is_help=True,
    add_completion=False,
)
gateways_app = typer.Typer(help="Gateways and their enrollment tokens.", no_args_is_help=True)
connectors_app = typer.Typer(
    help="Connectors (APIs behind a gateway or called online).", no_args_is_help=True
)
connections_app = typer.Typer(help="Connections (a connector plus credentials).")
app.add_typer(gateways_app, name="gateways")
app.add_typer(connectors_app, name="connectors")
app.add_typer(connections_app, name="connections")

TIMEOUT = httpx.Timeout(15.0, connect=10.0)


@dataclass(frozen=True)
class Target:
    relay: str
    token: str | None
    ca_file: Path | None


def _die(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.callback()
def _global(
    ctx: typer.Context,
    relay: Annotated[
        str, typer.Option("--relay", envvar="BACKHAUL_RELAY", help="relay URL, https://...")
    ] = "https://127.0.0.1:8443",
    token: Annotated[
        str | None, typer.Option("--token", envvar="BACKHAUL_TOKEN", help="API token (bh_...)")
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option("--ca-file", envvar="BACKHAUL_CA_FILE", help="PEM CA to trust the relay"),
    ] = None,
) -> None:
    ctx.obj = Target(relay.rstrip("/"), token, ca_file)


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        _die(f"cannot load CA file {ca_file}: {exc}")


def _client(target: Target) -> httpx.Client:
    if not target.token:
        _die("no API token: pass --token or set BACKHAUL_TOKEN")
    if not target.relay.startswith("https://"):
        _die(f"relay URL must start with https:// (got {target.relay})")
    return httpx.Client(
        base_url=target.relay,
        headers={"Authorization": f"Bearer {target.token}"},
        verify=_ssl_context(target.ca_file),
        timeout=TIMEOUT,
    )


def _problem_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return f"{body.get('title', response.reason_phrase)}: {body['detail']}"
    return response.reason_phrase


def _call(
    target: Target, method: str, path: str, body: Any = None, timeout: float | None = None
) -> Any:
    """One API call; every transport or HTTP failure becomes a one-line error."""
    try:
        with _client(target) as client:
            response = client.request(
                method,
                path,
                json=body,
                timeout=TIMEOUT if timeout is None else httpx.Timeout(timeout, connect=10.0),
            )
    except httpx.ConnectError as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE" in str(exc):
            _die(
                f"certificate problem talking to {target.relay}: {exc} "
                "(pass the relay's CA with --ca-file)"
            )
        _die(f"relay unreachable at {target.relay}: {exc}")
    except httpx.TimeoutException:
        _die(f"relay at {target.relay} did not answer in time")
    except httpx.HTTPError as exc:
        _die(f"request to {target.relay} failed: {exc}")
    if response.status_code == 401:
        _die(f"the relay refused the token (401): {_problem_text(response)}")
    if response.status_code >= 400:
        _die(f"{method} {path} failed ({response.status_code}) {_problem_text(response)}")
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Gateways, their members, online state, version, RTT and load."""
    target: Target = ctx.obj
    gateways = [
        _call(target, "GET", f"/v1/gateways/{g['id']}")
        for g in _call(target, "GET", "/v1/gateways")
    ]
    if as_json:
        _print_json({"relay": target.relay, "gateways": gateways})
        return
    # Not a terminal (a pipe, a log): no 80-column wrapping of ids and names.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(_status_table(target.relay, gateways))


_COLUMNS = (
    "gateway",
    "member",
    "state",
    "version",
    "RTT ms",
    "in-flight",
    "total",
    "CPU %",
    "mem %",
    "relay instance",
)
_NUMERIC = {"RTT ms", "in-flight", "total", "CPU %", "mem %"}


def _gateway_label(gateway: dict[str, Any]) -> str:
    policy = gateway.get("load_balancing", "least-inflight")
    limits = [
        f"{name} ≤ {gateway[key]:g}%"
        for name, key in (("cpu", "cpu_threshold"), ("mem", "memory_threshold"))
        if gateway.get(key) is not None
    ]
    return f"{gateway['name']} ({gateway['id']})\n{policy}" + (
        f"\n{', '.join(limits)}" if limits else ""
    )


def _member_state(member: dict[str, Any]) -> str:
    if member["revoked"]:
        return "[yellow]revoked[/]"
    if not member["online"]:
        return "[red]offline[/]"
    if member.get("disabled"):
        return "[yellow]disabled[/]"
    if member.get("draining"):
        return "[yellow]draining[/]"
    return "[green]online[/]"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def _status_table(relay: str, gateways: list[dict[str, Any]]) -> Table:
    """Each cluster with its policy and thresholds, then one row per member."""
    table = Table(title=f"Backhaul relay {relay}")
    for column in _COLUMNS:
        table.add_column(column, justify="right" if column in _NUMERIC else "left")
    for gateway in gateways:
        label = _gateway_label(gateway)
        if not gateway["members"]:
            table.add_row(label, "-", "no members", *[""] * (len(_COLUMNS) - 3))
        for member in gateway["members"]:
            rtt = member["rtt_ms"]
            table.add_row(
                label,
                f"{member['name']} ({member['hostname']})",
                _member_state(member),
                member["version"],
                "-" if rtt is None else f"{rtt:.1f}",
                str(member["inflight"]),
                str(member["total"]),
                _pct(member.get("cpu")),
                _pct(member.get("memory")),
                member.get("instance") or "-",
            )
            label = ""
    return table


@gateways_app.command("create")
def gateways_create(ctx: typer.Context, name: str) -> None:
    """Create a gateway and print its one-time enrollment token."""
    _print_json(_call(ctx.obj, "POST", "/v1/gateways", {"name": name}))


@gateways_app.command("enrollment-token")
def gateways_enrollment_token(ctx: typer.Context, gateway_id: str) -> None:
    """Mint a new enrollment token for a further member."""
    _print_json(_call(ctx.obj, "POST", f"/v1/gateways/{gateway_id}/enrollment-tokens"))


@gateways_app.command("revoke-member")
def gateways_revoke_member(ctx: typer.Context, gateway_id: str, member_id: str) -> None:
    """Revoke a member: its tunnel is closed and it can never reconnect."""
    _call(ctx.obj, "DELETE", f"/v1/gateways/{gateway_id}/members/{member_id}")
    typer.echo(f"member {member_id} revoked", err=True)


@gateways_app.command("rotate-key")
def gateways_rotate_key(
    ctx: typer.Context,
    gateway_id: str,
    recovery_key: Annotated[
        str,
        typer.Option(
            "--recovery-key",
            envvar="BACKHAUL_RECOVERY_KEY",
            prompt="Recovery key",
            hide_input=True,
            help="The gateway's recovery key (bhrk_...); prompted for when not given.",
        ),
    ],
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for the members to re-seal everything")
    ] = 600.0,
) -> None:
    """Give the gateway a new key pair and re-seal every connection to it.

    The current key is unwrapped here with the recovery key; the relay never sees either.
    """
    from backhaul import recovery
    from backhaul.errors import SealError
    from backhaul.rotation import rotation_request

    try:
        secret = recovery.parse(recovery_key)
    except recovery.RecoveryKeyError as exc:
        _die(f"--recovery-key: {exc}")
    doc = _call(ctx.obj, "GET", f"/v1/gateways/{gateway_id}/key")
    try:
        body = rotation_request(doc, secret)
    except recovery.RecoveryKeyError as exc:
        _die(f"{exc} for gateway {gateway_id}; nothing was changed")
    except (SealError, KeyError, TypeError, ValueError) as exc:
        _die(f"cannot rotate gateway {gateway_id}: {exc}")
    del secret
    typer.echo(f"rotating gateway {gateway_id} to key version {body['key_version']}...", err=True)
    result = _call(
        ctx.obj, "POST", f"/v1/gateways/{gateway_id}/key-rotation", body, timeout=timeout
    )
    _print_json(result)
    if result.get("phase") == "complete":
        typer.echo(
            f"gateway {gateway_id} now uses key version {result['gateway_key_version']}; "
            f"{result.get('resealed', 0)} connection(s) re-sealed",
            err=True,
        )
    else:
        typer.echo(
            f"rotation recorded; it finishes when a member is online "
            f"({result.get('waiting_for') or 'waiting'})",
            err=True,
        )


member_app = typer.Typer(help="One member of a gateway.", no_args_is_help=True)
gateways_app.add_typer(member_app, name="member")


@member_app.command("disable")
def member_disable(ctx: typer.Context, gateway_id: str, member_id: str) -> None:
    """Stop routing requests to a member (maintenance); its tunnel stays connected."""
    _call(ctx.obj, "POST", f"/v1/gateways/{gateway_id}/members/{member_id}/disable")
    typer.echo(f"member {member_id} disabled", err=True)


@member_app.command("enable")
def member_enable(ctx: typer.Context, gateway_id: str, member_id: str) -> None:
    """Route requests to a member again."""
    _call(ctx.obj, "POST", f"/v1/gateways/{gateway_id}/members/{member_id}/enable")
    typer.echo(f"member {member_id} enabled", err=True)


@gateways_app.command("set")
def gateways_set(
    ctx: typer.Context,
    gateway_id: str,
    load_balancing: Annotated[
        str | None,
        typer.Option(help="least-inflight | round-robin | random | primary-failover"),
    ] = None,
    cpu_threshold: Annotated[
        float | None, typer.Option(help="skip members above this CPU %")
    ] = None,
    memory_threshold: Annotated[
        float | None, typer.Option(help="skip members above this memory %")
    ] = None,
) -> None:
    """Change a gateway's load balancing and thresholds."""
    body = {
        key: value
        for key, value in (
            ("load_balancing", load_balancing),
            ("cpu_threshold", cpu_threshold),
            ("memory_threshold", memory_threshold),
        )
        if value is not None
    }
    _print_json(_call(ctx.obj, "PATCH", f"/v1/gateways/{gateway_id}", body))


@connectors_app.command("create")
def connectors_create(
    ctx: typer.Context,
    name: str,
    base_url: Annotated[str, typer.Option("--base-url")],
    gateway_id: Annotated[str, typer.Option("--gateway")],
    auth_type: Annotated[str, typer.Option("--auth", help="none | basic | api_key")] = "none",
    api_key_name: Annotated[str | None, typer.Option("--api-key-name")] = None,
    api_key_in: Annotated[str | None, typer.Option("--api-key-in", help="header | query")] = None,
) -> None:
    """Create a connector for an API behind a gateway."""
    body: dict[str, Any] = {
        "name": name,
        "base_url": base_url,
        "auth_type": auth_type,
        "gateway_id": gateway_id,
    }
    if api_key_name is not None:
        body["api_key_name"] = api_key_name
    if api_key_in is not None:
        body["api_key_in"] = api_key_in
    _print_json(_call(ctx.obj, "POST", "/v1/connectors", body))


#: Files ``connectors import`` reads from a custom connector's folder (names as the Power
#: Platform's tools write them; matched without regard to case).
SWAGGER_FILE = "apidefinition.swagger.json"
PROPERTIES_FILE = "apiproperties.json"
SCRIPT_FILE = "script.csx"
OPENAPI_FILES = ("openapi.json", "openapi3.json")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        _die(f"{path} is not UTF-8 text")


def _definition_files(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        _die(f"{directory} is not a directory")
    found = {p.name.lower(): p for p in directory.iterdir() if p.is_file()}
    if SWAGGER_FILE not in found:
        swagger = [p for name, p in found.items() if name.endswith(".swagger.json")]
        if len(swagger) == 1:
            found[SWAGGER_FILE] = swagger[0]
    return found


@connectors_app.command("import")
def connectors_import(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            help="folder with apiDefinition.swagger.json + apiProperties.json (+ script.csx), "
            "or openapi.json"
        ),
    ],
    gateway_id: Annotated[
        str | None, typer.Option("--gateway", help="route through this gateway")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="instead of info.title")] = None,
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="OAuth client id, when the files lack it")
    ] = None,
    client_secret_stdin: Annotated[
        bool, typer.Option("--client-secret-stdin", help="read the OAuth client secret from stdin")
    ] = False,
) -> None:
    """Import a custom connector definition; warnings go to stderr, the result to stdout."""
    files = _definition_files(directory)
    body: dict[str, Any] = {}
    if SWAGGER_FILE in files:
        body["swagger"] = _read_text(files[SWAGGER_FILE])
        if PROPERTIES_FILE in files:
            body["api_properties"] = _read_text(files[PROPERTIES_FILE])
        if SCRIPT_FILE in files:
            body["script"] = _read_text(files[SCRIPT_FILE])
    else:
        openapi = next((files[n] for n in OPENAPI_FILES if n in files), None)
        if openapi is None:
            _die(f"{directory} has neither apiDefinition.swagger.json nor openapi.json")
        body["openapi"] = _read_text(openapi)
    if gateway_id is not None:
        body["gateway_id"] = gateway_id
    if name is not None:
        body["name"] = name
    oauth: dict[str, str] = {}
    if client_id is not None:
        oauth["client_id"] = client_id
    if client_secret_stdin:
        oauth["client_secret"] = sys.stdin.readline().rstrip("\r\n")
    if oauth:
        body["oauth"] = oauth
    result = _call(ctx.obj, "POST", "/v1/connectors/import", body)
    for warning in result.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)
    _print_json(result)


@connectors_app.command("share")
def connectors_share(
    ctx: typer.Context,
    connector_id: str,
    user_id: str,
    role: Annotated[
        str, typer.Option("--role", help="can_use | can_use_and_share | can_edit")
    ] = "can_use",
) -> None:
    """Share a connector: the user makes their own connections with their own credentials."""
    body = {"user_id": user_id, "role": role}
    _print_json(_call(ctx.obj, "POST", f"/v1/connectors/{connector_id}/shares", body))


@app.command()
def audit(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    action: Annotated[
        str | None, typer.Option("--action", help="invoke, connection.share, connector.share, ...")
    ] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="a user id")] = None,
    object_id: Annotated[
        str | None, typer.Option("--object", help="a connection or connector id")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The audit log (admins): shares, unshares, consents and invokes, newest first."""
    query = {"limit": limit, "action": action, "actor_id": actor, "object_id": object_id}
    params = urlencode({k: v for k, v in query.items() if v is not None})
    events = _call(ctx.obj, "GET", f"/v1/audit?{params}")
    if as_json:
        _print_json(events)
        return
    table = Table(title=f"Audit log of {ctx.obj.relay}")
    for column in (
        "when (UTC)",
        "who",
        "action",
        "object",
        "subject",
        "result",
        "status",
        "bytes in/out",
    ):
        table.add_column(column)
    for event in events:
        moved = f"{event['bytes_in'] if event['bytes_in'] is not None else '-'}/"
        moved += f"{event['bytes_out'] if event['bytes_out'] is not None else '-'}"
        table.add_row(
            str(event["at"])[:19].replace("T", " "),
            event["actor_id"],
            event["action"],
            event["object_id"],
            event["subject_id"] or "",
            event["result"],
            "" if event["status"] is None else str(event["status"]),
            moved,
        )
    Console(width=200).print(table)


@connections_app.command("create")
def connections_create(
    ctx: typer.Context,
    connector_id: str,
    name: Annotated[str | None, typer.Option("--name")] = None,
    username: Annotated[str | None, typer.Option("--username")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password or API key from stdin")
    ] = False,
) -> None:
    """Create a connection; secrets are read from stdin so they stay out of shell history."""
    credentials: dict[str, str] = {}
    secret = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    if username is not None:
        credentials["username"] = username
        if secret is None:
            _die("--username needs --password-stdin")
        credentials["password"] = secret
    elif secret is not None:
        credentials["api_key"] = secret
    body: dict[str, Any] = {"connector_id": connector_id, "credentials": credentials}
    if name is not None:
        body["name"] = name
    _print_json(_call(ctx.obj, "POST", "/v1/connections", body))


def main() -> None:
    app()
