"""backhaul.malloc_tuning: large short-lived buffers stay in the heap; operators' settings win."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from backhaul import malloc_tuning

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)

# The pattern of every TLS read during a transfer: a 256 KiB bytes object asked for, 16 KiB
# of it kept (os.read from a pipe holding 16 KiB allocates and shrinks exactly as _ssl does).
# Prints the minor page faults of 5,000 such reads, after a warm-up.
_SHRINKING_READS = textwrap.dedent(
    """
    import os, resource, sys
    from backhaul import malloc_tuning
    tuned = malloc_tuning.tune() if sys.argv[1] == "tune" else False
    r, w = os.pipe()
    record = b"x" * 16384
    kept = []
    def reads(n):
        for _ in range(n):
            os.write(w, record)
            kept.append(os.read(r, 262144))
            if len(kept) > 8:
                kept.pop(0)
    reads(200)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    reads(5000)
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SHRINKING_READS, mode],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_tuned_process_reuses_the_heap_for_shrinking_reads() -> None:
    tuned, faults = _faults("tune")
    assert tuned == "True"
    assert faults < 500  # ~0: the same heap memory serves every read


@glibc_only
def test_untuned_process_maps_fresh_pages_for_every_read() -> None:
    """The cost the tuning removes (and proof that the test above can fail)."""
    tuned, faults = _faults("plain")
    assert tuned == "False"
    assert faults > 5000


@glibc_only
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_TOP_PAD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
)
def test_operator_settings_are_left_alone(env: dict[str, str]) -> None:
    assert malloc_tuning.tune(env) is False


@glibc_only
def test_unrelated_tunables_do_not_stop_the_tuning() -> None:
    assert malloc_tuning.tune({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}) is True


def test_nothing_happens_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.libc_ver", lambda: ("", ""))
    assert malloc_tuning.tune({}) is False
