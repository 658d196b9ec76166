"""The request as a connector's policies see and change it (:mod:`relay.policies`).

Every invoke builds one, policies or not (:meth:`relay.plan.Plan.rewrite`), so it lives in a
module of its own that the compiled build includes: built by the interpreter, a frozen
dataclass's ``__init__`` sets each field through ``object.__setattr__``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestParts:
    """The request as the policies see and change it."""

    method: str
    #: Raw (still percent-encoded) path under the base URL, without a leading slash.
    path: str
    #: Raw query string, without "?".
    query: str
    headers: tuple[tuple[str, str], ...]
    base_url: str

    @property
    def url(self) -> str:
        return self.base_url + self.path + (f"?{self.query}" if self.query else "")
