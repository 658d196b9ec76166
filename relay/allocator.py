"""Give the C heap's free memory back to the system after a burst of tunnel connects.

A thousand agents connecting at once (a relay restart) allocate far more while their TLS and
tunnel handshakes are in flight than their tunnels keep afterwards. glibc holds on to the
freed part: the relay's RSS stays at the burst's peak. ``malloc_trim(0)`` returns the free
pages. Measured with 1,000 idle tunnels (bench/scale.py): 216 → 194 MiB, 100 → 78 KiB per
tunnel.

:class:`Trimmer` trims once tunnel churn has been quiet for ``quiet`` seconds, in a thread
(the call releases the interpreter lock, and walking a large heap takes milliseconds), and
never more often than that. Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import structlog

log = structlog.get_logger("backhaul.relay.allocator")


def _malloc_trim() -> Callable[[], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


class Trimmer:
    """Debounced ``malloc_trim``: :meth:`poke` on every tunnel connect and disconnect."""

    def __init__(self, quiet: float, trim: Callable[[], int] | None = None) -> None:
        self.quiet = quiet
        self._trim = trim if trim is not None else _malloc_trim()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None and self.quiet > 0

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        assert self._trim is not None
        while True:
            await self._wake.wait()
            while self._wake.is_set():  # wait out the burst: quiet for ``quiet`` seconds
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.quiet):
                        await self._wake.wait()
            try:
                released = await asyncio.to_thread(self._trim)
            except Exception as exc:  # never take the relay down over a heap statistic
                log.warning("allocator.trim_failed", error=str(exc))
                return
            self.trims += 1
            log.debug("allocator.trimmed", released=bool(released))
            await asyncio.sleep(self.quiet)
