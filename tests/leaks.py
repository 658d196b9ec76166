"""Secrets in clear in what the test suite leaves behind.

Tests register the secrets they hand out (``LeakCollector.secret``) and where their
processes write (``LeakCollector.artifacts``); :meth:`LeakCollector.watch_devstack` does both
for every :class:`~backhaul.devstack.DevStack` automatically — its root (the relay database,
every process's log under ``logs/``), the tokens it creates, the credentials it stores, the
sample API's passwords and the agents' private keys. API, enrollment and recovery tokens are
also found by their shape, registered or not. The final test of the session
(``tests/test_secrets_in_artifacts.py``) scans every log and database file under the
session's temporary directory and the registered roots.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backhaul.devstack import DevStack

#: Tokens recognisable by their shape: API (bh_), enrollment (bhe_), recovery (bhrk_) keys.
TOKEN_SHAPES = {
    "API token": re.compile(rb"\bbh_[A-Za-z0-9_-]{43}"),
    "enrollment token": re.compile(rb"\bbhe_[A-Za-z0-9_-]{43}"),
    "recovery key": re.compile(rb"\bbhrk_[0-9A-Z]{4}(?:-[0-9A-Z]{4}){13}\b"),
}
_ARTIFACT_SUFFIXES = (".log", ".db", ".db-wal", ".db-journal", ".sqlite", ".jsonl")
_MIN_SECRET = 8  # shorter values would match by chance
_IDENTIFIERS = frozenset({"username", "identity", "domain"})


def is_artifact(path: Path) -> bool:
    return path.name.endswith(_ARTIFACT_SUFFIXES) or path.parent.name == "logs"


@dataclass
class LeakCollector:
    base: Path
    secrets: dict[bytes, str] = field(default_factory=dict)
    roots: set[Path] = field(default_factory=set)
    stacks: list[DevStack] = field(default_factory=list)

    def secret(self, label: str, value: str | bytes | None) -> None:
        if not value:
            return
        raw = value.encode() if isinstance(value, str) else value
        if len(raw) >= _MIN_SECRET:
            self.secrets.setdefault(raw, label)

    def artifacts(self, root: Path) -> None:
        self.roots.add(root)

    def files(self) -> Iterator[Path]:
        seen: set[Path] = set()
        for root in {self.base, *self.roots}:
            if not root.exists():
                continue
            for path in root.rglob("*"):
                if path in seen or not is_artifact(path):
                    continue
                seen.add(path)
                if path.is_file() and not path.is_symlink():
                    yield path

    def findings(self) -> list[tuple[Path, str]]:
        found = []
        for path in self.files():
            data = path.read_bytes()
            for secret, label in self.secrets.items():
                if secret in data:
                    found.append((path, label))
            for label, shape in TOKEN_SHAPES.items():
                if shape.search(data):
                    found.append((path, f"{label} (by its shape)"))
        return found

    # ------------------------------------------------------------ DevStack, automatically

    def watch_devstack(self, mp: pytest.MonkeyPatch) -> None:
        collector = self

        def wrap(name: str, after: Any) -> None:
            original = getattr(DevStack, name)

            @functools.wraps(original)
            def wrapper(stack: DevStack, *args: Any, **kwargs: Any) -> Any:
                result = original(stack, *args, **kwargs)
                after(stack, result, *args, **kwargs)
                return result

            mp.setattr(DevStack, name, wrapper)

        def on_init(stack: DevStack, _: Any, root: Path, *a: Any, **k: Any) -> None:
            collector.artifacts(root)
            collector.stacks.append(stack)

        def on_call(stack: DevStack, doc: Any, *a: Any, **k: Any) -> None:
            body = k.get("json")
            if isinstance(body, dict):
                collector._register_values("request body", body.get("credentials"))
            if isinstance(doc, dict):
                for key in ("token", "enrollment_token", "access_token", "refresh_token"):
                    collector.secret(key.replace("_", " "), doc.get(key))

        def on_admin(stack: DevStack, token: str, *a: Any, **k: Any) -> None:
            collector.secret("admin token", token)

        def on_api(stack: DevStack, url: str, *a: Any, **k: Any) -> None:
            for pair in (k.get("basic"), k.get("api_key"), *a):
                if isinstance(pair, tuple):
                    collector.secret("sample API credential", pair[1])

        def on_enroll(stack: DevStack, result: tuple[str, Path], *a: Any, **k: Any) -> None:
            gateway_id, config_dir = result
            collector.secret("enrollment token", k.get("token"))
            collector.secret("recovery key", stack.recovery_keys.get(gateway_id))
            for key_file in (config_dir / "keys").glob("*.key"):
                collector.secret(f"private key {key_file.name}", key_file.read_bytes().strip())

        wrap("__init__", on_init)
        wrap("call", on_call)
        wrap("create_admin", on_admin)
        wrap("start_api", on_api)
        wrap("enroll", on_enroll)

    def _register_values(self, label: str, values: Any) -> None:
        if isinstance(values, dict):
            for name, value in values.items():
                # Who a credential belongs to is not secret (error details name the user);
                # the password or key is.
                if isinstance(value, str) and name not in _IDENTIFIERS:
                    self.secret(f"{label}: {name}", value)
