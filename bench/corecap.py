"""Hold processes to a fraction of a core each, with the kernel's CPU controller (cgroups).

On a benchmark machine with two cores, the relay, the agent, the sample API and wrk share
them, so a second relay worker has no idle core to fill. Holding every relay worker to the
same fraction of a core makes the relay the bottleneck while the rest of the path keeps
spare CPU: each worker then stands for one core of a relay machine that its relay fills, and
one worker against two shows whether the relay's throughput grows with its cores.

Each process gets a control group of its own with a CFS quota of ``fraction`` of the period
(cgroup v1: ``cpu.cfs_quota_us``; v2: ``cpu.max``), so its threads share one such core, as a
worker's event loop and its database thread share what the machine gives it. Needs root and a
writable CPU controller; :func:`unavailable` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

#: The CPU controller's mount under cgroup v1, and the unified hierarchy's root under v2.
V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 20_000


def _root() -> tuple[Path, int] | None:
    """The hierarchy to create groups in, and its version (None: no CPU controller)."""
    if (V1 / "cpu.cfs_quota_us").exists():
        return V1, 1
    controllers = V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return V2, 2
    return None


def unavailable() -> str | None:
    """Why processes cannot be held to a quota here, or None when they can."""
    found = _root()
    if found is None:
        return "no cgroup CPU controller at /sys/fs/cgroup"
    root, _ = found
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (needs root)"
    return None


class CoreCap:
    """A context in which :meth:`hold` puts processes on a quota; leaving it frees them."""

    def __init__(self, fraction: float, name: str = "backhaul-bench") -> None:
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        found = _root()
        if found is None:
            raise RuntimeError(unavailable())
        self._root, self._version = found
        if self._version == 2:
            # A child group has cpu.max only once its parent hands the controller down.
            with contextlib.suppress(OSError):
                (self._root / "cgroup.subtree_control").write_text("+cpu")
        self._quota = int(fraction * PERIOD_US)
        self._name = name
        self._groups: list[Path] = []

    def __enter__(self) -> CoreCap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def hold(self, pid: int) -> None:
        """Put ``pid`` (all its threads) on a quota of its own."""
        group = self._root / f"{self._name}-{os.getpid()}-{len(self._groups)}"
        group.mkdir()
        self._groups.append(group)
        if self._version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(self._quota))
        else:
            (group / "cpu.max").write_text(f"{self._quota} {PERIOD_US}")
        (group / "cgroup.procs").write_text(str(pid))

    def release(self) -> None:
        """Move every held process that is still alive back to the root group, and remove
        the groups."""
        for group in self._groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self._root / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self._groups = []
