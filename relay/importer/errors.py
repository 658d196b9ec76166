"""The importer's one error: a definition that cannot become a connector."""

from __future__ import annotations

from relay import RelayError


class DefinitionError(RelayError):
    """The definition cannot be imported; the message names the field and the reason."""
