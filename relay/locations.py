"""Internal URLs in an API's answer, translated to the relay's invoke URL.

An internal API redirects to, and names the resource it created at, its own URLs:
``Location: http://orders.corp.local:8080/api/orders/42`` or ``Location: /api/orders/42``.
Passed on as they are, the first leaks an internal host name and port to the caller and
neither leads anywhere from outside. A reference that resolves under the connection's base
URL names something the caller can reach through the relay, so it is rewritten to the same
place under ``/v1/connections/{id}/invoke/``, as an absolute path on the relay (RFC 9110
§10.2.2 allows relative references). Anything else (another host, a path outside the base
URL, an unparsable value) is passed on unchanged: the relay cannot map it.

Applies to ``Location`` and ``Content-Location`` (RFC 9110 §10.2.2, §8.7).
"""

from __future__ import annotations

from urllib.parse import SplitResult, urljoin, urlsplit

__all__ = ["LOCATION_FIELDS", "invoke_prefix", "public_location"]

#: Response fields whose value is a URI reference to translate.
LOCATION_FIELDS = frozenset({"location", "content-location"})

_DEFAULT_PORTS = {"http": 80, "https": 443}


def invoke_prefix(root_path: str, connection_id: str) -> str:
    """Where a connection's API appears on the relay: ``{root_path}/v1/connections/{id}/invoke``."""
    return f"{root_path}/v1/connections/{connection_id}/invoke"


def public_location(value: str, upstream_url: str, base_url: str, prefix: str) -> str:
    """``value`` (a Location or Content-Location field) as the caller should see it.

    ``upstream_url`` is the URL the request was sent to (relative references resolve
    against it), ``base_url`` the connection's, ``prefix`` the relay's invoke path for the
    connection (``/v1/connections/{id}/invoke``, after any root path).
    """
    reference = value.strip()
    if not reference or not reference.isprintable():
        return value  # empty, or with controls the header check refuses: left to it
    # Without the request's query: resolving "#top" or "" against it would copy the query,
    # which may carry a credential (an API key sent in the query string), into the answer.
    resource = upstream_url.split("#", 1)[0].split("?", 1)[0]
    try:
        absolute = urlsplit(urljoin(resource, reference))
        base = urlsplit(base_url)
        if not _same_origin(absolute, base):
            return value
    except ValueError:  # an invalid port or IPv6 literal: not ours to map
        return value
    base_path = base.path if base.path.endswith("/") else base.path + "/"
    path = absolute.path or "/"
    if path + "/" == base_path:  # the base URL itself, without its trailing slash
        rest = ""
    elif path.startswith(base_path):
        rest = path[len(base_path) :]
    else:
        return value
    out = prefix.rstrip("/") + "/" + rest
    if absolute.query:
        out += "?" + absolute.query
    if absolute.fragment:
        out += "#" + absolute.fragment
    return out


def _same_origin(a: SplitResult, b: SplitResult) -> bool:
    scheme = a.scheme.lower()
    if scheme != b.scheme.lower() or scheme not in _DEFAULT_PORTS:
        return False
    if (a.hostname or "") != (b.hostname or "") or a.username or a.password:
        return False
    return (a.port or _DEFAULT_PORTS[scheme]) == (b.port or _DEFAULT_PORTS[scheme])
