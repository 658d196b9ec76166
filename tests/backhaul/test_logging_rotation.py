"""The log file: rotated by size and by day, rotated files pruned by age, redacted like stderr."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from backhaul.logging import RotatingFile, configure


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, RotatingFile):
            root.removeHandler(handler)
            handler.close()
    structlog.reset_defaults()


def handler_of() -> RotatingFile:
    return next(h for h in logging.getLogger().handlers if isinstance(h, RotatingFile))


def test_file_gets_redacted_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "agent.log"
    configure("console", "info", io.StringIO(), file=path)
    structlog.get_logger("t").info("proxy.login", password="hunter2-secret", user="alice")
    logging.getLogger("lib").warning("Authorization: Bearer bh_abcdefghijklmnopqrstuvwxyz")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["event"] == "proxy.login" and lines[0]["password"] == "[redacted]"
    assert "bh_abcdef" not in path.read_text() and "hunter2" not in path.read_text()


def test_rotates_by_size_and_keeps_lines_whole(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    configure("json", "info", io.StringIO(), file=path, max_bytes=2000)
    log = structlog.get_logger("t")
    for i in range(100):
        log.info("line", number=i, padding="x" * 40)
    handler = handler_of()
    rotated = handler.rotated()
    assert len(rotated) >= 3
    numbers = []
    for file in [*rotated, path]:
        assert file.stat().st_size <= 2000
        numbers += [json.loads(line)["number"] for line in file.read_text().splitlines()]
    assert numbers == list(range(100))  # nothing lost, in order, every line parseable


def test_rotates_daily_and_prunes_by_age(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    old = tmp_path / "agent.log.20200101T000000Z"
    old.write_text("{}\n")
    recent = tmp_path / "agent.log.20990101T000000Z"
    recent.write_text("{}\n")
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    unrelated = tmp_path / "agent.log.bak"
    unrelated.write_text("mine")
    configure("json", "info", io.StringIO(), file=path, max_age_days=30)
    assert not old.exists() and recent.exists() and unrelated.exists()
    log = structlog.get_logger("t")
    log.info("yesterday")
    handler_of()._day = "2000-01-01"  # the file was started on an earlier day
    log.info("today")
    assert json.loads(path.read_text())["event"] == "today"
    newest = handler_of().rotated()[-2]  # the recent fixture sorts last
    assert json.loads(newest.read_text())["event"] == "yesterday"


def test_agent_config_log_keys(tmp_path: Path) -> None:
    from agent.config import config_from_dict

    base = {"relay_url": "https://r.example", "member_id": "m", "gateway_id": "g"}
    cfg = config_from_dict({**base, "log": {"file": "logs/agent.log"}}, tmp_path)
    assert cfg.log.file == tmp_path / "logs" / "agent.log"
    assert (cfg.log.max_file_mb, cfg.log.max_age_days) == (100, 30)
