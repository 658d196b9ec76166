"""The agent's configuration: one typed object, loaded from ``<config-dir>/agent.toml``.

Every key can be overridden from the environment as ``BACKHAUL_AGENT_<KEY>``; a double
underscore walks into a table (``BACKHAUL_AGENT_STATUS__LISTEN=127.0.0.1:9464``,
``BACKHAUL_AGENT_TUNNEL__MAX_CONCURRENT_STREAMS=64``). A value that starts with ``[`` or ``{``
is read as JSON, which is how a container sets the allow-list
(``BACKHAUL_AGENT_ALLOW='[{"prefix": "https://api.internal/v1/"}]'``).

The whole document is validated at start, before any connection is made, and a mistake is
reported as :class:`~backhaul.errors.ConfigError` naming the key (``tunnel.ping_timeout_seconds``)
and where it came from, so an operator never debugs a half-started service. Relative paths are
resolved against the config directory, so the directory can be moved as a whole.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.policy import AllowEntry
from backhaul.errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "ENV_PREFIX",
    "AgentConfig",
    "KerberosConfig",
    "LogConfig",
    "ProxyConfig",
    "StatusConfig",
    "TunnelConfig",
    "UpstreamConfig",
    "config_from_dict",
    "is_loopback",
    "load_config",
    "save_config",
    "to_document",
]

CONFIG_FILE = "agent.toml"
ENV_PREFIX = "BACKHAUL_AGENT_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TunnelConfig(_Section):
    """Keep-alive, reconnect and concurrency of the tunnel to the relay."""

    ping_interval_seconds: float = Field(default=15.0, gt=0)
    ping_timeout_seconds: float = Field(default=30.0, gt=0)
    backoff_initial_seconds: float = Field(default=0.5, gt=0)
    backoff_max_seconds: float = Field(default=30.0, gt=0)
    max_concurrent_streams: int = Field(default=256, ge=1, le=65535)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    load_report_seconds: float = Field(default=5.0, gt=0)
    #: Hold a tunnel to each worker process of a relay that runs several (agent.spread), so
    #: that no request has to be forwarded between them. False: one tunnel only.
    per_worker: bool = True
    #: The source address of the tunnel's connection (to the relay, or to the proxy when one
    #: is used), for a multi-homed server whose firewall lets only one interface out. None:
    #: the system's choice.
    local_address: str | None = None

    @field_validator("local_address")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds: must be >= backoff_initial_seconds")
        return self


class UpstreamConfig(_Section):
    """The HTTP client that calls internal APIs."""

    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    default_timeout_seconds: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=100, ge=1)
    verify: bool = True
    ca_file: Path | None = None


class KerberosConfig(_Section):
    """Kerberos for ``windows`` connections on Linux (on Windows, SSPI needs none of it).

    Each key, when set, becomes the standard MIT variable for the agent process, so what an
    operator already knows from ``kinit`` applies; unset keys leave the environment alone.
    """

    #: ``KRB5_CONFIG``: the krb5.conf naming the realms and their KDCs.
    krb5_config: Path | None = None
    #: ``KRB5_CLIENT_KTNAME``: the keytab of the agent's own service identity.
    client_keytab: Path | None = None
    #: ``KRB5CCNAME``: the credential cache of the service identity (``MEMORY:...`` by default
    #: when ``client_keytab`` is set, so its tickets never land in a shared file).
    ccache: str | None = Field(default=None, min_length=1)
    #: Ask for forwardable tickets and delegate them to the API (unconstrained delegation).
    delegate: bool = False


class StatusConfig(_Section):
    """The local status endpoint read by ``backhaul-agent status`` and Prometheus."""

    socket: Path = Path("run/status.sock")
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            _split_listen(value)
        return value

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """``(host, port)`` for the TCP listener, or None when only the socket is served."""
        return None if self.listen is None else _split_listen(self.listen)


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9464")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError("host must be an IP address, e.g. 127.0.0.1:9464") from exc
    return host, int(port)


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: Also write JSON lines to this file, rotated by size and pruned by age.
    file: Path | None = None
    max_file_mb: int = Field(default=100, ge=1)
    max_age_days: int = Field(default=30, ge=1)

    @field_validator("format", "level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class ProxyConfig(_Section):
    """The HTTP proxy the tunnel goes through (CONNECT); see agent/proxy.py."""

    #: http://[user:password@]host:port; unset: HTTPS_PROXY from the environment, if any.
    url: str | None = None
    from_environment: bool = True
    #: Hosts, .domains, IPs, CIDRs or host:port reached directly; NO_PROXY is added to it.
    no_proxy: list[str] = Field(default_factory=list)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    auth: Literal["auto", "basic", "ntlm", "negotiate"] = "auto"
    connect_timeout_seconds: float = Field(default=15.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            from agent.proxy import parse_proxy_url

            parse_proxy_url(value)
        return value

    @field_validator("auth", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (where plain http/ws is tolerated)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AgentConfig(BaseModel):
    """Everything ``backhaul-agent run`` needs; see config/agent.toml for each key's meaning."""

    model_config = ConfigDict(extra="forbid")

    relay_url: str
    #: More relay instances, in order of preference; the agent fails over between them.
    relay_urls: list[str] = Field(default_factory=list)
    member_id: str = Field(min_length=1)
    gateway_id: str = Field(min_length=1)
    name: str = Field(default_factory=socket.gethostname, min_length=1)
    ca_file: Path | None = None
    pinned_fingerprint: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    dev: bool = False
    signing_key_file: Path = Path("keys/member.key")
    gateway_key_file: Path = Path("keys/gateway.key")
    tunnel: TunnelConfig = Field(default_factory=TunnelConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    kerberos: KerberosConfig = Field(default_factory=KerberosConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    allow: list[AllowEntry] = Field(default_factory=list)
    #: Where agent.toml lives; not a key in the file. Relative paths resolve against it.
    config_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("relay_url")
    @classmethod
    def _check_relay_url(cls, value: str) -> str:
        return _relay_url(value)

    @field_validator("relay_urls")
    @classmethod
    def _check_relay_urls(cls, value: list[str]) -> list[str]:
        return [_relay_url(url) for url in value]

    @model_validator(mode="after")
    def _finish(self) -> Self:
        for url in self.relays:
            host = urlsplit(url).hostname or ""
            if url.startswith("http://") and not (self.dev and is_loopback(host)):
                raise ValueError(
                    "relay_url: http:// is allowed only with dev = true and a loopback relay host"
                )
        base = self.config_dir.expanduser().absolute()
        self.config_dir = base
        self.ca_file = _resolve(base, self.ca_file)
        self.signing_key_file = _resolve_path(base, self.signing_key_file)
        self.gateway_key_file = _resolve_path(base, self.gateway_key_file)
        self.upstream.ca_file = _resolve(base, self.upstream.ca_file)
        self.kerberos.krb5_config = _resolve(base, self.kerberos.krb5_config)
        self.kerberos.client_keytab = _resolve(base, self.kerberos.client_keytab)
        self.status.socket = _resolve_path(base, self.status.socket)
        self.log.file = _resolve(base, self.log.file)
        return self

    @property
    def relays(self) -> list[str]:
        """Every relay URL in order of preference: ``relay_urls`` if set, else ``relay_url``."""
        urls = list(self.relay_urls) or [self.relay_url]
        return list(dict.fromkeys(urls))

    @property
    def tunnel_url(self) -> str:
        """``wss://<relay>/v1/tunnel`` (``ws://`` for a dev relay on loopback)."""
        return tunnel_url(self.relay_url)

    @property
    def config_file(self) -> Path:
        return self.config_dir / CONFIG_FILE


def tunnel_url(relay_url: str) -> str:
    scheme = "ws" if relay_url.startswith("http://") else "wss"
    return scheme + relay_url[relay_url.index("://") :] + "/v1/tunnel"


def _relay_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL, e.g. https://relay.example.com")
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError("must not contain userinfo, a query or a fragment")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    return urlunsplit((parts.scheme, parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def _resolve_path(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _resolve(base: Path, path: Path | None) -> Path | None:
    return None if path is None else _resolve_path(base, path)


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or len(var) == len(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in var[len(ENV_PREFIX) :].split("__"))
        value: Any = raw
        if raw.lstrip().startswith(("[", "{")):
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"{var}: not valid JSON ({exc.args[0]})") from None
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{var}: {part} is not a table")
            node = child
        node[path[-1]] = value
        sources[path] = var
    return data, sources


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(exc: ValidationError, origin: str, sources: dict[tuple[str, ...], str]) -> str:
    lines = []
    for err in exc.errors():
        key = ""
        for part in err["loc"]:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        message = err["msg"].removeprefix("Value error, ")
        head, sep, rest = message.partition(": ")
        if sep and head.isidentifier():
            # A cross-field check names its key at the start of the message.
            key, message = (f"{key}.{head}" if key else head), rest
        loc = tuple(key.replace("[", ".[").split("."))
        where = origin
        for path, var in sources.items():
            if loc[: len(path)] == path or path[: len(loc)] == loc:
                where = f"environment variable {var}"
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        lines.append(f"{key or '(top level)'}: {message} (in {where})")
    return "invalid agent configuration: " + "; ".join(lines)


def config_from_dict(
    data: Mapping[str, Any], config_dir: Path | str, origin: str = "agent.toml"
) -> AgentConfig:
    """Validate a parsed document; raise ConfigError naming the first bad keys."""
    return _validate(dict(data), Path(config_dir), origin, {})


def _validate(
    data: dict[str, Any], config_dir: Path, origin: str, sources: dict[tuple[str, ...], str]
) -> AgentConfig:
    if "config_dir" in data:
        raise ConfigError("config_dir: unknown key (the directory is given on the command line)")
    try:
        return AgentConfig.model_validate({**data, "config_dir": config_dir})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin, sources)) from None


def load_config(config_dir: Path | str, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load ``<config_dir>/agent.toml`` with ``BACKHAUL_AGENT_*`` overrides from ``environ``."""
    directory = Path(config_dir).expanduser().absolute()
    path = directory / CONFIG_FILE
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"no {CONFIG_FILE} in {directory}; enroll first: "
            f"backhaul-agent enroll --config-dir {directory} ..."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    overrides, sources = _env_overrides(os.environ if environ is None else environ)
    return _validate(_merge(data, overrides), directory, str(path), sources)


def _relative(base: Path, path: Path | None) -> Path | None:
    if path is None:
        return None
    try:
        return path.relative_to(base)
    except ValueError:
        return path


def to_document(cfg: AgentConfig, *, full: bool = False) -> dict[str, Any]:
    """The TOML document for ``cfg``: key and socket paths written relative to the config dir.

    ``ca_file`` stays absolute, as enrollment records it.
    Keys at their default value are left out unless ``full``, so the file stays short and a
    later release can change a default.
    """
    base = cfg.config_dir
    relative = cfg.model_copy(
        update={
            "signing_key_file": _relative(base, cfg.signing_key_file),
            "gateway_key_file": _relative(base, cfg.gateway_key_file),
            "upstream": cfg.upstream.model_copy(
                update={"ca_file": _relative(base, cfg.upstream.ca_file)}
            ),
            "status": cfg.status.model_copy(update={"socket": _relative(base, cfg.status.socket)}),
        }
    )
    doc = relative.model_dump(mode="json", exclude_none=True, exclude_defaults=not full)
    for required in ("relay_url", "member_id", "gateway_id", "name"):
        doc[required] = getattr(cfg, required)
    if cfg.allow:
        doc["allow"] = [e.model_dump(mode="json", exclude_none=True) for e in cfg.allow]
    return doc


def save_config(path: Path, cfg: AgentConfig) -> None:
    """Write ``cfg`` as TOML to ``path`` (mode 0600: it names the keys and the pin)."""
    doc = to_document(cfg)
    ordered = {k: doc.pop(k) for k in list(doc) if not isinstance(doc[k], dict | list)}
    ordered.update({k: v for k, v in doc.items() if isinstance(v, dict)})
    if "allow" in doc:
        ordered["allow"] = doc["allow"]
    text = "# Written by backhaul-agent enroll. Every key is described in config/agent.toml.\n"
    text += tomli_w.dumps(ordered)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
