"""The relay's one configuration object.

Layers, later wins: built-in defaults, the TOML file (``--config``), environment variables
``BACKHAUL_RELAY_<KEY>`` (upper case), then command-line flags. Everything is validated at
start so a typo fails the process with the key's name instead of a surprise at the first
request. ``config/relay.toml`` documents every key.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from backhaul.errors import ConfigError

ENV_PREFIX = "BACKHAUL_RELAY_"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "backhaul-relay"


def ensure_data_dir(path: Path) -> Path:
    """Create the data directory private to the relay's user: it holds the database."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8443 or [::1]:8443")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError("port must be between 1 and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def listen_url(scheme: str, listen: str) -> str:
    """The URL of a ``HOST:PORT`` listen address (an IPv6 host in brackets)."""
    host, port = split_listen(listen)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class RelayConfig(BaseModel):
    """Validated relay settings; see config/relay.toml for why each one exists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = "127.0.0.1:8443"
    #: A second, plain-HTTP listener for callers on the relay's own machine (relay/listeners.py);
    #: loopback addresses only, so nothing in clear leaves the machine.
    local_listen: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    dev: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    database_url: str = ""
    public_url: str | None = None
    enrollment_ttl_seconds: int = Field(default=3600, gt=0)
    invoke_timeout_seconds: float = Field(default=30, gt=0)
    invoke_timeout_max_seconds: float = Field(default=300, gt=0)
    max_request_header_bytes: int = Field(default=32768, ge=1024)
    max_body_bytes: int = Field(default=0, ge=0)
    ping_interval_seconds: float = Field(default=15, gt=0)
    handshake_timeout_seconds: float = Field(default=10, gt=0)
    #: Edge limits (relay/limits.py): request heads, URLs, tunnel handshakes, rates.
    header_timeout_seconds: float = Field(default=10, gt=0)
    max_url_bytes: int = Field(default=8192, ge=256)
    max_pending_handshakes: int = Field(default=1024, ge=1)
    max_pending_handshakes_per_address: int = Field(default=64, ge=0)
    #: Addresses (or networks) of the reverse proxies in front of the relay whose
    #: X-Forwarded-For and X-Forwarded-Proto it believes; empty: none, the TCP peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Seconds of quiet after tunnel connects and disconnects before the relay returns freed
    #: heap memory to the system (relay/allocator.py); 0 turns it off.
    memory_trim_seconds: float = Field(default=2, ge=0)
    #: Audit events older than this many days are deleted (relay/audit_retention.py); 0
    #: keeps them all.
    audit_retention_days: float = Field(default=90, ge=0)
    rate_limit_per_token: float = Field(default=0, ge=0)
    rate_limit_per_token_burst: int = Field(default=0, ge=0)
    rate_limit_per_connection: float = Field(default=0, ge=0)
    rate_limit_per_connection_burst: int = Field(default=0, ge=0)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Encrypts what the relay itself must read back (OAuth tokens, online connections'
    #: credentials). Never stored in the database; set it here or in the environment.
    secret_key: SecretStr | None = Field(default=None, min_length=32)
    oauth_redirect_url: str | None = None
    oauth_state_ttl_seconds: int = Field(default=600, gt=0)
    oauth_refresh_margin_seconds: float = Field(default=300, ge=0)
    online_allow_private_networks: bool = False
    #: Scale-out: instances sharing one PostgreSQL find each other's tunnels through Redis.
    redis_url: str | None = None
    instance_id: str = ""
    advertise_url: str | None = None
    peer_ca_file: Path | None = None
    registry_ttl_seconds: float = Field(default=15, ge=3)
    #: Worker processes on this machine (relay/workers.py); 0 means one per usable CPU.
    workers: int = Field(default=1, ge=0)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("local_listen")
    @classmethod
    def _local_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _ = split_listen(value)
        if host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address") from None
            if not loopback:
                raise ValueError(
                    f"{host} is not a loopback address: the local listener speaks plain HTTP, "
                    "so it only listens where nothing leaves this machine (127.0.0.1, ::1)"
                )
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_list(cls, value: Any) -> Any:
        # BACKHAUL_RELAY_TRUSTED_PROXIES="10.0.0.1, 10.1.0.0/16"
        return (
            [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        )

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/") if value else None

    @field_validator("oauth_redirect_url")
    @classmethod
    def _redirect_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value

    @model_validator(mode="after")
    def _derived(self) -> RelayConfig:
        if not self.database_url:
            url = f"sqlite+aiosqlite:///{self.data_dir / 'relay.db'}"
            object.__setattr__(self, "database_url", url)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if not self.dev and self.tls_cert is None:
            raise ValueError("tls_cert and tls_key are required unless dev = true")
        if not self.instance_id:
            # The host name is the pod name on Kubernetes; the pid tells workers apart.
            object.__setattr__(self, "instance_id", f"{socket.gethostname()}-{os.getpid()}")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError("redis_url must be a redis:// or rediss:// URL")
        if self.local_listen is not None and split_listen(self.local_listen) == split_listen(
            self.listen
        ):
            raise ValueError("local_listen must differ from listen")
        if self.invoke_timeout_seconds > self.invoke_timeout_max_seconds:
            raise ValueError("invoke_timeout_seconds exceeds invoke_timeout_max_seconds")
        if self.workers != 1:
            self._check_workers()
        return self

    def _check_workers(self) -> None:
        """Workers are relay instances that find each other's tunnels through the registry.

        Checked whenever ``workers`` is not 1 (0 included), not only when it resolves to more
        than one process on this machine, so a file that starts on a laptop starts on a
        bigger server too.
        """
        if not self.redis_url:
            auto = " (workers = 0 is one per CPU)" if self.workers == 0 else ""
            raise ValueError(
                "workers > 1 needs redis_url: the worker processes find each other's agent "
                'tunnels through the Redis registry (e.g. redis_url = "redis://127.0.0.1:6379/0")'
                + auto
            )
        if self.advertise_url is not None:
            raise ValueError(
                "advertise_url cannot be set with workers > 1: each worker advertises its own "
                "listener on 127.0.0.1; across machines run one worker per relay instance"
            )

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def local_url(self) -> str | None:
        """Where callers on this machine reach the plain-HTTP listener, if there is one."""
        return None if self.local_listen is None else listen_url("http", self.local_listen)

    @property
    def worker_count(self) -> int:
        """``workers`` with 0 resolved to the CPUs this process may run on (its affinity,
        which a container's cpuset narrows; a CPU quota is not seen, so set it explicitly)."""
        if self.workers:
            return self.workers
        affinity = getattr(os, "sched_getaffinity", None)
        return len(affinity(0)) if affinity is not None else os.cpu_count() or 1

    @property
    def peer_url(self) -> str:
        """Where other relay instances reach this one (``advertise_url``, else base_url)."""
        return (self.advertise_url or self.base_url).rstrip("/")

    @property
    def base_url(self) -> str:
        """Where callers reach this relay: ``public_url``, else the listen address."""
        return self.public_url or listen_url("https", self.listen)


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    keys = RelayConfig.model_fields.keys()
    return {
        key: environ[ENV_PREFIX + key.upper()]
        for key in keys
        if ENV_PREFIX + key.upper() in environ
    }


def _describe(exc: ValidationError, sources: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(config)"
        where = sources.get(key, "")
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{key}{f' (from {where})' if where else ''}: {msg}")
    return "invalid relay configuration: " + "; ".join(lines)


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RelayConfig:
    """Merge defaults, TOML, environment and flags; raise ConfigError naming the bad key."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        doc = doc.get("relay", doc) if isinstance(doc.get("relay"), dict) else doc
        values.update(doc)
        sources.update({k: str(path) for k in doc})
    env = _from_env(os.environ if environ is None else environ)
    values.update(env)
    sources.update({k: ENV_PREFIX + k.upper() for k in env})
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(flags)
    sources.update({k: "command line" for k in flags})
    for key in values:
        if key not in RelayConfig.model_fields:
            where = sources.get(key, "")
            raise ConfigError(f"unknown relay configuration key {key!r} (from {where})")
    try:
        return RelayConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from exc
