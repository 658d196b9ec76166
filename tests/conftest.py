"""Suite-wide fixtures: the collector of secrets and artifacts that the last test of the
session scans (tests/leaks.py, tests/test_secrets_in_artifacts.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.leaks import LeakCollector

FINAL_CHECK = "test_secrets_in_artifacts.py::test_no_secret_in_clear_in_any_log_or_database"


@pytest.fixture(scope="session", autouse=True)
def leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeakCollector]:
    """Every DevStack registers itself and its secrets; other tests call ``leaks.secret``."""
    collector = LeakCollector(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as mp:
        collector.watch_devstack(mp)
        yield collector


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scan of everything the suite wrote runs after everything else."""
    final = [item for item in items if item.nodeid.endswith(FINAL_CHECK)]
    for item in final:
        items.remove(item)
        items.append(item)
