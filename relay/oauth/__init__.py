"""OAuth 2.0 for online connectors: consent with PKCE, tokens encrypted at rest, refresh.

``providers`` maps an ``oauthSetting`` to endpoints, ``client`` talks to token endpoints,
``flow`` runs the consent round-trip (state bound to the user and the connection), and
``tokens`` keeps each connection's tokens encrypted with the relay's key and refreshes them
before they expire and once more when the API answers 401.

Errors::

    RelayError
    └── OAuthError              relay.oauth.client: a token endpoint refused or failed
        └── ConsentRequired     the connection has no usable token; its owner must sign in
"""
