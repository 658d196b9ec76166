"""The request as a connector's policies see and change it (:mod:`relay.policies`).

Every invoke builds one, policies or not (:meth:`relay.plan.Plan.rewrite`), so it lives in a
module of its own that the compiled build includes, with an ``__init__`` of its own that mypyc
compiles (:mod:`backhaul.wire.events` says why).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, init=False)
class RequestParts:
    """The request as the policies see and change it."""

    method: str
    #: Raw (still percent-encoded) path under the base URL, without a leading slash.
    path: str
    #: Raw query string, without "?".
    query: str
    headers: tuple[tuple[str, str], ...]
    base_url: str

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: tuple[tuple[str, str], ...],
        base_url: str,
    ) -> None:
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "query", query)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "base_url", base_url)

    @property
    def url(self) -> str:
        return self.base_url + self.path + (f"?{self.query}" if self.query else "")
