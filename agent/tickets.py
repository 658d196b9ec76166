"""Kerberos tickets for password credentials, cached in memory per credential until they expire.

Why the agent gets the ticket-granting ticket itself instead of letting pyspnego do it: given a
user name and a password, pyspnego runs a fresh AS exchange for every security context, which
is one KDC round trip (and one password check) per request. Here the TGT is obtained once per
credential into a private ``MEMORY:`` credential cache; every later context is built on that
cache (``spnego.KerberosCCache``), and GSSAPI stores the service tickets it gets from the KDC in
the same cache, so a second request to the same SPN costs no KDC traffic at all. A cache is
replaced a few minutes before its TGT ends (and destroyed a while later, once no context can
still be using it).

The cache is keyed by an HMAC of the principal and the password under a key that exists only in
this process: a changed password gets a new cache, and the key never reveals the password. The
password itself is used for the AS exchange and not kept.

The agent's own service identity does not come through here: it uses the default credential
cache (``KRB5CCNAME``) and client keytab (``KRB5_CLIENT_KTNAME``), which MIT Kerberos refreshes
from the keytab by itself.

Everything in this module blocks (it talks to the KDC); callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from agent.config import KerberosConfig

__all__ = ["RENEW_MARGIN_SECONDS", "TicketCache", "apply_environment", "credential_key"]

#: The service identity's cache when a client keytab is configured and no cache is named.
DEFAULT_SERVICE_CCACHE = "MEMORY:backhaul-agent"
#: Replace a TGT this long before it ends, so a context never starts on a dying ticket.
RENEW_MARGIN_SECONDS = 300
#: Retired caches are destroyed this long after being replaced.
_RETIRE_GRACE_SECONDS = 120
_PROCESS_KEY = secrets.token_bytes(32)


def credential_key(*parts: str) -> str:
    """A stable, non-reversible name for a credential within this process (HMAC-SHA256)."""
    mac = hmac.new(_PROCESS_KEY, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        mac.update(len(data).to_bytes(4, "big") + data)
    return mac.hexdigest()


def apply_environment(
    cfg: KerberosConfig, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Export ``[kerberos]`` of agent.toml as the MIT variables; return what was set.

    The library reads them when a Kerberos context is created, so this runs once at start,
    before any request. Keys left unset keep whatever the environment already says.
    """
    env = os.environ if environ is None else environ
    wanted: dict[str, str] = {}
    if cfg.krb5_config is not None:
        wanted["KRB5_CONFIG"] = str(cfg.krb5_config)
    if cfg.client_keytab is not None:
        wanted["KRB5_CLIENT_KTNAME"] = str(cfg.client_keytab)
    if cfg.ccache is not None:
        wanted["KRB5CCNAME"] = cfg.ccache
    elif cfg.client_keytab is not None and "KRB5CCNAME" not in env:
        wanted["KRB5CCNAME"] = DEFAULT_SERVICE_CCACHE
    env.update(wanted)
    return wanted


@dataclass
class _Entry:
    context: Any
    ccache: Any
    name: str
    principal: str
    end: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class TicketCache:
    """One in-memory credential cache with a TGT per (principal, password)."""

    def __init__(
        self,
        max_entries: int = 256,
        *,
        forwardable: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.forwardable = forwardable
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._retired: list[tuple[float, _Entry]] = []
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        #: AS exchanges made (a TGT obtained from the KDC); the rest were served from memory.
        self.as_exchanges = 0

    def ccache_for(self, principal: str, password: str) -> str:
        """``MEMORY:<name>`` holding a valid TGT for ``principal``; runs kinit when needed.

        Raises ``krb5.Krb5Error`` when the KDC refuses (callers map it to a reason).
        """
        key = credential_key("krb5", principal, password)
        now = self._clock()
        with self._lock:
            self._purge(now)
            entry = self._entries.get(key)
            if entry is not None and entry.end - RENEW_MARGIN_SECONDS > now:
                self._entries.move_to_end(key)
                return entry.name
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            # Another thread may have renewed it while this one waited.
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.end - RENEW_MARGIN_SECONDS > self._clock():
                    return entry.name
            fresh = self._kinit(principal, password)
            with self._lock:
                old = self._entries.pop(key, None)
                if old is not None:
                    self._retired.append((self._clock(), old))
                self._entries[key] = fresh
                self.as_exchanges += 1
                while len(self._entries) > self.max_entries:
                    evicted_key, evicted = self._entries.popitem(last=False)
                    self._key_locks.pop(evicted_key, None)
                    self._retired.append((self._clock(), evicted))
            return fresh.name

    def _kinit(self, principal: str, password: str) -> _Entry:
        import krb5

        ctx = krb5.init_context()
        princ = krb5.parse_name_flags(ctx, principal.encode("utf-8"))
        opt = krb5.get_init_creds_opt_alloc(ctx)
        # Enterprise names and AD's case-insensitive realms (RFC 6806 canonicalization).
        krb5.get_init_creds_opt_set_canonicalize(opt, True)
        krb5.get_init_creds_opt_set_forwardable(opt, self.forwardable)
        creds = krb5.get_init_creds_password(ctx, princ, opt, password=password.encode("utf-8"))
        ccache = krb5.cc_new_unique(ctx, b"MEMORY")
        krb5.cc_initialize(ctx, ccache, creds.client)
        krb5.cc_store_cred(ctx, ccache, creds)
        name = (ccache.cache_type or b"MEMORY").decode() + ":" + (ccache.name or b"").decode()
        return _Entry(ctx, ccache, name, principal, float(creds.times.endtime))

    def _purge(self, now: float) -> None:
        keep: list[tuple[float, _Entry]] = []
        for retired_at, entry in self._retired:
            if now - retired_at < _RETIRE_GRACE_SECONDS:
                keep.append((retired_at, entry))
            else:
                _destroy(entry)
        self._retired = keep

    def clear(self) -> None:
        """Destroy every cache (agent shutdown)."""
        with self._lock:
            for entry in self._entries.values():
                _destroy(entry)
            for _, entry in self._retired:
                _destroy(entry)
            self._entries.clear()
            self._retired.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _destroy(entry: _Entry) -> None:
    import krb5

    try:
        krb5.cc_destroy(entry.context, entry.ccache)
    except krb5.Krb5Error:  # already gone; nothing to free
        pass
