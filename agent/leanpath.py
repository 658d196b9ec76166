"""The executor's common case, compiled: a bodiless request the lean client can carry.

Most upstream calls are a bodiless request to a target that an allow-list rule needing no
DNS allows, under the connection's base URL, with no credentials or credentials that are a
header or a query parameter. For those, nothing waits before the lean client of
:mod:`agent.upstream`, which holds every wait of its own to the request's deadline: no
timeout scope, no DNS check. :class:`LeanPath` does exactly that much, in a module the
compiled build includes (setup.py), so that the dispatcher reaches the lean client without
an interpreted frame of :class:`agent.executor.Executor` on every request. Anything else (a
body, Windows auth, a target the quick checks cannot allow, an httpx auth flow) is None
here, and :meth:`agent.executor.Executor.start` takes it through the full checks.

The order of :mod:`agent.executor`'s security boundary holds: the head is validated, the
target allowed and under the base URL, the caller's hop-by-hop fields and secrets dropped,
and the credentials applied last.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from agent.auth import AppliedAuth, apply_credentials
from agent.errors import UpstreamTimeout
from agent.head import RequestHead
from agent.policy import NormalizedURL, Policy
from agent.upstream import Client, Response
from backhaul.headers import strip_hop_by_hop
from backhaul.version import __version__

USER_AGENT = f"backhaul-agent/{__version__}"
#: Host, which the client sets from the URL.
HOST = frozenset({"host"})
#: Dropped from the caller's request beside the hop-by-hop fields: the caller's own
#: credentials never reach the internal API, and Host is the client's.
REQUEST_DROP = frozenset({"authorization", "cookie"}) | HOST


def with_user_agent(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers``, with Backhaul's ``User-Agent`` when the caller sent none."""
    for name, _ in headers:
        if name.lower() == "user-agent":
            return headers
    return [*headers, ("User-Agent", USER_AGENT)]


class LeanPath:
    """:meth:`start` a bodiless request through ``client`` when ``policy`` allows it quickly."""

    def __init__(self, client: Client, policy: Policy) -> None:
        self.client = client
        self.policy = policy

    async def start(self, head: RequestHead, credentials: Mapping[str, Any]) -> Response | None:
        """The response once its head is in, its headers without hop-by-hop fields; None
        when the request needs the executor's general path (nothing sent then)."""
        auth = head.auth
        if auth.type == "windows":
            return None
        target = self.policy.allowed_under(head.url, head.base_url)
        if target is None:
            return None
        applied = apply_credentials(
            auth,
            credentials,
            target.query,
            strip_hop_by_hop(list(head.headers), REQUEST_DROP),
            head.connection_id,
        )
        if applied.auth is not None:
            return None
        return await self.send(head, target, applied, None)

    async def send(
        self,
        head: RequestHead,
        target: NormalizedURL,
        applied: AppliedAuth,
        body: AsyncIterator[bytes | memoryview] | None,
    ) -> Response:
        """``head`` to an allowed ``target`` with the credentials ``applied`` (and ``body``,
        if any) through the lean client: the response once its head is in, its headers
        without hop-by-hop fields. The executor's general path sends this way too."""
        try:
            reply = await self.client.request(
                head.method,
                target,
                with_user_agent(applied.headers),
                body,
                timeout=head.timeout_seconds,
                query=applied.query,
            )
        except TimeoutError:
            raise UpstreamTimeout(
                f"{target.display()} did not answer within the {head.timeout_ms} ms deadline"
            ) from None
        reply.headers = strip_hop_by_hop(reply.headers, HOST)
        return reply
