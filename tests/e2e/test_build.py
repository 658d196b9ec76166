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


@pytest.mark.skipif(not BUILD_UNDER_TEST, reason="runs against the compiled build only")
def test_the_data_paths_dataclasses_are_built_by_compiled_code(tmp_path: Path) -> None:
    """A dataclass's generated ``__init__`` stays interpreted under mypyc; the ones made per
    frame and per request write their own, which must come out compiled."""
    import os
    import subprocess
    import sys

    probe = (
        "import types\n"
        "from backhaul.wire import events, frames\n"
        "from relay import balancing, request_parts\n"
        "classes = [frames.Frame, balancing.Thresholds, request_parts.RequestParts]\n"
        "classes += [c for c in vars(events).values()\n"
        "            if isinstance(c, type) and issubclass(c, events.Event)\n"
        "            and c is not events.Event]\n"
        "print([c.__name__ for c in classes if isinstance(c.__init__, types.FunctionType)])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(BUILD_UNDER_TEST).resolve())}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
