"""The last test of the session: no credential, token or private key of the whole test
suite appears in clear in any log or database file it produced (tests/leaks.py)."""

from __future__ import annotations

from tests.leaks import LeakCollector


def test_no_secret_in_clear_in_any_log_or_database(leaks: LeakCollector) -> None:
    files = list(leaks.files())
    # It really sees what the processes wrote: each started relay's database and log.
    for stack in leaks.stacks:
        if stack.relay_url:
            assert stack.logs / "relay.log" in files, stack.root
            assert any(p.parent == stack.relay_dir and p.suffix == ".db" for p in files)
    if leaks.stacks:
        assert leaks.secrets, "the DevStacks registered no secret at all"
    found = leaks.findings()
    assert not found, "\n".join(f"{label} in clear in {path}" for path, label in found)
