"""Helpers shared by the operations tests: agents run as real processes, their status read
from the status socket in-process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from backhaul.devstack import DevStack, command, read_agent_status

PASSWORD = "Squid-pw-42!"


def api_base(stack: DevStack) -> str:
    assert stack.api is not None
    return stack.api.url.rstrip("/") + "/"


def relay_port(stack: DevStack) -> int:
    port = urlsplit(stack.relay_url).port
    assert port is not None
    return port


@contextmanager
def agent(stack: DevStack, name: str, env: dict[str, str], **config: Any) -> Iterator[Path]:
    """Enroll an agent (directly, no proxy), then run it with ``env`` and ``config`` keys."""
    _gateway, config_dir = stack.enroll(name=name, allow=[api_base(stack)])
    if config:
        stack.set_agent_config(config_dir, **config)
    saved = dict(stack.env)
    stack.env.update(env)
    try:
        stack.spawn(name, [command("backhaul-agent"), "run", "--config-dir", str(config_dir)])
    finally:
        stack.env.clear()
        stack.env.update(saved)
    try:
        yield config_dir
    finally:
        stack.stop_process(name, timeout=10)


def status(config_dir: Path) -> dict[str, Any]:
    """The agent's status document, read from its socket in-process; {} when none answers."""
    return read_agent_status(config_dir) or {}


def wait_status(
    stack: DevStack, config_dir: Path, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = status(config_dir)
        if check(doc):
            return doc
        time.sleep(0.05)
    log = stack.log_text(config_dir.name)[-2000:]
    raise AssertionError(f"agent status never matched: {doc}\n{log}")


def connected(doc: dict[str, Any]) -> bool:
    return bool(doc.get("connected"))
