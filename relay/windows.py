"""The ``windows`` auth type on the relay side: what a connector and its connections may say.

The relay only checks shapes; the handshake (NTLM, Kerberos, Negotiate) happens on the agent
(:mod:`agent.winauth`), which is the only place the credentials are ever opened.

Connector fields: ``windows_scheme`` — ``negotiate`` (default: Kerberos, falling back to NTLM
when Kerberos is not possible), ``ntlm`` or ``kerberos`` — and ``spn``, the Kerberos service
principal when it is not ``HTTP/<host of the base URL>`` (``SERVICE/host``; the realm comes from
the agent's krb5.conf or the domain).

Connection credentials: ``{"username": "DOMAIN\\\\user" | "user@REALM", "password": "..."}``,
or ``{"identity": "service"}`` for the agent's own service identity (a keytab on Linux, the
service account through SSPI on Windows).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from relay.problems import ProblemError

__all__ = ["DEFAULT_SCHEME", "SPN_RE", "WindowsScheme", "check_credentials", "check_spn"]

WindowsScheme = Literal["negotiate", "ntlm", "kerberos"]
DEFAULT_SCHEME: WindowsScheme = "negotiate"
#: Same rule as the agent's (agent.head.SPN_RE): ``SERVICE/host``.
SPN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}/[A-Za-z0-9][A-Za-z0-9.\-]{0,252}\Z")
MAX_FIELD_BYTES = 8 * 1024


def check_spn(value: str) -> str:
    if not SPN_RE.match(value):
        raise ValueError("spn must look like SERVICE/host, e.g. HTTP/api.corp.example")
    return value


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "Invalid credentials", detail)


def check_credentials(credentials: dict[str, Any]) -> dict[str, str]:
    """The credentials of a windows connection, or a 422 naming the field (never its value)."""
    if "identity" in credentials:
        if set(credentials) != {"identity"}:
            extra = sorted(set(credentials) - {"identity"})[0]
            raise _invalid(f"credentials.{extra}: not used with identity")
        if credentials["identity"] != "service":
            raise _invalid('credentials.identity: must be "service" (the agent\'s own identity)')
        return {"identity": "service"}
    for key in credentials:
        if key not in ("username", "password"):
            raise _invalid(f"credentials.{key}: not used by auth type windows")
    clean: dict[str, str] = {}
    for key in ("username", "password"):
        value = credentials.get(key)
        if value is None:
            raise _invalid(
                f"credentials.{key}: required for auth type windows "
                '(or give {"identity": "service"})'
            )
        if not isinstance(value, str):
            raise _invalid(f"credentials.{key}: must be a string")
        if not value:
            raise _invalid(f"credentials.{key}: must not be empty")
        if len(value.encode()) > MAX_FIELD_BYTES:
            raise _invalid(f"credentials.{key}: longer than {MAX_FIELD_BYTES} bytes")
        clean[key] = value
    user = clean["username"]
    if user.count("\\") > 1 or user.startswith(("\\", "@")) or user.endswith(("\\", "@")):
        raise _invalid("credentials.username: use DOMAIN\\user, user@REALM or user")
    return clean
