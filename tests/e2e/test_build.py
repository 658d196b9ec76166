"""The relay and agent processes run the build under test: from source, or the mypyc build
of setup.py when ``BACKHAUL_TEST_BUILD`` names its tree (the second pass of ``make test``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import BUILD_UNDER_TEST, World

pytestmark = pytest.mark.e2e

EXPECTED = "mypyc" if BUILD_UNDER_TEST else "python"


def test_relay_reports_its_build(world: World) -> None:
    with world.stack.client() as client:
        text = client.get("/metrics").text
    info = re.search(r"^backhaul_relay_build_info\{(.*)\} 1\.0$", text, re.MULTILINE)
    assert info is not None, text[:2000]
    assert f'build="{EXPECTED}"' in info.group(1)


def test_agent_reports_its_build(world: World) -> None:
    started = [
        json.loads(line)
        for line in world.stack.log_text(world.agent_dir.name).splitlines()
        if '"agent.started"' in line
    ]
    assert started, "no agent.started line in the agent's log"
    assert {line["build"] for line in started} == {EXPECTED}


@pytest.mark.skipif(not BUILD_UNDER_TEST, reason="runs against the compiled build only")
def test_every_module_of_the_compiled_list_is_an_extension_in_the_tree() -> None:
    from importlib.machinery import EXTENSION_SUFFIXES

    from tests.test_compiled_rules import compiled_modules

    tree = Path(BUILD_UNDER_TEST)
    missing = [
        module
        for module in compiled_modules()
        if not any((tree / module).with_suffix(suffix).exists() for suffix in EXTENSION_SUFFIXES)
    ]
    assert missing == []
