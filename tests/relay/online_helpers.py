"""A relay configured for online connectors: a secret key, loopback APIs allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.config import RelayConfig
from tests.relay.relay_helpers import make_config

SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"
CALLBACK = "https://relay.test/v1/oauth/callback"


def online_config(data_dir: Path, **overrides: Any) -> RelayConfig:
    values: dict[str, Any] = {
        "secret_key": SECRET_KEY,
        "online_allow_private_networks": True,
        "oauth_redirect_url": CALLBACK,
        "oauth_refresh_margin_seconds": 1,
    }
    return make_config(data_dir, **(values | overrides))
