"""glibc malloc's two thresholds, fixed for a process that moves bulk data.

Every TLS read of a bulk transfer asks for a 256 KiB buffer and keeps 16 KiB of it: uvloop
reads its SSL object in 256 KiB requests, and ``_ssl`` allocates a bytes object of that size,
decrypts one record into it and shrinks it to the record. glibc serves a request that size
with a fresh ``mmap`` (above its 128 KiB ``M_MMAP_THRESHOLD``), or, once its dynamic
threshold has risen, from the top of the heap, which the shrink hands back to the kernel
(``brk``) as soon as more than ``M_TRIM_THRESHOLD`` is free there. Either way the next read
maps the memory again, and the kernel zero-fills every page the record touches: six page
faults and two or three system calls per 16 KiB record. The dynamic threshold never settles,
because the chunk freed is the small shrunk one, not the large one that was mapped.

Fixing both thresholds (a mapped chunk only above :data:`MMAP_THRESHOLD`, the heap trimmed
only when :data:`TRIM_THRESHOLD` is free at its top) keeps those buffers in the heap. In
``bench/transfer_cpu.py`` runs on a two-core machine it took a quarter of the agent's CPU
per MiB uploaded, and a fifth per MiB downloaded when the agent had fallen into the pattern
(bench/PROFILE.md, "malloc's thresholds").
Setting only one of the two made transfers slower than the defaults, since setting either
turns glibc's dynamic adjustment off for both.

An operator who sets malloc's own environment variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``glibc.malloc.*`` in
``GLIBC_TUNABLES``) keeps them: :func:`tune` then changes nothing. On other C libraries
(musl, Windows, macOS) it does nothing either.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping

#: ``mallopt`` parameters, from glibc's ``malloc.h``.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Requests at least this large get a mapping of their own (glibc's default: 128 KiB, then
#: dynamic up to 32 MiB). Above the tunnel's largest frame and TLS read, 256 KiB.
MMAP_THRESHOLD = 1 << 20

#: Free memory at the top of the heap kept for reuse before it is given back (glibc's default:
#: 128 KiB, then twice the dynamic mmap threshold). At most this much stays resident unused.
TRIM_THRESHOLD = 8 << 20

_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune(environ: Mapping[str, str] = os.environ) -> bool:
    """Fix glibc's mmap and trim thresholds; True if they were set. Call once, early."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in environ for name in _OVERRIDES):
        return False
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mapped: int = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trimmed: int = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return mapped == 1 and trimmed == 1
