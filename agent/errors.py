"""Errors the agent raises on purpose, mapped at each boundary from the layer below.

Each one carries a short ``code`` the dispatcher can put in a RESET frame and a human message
that names the target but never contains a credential, a token or a query string.

::

    AgentError
    ├── TargetDenied          the allow-list or the base URL does not cover the target
    ├── BadRequestHead        the relay sent a malformed OPEN payload (unknown field, bad header)
    ├── CredentialsInvalid    the opened credentials lack a field the auth scheme needs
    ├── KeyVersionUnavailable the request is sealed to a gateway key version not held here
    ├── UpstreamUnreachable   DNS failure, connection refused, TLS handshake failure
    ├── UpstreamTimeout       the deadline passed before response headers, or the body stalled
    ├── UpstreamError         the internal API broke HTTP (protocol error, reset mid-body)
    ├── WindowsAuthFailed     NTLM / Kerberos / Negotiate failed; ``reason`` says why
    ├── AgentNotRunning       no agent answers on the local status socket
    ├── EnrollError           enrollment failed (relay refused the token, TLS, network)
    └── ProxyError            the corporate proxy's CONNECT failed (agent/proxy.py: 407 with
                              no usable credentials, rejected credentials, refused CONNECT)
"""

from __future__ import annotations

from backhaul.errors import BackhaulError

__all__ = [
    "AgentError",
    "AgentNotRunning",
    "BadRequestHead",
    "CredentialsInvalid",
    "EnrollError",
    "KeyVersionUnavailable",
    "TargetDenied",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "WindowsAuthFailed",
]


class AgentError(BackhaulError):
    """Root of the agent's errors. ``code`` is stable and machine-readable."""

    code = "agent_error"
    #: The HTTP status the relay should answer the caller with (RFC 9110 §15).
    status = 502

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TargetDenied(AgentError):
    """The agent's allow-list does not permit this target; deny by default."""

    code = "target_denied"
    status = 403


class BadRequestHead(AgentError):
    """The OPEN payload from the relay does not follow the request-head schema."""

    code = "bad_request_head"
    status = 400


class CredentialsInvalid(AgentError):
    """The credentials opened for this connection don't fit its auth scheme."""

    code = "credentials_invalid"
    status = 502


class KeyVersionUnavailable(AgentError):
    """The credentials are sealed to a gateway key version this member does not hold (yet:
    a rotation is handing it over). The request was not processed; another member may."""

    code = "key_version_unavailable"
    status = 503

    def __init__(self, version: int, held: list[int]) -> None:
        super().__init__(
            f"gateway key version {version} is not held here (held: "
            f"{', '.join(map(str, held)) or 'none'})"
        )
        self.version = version


class UpstreamUnreachable(AgentError):
    """The internal API could not be reached: DNS, TCP connect or TLS failed."""

    code = "upstream_unreachable"
    status = 502


class UpstreamTimeout(AgentError):
    """The internal API did not answer within the deadline."""

    code = "upstream_timeout"
    status = 504


class UpstreamError(AgentError):
    """The internal API answered, but broke HTTP along the way."""

    code = "upstream_error"
    status = 502


class WindowsAuthFailed(AgentError):
    """Windows authentication to the internal API failed (see :mod:`agent.winauth`).

    ``reason`` is a stable slug (``wrong_password``, ``clock_skew``, ...); the message starts
    with it in brackets so it survives the RESET frame and the relay can hand it to the caller.
    """

    code = "windows_auth_failed"
    status = 502

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


class AgentNotRunning(AgentError):
    """Nothing answers on the status socket: the agent is stopped or uses another config dir."""

    code = "agent_not_running"
    status = 503


class EnrollError(AgentError):
    """Enrollment failed; the message is what the operator needs to fix it."""

    code = "enroll_failed"
