"""The cloud side of Backhaul: tunnel hub, HTTP API, store, identity and the ``backhaul-relay`` CLI.

Every error the relay raises on purpose descends from one root, so a caller can catch the
relay's failures without catching programming errors::

    BackhaulError                    backhaul.errors
    ├── ConfigError                  a relay.toml key, variable or flag is invalid (names the key)
    └── RelayError                   relay
        ├── ProblemError             relay.problems: answered to the HTTP caller as problem+json
        ├── TLSSetupError            relay.tls: no usable certificate / key
        ├── DefinitionError          relay.importer: a connector definition cannot be imported
        ├── PolicyError              relay.policies: a policy would leave the base URL
        ├── SecretBoxError           relay.secretbox: no secret_key, or a blob that won't open
        ├── EgressDenied             relay.egress: an online destination in a private network
        ├── OAuthError               relay.oauth.client: a token endpoint refused or failed
        │   └── ConsentRequired      no usable token: the connection's owner must sign in
        └── StoreError               relay.store: a lookup the caller cannot complete
            ├── NotFound             the row does not exist (or is invisible to the caller)
            └── Forbidden            the row exists but the caller may not use it
"""

from __future__ import annotations

from backhaul.errors import BackhaulError


class RelayError(BackhaulError):
    """Root of the relay's own errors."""
