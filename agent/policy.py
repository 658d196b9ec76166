"""The target allow-list: which internal URLs the agent may call. Deny by default.

Why here and not only on the relay: the relay is on the internet and may be compromised. The
agent re-checks every request against this list, so a hostile relay can at most call what the
operator allowed, with the credentials of connections that exist.

Entries (``[[allow]]`` in agent.toml)::

    { prefix = "https://api.internal:8443/v1/" }     scheme, host and port equal; path on a
                                                      segment boundary (/v1 never matches /v10)
    { host = "files.corp.example", ports = [443] }   any path; without ports only the scheme's
    { host = "*.corp.example" }                       default port; "*." matches subdomains only
    { cidr = "10.20.0.0/16", ports = [80, 443] }     IP literals in the range; a host name is
                                                      resolved at request time and every address
                                                      must fall inside an allowed range

URLs are normalized before matching (RFC 3986 §6.2.2): scheme and host lowercased, default port
made explicit, percent-encoded unreserved characters decoded. Anything a parser on the other
side could read differently is refused outright rather than normalized: userinfo (the
``http://allowed@evil/`` trick), backslashes, fragments, ``.``/``..`` segments (RFC 3986 §5.2.4
would rewrite the path after we checked it) including encoded ``%2e%2e`` and ``..;``, encoded
slashes and backslashes (``%2F``, ``%5C``), NUL, and numeric hosts that are not plain dotted
IPv4 (``http://2130706433/`` resolves to 127.0.0.1 in most resolvers).

DNS caveat: for a ``cidr`` entry the host name is resolved when the request is checked, and the
HTTP client resolves it again when it connects; a resolver that answers differently between the
two (DNS rebinding) can move the call. Prefer ``prefix``/``host`` entries for names you control,
and ``cidr`` entries for IP literals.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.errors import TargetDenied

__all__ = [
    "AllowEntry",
    "NormalizedURL",
    "Policy",
    "Resolver",
    "is_under",
    "normalize_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Resolves a host name to its addresses (strings); blocking, injectable for tests.
Resolver = Callable[[str, int], list[str]]

DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
_NUMERICISH_RE = re.compile(r"(0x[0-9a-f]*|[0-9]+)\Z")
#: Printable ASCII except space; RFC 3986 URIs are ASCII and never contain controls.
_URL_CHARS_RE = re.compile(r"[\x21-\x7e]+\Z")


class _Denied(Exception):
    """Internal: why a URL could not be normalized."""


@dataclass(frozen=True)
class NormalizedURL:
    """A target URL in the canonical form rules are matched against."""

    scheme: str
    host: str  # lowercase name, dotted IPv4, or IPv6 without brackets
    port: int
    path: str  # percent-decoded where unreserved, never empty
    query: str  # as given (not matched)

    @property
    def ip(self) -> IPAddress | None:
        try:
            return _unmap(ipaddress.ip_address(self.host))
        except ValueError:
            return None

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def display(self) -> str:
        """The URL without its query string: safe to put in logs and error messages."""
        return self.origin + self.path

    def geturl(self) -> str:
        return self.display() + (f"?{self.query}" if self.query else "")


def _unmap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    if char in _UNRESERVED:
        return char
    return "%" + match.group(1).upper()


def _normalize_host(raw: str) -> str:
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise _Denied("malformed IPv6 literal")
        try:
            return str(ipaddress.IPv6Address(raw[1:-1]))
        except ValueError as exc:
            # Zone identifiers (fe80::1%25eth0) land here too: they name a local interface.
            raise _Denied("malformed IPv6 literal") from exc
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise _Denied("no host")
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if _NUMERICISH_RE.match(host.rsplit(".", 1)[-1]):
        # 127.1, 0x7f.0.0.1, 2130706433, 010.0.0.1: resolvers read these as IPv4 addresses.
        raise _Denied("ambiguous numeric host")
    if not _HOST_RE.match(host):
        raise _Denied("invalid host name")
    return host


def _normalize_path(raw: str) -> str:
    if _BAD_PCT_RE.search(raw):
        raise _Denied("malformed percent-encoding")
    lowered = raw.lower()
    for encoded, what in (("%2f", "encoded slash"), ("%5c", "encoded backslash"), ("%00", "NUL")):
        if encoded in lowered:
            raise _Denied(f"{what} in path")
    path = _PCT_RE.sub(_decode_unreserved, raw) or "/"
    if not path.startswith("/"):
        raise _Denied("relative path")
    for segment in path.split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            raise _Denied("dot segment in path")
    return path


def normalize_url(url: str) -> NormalizedURL:
    """Normalize ``url`` per RFC 3986 §6.2.2, or raise TargetDenied for anything ambiguous.

    Accepted URLs are remembered (a pure function of the text; most requests repeat a few
    URLs and every one also repeats its connection's base URL); refusals are not.
    """
    found = _NORMALIZED.get(url) if isinstance(url, str) else None
    if found is not None:
        return found
    try:
        found = _normalize(url)
    except _Denied as exc:
        raise TargetDenied(f"target {_safe_display(url)} is not allowed: {exc}") from None
    if len(_NORMALIZED) >= _NORMALIZED_SIZE:
        _NORMALIZED.clear()
    _NORMALIZED[url] = found
    return found


_NORMALIZED: dict[str, NormalizedURL] = {}
_NORMALIZED_SIZE = 4096


def _normalize(url: str) -> NormalizedURL:
    if not isinstance(url, str) or not _URL_CHARS_RE.match(url):
        raise _Denied("URL must be printable ASCII without spaces")
    if "\\" in url:
        raise _Denied("backslash in URL")
    if "#" in url:
        raise _Denied("fragment in URL")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _Denied("malformed URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise _Denied("scheme must be http or https")
    if not url[len(parts.scheme) :].startswith("://"):
        raise _Denied("URL must be absolute (scheme://host/...)")
    netloc = parts.netloc
    if "@" in netloc:
        raise _Denied("userinfo in URL")
    if "%" in netloc:
        raise _Denied("percent-encoding in host")
    host_part, port_text = netloc, ""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise _Denied("malformed IPv6 literal")
        host_part, rest = netloc[: end + 1], netloc[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _Denied("malformed authority")
            port_text = rest[1:]
    elif ":" in netloc:
        host_part, port_text = netloc.rsplit(":", 1)
    host = _normalize_host(host_part)
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise _Denied("invalid port")
        port = int(port_text)
    elif ":" in netloc.rsplit("]", 1)[-1]:
        raise _Denied("empty port")
    else:
        port = DEFAULT_PORTS[scheme]
    if _BAD_PCT_RE.search(parts.query):
        raise _Denied("malformed percent-encoding in query")
    return NormalizedURL(scheme, host, port, _normalize_path(parts.path), parts.query)


def _safe_display(url: object) -> str:
    """Something to name a URL by in a message: no query, no userinfo, bounded length."""
    if not isinstance(url, str):
        return "<not a string>"
    text = url.split("?", 1)[0].split("#", 1)[0]
    if "@" in text:
        scheme, sep, rest = text.partition("://")
        text = scheme + sep + rest.rsplit("@", 1)[-1] if sep else "<URL with userinfo>"
    text = "".join(c if 0x21 <= ord(c) < 0x7F else "?" for c in text)
    return text if len(text) <= 200 else text[:200] + "..."


def _path_under(path: str, prefix_path: str) -> bool:
    """Segment-boundary prefix test: /v1 covers /v1 and /v1/x, never /v10."""
    base = prefix_path.rstrip("/")
    return path == base or path.startswith(base + "/")


def is_under(url: str | NormalizedURL, base_url: str | NormalizedURL) -> bool:
    """True when ``url`` has the origin of ``base_url`` and its path on a segment boundary."""
    target = url if isinstance(url, NormalizedURL) else normalize_url(url)
    base = base_url if isinstance(base_url, NormalizedURL) else normalize_url(base_url)
    return target.origin == base.origin and _path_under(target.path, base.path)


Port = Annotated[int, Field(ge=1, le=65535)]


class AllowEntry(BaseModel):
    """One ``[[allow]]`` entry: exactly one of ``prefix``, ``host`` or ``cidr``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str | None = None
    host: str | None = None
    cidr: str | None = None
    ports: tuple[Port, ...] | None = None

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            norm = _normalize(value)
        except _Denied as exc:
            raise ValueError(f"not a usable URL prefix: {exc}") from None
        if norm.query:
            raise ValueError("a URL prefix cannot have a query string")
        return norm.display()

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(_unmap(ipaddress.ip_address(value.strip("[]"))))
        except ValueError:
            pass
        wildcard = value.startswith("*.")
        try:
            host = _normalize_host(value[2:] if wildcard else value)
        except _Denied as exc:
            raise ValueError(
                f"not a host name or IP address ({exc}); use prefix for URLs"
            ) from None
        return "*." + host if wildcard else host

    @field_validator("cidr")
    @classmethod
    def _check_cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise ValueError(f"not a CIDR range: {exc}") from None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [k for k in ("prefix", "host", "cidr") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each allow entry needs exactly one of prefix, host or cidr")
        if self.prefix is not None and self.ports is not None:
            raise ValueError("ports does not apply to a prefix entry; put the port in the URL")
        return self

    def describe(self) -> str:
        what = self.prefix or self.host or self.cidr or "?"
        return what + (f" ports {list(self.ports)}" if self.ports else "")


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver returns for ``host`` (what httpx will connect to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _port_ok(ports: tuple[int, ...] | None, target: NormalizedURL) -> bool:
    if ports is None:
        return target.port == DEFAULT_PORTS[target.scheme]
    return target.port in ports


class Policy:
    """The allow-list as a matcher. Stateless per request; safe to share across streams."""

    def __init__(self, entries: Sequence[AllowEntry], resolver: Resolver | None = None) -> None:
        self.entries = tuple(entries)
        self._resolver = resolver or system_resolver
        self._prefixes = [normalize_url(e.prefix) for e in self.entries if e.prefix]
        self._static: dict[NormalizedURL, bool] = {}
        self._under: dict[tuple[str, str], NormalizedURL] = {}
        self._hosts = [(e.host, e.ports) for e in self.entries if e.host]
        self._cidrs: list[tuple[IPNetwork, tuple[int, ...] | None]] = [
            (ipaddress.ip_network(e.cidr), e.ports) for e in self.entries if e.cidr
        ]

    def _match_static(self, target: NormalizedURL) -> bool:
        """Whether a prefix, host or CIDR rule allows ``target`` (remembered per target: the
        rules are fixed for the policy's life)."""
        known = self._static.get(target)
        if known is None:
            known = self._static_rules(target)
            if len(self._static) >= _NORMALIZED_SIZE:
                self._static.clear()
            self._static[target] = known
        return known

    def _static_rules(self, target: NormalizedURL) -> bool:
        for prefix in self._prefixes:
            if target.origin == prefix.origin and _path_under(target.path, prefix.path):
                return True
        for host, ports in self._hosts:
            if host.startswith("*."):
                matched = target.host.endswith(host[1:])
            else:
                matched = target.host == host
            if matched and _port_ok(ports, target):
                return True
        ip = target.ip
        return ip is not None and self._ip_allowed(ip, target)

    def _ip_allowed(self, ip: IPAddress, target: NormalizedURL) -> bool:
        return any(ip in net and _port_ok(ports, target) for net, ports in self._cidrs)

    def _deny(self, target: NormalizedURL, why: str) -> TargetDenied:
        return TargetDenied(f"target {target.display()} is not allowed: {why}")

    def check_static(self, url: str) -> NormalizedURL:
        """Check without DNS: prefix, host and IP-literal entries only."""
        target = normalize_url(url)
        if self._match_static(target):
            return target
        raise self._deny(target, "no allow entry in agent.toml matches it (deny by default)")

    def check(self, url: str) -> None:
        """Raise TargetDenied unless ``url`` is allowed (blocking DNS for cidr entries)."""
        target = normalize_url(url)
        if not self._match_static(target):
            self._check_dns(target, self._resolve(target, self._resolver))

    def allowed_without_dns(self, url: str) -> NormalizedURL | None:
        """``url`` normalized, when a rule that needs no name resolution allows it (prefix,
        host, or an IP literal in a CIDR); None for anything else, refusals included, which
        :meth:`check_async` then names."""
        try:
            target = normalize_url(url)
        except TargetDenied:
            return None
        return target if self._match_static(target) else None

    def allowed_under(self, url: str, base_url: str) -> NormalizedURL | None:
        """``url`` normalized, when :meth:`allowed_without_dns` allows it *and* it lies
        under ``base_url`` (:func:`is_under`); None for anything else, which the full checks
        then name. Remembered per pair, allowed ones only: the rules are fixed for the
        policy's life, and most requests repeat a few URLs of one connection, so a repeat
        costs one lookup instead of eight interpreted calls."""
        key = (url, base_url)
        found = self._under.get(key)
        if found is not None:
            return found
        target = self.allowed_without_dns(url)
        if target is None:
            return None
        try:
            base = normalize_url(base_url)
        except TargetDenied:
            return None
        if not is_under(target, base):
            return None
        if len(self._under) >= _NORMALIZED_SIZE:
            self._under.clear()
        self._under[key] = target
        return target

    async def check_async(self, url: str) -> NormalizedURL:
        """Like :meth:`check`, resolving in a worker thread; return the normalized URL."""
        target = normalize_url(url)
        if not self._match_static(target):
            self._check_dns(target, await asyncio.to_thread(self._resolve, target, self._resolver))
        return target

    def _resolve(self, target: NormalizedURL, resolver: Resolver) -> list[str]:
        if not self._cidrs or target.ip is not None:
            raise self._deny(target, "no allow entry in agent.toml matches it (deny by default)")
        try:
            return resolver(target.host, target.port)
        except OSError as exc:
            raise self._deny(target, f"{target.host} does not resolve ({exc})") from None

    def _check_dns(self, target: NormalizedURL, addresses: list[str]) -> None:
        if not addresses:
            raise self._deny(target, f"{target.host} does not resolve")
        for text in addresses:
            ip = _unmap(ipaddress.ip_address(text.split("%", 1)[0]))
            if not self._ip_allowed(ip, target):
                raise self._deny(
                    target,
                    f"{target.host} resolves to {ip}, outside every allowed range for port "
                    f"{target.port} (all resolved addresses must be allowed)",
                )
