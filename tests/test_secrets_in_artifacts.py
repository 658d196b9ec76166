"""The last test of the session: no credential, token or private key of the whole test
suite appears in clear in any log or database file it produced (tests/leaks.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.leaks import LeakCollector


def test_no_secret_in_clear_in_any_log_or_database(leaks: LeakCollector) -> None:
    files = list(leaks.files())
    # It really sees what the processes wrote: each started relay's log, and the SQLite
    # databases (a relay on PostgreSQL keeps its rows in the server, out of reach here).
    for stack in leaks.stacks:
        if stack.relay_url:
            assert stack.logs / "relay.log" in files, stack.root
    if leaks.stacks:
        assert any(p.name == "relay.db" for p in files), "no relay database was scanned"
        assert leaks.secrets, "the DevStacks registered no secret at all"
    found = leaks.findings()
    assert not found, "\n".join(f"{label} in clear in {path}" for path, label in found)


def test_the_scan_finds_registered_secrets_and_token_shapes() -> None:
    # Outside the session's temporary directory, which the final scan covers.
    with tempfile.TemporaryDirectory() as tmp:
        _planted_leaks_are_found(Path(tmp))


def _planted_leaks_are_found(tmp_path: Path) -> None:
    collector = LeakCollector(tmp_path / "none")
    collector.artifacts(tmp_path)
    collector.secret("password", "correct-horse-battery")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "agent.log").write_text('{"event": "x", "p": "correct-horse-battery"}')
    (tmp_path / "relay.db").write_bytes(b"\0\0bhe_" + b"A" * 43 + b"\0")
    (tmp_path / "agent.toml").write_text("ignored = 'correct-horse-battery'")  # not an artifact
    found = sorted((p.name, label) for p, label in collector.findings())
    assert found == [("agent.log", "password"), ("relay.db", "enrollment token (by its shape)")]
