"""TLS records without a Python call each: an ``ssl.SSLObject`` whose per-record methods are
the C object's own.

Every TLS connection of the event loop (uvloop's, and asyncio's own) moves each record
through ``SSLObject.read``, ``write`` and ``pending``: methods of the standard library, in
Python, that only pass the call on to the ``_ssl`` object they wrap. On the relay's caller
connections that was three to four interpreted calls per request, a third of what the
compiled relay still ran as bytecode (bench/PROFILE.md, "TLS records"). A
:class:`DirectSSLObject` puts the C object's own ``read``, ``write`` and ``pending`` in its
place when it is made, so the loop's calls go straight to OpenSSL.

One difference: ``read`` needs its size (the standard method defaults to 1024 bytes). The
event loops always pass it; nothing else reads through these objects.
"""

from __future__ import annotations

import ssl
from typing import Any

#: The methods taken straight from the C object: the same arguments, the same results.
DIRECT_METHODS = ("read", "write", "pending")


class DirectSSLObject(ssl.SSLObject):
    """What ``SSLContext.wrap_bio`` makes for a context passed to :func:`direct_records`."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        made: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = made._sslobj  # type: ignore[attr-defined]
        vars(made).update((name, getattr(inner, name)) for name in DIRECT_METHODS)
        return made


def direct_records(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make ``context``'s TLS objects :class:`DirectSSLObject`; returns it."""
    context.sslobject_class = DirectSSLObject
    return context
