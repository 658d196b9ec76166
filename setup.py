"""The optional compiled build: ``BACKHAUL_MYPYC=1`` compiles the data path with mypyc.

Without it (the default, and every editable install) Backhaul installs as plain Python. With
it, the modules in :data:`COMPILED` become C extensions built from the same typed source
(``mypy --strict`` is what makes that possible); everything else stays Python. The container
images build this way, and ``make compiled`` builds a copy of the tree for the benchmark and
the end-to-end tests. bench/PROFILE.md ("Compiled with mypyc") has what it buys.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: The data path: what every tunnelled request runs through in the relay and the agent.
#: Modules stay out when mypyc cannot compile them as they are: FastAPI reads the signatures
#: of routes and dependencies, which compiled functions do not expose (relay/api/,
#: relay/identity.py), classes made inside functions (relay/limits.py), async generators
#: (agent/executor.py) and pydantic models (agent/policy.py).
#: agent/link.py compiles, but the compiled agent then corrupted its memory when a few hundred
#: streams arrived right after a relay restart (a segmentation fault in the cyclic collector;
#: bench/PROFILE.md, "Compiled with mypyc"; tests/e2e/test_lifecycle.py keeps the scenario).
#: Its subclass of websockets' connection class is the suspect; the cause is not known.
COMPILED = [
    "backhaul/wire/__init__.py",
    "backhaul/wire/connection.py",
    "backhaul/wire/errors.py",
    "backhaul/wire/events.py",
    "backhaul/wire/flow.py",
    "backhaul/wire/frames.py",
    "backhaul/wire/settings.py",
    "backhaul/wire/streams.py",
    "backhaul/aio/background.py",
    "backhaul/aio/deadlines.py",
    "backhaul/aio/tunnel.py",
    "backhaul/aio/wsframes.py",
    "backhaul/aio/wsreader.py",
    "backhaul/aio/wssplit.py",
    "backhaul/aio/waitflag.py",
    "backhaul/aio/writelock.py",
    "backhaul/chunks.py",
    "backhaul/compact_json.py",
    "backhaul/headers.py",
    "backhaul/tallies.py",
    "relay/activity.py",
    "relay/audit.py",
    "relay/balancing.py",
    "relay/cache.py",
    "relay/callers.py",
    "relay/coalesce.py",
    "relay/edge.py",
    "relay/edge_http.py",
    "relay/fastpath.py",
    "relay/headers.py",
    "relay/hub.py",
    "relay/invoke.py",
    "relay/locations.py",
    "relay/plan.py",
    "relay/request_parts.py",
    "relay/wsprotocol.py",
    "agent/auth.py",
    "agent/dispatch.py",
    "agent/head.py",
    "agent/leanpath.py",
    "agent/upstream.py",
]


def _extensions() -> list[object]:
    if os.environ.get("BACKHAUL_MYPYC") != "1":
        return []
    from mypyc.build import mypycify  # only the compiled build needs mypy installed

    # One C file per module, so that the compiler can work on several at once.
    return list(mypycify(COMPILED, opt_level="3", multi_file=True))


class ParallelBuildExt(build_ext):
    """Compiles an extension's C files on every core, not one after another.

    setuptools compiles the sources of one extension in a loop; mypyc's extension holds one
    C file per module. The compiler's ``_compile`` of one file is what runs in each thread.
    """

    def build_extensions(self) -> None:
        compiler: Any = self.compiler
        serial = compiler.compile

        def compile_in_parallel(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
            if len(sources) < 2:
                return list(serial(sources, *args, **kwargs))
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                done = pool.map(lambda source: serial([source], *args, **kwargs), sources)
                return [obj for objs in done for obj in objs]

        compiler.compile = compile_in_parallel
        super().build_extensions()


setup(ext_modules=_extensions(), cmdclass={"build_ext": ParallelBuildExt})
